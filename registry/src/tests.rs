//! The registry's rules, driven with simulated time and no sockets.
//!
//! Longer than the project's 800-line aim, for now: its sections
//! (registration, liveness, names, snapshots, the proptest) become files of
//! their own when the registry's machine moves to the shared machine
//! contract. That split is one step of the planned architecture work
//! (transport, machine contract, peer rooms, testkit); done here alone, it
//! would be done twice.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{Change, FromRegistry, PeerEntry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::wire::{FrameDecoder, FrameError};
use proptest::prelude::*;

use super::*;

type Conn = u32;

/// A registry plus everything its actions did: the frames each connection
/// received (decoded), the closes, and the armed timers.
struct Sim {
    reg: Registry<Conn>,
    now: Instant,
    inbox: HashMap<Conn, Vec<FromRegistry>>,
    closed: HashMap<Conn, String>,
    max_frame: HashMap<Conn, usize>,
}

fn config() -> Config {
    Config {
        heartbeat: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        max_peers: 100,
        ..Config::default()
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

impl Sim {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        Sim {
            reg: Registry::new(config, now),
            now,
            inbox: HashMap::new(),
            closed: HashMap::new(),
            max_frame: HashMap::new(),
        }
    }

    fn apply(&mut self) {
        while let Some(action) = self.reg.poll_output() {
            match action {
                Action::Send(c, frame) => {
                    assert!(!self.closed.contains_key(&c), "send to closed {c}");
                    let mut dec = FrameDecoder::new(peerchat_core::wire::DEFAULT_MAX_FRAME);
                    dec.push(&frame);
                    let body = dec.next_frame().unwrap().unwrap();
                    assert_eq!(dec.buffered(), 0, "one frame per send");
                    let msg = codec::decode::<FromRegistry>(&body).unwrap();
                    self.inbox.entry(c).or_default().push(msg);
                }
                Action::Close(c, reason) => {
                    self.closed.entry(c).or_insert(reason);
                }
                Action::SetMaxFrame(c, n) => {
                    self.max_frame.insert(c, n);
                }
                Action::Dial { .. } | Action::Host(_) => unreachable!("the registry never dials"),
            }
        }
    }

    /// One loop turn's end.
    fn flush(&mut self) {
        self.reg.send_batched(self.now);
        self.apply();
    }

    /// A connection whose handshake proved a key of its own.
    fn accept(&mut self, c: Conn, ip: IpAddr) {
        self.accept_as(c, ip, key(&format!("conn {c}")));
    }

    fn accept_as(&mut self, c: Conn, ip: IpAddr, key: PublicKey) {
        self.reg
            .on_accept(c, SocketAddr::new(ip, 50_000), key, self.now);
        self.apply();
    }

    fn send(&mut self, c: Conn, msg: &ToRegistry) {
        let body = codec::encode(msg).unwrap();
        self.send_raw(c, &body);
    }

    fn send_raw(&mut self, c: Conn, body: &[u8]) {
        self.reg.on_frame(c, body, self.now);
        self.apply();
    }

    /// Registers with the key of the name's owner ([`owner`]).
    fn register(&mut self, c: Conn, name: &str, port: i64) {
        self.register_as(c, name, port, owner(name));
    }

    fn register_as(&mut self, c: Conn, name: &str, port: i64, key: PublicKey) {
        self.accept_as(c, ip(c as u8), key);
        self.send(c, &register(name, port));
        self.flush();
    }

    /// Advances simulated time, firing timers in order.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.reg.poll_timeout() {
            if at > until {
                break;
            }
            self.now = self.now.max(at);
            self.reg.handle_timeout(self.now);
            self.apply();
            self.flush();
        }
        self.now = until;
    }

    fn take(&mut self, c: Conn) -> Vec<FromRegistry> {
        self.inbox.remove(&c).unwrap_or_default()
    }

    fn error_code(&mut self, c: Conn) -> String {
        let msgs = self.take(c);
        match msgs.as_slice() {
            [FromRegistry::Error { code, .. }] => {
                assert!(
                    self.closed.contains_key(&c),
                    "an error is followed by a close"
                );
                code.clone()
            }
            other => panic!("expected one error, got {other:?}"),
        }
    }
}

