//! The registry session: registering, heartbeats, losing the registry and
//! coming back, refusals, and the registry's key.

use super::*;

#[test]
fn start_dials_the_registry_and_registers_with_version_name_and_port() {
    let mut sim = Sim::new();
    sim.peer.start(sim.now);
    sim.apply();
    assert_eq!(sim.dials.len(), 1);
    assert_eq!(sim.dials[0].1, registry_addr());
    assert_eq!(sim.dials[0].2, Dial::Registry);
    let reg = sim.reg_conn();
    assert_eq!(sim.take_reg(reg), vec![register()]);
    assert!(sim.take_events().is_empty());
    assert!(!sim.peer.is_online());
}

#[test]
fn welcome_emits_one_registered_event_with_all_peers() {
    let mut sim = Sim::new();
    sim.start();
    sim.registry_says(&welcome(&["bob", "carol"], false));
    assert_eq!(
        sim.take_events(),
        vec![Event::Registered {
            name: "alice".into(),
            addr: MY_ADDR.into(),
            key: key_of("alice"),
            peers: entries(&["bob", "carol"]),
        }]
    );
    assert!(sim.peer.is_online());
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol"]));
}

#[test]
fn welcome_with_more_waits_for_the_last_snapshot_frame() {
    let mut sim = Sim::new();
    sim.start();
    sim.registry_says(&welcome(&["bob"], true));
    assert!(sim.take_events().is_empty(), "the snapshot is not complete");
    assert!(!sim.peer.is_online());
    sim.registry_says(&FromRegistry::Snapshot {
        peers: entries(&["carol"]),
        more: true,
    });
    assert!(sim.take_events().is_empty(), "the snapshot is not complete");
    sim.registry_says(&FromRegistry::Snapshot {
        peers: entries(&["dave"]),
        more: false,
    });
    assert_eq!(
        sim.take_events(),
        vec![Event::Registered {
            name: "alice".into(),
            addr: MY_ADDR.into(),
            key: key_of("alice"),
            peers: entries(&["bob", "carol", "dave"]),
        }]
    );
    assert!(sim.peer.is_online());
    assert_eq!(sim.peer.peers(), entries(&["bob", "carol", "dave"]));
    sim.advance(Duration::from_secs(3));
    sim.take_reg(sim.reg_conn());
    assert!(
        !sim.take_events()
            .iter()
            .any(|e| matches!(e, Event::Registered { .. })),
        "exactly one registered event"
    );
}

#[test]
fn input_waits_for_the_whole_welcome_then_stays_open() {
    let mut sim = Sim::new();
    assert!(!sim.peer.takes_input());
    sim.start();
    sim.registry_says(&welcome(&["bob"], true));
    assert!(!sim.peer.takes_input(), "the snapshot is not complete");
    sim.registry_says(&FromRegistry::Snapshot {
        peers: entries(&["carol"]),
        more: false,
    });
    assert!(sim.peer.takes_input());
    sim.remote_close(sim.reg_conn(), "connection reset by peer");
    assert!(
        sim.peer.takes_input(),
        "still open while the registry is away"
    );
}

#[test]
fn input_waits_only_until_the_first_attempt_fails() {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.advance(Duration::from_secs(5) - ms(1));
    assert!(!sim.peer.takes_input(), "the register deadline is not over");
    sim.advance(ms(1));
    assert!(sim.peer.takes_input());
    assert!(sim.closes.contains_key(&reg));
}

#[test]
fn heartbeats_go_out_every_interval_from_the_welcome() {
    let mut sim = Sim::new();
    sim.registry_answers = false;
    let reg = sim.start();
    sim.take_reg(reg);
    sim.advance(ms(70)); // the welcome does not come at the dial's instant
    let t0 = sim.now;
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_events();
    sim.advance(HEARTBEAT - ms(1));
    assert!(
        sim.take_reg(reg).is_empty(),
        "no heartbeat before the interval"
    );
    // 20 intervals = 4 s, well past the 1 s timeout: answered heartbeats
    // keep the session.
    for k in 1..=20u32 {
        sim.advance_to(t0 + HEARTBEAT * k);
        assert_eq!(
            sim.take_reg_timed(reg),
            vec![(t0 + HEARTBEAT * k, ToRegistry::Heartbeat {})],
            "heartbeat {k}"
        );
        sim.registry_says(&FromRegistry::Heartbeat {});
    }
    assert!(sim.peer.is_online());
    assert!(sim.take_events().is_empty());
    assert!(!sim.gone.contains(&reg));
}

