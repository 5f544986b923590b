//! The end-to-end scenarios that need no process of their own: registry
//! loss and return, a frozen peer, a crashed one, quitting with messages
//! unacknowledged, and a registry that lies about a key.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use peerchat_core::identity::Identity;
use peerchat_core::protocol::FromRegistry;
use peerchat_peer::command::Command;
use peerchat_peer::peer::{Event, HostOutput, Pin, Trust};
use peerchat_registry::Registry;

use crate::liar::Liar;
use crate::town::{joined, left, message, registered, registry_config, registry_lost, Town};

#[test]
fn a_frozen_peer_is_evicted_and_comes_back() {
    let (mut town, peers) = Town::with(&["alice", "bob"]);
    let (alice, bob) = (peers[0], peers[1]);
    town.world.freeze(bob);
    town.wait(alice, "bob's timeout", left("bob", "timeout"));
    town.world.thaw(bob);
    town.wait(alice, "bob again", joined("bob"));
    town.wait(bob, "the registry lost", registry_lost);
    town.wait_for(bob, 2, "registered again", registered);
    // And they still chat.
    town.say_to(alice, "bob", "welcome back");
    town.wait(bob, "the message", message("welcome back"));
    assert_eq!(
        town.count(alice, |e| matches!(e, Event::Left { .. })),
        1,
        "exactly one leave"
    );
}

#[test]
fn a_message_to_a_frozen_peer_waits_and_is_delivered_once_it_thaws() {
    let (mut town, peers) = Town::with(&["alice", "bob"]);
    let (alice, bob) = (peers[0], peers[1]);
    town.world.freeze(bob);
    town.say_to(alice, "bob", "while frozen");
    let id = sent_id(&mut town, alice);
    town.wait(alice, "bob's timeout", left("bob", "timeout"));
    town.wait(
        alice,
        "the message queued",
        |e| matches!(e, Event::Queued { id: i, reason, .. } if *i == id && reason == "timeout"),
    );
    town.world.thaw(bob);
    town.wait(
        alice,
        "the message delivered",
        |e| matches!(e, Event::Delivered { id: i, .. } if *i == id),
    );
    town.world.run_for(Duration::from_secs(10));
    assert_eq!(
        town.count(
            bob,
            |e| matches!(e, Event::Message { text, .. } if text == "while frozen")
        ),
        1,
        "shown once, though it was sent twice"
    );
    let outcomes = town.count(alice, |e| {
        matches!(e, Event::Delivered { id: i, .. } | Event::Undelivered { id: i, .. } if *i == id)
    });
    assert_eq!(outcomes, 1, "one outcome: delivered");
}

#[test]
fn chat_survives_the_registry_and_peers_reregister() {
    let (mut town, peers) = Town::with(&["alice", "bob"]);
    let (alice, bob) = (peers[0], peers[1]);
    town.world.crash(town.registry);
    for &p in &peers {
        town.wait(p, "the registry lost", registry_lost);
    }
    town.say_to(alice, "bob", "still here");
    town.wait(bob, "the message", message("still here"));
    town.wait(alice, "delivered", |e| matches!(e, Event::Delivered { .. }));

    // The same registry again: the same key, so the key its peers pinned.
    town.world
        .restart(town.registry, |n| Registry::new(registry_config(), n.now));
    let back = town.world.now();
    for &p in &peers {
        town.wait_for(p, 2, "registered again", registered);
    }
    // Reconnect delays are capped at 5 s: every retry said so, and the
    // simulated clock agrees.
    for &p in &peers {
        for e in town.events(p) {
            if let Event::RegistryLost { retry_in_ms, .. } = e {
                assert!(*retry_in_ms <= 5000, "retry in {retry_in_ms} ms");
            }
        }
    }
    let took = town.world.now() - back;
    assert!(
        took <= Duration::from_secs(5),
        "re-registered after {took:?}"
    );
    town.say_to(bob, "alice", "back online");
    town.wait(alice, "the message", message("back online"));
    for &p in &peers {
        assert_eq!(town.count(p, |e| matches!(e, Event::Left { .. })), 0);
    }
}

#[test]
fn a_registry_that_is_not_there_yet_is_retried() {
    let mut town = Town::new();
    town.world.crash(town.registry);
    let alice = town.peer("alice");
    town.wait(alice, "the registry unreachable", registry_lost);
    town.world
        .restart(town.registry, |n| Registry::new(registry_config(), n.now));
    town.wait(alice, "registered", registered);
}

#[test]
fn quit_reports_what_is_still_unacknowledged() {
    let (mut town, peers) = Town::with(&["alice", "bob"]);
    let (alice, bob) = (peers[0], peers[1]);
    town.world.freeze(bob);
    town.say_to(alice, "bob", "are you there");
    let id = sent_id(&mut town, alice);
    town.command(alice, Command::Quit);
    assert_eq!(
        first_undelivered(&mut town, alice),
        (id, "bob".into(), "quit".into())
    );
    assert!(town.world.run_until(Duration::from_secs(5), |w| w
        .host::<HostOutput>(alice)
        .any(|h| matches!(h, HostOutput::Exit(_)))));
    assert_eq!(town.exit_status(alice), Some(0));
}