fn welcome_peers(msg: &FromRegistry) -> Vec<PeerEntry> {
    match msg {
        FromRegistry::Welcome { peers, .. } => peers.clone(),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn entry(name: &str, addr: &str) -> PeerEntry {
    PeerEntry {
        name: name.into(),
        addr: addr.into(),
        key: owner(name),
    }
}

fn register(name: &str, port: i64) -> ToRegistry {
    ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: name.into(),
        port,
    }
}

/// A key made from a label: the registry only compares keys, so any 32
/// bytes will do.
fn key(label: &str) -> PublicKey {
    let mut bytes = [0u8; 32];
    for (i, b) in label.bytes().enumerate() {
        bytes[i % 32] ^= b.rotate_left(i as u32 / 32);
    }
    bytes[31] ^= label.len() as u8;
    PublicKey::from_slice(&bytes).unwrap()
}

/// The key that owns a name (as registered, trimmed) in these tests.
fn owner(name: &str) -> PublicKey {
    key(&format!("owner of {}", name.trim()))
}

#[test]
fn welcome_carries_observed_address_settings_and_snapshot_with_keys() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    let msgs = sim.take(2);
    let [FromRegistry::Welcome {
        version,
        name,
        addr,
        heartbeat_ms,
        timeout_ms,
        peers,
        more,
    }] = msgs.as_slice()
    else {
        panic!("{msgs:?}")
    };
    assert_eq!(*version, PROTOCOL_VERSION);
    assert_eq!(name, "bob");
    assert_eq!(addr, "10.0.0.2:4002", "observed IP, declared port");
    assert_eq!((*heartbeat_ms, *timeout_ms), (200, 1000));
    assert_eq!(peers, &vec![entry("alice", "10.0.0.1:4001")]);
    assert!(!more);
    assert_eq!(
        sim.max_frame.get(&2),
        Some(&65_536),
        "full frames once registered"
    );
}

#[test]
fn ipv6_and_mapped_addresses() {
    let mut sim = Sim::new(config());
    sim.reg
        .on_accept(1, "[2001:db8::7]:9".parse().unwrap(), owner("v6"), sim.now);
    sim.send(1, &register("v6", 4000));
    sim.reg.on_accept(
        2,
        "[::ffff:192.0.2.1]:9".parse().unwrap(),
        owner("mapped"),
        sim.now,
    );
    sim.send(2, &register("mapped", 4000));
    assert_eq!(
        sim.reg.directory(),
        vec![
            entry("v6", "[2001:db8::7]:4000"),
            entry("mapped", "192.0.2.1:4000")
        ]
    );
}

#[test]
fn changes_of_one_turn_go_out_as_one_frame_in_one_order() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.take(1);
    sim.take(2);
    // Within one turn: carol joins, bob leaves, dave joins.
    for (c, name) in [(3, "carol"), (4, "dave")] {
        sim.accept_as(c, ip(c as u8), owner(name));
        sim.send(c, &register(name, 4000));
        if c == 3 {
            sim.send(2, &ToRegistry::Leave {});
        }
    }
    sim.flush();
    let expected = vec![
        Change::Joined {
            name: "carol".into(),
            addr: "10.0.0.3:4000".into(),
            key: owner("carol"),
        },
        Change::Left {
            name: "bob".into(),
            reason: "quit".into(),
        },
        Change::Joined {
            name: "dave".into(),
            addr: "10.0.0.4:4000".into(),
            key: owner("dave"),
        },
    ];
    assert_eq!(
        sim.take(1),
        vec![FromRegistry::Update {
            changes: expected.clone()
        }]
    );
    // Carol's welcome listed alice and bob; she hears only what came after.
    let carol = sim.take(3);
    assert_eq!(
        welcome_peers(&carol[0]),
        vec![
            entry("alice", "10.0.0.1:4001"),
            entry("bob", "10.0.0.2:4002")
        ]
    );
    assert_eq!(
        carol[1..],
        [FromRegistry::Update {
            changes: expected[1..].to_vec()
        }]
    );
    // Dave's snapshot is already current; no update about himself.
    let dave = sim.take(4);
    assert_eq!(dave.len(), 1);
    assert_eq!(
        welcome_peers(&dave[0]),
        vec![
            entry("alice", "10.0.0.1:4001"),
            entry("carol", "10.0.0.3:4000")
        ]
    );
    // Bob left: he gets nothing more, and his connection is closed.
    assert!(sim.take(2).is_empty());
    assert!(sim.closed.contains_key(&2));
}

