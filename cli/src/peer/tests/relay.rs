//! Links through the registry's relay: ours, when a direct dial fails
//! (opening, refusals that end messages fast, the key checks), and theirs,
//! when the registry invites us.

use super::*;

/// The relay connection the peer just dialed, with what it asked for.
fn relay_opened(sim: &mut Sim) -> (Conn, ToRegistry) {
    let relay = sim.relay_conn();
    let asked = sim.take_reg(relay);
    assert_eq!(asked.len(), 1, "{asked:?}");
    (relay, asked[0].clone())
}

/// A direct dial to bob fails; the redial goes through the relay.
fn through_the_relay(sim: &mut Sim) -> Conn {
    sim.link_dials = DialMode::Fail;
    sim.msg("bob", "hi");
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    sim.advance_to(at);
    let (relay, asked) = relay_opened(sim);
    assert_eq!(
        asked,
        ToRegistry::RelayOpen {
            version: PROTOCOL_VERSION,
            from: "alice".into(),
            to: "bob".into(),
        }
    );
    relay
}

fn say_on(sim: &mut Sim, c: Conn, msg: &FromRegistry) {
    let body = codec::encode(msg).unwrap();
    sim.raw_in(c, &body);
}

#[test]
fn a_link_that_cannot_go_direct_goes_through_the_relay_end_to_end() {
    let mut sim = Sim::online(&["bob"]);
    let relay = through_the_relay(&mut sim);
    assert!(
        sim.take_frames(relay).is_empty(),
        "nothing before the relay is ready"
    );
    say_on(&mut sim, relay, &FromRegistry::RelayReady {});
    assert_eq!(sim.tunnels, vec![(relay, Role::Dialer)]);
    // Inside, bob's own session proves his key: only then the hello and
    // the chat, exactly as on a direct link.
    sim.peer.handle_tunneled(relay, key_of("bob"), sim.now);
    sim.apply();
    assert_eq!(
        sim.take_link(relay),
        vec![sim.my_hello(), chat(1, "hi", true)]
    );
    sim.link_in(relay, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events().last(), Some(&delivered(1, "bob")));
    sim.command(Command::Whois("bob".into()));
    assert!(
        matches!(sim.take_events().as_slice(), [Event::Whois { link: Some(path), .. }] if path == "relayed")
    );
}

#[test]
fn a_relayed_session_with_another_key_gets_nothing() {
    let mut sim = Sim::online(&["bob"]);
    let relay = through_the_relay(&mut sim);
    say_on(&mut sim, relay, &FromRegistry::RelayReady {});
    // The registry (or anyone on the path) is not bob.
    sim.peer.handle_tunneled(relay, registry_key(), sim.now);
    sim.apply();
    assert!(sim.take_link(relay).is_empty(), "not even a hello");
    assert!(sim.gone.contains(&relay));
    assert!(sim
        .take_events()
        .iter()
        .all(|e| !matches!(e, Event::Delivered { .. })));
}

#[test]
fn a_relay_that_is_not_the_registry_we_trust_is_left_at_once() {
    let mut sim = Sim::online(&["bob"]);
    sim.link_dials = DialMode::Fail;
    sim.imposters.insert(String::new(), key_of("mallory"));
    sim.msg("bob", "hi");
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    sim.advance_to(at);
    let relay = sim.dialed.last().unwrap().0;
    assert!(sim.gone.contains(&relay));
    assert!(
        sim.take_reg(relay).is_empty(),
        "no relay_open for a stranger"
    );
}

#[test]
fn no_path_ends_the_messages_as_unreachable_within_a_second() {
    for (code, reason) in [
        ("relay_refused", "unreachable"),
        ("unreachable", "unreachable"),
        ("relay_full", "relay_full"),
    ] {
        let mut sim = Sim::online(&["bob"]);
        let sent_at = sim.now;
        let relay = through_the_relay(&mut sim);
        say_on(
            &mut sim,
            relay,
            &FromRegistry::Error {
                code: code.into(),
                reason: "no".into(),
            },
        );
        assert!(sim.gone.contains(&relay));
        let events = sim.take_events();
        assert!(
            events.contains(&Event::Undelivered {
                id: 1,
                to: "bob".into(),
                reason: reason.into(),
            }),
            "{code}: {events:?}"
        );
        assert!(sim.now - sent_at < Duration::from_secs(1));
        assert_eq!(sim.peer.outbox_len(), 0);
    }
}

#[test]
fn a_target_the_registry_does_not_know_yet_keeps_its_messages() {
    let mut sim = Sim::online(&["bob"]);
    let relay = through_the_relay(&mut sim);
    let error = FromRegistry::error(ErrorCode::UnknownPeer, "not online");
    say_on(&mut sim, relay, &error);
    assert!(sim
        .take_events()
        .iter()
        .all(|e| !matches!(e, Event::Undelivered { .. })));
    assert_eq!(sim.peer.outbox_len(), 1);
    assert!(sim.link_retry_at("bob").is_some(), "tried again later");
}

