//! The directory: joins, moves and leaves, peers kept through a
//! re-registration, names a registry should never send, and the keys the
//! directory lists against those pinned.

use super::*;

#[test]
fn a_new_spelling_is_shown_as_a_move_and_keeps_the_link() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    let b = sim.link_conn("bob");
    sim.take_all();
    sim.update(vec![Change::Moved {
        name: "Bob".into(),
        addr: addr("bob"),
        reachable: None,
    }]);
    assert_eq!(
        sim.take_events(),
        vec![Event::Moved {
            name: "Bob".into(),
            addr: addr("bob"),
        }]
    );
    assert_eq!(sim.peer.peers()[0].name, "Bob");
    assert!(!sim.gone.contains(&b), "same address and key: same link");
}

#[test]
fn directory_follows_joined_left_and_moved() {
    let mut sim = Sim::online(&["bob"]);
    sim.update(vec![joined("carol"), joined("alice")]);
    assert_eq!(
        sim.take_events(),
        vec![Event::Joined {
            name: "carol".into(),
            addr: addr("carol"),
            key: key_of("carol"),
        }],
        "our own name is not a peer"
    );
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol"]));
    sim.update(vec![Change::Moved {
        name: "bob".into(),
        addr: "10.0.0.9:4009".into(),
        reachable: None,
    }]);
    assert_eq!(
        sim.take_events(),
        vec![Event::Moved {
            name: "bob".into(),
            addr: "10.0.0.9:4009".into(),
        }]
    );
    assert_eq!(
        sim.peer.peers(),
        vec![
            PeerEntry {
                name: "bob".into(),
                addr: "10.0.0.9:4009".into(),
                key: key_of("bob"),
                reachable: None,
            },
            entries(&["carol"])[0].clone()
        ]
    );
    sim.update(vec![left("carol", "quit"), left("zed", "quit")]);
    assert_eq!(
        sim.take_events(),
        vec![Event::Left {
            name: "carol".into(),
            reason: "quit".into(),
        }],
        "a leave of someone unknown says nothing"
    );
    sim.command(Command::Peers);
    assert_eq!(
        sim.take_events(),
        vec![Event::Peers {
            peers: vec![PeerEntry {
                name: "bob".into(),
                addr: "10.0.0.9:4009".into(),
                key: key_of("bob"),
                reachable: None,
            }]
        }]
    );
}

/// Registered with bob and carol, then the registry is lost and the new
/// snapshot lists only bob; carol is kept (and still listed) for a grace.
fn reregistered_without_carol() -> Sim {
    let mut sim = Sim::online(&["bob", "carol"]);
    sim.remote_close(sim.reg_conn(), "reset");
    sim.advance(ms(100));
    sim.registry_says(&welcome(&["bob"], false));
    let events = sim.take_events();
    assert!(
        matches!(events.as_slice(), [Event::RegistryLost { .. }, Event::Registered { peers, .. }] if *peers == entries(&["bob", "carol"])),
        "{events:?}"
    );
    sim
}

#[test]
fn peer_missing_after_reregistration_stays_until_stale_grace() {
    let mut sim = reregistered_without_carol();
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol"]));
    sim.advance(Duration::from_secs(15) - ms(1));
    assert!(
        !sim.take_events()
            .iter()
            .any(|e| matches!(e, Event::Left { .. })),
        "no left within the grace"
    );
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol"]));
    sim.advance(ms(1));
    let lefts: Vec<Event> = sim
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Left { .. }))
        .collect();
    assert_eq!(
        lefts,
        vec![Event::Left {
            name: "carol".into(),
            reason: "gone".into()
        }]
    );
    assert_eq!(sim.peer.peers(), entries(&["bob"]));
}

#[test]
fn stale_peer_that_rejoins_within_the_grace_is_kept() {
    let mut sim = reregistered_without_carol();
    sim.advance(Duration::from_secs(5));
    sim.update(vec![joined("carol")]);
    sim.advance(Duration::from_secs(30));
    let events = sim.take_events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Left { .. } | Event::Joined { .. })),
        "carol never left, as far as the user knows: {events:?}"
    );
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol"]));
}

#[test]
fn whois_names_the_pin_that_differs() {
    let mut sim = Sim::trusting(pinning("erin", key_of("the erin we met")));
    sim.start();
    sim.registry_says(&welcome(&["erin"], false));
    sim.take_events();
    sim.command(Command::Whois("erin".into()));
    assert_eq!(
        sim.take_events(),
        [Event::Whois {
            name: "erin".into(),
            key: key_of("erin"),
            pinned: false,
            you: false,
            pinned_key: Some(key_of("the erin we met")),
            link: None,
        }]
    );
}

