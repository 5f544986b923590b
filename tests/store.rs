//! The store and offline delivery, with real `registry` and `peer --json`
//! processes on 127.0.0.1: `kill -9` of a sender or a receiver in the
//! middle of a burst, a target away for the whole send, the time to live,
//! a name back with another key, store files the peer must refuse, and the
//! history across restarts.
//!
//! The contract under test (README, "History and offline delivery"): every
//! message ends, per target, as exactly one `delivered` or `undelivered`,
//! possibly in a later run of the sender, and a receiver shows each message
//! once, even across crashes of either side.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_peer::journal::Query;
use peerchat_peer::store::{Options, Store};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use serde_json::Value;

/// Messages in each burst.
const BURST: usize = 5000;
/// A process is killed once its receiver showed this many of the burst:
/// well into it, well before its end.
const KILL_AFTER: usize = 500;
/// How long the rest of a burst may take to arrive once the killed process
/// is back: generous for a busy two-core machine running a debug build.
const RECOVERY: Duration = Duration::from_secs(15);
/// How long a receiver is watched for a message it must not show: one that
/// was on its way would have arrived within it.
const QUIET: Duration = Duration::from_millis(1500);

/// Starts peers one after another, each registered (and seen to join by
/// the earlier ones) before the next, so that a message to everyone from
/// any of them reaches all the others.
fn start_peers(reg: &Registry, peers: &[(&str, &[&str])]) -> Vec<PeerProc> {
    let mut started: Vec<PeerProc> = Vec::new();
    for (name, extra) in peers {
        let mut p = PeerProc::start_with(name, &reg.addr.to_string(), extra);
        p.registered();
        for earlier in started.iter_mut() {
            earlier.expect("joined", LONG, is("joined", "name", name));
        }
        started.push(p);
    }
    started
}

/// Starts `old` again: the same data directory, so the same key, pins and
/// store. Returns once it registered.
fn restart(old: &PeerProc, reg: &Registry, extra: &[&str]) -> PeerProc {
    let mut again = PeerProc::start_again(&old.data, &old.name, &reg.addr.to_string(), extra);
    again.registered();
    again
}

/// Reads `p`'s events, handing each to `done`, until `done` says so or
/// `within` has passed (false then). Every event read stays in `p.seen`.
fn read_until(p: &mut PeerProc, within: Duration, mut done: impl FnMut(&Value) -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match p.try_expect(left, |_| true) {
            Ok(event) => {
                if done(&event) {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Kills `p` with SIGKILL and reads what it printed before it died.
fn kill_9(p: &mut PeerProc) {
    p.proc.signal(libc::SIGKILL);
    let status = p.proc.wait_exit(LONG).expect("a killed peer exits");
    assert_eq!(status.code(), None, "{}: killed, not exited", p.name);
    p.drain_until_exit(LONG);
}

/// Asks `p` to quit and waits for status 0: what waits stays in its store.
fn quit(p: &mut PeerProc) {
    p.say("/quit");
    let status = p.proc.wait_exit(LONG);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}: /quit exits 0; stderr {:?}",
        p.name,
        p.proc.stderr.snapshot()
    );
    p.drain_until_exit(LONG);
}

fn id_of(event: &Value) -> u64 {
    event["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {event}"))
}

fn names_in(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|n| n.as_str().expect("a name").to_string())
        .collect()
}

/// Each `sent`'s id and targets, in order.
type Sent = Vec<(u64, Vec<String>)>;

/// The `sent` events in `events`, in order.
fn sent(events: &[Value]) -> Sent {
    events
        .iter()
        .filter(|v| v["event"] == "sent")
        .map(|v| (id_of(v), names_in(&v["to"])))
        .collect()
}

/// The outcome events (`delivered`, `undelivered`) in `events`.
fn outcomes(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|v| v["event"] == "delivered" || v["event"] == "undelivered")
        .collect()
}

/// The messages `from` shown in `events`, in order: (id, text, direct).
fn shown_from(events: &[Value], from: &str) -> Vec<(u64, String, bool)> {
    events
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == from)
        .map(|v| {
            (
                id_of(v),
                v["text"].as_str().expect("a text").to_string(),
                v["direct"].as_bool().expect("direct"),
            )
        })
        .collect()
}

/// The burst's lines, messages to everyone.
fn burst_lines() -> Vec<String> {
    (0..BURST).map(|i| format!("burst {i} ✓")).collect()
}

/// Types every line at once: one write, as a paste or a pipe would.
fn type_all(p: &mut PeerProc, lines: &[String]) {
    p.say(&lines.join("\n"));
}

