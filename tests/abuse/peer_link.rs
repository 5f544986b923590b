//! The peer's listening socket: hostile bytes on a link close only that
//! link.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use peerchat_core::codec;
use peerchat_core::protocol::{LinkMsg, PROTOCOL_VERSION};
use peerchat_testkit::client::{secure, Secure};
use peerchat_testkit::launch::{PeerProc, Registry, LONG};
use serde_json::Value;

use crate::ending::{plain_attack, read_to_close, End, Finish};
use crate::system::AT_ONCE;
use crate::wire::{
    cbor_map, cbor_msg, cbor_text, cbor_uint, frame, huge_array_body, nested_arrays,
};

/// Something done to a Noise session by a test.
type SessionAct<'a> = Box<dyn Fn(&mut Secure) + 'a>;

fn link_msgs(label: &str, f: &Finish) -> Vec<LinkMsg> {
    f.frames
        .iter()
        .map(|b| {
            codec::decode::<LinkMsg>(b)
                .unwrap_or_else(|e| panic!("{label}: the peer sent an undecodable frame: {e}"))
        })
        .collect()
}

fn peer_addr(registered: &Value) -> SocketAddr {
    registered["addr"]
        .as_str()
        .expect("registered carries addr")
        .parse()
        .expect("an address")
}

fn assert_peer_alive(label: &str, p: &mut PeerProc) {
    let status = p.proc.child.try_wait().unwrap();
    assert!(
        status.is_none(),
        "{label}: the peer died ({status:?}); stderr {:?}",
        p.proc.stderr.snapshot()
    );
}

/// Bytes to a peer's listening socket; returns what it answered.
/// Frame-stream bytes inside a Noise session (under a new key) to a peer's
/// listening socket; returns what it answered.
fn link_attack(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Finish {
    link_attack_with(addr, timeout, |s| {
        let _ = s.write_plain(bytes);
    })
}

/// Does `act` on a fresh Noise session to a peer's listening socket;
/// returns what it answered.
fn link_attack_with(addr: SocketAddr, timeout: Duration, act: impl FnOnce(&mut Secure)) -> Finish {
    let mut s = secure(TcpStream::connect(addr).expect("connect to the peer"));
    s.get_ref()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    act(&mut s);
    read_to_close(&mut s, timeout)
}

/// Chat from a real second peer still arrives.
fn chat_still_arrives(label: &str, reg: &Registry, alice: &mut PeerProc) {
    let mut bob = PeerProc::start("bob", reg.addr);
    bob.registered();
    alice.expect("bob joined", LONG, |v| {
        v["event"] == "joined" && v["name"] == "bob"
    });
    bob.say("/msg alice still listening?");
    let m = alice.expect("a message", LONG, |v| v["event"] == "message");
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("bob"), Some("still listening?")),
        "{label}"
    );
    bob.expect("delivered", LONG, |v| v["event"] == "delivered");
    assert_eq!(
        alice.count(|v| v["event"] == "message"),
        1,
        "{label}: nothing from the attackers was shown"
    );
    assert_peer_alive(label, alice);
}

