//! The real `registry` and `peer` binaries on loopback, started the way the
//! end-to-end tests need them: fast heartbeats, a private data directory,
//! and what they print followed.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use serde_json::Value;

use crate::bins::bin;
use crate::process::{collect, DataDir, Proc};

/// Frequent heartbeats keep fault tests fast (see the reliability issue).
pub const HEARTBEAT: &str = "200ms";
/// Long enough that a test thread or a client stalled by a busy machine is
/// not evicted; the tests of eviction itself pass `--timeout` with
/// [`EVICT_AFTER`].
pub const TIMEOUT: &str = "5s";
/// What the eviction tests pass as `--timeout`: short, so that they are.
pub const EVICT_AFTER: &str = "1s";
/// The longest a test waits for something that must happen: generous, for
/// a busy two-core machine.
pub const LONG: Duration = Duration::from_secs(15);
/// A predicate on `--json` events: the event named `event` whose `key` is
/// `value`.
pub fn is(event: &str, key: &str, value: &str) -> impl Fn(&Value) -> bool {
    let (event, key, value) = (event.to_string(), key.to_string(), value.to_string());
    move |v: &Value| v["event"] == event.as_str() && v[key.as_str()] == value.as_str()
}

/// A predicate on `--json` events: the registry found that others can dial
/// this peer.
pub fn can_be_dialed(v: &Value) -> bool {
    v["event"] == "reachable" && v["you"] == true && v["reachable"] == true
}

/// Where a registry listens and the key it proves, once its stderr `lines`
/// have said both (it names its key before it says where it listens), as
/// the messages of its log lines (`TIME  INFO registry key KEY`).
pub fn announced<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<(SocketAddr, PublicKey)> {
    let mut key = None;
    for line in lines {
        if let Some((_, k)) = line.split_once(" INFO registry key ") {
            key = Some(PublicKey::parse(k.trim()).expect("the registry's key"));
        }
        if let Some((_, addr)) = line.split_once(" INFO listening on ") {
            let addr = addr.trim().parse().expect("listening address");
            let key = key.expect("the registry prints its key before it listens");
            return Some((addr, key));
        }
    }
    None
}

/// A `registry` process on loopback and what it announced.
pub struct Registry {
    /// The process, killed when dropped.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The static key it printed at start.
    pub key: PublicKey,
    /// Its `XDG_DATA_HOME` (where its key file is unless `--key` says).
    pub data: DataDir,
}

impl Registry {
    /// On a free port of 127.0.0.1, with a fresh data directory.
    pub fn start(extra: &[&str]) -> Registry {
        Self::launch(&[], "127.0.0.1:0", extra)
    }

    /// On `listen` (a host name, an IPv6 address, a fixed port).
    pub fn start_on(listen: &str, extra: &[&str]) -> Registry {
        Self::launch(&[], listen, extra)
    }

    /// A registry with the data directory (so the key) of an earlier one:
    /// what a restart of the same registry is.
    pub fn start_in(data: &DataDir, listen: &str, extra: &[&str]) -> Registry {
        Self::launch_in(&[], data, listen, extra)
    }

    /// Like [`Registry::start`], but run under a wrapper that execs the
    /// registry in its own process (for example `prlimit --nofile=64:64`),
    /// so that the child's pid is the registry's.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Registry {
        Self::launch(wrapper, "127.0.0.1:0", extra)
    }

    /// Runs the registry under `wrapper` (e.g. `ip netns exec NS`), which
    /// may be empty, with a fresh data directory. Returns once it has said
    /// where it listens.
    pub fn launch(wrapper: &[&str], listen: &str, extra: &[&str]) -> Registry {
        Self::launch_in(wrapper, &DataDir::fresh(), listen, extra)
    }

    /// Like [`Registry::launch`], with the data directory `data`.
    pub fn launch_in(wrapper: &[&str], data: &DataDir, listen: &str, extra: &[&str]) -> Registry {
        let mut cmd = wrapped(wrapper, "registry");
        cmd.args(["--listen", listen]);
        for (flag, value) in [("--heartbeat", HEARTBEAT), ("--timeout", TIMEOUT)] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .env("XDG_DATA_HOME", data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("registry starts");
        let (tx, rx) = mpsc::channel();
        let stderr = collect(child.stderr.take().unwrap(), Some(tx));
        let proc = Proc { child, stderr };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    said.push(line);
                    if let Some((addr, key)) = announced(said.iter().map(String::as_str)) {
                        return Registry {
                            proc,
                            addr,
                            key,
                            data: data.clone(),
                        };
                    }
                }
                Err(_) => panic!(
                    "registry never said it was listening: {:?}",
                    proc.stderr.snapshot()
                ),
            }
        }
    }
}