#[test]
fn a_crashed_target_leaves_no_message_unaccounted() {
    let (mut town, peers) = Town::with(&["alice", "bob"]);
    let (alice, bob) = (peers[0], peers[1]);
    let send = |town: &mut Town, range: std::ops::Range<usize>| {
        for i in range {
            town.say_to(alice, "bob", &format!("m{i}"));
        }
    };
    // Phase one is acknowledged while bob is alive; phase two goes out
    // while bob is frozen, so none of it can be; phase three races the
    // crash.
    send(&mut town, 0..100);
    town.world.run_for(Duration::from_millis(50));
    town.world.freeze(bob);
    let before = town.count(alice, |e| matches!(e, Event::Sent { .. }));
    send(&mut town, 100..150);
    let frozen: HashSet<u64> = town
        .events(alice)
        .into_iter()
        .filter_map(|e| match e {
            Event::Sent { id, .. } => Some(*id),
            _ => None,
        })
        .skip(before)
        .collect();
    town.world.crash(bob);
    send(&mut town, 150..200);
    town.wait(
        alice,
        "bob's leave",
        |e| matches!(e, Event::Left { name, .. } if name == "bob"),
    );
    town.command(alice, Command::Quit);
    town.world.run_for(Duration::from_secs(5));
    assert_eq!(town.exit_status(alice), Some(0));

    let mut sent = HashSet::new();
    let mut outcomes: HashMap<u64, usize> = HashMap::new();
    let mut undelivered = HashSet::new();
    let mut refused = 0;
    for e in town.events(alice) {
        match e {
            Event::Sent { id, .. } => {
                sent.insert(*id);
            }
            Event::Delivered { id, .. } => *outcomes.entry(*id).or_default() += 1,
            Event::Undelivered { id, .. } => {
                *outcomes.entry(*id).or_default() += 1;
                undelivered.insert(*id);
            }
            Event::Error { code, .. } if code == "unknown_peer" => refused += 1,
            _ => {}
        }
    }
    assert!(sent.len() >= 150, "phases one and two were accepted");
    assert_eq!(sent.len() + refused, 200, "every line accepted or refused");
    assert_eq!(
        outcomes.keys().copied().collect::<HashSet<_>>(),
        sent,
        "every sent message has an outcome"
    );
    assert!(
        outcomes.values().all(|n| *n == 1),
        "exactly one outcome each"
    );
    assert!(
        frozen.is_subset(&undelivered),
        "what bob could not acknowledge is reported undelivered"
    );
}

#[test]
fn a_registry_that_lies_about_a_key_is_caught_by_the_pin() {
    let mut town = Town::new();
    let bob = town.peer("bob");
    town.wait(bob, "registered", registered);
    let bob_key = town.world.key(bob);
    // Alice met bob before: his key is pinned.
    let trust = Trust {
        peers: HashMap::from([("bob".to_string(), bob_key)]),
        ..Trust::default()
    };
    // The registry lists bob, at his address, under another key.
    let wrong = Identity::generate().public();
    town.world.crash(town.registry);
    town.world.restart(town.registry, |n| {
        Liar::new(Registry::new(registry_config(), n.now), move |msg| {
            lie_about_bob(msg, wrong)
        })
    });
    town.wait_for(bob, 2, "bob registered again", registered);
    let alice = town.peer_trusting("alice", trust);
    town.wait(alice, "registered", registered);
    let mismatch = town.wait(
        alice,
        "a key mismatch",
        |e| matches!(e, Event::Error { code, .. } if code == "key_mismatch"),
    );
    let Event::Error { message, .. } = mismatch else {
        unreachable!()
    };
    assert!(
        message.contains(&wrong.to_string()) && message.contains(&bob_key.to_string()),
        "the error names both keys: {message}"
    );
    town.say_to(alice, "bob", "are you really bob?");
    let id = sent_id(&mut town, alice);
    assert_eq!(
        first_undelivered(&mut town, alice),
        (id, "bob".into(), "key_mismatch".into())
    );
    town.command(alice, Command::Whois("bob".into()));
    let whois = town.wait(alice, "whois", |e| matches!(e, Event::Whois { .. }));
    assert!(
        matches!(whois, Event::Whois { key, pinned: false, .. } if key == wrong),
        "{whois:?}"
    );
    assert_eq!(
        town.count(bob, |e| matches!(e, Event::Message { .. })),
        0,
        "nothing reached bob"
    );
    let pinned_wrong = town
        .world
        .host::<HostOutput>(alice)
        .any(|h| matches!(h, HostOutput::Pin(Pin::Peer { key, .. }) if *key == wrong));
    assert!(!pinned_wrong, "the lie was not pinned");
}

/// The id of the first message the peer reported sent.
fn sent_id(town: &mut Town, node: peerchat_testkit::world::NodeId) -> u64 {
    match town.wait(node, "sent", |e| matches!(e, Event::Sent { .. })) {
        Event::Sent { id, .. } => id,
        _ => unreachable!("waited for a sent event"),
    }
}

/// The first undelivered report: id, target and reason.
fn first_undelivered(
    town: &mut Town,
    node: peerchat_testkit::world::NodeId,
) -> (u64, String, String) {
    match town.wait(node, "undelivered", |e| {
        matches!(e, Event::Undelivered { .. })
    }) {
        Event::Undelivered { id, to, reason } => (id, to, reason),
        _ => unreachable!("waited for an undelivered event"),
    }
}

/// Swaps bob's key for `wrong` wherever the registry lists him.
fn lie_about_bob(msg: &mut FromRegistry, wrong: peerchat_core::identity::PublicKey) {
    use peerchat_core::protocol::Change;
    match msg {
        FromRegistry::Welcome { peers, .. } | FromRegistry::Snapshot { peers, .. } => {
            for p in peers.iter_mut().filter(|p| p.name == "bob") {
                p.key = wrong;
            }
        }
        FromRegistry::Update { changes } => {
            for change in changes {
                if let Change::Joined { name, key, .. } = change {
                    if name == "bob" {
                        *key = wrong;
                    }
                }
            }
        }
        _ => {}
    }
}
