//! With a store: nothing is sent or acknowledged before its record is
//! written (the host holds events back until their turn's batch is, which
//! the store's own tests cover), and a peer resumes from what the store
//! kept.

use super::*;
use crate::journal::{Incoming, Outgoing};

fn persistent() -> Config {
    Config {
        persistent: true,
        ..config()
    }
}

/// Registered with `peers` online, commits held back.
fn online_holding(peers: &[&str]) -> Sim {
    let mut sim = Sim::with(persistent(), Trust::default());
    sim.start();
    sim.registry_says(&welcome(peers, false));
    sim.take_all();
    sim.hold_commits = true;
    sim
}

fn party(name: &str) -> Party {
    Party {
        key: key_of(name),
        name: name.into(),
    }
}

#[test]
fn a_message_goes_out_only_once_its_record_is_written() {
    let mut sim = online_holding(&["bob"]);
    sim.msg("bob", "hi");
    let b = sim.link_conn("bob");
    assert_eq!(sim.take_link(b), vec![sim.my_hello()], "no chat yet");
    assert_eq!(sim.take_events(), vec![sent(1, &["bob"])]);
    assert_eq!(
        sim.records,
        vec![Record::Sent(Outgoing {
            id: 1,
            text: "hi".into(),
            direct: true,
            sent_at: WALL_MS,
            targets: vec![party("bob")],
        })]
    );
    sim.commit();
    assert_eq!(sim.take_link(b), vec![chat(1, "hi", true)]);

    sim.records.clear();
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events(), vec![delivered(1, "bob")]);
    assert_eq!(
        sim.records,
        vec![
            Record::Acked {
                target: key_of("bob"),
                through: 1
            },
            Record::Settled { id: 1 },
        ]
    );
}

#[test]
fn a_chat_is_acknowledged_only_once_recorded() {
    let mut sim = online_holding(&["bob"]);
    let c = sim.inbound("bob", 77);
    sim.link_in(c, &chat(5, "hello", false));
    assert_eq!(sim.take_events(), vec![message("bob", "hello", false, 5)]);
    assert!(sim.take_link(c).is_empty(), "no ack before the record");
    let [Record::Received(Incoming {
        from,
        instance: 77,
        id: 5,
        ..
    })] = sim.records.as_slice()
    else {
        panic!("{:?}", sim.records)
    };
    assert_eq!(*from, party("bob"));
    // A resend before the record is written is acknowledged after it, in
    // order, and not shown again.
    sim.link_in(c, &chat(5, "hello", false));
    assert!(sim.take_link(c).is_empty());
    sim.commit();
    assert!(sim.take_events().is_empty());
    assert_eq!(
        sim.take_link(c),
        vec![LinkMsg::Ack { id: 5 }, LinkMsg::Ack { id: 5 }]
    );
}

#[test]
fn what_was_shown_before_a_restart_is_not_shown_again() {
    let saved = Saved {
        instance: 9,
        next_id: 1,
        outbox: Vec::new(),
        seen: HashMap::from([(key_of("bob"), (77, 5))]),
        transfers: Vec::new(),
    };
    let mut sim = Sim::resuming(persistent(), Trust::default(), saved);
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    let c = sim.inbound("bob", 77);
    sim.link_in(c, &chat(5, "hello", false));
    sim.link_in(c, &chat(6, "again", false));
    assert_eq!(sim.take_events(), vec![message("bob", "again", false, 6)]);
    assert_eq!(
        sim.take_link(c),
        vec![LinkMsg::Ack { id: 5 }, LinkMsg::Ack { id: 6 }]
    );
}