#[test]
fn an_invitation_is_answered_and_its_link_is_the_inboxs_once_up() {
    let mut sim = Sim::online(&["bob"]);
    sim.registry_says(&FromRegistry::Relay {
        id: 42,
        from: "bob".into(),
    });
    let (relay, asked) = relay_opened(&mut sim);
    assert_eq!(
        asked,
        ToRegistry::RelayJoin {
            version: PROTOCOL_VERSION,
            id: 42
        }
    );
    say_on(&mut sim, relay, &FromRegistry::RelayReady {});
    assert_eq!(sim.tunnels, vec![(relay, Role::Acceptor)]);
    sim.peer.handle_tunneled(relay, key_of("bob"), sim.now);
    sim.apply();
    sim.link_in(
        relay,
        &LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: "bob".into(),
            instance: 5,
        },
    );
    sim.link_in(relay, &chat(1, "through the relay", true));
    assert_eq!(sim.take_link(relay), vec![LinkMsg::Ack { id: 1 }]);
    assert!(sim
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Message { text, .. } if text == "through the relay")));
}

#[test]
fn an_invitation_that_never_comes_up_is_closed() {
    let mut sim = Sim::online(&["bob"]);
    sim.registry_says(&FromRegistry::Relay {
        id: 1,
        from: "bob".into(),
    });
    let (relay, _) = relay_opened(&mut sim);
    sim.advance(Duration::from_secs(11));
    assert!(sim.gone.contains(&relay));
}

#[test]
fn a_peer_listed_unreachable_is_reached_through_the_relay_at_once() {
    let mut sim = Sim::online(&["bob"]);
    sim.update(vec![Change::Moved {
        name: "bob".into(),
        addr: addr("bob"),
        reachable: Some(false),
    }]);
    assert_eq!(
        sim.take_events(),
        [Event::Reachable {
            name: "bob".into(),
            reachable: false,
            you: false
        }]
    );
    assert_eq!(sim.peer.peers()[0].reachable, Some(false));
    sim.msg("bob", "hi");
    assert!(sim.link_dials_to("bob").is_empty(), "no direct dial");
    let (_, asked) = relay_opened(&mut sim);
    assert!(matches!(asked, ToRegistry::RelayOpen { to, .. } if to == "bob"));
}

#[test]
fn a_relayed_link_moves_to_a_direct_one_once_the_peer_is_reachable() {
    let mut sim = Sim::online(&["bob"]);
    let relay = through_the_relay(&mut sim);
    say_on(&mut sim, relay, &FromRegistry::RelayReady {});
    sim.peer.handle_tunneled(relay, key_of("bob"), sim.now);
    sim.apply();
    sim.take_link(relay);
    // bob is not acknowledged yet when he becomes reachable.
    sim.link_dials = DialMode::Answer;
    sim.update(vec![Change::Moved {
        name: "bob".into(),
        addr: addr("bob"),
        reachable: Some(true),
    }]);
    assert!(sim.gone.contains(&relay), "the relayed link gives way");
    let direct = sim.link_conn("bob");
    assert_eq!(
        sim.take_link(direct),
        vec![sim.my_hello(), chat(1, "hi", true)]
    );
}

#[test]
fn our_own_probe_is_told_and_a_peer_s_only_when_it_changes() {
    let mut sim = Sim::online(&["bob"]);
    let probed = |name: &str, reachable| Change::Moved {
        name: name.into(),
        addr: addr(name),
        reachable: Some(reachable),
    };
    sim.update(vec![probed("alice", false)]);
    assert_eq!(
        sim.take_events(),
        [Event::Reachable {
            name: "alice".into(),
            reachable: false,
            you: true
        }]
    );
    sim.update(vec![probed("bob", true)]);
    sim.update(vec![probed("bob", true)]);
    assert_eq!(
        sim.take_events(),
        [Event::Reachable {
            name: "bob".into(),
            reachable: true,
            you: false
        }],
        "once"
    );
}

#[test]
fn a_relayed_session_that_never_comes_up_is_given_up() {
    let mut sim = Sim::online(&["bob"]);
    let relay = through_the_relay(&mut sim);
    say_on(&mut sim, relay, &FromRegistry::RelayReady {});
    sim.advance(Duration::from_secs(9));
    assert!(!sim.gone.contains(&relay), "still in time");
    sim.advance(Duration::from_secs(2));
    assert!(sim.gone.contains(&relay), "no handshake inside in 10 s");
    assert_eq!(
        sim.peer.outbox_len(),
        1,
        "the message waits for the next try"
    );
}
