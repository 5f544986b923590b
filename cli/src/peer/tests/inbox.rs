//! The inbox: hellos, chats shown once and always acknowledged, chats
//! held until their sender is listed, and links refused.

use super::*;

#[test]
fn held_chats_are_capped_in_bytes() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("mallory", 1);
    let big = "x".repeat(60 * 1024);
    for id in 1..=4 {
        sim.link_in(
            c,
            &LinkMsg::Chat {
                id,
                text: big.clone(),
                direct: false,
                sent_at: None,
            },
        );
    }
    assert!(!sim.closes.contains_key(&c), "256 KiB may wait");
    sim.link_in(
        c,
        &LinkMsg::Chat {
            id: 5,
            text: big,
            direct: false,
            sent_at: None,
        },
    );
    assert_eq!(sim.error_code_on(c), "unknown_peer");
}

#[test]
fn received_chats_keep_the_senders_clock_if_it_said() {
    // (What we send carries the command's wall clock: see `chat`.)
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("bob", 1);
    let from_old_client = LinkMsg::Chat {
        id: 1,
        text: "no clock".into(),
        direct: false,
        sent_at: None,
    };
    sim.link_in(c, &from_old_client);
    sim.link_in(c, &chat(2, "with clock", false));
    let events = sim.take_events();
    assert!(
        events.contains(&Event::Message {
            from: "bob".into(),
            text: "no clock".into(),
            direct: false,
            id: 1,
            sent_at: None,
        }),
        "{events:?}"
    );
    assert!(events.contains(&message("bob", "with clock", false, 2)));
}

#[test]
fn the_chats_of_one_turn_on_a_link_are_acked_by_one_ack_for_the_last() {
    let mut sim = Sim::online(&["bob", "carol"]);
    let b = sim.inbound("bob", 77);
    let c = sim.inbound("carol", 78);
    sim.link_in(b, &chat(1, "first", false));
    sim.links_in(b, &[chat(2, "a", false), chat(3, "b", false)]);
    sim.links_in(c, &[chat(7, "c", false)]);
    assert_eq!(sim.take_events().len(), 4);
    assert_eq!(
        sim.take_link(b),
        vec![LinkMsg::Ack { id: 1 }, LinkMsg::Ack { id: 3 }]
    );
    assert_eq!(sim.take_link(c), vec![LinkMsg::Ack { id: 7 }]);
    // Bob redials and sends again what he missed an ack for, then more:
    // the resend is not shown, and one ack covers both.
    let b2 = sim.inbound("bob", 77);
    sim.links_in(b2, &[chat(3, "b", false), chat(4, "d", false)]);
    assert_eq!(sim.take_events(), vec![message("bob", "d", false, 4)]);
    assert_eq!(sim.take_link(b2), vec![LinkMsg::Ack { id: 4 }]);
}

#[test]
fn an_accepted_link_from_a_listed_peer_gets_messages_shown_and_acked() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("bob", 77);
    assert!(sim.take_link(c).is_empty(), "hello needs no answer");
    sim.link_in(c, &chat(1, "hi", false));
    sim.link_in(c, &chat(2, "psst", true));
    assert_eq!(
        sim.take_events(),
        vec![
            message("bob", "hi", false, 1),
            message("bob", "psst", true, 2)
        ]
    );
    assert_eq!(
        sim.take_link(c),
        vec![LinkMsg::Ack { id: 1 }, LinkMsg::Ack { id: 2 }]
    );
    // Verified links outlive the hello deadline.
    sim.advance(Duration::from_secs(10));
    assert!(!sim.gone.contains(&c));
    assert!(sim.take_link(c).is_empty());
}

#[test]
fn a_duplicate_is_acked_again_but_shown_once() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("bob", 77);
    for id in [1, 2, 2, 1] {
        sim.link_in(c, &chat(id, &format!("m{id}"), false));
    }
    assert_eq!(
        sim.take_events(),
        vec![
            message("bob", "m1", false, 1),
            message("bob", "m2", false, 2)
        ]
    );
    assert_eq!(
        sim.take_link(c),
        [1, 2, 2, 1].map(|id| LinkMsg::Ack { id }).to_vec()
    );
    // A resend over a new link from the same instance is a duplicate too.
    sim.remote_close(c, "reset");
    let c2 = sim.inbound("bob", 77);
    sim.link_in(c2, &chat(2, "m2", false));
    sim.link_in(c2, &chat(3, "m3", false));
    assert_eq!(sim.take_events(), vec![message("bob", "m3", false, 3)]);
    assert_eq!(
        sim.take_link(c2),
        vec![LinkMsg::Ack { id: 2 }, LinkMsg::Ack { id: 3 }]
    );
}

#[test]
fn a_new_instance_of_the_sender_resets_dedupe() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("bob", 77);
    for id in 1..=3 {
        sim.link_in(c, &chat(id, "old", false));
    }
    sim.take_all();
    sim.remote_close(c, "bob restarted");
    let c2 = sim.inbound("bob", 78);
    sim.link_in(c2, &chat(1, "new", false));
    assert_eq!(sim.take_events(), vec![message("bob", "new", false, 1)]);
    assert_eq!(sim.take_link(c2), vec![LinkMsg::Ack { id: 1 }]);
}