#[test]
fn names_are_trimmed_case_folded_and_any_script() {
    let mut sim = Sim::new(config());
    sim.register(1, "  Alice ", 4001);
    assert_eq!(sim.reg.directory(), vec![entry("Alice", "10.0.0.1:4001")]);
    sim.register(2, "alice", 4002);
    assert_eq!(sim.error_code(2), "name_taken");
    sim.register(3, "张伟", 4003);
    sim.register(4, "ÉLODIE", 4004);
    sim.register(5, "élodie", 4005);
    assert_eq!(sim.error_code(5), "name_taken");
    assert_eq!(sim.reg.peer_count(), 3);
}

#[test]
fn bad_names_ports_versions_and_first_messages_get_their_codes() {
    let mut sim = Sim::new(config());
    let cases: Vec<(Conn, String, i64, &str)> = vec![
        (1, "".into(), 4000, "bad_name"),
        (2, "   ".into(), 4000, "bad_name"),
        (3, "x".repeat(33), 4000, "bad_name"),
        (4, "a\u{1}b".into(), 4000, "bad_name"),
        (5, "a b".into(), 4000, "bad_name"),
        (6, "ok".into(), 0, "bad_port"),
        (7, "ok".into(), 70_000, "bad_port"),
        (8, "ok".into(), -1, "bad_port"),
    ];
    for (c, name, port, code) in cases {
        sim.register(c, &name, port);
        assert_eq!(sim.error_code(c), code, "{name:?} {port}");
    }
    sim.accept(20, ip(20));
    sim.send(
        20,
        &ToRegistry::Register {
            version: PROTOCOL_VERSION + 1,
            name: "future".into(),
            port: 1,
        },
    );
    assert_eq!(sim.error_code(20), "unsupported_version");
    sim.accept(21, ip(21));
    sim.send(21, &ToRegistry::Heartbeat {});
    assert_eq!(sim.error_code(21), "protocol");
    sim.accept(22, ip(22));
    sim.send_raw(22, &[0xff, 0x00]);
    assert_eq!(sim.error_code(22), "protocol");
    assert_eq!(sim.reg.peer_count(), 0);
    assert_eq!(sim.reg.stats().rejections, 11);
}

#[test]
fn a_second_register_is_a_protocol_error_and_a_leave() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.take(1);
    sim.take(2);
    sim.send(2, &register("bob2", 1));
    sim.flush();
    assert_eq!(sim.error_code(2), "protocol");
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
fn the_key_that_owns_a_name_replaces_its_old_session_without_a_leave() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.take(2);
    sim.take(1);
    // Same key, same IP and port, new connection (a restart while the old
    // connection is half-open).
    sim.accept_as(3, ip(2), owner("bob"));
    sim.send(3, &register("bob", 4002));
    sim.flush();
    assert!(sim.closed.contains_key(&2), "the old session is closed");
    assert!(
        matches!(&sim.take(2)[..], [FromRegistry::Error { code, .. }] if code == "replaced"),
        "and told why, in case it is still alive"
    );
    assert!(
        sim.take(1).is_empty(),
        "same address: the others see nothing"
    );
    let welcome = sim.take(3);
    assert_eq!(
        welcome_peers(&welcome[0]),
        vec![entry("alice", "10.0.0.1:4001")]
    );
    // The old connection's close later is not a leave either.
    sim.reg.on_closed(2, Disconnect::Lost, sim.now);
    sim.flush();
    assert!(sim.take(1).is_empty());
    // From a new address, in another case: one move, same key.
    sim.register_as(4, "BOB", 4002, owner("bob"));
    assert_eq!(
        sim.take(1),
        vec![FromRegistry::Update {
            changes: vec![Change::Moved {
                name: "BOB".into(),
                addr: "10.0.0.4:4002".into()
            }]
        }]
    );
    assert_eq!(sim.error_code(3), "replaced");
    // Another key is refused the name, and the holder keeps it.
    sim.register_as(5, "bob", 4002, key("impostor"));
    assert_eq!(sim.error_code(5), "name_taken");
    assert_eq!(sim.reg.directory()[1].key, owner("bob"));
    assert!(!sim.closed.contains_key(&4));
    // Same address, new spelling: the others hear it, so that every view
    // shows the name as a newcomer's snapshot does.
    sim.accept_as(6, ip(4), owner("bob"));
    sim.send(6, &register("Bob", 4002));
    sim.flush();
    assert_eq!(
        sim.take(1),
        vec![FromRegistry::Update {
            changes: vec![Change::Moved {
                name: "Bob".into(),
                addr: "10.0.0.4:4002".into()
            }]
        }]
    );
    assert_eq!(sim.reg.directory()[1].name, "Bob");
}

