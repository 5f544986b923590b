//! Liveness: heartbeats, eviction at the timeout, disconnects, slow
//! consumers and oversized frames, each a leave with its reason.

use super::*;

#[test]
fn heartbeats_keep_a_peer_and_silence_evicts_it() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.take(1);
    sim.take(2);
    // Bob heartbeats every 200ms for 3s; alice stays silent.
    for _ in 0..15 {
        sim.advance(Duration::from_millis(200));
        sim.send(2, &ToRegistry::Heartbeat {});
        sim.flush();
    }
    assert!(sim.closed.contains_key(&1));
    assert!(!sim.closed.contains_key(&2));
    let bob: Vec<_> = sim
        .take(2)
        .into_iter()
        .filter(|m| !matches!(m, FromRegistry::Heartbeat {}))
        .collect();
    assert_eq!(
        bob,
        vec![FromRegistry::Update {
            changes: vec![Change::Left {
                name: "alice".into(),
                reason: "timeout".into()
            }]
        }]
    );
    assert_eq!(sim.reg.stats().evictions, 1);
}

#[test]
fn eviction_happens_exactly_at_the_timeout() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.advance(Duration::from_millis(600));
    sim.send(1, &ToRegistry::Heartbeat {});
    sim.advance(Duration::from_millis(999));
    assert_eq!(
        sim.reg.peer_count(),
        1,
        "1599ms: 999ms since the last frame"
    );
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.reg.peer_count(),
        0,
        "1600ms: silent for the whole timeout"
    );
}

#[test]
fn disconnects_and_slow_consumers_are_leaves_with_reasons() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.register(3, "carol", 4003);
    sim.take(1);
    sim.reg.on_closed(2, Disconnect::Lost, sim.now);
    sim.reg.on_closed(3, Disconnect::Slow, sim.now);
    sim.flush();
    assert_eq!(
        sim.take(1),
        vec![FromRegistry::Update {
            changes: vec![
                Change::Left {
                    name: "bob".into(),
                    reason: "disconnected".into()
                },
                Change::Left {
                    name: "carol".into(),
                    reason: "slow".into()
                },
            ]
        }]
    );
}

#[test]
fn oversized_frames_are_told_and_closed() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.take(1);
    sim.take(2);
    sim.reg.on_closed(
        2,
        Disconnect::BadFrame(FrameError::TooLarge {
            len: 1 << 20,
            max: 65_536,
        }),
        sim.now,
    );
    sim.apply();
    assert!(
        matches!(&sim.take(2)[..], [FromRegistry::Error { code, .. }] if code == "frame_too_large")
    );
    sim.flush();
    assert_eq!(
        sim.take(1),
        vec![FromRegistry::Update {
            changes: vec![Change::Left {
                name: "bob".into(),
                reason: "protocol".into()
            }]
        }]
    );
}

#[test]
fn a_quiet_registry_answers_every_heartbeat() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.take(1);
    for _ in 0..5 {
        sim.advance(Duration::from_millis(200));
        sim.send(1, &ToRegistry::Heartbeat {});
        sim.flush();
        assert_eq!(sim.take(1), vec![FromRegistry::Heartbeat {}]);
    }
}

#[test]
fn under_load_updates_answer_heartbeats_and_no_peer_hears_nothing_for_long() {
    let heartbeat = Duration::from_secs(1);
    let mut sim = Sim::new(Config {
        heartbeat,
        timeout: Duration::from_secs(3),
        max_peers: 1000,
        // A session waits at most two windows for its update, within the
        // second an answer may take here.
        max_update_delay: Duration::from_millis(400),
        ..config()
    });
    sim.register(1, "alice", 4001);
    sim.take(1);
    let step = Duration::from_millis(50);
    let (mut heard_at, mut longest_silence) = (sim.now, Duration::ZERO);
    let mut answers = [0, 0];
    let mut next: Conn = 100;
    // 5 s of churn (two joins and two leaves every 50 ms, the load
    // reported high), then 5 s of quiet; alice heartbeats every second.
    for tick in 1..=200u32 {
        let churning = tick <= 100;
        sim.advance(step);
        if churning {
            for _ in 0..2 {
                sim.register(next, &format!("churn{next}"), 4000);
                if next >= 104 {
                    sim.send(next - 4, &ToRegistry::Leave {});
                }
                next += 1;
            }
        }
        if tick % 5 == 0 {
            let load = if churning { 0.95 } else { 0.05 };
            sim.reg.set_load(load, Duration::from_millis(250));
        }
        if tick % 20 == 0 {
            sim.send(1, &ToRegistry::Heartbeat {});
        }
        sim.flush();
        let heard = sim.take(1);
        if !heard.is_empty() {
            longest_silence = longest_silence.max(sim.now - heard_at);
            heard_at = sim.now;
        }
        answers[usize::from(!churning)] += heard
            .iter()
            .filter(|m| **m == FromRegistry::Heartbeat {})
            .count();
    }
    assert!(!sim.closed.contains_key(&1), "alice stays");
    assert_eq!(
        answers,
        [0, 5],
        "under churn the updates answer alice's heartbeats; in quiet, heartbeats do"
    );
    assert!(
        longest_silence <= heartbeat,
        "alice heard nothing for {longest_silence:?}"
    );
}