#[test]
fn peer_hostile_bytes_on_a_link_close_only_that_link() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let hello = |name: &str| {
        codec::encode_frame(&LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            instance: 7,
        })
        .unwrap()
        .to_vec()
    };
    let chat = codec::encode_frame(&LinkMsg::Chat {
        id: 1,
        text: "sneaky".into(),
        direct: true,
        sent_at: None,
    })
    .unwrap()
    .to_vec();
    // Answered with `error` `protocol`, then closed (PROTOCOL.md 4.2.5).
    let protocol_cases: Vec<(&str, Vec<u8>)> = vec![
        ("not CBOR", frame(&[0xff, 0xfe, 0xfd])),
        ("a bare integer", frame(&cbor_uint(5))),
        (
            "hello as text",
            frame(&cbor_map(&[("hello", cbor_text("x"))])),
        ),
        ("unknown type", frame(&cbor_msg("frobnicate", &[]))),
        ("chat before hello", chat.clone()),
        ("65,536 nested", frame(&nested_arrays(65_536))),
        (
            "17 nested",
            frame(&{
                let mut b = nested_arrays(17);
                b.push(0);
                b
            }),
        ),
        ("2^60 array", frame(&huge_array_body())),
        ("hello with its own name", hello("ALICE")),
    ];
    for (what, bytes) in &protocol_cases {
        let label = format!("peer/{what}");
        let f = link_attack(addr, bytes, Duration::from_secs(3));
        let msgs = link_msgs(&label, &f);
        assert_ne!(
            f.end,
            End::Open,
            "{label}: the link stays open; got {msgs:?}"
        );
        assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
        match msgs.as_slice() {
            [LinkMsg::Error { code, .. }] if code == "protocol" => {}
            other => panic!("{label}: expected one error \"protocol\", got {other:?}"),
        }
        assert_peer_alive(&label, &mut alice);
    }
    let bad_name = link_attack(addr, &hello("has space"), Duration::from_secs(3));
    match link_msgs("peer/bad name", &bad_name).as_slice() {
        [LinkMsg::Error { code, .. }] if code == "bad_name" && bad_name.end != End::Open => {}
        other => panic!(
            "peer/hello with a bad name: {other:?} then {:?}",
            bad_name.end
        ),
    }
    let old = codec::encode_frame(&LinkMsg::Hello {
        version: 1,
        name: "oldtimer".into(),
        instance: 7,
    })
    .unwrap();
    let old = link_attack(addr, &old, Duration::from_secs(3));
    match link_msgs("peer/version 1", &old).as_slice() {
        [LinkMsg::Error { code, .. }] if code == "unsupported_version" && old.end != End::Open => {}
        other => panic!("peer/hello of version 1: {other:?} then {:?}", old.end),
    }
    // The link proves alice's key.
    let probe = secure(TcpStream::connect(addr).unwrap());
    assert_eq!(
        probe.remote_key(),
        alice.key(),
        "the link proves alice's key"
    );
    drop(probe);
    // No Noise session: closed at once, without a word.
    plain_attack("peer/a plaintext hello", addr, &hello("bob"));
    plain_attack(
        "peer/a handshake message of 65535 bytes",
        addr,
        &[0xff, 0xff],
    );
    plain_attack(
        "peer/ASCII text",
        addr,
        b"GET / HTTP/1.1\r\nHost: alice\r\n\r\n",
    );
    // A broken Noise session: closed without a word, before or after hello.
    for after_hello in [false, true] {
        let when = if after_hello { "after" } else { "before" };
        let start = |s: &mut Secure| {
            if after_hello {
                s.write_plain(&hello("mallory")).unwrap();
            }
        };
        let cases: Vec<(&str, SessionAct)> = vec![
            (
                "a flipped bit",
                Box::new(|s: &mut Secure| {
                    let mut wire = s.seal(&chat).unwrap();
                    let at = wire.len() / 2;
                    wire[at] ^= 0x04;
                    let _ = s.get_mut().write_all(&wire);
                }),
            ),
            (
                "a replayed message",
                Box::new(|s: &mut Secure| {
                    let wire = s.seal(&chat[..2]).unwrap();
                    let _ = s.get_mut().write_all(&[&wire[..], &wire[..]].concat());
                }),
            ),
            (
                "a truncated message",
                Box::new(|s: &mut Secure| {
                    let wire = s.seal(&chat).unwrap();
                    let _ = s.get_mut().write_all(&wire[..wire.len() - 1]);
                    let _ = s.get_ref().shutdown(Shutdown::Write);
                }),
            ),
            (
                "plaintext inside",
                Box::new(|s: &mut Secure| {
                    let _ = s.get_mut().write_all(&chat);
                }),
            ),
        ];
        for (what, act) in cases {
            let label = format!("peer/{what} {when} hello");
            let f = link_attack_with(addr, Duration::from_secs(3), |s| {
                start(s);
                act(s);
            });
            let msgs = link_msgs(&label, &f);
            assert!(
                f.end != End::Open && msgs.is_empty(),
                "{label}: expected a close without a word, got {msgs:?} then {:?}",
                f.end
            );
            assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
            assert_peer_alive(&label, &mut alice);
        }
    }
    // Over the 64 KiB limit: closed; PROTOCOL.md promises frame_too_large
    // only from the registry, so the peer may close without a word.
    let too_large: Vec<(&str, Vec<u8>)> = vec![
        ("length 0xFFFFFFFF", vec![0xff; 4]),
        ("100,000 nested", frame(&nested_arrays(100_000))),
    ];
    for (what, bytes) in &too_large {
        let label = format!("peer/{what}");
        let f = link_attack(addr, bytes, Duration::from_secs(3));
        let msgs = link_msgs(&label, &f);
        eprintln!(
            "[{label}] answered {msgs:?}, then {:?} after {:?}",
            f.end, f.elapsed
        );
        assert_ne!(f.end, End::Open, "{label}: the link stays open");
        assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
        assert!(
            matches!(msgs.as_slice(), [] | [LinkMsg::Error { .. }]),
            "{label}: {msgs:?}"
        );
        if let [LinkMsg::Error { code, .. }] = msgs.as_slice() {
            assert!(
                code == "frame_too_large" || code == "protocol",
                "{label}: {code}"
            );
        }
        assert_peer_alive(&label, &mut alice);
    }
    chat_still_arrives("peer", &reg, &mut alice);
}

