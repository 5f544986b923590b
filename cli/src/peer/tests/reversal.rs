//! Reversed links: ours, when we can be dialed and the peer cannot (the
//! request through the registry, the link it brings, and the relay when
//! none comes), and theirs, when the registry asks us to dial a peer back.

use super::*;
use crate::peer::dialing::REVERSAL_WAIT;

fn probed(name: &str, reachable: bool) -> Change {
    Change::Moved {
        name: name.into(),
        addr: addr(name),
        reachable: Some(reachable),
    }
}

fn dialed_back(name: &str) -> LinkMsg {
    LinkMsg::DialedBack {
        version: PROTOCOL_VERSION,
        name: name.into(),
    }
}

/// Online with a registry that probes registrations (and so passes on
/// requests to dial back).
fn online(peers: &[&str]) -> Sim {
    let mut sim = Sim::new();
    sim.start();
    let mut welcome = welcome(peers, false);
    if let FromRegistry::Welcome { probes, .. } = &mut welcome {
        *probes = true;
    }
    sim.registry_says(&welcome);
    sim.take_all();
    sim
}

/// Our hello and then the waiting "hi" went on `link`, as on any link we
/// dialed.
fn goes_first_on(sim: &mut Sim, link: Conn) {
    assert_eq!(
        sim.take_link(link),
        vec![sim.my_hello(), chat(1, "hi", true)]
    );
}

/// The peers we asked the registry to have dial us back, since last taken.
fn reversals_asked(sim: &mut Sim) -> Vec<String> {
    let reg = sim.reg_conn();
    sim.take_reg(reg)
        .into_iter()
        .filter_map(|m| match m {
            ToRegistry::Reverse { to } => Some(to),
            _ => None,
        })
        .collect()
}

/// The relay connection just opened, after checking that it asks for bob.
fn relay_opened_to_bob(sim: &mut Sim) -> Conn {
    let relay = sim.relay_conn();
    assert!(matches!(
        sim.take_reg(relay).as_slice(),
        [ToRegistry::RelayOpen { to, .. }] if to == "bob"
    ));
    relay
}

/// The registry pairs `relay`, and bob's session inside proves his key.
fn tunnel_up(sim: &mut Sim, relay: Conn) {
    let ready = codec::encode(&FromRegistry::RelayReady {}).unwrap();
    sim.raw_in(relay, &ready);
    sim.peer.handle_tunneled(relay, key_of("bob"), sim.now);
    sim.apply();
}

/// alice can be dialed, bob cannot; alice has a message for bob, and has
/// asked for him to dial her back.
fn asked_bob(sim: &mut Sim) {
    sim.update(vec![probed("alice", true), probed("bob", false)]);
    sim.take_all();
    sim.msg("bob", "hi");
    assert!(sim.link_dials_to("bob").is_empty(), "no direct dial");
    assert_eq!(reversals_asked(sim), ["bob"]);
}

#[test]
fn a_peer_we_cannot_dial_dials_us_back_and_the_link_is_ours() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    let back = sim.accept_as(key_of("bob"));
    sim.link_in(back, &dialed_back("bob"));
    // We are the link's dialer on the connection bob opened.
    goes_first_on(&mut sim, back);
    sim.link_in(back, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events().last(), Some(&delivered(1, "bob")));
    sim.command(Command::Whois("bob".into()));
    assert!(
        matches!(sim.take_events().as_slice(), [Event::Whois { link: Some(path), .. }] if path == "reversed")
    );
    // The next message goes on the same link.
    sim.msg("bob", "again");
    assert_eq!(sim.take_link(back), vec![chat(2, "again", true)]);
    assert!(reversals_asked(&mut sim).is_empty());
}

#[test]
fn no_dial_back_in_time_goes_through_the_relay_and_a_late_one_is_refused() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    sim.advance(REVERSAL_WAIT + ms(1));
    relay_opened_to_bob(&mut sim);
    let late = sim.accept_as(key_of("bob"));
    sim.link_in(late, &dialed_back("bob"));
    assert_eq!(sim.error_code_on(late), "protocol");
}

#[test]
fn a_reversal_the_registry_refuses_goes_through_the_relay_at_once() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    sim.registry_says(&FromRegistry::ReverseFailed {
        to: "bob".into(),
        code: "unreachable".into(),
        reason: "bob's client does not dial back".into(),
    });
    relay_opened_to_bob(&mut sim);
}

#[test]
fn a_dial_back_that_proves_another_key_gets_nothing_and_takes_nothing() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    let imposter = sim.accept_as(key_of("mallory"));
    sim.link_in(imposter, &dialed_back("bob"));
    assert_eq!(
        sim.error_code_on(imposter),
        "key_mismatch",
        "not even a hello"
    );
    assert_eq!(sim.peer.outbox_len(), 1, "the message still waits");
    // bob's own dial-back, right after, is still the one we wait for.
    let back = sim.accept_as(key_of("bob"));
    sim.link_in(back, &dialed_back("bob"));
    goes_first_on(&mut sim, back);
}

#[test]
fn only_a_connection_opened_to_us_may_be_a_dial_back() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    // bob invites us into a relayed link, and says dialed_back in it.
    sim.registry_says(&FromRegistry::Relay {
        id: 7,
        from: "bob".into(),
    });
    let relay = sim.relay_conn();
    tunnel_up(&mut sim, relay);
    sim.take_all();
    sim.link_in(relay, &dialed_back("bob"));
    assert_eq!(sim.error_code_on(relay), "protocol");
}