#[test]
fn silent_registry_is_dropped_at_the_timeout_and_reported_lost() {
    let mut sim = Sim::new();
    sim.registry_answers = false;
    let reg = sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    sim.advance(TIMEOUT - ms(1));
    assert_eq!(
        sim.take_reg(reg),
        vec![ToRegistry::Heartbeat {}; 4],
        "heartbeats at 200, 400, 600 and 800 ms"
    );
    assert!(sim.take_events().is_empty(), "not lost before the timeout");
    assert!(sim.peer.is_online());
    sim.advance(ms(1));
    let events = sim.take_events();
    let [Event::RegistryLost { retry_in_ms, .. }] = events.as_slice() else {
        panic!("expected registry_lost, got {events:?}")
    };
    assert!((50..=100).contains(retry_in_ms), "{retry_in_ms}");
    assert!(
        sim.closes.contains_key(&reg),
        "the silent connection is closed"
    );
    assert!(!sim.peer.is_online());
    assert_eq!(sim.peer.peers(), entries(&["bob"]), "the directory stays");
    sim.advance(ms(100));
    assert_eq!(sim.registry_dial_count(), 2, "and the peer reconnects");
}

#[test]
fn registry_retries_back_off_doubling_from_100ms_to_a_5s_cap_with_jitter() {
    let mut sim = Sim::new();
    sim.registry_dials = DialMode::Fail;
    sim.peer.start(sim.now);
    sim.apply();
    let bases = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000];
    let mut delays = Vec::new();
    for (i, base) in bases.into_iter().enumerate() {
        let events = sim.take_events();
        let [Event::RegistryLost { retry_in_ms, error }] = events.as_slice() else {
            panic!("retry {i}: expected one registry_lost, got {events:?}")
        };
        assert!(error.contains("connection refused"), "{error}");
        let at = sim.retry_at().expect("a retry is armed");
        let delay = at - sim.now;
        let base = ms(base);
        assert!(
            delay >= base / 2 && delay <= base,
            "retry {i}: {delay:?} is not within [{:?}, {base:?}]",
            base / 2
        );
        assert_eq!(*retry_in_ms, delay.as_millis() as u64, "retry {i}");
        let dials = sim.registry_dial_count();
        sim.advance(delay - ms(1));
        assert_eq!(sim.registry_dial_count(), dials, "retry {i} came early");
        sim.advance(ms(1));
        assert_eq!(sim.registry_dial_count(), dials + 1, "retry {i} is late");
        delays.push((delay, base));
    }
    assert!(
        delays.iter().any(|&(d, b)| d != b && d != b / 2),
        "the delays are jittered: {delays:?}"
    );
}