#[test]
fn peer_a_hello_from_a_name_nobody_registered_is_refused_after_5s() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let mut bytes = codec::encode_frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 99,
    })
    .unwrap()
    .to_vec();
    for id in 1..=3 {
        bytes.extend_from_slice(
            &codec::encode_frame(&LinkMsg::Chat {
                id,
                text: format!("held {id}"),
                direct: true,
                sent_at: None,
            })
            .unwrap(),
        );
    }
    let f = link_attack(addr, &bytes, Duration::from_secs(8));
    let msgs = link_msgs("peer/unknown hello", &f);
    eprintln!(
        "[peer/unknown hello] {msgs:?} then {:?} after {:?}",
        f.end, f.elapsed
    );
    assert_ne!(f.end, End::Open, "the link is closed");
    match msgs.as_slice() {
        [LinkMsg::Error { code, .. }] if code == "unknown_peer" => {}
        other => panic!("expected one error unknown_peer and no acks, got {other:?}"),
    }
    assert!(
        f.elapsed >= Duration::from_millis(4500) && f.elapsed < Duration::from_secs(7),
        "refused after {:?}, not about 5 s",
        f.elapsed
    );
    assert_peer_alive("peer/unknown hello", &mut alice);
    chat_still_arrives("peer/unknown hello", &reg, &mut alice);
}

/// A zero-length frame is invalid framing (PROTOCOL.md 1); on a link, an
/// undecodable frame earns `error` `protocol` (4.2, step 5), as it does at
/// the registry.
#[test]
fn peer_a_zero_length_frame_on_a_link_gets_a_protocol_error() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let label = "peer/zero-length frame";
    let f = link_attack(addr, &[0, 0, 0, 0], Duration::from_secs(3));
    let msgs = link_msgs(label, &f);
    assert_ne!(f.end, End::Open, "{label}: the link stays open");
    assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
    assert_peer_alive(label, &mut alice);
    match msgs.as_slice() {
        [LinkMsg::Error { code, .. }] if code == "protocol" => {}
        other => panic!(
            "{label}: expected one error \"protocol\" before the close, got {other:?} then {:?}",
            f.end
        ),
    }
    chat_still_arrives(label, &reg, &mut alice);
}
