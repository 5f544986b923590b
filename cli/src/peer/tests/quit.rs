//! Quitting: acks awaited within the grace, what is left reported, and
//! the registry left and never redialed.

use super::*;

#[test]
fn quit_waits_for_acks_then_leaves_and_exits_0() {
    let mut sim = Sim::online(&["bob", "carol"]);
    let reg = sim.reg_conn();
    sim.say("bye");
    sim.take_all();
    let (b, c) = (sim.link_conn("bob"), sim.link_conn("carol"));
    sim.command(Command::Quit);
    // Still listed, so that bob and carol still accept our hello.
    assert!(sim.take_reg(reg).is_empty());
    assert!(!sim.closes.contains_key(&reg));
    assert!(sim.exits.is_empty(), "acks are outstanding");
    sim.say("too late");
    assert!(sim.take_events().is_empty(), "no sends after quit");
    sim.advance(ms(500));
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events(), vec![delivered(1, "bob")]);
    assert!(sim.exits.is_empty());
    assert!(!sim.take_reg(reg).contains(&ToRegistry::Leave {}));
    sim.link_in(c, &LinkMsg::Ack { id: 1 });
    assert_eq!(sim.take_events(), vec![delivered(1, "carol")]);
    assert_eq!(sim.take_reg(reg), vec![ToRegistry::Leave {}]);
    assert!(sim.closes.contains_key(&reg));
    assert_eq!(sim.exits, vec![0]);
    sim.advance(Duration::from_secs(60));
    assert!(sim.take_events().is_empty(), "no undelivered");
    assert_eq!(sim.exits, vec![0], "exit once");
}

#[test]
fn quit_with_nothing_outstanding_leaves_and_exits_at_once() {
    let mut sim = Sim::online(&["bob"]);
    let reg = sim.reg_conn();
    sim.command(Command::Quit);
    assert_eq!(sim.take_reg(reg), vec![ToRegistry::Leave {}]);
    assert_eq!(sim.exits, vec![0]);
    sim.advance(Duration::from_secs(10));
    assert_eq!(sim.exits, vec![0]);
    assert!(sim.take_events().is_empty());
}

#[test]
fn at_quit_grace_each_remaining_message_is_undelivered_once_then_exit_0() {
    let mut sim = Sim::online(&["bob", "carol"]);
    sim.say("one");
    sim.msg("carol", "two");
    sim.msg("bob", "three");
    let (b, c) = (sim.link_conn("bob"), sim.link_conn("carol"));
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    sim.take_all();
    let reg = sim.reg_conn();
    sim.command(Command::Quit);
    sim.advance(Duration::from_secs(2) - ms(1));
    assert!(sim.exits.is_empty());
    assert!(sim.take_events().is_empty());
    assert!(
        !sim.take_reg(reg).contains(&ToRegistry::Leave {}),
        "still listed"
    );
    sim.advance(ms(1));
    assert_eq!(sim.take_reg(reg), vec![ToRegistry::Leave {}]);
    let mut events = sim.take_events();
    events.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![
        undelivered(3, "bob", "quit"),
        undelivered(1, "carol", "quit"),
        undelivered(2, "carol", "quit"),
    ];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(events, want);
    assert_eq!(sim.exits, vec![0]);
    sim.link_in(c, &LinkMsg::Ack { id: 1 });
    sim.advance(Duration::from_secs(60));
    assert!(sim.take_events().is_empty(), "nothing after the exit");
    assert_eq!(sim.exits, vec![0], "exit once");
}

#[test]
fn quit_while_registering_drops_the_attempt_at_once() {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.command(Command::Quit);
    assert!(sim.closes.contains_key(&reg));
    assert!(
        !sim.take_reg(reg).contains(&ToRegistry::Leave {}),
        "nothing to leave"
    );
    assert_eq!(sim.exits, vec![0]);
}

#[test]
fn after_quit_a_closed_registry_is_not_redialed() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    sim.take_all();
    sim.command(Command::Quit);
    // The loop reported our own close back; nothing may come of it.
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.registry_dial_count(), 1);
    let events = sim.take_events();
    assert!(!events.iter().any(is_registry_lost), "{events:?}");
}

#[test]
fn quit_while_waiting_to_reconnect_cancels_the_retry() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    sim.remote_close(sim.reg_conn(), "reset");
    sim.take_all();
    sim.command(Command::Quit);
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.registry_dial_count(), 1, "no reconnect after quit");
    let events = sim.take_events();
    assert!(!events.iter().any(is_registry_lost), "{events:?}");
    assert_eq!(events, vec![undelivered(1, "bob", "quit")]);
    assert_eq!(sim.exits, vec![0]);
}