#[test]
fn chats_from_an_unlisted_sender_are_held_until_it_joins() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("dave", 5);
    sim.link_in(c, &chat(1, "first", false));
    sim.link_in(c, &chat(2, "second", true));
    assert!(sim.take_events().is_empty(), "held");
    assert!(sim.take_link(c).is_empty(), "not acked while held");
    sim.advance(Duration::from_secs(1));
    sim.update(vec![joined("dave")]);
    let events = sim.take_events();
    let shown: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .collect();
    assert_eq!(
        shown,
        vec![
            &message("dave", "first", false, 1),
            &message("dave", "second", true, 2)
        ]
    );
    assert!(events.contains(&Event::Joined {
        name: "dave".into(),
        addr: addr("dave"),
        key: key_of("dave"),
    }));
    // Delivered in one turn: one ack covers both.
    assert_eq!(sim.take_link(c), vec![LinkMsg::Ack { id: 2 }]);
    sim.link_in(c, &chat(3, "third", false));
    assert_eq!(sim.take_events(), vec![message("dave", "third", false, 3)]);
    sim.advance(Duration::from_secs(10));
    assert!(
        !sim.gone.contains(&c),
        "admitted links outlive the deadline"
    );
}

#[test]
fn an_unlisted_sender_is_refused_at_the_hello_deadline() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept();
    sim.advance(Duration::from_secs(1));
    sim.link_in(c, &hello("dave", 5));
    sim.link_in(c, &chat(1, "anyone?", false));
    sim.advance(Duration::from_secs(4) - ms(1));
    assert!(!sim.gone.contains(&c));
    assert!(sim.take_link(c).is_empty());
    sim.advance(ms(1));
    assert_eq!(sim.error_code_on(c), "unknown_peer");
    assert!(sim.take_events().is_empty(), "nothing shown");
}

#[test]
fn an_unlisted_sender_that_floods_is_refused() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("dave", 5);
    for id in 1..=1024 {
        sim.link_in(c, &chat(id, "x", false));
    }
    assert!(!sim.gone.contains(&c), "1024 chats are held");
    sim.link_in(c, &chat(1025, "x", false));
    assert_eq!(sim.error_code_on(c), "unknown_peer");
    sim.update(vec![joined("dave")]);
    assert!(
        !sim.take_events()
            .iter()
            .any(|e| matches!(e, Event::Message { .. })),
        "a refused link's chats are dropped"
    );
}

#[test]
fn a_link_with_no_hello_is_refused_at_the_deadline() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept();
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.error_code_on(c), "handshake_timeout");
}

#[test]
fn a_garbage_first_frame_gets_an_error_and_a_close() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept();
    sim.raw_in(c, &[0xff, 0x00, 0x13]);
    assert_eq!(sim.error_code_on(c), "protocol");
    assert!(sim.take_events().is_empty());
}

#[test]
fn a_first_frame_other_than_hello_gets_an_error_and_a_close() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept();
    sim.link_in(c, &chat(1, "hi", false));
    assert_eq!(sim.error_code_on(c), "protocol");
    assert!(sim.take_events().is_empty());
}

#[test]
fn a_hello_of_another_version_is_unsupported_version() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept();
    sim.link_in(
        c,
        &LinkMsg::Hello {
            version: PROTOCOL_VERSION + 1,
            name: "bob".into(),
            instance: 1,
        },
    );
    assert_eq!(sim.error_code_on(c), "unsupported_version");
}

#[test]
fn a_hello_with_our_own_name_is_refused() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("ALICE", 3);
    assert_eq!(sim.error_code_on(c), "protocol");
    assert!(sim.take_events().is_empty());
}

#[test]
fn when_a_peer_leaves_its_inbound_links_close() {
    let mut sim = Sim::online(&["bob", "carol"]);
    let b = sim.inbound("bob", 1);
    let c = sim.inbound("carol", 2);
    sim.update(vec![left("bob", "quit")]);
    assert!(sim.closes.contains_key(&b));
    assert!(!sim.gone.contains(&c));
}

#[test]
fn an_inbound_link_must_prove_the_listed_key() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.accept_as(key_of("mallory"));
    sim.link_in(c, &hello("bob", 1));
    assert_eq!(sim.error_code_on(c), "key_mismatch");
    // Held for a name not listed yet, then refused when its key is not the
    // one the directory brings: nothing it sent is shown.
    let c = sim.accept_as(key_of("mallory"));
    sim.link_in(c, &hello("carol", 1));
    sim.link_in(c, &chat(1, "I am carol", false));
    sim.update(vec![joined("carol")]);
    assert_eq!(sim.error_code_on(c), "key_mismatch");
    assert!(sim
        .take_events()
        .iter()
        .all(|e| !matches!(e, Event::Message { .. })));
    // The real bob is fine, and pinned.
    let c = sim.inbound("bob", 2);
    sim.link_in(c, &chat(1, "hi", false));
    assert_eq!(sim.take_link(c), vec![LinkMsg::Ack { id: 1 }]);
    assert!(sim.pins.contains(&Pin::Peer {
        name: "bob".into(),
        key: key_of("bob")
    }));
}

#[test]
fn a_peer_that_keeps_retrying_with_a_wrong_key_is_reported_once() {
    let mut config = config();
    config.known_peers = "/home/alice/known_peers".into();
    let mut sim = Sim::with(config, pinning("erin", key_of("the erin we met")));
    sim.start();
    sim.registry_says(&welcome(&["erin"], false));
    let message = the_error(&sim.take_events(), "key_mismatch");
    let line = format!("peer erin {}", key_of("the erin we met"));
    assert!(
        message.contains(&format!(
            "delete the line \"{line}\" (its name in any case) from /home/alice/known_peers"
        )),
        "{message}"
    );
    for instance in 1..=6 {
        let c = sim.inbound("erin", instance);
        assert_eq!(
            sim.error_code_on(c),
            "key_mismatch",
            "every link is refused"
        );
    }
    assert_eq!(
        errors_with_code(&sim.take_events(), "key_mismatch"),
        1,
        "but said once for that key"
    );
}
