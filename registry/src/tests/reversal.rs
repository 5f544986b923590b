//! Reversals: a request to be dialed back goes to its target as
//! `dial_back`, or comes back as `reverse_failed` with the reason, and the
//! session goes on either way.

use super::*;
use crate::reversal::{BUDGET, BUDGET_WINDOW};

fn reverse(to: &str) -> ToRegistry {
    ToRegistry::Reverse { to: to.into() }
}

fn failure(sim: &mut Sim, c: Conn) -> (String, String) {
    match sim.take(c).as_slice() {
        [FromRegistry::ReverseFailed { to, code, .. }] => (to.clone(), code.clone()),
        other => panic!("expected reverse_failed, got {other:?}"),
    }
}

/// alice (1) and bob (2), both answering invitations; welcomes dropped.
fn two(sim: &mut Sim) {
    sim.register_relaying(1, "alice", 4001);
    sim.register_relaying(2, "bob", 4002);
    sim.take(1);
    sim.take(2);
}

#[test]
fn a_request_reaches_its_target_as_dial_back_from_the_asker() {
    let mut sim = Sim::new(config());
    two(&mut sim);
    sim.send(1, &reverse("BOB"));
    assert_eq!(
        sim.take(2),
        vec![FromRegistry::DialBack {
            from: "alice".into()
        }]
    );
    assert!(sim.take(1).is_empty(), "nothing to say to the asker");
    assert_eq!(sim.reg.stats().reversals, 1);
}

#[test]
fn requests_that_cannot_be_passed_on_fail_and_the_session_goes_on() {
    let mut sim = Sim::new(config());
    two(&mut sim);
    sim.register(3, "old", 4003);
    for c in 1..=3 {
        sim.take(c);
    }
    sim.send(1, &reverse("nobody"));
    assert_eq!(
        failure(&mut sim, 1),
        ("nobody".into(), "unknown_peer".into())
    );
    sim.send(1, &reverse("alice"));
    assert_eq!(
        failure(&mut sim, 1),
        ("alice".into(), "unknown_peer".into())
    );
    sim.send(1, &reverse("old"));
    assert_eq!(
        failure(&mut sim, 1),
        ("old".into(), "unreachable".into()),
        "a client from before reversals is never asked"
    );
    assert!(sim.take(3).is_empty());
    assert!(
        !sim.closed.contains_key(&1),
        "a failed request ends nothing"
    );
    sim.send(1, &reverse("bob"));
    assert_eq!(sim.take(2).len(), 1, "and the next one goes");
    assert_eq!(sim.reg.stats().reversals_failed, 3);
}

#[test]
fn an_asker_the_registry_could_not_dial_is_told_at_once() {
    let mut sim = Sim::new(Config {
        timeout: Duration::from_secs(60),
        ..config()
    });
    two(&mut sim);
    sim.reg.start_probes(sim.now, |n| 1000 + n as Conn);
    sim.apply();
    let (alice_probe, _) = sim.dials[0];
    sim.reg.on_closed(alice_probe, Disconnect::Lost, sim.now);
    sim.apply();
    sim.flush();
    sim.take(1);
    sim.take(2);
    sim.send(1, &reverse("bob"));
    assert_eq!(failure(&mut sim, 1), ("bob".into(), "unreachable".into()));
    assert!(sim.take(2).is_empty(), "bob's dial would fail: not asked");
}

#[test]
fn a_session_asks_a_bounded_number_of_times_per_window() {
    let mut sim = Sim::new(Config {
        timeout: Duration::from_secs(60),
        ..config()
    });
    two(&mut sim);
    for _ in 0..BUDGET {
        sim.send(1, &reverse("bob"));
    }
    assert_eq!(sim.take(2).len(), usize::from(BUDGET));
    sim.send(1, &reverse("bob"));
    assert_eq!(failure(&mut sim, 1), ("bob".into(), "relay_full".into()));
    assert!(sim.take(2).is_empty());
    sim.advance(BUDGET_WINDOW);
    sim.send(1, &reverse("bob"));
    assert_eq!(sim.take(2).len(), 1, "a new window, a new budget");
}