#[test]
fn a_directory_key_unlike_the_pin_is_reported_and_refused_both_ways() {
    let mut sim = Sim::trusting(pinning("bob", key_of("the bob we met")));
    sim.start();
    sim.registry_says(&welcome(&["bob", "carol"], false));
    let events = sim.take_events();
    assert_eq!(errors_with_code(&events, "key_mismatch"), 1, "{events:?}");
    // Sending to bob fails at once, without a dial; carol is unaffected.
    sim.say("hello all");
    assert!(sim.link_dials_to("bob").is_empty());
    assert_eq!(sim.link_dials_to("carol").len(), 1);
    let events = sim.take_events();
    assert!(
        events.contains(&undelivered(1, "bob", "key_mismatch")),
        "{events:?}"
    );
    // Links from the listed key are refused too.
    let c = sim.inbound("bob", 1);
    assert_eq!(sim.error_code_on(c), "key_mismatch");
    assert_eq!(errors_with_code(&sim.take_events(), "key_mismatch"), 1);
    // Said once per key, not per update.
    sim.update(vec![Change::Moved {
        name: "bob".into(),
        addr: "10.0.0.9:4009".into(),
        reachable: None,
    }]);
    assert_eq!(errors_with_code(&sim.take_events(), "key_mismatch"), 0);
}

#[test]
fn names_a_registry_should_never_send_are_ignored() {
    let mut sim = Sim::new();
    sim.start();
    let mut peers = entries(&["bob"]);
    peers.push(PeerEntry {
        name: "x K\nregistry 10.0.0.9:1 K".into(),
        ..entry_keyed("carol", key_of("carol"))
    });
    sim.registry_says(&welcome_listing(peers, false));
    sim.update(vec![Change::Joined {
        name: " dave".into(),
        addr: addr("dave"),
        key: key_of("dave"),
    }]);
    assert_eq!(sim.peer.peers(), entries(&["bob"]));
}

#[test]
fn messages_waiting_for_a_name_whose_key_changes_are_not_sent_to_the_new_key() {
    // Not pinned: bob was never reached. The registry restarts and lists
    // another key for bob while a message still waits for the old one.
    let mut sim = Sim::online(&["bob"]);
    sim.link_dials = DialMode::Pending;
    sim.msg("bob", "for the old bob");
    sim.take_events();
    let reg = sim.reg_conn();
    sim.remote_close(reg, "reset");
    sim.advance(ms(100));
    let peers = vec![entry_keyed("bob", key_of("another bob"))];
    sim.registry_says(&welcome_listing(peers, false));
    let events = sim.take_events();
    assert_eq!(errors_with_code(&events, "key_changed"), 1, "{events:?}");
    assert!(
        events.contains(&undelivered(1, "bob", "key_changed")),
        "{events:?}"
    );

    // Pinned: the new key disagrees with the pin, and what waits is
    // undelivered at once, as a mismatch.
    let mut sim = Sim::trusting(pinning("bob", key_of("bob")));
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.link_dials = DialMode::Pending;
    sim.msg("bob", "for the pinned bob");
    sim.take_events();
    let reg = sim.reg_conn();
    sim.remote_close(reg, "reset");
    sim.advance(ms(100));
    let peers = vec![entry_keyed("bob", key_of("mallory"))];
    sim.registry_says(&welcome_listing(peers, false));
    let events = sim.take_events();
    assert_eq!(errors_with_code(&events, "key_mismatch"), 1, "{events:?}");
    assert!(
        events.contains(&undelivered(1, "bob", "key_mismatch")),
        "{events:?}"
    );
}

#[test]
fn whois_shows_the_listed_key_and_whether_it_is_pinned() {
    let mut sim = Sim::online(&["bob", "carol"]);
    let c = sim.inbound("bob", 1);
    sim.link_in(c, &chat(1, "hi", false));
    sim.take_events();
    sim.command(Command::Whois("BOB".into()));
    sim.command(Command::Whois("carol".into()));
    sim.command(Command::Whois("alice".into()));
    sim.command(Command::Whois("zed".into()));
    let events = sim.take_events();
    assert_eq!(
        events[..3],
        [
            Event::Whois {
                name: "bob".into(),
                key: key_of("bob"),
                pinned: true,
                you: false,
                pinned_key: None,
                link: None,
            },
            Event::Whois {
                name: "carol".into(),
                key: key_of("carol"),
                pinned: false,
                you: false,
                pinned_key: None,
                link: None,
            },
            Event::Whois {
                name: "alice".into(),
                key: key_of("alice"),
                pinned: true,
                you: true,
                pinned_key: None,
                link: None,
            },
        ]
    );
    assert_eq!(errors_with_code(&events[3..], "unknown_peer"), 1);
}