/// A command that runs one of our binaries, under `wrapper` if not empty.
fn wrapped(wrapper: &[&str], binary: &str) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin(binary));
            cmd
        }
        None => Command::new(bin(binary)),
    }
}

/// A `peer --json` process and the events it printed.
pub struct PeerProc {
    /// The process, killed when dropped.
    pub proc: Proc,
    /// The name it registers.
    pub name: String,
    /// Its `XDG_DATA_HOME`: its key file and `known_peers`.
    pub data: DataDir,
    stdin: Option<ChildStdin>,
    events: Receiver<String>,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
}

impl PeerProc {
    /// Registers `name` with the registry at `registry`, fresh data directory.
    pub fn start(name: &str, registry: SocketAddr) -> PeerProc {
        Self::start_with(name, &registry.to_string(), &[])
    }

    /// Like [`PeerProc::start`], with more arguments and a registry given as
    /// text (a host name, a dead port).
    pub fn start_with(name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::start_in(&[], name, registry, extra)
    }

    /// Runs the peer under `wrapper` (e.g. `ip netns exec NS`), which may be
    /// empty, with a fresh data directory. It listens on 127.0.0.1 unless
    /// `extra` says `--listen`.
    pub fn start_in(wrapper: &[&str], name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::launch(wrapper, &DataDir::fresh(), name, registry, extra)
    }

    /// A peer with the data directory (so the key and pins) of an earlier
    /// one: what a restart of the same peer is.
    pub fn start_again(data: &DataDir, name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::launch(&[], data, name, registry, extra)
    }

    /// Runs the peer under `wrapper` (may be empty) with the data directory
    /// `data`; every other start is this one.
    pub fn launch(
        wrapper: &[&str],
        data: &DataDir,
        name: &str,
        registry: &str,
        extra: &[&str],
    ) -> PeerProc {
        let mut cmd = wrapped(wrapper, "peer");
        cmd.args(["--name", name, "--registry", registry, "--json"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("XDG_DATA_HOME", data.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("peer starts");
        let (tx, rx) = mpsc::channel();
        collect(child.stdout.take().unwrap(), Some(tx));
        let stderr = collect(child.stderr.take().unwrap(), None);
        let stdin = child.stdin.take();
        PeerProc {
            proc: Proc { child, stderr },
            name: name.into(),
            data: data.clone(),
            stdin,
            events: rx,
            seen: Vec::new(),
        }
    }

    /// The key fingerprint it printed at start.
    pub fn key(&self) -> PublicKey {
        let text = self
            .proc
            .stderr
            .wait_for_prefix("peer: your key fingerprint is ", LONG)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no key fingerprint on stderr: {:?}",
                    self.name,
                    self.proc.stderr.snapshot()
                )
            });
        PublicKey::parse(&text).expect("a fingerprint")
    }

    /// Types `line` on its stdin: a message or a command.
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin: the peer treats it as /quit.
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Waits for the first new event matching `pred`; every event read on
    /// the way is kept in `seen`.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.try_expect(timeout, pred) {
            Ok(value) => value,
            Err(why) => panic!(
                "{}: no {what} within {timeout:?} ({why}); saw {:?}; stderr {:?}",
                self.name,
                self.seen,
                self.proc.stderr.snapshot()
            ),
        }
    }

    /// Like [`PeerProc::expect`], but says why nothing matched instead of
    /// panicking: for tests that check that something does not happen.
    pub fn try_expect(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, &'static str> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("{}: stdout line is not JSON ({e}): {line}", self.name)
                    });
                    self.seen.push(value.clone());
                    if pred(&value) {
                        return Ok(value);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("timed out"),
                Err(RecvTimeoutError::Disconnected) => return Err("stdout closed"),
            }
        }
    }

    /// Waits for the first new event named `event`.
    pub fn expect_event(&mut self, event: &str, timeout: Duration) -> Value {
        self.expect(event, timeout, |v| v["event"] == event)
    }

    /// Reads every event printed until the process's stdout closes.
    pub fn drain_until_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => self.seen.push(serde_json::from_str(&line).expect("JSON")),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: still printing after {timeout:?}", self.name)
                }
            }
        }
    }

    /// Registers and returns the `registered` event.
    pub fn registered(&mut self) -> Value {
        self.expect_event("registered", Duration::from_secs(10))
    }

    /// How many events read so far match `pred`.
    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.seen.iter().filter(|v| pred(v)).count()
    }
}
