//! Cases 1-5: hostile bytes on a registry connection.

use std::net::Shutdown;
use std::time::Duration;

use peerchat_core::codec;
use peerchat_core::protocol::{FromRegistry, LinkMsg, ToRegistry, PROTOCOL_VERSION};
use peerchat_testkit::client::{first_noise_message, register_frame, register_msg, Client};

use crate::case::Case;
use crate::ending::{finish_client, End};
use crate::wire::{
    cbor_map, cbor_msg, cbor_text, cbor_uint, claimed, frame, head, heartbeat_frame,
    huge_array_body, huge_map_in_register_body, joined, leave_frame, left, nested_arrays,
    register_raw_name,
};

#[test]
fn cbor_helpers_match_the_protocol_example() {
    assert_eq!(
        cbor_msg("heartbeat", &[]),
        [0xa1, 0x69, 0x68, 0x65, 0x61, 0x72, 0x74, 0x62, 0x65, 0x61, 0x74, 0xa0]
    );
    let ours = codec::encode(&register_msg("alice", 40123)).unwrap();
    let decoded: ToRegistry = codec::decode(&frame(&ours)[4..]).unwrap();
    let hand: ToRegistry = codec::decode(&register_raw_name(b"alice", 40123)[4..]).unwrap();
    assert_eq!(decoded, hand);
    assert_eq!(huge_array_body().len(), 100);
}

/// Case 1.
#[test]
fn registry_a_length_prefix_of_4_gib_is_frame_too_large_at_once() {
    let mut case = Case::start("case1", &[]);
    let prefix = [0xff, 0xff, 0xff, 0xff];
    case.attack(
        "ffffffff before register",
        false,
        &prefix,
        "frame_too_large",
    );
    case.attack("ffffffff after register", true, &prefix, "frame_too_large");
    // With the prefix, some body bytes: still refused on the prefix alone.
    case.attack(
        "ffffffff and a body",
        true,
        &claimed(u32::MAX, &[0xa0; 1000]),
        "frame_too_large",
    );
    case.finish();
}

/// Case 1b: bytes that are not a Noise session where one belongs. There is
/// no session to carry an error, so each is closed without a word, at once;
/// a registered victim leaves as `disconnected`.
#[test]
fn registry_broken_noise_sessions_close_only_that_connection_without_a_word() {
    let mut case = Case::start("noise", &[]);
    // Before any handshake.
    case.attack_plain("a plaintext register", &register_frame("plain", 4001));
    case.attack_plain("ASCII text", b"GET / HTTP/1.1\r\nHost: registry\r\n\r\n");
    case.attack_plain("a handshake message of 65535 bytes", &[0xff, 0xff]);
    case.attack_plain("an empty handshake message", &[0, 0]);
    // The dialer's first message twice: the registry answers the first
    // with its own handshake message, and the copy fails as the third.
    let first = first_noise_message();
    case.attack_plain(
        "the first message sent twice",
        &[&first[..], &first[..]].concat(),
    );

    for registered in [false, true] {
        let when = if registered { "after" } else { "before" };
        case.attack_session(&format!("a flipped bit {when} register"), registered, |c| {
            let mut wire = c.conn.seal(&heartbeat_frame()).unwrap();
            let last = wire.len() - 1;
            wire[last] ^= 0x80;
            let _ = c.send_wire(&wire);
        });
        case.attack_session(
            &format!("a length one short {when} register"),
            registered,
            |c| {
                let mut wire = c.conn.seal(&heartbeat_frame()).unwrap();
                wire[1] -= 1;
                let _ = c.send_wire(&wire);
            },
        );
        case.attack_session(
            &format!("a message shorter than its tag {when} register"),
            registered,
            |c| {
                let _ = c.send_wire(&[0, 3, 1, 2, 3]);
            },
        );
        case.attack_session(
            &format!("a replayed message {when} register"),
            registered,
            |c| {
                // Two bytes of a frame: harmless the first time, in any state.
                let wire = c.conn.seal(&[0, 0]).unwrap();
                let _ = c.send_wire(&[&wire[..], &wire[..]].concat());
            },
        );
        case.attack_session(
            &format!("messages out of order {when} register"),
            registered,
            |c| {
                let one = c.conn.seal(&heartbeat_frame()).unwrap();
                let two = c.conn.seal(&heartbeat_frame()).unwrap();
                let _ = c.send_wire(&[two, one].concat());
            },
        );
        case.attack_session(
            &format!("a truncated message {when} register"),
            registered,
            |c| {
                let wire = c.conn.seal(&heartbeat_frame()).unwrap();
                let _ = c.send_wire(&wire[..wire.len() - 3]);
                let _ = c.stream().shutdown(Shutdown::Write);
            },
        );
        case.attack_session(
            &format!("plaintext inside {when} register"),
            registered,
            |c| {
                let _ = c.send_wire(&heartbeat_frame());
            },
        );
    }
    case.finish();
}