#[test]
fn backoff_resets_after_a_successful_registration() {
    let mut sim = Sim::new();
    sim.registry_dials = DialMode::Fail;
    sim.peer.start(sim.now);
    sim.apply();
    // Failures with bases 100, 200, 400 and 800 ms.
    for _ in 0..4 {
        let at = sim.retry_at().unwrap();
        sim.advance_to(at);
    }
    let at = sim.retry_at().unwrap();
    assert!(at - sim.now > ms(800), "the fifth base is 1600 ms");
    sim.registry_dials = DialMode::Answer;
    sim.advance_to(at);
    sim.registry_says(&welcome(&[], false));
    assert!(sim.peer.is_online());
    sim.take_events();
    sim.remote_close(sim.reg_conn(), "reset by peer");
    let events = sim.take_events();
    let [Event::RegistryLost { retry_in_ms, .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(
        (50..=100).contains(retry_in_ms),
        "reset to 100 ms: {retry_in_ms}"
    );
    let delay = sim.retry_at().unwrap() - sim.now;
    assert!(delay >= ms(50) && delay <= ms(100), "{delay:?}");
}

#[test]
fn reregistration_asks_for_the_same_name_and_port_again() {
    let mut sim = Sim::new();
    let reg1 = sim.start();
    assert_eq!(sim.take_reg(reg1), vec![register()]);
    sim.registry_says(&welcome(&[], false));
    sim.remote_close(reg1, "reset");
    sim.advance(ms(100));
    let reg2 = sim.reg_conn();
    assert_ne!(reg1, reg2);
    assert_eq!(sim.take_reg(reg2), vec![register()]);
    sim.registry_says(&welcome(&[], false));
    sim.registry_says(&FromRegistry::Shutdown {
        reason: "restart".into(),
    });
    sim.advance(ms(100));
    let reg3 = sim.reg_conn();
    assert_ne!(reg2, reg3);
    assert_eq!(sim.take_reg(reg3), vec![register()]);
}

#[test]
fn registry_shutdown_is_registry_lost_and_retried() {
    let mut sim = Sim::online(&["bob"]);
    let reg = sim.reg_conn();
    sim.registry_says(&FromRegistry::Shutdown {
        reason: "maintenance".into(),
    });
    let events = sim.take_events();
    let [Event::RegistryLost { error, retry_in_ms }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(error.contains("maintenance"), "{error}");
    assert!((50..=100).contains(retry_in_ms));
    assert!(sim.closes.contains_key(&reg));
    assert!(!sim.peer.is_online());
    sim.advance(ms(100));
    assert_eq!(sim.registry_dial_count(), 2);
    let reg2 = sim.reg_conn();
    assert_eq!(sim.take_reg(reg2), vec![register()]);
    assert!(sim.take_events().is_empty(), "one registry_lost only");
}

#[test]
fn closed_registry_connection_is_registry_lost_and_retried() {
    let mut sim = Sim::online(&["bob"]);
    let reg = sim.reg_conn();
    sim.remote_close(reg, "connection reset by peer");
    let events = sim.take_events();
    let [Event::RegistryLost { error, retry_in_ms }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(error.contains("connection reset by peer"), "{error}");
    assert!((50..=100).contains(retry_in_ms));
    assert!(!sim.peer.is_online());
    assert_eq!(sim.peer.peers(), entries(&["bob"]), "the directory stays");
    sim.advance(ms(100));
    assert_eq!(sim.registry_dial_count(), 2);
    assert_eq!(sim.take_reg(sim.reg_conn()), vec![register()]);
}

#[test]
fn a_lost_registry_is_followed_by_the_next_of_its_cluster_in_turn() {
    let mut config = config();
    let other: SocketAddr = "10.9.0.2:7000".parse().unwrap();
    config.fallbacks = vec![other];
    let mut sim = Sim::with(config, Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    sim.remote_close(sim.reg_conn(), "connection reset by peer");
    sim.advance(ms(100));
    let dialed: Vec<SocketAddr> = sim.dials.iter().map(|(_, addr, _)| *addr).collect();
    assert_eq!(dialed, vec![registry_addr(), other]);
    // The same name, at the next registry.
    assert_eq!(sim.take_reg(sim.reg_conn()), vec![register()]);
    sim.registry_says(&welcome(&["bob"], false));
    assert!(sim.peer.is_online());
    sim.take_all();
    // Losing that one too goes back to the first.
    sim.remote_close(sim.reg_conn(), "connection reset by peer");
    sim.advance(ms(100));
    assert_eq!(
        sim.dials.last().map(|(_, addr, _)| *addr),
        Some(registry_addr())
    );
}

#[test]
fn no_welcome_within_the_register_timeout_is_registry_lost() {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.advance(Duration::from_secs(5) - ms(1));
    assert!(sim.take_events().is_empty());
    sim.advance(ms(1));
    let events = sim.take_events();
    assert!(
        matches!(events.as_slice(), [Event::RegistryLost { .. }]),
        "{events:?}"
    );
    assert!(sim.closes.contains_key(&reg));
    sim.advance(ms(100));
    assert_eq!(sim.registry_dial_count(), 2);
}

fn fatal_rejection(code: &str) {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.registry_says(&FromRegistry::Error {
        code: code.into(),
        reason: "no".into(),
    });
    let events = sim.take_events();
    let [Event::Error { code: got, .. }] = events.as_slice() else {
        panic!("{code}: expected one error event, got {events:?}")
    };
    assert_eq!(got, code);
    assert_eq!(sim.exits, vec![2]);
    assert!(sim.closes.contains_key(&reg));
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.registry_dial_count(), 1, "{code}: no retry");
    assert!(sim.take_events().is_empty());
    assert_eq!(sim.exits, vec![2]);
}

#[test]
fn a_refusal_after_a_registry_restart_reports_the_outbox_before_exit_2() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "still queued");
    sim.take_events();
    sim.remote_close(sim.reg_conn(), "reset");
    sim.advance(ms(100));
    sim.registry_says(&FromRegistry::Error {
        code: "name_taken".into(),
        reason: "someone else has it now".into(),
    });
    let events = sim.take_events();
    let outcomes: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Undelivered { .. } | Event::Delivered { .. }))
        .collect();
    assert_eq!(outcomes, vec![&undelivered(1, "bob", "name_taken")]);
    assert_eq!(sim.exits, vec![2]);
}