#[test]
fn a_name_stays_reserved_for_its_key_through_the_grace_period() {
    let grace = Duration::from_secs(600);
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.register(3, "carol", 4003);
    // Bob quits, carol falls silent, alice disconnects.
    sim.send(2, &ToRegistry::Leave {});
    sim.reg.on_closed(1, Disconnect::Lost, sim.now);
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.reg.peer_count(), 0);
    assert_eq!(sim.reg.reserved_count(), 3);
    for (c, name) in [(10, "alice"), (11, "Bob"), (12, "carol")] {
        sim.register_as(c, name, 5000, key("impostor"));
        assert_eq!(sim.error_code(c), "name_taken", "{name}");
    }
    // The owner gets its name back at once (and leaves again).
    sim.register(20, "carol", 4003);
    assert_eq!(sim.reg.peer_count(), 1);
    sim.send(20, &ToRegistry::Leave {});
    // Just before the end of the grace, still kept; just after, free.
    sim.advance(grace - Duration::from_secs(3));
    sim.register_as(21, "alice", 5000, key("impostor"));
    assert_eq!(sim.error_code(21), "name_taken");
    sim.advance(Duration::from_secs(2));
    sim.register_as(22, "alice", 5000, key("newcomer"));
    assert_eq!(sim.reg.directory()[0].key, key("newcomer"));
    sim.register_as(23, "carol", 5000, key("impostor"));
    assert_eq!(
        sim.error_code(23),
        "name_taken",
        "carol's grace began later"
    );
    assert_eq!(sim.reg.reserved_count(), 1, "expired ones are dropped");
}

#[test]
fn names_that_read_like_a_held_name_are_refused_until_it_is_free() {
    let grace = Duration::from_secs(600);
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "ace", 4002);
    // Another script, a digit for a letter, a name that mixes scripts.
    for (c, name, code) in [
        (10, "a1ice", "name_confusable"),
        (11, "\u{430}\u{441}\u{435}", "name_confusable"),
        (12, "\u{430}lice", "name_confusable"),
        (13, "ALICE", "name_taken"),
    ] {
        sim.register_as(c, name, 5000, key("spoofer"));
        assert_eq!(sim.error_code(c), code, "{name}");
    }
    // A reservation counts too, for the key that had it as well.
    sim.reg.on_closed(1, Disconnect::Lost, sim.now);
    sim.flush();
    sim.register_as(20, "a1ice", 5000, owner("alice"));
    assert_eq!(sim.error_code(20), "name_confusable");
    // The owner takes its own name back: it reads like itself only.
    sim.register_as(21, "Alice", 4001, owner("alice"));
    assert_eq!(sim.reg.peer_count(), 2);
    sim.send(21, &ToRegistry::Leave {});
    sim.flush();
    // Once the grace has run out, the look is free.
    sim.advance(grace + Duration::from_secs(1));
    sim.register_as(22, "a1ice", 5000, key("newcomer"));
    assert!(sim.reg.directory().iter().any(|e| e.name == "a1ice"));
    assert_eq!(
        sim.reg.lookalikes.len(),
        sim.reg.names.len() + sim.reg.reserved.len()
    );
}

#[test]
fn reservations_survive_a_full_registry_and_are_capped_at_max_peers() {
    let mut sim = Sim::new(Config {
        max_peers: 2,
        ..config()
    });
    sim.register(1, "a", 1);
    sim.register(2, "b", 1);
    sim.send(1, &ToRegistry::Leave {});
    sim.register(3, "c", 1);
    // The owner of "a" comes back while the registry is full: refused, but
    // its name stays kept for it.
    sim.register(4, "a", 1);
    assert_eq!(sim.error_code(4), "registry_full");
    sim.send(3, &ToRegistry::Leave {});
    sim.register_as(5, "a", 1, key("impostor"));
    assert_eq!(sim.error_code(5), "name_taken");
    // Names left one after another: never more kept than max_peers.
    for (c, name) in [(6, "x1"), (7, "x2"), (8, "x3")] {
        sim.register(c, name, 1);
        sim.send(c, &ToRegistry::Leave {});
    }
    assert_eq!(sim.reg.reserved_count(), 2);
    sim.register_as(9, "a", 1, key("impostor"));
    assert_eq!(sim.reg.peer_count(), 2, "the oldest reservation went first");
}

