//! History and search across restarts.

use super::*;

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
