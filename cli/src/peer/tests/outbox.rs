//! The outbox: dials and redials, sends and resends, acks and deadlines,
//! and exactly one outcome per target of every message.

use super::*;

#[test]
fn sending_dials_once_and_sends_hello_then_the_chat() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    assert_eq!(
        sim.link_dials_to("bob"),
        vec![addr("bob").parse::<SocketAddr>().unwrap()]
    );
    let b = sim.link_conn("bob");
    assert_eq!(sim.take_link(b), vec![sim.my_hello(), chat(1, "hi", true)]);
    sim.msg("Bob", "again");
    assert_eq!(sim.link_dials_to("bob").len(), 1, "the link is reused");
    assert_eq!(sim.take_link(b), vec![chat(2, "again", true)]);
}

#[test]
fn sent_comes_first_and_one_ack_is_one_delivered() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    assert_eq!(sim.take_events(), vec![sent(1, &["bob"])]);
    let b = sim.link_conn("bob");
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events(), vec![delivered(1, "bob")]);
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    sim.link_in(b, &LinkMsg::Ack { id: 99 });
    sim.advance(Duration::from_secs(60));
    assert!(sim.take_events().is_empty(), "exactly one delivered");
}

#[test]
fn broadcast_has_one_id_one_sent_and_one_shared_frame() {
    let mut sim = Sim::online(&["bob", "carol", "dave"]);
    sim.say("hey all");
    assert_eq!(sim.take_events(), vec![sent(1, &["bob", "carol", "dave"])]);
    let mut chats = Vec::new();
    for name in ["bob", "carol", "dave"] {
        assert_eq!(sim.link_dials_to(name).len(), 1, "{name}");
        let c = sim.link_conn(name);
        let frames = sim.take_frames(c);
        assert_eq!(frames.len(), 2, "{name}: hello and the chat");
        let hello: LinkMsg = codec::decode(&body_of(&frames[0])).unwrap();
        assert_eq!(hello, sim.my_hello());
        let msg: LinkMsg = codec::decode(&body_of(&frames[1])).unwrap();
        assert_eq!(msg, chat(1, "hey all", false));
        chats.push(frames[1].clone());
    }
    assert!(chats.iter().all(|f| *f == chats[0]), "identical bytes");
    assert!(
        chats.iter().all(|f| f.as_ptr() == chats[0].as_ptr()),
        "encoded once and shared"
    );
    for (i, name) in ["bob", "carol", "dave"].into_iter().enumerate() {
        let c = sim.link_conn(name);
        sim.link_in(c, &LinkMsg::Ack { id: 1 });
        assert_eq!(sim.take_events(), vec![delivered(1, name)], "ack {i}");
    }
}

#[test]
fn messages_sent_while_the_link_is_dialing_follow_hello_in_order() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "one");
    sim.msg("bob", "two");
    sim.say("three");
    assert_eq!(sim.link_dials_to("bob").len(), 1);
    let b = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(b),
        vec![
            sim.my_hello(),
            chat(1, "one", true),
            chat(2, "two", true),
            chat(3, "three", false)
        ]
    );
}

/// A dialed link connects when the loop gets to it; sends meanwhile must
/// not start more dials, and go out once it is up.
#[test]
fn a_dial_answered_later_is_still_requested_only_once() {
    let mut sim = Sim::online(&["bob"]);
    sim.link_dials = DialMode::Pending;
    sim.msg("bob", "one");
    sim.msg("bob", "two");
    sim.msg("bob", "three");
    assert_eq!(
        sim.link_dials_to("bob").len(),
        1,
        "one dial for one link while it is pending"
    );
    sim.connect_pending();
    let b = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(b),
        vec![
            sim.my_hello(),
            chat(1, "one", true),
            chat(2, "two", true),
            chat(3, "three", true)
        ]
    );
}