#[test]
fn a_resumed_peer_sends_what_waited_and_counts_on_from_the_store() {
    let saved = Saved {
        instance: 4242,
        next_id: 8,
        outbox: vec![Outgoing {
            id: 7,
            text: "from before".into(),
            direct: false,
            sent_at: WALL_MS,
            targets: vec![party("bob")],
        }],
        seen: HashMap::new(),
        transfers: Vec::new(),
    };
    let mut sim = Sim::resuming(persistent(), Trust::default(), saved);
    assert_eq!(sim.peer.outbox_len(), 1);
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    let b = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(b),
        vec![hello("alice", 4242), chat(7, "from before", false)]
    );
    sim.take_events();
    sim.link_in(b, &LinkMsg::Ack { id: 7 });
    assert_eq!(sim.take_events(), vec![delivered(7, "bob")]);
    sim.say("new");
    assert_eq!(sim.take_events(), vec![sent(8, &["bob"])]);
}

#[test]
fn a_message_whose_time_ran_out_while_stopped_expires_at_start() {
    let old = Outgoing {
        id: 3,
        text: "too old".into(),
        direct: true,
        sent_at: WALL_MS - 8 * 24 * 3600 * 1000,
        targets: vec![party("bob")],
    };
    let saved = Saved {
        instance: 1,
        next_id: 4,
        outbox: vec![old],
        seen: HashMap::new(),
        transfers: Vec::new(),
    };
    let mut sim = Sim::resuming(persistent(), Trust::default(), saved);
    sim.start();
    sim.advance(ms(1));
    assert_eq!(sim.take_events(), vec![undelivered(3, "bob", "expired")]);
    assert!(sim.records.contains(&Record::Settled { id: 3 }));
}

#[test]
fn quitting_keeps_what_is_unacknowledged_for_the_next_run() {
    let mut sim = Sim::with(persistent(), Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.say("one");
    sim.take_all();
    sim.command(Command::Quit);
    sim.advance(Duration::from_secs(3));
    let events = sim.take_events();
    assert_eq!(events, vec![queued(1, "bob", "exit")]);
    assert_eq!(sim.exits, vec![0]);
    assert!(
        !sim.records
            .iter()
            .any(|r| matches!(r, Record::Failed { .. } | Record::Settled { .. })),
        "nothing is given up: {:?}",
        sim.records
    );
}

#[test]
fn history_and_search_are_asked_of_the_host() {
    let mut sim = Sim::trusting(pinning("carol", key_of("carol")));
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.command(Command::History {
        with: Some("Carol".into()),
        limit: 5,
    });
    sim.command(Command::History {
        with: None,
        limit: 20,
    });
    sim.command(Command::Search {
        text: "cats".into(),
        limit: 20,
    });
    assert_eq!(
        sim.queries,
        vec![
            Query::History {
                with: Some(Party {
                    key: key_of("carol"),
                    name: "Carol".into()
                }),
                limit: 5
            },
            Query::History {
                with: None,
                limit: 20
            },
            Query::Search {
                text: "cats".into(),
                limit: 20
            },
        ]
    );
    sim.take_all();
    sim.command(Command::History {
        with: Some("zed".into()),
        limit: 5,
    });
    assert_eq!(errors_with_code(&sim.take_events(), "unknown_peer"), 1);
}

#[test]
fn the_messages_of_a_turn_go_out_in_order_once_their_records_are_written() {
    let mut sim = online_holding(&["bob", "carol", "dave"]);
    sim.say("first");
    sim.commit();
    let (b, c, d) = (
        sim.link_conn("bob"),
        sim.link_conn("carol"),
        sim.link_conn("dave"),
    );
    sim.take_all();
    for command in [
        Command::Broadcast("a".into()),
        Command::Direct {
            to: "bob".into(),
            text: "b".into(),
        },
        Command::Broadcast("c".into()),
    ] {
        sim.peer.command(command, sim.now, wall());
    }
    sim.apply();
    sim.say("d");
    assert!(sim.take_link(b).is_empty(), "nothing before the records");
    sim.commit();
    assert_eq!(
        sim.take_link(b),
        vec![
            chat(2, "a", false),
            chat(3, "b", true),
            chat(4, "c", false),
            chat(5, "d", false)
        ]
    );
    // Carol and Dave are sent the same run of messages (in one buffer).
    for link in [c, d] {
        assert_eq!(
            sim.take_link(link),
            vec![
                chat(2, "a", false),
                chat(4, "c", false),
                chat(5, "d", false)
            ]
        );
    }
}
