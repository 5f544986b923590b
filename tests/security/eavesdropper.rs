//! An eavesdropper on the registry and link paths: a recording relay in
//! front of each sees only ciphertext.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;

use peerchat_testkit::fake::Relay;
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A relay listening on 127.0.0.1:P for a peer that listens on 127.0.0.2:P:
/// the registry sees the peer come from 127.0.0.1 and lists it there, so
/// everyone who links to the peer goes through the relay.
fn peer_behind_relay(name: &str, registry: &str) -> (PeerProc, Relay) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = front.local_addr().unwrap().port();
    let back: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let relay = Relay::start(front, back);
    let listen = back.to_string();
    let peer = PeerProc::start_with(name, registry, &["--listen", &listen]);
    (peer, relay)
}

#[test]
fn an_eavesdropper_on_the_registry_and_link_paths_learns_nothing() {
    if TcpListener::bind("127.0.0.2:0").is_err() {
        eprintln!("skipped: 127.0.0.2 is not a local address here");
        return;
    }
    let reg = Registry::start(&[]);
    let to_registry = Relay::to(reg.addr);
    let via = to_registry.addr.to_string();
    // Names long enough that no ciphertext holds them by chance.
    let (mut alice, alice_link) = peer_behind_relay("alice-7f3a9c", &via);
    let registered = alice.registered();
    assert_eq!(
        registered["addr"],
        alice_link.addr.to_string().as_str(),
        "alice is listed at her relay"
    );
    let (mut bob, bob_link) = peer_behind_relay("bob-7f3a9c", &via);
    bob.registered();
    alice.expect("bob joined", LONG, is("joined", "name", "bob-7f3a9c"));

    let secret_broadcast = "MARKER-7f3a9c broadcast: the vault code is 4-8-15-16";
    let secret_direct = "MARKER-7f3a9c direct: meet at the old mill";
    alice.say(secret_broadcast);
    bob.expect(
        "the broadcast",
        LONG,
        is("message", "text", secret_broadcast),
    );
    alice.expect_event("delivered", LONG);
    bob.say(&format!("/msg alice-7f3a9c {secret_direct}"));
    alice.expect(
        "the direct message",
        LONG,
        is("message", "text", secret_direct),
    );
    bob.expect_event("delivered", LONG);

    // Real traffic went through every relay.
    assert!(
        to_registry.connections.load(Ordering::Relaxed) >= 2,
        "both peers registered through the relay"
    );
    assert!(
        bob_link.connections.load(Ordering::Relaxed) >= 1
            && alice_link.connections.load(Ordering::Relaxed) >= 1,
        "both links went through the relays"
    );
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("the broadcast", secret_broadcast.as_bytes().to_vec()),
        ("the direct message", secret_direct.as_bytes().to_vec()),
        ("the marker", b"MARKER-7f3a9c".to_vec()),
        ("alice's name", b"alice-7f3a9c".to_vec()),
        ("bob's name", b"bob-7f3a9c".to_vec()),
        ("the CBOR key register", b"register".to_vec()),
        ("the CBOR key welcome", b"welcome".to_vec()),
        ("the CBOR key update", b"update".to_vec()),
        ("the CBOR key hello", b"hello".to_vec()),
        ("the CBOR key chat", b"chat".to_vec()),
        ("the CBOR key text", b"text".to_vec()),
        ("alice's key", alice.key().as_bytes().to_vec()),
        ("bob's key", bob.key().as_bytes().to_vec()),
        ("the registry's key", reg.key.as_bytes().to_vec()),
        (
            "alice's key in base64",
            alice.key().to_string().into_bytes(),
        ),
        ("bob's key in base64", bob.key().to_string().into_bytes()),
    ];
    for (relay, path) in [
        (&to_registry, "registry"),
        (&alice_link, "link to alice"),
        (&bob_link, "link to bob"),
    ] {
        let streams = relay.recorded();
        let total: usize = streams.iter().map(Vec::len).sum();
        eprintln!(
            "[eavesdropper] {path}: {} streams, {total} bytes",
            streams.len()
        );
        assert!(
            total > 200,
            "{path}: the relay carried real traffic ({total} bytes)"
        );
        for s in streams.iter().filter(|s| !s.is_empty()) {
            // Every connection starts with a Noise message of 32 bytes: the
            // dialer's ephemeral key, the only thing sent in the clear.
            if s.len() >= 34 && s[..2] == [0, 32] {
                continue;
            }
            // The other direction starts with the answer: 32 bytes of key
            // and 48 + 16 of encrypted key and tag.
            assert_eq!(
                &s[..2],
                &[0, 96],
                "{path}: a stream that starts like a Noise handshake reply"
            );
        }
        for (what, secret) in &secrets {
            for s in &streams {
                assert!(
                    !contains(s, secret),
                    "{path}: {what} is visible on the wire"
                );
            }
        }
    }
    assert!(to_registry.bytes() > 0);
}