#[test]
fn absurd_heartbeat_settings_are_clamped() {
    let mut sim = Sim::new();
    sim.start();
    sim.registry_says(&FromRegistry::Welcome {
        version: PROTOCOL_VERSION,
        name: "alice".into(),
        addr: MY_ADDR.into(),
        heartbeat_ms: u64::MAX,
        timeout_ms: 0,
        probes: false,
        more: false,
        peers: Vec::new(),
    });
    let (heartbeat, timeout) = sim.peer.session.timings();
    assert_eq!(heartbeat, Duration::from_secs(3600));
    assert_eq!(timeout, Duration::from_millis(3_600_010));
}

#[test]
fn name_taken_while_registering_is_an_error_and_exit_2() {
    fatal_rejection("name_taken");
}

#[test]
fn bad_name_while_registering_is_an_error_and_exit_2() {
    fatal_rejection("bad_name");
}

#[test]
fn a_confusable_name_while_registering_is_an_error_and_exit_2() {
    fatal_rejection("name_confusable");
}

#[test]
fn registry_full_just_retries() {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.registry_says(&FromRegistry::Error {
        code: "registry_full".into(),
        reason: "try later".into(),
    });
    let events = sim.take_events();
    let [Event::RegistryLost { error, retry_in_ms }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(error.contains("registry_full"), "{error}");
    assert!((50..=100).contains(retry_in_ms));
    assert!(sim.exits.is_empty());
    assert!(sim.closes.contains_key(&reg));
    sim.advance(ms(100));
    assert_eq!(sim.registry_dial_count(), 2);
    assert_eq!(sim.take_reg(sim.reg_conn()), vec![register()]);
}

#[test]
fn registry_loss_keeps_links_and_the_outbox() {
    let mut sim = Sim::online(&["bob"]);
    sim.msg("bob", "hi");
    let b = sim.link_conn("bob");
    sim.take_all();
    sim.remote_close(sim.reg_conn(), "reset");
    assert!(!sim.gone.contains(&b), "the link stays open");
    sim.link_in(b, &LinkMsg::Ack { id: 1 });
    let events = sim.take_events();
    assert_eq!(events.last(), Some(&delivered(1, "bob")), "{events:?}");
}

#[test]
fn status_tells_whether_the_registry_was_ever_reached_and_when_it_is_tried_next() {
    let mut sim = Sim::new();
    let reg = sim.start();
    sim.remote_close(reg, "connection refused");
    sim.take_events();
    sim.advance(ms(20));
    sim.command(Command::Status);
    let events = sim.take_events();
    let [Event::Status {
        registry,
        error,
        retry_in_ms: Some(retry),
        peers: 0,
    }] = events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(registry, "unreachable");
    assert_eq!(
        error.as_deref(),
        Some("connection error: connection refused")
    );
    assert!(
        *retry <= 80,
        "the first retry is due within 100 ms: {retry}"
    );

    let mut sim = Sim::online(&["bob"]);
    sim.command(Command::Status);
    assert_eq!(
        sim.take_events(),
        [Event::Status {
            registry: "registered".into(),
            error: None,
            retry_in_ms: None,
            peers: 1
        }]
    );
    let reg = sim.reg_conn();
    sim.remote_close(reg, "connection reset by peer");
    sim.command(Command::Status);
    let events = sim.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Status { registry, .. } if registry == "lost")),
        "{events:?}"
    );
}

