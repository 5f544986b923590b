//! The directory everyone is told: shutdown, and a proptest that every
//! peer's view, built only from what it was sent, is the registry's.

use super::*;

#[test]
fn shutdown_notifies_every_peer_and_closes_everything() {
    let mut sim = Sim::new(config());
    sim.register(1, "alice", 4001);
    sim.register(2, "bob", 4002);
    sim.accept(3, ip(3));
    sim.take(1);
    sim.take(2);
    sim.reg.shutdown("bye");
    sim.apply();
    for c in [1, 2] {
        assert_eq!(
            sim.take(c),
            vec![FromRegistry::Shutdown {
                reason: "bye".into()
            }]
        );
    }
    assert!(sim.take(3).is_empty());
    assert!([1, 2, 3].iter().all(|c| sim.closed.contains_key(c)));
    // A session that finishes its handshake while the registry flushes is
    // told and closed; nobody takes a name that was online a moment ago.
    sim.accept_as(4, ip(4), key("stranger"));
    assert_eq!(
        sim.take(4),
        vec![FromRegistry::Shutdown {
            reason: "bye".into()
        }]
    );
    assert!(sim.closed.contains_key(&4));
    sim.send(4, &register("alice", 4004));
    sim.flush();
    assert_eq!(sim.reg.peer_count(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Register(u8),
    Heartbeat(u8),
    Silence(u16),
    Disconnect(u8),
    Leave(u8),
    /// Another key asks for player i's name.
    Impostor(u8),
    /// Another key asks for a name that reads like player i's (Greek rho).
    Lookalike(u8),
    /// The loop reports this load (tenths of a core): the update window
    /// follows.
    Load(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Register),
        (0u8..6).prop_map(Op::Heartbeat),
        (1u16..1500).prop_map(Op::Silence),
        (0u8..6).prop_map(Op::Disconnect),
        (0u8..6).prop_map(Op::Leave),
        (0u8..6).prop_map(Op::Impostor),
        (0u8..6).prop_map(Op::Lookalike),
        (0u8..=10).prop_map(Op::Load),
    ]
}

/// What one peer believes the directory is, built only from what it was sent.
fn apply_view(view: &mut Vec<PeerEntry>, msg: &FromRegistry) {
    match msg {
        FromRegistry::Welcome { peers, .. } => *view = peers.clone(),
        FromRegistry::Snapshot { peers, .. } => view.extend(peers.iter().cloned()),
        FromRegistry::Update { changes } => {
            for change in changes {
                match change {
                    Change::Joined { name, addr, key } => view.push(PeerEntry {
                        name: name.clone(),
                        addr: addr.clone(),
                        key: *key,
                        reachable: None,
                    }),
                    Change::Left { name, .. } => view.retain(|e| &e.name != name),
                    Change::Moved {
                        name,
                        addr,
                        reachable,
                    } => {
                        for e in view.iter_mut().filter(|e| &e.name == name) {
                            if reachable.is_some() || &e.addr != addr {
                                e.reachable = *reachable;
                            }
                            e.addr = addr.clone();
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

proptest! {
    /// After every flush, every registered peer's view (its welcome plus
    /// the updates it got) equals the registry's table without itself, and
    /// no name ever passes to another key.
    #[test]
    fn every_view_matches_the_table(ops in prop::collection::vec(op(), 1..60)) {
        let mut sim = Sim::new(Config {
            max_update_delay: Duration::from_millis(80),
            ..config()
        });
        let mut next_conn: Conn = 100;
        // Player i's current connection.
        let mut conn_of: HashMap<u8, Conn> = HashMap::new();
        let mut views: HashMap<Conn, Vec<PeerEntry>> = HashMap::new();
        let mut first_key: HashMap<String, PublicKey> = HashMap::new();
        for op in ops {
            match op {
                Op::Register(p) | Op::Impostor(p) => {
                    next_conn += 1;
                    let c = next_conn;
                    let name = format!("p{p}");
                    let key = if matches!(op, Op::Register(_)) { owner(&name) } else { key("impostor") };
                    sim.accept_as(c, ip(p), key);
                    sim.send(c, &register(&name, 4000 + i64::from(next_conn % 3)));
                    if matches!(op, Op::Register(_)) {
                        conn_of.insert(p, c);
                    }
                }
                Op::Lookalike(p) => {
                    next_conn += 1;
                    let name = format!("\u{3c1}{p}");
                    sim.accept_as(next_conn, ip(p), owner(&name));
                    sim.send(next_conn, &register(&name, 4000));
                }
                Op::Heartbeat(p) => if let Some(&c) = conn_of.get(&p) { sim.send(c, &ToRegistry::Heartbeat {}) },
                Op::Silence(ms) => sim.advance(Duration::from_millis(u64::from(ms))),
                Op::Disconnect(p) => if let Some(c) = conn_of.remove(&p) { sim.reg.on_closed(c, Disconnect::Lost, sim.now); sim.apply(); },
                Op::Leave(p) => if let Some(&c) = conn_of.get(&p) { sim.send(c, &ToRegistry::Leave {}) },
                Op::Load(tenths) => sim.reg.set_load(f64::from(tenths) / 10.0, Duration::from_millis(250)),
            }
            sim.flush();
            let mut deliver = |sim: &mut Sim| {
                for (c, msgs) in sim.inbox.drain() {
                    let view = views.entry(c).or_default();
                    for m in &msgs {
                        apply_view(view, m);
                    }
                }
            };
            deliver(&mut sim);
            // A sweep spread over the window has reached everyone once it
            // has passed (and the time that takes may bring evictions,
            // swept in turn).
            let everything_sent =
                |sim: &Sim| sim.reg.sweep.is_none() && sim.reg.log.end() == sim.reg.swept;
            for _ in 0..20 {
                if everything_sent(&sim) {
                    break;
                }
                let wait = sim.reg.update_delay();
                sim.advance(wait);
                sim.flush();
                deliver(&mut sim);
            }
            prop_assert!(everything_sent(&sim), "not everyone was sent everything within the window");
            let table = sim.reg.directory();
            prop_assert_eq!(
                sim.reg.lookalikes.len(),
                sim.reg.names.len() + sim.reg.reserved.len(),
                "every name held has its look counted once"
            );
            for entry in &table {
                let look = peerchat_core::protocol::name_skeleton(&entry.name);
                let alike = table.iter().filter(|e| peerchat_core::protocol::name_skeleton(&e.name) == look);
                prop_assert_eq!(alike.count(), 1, "{} has a look-alike online", &entry.name);
            }
            // The grace (10 minutes) outlasts the whole run: whichever key
            // got a name first keeps it.
            for entry in &table {
                let first = *first_key.entry(entry.name.clone()).or_insert(entry.key);
                prop_assert_eq!(entry.key, first, "{} changed hands", &entry.name);
            }
            for (c, session) in sim.reg.local_sessions() {
                let me = session.name.clone();
                let expected: Vec<PeerEntry> = table.iter().filter(|e| e.name != me).cloned().collect();
                let mut got = views.get(&c).cloned().unwrap_or_default();
                let mut want = expected.clone();
                got.sort_by(|a, b| a.name.cmp(&b.name));
                want.sort_by(|a, b| a.name.cmp(&b.name));
                prop_assert_eq!(got, want, "view of {}", me);
            }
        }
    }
}

/// Five peers online, listening (patient enough not to be evicted while
/// simulated time runs); alice's connection is 1.
fn listeners() -> Sim {
    let mut sim = Sim::new(Config {
        heartbeat: Duration::from_secs(20),
        timeout: Duration::from_secs(60),
        // Room for a full update frame of newcomers.
        max_peers: 1000,
        ..config()
    });
    for (c, name) in [
        (1, "alice"),
        (2, "bob"),
        (3, "carol"),
        (4, "dave"),
        (5, "erin"),
    ] {
        sim.register(c, name, 4000);
    }
    for c in 1..=5 {
        sim.take(c);
    }
    sim
}

fn updates(msgs: &[FromRegistry]) -> Vec<Vec<Change>> {
    msgs.iter()
        .map(|m| match m {
            FromRegistry::Update { changes } => changes.clone(),
            other => panic!("expected an update, got {other:?}"),
        })
        .collect()
}

#[test]
fn an_idle_registry_sends_each_change_at_once() {
    let mut sim = listeners();
    sim.reg.set_load(0.05, Duration::from_millis(250));
    assert_eq!(sim.reg.update_delay(), Duration::ZERO);
    sim.register(6, "frank", 4000);
    assert_eq!(updates(&sim.take(1)).len(), 1, "at the end of the turn");
}

/// The connections of the newcomers [`busy_with_churn`] registers.
const CHURN: std::ops::Range<Conn> = 100..136;

/// A busy registry, changes coming several per window: the window grows
/// to its bound. The newcomers are [`CHURN`].
fn busy_with_churn(sim: &mut Sim) {
    let mut newcomers = CHURN;
    for _ in 0..12 {
        // Three joins at once, then the time of a load report.
        for c in newcomers.by_ref().take(3) {
            sim.register(c, &format!("churn{c}"), 4000);
        }
        sim.advance(Duration::from_millis(250));
        sim.reg.set_load(0.95, Duration::from_millis(250));
    }
    // The last sweep, and the one after it for the changes made during
    // it, reach everyone.
    let window = sim.reg.update_delay();
    sim.advance(window * 2 + Duration::from_millis(20));
    for c in (1..=5).chain(CHURN) {
        sim.take(c);
    }
}

/// [`listeners`], busy with churn; and every session, in registration
/// order.
fn busy_listeners() -> (Sim, Vec<Conn>) {
    let mut sim = listeners();
    busy_with_churn(&mut sim);
    (sim, (1..=5).chain(CHURN).collect())
}

#[test]
fn under_load_a_window_of_changes_goes_out_as_one_frame_in_order() {
    let (mut sim, _) = busy_listeners();
    let window = sim.reg.update_delay();
    assert_eq!(window, config().max_update_delay, "it grows to the bound");
    // In one window: joins, bob leaves and comes back from elsewhere,
    // each in a turn of its own.
    sim.register(6, "frank", 4000);
    sim.send(2, &ToRegistry::Leave {});
    sim.flush();
    sim.register(7, "bob", 4100);
    sim.register(8, "gina", 4000);
    assert!(sim.take(1).is_empty(), "held within the window");
    // The flush timer fires at its tick, at most 10 ms late.
    sim.advance(window + Duration::from_millis(10));
    let frames = updates(&sim.take(1));
    assert_eq!(frames.len(), 1, "one frame for the window");
    let names: Vec<(&str, &str)> = frames[0]
        .iter()
        .map(|c| match c {
            Change::Joined { name, .. } => ("joined", name.as_str()),
            Change::Left { name, .. } => ("left", name.as_str()),
            Change::Moved { name, .. } => ("moved", name.as_str()),
        })
        .collect();
    assert_eq!(
        names,
        [
            ("joined", "frank"),
            ("left", "bob"),
            ("joined", "bob"),
            ("joined", "gina")
        ]
    );
    // A newcomer of the window got what came before it in its welcome and
    // the rest in the same frame: frank's view is everyone else.
    let mut view = Vec::new();
    for m in sim.take(6) {
        apply_view(&mut view, &m);
    }
    let mut names: Vec<String> = view.into_iter().map(|e| e.name).collect();
    names.retain(|n| !n.starts_with("churn"));
    names.sort();
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin", "gina"]);

    // The load falls: the window shrinks back to nothing.
    for _ in 0..20 {
        sim.reg.set_load(0.05, Duration::from_millis(250));
    }
    assert_eq!(sim.reg.update_delay(), Duration::ZERO);
    sim.register(9, "hank", 4000);
    assert_eq!(updates(&sim.take(1)).len(), 1);
}

#[test]
fn a_sweep_ends_early_once_the_changes_for_it_fill_an_update_frame() {
    let (mut sim, _) = busy_listeners();
    assert_eq!(sim.reg.update_delay(), config().max_update_delay);
    // One join per turn, within a fraction of the window: the first
    // starts a sweep, whose first session's turn has not come when the
    // joins fill a frame; then everyone's turn comes at once.
    for k in 0..CHUNK {
        let conn = 1_000 + k as Conn;
        sim.register(conn, &format!("fill{k}"), 4000);
        sim.take(conn);
        if k + 1 < CHUNK {
            assert!(sim.take(1).is_empty(), "not alice's turn at {k}");
        }
    }
    for c in [1, 5] {
        let frames = updates(&sim.take(c));
        assert_eq!(frames.len(), 1, "one full frame");
        assert_eq!(frames[0].len(), CHUNK);
    }
}

#[test]
fn a_held_update_answers_the_heartbeats_of_its_window() {
    let (mut sim, _) = busy_listeners();
    let window = sim.reg.update_delay();
    sim.register(6, "frank", 4000);
    sim.take(6);
    sim.send(1, &ToRegistry::Heartbeat {});
    sim.flush();
    assert!(sim.take(1).is_empty(), "the answer waits for the window");
    sim.advance(window + Duration::from_millis(10));
    assert_eq!(updates(&sim.take(1)).len(), 1, "the update, no heartbeat");
    // Nothing held: a heartbeat is answered at the end of its turn.
    sim.send(1, &ToRegistry::Heartbeat {});
    sim.flush();
    assert_eq!(sim.take(1), [FromRegistry::Heartbeat {}]);
}

/// When each session first hears of a change made now: simulated time
/// runs a tick at a time for `span`.
fn first_updates(sim: &mut Sim, sessions: &[Conn], span: Duration) -> HashMap<Conn, Duration> {
    let start = sim.now;
    let mut heard = HashMap::new();
    while sim.now - start <= span {
        sim.advance(Duration::from_millis(10));
        for &c in sessions {
            let got = updates(&sim.take(c));
            assert!(got.len() <= 1, "one update per session per window");
            if !got.is_empty() {
                assert!(heard.insert(c, sim.now - start).is_none(), "{c} twice");
            }
        }
    }
    heard
}

#[test]
fn a_busy_registry_spreads_each_sweep_over_its_window() {
    let (mut sim, sessions) = busy_listeners();
    let window = sim.reg.update_delay();
    assert_eq!(window, config().max_update_delay);
    sim.register(6, "frank", 4000);
    let heard = first_updates(&mut sim, &sessions, window * 2);
    assert_eq!(heard.len(), sessions.len(), "everyone hears of frank");
    let tick = Duration::from_millis(10);
    let times: Vec<Duration> = sessions.iter().map(|c| heard[c]).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in registration order: {times:?}"
    );
    assert!(times[0] <= tick * 2, "the first at once: {:?}", times[0]);
    let last = *times.last().unwrap();
    assert!(
        last <= window + tick,
        "everyone within the window: {last:?}"
    );
    assert!(
        last >= window / 2,
        "spread over the window, not at once: {last:?}"
    );
}

#[test]
fn a_change_made_during_a_sweep_reaches_the_sessions_it_passed_in_the_next() {
    let (mut sim, sessions) = busy_listeners();
    let window = sim.reg.update_delay();
    sim.register(6, "frank", 4000);
    // Halfway through the sweep, gina joins.
    let first = first_updates(&mut sim, &sessions, window / 2);
    sim.register(7, "gina", 4000);
    let mut got: HashMap<Conn, Vec<Vec<Change>>> = HashMap::new();
    let start = sim.now;
    while sim.now - start <= window * 2 {
        sim.advance(Duration::from_millis(10));
        for &c in &sessions {
            for frame in updates(&sim.take(c)) {
                got.entry(c).or_default().push(frame);
            }
        }
    }
    let joined = |frames: &[Vec<Change>]| -> Vec<String> {
        frames
            .iter()
            .flatten()
            .filter_map(|change| match change {
                Change::Joined { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    };
    for &c in &sessions {
        let frames = got.get(&c).map_or(&[][..], Vec::as_slice);
        if first.contains_key(&c) {
            // Passed before gina: frank came then, gina in the next sweep.
            assert_eq!(joined(frames), ["gina"], "session {c}");
        } else {
            // Not reached yet: both in one update.
            assert_eq!(frames.len(), 1, "session {c}");
            assert_eq!(joined(frames), ["frank", "gina"], "session {c}");
        }
    }
    assert!(!first.is_empty() && first.len() < sessions.len());
    assert!(sim.reg.sweep.is_none(), "both sweeps are over");
}

#[test]
fn a_heartbeat_that_comes_after_its_sessions_turn_is_answered_when_the_sweep_ends() {
    let (mut sim, _) = busy_listeners();
    let window = sim.reg.update_delay();
    sim.register(6, "frank", 4000);
    sim.take(6);
    // Alice is first in the order: her update comes at once.
    sim.advance(Duration::from_millis(20));
    assert_eq!(updates(&sim.take(1)).len(), 1);
    sim.send(1, &ToRegistry::Heartbeat {});
    sim.flush();
    assert!(
        sim.take(1).is_empty(),
        "the sweep is still on: the answer waits"
    );
    // Nothing more changes: the sweep's end answers it.
    sim.advance(window);
    assert_eq!(sim.take(1), [FromRegistry::Heartbeat {}]);
    assert!(sim.reg.sweep.is_none());
}

#[test]
fn a_heartbeat_is_not_kept_waiting_past_half_the_margin_to_the_timeout() {
    // 100 ms of margin: the window is too long to wait for.
    let mut sim = Sim::new(Config {
        heartbeat: Duration::from_secs(20),
        timeout: Duration::from_millis(20_200),
        max_peers: 1000,
        ..config()
    });
    sim.register(1, "alice", 4000);
    busy_with_churn(&mut sim);
    assert_eq!(sim.reg.update_delay(), config().max_update_delay);
    sim.register(6, "frank", 4000);
    sim.send(1, &ToRegistry::Heartbeat {});
    sim.flush();
    assert_eq!(sim.take(1), [FromRegistry::Heartbeat {}]);
}

#[test]
fn a_saturated_loop_keeps_its_window() {
    let (mut sim, _) = busy_listeners();
    let max = config().max_update_delay;
    assert_eq!(sim.reg.update_delay(), max);
    let mut next: Conn = 500;
    // Each loop turn is as long as a window and makes many changes; the
    // push's work falls in one load report and the wait in the next.
    for round in 0..20 {
        for _ in 0..8 {
            sim.accept(next, ip(next as u8));
            sim.send(next, &register(&format!("sat{next}"), 4000));
            next += 1;
        }
        sim.flush();
        sim.advance(Duration::from_millis(250));
        sim.reg.set_load(0.95, Duration::from_millis(250));
        sim.advance(Duration::from_millis(250));
        sim.reg.set_load(0.1, Duration::from_millis(250));
        assert_eq!(sim.reg.update_delay(), max, "round {round}");
    }
    let frames = updates(&sim.take(1));
    assert!(
        frames.len() <= 20,
        "one frame a round at most: {}",
        frames.len()
    );
}

#[test]
fn changes_that_come_one_at_a_time_are_not_held_even_when_busy() {
    let mut sim = listeners();
    let mut next: Conn = 100;
    let mut windows = Vec::new();
    // A client that waits for each change to arrive before the next: one
    // change per window, whatever the window.
    for _ in 0..20 {
        for _ in 0..4 {
            sim.register(next, &format!("one{next}"), 4000);
            next += 1;
            let window = sim.reg.update_delay();
            sim.advance(window + Duration::from_millis(10));
            assert_eq!(updates(&sim.take(1)).len(), 1, "each change arrives");
        }
        sim.reg.set_load(0.95, Duration::from_millis(250));
        windows.push(sim.reg.update_delay());
    }
    let held = windows.iter().filter(|w| !w.is_zero()).count();
    assert!(
        held <= 3,
        "a window that bundles nothing is dropped and tried again rarely: {windows:?}"
    );
}

#[test]
fn a_large_directory_goes_to_newcomers_in_shared_parts() {
    let mut sim = Sim::new(Config {
        max_peers: 1000,
        ..config()
    });
    for c in 0..450 {
        sim.register(c, &format!("p{c}"), 4000);
        sim.take(c);
    }
    sim.register(1000, "new1", 4000);
    // 450 peers in parts of 200; new1 joined the last one, which is
    // encoded again for the next newcomer, while the others are kept.
    let cached: Vec<u64> = sim.reg.parts.keys().copied().collect();
    assert_eq!(cached, [0, 1]);
    sim.register(1001, "new2", 4000);
    for (c, me) in [(1000, "new1"), (1001, "new2")] {
        let msgs = sim.take(c);
        match &msgs[0] {
            FromRegistry::Welcome { more, peers, .. } => assert!(*more && peers.is_empty()),
            other => panic!("expected a welcome, got {other:?}"),
        }
        match msgs
            .iter()
            .rfind(|m| matches!(m, FromRegistry::Snapshot { .. }))
        {
            Some(FromRegistry::Snapshot { more, peers }) => assert!(!more && peers.is_empty()),
            other => panic!("expected a closing snapshot, got {other:?}"),
        }
        let mut view = Vec::new();
        for m in &msgs {
            apply_view(&mut view, m);
        }
        let mut got: Vec<String> = view.into_iter().map(|e| e.name).collect();
        let mut want: Vec<String> = sim
            .reg
            .directory()
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != me)
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{me}'s view");
    }
    // A leave in the first part makes that part new; the others stay.
    sim.send(5, &ToRegistry::Leave {});
    sim.flush();
    assert!(!sim.reg.parts.contains_key(&0) && sim.reg.parts.contains_key(&1));

    // Parts no welcome used since the last look are dropped; the next
    // newcomer's welcome encodes them again, from the sessions.
    sim.reg.release_caches();
    assert!(!sim.reg.parts.is_empty(), "used since the start");
    sim.reg.release_caches();
    assert!(sim.reg.parts.is_empty(), "unused since the last look");
    sim.register(1002, "new3", 4000);
    let mut view = Vec::new();
    for m in &sim.take(1002) {
        apply_view(&mut view, m);
    }
    let mut want = sim.reg.directory();
    want.retain(|e| e.name != "new3");
    assert_eq!(view, want, "new3's view, in registration order");
}