/// No evictions in the time these tests span.
fn patient() -> Config {
    Config {
        heartbeat: Duration::from_secs(600),
        timeout: Duration::from_secs(3600),
        ..config()
    }
}

fn sorted(mut owners: Vec<Owner>) -> Vec<Owner> {
    owners.sort_by(|a, b| a.name.cmp(&b.name));
    owners
}

#[test]
fn owners_list_the_online_and_the_reserved_and_say_when_they_change() {
    let mut sim = Sim::new(patient());
    assert!(!sim.reg.take_owners_changed());
    sim.register(1, "Alice", 4001);
    sim.register(2, "bob", 4002);
    assert!(sim.reg.take_owners_changed());
    assert!(!sim.reg.take_owners_changed(), "taken");
    sim.send(2, &ToRegistry::Leave {});
    sim.flush();
    assert!(sim.reg.take_owners_changed());
    sim.advance(Duration::from_secs(100));
    let want = vec![
        Owner {
            name: "Alice".into(),
            key: owner("Alice"),
            reserved_for: None,
        },
        Owner {
            name: "bob".into(),
            key: owner("bob"),
            reserved_for: Some(Duration::from_secs(500)),
        },
    ];
    assert_eq!(sorted(sim.reg.owners(sim.now)), want);
    // Heartbeats and evictions' timers change nothing; the grace's end does.
    sim.send(1, &ToRegistry::Heartbeat {});
    assert!(!sim.reg.take_owners_changed());
    sim.advance(Duration::from_secs(500));
    sim.flush();
    assert!(sim.reg.take_owners_changed());
    assert_eq!(sim.reg.owners(sim.now).len(), 1);
}

#[test]
fn restored_owners_keep_their_names_from_other_keys() {
    let grace = Duration::from_secs(600);
    let mut before = Sim::new(patient());
    before.register(1, "alice", 4001);
    before.register(2, "bob", 4002);
    before.send(2, &ToRegistry::Leave {});
    before.advance(Duration::from_secs(60));
    let saved = before.reg.owners(before.now);

    let mut sim = Sim::new(patient());
    let mut with_extra = saved.clone();
    with_extra.push(Owner {
        name: "carol".into(),
        key: owner("carol"),
        reserved_for: Some(Duration::from_secs(7200)),
    });
    with_extra.push(Owner {
        name: "dave".into(),
        key: owner("dave"),
        reserved_for: Some(Duration::ZERO),
    });
    // Saved before look-alikes were refused: alice (online, kept longest)
    // stays, a1ice is left out.
    with_extra.push(Owner {
        name: "a1ice".into(),
        key: owner("a1ice"),
        reserved_for: Some(Duration::from_secs(100)),
    });
    sim.reg.restore(with_extra, sim.now);
    assert!(sim.reg.take_owners_changed(), "saved again as reservations");
    assert_eq!(sim.reg.peer_count(), 0);
    assert_eq!(sim.reg.reserved_count(), 3, "dave's grace was over");
    let restored = sorted(sim.reg.owners(sim.now));
    let left: Vec<_> = restored
        .iter()
        .map(|o| (o.name.as_str(), o.reserved_for))
        .collect();
    assert_eq!(
        left,
        [
            ("alice", Some(grace)),
            ("bob", Some(grace - Duration::from_secs(60))),
            ("carol", Some(grace)),
        ],
        "online ones get a whole grace, none more than one"
    );
    for (c, name) in [(10, "ALICE"), (11, "bob"), (12, "carol")] {
        sim.register_as(c, name, 5000, key("impostor"));
        assert_eq!(sim.error_code(c), "name_taken", "{name}");
    }
    sim.register_as(13, "dave", 5000, key("newcomer"));
    assert_eq!(sim.reg.peer_count(), 1);
    // Owners come back with their keys; bob's reservation ends first, and
    // is dropped while carol's still runs.
    sim.register(20, "alice", 4001);
    assert_eq!(sim.reg.peer_count(), 2);
    assert_eq!(sim.reg.reserved_count(), 2);
    sim.advance(grace - Duration::from_secs(59));
    sim.flush();
    assert_eq!(sim.reg.reserved_count(), 1, "bob's reservation ended first");
    sim.register_as(21, "bob", 5000, key("newcomer"));
    assert_eq!(sim.reg.peer_count(), 3);
    sim.register_as(22, "carol", 5000, key("impostor"));
    assert_eq!(sim.error_code(22), "name_taken");
}

