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
