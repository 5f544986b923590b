//! Relayed links: pairing an opener with the peer it invites, passing
//! bytes both ways untouched, every refusal, and the bounds (the window
//! per direction, the byte rates, the number of relay connections).

use super::*;
use crate::relay::{INVITE_TIMEOUT, PAUSE_AT, STALL_TIMEOUT};
use peerchat_core::protocol::RELAY_CHUNK;

/// Registers `name` as a peer that takes relay invitations; its welcome
/// is dropped.
fn register_relaying(sim: &mut Sim, c: Conn, name: &str) {
    sim.register_relaying(c, name, 4000);
    sim.take(c);
}

fn open(from: &str, to: &str) -> ToRegistry {
    ToRegistry::RelayOpen {
        version: PROTOCOL_VERSION,
        from: from.into(),
        to: to.into(),
    }
}

fn join(id: u64) -> ToRegistry {
    ToRegistry::RelayJoin {
        version: PROTOCOL_VERSION,
        id,
    }
}

/// `from`'s new relay connection `c` asks for `to`, online on connection
/// `to_conn`; the id of the invitation `to` gets.
fn open_to(
    sim: &mut Sim,
    c: Conn,
    (from, from_conn): (&str, Conn),
    (to, to_conn): (&str, Conn),
) -> u64 {
    sim.accept_as(c, ip(from_conn as u8), owner(from));
    sim.send(c, &open(from, to));
    match sim.take(to_conn).as_slice() {
        [FromRegistry::Relay { id, from: asker }] => {
            assert_eq!(asker, from);
            *id
        }
        other => panic!("expected an invitation, got {other:?}"),
    }
}

/// alice (1) and bob (2) online; alice's relay connection (10) asks for
/// bob; the invitation's id.
fn invited(sim: &mut Sim) -> u64 {
    register_relaying(sim, 1, "alice");
    register_relaying(sim, 2, "bob");
    sim.take(1);
    open_to(sim, 10, ("alice", 1), ("bob", 2))
}

/// A registry whose relays carry at most `rate` bytes a second per key,
/// and alice in debt on it: her relay connection (10) is not read.
fn alice_in_debt(rate: u64) -> Sim {
    let mut sim = Sim::new(Config {
        relay: RelayConfig {
            peer_rate: rate,
            ..RelayConfig::default()
        },
        ..config()
    });
    paired(&mut sim);
    // The bucket starts full (one second's worth), then runs dry.
    for _ in 0..5 {
        sim.send_raw(10, &vec![7u8; 64 * 1024]);
        sim.reg.relay_drained(11);
        sim.apply();
    }
    assert_eq!(sim.reading.get(&10), Some(&false), "alice is in debt");
    sim
}

/// alice's relay connection (10) paired with bob's (11).
fn paired(sim: &mut Sim) {
    let id = invited(sim);
    sim.accept_as(11, ip(2), owner("bob"));
    sim.send(11, &join(id));
    for end in [10, 11] {
        assert_eq!(sim.take(end), vec![FromRegistry::RelayReady {}]);
        assert_eq!(sim.max_frame.get(&end), Some(&RELAY_CHUNK));
    }
}

#[test]
fn a_pair_passes_bytes_both_ways_as_they_are() {
    let mut sim = Sim::new(config());
    paired(&mut sim);
    // Not messages: whatever the peers' own session makes of them.
    sim.send_raw(10, b"\x00sealed by alice");
    sim.send_raw(11, b"sealed by bob");
    sim.send_raw(11, b"and more");
    assert_eq!(sim.relayed[&11], vec![b"\x00sealed by alice".to_vec()]);
    assert_eq!(
        sim.relayed[&10],
        vec![b"sealed by bob".to_vec(), b"and more".to_vec()]
    );
    let stats = sim.reg.relay_stats();
    assert_eq!((stats.opened, stats.bytes, stats.ends), (1, 37, 2));
    // Nobody else heard of it, and the directory did not change.
    assert!(sim.take(1).is_empty() && sim.take(2).is_empty());
    assert_eq!(sim.reg.peer_count(), 2);
}

#[test]
fn either_end_closing_closes_the_other() {
    for (gone, other) in [(10, 11), (11, 10)] {
        let mut sim = Sim::new(config());
        paired(&mut sim);
        sim.reg.on_closed(gone, Disconnect::Lost, sim.now);
        sim.apply();
        assert!(sim.closed.contains_key(&other));
        assert_eq!(sim.reg.relay_stats().ends, 0);
        // The peers themselves stay.
        assert_eq!(sim.reg.peer_count(), 2);
    }
}

#[test]
fn an_invitation_nobody_answers_ends_as_unreachable() {
    let mut sim = Sim::new(config());
    invited(&mut sim);
    sim.advance(INVITE_TIMEOUT + Duration::from_millis(20));
    assert_eq!(sim.error_code(10), "unreachable");
    assert_eq!(sim.reg.relay_stats().ends, 0);
}

