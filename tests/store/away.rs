//! A target away for the whole send, past the time to live, or back with
//! another key.

use super::burst::{read_outcomes, wait_shown};
use super::*;

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