#[test]
fn closed_link_is_redialed_after_a_backoff_and_resends_unacked_in_order() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "one");
    sim.msg("bob", "two");
    sim.msg("bob", "three");
    let b1 = sim.link_conn("bob");
    sim.link_in(b1, &LinkMsg::Ack { id: 1 });
    sim.take_all();
    sim.remote_close(b1, "reset");
    assert_eq!(sim.link_dials_to("bob").len(), 1, "not at once");
    let delay = sim.link_retry_at("bob").expect("a redial is armed") - sim.now;
    assert!(delay >= ms(50) && delay <= ms(100), "{delay:?}");
    sim.advance(delay - ms(1));
    assert_eq!(sim.link_dials_to("bob").len(), 1);
    sim.advance(ms(1));
    assert_eq!(sim.link_dials_to("bob").len(), 2);
    let b2 = sim.link_conn("bob");
    assert_ne!(b1, b2);
    assert_eq!(
        sim.take_link(b2),
        vec![sim.my_hello(), chat(2, "two", true), chat(3, "three", true)]
    );
    sim.msg("bob", "four");
    assert_eq!(sim.take_link(b2), vec![chat(4, "four", true)]);
    for id in [2, 3, 4] {
        sim.link_in(b2, &LinkMsg::Ack { id });
    }
    let events = sim.take_events();
    assert_eq!(
        events,
        vec![
            sent(4, &["bob"]),
            delivered(2, "bob"),
            delivered(3, "bob"),
            delivered(4, "bob")
        ]
    );
}

#[test]
fn a_link_that_keeps_closing_backs_off_further() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "one");
    sim.remote_close(sim.link_conn("bob"), "reset");
    let first = sim.link_retry_at("bob").unwrap() - sim.now;
    assert!(first >= ms(50) && first <= ms(100), "{first:?}");
    sim.advance(first);
    sim.remote_close(sim.link_conn("bob"), "reset");
    let second = sim.link_retry_at("bob").unwrap() - sim.now;
    assert!(second >= ms(100) && second <= ms(200), "{second:?}");
}

#[test]
fn a_failed_link_dial_is_retried() {
    let mut sim = Sim::online(&["bob"]);
    sim.link_dials = DialMode::Fail;
    sim.msg("bob", "hi");
    assert_eq!(sim.link_dials_to("bob").len(), 1);
    // The next attempt goes through the relay (see tests/relay.rs); when
    // that link breaks, the one after is direct again.
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    assert!(at - sim.now <= ms(100));
    sim.advance_to(at);
    let relay = sim.relay_conn();
    sim.remote_close(relay, "reset");
    sim.link_dials = DialMode::Answer;
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    sim.advance_to(at);
    assert_eq!(sim.link_dials_to("bob").len(), 2);
    let b = sim.link_conn("bob");
    assert_eq!(sim.take_link(b), vec![sim.my_hello(), chat(1, "hi", true)]);
}

#[test]
fn a_target_that_leaves_keeps_its_messages_queued_until_it_is_back() {
    let mut sim = Sim::online(&["bob", "carol"]);
    sim.msg("bob", "one");
    sim.say("two");
    sim.msg("bob", "three");
    let b = sim.link_conn("bob");
    let c = sim.link_conn("carol");
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    sim.take_all();
    sim.update(vec![left("bob", "timeout")]);
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Left {
                name: "bob".into(),
                reason: "timeout".into()
            },
            queued(2, "bob", "timeout"),
            queued(3, "bob", "timeout"),
        ]
    );
    assert!(sim.closes.contains_key(&b), "the link to bob closes");
    assert!(!sim.gone.contains(&c), "carol's link stays");
    sim.link_in(c, &LinkMsg::Ack { id: 2 });
    assert_eq!(sim.take_events(), vec![delivered(2, "carol")]);

    sim.advance(Duration::from_secs(60));
    sim.update(vec![joined("bob")]);
    let b = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(b),
        vec![
            sim.my_hello(),
            chat(2, "two", false),
            chat(3, "three", true)
        ],
        "what waited goes, in order, once bob is back"
    );
    sim.link_in(b, &LinkMsg::Ack { id: 3 });
    let events = sim.take_events();
    assert_eq!(
        events[1..],
        [delivered(2, "bob"), delivered(3, "bob")],
        "one ack covers what was sent before it: {events:?}"
    );
}