#[test]
fn an_opener_that_leaves_takes_its_invitation_along() {
    let mut sim = Sim::new(config());
    let id = invited(&mut sim);
    sim.reg.on_closed(10, Disconnect::Lost, sim.now);
    sim.apply();
    sim.accept_as(11, ip(2), owner("bob"));
    sim.send(11, &join(id));
    assert_eq!(sim.error_code(11), "unreachable");
}

#[test]
fn only_the_invited_key_joins() {
    let mut sim = Sim::new(config());
    let id = invited(&mut sim);
    sim.accept_as(11, ip(3), owner("mallory"));
    sim.send(11, &join(id));
    assert_eq!(sim.error_code(11), "key_mismatch");
    // bob still can.
    sim.accept_as(12, ip(2), owner("bob"));
    sim.send(12, &join(id));
    assert_eq!(sim.take(12), vec![FromRegistry::RelayReady {}]);
}

#[test]
fn every_refusal_has_its_code() {
    let refused = |sim: &mut Sim, key: PublicKey, msg: ToRegistry| {
        sim.accept_as(20, ip(9), key);
        sim.send(20, &msg);
        let code = sim.error_code(20);
        sim.closed.remove(&20);
        code
    };
    let mut sim = Sim::new(config());
    register_relaying(&mut sim, 1, "alice");
    register_relaying(&mut sim, 2, "bob");
    sim.register(3, "carol", 4000); // an older peer: takes no relays
    assert_eq!(
        refused(&mut sim, owner("mallory"), open("alice", "bob")),
        "unknown_peer",
        "only alice's key opens as alice"
    );
    assert_eq!(
        refused(&mut sim, owner("alice"), open("alice", "dave")),
        "unknown_peer"
    );
    assert_eq!(
        refused(&mut sim, owner("alice"), open("alice", "carol")),
        "unreachable"
    );
    assert_eq!(refused(&mut sim, owner("bob"), join(999)), "unreachable");
    let mut off = Sim::new(Config {
        relay: RelayConfig {
            enabled: false,
            ..RelayConfig::default()
        },
        ..config()
    });
    register_relaying(&mut off, 1, "alice");
    register_relaying(&mut off, 2, "bob");
    assert_eq!(
        refused(&mut off, owner("alice"), open("alice", "bob")),
        "relay_refused"
    );
    assert_eq!(sim.reg.relay_stats().refused, 4);
}

#[test]
fn relay_connections_are_capped_per_key_and_in_all() {
    let mut sim = Sim::new(Config {
        relay: RelayConfig {
            per_peer: 2,
            max: 3,
            ..RelayConfig::default()
        },
        ..config()
    });
    register_relaying(&mut sim, 1, "alice");
    register_relaying(&mut sim, 2, "bob");
    let mut open_as = |c: Conn, from: &str, to: &str| {
        sim.accept_as(c, ip(1), owner(from));
        sim.send(c, &open(from, to));
        sim.closed.contains_key(&c).then(|| sim.error_code(c))
    };
    assert_eq!(open_as(10, "alice", "bob"), None);
    assert_eq!(open_as(11, "alice", "bob"), None);
    assert_eq!(
        open_as(12, "alice", "bob").as_deref(),
        Some("relay_full"),
        "per key"
    );
    assert_eq!(open_as(13, "bob", "alice"), None);
    assert_eq!(
        open_as(14, "bob", "alice").as_deref(),
        Some("relay_full"),
        "in all"
    );
}

#[test]
fn a_frame_before_the_pair_is_ready_is_a_protocol_error() {
    let mut sim = Sim::new(config());
    invited(&mut sim);
    sim.send_raw(10, b"too early");
    assert_eq!(sim.error_code(10), "protocol");
}

#[test]
fn a_direction_past_its_window_is_not_read_until_the_other_end_drains() {
    let mut sim = Sim::new(config());
    paired(&mut sim);
    let chunk = vec![7u8; 32 * 1024];
    for _ in 0..(PAUSE_AT / chunk.len()) {
        sim.send_raw(10, &chunk);
    }
    assert_eq!(sim.reading.get(&10), None, "within the window");
    sim.send_raw(10, &chunk);
    assert_eq!(sim.reading.get(&10), Some(&false));
    assert_eq!(sim.watching, vec![11]);
    // The other way is not held.
    sim.send_raw(11, &chunk);
    assert_eq!(sim.reading.get(&11), None);
    sim.reg.relay_drained(11);
    sim.apply();
    assert_eq!(sim.reading.get(&10), Some(&true));
}

