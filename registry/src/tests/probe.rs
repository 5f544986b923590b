//! Reachability probes: each registered peer is dialed back at the address
//! the registry lists, and the directory says whether its own key answered
//! there; a bounded number at a time.

use super::*;
use crate::probe::{MAX_PROBING, MAX_WAITING, PROBE_TIMEOUT};

/// Probe links are numbered from here, apart from the peers' connections.
const PROBES: Conn = 1000;

impl Sim {
    /// Ends a turn the way the loop's driver does: probes start, then the
    /// held changes go.
    fn turn(&mut self) {
        self.reg.start_probes(self.now, |n| PROBES + n as Conn);
        self.apply();
        self.flush();
    }

    /// The registry's latest probe: its link and where it dialed.
    fn probe(&self) -> (Conn, SocketAddr) {
        *self.dials.last().expect("a probe")
    }

    fn moves(&mut self, c: Conn) -> Vec<(String, Option<bool>)> {
        self.take(c)
            .into_iter()
            .flat_map(|m| match m {
                FromRegistry::Update { changes } => changes,
                _ => Vec::new(),
            })
            .filter_map(|change| match change {
                Change::Moved {
                    name, reachable, ..
                } => Some((name, reachable)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_peer_answering_with_its_own_key_is_listed_reachable() {
    let mut sim = Sim::new(config());
    sim.register_relaying(1, "alice", 4001);
    sim.register_relaying(2, "bob", 4002);
    sim.turn();
    sim.take(1);
    // alice's probe went first, to the address listed for her.
    assert_eq!(sim.dials.len(), 2);
    let (alice_probe, addr) = sim.dials[0];
    assert_eq!(addr, SocketAddr::new(ip(1), 4001));
    sim.reg.probe_connected(alice_probe, owner("alice"));
    sim.apply();
    assert!(
        sim.closed.contains_key(&alice_probe),
        "a probe only shakes hands"
    );
    sim.turn();
    assert_eq!(sim.moves(2), vec![("alice".into(), Some(true))]);
    // A newcomer's welcome says it.
    sim.register(3, "carol", 4003);
    let welcome = sim.take(3);
    let alice = welcome_peers(&welcome[0])
        .into_iter()
        .find(|p| p.name == "alice")
        .unwrap();
    assert_eq!(alice.reachable, Some(true));
    let bob = welcome_peers(&welcome[0])
        .into_iter()
        .find(|p| p.name == "bob")
        .unwrap();
    assert_eq!(bob.reachable, None, "not probed yet");
}

#[test]
fn another_key_a_refused_dial_or_silence_is_unreachable() {
    for how in ["another key", "refused", "silence"] {
        // Long enough a timeout that the peers outlive the probe's.
        let mut sim = Sim::new(Config {
            timeout: Duration::from_secs(60),
            ..config()
        });
        sim.register_relaying(1, "alice", 4001);
        sim.register_relaying(2, "bob", 4002);
        sim.turn();
        sim.take(2);
        let (probe, _) = sim.dials[0];
        match how {
            "another key" => sim.reg.probe_connected(probe, owner("mallory")),
            "refused" => sim.reg.on_closed(probe, Disconnect::Lost, sim.now),
            _ => sim.advance(PROBE_TIMEOUT + Duration::from_millis(20)),
        }
        sim.apply();
        sim.turn();
        let about_alice: Vec<_> = sim
            .moves(2)
            .into_iter()
            .filter(|(n, _)| n == "alice")
            .collect();
        assert_eq!(about_alice, vec![("alice".into(), Some(false))], "{how}");
        assert_eq!(
            sim.reg.peer_count(),
            2,
            "{how}: a probe never removes a peer"
        );
    }
}

#[test]
fn only_peers_that_take_relays_hear_the_results() {
    let mut sim = Sim::new(config());
    sim.register_relaying(1, "alice", 4001);
    sim.register(2, "old", 4002);
    sim.turn();
    sim.take(1);
    sim.take(2);
    let (alice_probe, _) = sim.dials[0];
    sim.reg.probe_connected(alice_probe, owner("alice"));
    sim.apply();
    sim.turn();
    assert_eq!(sim.moves(1), vec![("alice".into(), Some(true))]);
    assert!(
        sim.take(2).is_empty(),
        "a peer from before relays gets no update that changes nothing for it"
    );
    // Other news in the same push still reaches it.
    let (old_probe, _) = sim.dials[1];
    sim.reg.probe_connected(old_probe, owner("old"));
    sim.apply();
    sim.register(3, "carol", 4003);
    sim.turn();
    let old_view: Vec<Change> = sim
        .take(2)
        .into_iter()
        .flat_map(|m| match m {
            FromRegistry::Update { changes } => changes,
            other => panic!("expected an update, got {other:?}"),
        })
        .collect();
    assert!(
        matches!(old_view.as_slice(), [Change::Joined { name, .. }] if name == "carol"),
        "{old_view:?}"
    );
    assert_eq!(sim.moves(1), vec![("old".into(), Some(true))]);
    // Its welcome still lists what the probes found: an optional field.
    sim.register(4, "dave", 4004);
    let welcome = sim.take(4);
    let alice = welcome_peers(&welcome[0])
        .into_iter()
        .find(|p| p.name == "alice")
        .unwrap();
    assert_eq!(alice.reachable, Some(true));
}

#[test]
fn probes_run_a_bounded_number_at_a_time() {
    let mut sim = Sim::new(Config {
        max_peers: 1000,
        ..config()
    });
    let peers = MAX_PROBING as Conn + 10;
    for c in 1..=peers {
        sim.register(c, &format!("peer{c}"), 4000);
    }
    sim.turn();
    assert_eq!(sim.dials.len(), MAX_PROBING);
    let (first, _) = sim.dials[0];
    sim.reg.on_closed(first, Disconnect::Lost, sim.now);
    sim.turn();
    assert_eq!(
        sim.dials.len(),
        MAX_PROBING + 1,
        "one ended, one more starts"
    );
}

#[test]
fn the_queue_of_probes_waiting_is_bounded() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    // A peer reclaiming its name over and over queues a probe each time.
    for _ in 0..MAX_WAITING + 10 {
        sim.reg.want_probe(1);
    }
    assert_eq!(sim.reg.probes.waiting(), MAX_WAITING);
}

#[test]
fn a_result_for_a_peer_that_left_or_moved_meanwhile_is_dropped() {
    let mut sim = Sim::new(config());
    sim.register_relaying(1, "alice", 4001);
    sim.register_relaying(2, "bob", 4002);
    sim.turn();
    sim.take(2);
    let (probe, _) = sim.probe();
    // bob's probe: bob leaves before it answers.
    sim.send(2, &ToRegistry::Leave {});
    sim.reg.probe_connected(probe, owner("bob"));
    sim.apply();
    sim.turn();
    assert!(sim.moves(1).iter().all(|(name, _)| name != "bob"));
}

#[test]
fn a_registry_that_does_not_probe_never_dials() {
    let mut sim = Sim::new(Config {
        probe: false,
        ..config()
    });
    sim.register(1, "alice", 4001);
    sim.turn();
    assert!(sim.dials.is_empty());
}