#[test]
fn a_target_back_with_another_key_gets_nothing_that_waited() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "one");
    sim.update(vec![left("bob", "quit")]);
    sim.take_all();
    let impostor = key_of("not bob");
    sim.update(vec![Change::Joined {
        name: "bob".into(),
        addr: addr("bob"),
        key: impostor,
    }]);
    let events = sim.take_events();
    // The link to bob succeeded once, so bob's key is pinned.
    assert_eq!(errors_with_code(&events, "key_mismatch"), 1, "{events:?}");
    assert!(
        events.contains(&undelivered(1, "bob", "key_mismatch")),
        "{events:?}"
    );
    assert_eq!(sim.link_dials_to("bob").len(), 1, "no dial for the new key");
}

#[test]
fn a_target_never_reached_and_back_with_another_key_fails_as_key_changed() {
    let mut sim = Sim::online(&["bob"]);
    sim.link_dials = DialMode::Pending;
    sim.msg("bob", "one");
    sim.update(vec![left("bob", "quit")]);
    sim.take_all();
    sim.update(vec![Change::Joined {
        name: "bob".into(),
        addr: addr("bob"),
        key: key_of("not bob"),
    }]);
    let events = sim.take_events();
    assert_eq!(errors_with_code(&events, "key_changed"), 1, "{events:?}");
    assert!(
        events.contains(&undelivered(1, "bob", "key_changed")),
        "{events:?}"
    );
}

/// With an outbox TTL of 30 s: "one" (id 1) and, `apart` later, "two"
/// (id 2) sent to bob, whose link is returned.
fn two_messages_to_bob(apart: Duration) -> (Sim, Conn) {
    let mut config = config();
    config.outbox_ttl = Duration::from_secs(30);
    let mut sim = Sim::with(config, Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    sim.msg("bob", "one");
    sim.advance(apart);
    sim.msg("bob", "two");
    let b = sim.link_conn("bob");
    sim.take_all();
    (sim, b)
}

#[test]
fn the_outbox_ttl_turns_an_unacked_message_into_expired() {
    let (mut sim, b) = two_messages_to_bob(Duration::from_secs(1));
    sim.advance(Duration::from_secs(29) - ms(1));
    assert!(sim.take_events().is_empty());
    sim.advance(ms(1));
    assert_eq!(sim.take_events(), vec![undelivered(1, "bob", "expired")]);
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    assert!(sim.take_events().is_empty(), "a late ack changes nothing");
    sim.link_in(b, &LinkMsg::Ack { id: 2 });
    assert_eq!(sim.take_events(), vec![delivered(2, "bob")]);
    sim.advance(Duration::from_secs(60));
    assert!(sim.take_events().is_empty(), "never a second outcome");
}

#[test]
fn a_message_behind_an_acked_one_expires_at_its_own_deadline() {
    let (mut sim, b) = two_messages_to_bob(Duration::from_secs(10));
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events(), vec![delivered(1, "bob")]);
    // Past the first message's deadline: the second still has 10 s.
    sim.advance(Duration::from_secs(20));
    assert!(sim.take_events().is_empty());
    sim.advance(Duration::from_secs(10) - ms(1));
    assert!(sim.take_events().is_empty());
    sim.advance(ms(1));
    assert_eq!(sim.take_events(), vec![undelivered(2, "bob", "expired")]);
}

#[test]
fn a_message_to_someone_met_before_but_away_is_queued() {
    let mut sim = Sim::trusting(pinning("bob", key_of("bob")));
    sim.start();
    sim.registry_says(&welcome(&[], false));
    sim.take_all();
    sim.msg("Bob", "later");
    assert_eq!(
        sim.take_events(),
        vec![sent(1, &["Bob"]), queued(1, "Bob", "offline")]
    );
    assert!(sim.link_dials_to("bob").is_empty());
    sim.update(vec![joined("bob")]);
    let b = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(b),
        vec![sim.my_hello(), chat(1, "later", true)]
    );
}