/// Case 2.
#[test]
fn registry_bodies_that_are_not_our_cbor_are_protocol_errors() {
    let mut case = Case::start("case2", &[]);
    let garbage = frame(&[0xff, 0xfe, 0xfd]);
    let text = frame(b"hello, registry!");
    let wrong_shapes = [
        ("a bare integer", frame(&cbor_uint(5))),
        ("an array", frame(&[0x83, 0x01, 0x02, 0x03])),
        (
            "register as text",
            frame(&cbor_map(&[("register", cbor_text("x"))])),
        ),
        (
            "a two-entry map",
            frame(&cbor_map(&[
                ("heartbeat", cbor_map(&[])),
                ("leave", cbor_map(&[])),
            ])),
        ),
        (
            "a name of the wrong type",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_uint(5)),
                    ("port", cbor_uint(4000)),
                ],
            )),
        ),
        (
            "register without a port",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_text("nop")),
                ],
            )),
        ),
        (
            "a port as text",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_text("txt")),
                    ("port", cbor_text("4000")),
                ],
            )),
        ),
    ];
    let unknown = frame(&cbor_msg("frobnicate", &[]));
    let tagged = frame(&[0xc0, 0x60]);
    let trailing = {
        let mut body = cbor_msg("heartbeat", &[]);
        body.push(0x00);
        frame(&body)
    };
    let indefinite = frame(&[
        0xbf, 0x69, b'h', b'e', b'a', b'r', b't', b'b', b'e', b'a', b't', 0xa0, 0xff,
    ]);
    for registered in [false, true] {
        let when = if registered { "after" } else { "before" };
        case.attack(
            &format!("not CBOR {when}"),
            registered,
            &garbage,
            "protocol",
        );
        case.attack(&format!("ASCII text {when}"), registered, &text, "protocol");
        for (what, bytes) in &wrong_shapes {
            case.attack(&format!("{what} {when}"), registered, bytes, "protocol");
        }
        case.attack(
            &format!("unknown type {when}"),
            registered,
            &unknown,
            "protocol",
        );
        case.attack(&format!("a tag {when}"), registered, &tagged, "protocol");
        case.attack(
            &format!("trailing bytes {when}"),
            registered,
            &trailing,
            "protocol",
        );
        case.attack(
            &format!("indefinite map {when}"),
            registered,
            &indefinite,
            "protocol",
        );
    }
    case.finish();
}

/// Case 3.
#[test]
fn registry_empty_deep_and_huge_declared_frames_are_refused() {
    let mut case = Case::start("case3", &[]);
    let empty = [0u8, 0, 0, 0];
    case.attack("zero-length before", false, &empty, "protocol");
    case.attack("zero-length after", true, &empty, "protocol");
    // 100,000 nested arrays do not fit the 4 KiB first-frame limit...
    let deep = nested_arrays(100_000);
    case.attack(
        "100,000 nested before",
        false,
        &frame(&deep),
        "frame_too_large",
    );
    // ...nor the 64 KiB limit after registering.
    case.attack(
        "100,000 nested after",
        true,
        &frame(&deep),
        "frame_too_large",
    );
    // Limit-sized frames of nothing but nesting reach the CBOR check.
    case.attack(
        "4,096 nested before",
        false,
        &frame(&nested_arrays(4096)),
        "protocol",
    );
    case.attack(
        "60,000 nested after",
        true,
        &frame(&nested_arrays(60_000)),
        "protocol",
    );
    case.attack(
        "65,536 nested after",
        true,
        &frame(&nested_arrays(65_536)),
        "protocol",
    );
    // 17 levels is one too many; 2^60 items cannot fit 100 bytes.
    let mut seventeen = nested_arrays(17);
    seventeen.push(0x00);
    case.attack("17 nested before", false, &frame(&seventeen), "protocol");
    let huge = frame(&huge_array_body());
    case.attack("2^60 array before", false, &huge, "protocol");
    case.attack("2^60 array after", true, &huge, "protocol");
    let huge_map = frame(&huge_map_in_register_body());
    case.attack("2^60 map in register", false, &huge_map, "protocol");
    let mut huge_text = head(3, 1 << 60);
    huge_text.resize(100, 0);
    case.attack("2^60 text", false, &frame(&huge_text), "protocol");
    case.finish();
}

