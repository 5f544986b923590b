//! One case: a registry, its control client, a baseline, the expected
//! updates, and the checks every case ends with.

use std::time::Duration;

use peerchat_core::identity::Identity;
use peerchat_core::protocol::{Change, FromRegistry};
use peerchat_testkit::client::Client;
use peerchat_testkit::launch::Registry;

use crate::control::{late_joiner, Watcher};
use crate::ending::{
    assert_refused, assert_same_changes, finish_client, plain_attack, registry_msgs, End,
};
use crate::system::{assert_alive, settle, usage, Usage, AT_ONCE};
use crate::wire::{change_name, joined, left};

pub struct Case {
    pub name: String,
    pub watcher: Watcher,
    pub reg: Registry,
    pub base: Usage,
    /// What the control client must see, in order.
    pub expected: Vec<Change>,
    /// Names starting with this are checked by the test itself, not here.
    pub unordered_prefix: Option<String>,
    pub victims: usize,
}

impl Case {
    /// A registry with a stats line every second: the registry hands freed
    /// memory back to the system at each one, so that RSS measures what it
    /// holds, not what the allocator kept.
    pub fn start(name: &str, extra: &[&str]) -> Case {
        let mut args = vec!["--stats-interval", "1s"];
        args.extend_from_slice(extra);
        Self::with_registry(name, Registry::start(&args))
    }

    pub fn with_registry(name: &str, reg: Registry) -> Case {
        let watcher = Watcher::start(reg.addr, "control");
        // The registry dials the control client back (4.7): the baseline
        // is taken once that probe's descriptor is gone.
        assert!(
            reg.proc
                .stderr
                .wait_for("probed name=control", Duration::from_secs(5)),
            "{name}: the registry never probed the control client"
        );
        let base = usage(reg.proc.pid());
        Case {
            name: name.into(),
            watcher,
            reg,
            base,
            expected: Vec::new(),
            unordered_prefix: None,
            victims: 0,
        }
    }

    pub fn pid(&self) -> i32 {
        self.reg.proc.pid()
    }

    /// Sends `bytes` of the frame stream, inside the Noise session, on a
    /// fresh connection (registered first when `registered`), and checks
    /// the refusal. Returns the key the victim used.
    pub fn attack(&mut self, label: &str, registered: bool, bytes: &[u8], code: &str) -> Identity {
        self.attack_with(label, registered, Some(code), |c| {
            // The registry may close before it has read everything; what it
            // sent before the close is what counts.
            let _ = c.send_raw(bytes);
        })
    }

    /// Breaks the Noise session itself on a fresh connection (registered
    /// first when `registered`): the registry must close it without a word.
    pub fn attack_session(&mut self, label: &str, registered: bool, act: impl FnOnce(&mut Client)) {
        self.attack_with(label, registered, None, act);
    }

    pub fn attack_with(
        &mut self,
        label: &str,
        registered: bool,
        code: Option<&str>,
        act: impl FnOnce(&mut Client),
    ) -> Identity {
        let label = format!("{}/{label}", self.name);
        self.victims += 1;
        let victim = format!("victim{}", self.victims);
        let port = 5000 + self.victims as i64;
        let mut c = if registered {
            let (c, welcome) = Client::register(self.reg.addr, &victim, port);
            assert!(
                matches!(welcome, FromRegistry::Welcome { .. }),
                "{label}: {welcome:?}"
            );
            self.expected.push(joined(&victim, port, c.key()));
            c
        } else {
            Client::connect(self.reg.addr)
        };
        c.stream()
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        act(&mut c);
        let f = finish_client(&mut c, Duration::from_secs(3));
        match code {
            Some(code) => assert_refused(&label, &f, code),
            None => {
                let msgs = registry_msgs(&label, &f);
                assert!(
                    f.end != End::Open && msgs.is_empty(),
                    "{label}: expected a close without a word, got {msgs:?} then {:?}",
                    f.end
                );
            }
        }
        assert!(
            f.elapsed < AT_ONCE,
            "{label}: closed only after {:?}",
            f.elapsed
        );
        if registered {
            let reason = if code.is_some() {
                "protocol"
            } else {
                "disconnected"
            };
            self.expected.push(left(&victim, reason));
        }
        let identity = c.identity.clone();
        drop(c);
        assert_alive(&label, &mut self.reg);
        identity
    }

    /// Bytes where the Noise handshake belongs, on a fresh connection: the
    /// registry must close it at once without a word, and the app never
    /// hears of it.
    pub fn attack_plain(&mut self, label: &str, bytes: &[u8]) {
        let label = format!("{}/{label}", self.name);
        plain_attack(&label, self.reg.addr, bytes);
        assert_alive(&label, &mut self.reg);
    }

    /// The closing checks shared by every case. Returns the usage after.
    pub fn finish(mut self) -> Usage {
        let label = self.name.clone();
        assert_alive(&label, &mut self.reg);
        let late = format!("late-{}", self.name);
        let key = late_joiner(&label, &self.reg, &self.watcher, &late, 4999);
        self.expected.push(joined(&late, 4999, key));
        self.expected.push(left(&late, "quit"));
        let prefix = self.unordered_prefix.clone();
        let keep = |c: &Change| {
            prefix
                .as_deref()
                .is_none_or(|p| !change_name(c).starts_with(p))
        };
        let want = self.expected.len();
        self.watcher.wait_until(Duration::from_secs(5), |c| {
            c.iter().filter(|c| keep(c)).count() >= want
        });
        let got: Vec<Change> = self
            .watcher
            .changes()
            .into_iter()
            .filter(|c| keep(c))
            .collect();
        assert_same_changes(&label, &got, &self.expected);
        self.watcher.assert_open(&label);
        assert_alive(&label, &mut self.reg);
        settle(&label, self.pid(), self.base)
    }
}