#[test]
fn the_outbox_refuses_beyond_its_limits_and_drops_nothing() {
    let mut config = config();
    config.outbox_limits = OutboxLimits {
        per_target: 2,
        per_target_bytes: 1000,
        total: 3,
        total_bytes: 1000,
    };
    let mut sim = Sim::with(config, Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob", "carol"], false));
    sim.take_all();
    sim.msg("bob", "one");
    sim.msg("bob", "two");
    sim.msg("bob", "three");
    let events = sim.take_events();
    assert!(
        the_error(&events, "outbox_full").contains("bob"),
        "{events:?}"
    );
    sim.msg("carol", "four");
    sim.msg("carol", "five");
    let events = sim.take_events();
    assert_eq!(errors_with_code(&events, "outbox_full"), 1, "{events:?}");
    let b = sim.link_conn("bob");
    sim.link_in(b, &LinkMsg::Ack { id: 2 });
    assert_eq!(
        sim.take_events(),
        vec![delivered(1, "bob"), delivered(2, "bob")]
    );
    sim.msg("carol", "six");
    assert_eq!(sim.take_events(), vec![sent(4, &["carol"])], "room again");
}

#[test]
fn msg_to_an_unknown_name_is_an_unknown_peer_error() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("zed", "hi");
    let events = sim.take_events();
    let [Event::Error { code, message }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(code, "unknown_peer");
    assert!(message.contains("zed"), "{message}");
    assert!(sim.link_dials_to("zed").is_empty());
}

#[test]
fn msg_to_yourself_says_so() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("ALICE", "hi me");
    let message = the_error(&sim.take_events(), "bad_command");
    assert!(message.contains("cannot message yourself"), "{message}");
    assert!(sim.link_dials_to("alice").is_empty());
}

#[test]
fn ids_are_unique_and_increasing() {
    let mut sim = Sim::online(&["bob", "carol"]);
    sim.msg("bob", "a");
    sim.say("b");
    sim.msg("zed", "not sent");
    sim.msg("carol", "c");
    sim.say(&"x".repeat(DEFAULT_MAX_FRAME));
    sim.say("d");
    let ids: Vec<u64> = sim
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Sent { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4], "refused sends take no id");
    let codes: Vec<String> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Error { code, .. } => Some(code.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(codes, ["unknown_peer", "too_long"]);
}

#[test]
fn a_moved_peer_is_redialed_at_its_new_address_with_unacked_messages() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    let b1 = sim.link_conn("bob");
    sim.take_all();
    sim.update(vec![Change::Moved {
        name: "bob".into(),
        addr: "10.0.0.9:4009".into(),
        reachable: None,
    }]);
    assert!(sim.closes.contains_key(&b1), "the old link closes");
    assert_eq!(
        sim.link_dials_to("bob").last(),
        Some(&"10.0.0.9:4009".parse().unwrap())
    );
    let b2 = sim.link_conn("bob");
    assert_ne!(b1, b2);
    assert_eq!(sim.take_link(b2), vec![sim.my_hello(), chat(1, "hi", true)]);
    sim.link_in(b2, &LinkMsg::Ack { id: 1 });
    let events = sim.take_events();
    assert_eq!(events.last(), Some(&delivered(1, "bob")), "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Delivered { .. } | Event::Undelivered { .. }))
            .count(),
        1
    );
}

#[test]
fn a_link_that_proves_another_key_gets_nothing_and_is_redialed() {
    let mut sim = Sim::online(&["bob"]);
    sim.imposters.insert("bob".into(), key_of("mallory"));
    sim.msg("bob", "for bob only");
    let first = sim.link_conn("bob");
    assert!(sim.take_link(first).is_empty(), "not even a hello");
    assert!(sim.gone.contains(&first));
    assert!(sim.pins.iter().all(|p| !matches!(p, Pin::Peer { .. })));
    // Whoever is at bob's address is not bob: the next attempt goes
    // through the relay, which the registry refuses here; then direct
    // again, where bob himself answers now.
    sim.advance(ms(200));
    let relay = sim.relay_conn();
    sim.remote_close(relay, "reset");
    sim.imposters.clear();
    sim.advance(ms(400));
    let second = sim.link_conn("bob");
    assert_ne!(first, second);
    assert_eq!(
        sim.take_link(second),
        vec![sim.my_hello(), chat(1, "for bob only", true)]
    );
    assert!(sim.pins.contains(&Pin::Peer {
        name: "bob".into(),
        key: key_of("bob")
    }));
}