/// What a sender said in all its runs, checked against the contract: each
/// accepted line got one `sent` (in the first run only: a restarted sender
/// does not say it again) and every (id, target) of it exactly one outcome,
/// `delivered`. Returns each sent id's text and targets.
fn check_sender(
    runs: &[&[Value]],
    lines: &[String],
    excused: &BTreeSet<(u64, String)>,
) -> (HashMap<u64, String>, Sent) {
    let first = runs[0];
    let errors: Vec<&Value> = first.iter().filter(|v| v["event"] == "error").collect();
    assert!(errors.is_empty(), "the burst was refused: {errors:?}");
    let mut sent = sent(first);
    assert!(!sent.is_empty(), "nothing was sent");
    for later in &runs[1..] {
        let again = self::sent(later);
        assert!(again.is_empty(), "a restart said `sent` again: {again:?}");
    }
    sent.extend(unreported(runs, &sent));
    // Lines are taken in order and each accepted one gets the next id, so
    // the n-th `sent` is the n-th line.
    let ids: Vec<u64> = sent.iter().map(|(id, _)| *id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    let texts: HashMap<u64, String> = ids.iter().copied().zip(lines.iter().cloned()).collect();

    let mut wanted: HashMap<(u64, String), Vec<String>> = HashMap::new();
    for (id, to) in &sent {
        for target in to {
            wanted.insert((*id, target.clone()), Vec::new());
        }
    }
    for pair in excused {
        if let Some(seen) = wanted.get_mut(pair) {
            seen.push("recorded \"delivered\", not printed".into());
        }
    }
    let mut strays = Vec::new();
    for (run, events) in runs.iter().enumerate() {
        for o in outcomes(events) {
            let key = (id_of(o), o["to"].as_str().expect("to").to_string());
            let what = format!("run {}: {o}", run + 1);
            match wanted.get_mut(&key) {
                Some(seen) => seen.push(what),
                None => strays.push(what),
            }
        }
    }
    assert!(
        strays.is_empty(),
        "{} outcomes for messages never reported sent (or to others than their targets), e.g. {:?}",
        strays.len(),
        &strays[..strays.len().min(20)]
    );
    let mut missing: Vec<&(u64, String)> = wanted
        .iter()
        .filter(|(_, seen)| seen.is_empty())
        .map(|(k, _)| k)
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} (id, target) pairs have no outcome, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let mut twice: Vec<&Vec<String>> = wanted.values().filter(|seen| seen.len() > 1).collect();
    twice.sort();
    assert!(
        twice.is_empty(),
        "{} (id, target) pairs have more than one outcome, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let failed: Vec<&String> = wanted
        .values()
        .flatten()
        .filter(|o| !o.contains("\"delivered\""))
        .collect();
    assert!(
        failed.is_empty(),
        "undelivered, although every target was back well within the time to live: {:?}",
        &failed[..failed.len().min(20)]
    );
    (texts, sent)
}

/// What a receiver showed from `from` over all its runs, checked: every id
/// sent to it exactly once, in increasing id order, nothing else, with the
/// text that was typed.
fn check_receiver(
    who: &str,
    runs: &[&[Value]],
    from: &str,
    texts: &HashMap<u64, String>,
    sent: &[(u64, Vec<String>)],
    lost: &BTreeSet<u64>,
) {
    let shown: Vec<(u64, String, bool)> = runs.iter().flat_map(|r| shown_from(r, from)).collect();
    let ids: Vec<u64> = shown.iter().map(|(id, _, _)| *id).collect();
    let expected: BTreeSet<u64> = sent
        .iter()
        .filter(|(_, to)| to.iter().any(|t| t == who))
        .map(|(id, _)| *id)
        .filter(|id| !lost.contains(id))
        .collect();
    let got: BTreeSet<u64> = ids.iter().copied().collect();
    let unsent: Vec<&u64> = got.difference(&expected).collect();
    assert!(
        unsent.is_empty(),
        "{who} showed {} messages {from} did not report sent to it: {:?}",
        unsent.len(),
        &unsent[..unsent.len().min(20)]
    );
    let missing: Vec<&u64> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{who} never showed {} of the {} messages sent to it: {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)]
    );
    let disorder: Vec<&[u64]> = ids.windows(2).filter(|w| w[0] >= w[1]).collect();
    assert!(
        disorder.is_empty(),
        "{who} showed ids out of order or twice ({} shown for {} sent): {:?}",
        ids.len(),
        expected.len(),
        &disorder[..disorder.len().min(20)]
    );
    for (id, text, direct) in &shown {
        assert_eq!(Some(text), texts.get(id), "{who}: the text of id {id}");
        assert!(!direct, "{who}: id {id} was to everyone");
    }
}

/// Reads `p` until it showed every id of `want` from `from` (over its
/// earlier runs' `before` too), then a while longer, so that a duplicate
/// or a stray on its way is read as well.
fn read_shown(
    p: &mut PeerProc,
    before: &[Value],
    from: &str,
    want: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let mut shown: BTreeSet<u64> = shown_from(before, from).iter().map(|m| m.0).collect();
    shown.extend(shown_from(&p.seen, from).iter().map(|m| m.0));
    let all = want.is_subset(&shown)
        || read_until(p, RECOVERY, |v| {
            if v["event"] == "message" && v["from"] == from {
                shown.insert(id_of(v));
            }
            want.is_subset(&shown)
        });
    if !all {
        let missing: BTreeSet<u64> = want.difference(&shown).copied().collect();
        let (in_history, store) = store_says(p, &missing);
        if one_piece(&missing, MESSAGES_PER_PIECE) && in_history == missing.len() {
            eprintln!(
                "{}: ids {missing:?} were recorded but not printed: the documented window between a commit and its write",
                p.name
            );
            return missing;
        }
        panic!(
            "{}: showed {} of the {} messages sent to it; never showed {} of them, e.g. {:?}; {store}",
            p.name,
            want.intersection(&shown).count(),
            want.len(),
            missing.len(),
            missing.iter().take(20).collect::<Vec<_>>(),
        );
    }
    // Whatever comes is kept in `seen`, for the checks to report.
    let _ = p.try_expect(QUIET, |v| v["event"] == "message");
    BTreeSet::new()
}