/// Case 4.
#[test]
fn registry_anything_but_register_first_and_register_twice_are_protocol_errors() {
    let mut case = Case::start("case4", &[]);
    let chat = frame(&cbor_msg(
        "chat",
        &[
            ("id", cbor_uint(1)),
            ("text", cbor_text("hi")),
            ("direct", vec![0xf5]),
        ],
    ));
    case.attack("chat before register", false, &chat, "protocol");
    case.attack("chat after register", true, &chat, "protocol");
    let hello = codec::encode_frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 7,
    })
    .unwrap();
    case.attack("hello before register", false, &hello, "protocol");
    case.attack(
        "heartbeat before register",
        false,
        &heartbeat_frame(),
        "protocol",
    );
    case.attack("leave before register", false, &leave_frame(), "protocol");
    // A second register on a registered connection, even for another name.
    let n = case.victims + 1;
    let first = case.attack(
        "register twice, same name",
        true,
        &register_frame(&format!("victim{n}"), 6001),
        "protocol",
    );
    case.attack(
        "register twice, new name",
        true,
        &register_frame("someone-else", 6002),
        "protocol",
    );
    // The name of the first is kept for its key after the protocol close:
    // another key is refused, the same key gets it back.
    let (mut other, reply) = Client::register(case.reg.addr, &format!("victim{n}"), 6003);
    assert!(
        matches!(&reply, FromRegistry::Error { code, .. } if code == "name_taken"),
        "the name is kept for its key through the grace period: {reply:?}"
    );
    assert_ne!(
        finish_client(&mut other, Duration::from_secs(3)).end,
        End::Open
    );
    let (mut again, welcome) =
        Client::register_as(case.reg.addr, &first, &format!("victim{n}"), 6003);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "the name is its key's again after the protocol close: {welcome:?}"
    );
    again.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut again, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected
        .push(joined(&format!("victim{n}"), 6003, first.public()));
    case.expected.push(left(&format!("victim{n}"), "quit"));
    case.finish();
}

/// Case 5.
#[test]
fn registry_bad_names_and_ports_get_their_codes() {
    let mut case = Case::start("case5", &[]);
    let reg = |name: &str, port: i64| register_frame(name, port);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty name", reg("", 4001), "bad_name"),
        ("only spaces", reg("   ", 4001), "bad_name"),
        ("33 characters", reg(&"x".repeat(33), 4001), "bad_name"),
        ("33 CJK characters", reg(&"名".repeat(33), 4001), "bad_name"),
        ("1000 characters", reg(&"y".repeat(1000), 4001), "bad_name"),
        ("a control character", reg("a\u{1}b", 4001), "bad_name"),
        ("a newline inside", reg("a\nb", 4001), "bad_name"),
        ("DEL", reg("a\u{7f}", 4001), "bad_name"),
        ("a C1 control", reg("a\u{85}b", 4001), "bad_name"),
        ("a space inside", reg("a b", 4001), "bad_name"),
        ("a NUL", reg("nul\u{0}", 4001), "bad_name"),
        (
            "invalid UTF-8",
            register_raw_name(&[b'a', 0xff, 0xfe, b'b'], 4001),
            "protocol",
        ),
        (
            "a lone surrogate (CESU)",
            register_raw_name(&[0xed, 0xa0, 0x80], 4001),
            "protocol",
        ),
        (
            "overlong UTF-8",
            register_raw_name(&[0xc0, 0xaf], 4001),
            "protocol",
        ),
        ("port 0", reg("porter", 0), "bad_port"),
        ("port 70000", reg("porter", 70_000), "bad_port"),
        ("port 65536", reg("porter", 65_536), "bad_port"),
        ("port -1", reg("porter", -1), "bad_port"),
        ("port i64::MIN", reg("porter", i64::MIN), "bad_port"),
        // The checks go in the documented order.
        ("bad name and bad port", reg("", 0), "bad_name"),
        (
            "bad version, name and port",
            codec::encode_frame(&ToRegistry::Register {
                version: 1,
                name: String::new(),
                port: 0,
                relay: false,
                dial_back: false,
            })
            .unwrap()
            .to_vec(),
            "unsupported_version",
        ),
        ("the control's name", reg("CONTROL", 4001), "name_taken"),
    ];
    for (what, bytes, code) in &cases {
        case.attack(what, false, bytes, code);
    }
    // The limits themselves are fine: 32 characters, trimmed spaces, the
    // ends of the port range.
    let edge = [
        ("x".repeat(32), "x".repeat(32), 1),
        ("名".repeat(32), "名".repeat(32), 65_535),
        ("  padded  ".to_string(), "padded".to_string(), 4002),
    ];
    for (sent, registered_as, port) in edge {
        let (mut c, welcome) = Client::register(case.reg.addr, &sent, port);
        match &welcome {
            FromRegistry::Welcome { name, .. } => assert_eq!(name, &registered_as),
            other => panic!("case5: {sent:?} port {port} refused: {other:?}"),
        }
        c.send(&ToRegistry::Leave {});
        assert_ne!(finish_client(&mut c, Duration::from_secs(3)).end, End::Open);
        case.expected.push(joined(&registered_as, port, c.key()));
        case.expected.push(left(&registered_as, "quit"));
    }
    case.finish();
}
