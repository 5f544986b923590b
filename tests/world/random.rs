//! Random worlds: peers that chat while links are cut, processes freeze
//! and the registry crashes, in any order. Once the faults are healed and
//! the dust settles, every message sent has exactly one outcome per
//! target, and every peer's directory is the registry's.

use std::collections::HashMap;
use std::time::Duration;

use peerchat_core::protocol::PeerEntry;
use peerchat_peer::command::Command;
use peerchat_peer::peer::{Event, Peer};
use peerchat_registry::Registry;
use proptest::prelude::*;

use crate::town::{registry_config, Town};

const PEERS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Direct(usize, usize),
    Broadcast(usize),
    Freeze(usize),
    Thaw(usize),
    /// Cuts peer i from peer j, or from the registry when i == j.
    Cut(usize, usize),
    Heal(usize, usize),
    CrashRegistry,
    RestartRegistry,
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let peer = 0..PEERS;
    prop_oneof![
        4 => (peer.clone(), peer.clone()).prop_map(|(a, b)| Op::Direct(a, b)),
        2 => peer.clone().prop_map(Op::Broadcast),
        1 => peer.clone().prop_map(Op::Freeze),
        1 => peer.clone().prop_map(Op::Thaw),
        1 => (peer.clone(), peer.clone()).prop_map(|(a, b)| Op::Cut(a, b)),
        1 => (peer.clone(), peer).prop_map(|(a, b)| Op::Heal(a, b)),
        1 => Just(Op::CrashRegistry),
        1 => Just(Op::RestartRegistry),
        3 => (1u64..4000).prop_map(Op::Wait),
    ]
}

const NAMES: [&str; PEERS] = ["ann", "ben", "cid", "dot"];

fn sorted(mut entries: Vec<PeerEntry>) -> Vec<(String, String)> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
        .into_iter()
        .map(|e| (e.name, e.key.to_string()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_message_has_one_outcome_and_every_directory_converges(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        let (mut town, peers) = Town::with(&NAMES);
        let mut registry_down = false;
        for op in ops {
            match op {
                Op::Direct(a, b) => town.say_to(peers[a], NAMES[b], "hello"),
                Op::Broadcast(a) => town.command(peers[a], Command::Broadcast("all".into())),
                Op::Freeze(a) => town.world.freeze(peers[a]),
                Op::Thaw(a) => town.world.thaw(peers[a]),
                Op::Cut(a, b) if a == b => town.world.cut(peers[a], town.registry),
                Op::Cut(a, b) => town.world.cut(peers[a], peers[b]),
                Op::Heal(a, b) if a == b => town.world.heal(peers[a], town.registry),
                Op::Heal(a, b) => town.world.heal(peers[a], peers[b]),
                Op::CrashRegistry if !registry_down => {
                    town.world.crash(town.registry);
                    registry_down = true;
                }
                Op::RestartRegistry if registry_down => {
                    town.world.restart(town.registry, |n| Registry::new(registry_config(), n.now));
                    registry_down = false;
                }
                Op::CrashRegistry | Op::RestartRegistry => {}
                Op::Wait(ms) => town.world.run_for(Duration::from_millis(ms)),
            }
        }
        // Heal everything, and give every send its time to end.
        for &p in &peers {
            town.world.thaw(p);
            town.world.heal(p, town.registry);
            for &q in &peers {
                town.world.heal(p, q);
            }
        }
        if registry_down {
            town.world.restart(town.registry, |n| Registry::new(registry_config(), n.now));
        }
        town.world.run_for(Duration::from_secs(90));

        for (i, &p) in peers.iter().enumerate() {
            let mut outcomes: HashMap<(u64, String), usize> = HashMap::new();
            let mut expected: HashMap<(u64, String), usize> = HashMap::new();
            for e in town.events(p) {
                match e {
                    Event::Sent { id, to } => {
                        for t in to {
                            *expected.entry((*id, t.clone())).or_default() += 1;
                        }
                    }
                    Event::Delivered { id, to } | Event::Undelivered { id, to, .. } => {
                        *outcomes.entry((*id, to.clone())).or_default() += 1;
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(&outcomes, &expected, "{}: one outcome per target", NAMES[i]);
        }
        let everyone = sorted(town.registry().directory());
        prop_assert_eq!(everyone.len(), PEERS, "everyone is registered again");
        for (i, &p) in peers.iter().enumerate() {
            let seen = sorted(town.world.machine::<Peer>(p).peers());
            let others: Vec<_> = everyone.iter().filter(|(n, _)| n != NAMES[i]).cloned().collect();
            prop_assert_eq!(seen, others, "{}'s directory is the registry's", NAMES[i]);
        }
    }
}