#[test]
fn before_the_registry_says_whether_we_can_be_dialed_we_wait_for_it() {
    let mut sim = online(&["bob"]);
    sim.update(vec![probed("bob", false)]);
    sim.take_all();
    sim.msg("bob", "hi");
    assert!(reversals_asked(&mut sim).is_empty(), "not yet");
    assert!(sim.link_dials_to("bob").is_empty());
    assert_eq!(sim.registry_dial_count(), 1, "no relay either");
    sim.update(vec![probed("alice", true)]);
    assert_eq!(reversals_asked(&mut sim), ["bob"], "at once");
    // Told we cannot be dialed, we go through the relay at once.
    let mut sim = online(&["bob"]);
    sim.update(vec![probed("bob", false)]);
    sim.msg("bob", "hi");
    sim.update(vec![probed("alice", false)]);
    relay_opened_to_bob(&mut sim);
}

#[test]
fn a_relay_refused_after_a_dial_back_that_did_not_come_keeps_the_messages() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    sim.advance(REVERSAL_WAIT + ms(1));
    let relay = relay_opened_to_bob(&mut sim);
    let refused = FromRegistry::error(ErrorCode::RelayRefused, "no relays here");
    sim.raw_in(relay, &codec::encode(&refused).unwrap());
    assert!(sim
        .take_events()
        .iter()
        .all(|e| !matches!(e, Event::Undelivered { .. })));
    assert_eq!(sim.peer.outbox_len(), 1);
    // The next try asks bob again.
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    sim.advance_to(at);
    assert_eq!(reversals_asked(&mut sim), ["bob"]);
}

#[test]
fn a_peer_that_becomes_reachable_while_we_wait_is_dialed_at_once() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    sim.update(vec![probed("bob", true)]);
    let direct = sim.link_conn("bob");
    goes_first_on(&mut sim, direct);
}

#[test]
fn a_failed_direct_dial_asks_for_a_dial_back_when_we_can_be_dialed() {
    let mut sim = online(&["bob"]);
    sim.update(vec![probed("alice", true)]);
    sim.take_all();
    sim.link_dials = DialMode::Fail;
    sim.msg("bob", "hi");
    assert_eq!(sim.link_dials_to("bob").len(), 1, "direct first");
    let at = sim.link_retry_at("bob").expect("a redial is armed");
    sim.advance_to(at);
    assert_eq!(reversals_asked(&mut sim), ["bob"]);
}

#[test]
fn once_we_can_be_dialed_a_relayed_link_gives_way_to_a_dial_back() {
    let mut sim = online(&["bob"]);
    sim.update(vec![probed("bob", false), probed("alice", false)]);
    sim.msg("bob", "hi");
    let relay = relay_opened_to_bob(&mut sim);
    tunnel_up(&mut sim, relay);
    sim.take_all();
    sim.update(vec![probed("alice", true)]);
    assert!(sim.gone.contains(&relay), "the relay is left");
    assert_eq!(reversals_asked(&mut sim), ["bob"]);
    let back = sim.accept_as(key_of("bob"));
    sim.link_in(back, &dialed_back("bob"));
    // What the relayed link left unacknowledged goes again.
    goes_first_on(&mut sim, back);
}

#[test]
fn asked_to_dial_back_we_dial_the_asker_and_its_link_is_the_inboxs() {
    let mut sim = online(&["bob"]);
    sim.registry_says(&FromRegistry::DialBack { from: "bob".into() });
    let out = sim.link_conn("bob");
    assert_eq!(sim.take_link(out), vec![dialed_back("alice")]);
    sim.link_in(out, &hello("bob", 5));
    sim.link_in(out, &chat(1, "dialed back", true));
    assert_eq!(sim.take_link(out), vec![LinkMsg::Ack { id: 1 }]);
    assert_eq!(sim.take_events(), [message("bob", "dialed back", true, 1)]);
}

#[test]
fn a_dial_back_is_made_only_to_the_listed_key_and_only_so_often() {
    let mut sim = online(&["bob"]);
    sim.imposters.insert("bob".into(), key_of("mallory"));
    sim.registry_says(&FromRegistry::DialBack { from: "bob".into() });
    let out = sim.link_conn("bob");
    assert!(sim.take_link(out).is_empty(), "nothing said to another key");
    assert!(sim.gone.contains(&out));

    sim.registry_says(&FromRegistry::DialBack {
        from: "nobody".into(),
    });
    assert_eq!(sim.link_dials_to("bob").len(), 1, "no dial for a stranger");

    sim.link_dials = DialMode::Pending;
    for _ in 0..10 {
        sim.registry_says(&FromRegistry::DialBack { from: "bob".into() });
    }
    assert_eq!(
        sim.link_dials_to("bob").len(),
        1 + 4,
        "a few dials to one asker at once"
    );
    sim.advance(Duration::from_secs(11));
    assert_eq!(sim.pending.len(), 4);
    let ends = sim.pending.iter().filter(|(c, _)| sim.gone.contains(c));
    assert_eq!(ends.count(), 4, "dials that never connect are given up");
}

#[test]
fn a_peer_that_becomes_reachable_while_we_wait_for_our_probe_is_dialed_at_once() {
    let mut sim = online(&["bob"]);
    sim.update(vec![probed("bob", false)]);
    sim.msg("bob", "hi");
    assert!(sim.link_dials_to("bob").is_empty(), "we wait for our probe");
    sim.update(vec![probed("bob", true)]);
    let direct = sim.link_conn("bob");
    goes_first_on(&mut sim, direct);
}

#[test]
fn a_dial_back_from_a_name_we_do_not_list_is_refused_as_unknown() {
    let mut sim = online(&["bob"]);
    asked_bob(&mut sim);
    let stranger = sim.accept_as(key_of("mallory"));
    sim.link_in(stranger, &dialed_back("mallory"));
    assert_eq!(sim.error_code_on(stranger), "unknown_peer");
}