/// Reads `p` until every (id, target) of `sent` has an outcome over the
/// runs `before` and this one.
/// Returns the pairs whose `delivered` was recorded but not printed, in the
/// documented window (see [`one_piece`]): at most one piece of them.
fn read_outcomes(
    p: &mut PeerProc,
    before: &[Value],
    sent: &[(u64, Vec<String>)],
) -> BTreeSet<(u64, String)> {
    let mut open: BTreeSet<(u64, String)> = sent
        .iter()
        .flat_map(|(id, to)| to.iter().map(move |t| (*id, t.clone())))
        .collect();
    for o in outcomes(before).into_iter().chain(outcomes(&p.seen)) {
        open.remove(&(id_of(o), o["to"].as_str().unwrap_or_default().to_string()));
    }
    let done = open.is_empty()
        || read_until(p, RECOVERY, |v| {
            if v["event"] == "delivered" || v["event"] == "undelivered" {
                open.remove(&(id_of(v), v["to"].as_str().unwrap_or_default().to_string()));
            }
            open.is_empty()
        });
    if !done {
        let ids: BTreeSet<u64> = open.iter().map(|(id, _)| *id).collect();
        let (_, store) = store_says(p, &ids);
        let recorded = delivered_in_store(p, &open);
        if open.len() <= DELIVERED_PER_PIECE && recorded == open.len() {
            eprintln!(
                "{}: {} outcomes were recorded delivered but not printed: the documented window between a commit and its write",
                p.name,
                open.len()
            );
            return open;
        }
        panic!(
            "{}: {} (id, target) pairs of messages it reported sent have no outcome in any run, e.g. {:?}; {store}",
            p.name,
            open.len(),
            open.iter().take(20).collect::<Vec<_>>(),
        );
    }
    BTreeSet::new()
}

/// What `p`'s store holds of the messages `ids` (sent or received): to
/// tell, when a test fails, an event the peer never printed from a message
/// it never handled. The store is opened here once `p` has quit.
/// What `p`'s store holds of `ids`, read after it quit: how many are in its
/// history, and a summary for a failure message.
fn store_says(p: &mut PeerProc, ids: &BTreeSet<u64>) -> (usize, String) {
    let key = p.key();
    p.close_input();
    if p.proc.wait_exit(LONG).is_none() {
        return (0, "(its store was not read: it would not quit)".into());
    }
    let options = Options {
        path: store_path(&p.data, &p.name),
        owner: key,
        name: p.name.clone(),
        history: true,
    };
    let (mut store, saved) = match Store::open(options) {
        Ok(opened) => opened,
        Err(e) => return (0, format!("(its store was not read: {e})")),
    };
    let waiting: BTreeSet<u64> = saved.outbox.iter().map(|o| o.id).collect();
    let entries = match store.query(&Query::History {
        with: None,
        limit: 1_000_000,
    }) {
        Ok(entries) => entries,
        Err(e) => return (0, format!("(its history was not read: {e})")),
    };
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for entry in entries.iter().filter(|e| ids.contains(&e.id)) {
        if entry.outgoing {
            for t in &entry.targets {
                *states
                    .entry(format!("to {} {}", t.to, t.state))
                    .or_default() += 1;
            }
        } else {
            *states
                .entry(format!("received from {}", entry.from))
                .or_default() += 1;
        }
    }
    let in_history = entries.iter().filter(|e| ids.contains(&e.id)).count();
    let summary = format!(
        "its store (read after it quit) has {in_history} of these {} ids in its history ({states:?}), {} still in its outbox",
        ids.len(),
        ids.intersection(&waiting).count()
    );
    (in_history, summary)
}

/// How many of `pairs` (id, target) the store of `p` (which quit already,
/// see [`store_says`]) holds as delivered.
fn delivered_in_store(p: &PeerProc, pairs: &BTreeSet<(u64, String)>) -> usize {
    let options = Options {
        path: store_path(&p.data, &p.name),
        owner: p.key(),
        name: p.name.clone(),
        history: true,
    };
    let Ok((mut store, _)) = Store::open(options) else {
        return 0;
    };
    let history = Query::History {
        with: None,
        limit: 1_000_000,
    };
    let Ok(entries) = store.query(&history) else {
        return 0;
    };
    entries
        .iter()
        .filter(|e| e.outgoing)
        .flat_map(|e| e.targets.iter().map(move |t| (e.id, t)))
        .filter(|(id, t)| t.state == "delivered" && pairs.contains(&(*id, t.to.clone())))
        .count()
}