#[test]
fn a_full_registry_says_so() {
    let mut sim = Sim::new(Config {
        max_peers: 2,
        ..config()
    });
    sim.register(1, "a", 1);
    sim.register(2, "b", 1);
    sim.register(3, "c", 1);
    assert_eq!(sim.error_code(3), "registry_full");
}

#[test]
fn unregistered_connections_get_a_deadline_and_a_small_frame_limit() {
    let mut sim = Sim::new(config());
    sim.accept(1, ip(1));
    assert_eq!(sim.max_frame.get(&1), Some(&4096));
    sim.advance(Duration::from_millis(4999));
    assert!(!sim.closed.contains_key(&1));
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.error_code(1), "handshake_timeout");
    // A registered one is not touched by its handshake timer.
    sim.register(2, "alice", 1);
    sim.advance(Duration::from_millis(900));
    sim.send(2, &ToRegistry::Heartbeat {});
    sim.advance(Duration::from_secs(5));
    assert_eq!(
        sim.reg.peer_count(),
        0,
        "evicted for silence, not the handshake"
    );
    assert!(sim
        .take(2)
        .iter()
        .all(|m| !matches!(m, FromRegistry::Error { .. })));
}

#[test]
fn large_snapshots_are_split_into_frames_under_64_kib() {
    let mut sim = Sim::new(Config {
        max_peers: 1000,
        ..config()
    });
    // The longest names: 32 characters of four bytes each.
    let name = |c: Conn| format!("{c:04}{}", "𝔞".repeat(28));
    let n = 800;
    for c in 0..n as Conn {
        sim.register(c, &name(c), 4000);
    }
    sim.register(9999, "last", 4000);
    let msgs = sim.take(9999);
    assert!(msgs.len() >= 2, "{} frames", msgs.len());
    let mut all = Vec::new();
    let mut flags = Vec::new();
    for m in msgs {
        match m {
            FromRegistry::Welcome { peers, more, .. } | FromRegistry::Snapshot { peers, more } => {
                all.extend(peers);
                flags.push(more);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(flags[..flags.len() - 1].iter().all(|m| *m));
    assert!(!flags[flags.len() - 1]);
    assert_eq!(all.len(), n);
    let names: Vec<String> = all.into_iter().map(|e| e.name).collect();
    let expected: Vec<String> = (0..n as Conn).map(name).collect();
    assert_eq!(names, expected, "registration order, nothing lost");
}

#[test]
fn shutdown_notifies_every_peer_and_closes_everything() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.accept(3, ip(3));
    sim.take(1);
    sim.take(2);
    sim.reg.shutdown("bye");
    sim.apply();
    for c in [1, 2] {
        assert_eq!(
            sim.take(c),
            vec![FromRegistry::Shutdown {
                reason: "bye".into()
            }]
        );
    }
    assert!(sim.take(3).is_empty());
    assert!([1, 2, 3].iter().all(|c| sim.closed.contains_key(c)));
    // A session that finishes its handshake while the registry flushes is
    // told and closed; nobody takes a name that was online a moment ago.
    sim.accept_as(4, ip(4), key("stranger"));
    assert_eq!(
        sim.take(4),
        vec![FromRegistry::Shutdown {
            reason: "bye".into()
        }]
    );
    assert!(sim.closed.contains_key(&4));
    sim.send(4, &register("alice", 4004));
    sim.flush();
    assert_eq!(sim.reg.peer_count(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Register(u8),
    Heartbeat(u8),
    Silence(u16),
    Disconnect(u8),
    Leave(u8),
    /// Another key asks for player i's name.
    Impostor(u8),
    /// Another key asks for a name that reads like player i's (Greek rho).
    Lookalike(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Register),
        (0u8..6).prop_map(Op::Heartbeat),
        (1u16..1500).prop_map(Op::Silence),
        (0u8..6).prop_map(Op::Disconnect),
        (0u8..6).prop_map(Op::Leave),
        (0u8..6).prop_map(Op::Impostor),
        (0u8..6).prop_map(Op::Lookalike),
    ]
}

/// What one peer believes the directory is, built only from what it was sent.
fn apply_view(view: &mut Vec<PeerEntry>, msg: &FromRegistry) {
    match msg {
        FromRegistry::Welcome { peers, .. } => *view = peers.clone(),
        FromRegistry::Snapshot { peers, .. } => view.extend(peers.iter().cloned()),
        FromRegistry::Update { changes } => {
            for change in changes {
                match change {
                    Change::Joined { name, addr, key } => view.push(PeerEntry {
                        name: name.clone(),
                        addr: addr.clone(),
                        key: *key,
                    }),
                    Change::Left { name, .. } => view.retain(|e| &e.name != name),
                    Change::Moved { name, addr } => {
                        for e in view.iter_mut().filter(|e| &e.name == name) {
                            e.addr = addr.clone();
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

proptest! {
    /// After every flush, every registered peer's view (its welcome plus
    /// the updates it got) equals the registry's table without itself, and
    /// no name ever passes to another key.
    #[test]
    fn every_view_matches_the_table(ops in prop::collection::vec(op(), 1..60)) {
        let mut sim = Sim::new(config());
        let mut next_conn: Conn = 100;
        // Player i's current connection.
        let mut conn_of: HashMap<u8, Conn> = HashMap::new();
        let mut views: HashMap<Conn, Vec<PeerEntry>> = HashMap::new();
        let mut first_key: HashMap<String, PublicKey> = HashMap::new();
        for op in ops {
            match op {
                Op::Register(p) | Op::Impostor(p) => {
                    next_conn += 1;
                    let c = next_conn;
                    let name = format!("p{p}");
                    let key = if matches!(op, Op::Register(_)) { owner(&name) } else { key("impostor") };
                    sim.accept_as(c, ip(p), key);
                    sim.send(c, &register(&name, 4000 + i64::from(next_conn % 3)));
                    if matches!(op, Op::Register(_)) {
                        conn_of.insert(p, c);
                    }
                }
                Op::Lookalike(p) => {
                    next_conn += 1;
                    let name = format!("\u{3c1}{p}");
                    sim.accept_as(next_conn, ip(p), owner(&name));
                    sim.send(next_conn, &register(&name, 4000));
                }
                Op::Heartbeat(p) => if let Some(&c) = conn_of.get(&p) { sim.send(c, &ToRegistry::Heartbeat {}) },
                Op::Silence(ms) => sim.advance(Duration::from_millis(u64::from(ms))),
                Op::Disconnect(p) => if let Some(c) = conn_of.remove(&p) { sim.reg.on_closed(c, Disconnect::Lost, sim.now); sim.apply(); },
                Op::Leave(p) => if let Some(&c) = conn_of.get(&p) { sim.send(c, &ToRegistry::Leave {}) },
            }
            sim.flush();
            for (c, msgs) in sim.inbox.drain() {
                let view = views.entry(c).or_default();
                for m in &msgs {
                    apply_view(view, m);
                }
            }
            let table = sim.reg.directory();
            prop_assert_eq!(
                sim.reg.lookalikes.len(),
                sim.reg.names.len() + sim.reg.reserved.len(),
                "every name held has its look counted once"
            );
            for entry in &table {
                let look = peerchat_core::protocol::name_skeleton(&entry.name);
                let alike = table.iter().filter(|e| peerchat_core::protocol::name_skeleton(&e.name) == look);
                prop_assert_eq!(alike.count(), 1, "{} has a look-alike online", &entry.name);
            }
            // The grace (10 minutes) outlasts the whole run: whichever key
            // got a name first keeps it.
            for entry in &table {
                let first = *first_key.entry(entry.name.clone()).or_insert(entry.key);
                prop_assert_eq!(entry.key, first, "{} changed hands", &entry.name);
            }
            for (c, _) in sim.reg.order.values() {
                let me = sim.reg.session(*c).unwrap().name.clone();
                let expected: Vec<PeerEntry> = table.iter().filter(|e| e.name != me).cloned().collect();
                let mut got = views.get(c).cloned().unwrap_or_default();
                let mut want = expected.clone();
                got.sort_by(|a, b| a.name.cmp(&b.name));
                want.sort_by(|a, b| a.name.cmp(&b.name));
                prop_assert_eq!(got, want, "view of {}", me);
            }
        }
    }
}
