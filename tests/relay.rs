//! Real `peer --json` processes that nobody can dial, on loopback: each
//! listens on an address of its own (127.0.0.2, 127.0.0.3), while the
//! registry lists the address it observes (127.0.0.1), where nothing
//! listens: the situation of a peer behind a NAT. Their links go through
//! the registry's relay, still end to end encrypted, or are dialed back by
//! a peer that can be dialed.

use std::fs;
use std::time::{Duration, Instant};

use peerchat_testkit::launch::{can_be_dialed, is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;

fn undialable(name: &str, reg: &Registry, ip: &str, extra: &[&str]) -> PeerProc {
    let listen = format!("{ip}:0");
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(extra);
    let mut peer = PeerProc::start_with(name, &reg.addr.to_string(), &args);
    peer.registered();
    peer
}

#[test]
fn peers_nobody_can_dial_chat_through_the_relay() {
    let reg = Registry::start(&[]);
    let mut alice = undialable("alice", &reg, "127.0.0.2", &[]);
    let mut bob = undialable("bob", &reg, "127.0.0.3", &[]);
    let mut carol = PeerProc::start("carol", reg.addr);
    carol.registered();
    for p in [&mut alice, &mut bob] {
        p.expect("carol joined", LONG, is("joined", "name", "carol"));
    }
    // The registry's probes find who can be dialed (in carol's welcome, or
    // soon after).
    let mut listed = Vec::new();
    for _ in 0..50 {
        carol.say("/peers");
        let peers = carol.expect_event("peers", LONG);
        listed = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["reachable"].as_bool(),
                )
            })
            .collect::<Vec<_>>();
        if listed.iter().all(|(_, r)| r.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        listed,
        [
            ("alice".to_string(), Some(false)),
            ("bob".to_string(), Some(false))
        ]
    );
    alice.say("/msg bob through the registry");
    bob.expect(
        "the message",
        LONG,
        is("message", "text", "through the registry"),
    );
    alice.expect("delivered", LONG, is("delivered", "to", "bob"));
    bob.say("/msg alice and back");
    alice.expect("the answer", LONG, is("message", "text", "and back"));
    bob.expect("delivered", LONG, is("delivered", "to", "alice"));
    carol.say("to everyone");
    for p in [&mut alice, &mut bob] {
        p.expect(
            "carol's message",
            LONG,
            is("message", "text", "to everyone"),
        );
    }
    let mut reached: Vec<String> = (0..2)
        .map(|_| carol.expect_event("delivered", LONG)["to"].to_string())
        .collect();
    reached.sort();
    assert_eq!(reached, ["\"alice\"", "\"bob\""]);
    alice.say("/whois bob");
    let whois = alice.expect_event("whois", LONG);
    assert_eq!(whois["link"], "relayed", "{whois}");
    carol.say("/whois alice");
    let whois = carol.expect_event("whois", LONG);
    assert_eq!(whois["link"], "reversed", "carol was dialed back: {whois}");
}

#[test]
fn a_file_goes_whole_through_the_relay() {
    let reg = Registry::start(&[]);
    let mut alice = undialable("alice", &reg, "127.0.0.2", &[]);
    let mut bob = undialable("bob", &reg, "127.0.0.3", &["--accept-files-from", "alice"]);
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    let files = DataDir::fresh();
    // Larger than the registry's window per direction, and than one
    // relayed frame, many times over.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let source = files.path().join("big.bin");
    fs::write(&source, &data).unwrap();
    alice.say(&format!("/send bob {}", source.display()));
    let done = bob.expect(
        "file_done",
        Duration::from_secs(60),
        is("file_done", "direction", "in"),
    );
    let saved = done["path"].as_str().expect("a path");
    assert!(fs::read(saved).unwrap() == data, "the file arrived whole");
}

#[test]
fn without_a_relay_only_peers_that_can_be_dialed_reach_those_that_cannot() {
    let reg = Registry::start(&["--no-relay"]);
    let mut alice = undialable("alice", &reg, "127.0.0.2", &[]);
    let mut bob = undialable("bob", &reg, "127.0.0.3", &[]);
    let mut carol = PeerProc::start("carol", reg.addr);
    carol.registered();
    carol.expect("that others can dial her", LONG, can_be_dialed);
    carol.say("/msg bob dialed back");
    bob.expect("the message", LONG, is("message", "text", "dialed back"));
    carol.expect("delivered", LONG, is("delivered", "to", "bob"));

    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    let sent = Instant::now();
    alice.say("/msg bob hello?");
    let outcome = alice.expect("the outcome", LONG, |e| {
        e["event"] == "undelivered" || e["event"] == "delivered"
    });
    assert_eq!(outcome["event"], "undelivered", "{outcome}");
    assert_eq!(outcome["reason"], "unreachable", "{outcome}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}