/// The most lines of one kind that fit in one piece of the peer's output
/// (64 KiB at most): a `sent` to two targets is at least 46 bytes, a
/// message of the burst at least 100.
const SENT_PER_PIECE: usize = 65536 / 46;
/// A `delivered` is at least 38 bytes.
const DELIVERED_PER_PIECE: usize = 65536 / 38;
const MESSAGES_PER_PIECE: usize = 65536 / 100;

/// Whether `ids` could be the lines of one piece of output: consecutive,
/// and no more than fit. The README documents that a kill landing between
/// the commit of a piece's records and its write loses those lines (not
/// the records); anything else missing is a bug.
fn one_piece(ids: &BTreeSet<u64>, most: usize) -> bool {
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return true;
    };
    ids.len() <= most && last - first + 1 == ids.len() as u64
}

/// Messages of the first run whose `sent` line was lost in the documented
/// window (see [`one_piece`]): the ids right after the last one reported,
/// known from their outcomes, with the targets those name.
fn unreported(runs: &[&[Value]], sent: &Sent) -> Sent {
    let reported: BTreeSet<u64> = sent.iter().map(|(id, _)| *id).collect();
    let mut targets: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for o in runs.iter().flat_map(|r| outcomes(r)) {
        let id = id_of(o);
        if !reported.contains(&id) {
            let to = targets.entry(id).or_default();
            let target = o["to"].as_str().expect("to").to_string();
            if !to.contains(&target) {
                to.push(target);
            }
        }
    }
    let lost: BTreeSet<u64> = targets.keys().copied().collect();
    let next = reported.last().map_or(1, |last| last + 1);
    if lost.is_empty() || !one_piece(&lost, SENT_PER_PIECE) || lost.first() != Some(&next) {
        // Left for the checks, which report them as strays.
        return Vec::new();
    }
    eprintln!(
        "ids {lost:?} were recorded but their `sent` was not printed: the documented window between a commit and its write"
    );
    targets
        .into_iter()
        .map(|(id, mut to)| {
            to.sort();
            (id, to)
        })
        .collect()
}

/// Waits until `p` showed `n` messages from `from`.
fn wait_shown(p: &mut PeerProc, from: &str, n: usize) {
    let mut count = shown_from(&p.seen, from).len();
    let reached = count >= n
        || read_until(p, LONG, |v| {
            if v["event"] == "message" && v["from"] == from {
                count += 1;
            }
            count >= n
        });
    assert!(reached, "{}: only {count} of {n} messages shown", p.name);
}

/// alice, bob and carol online, alice in the middle of a burst to everyone
/// (bob has shown some of it): the peers and the burst's lines.
fn burst_under_way(reg: &Registry) -> (PeerProc, PeerProc, PeerProc, Vec<String>) {
    let mut peers = start_peers(reg, &[("bob", &[]), ("carol", &[]), ("alice", &[])]);
    let mut alice = peers.pop().unwrap();
    let carol = peers.pop().unwrap();
    let mut bob = peers.pop().unwrap();
    let lines = burst_lines();
    type_all(&mut alice, &lines);
    wait_shown(&mut bob, "alice", KILL_AFTER);
    (alice, bob, carol, lines)
}

#[test]
fn a_sender_killed_mid_burst_delivers_the_rest_once_when_restarted() {
    let started = Instant::now();
    let reg = Registry::start(&[]);
    let (mut alice, mut bob, mut carol, lines) = burst_under_way(&reg);
    kill_9(&mut alice);
    let first = alice.seen.clone();
    let sent_first = sent(&first);
    let pairs: usize = sent_first.iter().map(|(_, to)| to.len()).sum();
    assert!(
        outcomes(&first).len() < pairs,
        "the kill came after every delivery ({} sent): nothing was left to recover",
        sent_first.len()
    );

    let mut again = restart(&alice, &reg, &[]);
    let excused = read_outcomes(&mut again, &first, &sent_first);
    let (texts, sent) = check_sender(&[&first, &again.seen], &lines, &excused);
    for (id, to) in &sent {
        let mut to = to.clone();
        to.sort();
        assert_eq!(to, ["bob", "carol"], "the targets of id {id}");
    }
    let want: BTreeSet<u64> = sent.iter().map(|(id, _)| *id).collect();
    let bob_lost = read_shown(&mut bob, &[], "alice", &want);
    let carol_lost = read_shown(&mut carol, &[], "alice", &want);
    check_receiver("bob", &[&bob.seen], "alice", &texts, &sent, &bob_lost);
    check_receiver("carol", &[&carol.seen], "alice", &texts, &sent, &carol_lost);
    eprintln!(
        "{} of {BURST} sent before the kill; took {:?}",
        sent.len(),
        started.elapsed()
    );
}

