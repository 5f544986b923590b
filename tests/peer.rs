//! The real `peer --json` processes with a real registry on 127.0.0.1:
//! delivery and acks, faults, and the exit contract.

use std::process::Command;

use peerchat_testkit::bins::bin;
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use serde_json::Value;

/// Starts peers one after another, each registered before the next.
fn start_peers(reg: &Registry, names: &[&str]) -> Vec<PeerProc> {
    let mut peers: Vec<PeerProc> = Vec::new();
    for name in names {
        let mut p = PeerProc::start(name, reg.addr);
        let registered = p.registered();
        let key = p.key().to_string();
        assert_eq!(registered["key"], key.as_str(), "{name}: its own key");
        // Everyone already online, with the key each proved.
        let listed: Vec<(String, String)> = registered["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["key"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = peers
            .iter()
            .map(|e| (e.name.clone(), e.key().to_string()))
            .collect();
        assert_eq!(listed, want, "{name}: the peers listed at registration");
        for earlier in peers.iter_mut() {
            let joined = earlier.expect("joined", LONG, is("joined", "name", name));
            assert_eq!(joined["key"], key.as_str(), "the key that joined");
        }
        peers.push(p);
    }
    peers
}

#[test]
fn one_to_one_and_to_all_with_acks() {
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &["alice", "bob", "carol"]);
    let keys: Vec<String> = peers.iter().map(|p| p.key().to_string()).collect();
    // Nothing linked yet, so nothing pinned yet.
    peers[0].say("/whois BOB");
    let whois = peers[0].expect_event("whois", LONG);
    assert_eq!(
        (&whois["name"], &whois["key"], &whois["pinned"]),
        (
            &Value::from("bob"),
            &Value::from(keys[1].as_str()),
            &Value::from(false)
        )
    );
    let text = "héllo 世界 🎉 \"quoted\" back\\slash";
    peers[0].say(text);
    let sent = peers[0].expect_event("sent", LONG);
    let id = sent["id"].clone();
    let mut to: Vec<String> = sent["to"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    to.sort();
    assert_eq!(to, vec!["bob", "carol"]);
    for p in peers[1..].iter_mut() {
        let msg = p.expect_event("message", LONG);
        assert_eq!(msg["from"], "alice");
        assert_eq!(msg["text"], text);
        assert_eq!(msg["direct"], false);
        assert_eq!(msg["id"], id);
    }
    // Deliveries come in whatever order the acks do.
    let mut delivered_to = Vec::new();
    for _ in 0..2 {
        let d = peers[0].expect_event("delivered", LONG);
        assert_eq!(d["id"], id);
        delivered_to.push(d["to"].as_str().unwrap().to_string());
    }
    delivered_to.sort();
    assert_eq!(delivered_to, vec!["bob", "carol"]);
    // A link pins the key it proved, on both ends, in known_peers.
    peers[0].say("/whois bob");
    let whois = peers[0].expect_event("whois", LONG);
    assert_eq!(whois["pinned"], true, "{whois}");
    let pins = peers[0].data.known_peers_text();
    assert!(pins.contains(&format!("peer bob {}", keys[1])), "{pins}");
    assert!(pins.contains(&format!("peer carol {}", keys[2])), "{pins}");
    assert!(
        pins.contains(&format!("registry {} {}", reg.addr, reg.key)),
        "{pins}"
    );
    let pins = peers[1].data.known_peers_text();
    assert!(pins.contains(&format!("peer alice {}", keys[0])), "{pins}");

    peers[1].say("/msg CAROL just you");
    let sent = peers[1].expect_event("sent", LONG);
    assert_eq!(sent["to"], serde_json::json!(["carol"]));
    let msg = peers[2].expect_event("message", LONG);
    assert_eq!(
        (msg["from"].as_str(), msg["direct"].as_bool()),
        (Some("bob"), Some(true))
    );
    peers[1].expect_event("delivered", LONG);

    peers[2].say("/peers");
    let list = peers[2].expect_event("peers", LONG);
    let names: Vec<(&str, &str)> = list["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        vec![("alice", keys[0].as_str()), ("bob", keys[1].as_str())]
    );
    peers[2].say("/msg nobody hi");
    assert_eq!(peers[2].expect_event("error", LONG)["code"], "unknown_peer");
    peers[2].say("/frobnicate");
    assert_eq!(
        peers[2].expect_event("error", LONG)["code"],
        "unknown_command"
    );
    // Nothing arrived twice.
    assert_eq!(peers[1].count(|v| v["event"] == "message"), 1);
}

#[test]
fn quit_leaves_and_exits_zero_and_end_of_input_too() {
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &["alice", "bob"]);
    peers[1].say("/quit");
    peers[0].expect("left", LONG, is("left", "reason", "quit"));
    assert_eq!(peers[1].proc.wait_exit(LONG).unwrap().code(), Some(0));
    peers[0].close_input();
    assert_eq!(peers[0].proc.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn lines_piped_at_start_wait_for_the_registration() {
    let reg = Registry::start(&[]);
    let mut bob = start_peers(&reg, &["bob"]).remove(0);
    // As in `printf '...' | peer ...`: everything is there before the
    // peer has even reached the registry.
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.say("/msg bob early bird\nhello everyone");
    alice.close_input();
    alice.drain_until_exit(LONG);
    assert_eq!(alice.proc.wait_exit(LONG).unwrap().code(), Some(0));
    let events: Vec<&str> = alice
        .seen
        .iter()
        .filter_map(|v| v["event"].as_str())
        .filter(|e| !matches!(*e, "joined" | "left" | "reachable"))
        .collect();
    let count = |what: &str| events.iter().filter(|e| **e == what).count();
    assert_eq!(events.first(), Some(&"registered"), "{:?}", alice.seen);
    assert_eq!(
        (count("sent"), count("delivered"), events.len()),
        (2, 2, 5),
        "both sent and delivered, nothing else: {:?}",
        alice.seen
    );
    let first = bob.expect_event("message", LONG);
    assert_eq!(
        (first["text"].as_str(), first["direct"].as_bool()),
        (Some("early bird"), Some(true))
    );
    let second = bob.expect_event("message", LONG);
    assert_eq!(second["text"], "hello everyone");
}

#[test]
fn a_taken_or_bad_name_exits_with_status_2() {
    let reg = Registry::start(&[]);
    let _alice = start_peers(&reg, &["alice"]);
    let mut dup = PeerProc::start("ALICE", reg.addr);
    assert_eq!(dup.expect_event("error", LONG)["code"], "name_taken");
    assert_eq!(dup.proc.wait_exit(LONG).unwrap().code(), Some(2));
    let mut bad = PeerProc::start("has space", reg.addr);
    assert_eq!(bad.expect_event("error", LONG)["code"], "bad_name");
    assert_eq!(bad.proc.wait_exit(LONG).unwrap().code(), Some(2));
    // Refused before anything starts: a dash is not taken for a flag.
    for (name, code) in [
        ("-dash", "bad_name"),
        ("a,b", "bad_name"),
        ("/slash", "bad_name"),
        ("\u{430}lice", "name_confusable"),
    ] {
        let mut bad = PeerProc::start(name, reg.addr);
        assert_eq!(bad.expect_event("error", LONG)["code"], code, "{name}");
        assert_eq!(bad.proc.wait_exit(LONG).unwrap().code(), Some(2), "{name}");
    }
    // A look-alike of a name online is the registry's refusal.
    let mut alike = PeerProc::start("a1ice", reg.addr);
    assert_eq!(alike.expect_event("error", LONG)["code"], "name_confusable");
    assert_eq!(alike.proc.wait_exit(LONG).unwrap().code(), Some(2));
    let data = DataDir::fresh();
    let out = Command::new(bin("peer"))
        .args(["--name", "x"])
        .env("XDG_DATA_HOME", data.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing --registry is a usage error"
    );
}

#[test]
fn a_burst_of_5000_arrives_in_order_exactly_once() {
    let reg = Registry::start(&[]);
    let mut peers = start_peers(&reg, &["alice", "bob"]);
    let mut script = String::new();
    for i in 0..5000 {
        script.push_str(&format!("/msg bob n{i}\n"));
    }
    peers[0].say(script.trim_end());
    let mut got = Vec::with_capacity(5000);
    while got.len() < 5000 {
        let m = peers[1].expect_event("message", LONG);
        got.push(m["text"].as_str().unwrap().to_string());
    }
    let expected: Vec<String> = (0..5000).map(|i| format!("n{i}")).collect();
    assert_eq!(got, expected);
    let mut delivered = 0;
    while delivered < 5000 {
        peers[0].expect_event("delivered", LONG);
        delivered += 1;
    }
}
