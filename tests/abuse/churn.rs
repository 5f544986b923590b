//! Case 14: churn.

use std::collections::HashMap;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use peerchat_core::identity::Identity;
use peerchat_core::limits::raise_fd_limit;
use peerchat_core::protocol::{Change, FromRegistry};
use peerchat_testkit::client::Client;

use crate::case::Case;
use crate::system::heavy;
use crate::wire::change_name;

/// Ten thousand cycles, each with its own Noise handshake.
#[test]
fn ten_thousand_register_and_close_cycles_leave_nothing_behind() {
    raise_fd_limit(u64::MAX);
    let _heavy = heavy();
    let mut case = Case::start("cycles", &[]);
    case.unordered_prefix = Some("cyc".into());
    const THREADS: usize = 4;
    const PER_THREAD: usize = 2500;
    let addr = case.reg.addr;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let workers: Vec<JoinHandle<usize>> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let mut done = 0;
                // One key per thread, registering a new name each time.
                let identity = Identity::generate();
                for i in 0..PER_THREAD {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let name = format!("cyc{t}-{i}");
                    let (c, welcome) =
                        Client::register_as(addr, &identity, &name, 20_000 + i as i64);
                    assert!(
                        matches!(welcome, FromRegistry::Welcome { .. }),
                        "{name}: {welcome:?}"
                    );
                    drop(c);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let done: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    eprintln!("[cycles] {done} cycles in {:?}", start.elapsed());
    assert_eq!(done, THREADS * PER_THREAD, "cycles done within 60 s");
    let total = THREADS * PER_THREAD;
    let counts = |c: &[Change]| {
        let j = c
            .iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name.starts_with("cyc")))
            .count();
        let l = c
            .iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name.starts_with("cyc")))
            .count();
        (j, l)
    };
    case.watcher
        .wait_until(Duration::from_secs(20), |c| counts(c) == (total, total));
    let seen = case.watcher.changes();
    assert_eq!(counts(&seen), (total, total), "joined and left per cycle");
    // Every name joined once, then left once, as disconnected.
    let mut per_name: HashMap<&str, Vec<(usize, &Change)>> = HashMap::new();
    for (i, c) in seen.iter().enumerate() {
        if change_name(c).starts_with("cyc") {
            per_name.entry(change_name(c)).or_default().push((i, c));
        }
    }
    assert_eq!(per_name.len(), total, "distinct names");
    for (name, list) in &per_name {
        match list.as_slice() {
            [(a, Change::Joined { .. }), (b, Change::Left { reason, .. })]
                if a < b && reason == "disconnected" => {}
            other => panic!("cycles: {name}: {other:?}"),
        }
    }
    case.finish();
}