#[test]
fn a_receiver_killed_mid_burst_shows_each_message_once_when_restarted() {
    let started = Instant::now();
    let reg = Registry::start(&[]);
    let (mut alice, mut bob, mut carol, lines) = burst_under_way(&reg);
    kill_9(&mut bob);
    let bob_first = bob.seen.clone();
    let mut bob_again = restart(&bob, &reg, &[]);

    // Every line is accepted: bob is away for part of the burst, so those
    // messages go to carol alone (to everyone means to those online).
    let mut sent_count = sent(&alice.seen).len();
    let all_sent = sent_count == BURST
        || read_until(&mut alice, RECOVERY, |v| {
            sent_count += usize::from(v["event"] == "sent");
            sent_count == BURST
        });
    assert!(all_sent, "alice: {sent_count} of {BURST} sent");
    let sent_all = sent(&alice.seen);
    let excused = read_outcomes(&mut alice, &[], &sent_all);
    let (texts, sent) = check_sender(&[&alice.seen], &lines, &excused);
    let to_bob: BTreeSet<u64> = sent
        .iter()
        .filter(|(_, to)| to.iter().any(|t| t == "bob"))
        .map(|(id, _)| *id)
        .collect();
    let shown_first = shown_from(&bob_first, "alice").len();
    assert!(
        shown_first < to_bob.len(),
        "bob was killed after it showed all {shown_first}: nothing was left to recover"
    );
    let to_carol: BTreeSet<u64> = sent.iter().map(|(id, _)| *id).collect();
    let bob_lost = read_shown(&mut bob_again, &bob_first, "alice", &to_bob);
    let carol_lost = read_shown(&mut carol, &[], "alice", &to_carol);
    check_receiver(
        "bob",
        &[&bob_first, &bob_again.seen],
        "alice",
        &texts,
        &sent,
        &bob_lost,
    );
    check_receiver("carol", &[&carol.seen], "alice", &texts, &sent, &carol_lost);
    eprintln!(
        "bob showed {shown_first} of {} before the kill; took {:?}",
        to_bob.len(),
        started.elapsed()
    );
}

/// Alice and bob exchange a message, so that alice pins bob's key (a
/// `/msg` to a name away is accepted only when it is pinned); then bob
/// quits.
fn pinned_then_away(alice: &mut PeerProc, bob: &mut PeerProc) {
    alice.say("/msg bob hello before you go");
    bob.expect(
        "the first message",
        LONG,
        is("message", "text", "hello before you go"),
    );
    alice.expect_event("delivered", LONG);
    alice.say("/whois bob");
    let whois = alice.expect_event("whois", LONG);
    assert_eq!(whois["pinned"], true, "{whois}");
    quit(bob);
    alice.expect("bob leaving", LONG, is("left", "name", "bob"));
}

/// Sends `texts` to bob, who is away: each is `sent` to bob, then `queued`
/// (`offline`). Returns the ids.
fn send_to_absent_bob(alice: &mut PeerProc, texts: &[String]) -> Vec<u64> {
    let mut ids = Vec::new();
    for text in texts {
        alice.say(&format!("/msg bob {text}"));
        let sent = alice.expect_event("sent", LONG);
        assert_eq!(sent["to"], serde_json::json!(["bob"]), "{sent}");
        let id = id_of(&sent);
        let queued = alice.expect_event("queued", LONG);
        assert_eq!(
            (id_of(&queued), &queued["to"], &queued["reason"]),
            (id, &Value::from("bob"), &Value::from("offline")),
            "{queued}"
        );
        ids.push(id);
    }
    ids
}

#[test]
fn messages_to_a_target_away_for_the_whole_send_arrive_when_it_is_back() {
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &[("alice", &[]), ("bob", &[])]);
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    pinned_then_away(&mut alice, &mut bob);

    let texts: Vec<String> = (1..=5)
        .map(|i| format!("while you were away {i}"))
        .collect();
    let ids = send_to_absent_bob(&mut alice, &texts);
    // Away is not gone: nothing is given up while bob is not back.
    let early = alice.try_expect(Duration::from_secs(10), |v| {
        v["event"] == "delivered" || v["event"] == "undelivered"
    });
    assert!(early.is_err(), "an outcome while bob was away: {early:?}");

    let mut bob = restart(&bob, &reg, &[]);
    let unprinted = read_outcomes(
        &mut alice,
        &[],
        &ids.iter()
            .map(|id| (*id, vec!["bob".into()]))
            .collect::<Vec<_>>(),
    );
    assert!(unprinted.is_empty(), "nobody was killed: {unprinted:?}");
    wait_shown(&mut bob, "alice", texts.len());
    let _ = bob.try_expect(QUIET, |v| v["event"] == "message");
    let shown = shown_from(&bob.seen, "alice");
    let want: Vec<(u64, String, bool)> = ids
        .iter()
        .zip(&texts)
        .map(|(id, text)| (*id, text.clone(), true))
        .collect();
    assert_eq!(
        shown, want,
        "bob shows each once, in order, and nothing else"
    );
    let delivered: Vec<u64> = outcomes(&alice.seen)
        .iter()
        .filter(|o| o["event"] == "delivered" && ids.contains(&id_of(o)))
        .map(|o| id_of(o))
        .collect();
    assert_eq!(delivered, ids, "one delivered each, in order");
    let others: Vec<&Value> = outcomes(&alice.seen)
        .into_iter()
        .filter(|o| o["event"] == "undelivered")
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

