//! Pins: a peer's `known_peers` catches a registry that lies about a key or
//! is not the one pinned.

use std::time::Duration;

use peerchat_core::identity::Identity;
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;

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
