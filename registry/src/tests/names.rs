//! Names owned by keys: sessions replaced by their owner, reservations
//! through the grace, look-alikes, and owners saved and restored.

use super::*;

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
                addr: "10.0.0.4:4002".into(),
                reachable: None,
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
                addr: "10.0.0.4:4002".into(),
                reachable: None,
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