#[test]
fn messages_to_a_target_away_past_the_time_to_live_expire_and_never_arrive() {
    let ttl = Duration::from_secs(2);
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &[("alice", &["--outbox-ttl", "2s"]), ("bob", &[])]);
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    pinned_then_away(&mut alice, &mut bob);

    let texts: Vec<String> = (1..=3).map(|i| format!("too late {i}")).collect();
    let before = Instant::now();
    let ids = send_to_absent_bob(&mut alice, &texts);
    let mut expired = Vec::new();
    let all = read_until(&mut alice, LONG, |v| {
        if v["event"] == "delivered" || v["event"] == "undelivered" {
            expired.push(v.clone());
        }
        expired.len() == ids.len()
    });
    let took = before.elapsed();
    assert!(all, "alice: only {expired:?} within {LONG:?}");
    for (o, id) in expired.iter().zip(&ids) {
        assert_eq!(
            (&o["event"], id_of(o), &o["to"], &o["reason"]),
            (
                &Value::from("undelivered"),
                *id,
                &Value::from("bob"),
                &Value::from("expired")
            ),
            "{o}"
        );
    }
    assert!(
        took >= ttl - Duration::from_millis(100),
        "expired after {took:?}, before the time to live of {ttl:?}"
    );

    let mut bob = restart(&bob, &reg, &[]);
    alice.expect("bob back", LONG, is("joined", "name", "bob"));
    // The link works: what bob shows now comes, and nothing before it.
    alice.say("/msg bob after the expiry");
    let first = bob.expect_event("message", LONG);
    assert_eq!(first["text"], "after the expiry", "{first}");
    alice.expect("the delivery", LONG, is("delivered", "to", "bob"));
    let _ = bob.try_expect(QUIET, |v| v["event"] == "message");
    assert_eq!(
        bob.count(|v| v["event"] == "message"),
        1,
        "bob showed an expired message: {:?}",
        bob.seen
    );
    let after: Vec<&Value> = outcomes(&alice.seen)
        .into_iter()
        .filter(|o| ids.contains(&id_of(o)))
        .collect();
    assert_eq!(after.len(), ids.len(), "one outcome each: {after:?}");
}

#[test]
fn a_name_back_with_another_key_gets_nothing_that_waited_for_the_old_one() {
    // bob's name is kept for his key this long after he leaves; a new key
    // can take it after.
    let grace = Duration::from_secs(1);
    let reg = Registry::start(&["--name-grace", "1s"]);
    let mut peers = start_peers(&reg, &[("alice", &[]), ("bob", &[])]);
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    let old_key = bob.key();
    pinned_then_away(&mut alice, &mut bob);

    let texts: Vec<String> = (1..=3).map(|i| format!("for the old bob {i}")).collect();
    let ids = send_to_absent_bob(&mut alice, &texts);
    thread::sleep(grace + Duration::from_millis(500));

    let mut impostor = PeerProc::start("bob", reg.addr);
    impostor.registered();
    assert_ne!(impostor.key(), old_key, "a fresh data directory, a new key");
    let mut failed = Vec::new();
    let all = read_until(&mut alice, LONG, |v| {
        if v["event"] == "delivered" || v["event"] == "undelivered" {
            failed.push(v.clone());
        }
        failed.len() == ids.len()
    });
    assert!(
        all,
        "alice: only {failed:?} within {LONG:?}; saw {:?}",
        alice.seen
    );
    for (o, id) in failed.iter().zip(&ids) {
        assert_eq!(
            (&o["event"], id_of(o), &o["to"], &o["reason"]),
            (
                &Value::from("undelivered"),
                *id,
                &Value::from("bob"),
                &Value::from("key_mismatch")
            ),
            "{o}"
        );
    }
    assert!(
        alice
            .seen
            .iter()
            .any(|v| v["event"] == "error" && v["code"] == "key_mismatch"),
        "alice says the pinned key differs: {:?}",
        alice.seen
    );
    // And what is sent now is refused at once, not handed to the new key.
    alice.say("/msg bob are you still bob?");
    let id = id_of(&alice.expect_event("sent", LONG));
    let refused = alice.expect("the refusal", LONG, |v| {
        v["event"] == "undelivered" && v["id"] == id
    });
    assert_eq!(refused["reason"], "key_mismatch", "{refused}");
    let shown = impostor.try_expect(QUIET, |v| v["event"] == "message");
    assert!(shown.is_err(), "the new bob was shown {shown:?}");
    let delivered = alice.count(|v| v["event"] == "delivered");
    assert_eq!(
        delivered, 1,
        "only the first, to the old bob: {:?}",
        alice.seen
    );
}

