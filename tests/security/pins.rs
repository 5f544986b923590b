//! Pins: a peer's `known_peers` catches a registry that lies about a key or
//! is not the one pinned.

use std::sync::atomic::Ordering;
use std::time::Duration;

use peerchat_core::identity::Identity;
use peerchat_core::protocol::PeerEntry;
use peerchat_testkit::fake::{FakeRegistry, Script};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use serde_json::Value;

#[test]
fn a_registry_that_lies_about_a_key_is_caught_by_the_pin() {
    let reg = Registry::start(&[]);
    let mut bob = PeerProc::start("bob", reg.addr);
    let bob_addr = bob.registered()["addr"].as_str().unwrap().to_string();
    let bob_key = bob.key();
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.registered();
    alice.say("/msg bob hello bob");
    bob.expect("the message", LONG, is("message", "text", "hello bob"));
    alice.expect_event("delivered", LONG);
    let pins = alice.data.known_peers_text();
    assert!(
        pins.contains(&format!("peer bob {bob_key}")),
        "alice pinned bob's key: {pins}"
    );
    alice.say("/quit");
    assert_eq!(alice.proc.wait_exit(LONG).unwrap().code(), Some(0));

    // A registry that lists bob, at his address, under another key.
    let wrong = Identity::generate().public();
    let fake = FakeRegistry::start(Script {
        peers: vec![PeerEntry {
            name: "bob".into(),
            addr: bob_addr.clone(),
            key: wrong,
        }],
    });
    let mut alice = PeerProc::start_again(&alice.data, "alice", &fake.addr.to_string(), &[]);
    let registered = alice.registered();
    assert_eq!(registered["peers"][0]["key"], wrong.to_string().as_str());
    // Said as the welcome is read, maybe before `registered`.
    let mismatch = is("error", "code", "key_mismatch");
    let err = match alice.seen.iter().find(|v| mismatch(v)).cloned() {
        Some(err) => err,
        None => alice.expect("a key mismatch", LONG, mismatch),
    };
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains(&wrong.to_string()) && message.contains(&bob_key.to_string()),
        "the error names both keys: {message}"
    );
    alice.say("/msg bob are you really bob?");
    let id = alice.expect_event("sent", LONG)["id"].clone();
    let undelivered = alice.expect_event("undelivered", LONG);
    assert_eq!(undelivered["id"], id);
    assert_eq!(undelivered["reason"], "key_mismatch");
    alice.say("/whois bob");
    let whois = alice.expect_event("whois", LONG);
    assert_eq!(
        (&whois["key"], &whois["pinned"]),
        (&Value::from(wrong.to_string()), &Value::from(false))
    );
    assert_eq!(
        bob.count(|v| v["event"] == "message"),
        1,
        "nothing more reached bob"
    );
    // Alice trusted the fake registry on first use (a registry she never
    // met); it is bob's pin that caught the lie.
    let pins = alice.data.known_peers_text();
    assert!(
        pins.contains(&format!("registry {} {}", fake.addr, fake.key)),
        "{pins}"
    );
    assert_eq!(
        pins.matches("peer bob ").count(),
        1,
        "the lie was not pinned: {pins}"
    );
    assert!(fake.registrations.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_registry_whose_key_is_not_the_pinned_one_is_not_registered_with() {
    // --registry-key that is not the registry's.
    let reg = Registry::start(&[]);
    let wrong = Identity::generate().public().to_string();
    let mut carol =
        PeerProc::start_with("carol", &reg.addr.to_string(), &["--registry-key", &wrong]);
    let err = carol.expect("a key mismatch", LONG, is("error", "code", "key_mismatch"));
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains(&reg.key.to_string()),
        "{err}"
    );
    let registered = carol.try_expect(Duration::from_secs(1), |v| v["event"] == "registered");
    assert!(
        registered.is_err(),
        "carol registered anyway: {registered:?}"
    );
    assert!(
        !reg.proc.stderr.contains("joined name=carol"),
        "the registry never heard her register"
    );
    // The right one is fine.
    let key = reg.key.to_string();
    let mut dave = PeerProc::start_with("dave", &reg.addr.to_string(), &["--registry-key", &key]);
    dave.registered();
    assert_eq!(
        dave.data.known_peers_text(),
        format!("registry {} {key}\n", reg.addr),
        "and pinned, so later runs need no --registry-key"
    );

    // The registry at a pinned address comes back with another key.
    let data = DataDir::fresh();
    let first = Registry::start_in(&data, "127.0.0.1:0", &[]);
    let addr = first.addr.to_string();
    let mut erin = PeerProc::start("erin", first.addr);
    erin.registered();
    let first_key = first.key;
    drop(first);
    erin.expect_event("registry_lost", LONG);
    let other = Registry::start_on(&addr, &[]);
    let err = erin.expect("a key mismatch", LONG, is("error", "code", "key_mismatch"));
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains(&other.key.to_string()),
        "{err}"
    );
    let message = err["message"].as_str().unwrap();
    let pin = format!("registry {addr} {}", first_key);
    assert!(
        message.contains(&format!(
            "delete the line \"{pin}\" from {}",
            erin.data.known_peers().display()
        )),
        "the hint names the file and the line: {message}"
    );
    // It stops instead of retrying forever, and never registers there.
    let status = erin.proc.wait_exit(LONG).expect("erin exits");
    assert_eq!(status.code(), Some(2));
    assert!(!other.proc.stderr.contains("joined name=erin"));

    // A --registry-key the registry does not prove, on a first start, is a
    // stop too, with the flag to give instead.
    let status = carol.proc.wait_exit(LONG).expect("carol exits");
    assert_eq!(status.code(), Some(2));
    assert!(err_text(&carol).contains(&format!("--registry-key {}", reg.key)));
}

/// The message of the first `error` a peer printed.
fn err_text(peer: &PeerProc) -> String {
    let error = peer.seen.iter().find(|v| v["event"] == "error");
    error.map_or(String::new(), |v| {
        v["message"].as_str().unwrap_or("").to_string()
    })
}
