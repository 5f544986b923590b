//! Registration: the welcome, names, ports, versions, first messages, a full
//! registry, and the limits on a connection that has not registered.

use super::*;

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
        probes,
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
    assert!(*probes, "probes are on unless --no-probe");
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
            relay: false,
            dial_back: false,
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