// ---------------------------------------------------------------------------
// Store files the peer must refuse
// ---------------------------------------------------------------------------

/// A registry address nobody listens on: the store is opened before the
/// registry is dialed, so none is needed to be refused.
fn dead_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

/// The store a peer named `name` keeps in `data` by default.
fn store_path(data: &DataDir, name: &str) -> PathBuf {
    data.peer_key_file(name).with_extension("db")
}

/// Runs a peer that must refuse its store at `path`: status 2, promptly,
/// saying why on stderr and naming the file, and leaving it as it was.
/// Returns what it said.
fn refuses(data: &DataDir, name: &str, extra: &[&str], path: &Path) -> String {
    let before = std::fs::read(path).unwrap();
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    let started = Instant::now();
    let mut p = PeerProc::start_again(data, name, &dead_registry(), extra);
    let status = p.proc.wait_exit(Duration::from_secs(5));
    let took = started.elapsed();
    let shown = path.display().to_string();
    assert!(
        p.proc.stderr.wait_for(&shown, LONG),
        "stderr does not name {shown}: {:?}",
        p.proc.stderr.snapshot()
    );
    let stderr = p.proc.stderr.snapshot().join("\n");
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(2)),
        "exit status after {took:?}; stderr {stderr}"
    );
    p.drain_until_exit(LONG);
    let error = p.seen.iter().find(|v| v["event"] == "error");
    assert_eq!(
        error.map(|e| &e["code"]),
        Some(&Value::from("store")),
        "{:?}",
        p.seen
    );
    assert!(
        std::fs::read(path).unwrap() == before,
        "{shown} was changed"
    );
    assert_eq!(
        std::fs::metadata(path).unwrap().permissions().mode(),
        mode,
        "{shown}: its mode was changed"
    );
    stderr
}

/// A store as a peer leaves it: started once (no registry needed), then
/// quit.
fn made_store(name: &str) -> (DataDir, PathBuf) {
    let data = DataDir::fresh();
    let mut p = PeerProc::start_again(&data, name, &dead_registry(), &[]);
    p.key();
    p.close_input();
    let status = p.proc.wait_exit(LONG);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{:?}", p.seen);
    let path = store_path(&data, name);
    assert!(path.is_file(), "no store at {}", path.display());
    (data, path)
}

#[test]
fn a_store_that_is_not_ours_is_refused_and_left_alone() {
    // Garbage bytes where the store should be.
    let data = DataDir::fresh();
    let path = store_path(&data, "alice");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = refuses(&data, "alice", &[], &path);
    assert!(said.contains("not a peerchat store"), "{said}");

    // A store others may write.
    let (data, path) = made_store("alice");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let said = refuses(&data, "alice", &[], &path);
    assert!(said.contains("writable by nobody else"), "{said}");

    // Another identity's store, named with --store.
    // Bound: its directory goes when it is dropped.
    let (_theirs, path) = made_store("alice");
    let other = DataDir::fresh();
    let store = path.to_str().unwrap();
    let said = refuses(&other, "alice", &["--store", store], &path);
    assert!(said.contains("belongs to key"), "{said}");

    // Another user's store: only root can make one.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let (data, path) = made_store("alice");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let said = refuses(&data, "alice", &[], &path);
        assert!(said.contains("owner 65534"), "{said}");
    } else {
        eprintln!("not root: the store of another user is not tried");
    }
}

#[test]
fn a_store_in_use_by_a_running_peer_is_refused_and_left_alone() {
    let registry = dead_registry();
    let mut first = PeerProc::start_with("alice", &registry, &[]);
    first.key(); // Said once the store is open.
    let path = store_path(&first.data, "alice");
    let store = path.to_str().unwrap();
    // The same key, as a second copy of the same user would have it.
    let said = refuses(&first.data, "alice", &["--store", store], &path);
    assert!(said.contains("in use"), "{said}");

    // The first one never noticed.
    assert!(
        first.proc.child.try_wait().unwrap().is_none(),
        "the first peer exited"
    );
    first.say("/history");
    let history = first.expect_event("history", LONG);
    assert_eq!(history["messages"], serde_json::json!([]), "{history}");
    first.close_input();
    assert_eq!(first.proc.wait_exit(LONG).and_then(|s| s.code()), Some(0));
}

// ---------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------

/// One run's exchange: each side says one word to everyone and one to the
/// other alone, every message shown and delivered before the next.
fn exchange(alice: &mut PeerProc, bob: &mut PeerProc, run: usize) {
    let steps = [
        (true, false, format!("apple to all from alice run {run}")),
        (false, false, format!("pear to all from bob run {run}")),
        (true, true, format!("apple to bob from alice run {run}")),
        (false, true, format!("plum to alice from bob run {run}")),
    ];
    for (from_alice, direct, text) in steps {
        let (sender, receiver, to) = if from_alice {
            (&mut *alice, &mut *bob, "bob")
        } else {
            (&mut *bob, &mut *alice, "alice")
        };
        if direct {
            sender.say(&format!("/msg {to} {text}"));
        } else {
            sender.say(&text);
        }
        let id = id_of(&sender.expect_event("sent", LONG));
        let shown = receiver.expect("the message", LONG, is("message", "text", &text));
        assert_eq!(
            (id_of(&shown), &shown["direct"]),
            (id, &Value::from(direct))
        );
        sender.expect("the delivery", LONG, |v| {
            v["event"] == "delivered" && v["id"] == id
        });
    }
}

