//! The store and offline delivery, with real `registry` and `peer --json`
//! processes on 127.0.0.1: `kill -9` of a sender or a receiver in the
//! middle of a burst, a target away for the whole send, the time to live,
//! a name back with another key, store files the peer must refuse, and the
//! history across restarts.
//!
//! The contract under test (README, "History and offline delivery"): every
//! message ends, per target, as exactly one `delivered` or `undelivered`,
//! possibly in a later run of the sender, and a receiver shows each message
//! once, even across crashes of either side.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_peer::journal::Query;
use peerchat_peer::store::{Options, Store};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use serde_json::Value;

mod away;
mod burst;
mod files;
mod history;

/// Messages in each burst.
const BURST: usize = 5000;
/// A process is killed once its receiver showed this many of the burst:
/// well into it, well before its end.
const KILL_AFTER: usize = 500;
/// How long the rest of a burst may take to arrive once the killed process
/// is back: generous for a busy two-core machine running a debug build.
const RECOVERY: Duration = Duration::from_secs(15);
/// How long a receiver is watched for a message it must not show: one that
/// was on its way would have arrived within it.
const QUIET: Duration = Duration::from_millis(1500);

/// Starts peers one after another, each registered (and seen to join by
/// the earlier ones) before the next, so that a message to everyone from
/// any of them reaches all the others.
fn start_peers(reg: &Registry, peers: &[(&str, &[&str])]) -> Vec<PeerProc> {
    let mut started: Vec<PeerProc> = Vec::new();
    for (name, extra) in peers {
        let mut p = PeerProc::start_with(name, &reg.addr.to_string(), extra);
        p.registered();
        for earlier in started.iter_mut() {
            earlier.expect("joined", LONG, is("joined", "name", name));
        }
        started.push(p);
    }
    started
}

/// Starts `old` again: the same data directory, so the same key, pins and
/// store. Returns once it registered.
fn restart(old: &PeerProc, reg: &Registry, extra: &[&str]) -> PeerProc {
    let mut again = PeerProc::start_again(&old.data, &old.name, &reg.addr.to_string(), extra);
    again.registered();
    again
}

/// Reads `p`'s events, handing each to `done`, until `done` says so or
/// `within` has passed (false then). Every event read stays in `p.seen`.
fn read_until(p: &mut PeerProc, within: Duration, mut done: impl FnMut(&Value) -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match p.try_expect(left, |_| true) {
            Ok(event) => {
                if done(&event) {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Kills `p` with SIGKILL and reads what it printed before it died.
fn kill_9(p: &mut PeerProc) {
    p.proc.signal(libc::SIGKILL);
    let status = p.proc.wait_exit(LONG).expect("a killed peer exits");
    assert_eq!(status.code(), None, "{}: killed, not exited", p.name);
    p.drain_until_exit(LONG);
}

/// Asks `p` to quit and waits for status 0: what waits stays in its store.
fn quit(p: &mut PeerProc) {
    p.say("/quit");
    let status = p.proc.wait_exit(LONG);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}: /quit exits 0; stderr {:?}",
        p.name,
        p.proc.stderr.snapshot()
    );
    p.drain_until_exit(LONG);
}

fn id_of(event: &Value) -> u64 {
    event["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {event}"))
}

fn names_in(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|n| n.as_str().expect("a name").to_string())
        .collect()
}

/// Each `sent`'s id and targets, in order.
type Sent = Vec<(u64, Vec<String>)>;

/// The `sent` events in `events`, in order.
fn sent(events: &[Value]) -> Sent {
    events
        .iter()
        .filter(|v| v["event"] == "sent")
        .map(|v| (id_of(v), names_in(&v["to"])))
        .collect()
}

/// The outcome events (`delivered`, `undelivered`) in `events`.
fn outcomes(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|v| v["event"] == "delivered" || v["event"] == "undelivered")
        .collect()
}

/// The messages `from` shown in `events`, in order: (id, text, direct).
fn shown_from(events: &[Value], from: &str) -> Vec<(u64, String, bool)> {
    events
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == from)
        .map(|v| {
            (
                id_of(v),
                v["text"].as_str().expect("a text").to_string(),
                v["direct"].as_bool().expect("direct"),
            )
        })
        .collect()
}

/// The burst's lines, messages to everyone.
fn burst_lines() -> Vec<String> {
    (0..BURST).map(|i| format!("burst {i} ✓")).collect()
}

/// Types every line at once: one write, as a paste or a pipe would.
fn type_all(p: &mut PeerProc, lines: &[String]) {
    p.say(&lines.join("\n"));
}

/// The store a peer named `name` keeps in `data` by default.
fn store_path(data: &DataDir, name: &str) -> PathBuf {
    data.peer_key_file(name).with_extension("db")
}
