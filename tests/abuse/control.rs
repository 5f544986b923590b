//! The control client: registered before every attack, it must keep its
//! registration and see every update in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{Change, FromRegistry, ToRegistry};
use peerchat_testkit::client::{is_timeout, Client};
use peerchat_testkit::launch::Registry;

use crate::ending::{finish_client, End};
use crate::wire::{heartbeat_frame, joined, left};

#[derive(Default)]
pub struct Seen {
    pub changes: Vec<Change>,
    /// Why the control connection ended, if it did.
    pub ended: Option<String>,
}

/// A registered client that heartbeats and reads on its own thread, and
/// records every change it is told about, in order.
pub struct Watcher {
    pub name: String,
    pub seen: Arc<Mutex<Seen>>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(addr: SocketAddr, name: &str) -> Watcher {
        let (client, welcome) = Client::register(addr, name, 4000);
        assert!(
            matches!(welcome, FromRegistry::Welcome { .. }),
            "the control client registers: {welcome:?}"
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            thread::spawn(move || watch(client, seen, stop))
        };
        Watcher {
            name: name.into(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn changes(&self) -> Vec<Change> {
        self.seen.lock().unwrap().changes.clone()
    }

    /// Polls (bounded) until `pred` holds for the changes seen so far.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Change]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..100_000 {
            if pred(&self.seen.lock().unwrap().changes) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn wait_for(&self, change: &Change, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.contains(change))
    }

    pub fn assert_open(&self, label: &str) {
        let ended = self.seen.lock().unwrap().ended.clone();
        assert!(
            ended.is_none(),
            "{label}: the control client lost its registration: {ended:?}"
        );
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn watch(mut c: Client, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let end = |seen: &Mutex<Seen>, why: String| {
        seen.lock().unwrap().ended.get_or_insert(why);
    };
    c.stream()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let hb = heartbeat_frame();
    let mut last_hb = Instant::now();
    let cap = Instant::now() + Duration::from_secs(300);
    for _ in 0..10_000_000 {
        if stop.load(Ordering::Relaxed) || Instant::now() >= cap {
            return;
        }
        if last_hb.elapsed() >= Duration::from_millis(100) {
            if let Err(e) = c.send_raw(&hb) {
                return end(&seen, format!("heartbeat failed: {e}"));
            }
            last_hb = Instant::now();
        }
        let msg = match c.conn.read_frame() {
            Ok(None) => return end(&seen, "closed by the registry".into()),
            Ok(Some(body)) => codec::decode::<FromRegistry>(&body),
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return end(&seen, format!("read failed: {e}")),
        };
        match msg {
            Ok(FromRegistry::Update { changes }) => seen.lock().unwrap().changes.extend(changes),
            Ok(FromRegistry::Heartbeat {} | FromRegistry::Snapshot { .. }) => {}
            other => return end(&seen, format!("unexpected {other:?}")),
        }
    }
}

/// Registers a client after an attack: it must find the control client in
/// its welcome, and the control client must see it join and leave. Returns
/// the key it joined with.
pub fn late_joiner(label: &str, reg: &Registry, w: &Watcher, name: &str, port: i64) -> PublicKey {
    let (mut c, welcome) = Client::register(reg.addr, name, port);
    let FromRegistry::Welcome { peers, .. } = welcome else {
        panic!("{label}: a late joiner was refused: {welcome:?}")
    };
    assert!(
        peers.iter().any(|p| p.name == w.name),
        "{label}: the control client is no longer listed: {peers:?}"
    );
    assert!(
        w.wait_for(&joined(name, port, c.key()), Duration::from_secs(3)),
        "{label}: the control client never heard of the late joiner; saw {:?}",
        w.changes().iter().rev().take(5).collect::<Vec<_>>()
    );
    c.send(&ToRegistry::Leave {});
    let f = finish_client(&mut c, Duration::from_secs(3));
    assert_ne!(f.end, End::Open, "{label}: leave closes the connection");
    assert!(
        w.wait_for(&left(name, "quit"), Duration::from_secs(3)),
        "{label}: the control client never heard the late joiner leave"
    );
    c.key()
}