/// alice and bob paired, on a registry that never times them out, and
/// alice's direction full: bob has not taken what she sent.
fn window_full() -> Sim {
    let mut sim = Sim::new(Config {
        timeout: Duration::from_secs(600),
        ..config()
    });
    paired(&mut sim);
    for _ in 0..3 {
        sim.send_raw(10, &vec![7u8; 64 * 1024]);
    }
    sim
}

#[test]
fn a_pair_whose_receiver_stops_reading_is_closed_after_the_stall_timeout() {
    let mut sim = window_full();
    assert_eq!(sim.reading.get(&10), Some(&false));
    sim.advance(STALL_TIMEOUT - Duration::from_millis(100));
    assert!(!sim.closed.contains_key(&10));
    sim.advance(Duration::from_millis(200));
    assert!(sim.closed.contains_key(&10) && sim.closed.contains_key(&11));
    assert_eq!(sim.reg.relay_stats().ends, 0);
}

#[test]
fn a_receiver_that_drains_in_time_keeps_the_pair() {
    let mut sim = window_full();
    sim.advance(STALL_TIMEOUT / 2);
    sim.reg.relay_drained(11);
    sim.apply();
    sim.advance(STALL_TIMEOUT);
    assert!(!sim.closed.contains_key(&10) && !sim.closed.contains_key(&11));
}

#[test]
fn a_join_counts_against_the_limits_too() {
    let mut sim = Sim::new(Config {
        relay: RelayConfig {
            per_peer: 1,
            ..RelayConfig::default()
        },
        ..config()
    });
    register_relaying(&mut sim, 1, "alice");
    register_relaying(&mut sim, 2, "bob");
    register_relaying(&mut sim, 3, "carol");
    sim.take(2);
    // bob already holds his one relay connection, with carol.
    let id = open_to(&mut sim, 20, ("carol", 3), ("bob", 2));
    sim.accept_as(21, ip(2), owner("bob"));
    sim.send(21, &join(id));
    assert_eq!(sim.take(21), vec![FromRegistry::RelayReady {}]);
    // alice invites him too: his join would be his second.
    let id = open_to(&mut sim, 10, ("alice", 1), ("bob", 2));
    sim.accept_as(11, ip(2), owner("bob"));
    sim.send(11, &join(id));
    assert_eq!(sim.error_code(11), "relay_full");
    assert_eq!(sim.error_code(10), "relay_full", "the opener is told too");
    assert_eq!(sim.reg.relay_stats().ends, 2);
}

#[test]
fn closing_and_reopening_does_not_refill_a_rate() {
    let mut sim = alice_in_debt(256 * 1024);
    sim.reg.on_closed(10, Disconnect::Lost, sim.now);
    sim.apply();
    // A new pair, at once: alice's debt is still hers.
    let id = open_to(&mut sim, 12, ("alice", 1), ("bob", 2));
    sim.accept_as(13, ip(2), owner("bob"));
    sim.send(13, &join(id));
    sim.send_raw(12, &vec![7u8; 64 * 1024]);
    assert_eq!(
        sim.reading.get(&12),
        Some(&false),
        "not a fresh second's worth"
    );
}

#[test]
fn a_peer_over_its_rate_is_read_again_once_under_it() {
    let mut sim = alice_in_debt(256 * 1024);
    let chunk = vec![7u8; 64 * 1024];
    sim.advance(Duration::from_millis(100));
    assert_eq!(sim.reading.get(&10), Some(&false), "still in debt");
    sim.advance(Duration::from_millis(200));
    assert_eq!(sim.reading.get(&10), Some(&true));
    // bob's rate is his own.
    sim.send_raw(11, &chunk);
    assert_eq!(sim.reading.get(&11), None);
}

#[test]
fn a_relay_message_on_a_registered_connection_is_a_protocol_error() {
    let mut sim = Sim::new(config());
    register_relaying(&mut sim, 1, "alice");
    sim.send(1, &open("alice", "bob"));
    assert_eq!(sim.error_code(1), "protocol");
}

#[test]
fn shutdown_closes_the_relays_too() {
    let mut sim = Sim::new(config());
    paired(&mut sim);
    sim.reg.shutdown("bye");
    sim.apply();
    assert!(sim.closed.contains_key(&10) && sim.closed.contains_key(&11));
}

#[test]
fn an_oversized_relayed_frame_closes_the_pair_without_a_message() {
    let mut sim = Sim::new(config());
    paired(&mut sim);
    let too_large = FrameError::TooLarge {
        len: RELAY_CHUNK + 1,
        max: RELAY_CHUNK,
    };
    sim.reg
        .on_closed(10, Disconnect::BadFrame(too_large), sim.now);
    sim.apply();
    assert!(
        sim.take(10).is_empty(),
        "nothing that would pass for relayed bytes"
    );
    assert!(sim.closed.contains_key(&11));
}