#[test]
fn the_first_registry_key_is_pinned_and_a_pinned_one_is_enforced() {
    let sim = Sim::online(&[]);
    assert_eq!(sim.pins, vec![Pin::Registry(registry_key())]);

    let mut config = config();
    config.registry_name = "chat.example:7000".into();
    config.known_peers = "/home/alice/known_peers".into();
    let trust = Trust {
        registry: RegistryTrust::Pinned(key_of("the real registry")),
        ..Trust::default()
    };
    let mut sim = Sim::with(config, trust);
    let reg = sim.start();
    assert!(sim.take_reg(reg).is_empty(), "no register to an impostor");
    assert!(sim.gone.contains(&reg));
    let message = the_error(&sim.take_events(), "key_mismatch");
    let line = format!("registry chat.example:7000 {}", key_of("the real registry"));
    assert!(
        message.contains(&format!(
            "delete the line \"{line}\" from /home/alice/known_peers"
        )),
        "the hint names the file and the line: {message}"
    );
    assert_eq!(sim.exits, vec![2], "it stops instead of retrying forever");
    sim.advance(ms(60_000));
    assert!(sim.dials.len() <= 1, "never dialed again: {:?}", sim.dials);
    assert!(sim.pins.is_empty());
}

#[test]
fn a_registry_key_given_up_front_is_enforced_then_pinned() {
    let trust = Trust {
        registry: RegistryTrust::Given(key_of("the real registry")),
        ..Trust::default()
    };
    let mut sim = Sim::trusting(trust.clone());
    let reg = sim.start();
    assert!(sim.take_reg(reg).is_empty(), "no register to an impostor");
    let message = the_error(&sim.take_events(), "key_mismatch");
    assert!(
        message.contains(&format!("--registry-key {}", registry_key())),
        "the hint says what to give instead: {message}"
    );
    assert_eq!(sim.exits, vec![2]);
    assert!(sim.pins.is_empty(), "an impostor's key is not pinned");

    // The real one is accepted, and pinned.
    let mut sim = Sim::trusting(trust);
    sim.imposters
        .insert(String::new(), key_of("the real registry"));
    let reg = sim.start();
    assert_eq!(sim.take_reg(reg), vec![register()]);
    assert_eq!(sim.pins, vec![Pin::Registry(key_of("the real registry"))]);
    // A reconnection finds it pinned and writes nothing more.
    sim.remote_close(reg, "connection reset by peer");
    sim.advance(ms(5_000));
    assert_eq!(sim.take_reg(sim.reg_conn()), vec![register()]);
    assert_eq!(sim.pins.len(), 1);
}

#[test]
fn replaced_by_a_newer_session_of_our_key_is_exit_2() {
    let mut sim = Sim::online(&["bob"]);
    sim.registry_says(&FromRegistry::Error {
        code: "replaced".into(),
        reason: "a newer session".into(),
    });
    assert_eq!(errors_with_code(&sim.take_events(), "replaced"), 1);
    assert_eq!(sim.exits, vec![2]);
    let retries = sim.registry_dial_count();
    sim.advance(Duration::from_secs(10));
    assert_eq!(sim.registry_dial_count(), retries, "never fights back");
}
