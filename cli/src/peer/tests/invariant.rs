//! The outbox's promise over random runs: every target of every `sent`
//! gets exactly one `delivered` or `undelivered`.

use proptest::prelude::*;

use super::*;

const NAMES: [&str; 4] = ["bob", "carol", "dave", "erin"];

#[derive(Debug, Clone)]
enum Op {
    SendAll,
    SendOne(usize),
    /// The remote acks one chat it received on a still open link.
    Ack(prop::sample::Index),
    /// A link of ours is closed by the network.
    CloseLink(prop::sample::Index),
    Leave(usize, bool),
    Join(usize),
    Advance(u64),
    LinkDialsFail(bool),
    /// The registry connection drops; the peer re-registers and the new
    /// snapshot lists the peers in the mask.
    Reregister(u8),
    Quit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::SendAll),
        3 => (0..NAMES.len()).prop_map(Op::SendOne),
        5 => any::<prop::sample::Index>().prop_map(Op::Ack),
        2 => any::<prop::sample::Index>().prop_map(Op::CloseLink),
        1 => (0..NAMES.len(), any::<bool>()).prop_map(|(i, t)| Op::Leave(i, t)),
        1 => (0..NAMES.len()).prop_map(Op::Join),
        3 => prop_oneof![0..300u64, 0..5_000u64, 25_000..35_000u64].prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::LinkDialsFail),
        1 => any::<u8>().prop_map(Op::Reregister),
        1 => Just(Op::Quit),
    ]
}

impl Sim {
    fn open_links(&self) -> Vec<Conn> {
        let mut out: Vec<Conn> = self
            .dialed
            .iter()
            .filter(|(c, d)| matches!(d, Dial::Link(_)) && !self.gone.contains(c))
            .map(|(c, _)| *c)
            .collect();
        out.sort_unstable();
        out
    }

    fn registry_open(&self) -> bool {
        self.dialed.iter().any(|(_, d)| *d == Dial::Registry)
            && !self.gone.contains(&self.reg_conn())
    }
}

fn run_op(sim: &mut Sim, op: Op) {
    match op {
        Op::SendAll => sim.say("to all"),
        Op::SendOne(i) => sim.msg(NAMES[i], "to one"),
        Op::Ack(pick) => {
            let mut inflight = Vec::new();
            for c in sim.open_links() {
                for (_, frame) in sim.frames.get(&c).map(Vec::as_slice).unwrap_or_default() {
                    if let Ok(LinkMsg::Chat { id, .. }) = codec::decode(&body_of(frame)) {
                        inflight.push((c, id));
                    }
                }
            }
            if !inflight.is_empty() {
                let (c, id) = inflight[pick.index(inflight.len())];
                sim.link_in(c, &LinkMsg::Ack { id });
            }
        }
        Op::CloseLink(pick) => {
            let open = sim.open_links();
            if !open.is_empty() {
                sim.remote_close(open[pick.index(open.len())], "reset");
            }
        }
        Op::Leave(i, timeout) => {
            if sim.registry_open() {
                let reason = if timeout { "timeout" } else { "quit" };
                sim.update(vec![left(NAMES[i], reason)]);
            }
        }
        Op::Join(i) => {
            if sim.registry_open() {
                sim.update(vec![joined(NAMES[i])]);
            }
        }
        Op::Advance(n) => sim.advance(ms(n)),
        Op::LinkDialsFail(fail) => {
            sim.link_dials = if fail {
                DialMode::Fail
            } else {
                DialMode::Answer
            }
        }
        Op::Reregister(mask) => {
            if sim.registry_open() {
                sim.remote_close(sim.reg_conn(), "reset");
            }
            if let Some(at) = sim.retry_at() {
                sim.advance_to(at);
            }
            if sim.registry_open() && sim.peer.session.is_registering() {
                let names: Vec<&str> = NAMES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, n)| *n)
                    .collect();
                sim.registry_says(&welcome(&names, false));
            }
        }
        Op::Quit => sim.command(Command::Quit),
    }
}

proptest! {
    /// Once quit's grace has passed, every target of every `sent` has had
    /// exactly one `delivered` or `undelivered` for that id: never zero,
    /// never two, and none for a target the `sent` did not list.
    #[test]
    fn every_sent_target_gets_exactly_one_outcome(ops in prop::collection::vec(op(), 1..80)) {
        let mut sim = Sim::online(&NAMES);
        for op in ops {
            run_op(&mut sim, op);
        }
        sim.command(Command::Quit);
        sim.advance(Duration::from_secs(2) + ms(1));
        prop_assert_eq!(&sim.exits, &vec![0]);
        sim.advance(Duration::from_secs(120));
        prop_assert_eq!(&sim.exits, &vec![0], "exit once");

        let mut targets: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut outcomes: BTreeMap<(u64, String), Vec<Event>> = BTreeMap::new();
        let mut last_id = 0;
        for event in &sim.events {
            match event {
                Event::Sent { id, to } => {
                    prop_assert!(*id > last_id, "ids increase: {} after {}", id, last_id);
                    last_id = *id;
                    targets.insert(*id, to.clone());
                }
                Event::Delivered { id, to } | Event::Undelivered { id, to, .. } => {
                    prop_assert!(
                        targets.get(id).is_some_and(|t| t.contains(to)),
                        "{:?} for a target no sent listed", event
                    );
                    outcomes.entry((*id, to.clone())).or_default().push(event.clone());
                }
                _ => {}
            }
        }
        for (id, to) in &targets {
            for name in to {
                let got = outcomes.get(&(*id, name.clone())).map_or(0, Vec::len);
                prop_assert_eq!(
                    got, 1,
                    "message {} to {}: {:?}", id, name, outcomes.get(&(*id, name.clone()))
                );
            }
        }
    }
}