/// The `(from, outgoing, with, text, targets)` of each message of a
/// `history` or `search` answer, and its ids.
type Row = (String, bool, Option<String>, String, Value);

fn rows(answer: &Value) -> (Vec<Row>, Vec<u64>) {
    let messages = answer["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {answer}"));
    let rows = messages
        .iter()
        .map(|m| {
            (
                m["from"].as_str().expect("from").to_string(),
                m["outgoing"].as_bool().expect("outgoing"),
                m["with"].as_str().map(str::to_string),
                m["text"].as_str().expect("text").to_string(),
                m["targets"].clone(),
            )
        })
        .collect();
    (rows, messages.iter().map(id_of).collect())
}

#[test]
fn history_and_search_cover_every_run() {
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &[("alice", &[]), ("bob", &[])]);
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    exchange(&mut alice, &mut bob, 1);
    for run in 2..=3 {
        // Both ways of leaving cleanly: /quit, and the end of input.
        if run == 2 {
            quit(&mut alice);
            quit(&mut bob);
        } else {
            for p in [&mut alice, &mut bob] {
                p.close_input();
                assert_eq!(p.proc.wait_exit(LONG).and_then(|s| s.code()), Some(0));
                p.drain_until_exit(LONG);
            }
        }
        alice = restart(&alice, &reg, &[]);
        bob = restart(&bob, &reg, &[]);
        alice.expect("bob back", LONG, is("joined", "name", "bob"));
        exchange(&mut alice, &mut bob, run);
    }

    let delivered = serde_json::json!([{"to": "bob", "state": "delivered"}]);
    let to_alice = serde_json::json!([{"to": "alice", "state": "delivered"}]);
    let ours = |text: String, with: Option<&str>| {
        (
            "alice".to_string(),
            true,
            with.map(str::to_string),
            text,
            delivered.clone(),
        )
    };
    let theirs = |text: String, with: Option<&str>| {
        (
            "bob".to_string(),
            false,
            with.map(str::to_string),
            text,
            Value::Null,
        )
    };

    alice.say("/history");
    let answer = alice.expect_event("history", LONG);
    assert_eq!(answer.get("with"), None, "{answer}");
    let (got, ids) = rows(&answer);
    let want: Vec<Row> = (1..=3)
        .flat_map(|run| {
            [
                ours(format!("apple to all from alice run {run}"), None),
                theirs(format!("pear to all from bob run {run}"), None),
            ]
        })
        .collect();
    assert_eq!(got, want, "everyone's conversation over three runs");
    let own: Vec<u64> = ids.iter().step_by(2).copied().collect();
    assert!(
        own.windows(2).all(|w| w[0] < w[1]),
        "alice's ids go on increasing across restarts: {own:?}"
    );

    alice.say("/history bob");
    let answer = alice.expect_event("history", LONG);
    assert_eq!(answer["with"], "bob", "{answer}");
    let want: Vec<Row> = (1..=3)
        .flat_map(|run| {
            [
                ours(format!("apple to bob from alice run {run}"), Some("bob")),
                theirs(format!("plum to alice from bob run {run}"), Some("bob")),
            ]
        })
        .collect();
    assert_eq!(
        rows(&answer).0,
        want,
        "the direct conversation over three runs"
    );

    alice.say("/search APPLE");
    let answer = alice.expect_event("search", LONG);
    let want: Vec<Row> = (1..=3)
        .flat_map(|run| {
            [
                ours(format!("apple to all from alice run {run}"), None),
                ours(format!("apple to bob from alice run {run}"), Some("bob")),
            ]
        })
        .collect();
    assert_eq!(
        rows(&answer).0,
        want,
        "every apple, any case, both conversations"
    );

    // The other side kept its own, sent and received, across its runs.
    bob.say("/search plum");
    let answer = bob.expect_event("search", LONG);
    let want: Vec<Row> = (1..=3)
        .map(|run| {
            (
                "bob".to_string(),
                true,
                Some("alice".to_string()),
                format!("plum to alice from bob run {run}"),
                to_alice.clone(),
            )
        })
        .collect();
    assert_eq!(
        rows(&answer).0,
        want,
        "bob's direct messages over three runs"
    );
    bob.say("/history alice");
    let answer = bob.expect_event("history", LONG);
    let received: Vec<String> = rows(&answer)
        .0
        .into_iter()
        .filter(|r| !r.1)
        .map(|r| r.3)
        .collect();
    let want: Vec<String> = (1..=3)
        .map(|run| format!("apple to bob from alice run {run}"))
        .collect();
    assert_eq!(
        received, want,
        "what bob received from alice over three runs"
    );
}
