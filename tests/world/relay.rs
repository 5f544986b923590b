//! Peers nobody can dial: a peer that can be dialed has them dial it back,
//! the others' links go through the registry's relay, end to end
//! encrypted, and messages end fast when there is no path.

use std::time::Duration;

use peerchat_peer::peer::{Event, Peer};
use peerchat_registry::{Registry, RelayConfig};

use crate::town::{message, registered, registry_config, registry_lost, Town};

fn delivered_to(name: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Delivered { to, .. } if to == name)
}

#[test]
fn every_pair_chats_when_two_of_three_cannot_be_dialed() {
    let mut town = Town::new();
    let alice = town.peer_behind_nat("alice");
    let bob = town.peer_behind_nat("bob");
    let carol = town.peer("carol");
    for p in [alice, bob, carol] {
        town.wait(p, "registered", registered);
    }
    let peers = [(alice, "alice"), (bob, "bob"), (carol, "carol")];
    for (from, from_name) in peers {
        for (to, to_name) in peers {
            if from == to {
                continue;
            }
            let text = format!("{from_name} to {to_name}");
            town.say_to(from, to_name, &text);
            town.wait(to, "the message", message(&text));
            town.wait(from, "delivered", delivered_to(to_name));
        }
    }
    // carol takes direct links, and alice and bob dial her back: only
    // the links between alice and bob, one each way, were relayed.
    assert_eq!(town.registry().relay_stats().opened, 2);
    assert_eq!(town.registry().stats().reversals, 2);
    // The registry's probes told everyone who can be dialed.
    let carol_sees: Vec<_> = town
        .world
        .machine::<Peer>(carol)
        .peers()
        .into_iter()
        .map(|p| (p.name, p.reachable))
        .collect();
    assert_eq!(
        carol_sees,
        [("alice".into(), Some(false)), ("bob".into(), Some(false))]
    );
    let alice_sees = town.world.machine::<Peer>(alice).peers();
    assert_eq!(alice_sees[1].name, "carol");
    assert_eq!(alice_sees[1].reachable, Some(true));
}

#[test]
fn without_a_relay_a_message_between_two_peers_nobody_can_dial_ends_within_5s() {
    let mut town = Town::with_registry(peerchat_registry::Config {
        relay: RelayConfig {
            enabled: false,
            ..RelayConfig::default()
        },
        ..registry_config()
    });
    let alice = town.peer_behind_nat("alice");
    let bob = town.peer_behind_nat("bob");
    for p in [alice, bob] {
        town.wait(p, "registered", registered);
    }
    let sent = town.world.now();
    town.say_to(alice, "bob", "are you there?");
    let outcome = town.wait(alice, "the outcome", |e| {
        matches!(e, Event::Undelivered { .. } | Event::Delivered { .. })
    });
    assert!(
        matches!(&outcome, Event::Undelivered { reason, .. } if reason == "unreachable"),
        "{outcome:?}"
    );
    assert!(town.world.now() - sent < Duration::from_secs(5));
}

#[test]
fn relayed_chat_waits_out_a_registry_restart() {
    let mut town = Town::new();
    let alice = town.peer_behind_nat("alice");
    let bob = town.peer_behind_nat("bob");
    for p in [alice, bob] {
        town.wait(p, "registered", registered);
    }
    town.say_to(alice, "bob", "before");
    town.wait(bob, "the message", message("before"));
    town.world.crash(town.registry);
    for p in [alice, bob] {
        town.wait(p, "the registry lost", registry_lost);
    }
    town.say_to(alice, "bob", "during");
    town.world.run_for(Duration::from_secs(3));
    assert_eq!(
        town.count(bob, message("during")),
        0,
        "no path while it is down"
    );
    assert_eq!(
        town.count(alice, |e| matches!(e, Event::Undelivered { .. })),
        0,
        "the message waits"
    );
    town.world
        .restart(town.registry, |n| Registry::new(registry_config(), n.now));
    town.wait(bob, "the message", message("during"));
    town.wait_for(alice, 2, "delivered", delivered_to("bob"));
}
