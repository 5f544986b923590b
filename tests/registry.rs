//! The real `registry` binary on 127.0.0.1, driven by raw-protocol clients.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::Identity;
use peerchat_core::protocol::{Change, FromRegistry, PeerEntry, ToRegistry};
use peerchat_testkit::bins::bin;
use peerchat_testkit::client::{code_of, register_msg, Client, Next};
use peerchat_testkit::launch::{Registry, EVICT_AFTER};
use peerchat_testkit::process::DataDir;

#[test]
fn welcome_then_deltas_in_order() {
    let reg = Registry::start(&[]);
    let (mut alice, welcome) = Client::register(reg.addr, "alice", 4001);
    let FromRegistry::Welcome {
        name,
        addr,
        heartbeat_ms,
        timeout_ms,
        version,
        peers,
        ..
    } = welcome
    else {
        panic!("{welcome:?}")
    };
    assert_eq!(name, "alice");
    assert_eq!(addr, "127.0.0.1:4001", "observed IP plus declared port");
    assert_eq!(
        (heartbeat_ms, timeout_ms),
        (200, 5000),
        "the settings tests start it with (launch::HEARTBEAT, launch::TIMEOUT)"
    );
    assert_eq!(version, 2);
    assert!(peers.is_empty());
    assert_eq!(
        alice.conn.remote_key(),
        reg.key,
        "the registry proves the key it printed"
    );

    // Nothing listens on alice's port: once the registry's probe has found
    // that, the snapshot says so.
    assert!(reg
        .proc
        .stderr
        .wait_for("probed name=alice", Duration::from_secs(5)));
    let (mut bob, welcome) = Client::register(reg.addr, "bob", 4002);
    let FromRegistry::Welcome { peers, .. } = welcome else {
        panic!()
    };
    assert_eq!(
        peers,
        vec![PeerEntry {
            name: "alice".into(),
            addr: "127.0.0.1:4001".into(),
            key: alice.key(),
            reachable: Some(false),
        }],
        "the directory lists the key alice proved"
    );
    assert_eq!(
        alice.recv(),
        Some(FromRegistry::Update {
            changes: vec![Change::Joined {
                name: "bob".into(),
                addr: "127.0.0.1:4002".into(),
                key: bob.key(),
            }]
        })
    );
    bob.send(&ToRegistry::Leave {});
    assert_eq!(
        alice.recv(),
        Some(FromRegistry::Update {
            changes: vec![Change::Left {
                name: "bob".into(),
                reason: "quit".into()
            }]
        })
    );
    assert!(bob.closed());
    assert!(reg.proc.stderr.wait_for("left", Duration::from_secs(2)));
}

#[test]
fn a_silent_client_is_evicted_within_timeout_plus_a_tick() {
    let reg = Registry::start(&["--timeout", EVICT_AFTER]);
    let (mut watcher, _) = Client::register(reg.addr, "watcher", 4001);
    // Taken before the register, so that no delay of this thread can make
    // the eviction look early; the exact tick is checked in simulated time
    // (registry/src/tests.rs), this checks the real clock and sockets.
    let before_register = Instant::now();
    let (silent, _) = Client::register(reg.addr, "silent", 4002);
    let joined = watcher.recv();
    assert!(matches!(joined, Some(FromRegistry::Update { .. })));
    let registered_at = Instant::now();
    // The watcher heartbeats; the other never says anything again.
    let update = loop {
        watcher.send(&ToRegistry::Heartbeat {});
        match watcher.next(Duration::from_millis(150)) {
            Next::Msg(FromRegistry::Heartbeat {}) | Next::Timeout => {}
            Next::Msg(other) => break other,
            Next::Closed => panic!("the watcher was closed"),
        }
        assert!(
            registered_at.elapsed() < Duration::from_secs(5),
            "no eviction"
        );
    };
    let elapsed = registered_at.elapsed();
    assert_eq!(
        update,
        FromRegistry::Update {
            changes: vec![Change::Left {
                name: "silent".into(),
                reason: "timeout".into()
            }]
        }
    );
    let since_register = before_register.elapsed();
    assert!(
        since_register >= Duration::from_secs(1),
        "evicted early: {since_register:?}"
    );
    // One timeout plus a heartbeat's tick, and room for a busy machine.
    assert!(
        elapsed < Duration::from_millis(2500),
        "evicted late: {elapsed:?}"
    );
    drop(silent);
}

#[test]
fn rejections_carry_their_codes() {
    let reg = Registry::start(&["--max-peers", "2"]);
    let (_alice, _) = Client::register(reg.addr, "Alice", 4001);
    let cases: Vec<(String, i64, &str)> = vec![
        ("alice".into(), 4002, "name_taken"),
        ("".into(), 4002, "bad_name"),
        ("x".repeat(33), 4002, "bad_name"),
        ("tab\tname".into(), 4002, "bad_name"),
        ("ok".into(), 0, "bad_port"),
        ("ok".into(), 70_000, "bad_port"),
        // Punctuation that breaks commands and display, an option's dash.
        ("/slash".into(), 4002, "bad_name"),
        ("a,b".into(), 4002, "bad_name"),
        ("name:colon".into(), 4002, "bad_name"),
        ("-dash".into(), 4002, "bad_name"),
        // Look-alikes of a name online, and scripts mixed to pass for one.
        ("a1ice".into(), 4002, "name_confusable"),
        ("\u{430}lice".into(), 4002, "name_confusable"),
        ("p\u{430}ypal".into(), 4002, "name_confusable"),
    ];
    for (name, port, code) in cases {
        let (mut c, reply) = Client::register(reg.addr, &name, port);
        assert_eq!(code_of(Some(reply)), code, "{name:?} {port}");
        assert!(c.closed(), "closed after the error");
    }
    let mut future = Client::connect(reg.addr);
    future.send(&ToRegistry::Register {
        version: 7,
        name: "future".into(),
        port: 1,
        relay: false,
        dial_back: false,
    });
    assert_eq!(code_of(future.recv()), "unsupported_version");
    let (_bob, _) = Client::register(reg.addr, "张伟", 4003);
    let (_, reply) = Client::register(reg.addr, "carol", 4004);
    assert_eq!(code_of(Some(reply)), "registry_full");
}

#[test]
fn shutdown_notifies_peers_and_exits_zero() {
    // A closed terminal or SSH session (SIGHUP) is a clean stop too: the
    // peers are told, and the names file is saved.
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let data = DataDir::fresh();
        let names = data.path().join("peerchat-registry/names");
        let names_arg = names.to_str().unwrap();
        let mut reg = Registry::start_in(&data, "127.0.0.1:0", &["--names", names_arg]);
        let (mut alice, _) = Client::register(reg.addr, "alice", 4001);
        reg.proc.signal(signal);
        assert!(
            matches!(alice.recv(), Some(FromRegistry::Shutdown { .. })),
            "signal {signal}"
        );
        assert!(alice.closed());
        let status = reg.proc.wait_exit(Duration::from_secs(5)).expect("exits");
        assert_eq!(status.code(), Some(0), "signal {signal}");
        let saved = std::fs::read_to_string(&names).unwrap_or_default();
        assert!(saved.contains(" alice"), "signal {signal}: {saved:?}");
    }
}

#[test]
fn listen_takes_a_host_name() {
    let reg = Registry::start_on("localhost:0", &[]);
    assert!(reg.addr.ip().is_loopback(), "{}", reg.addr);
    let (_alice, welcome) = Client::register(reg.addr, "alice", 4001);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );
    let data = DataDir::fresh();
    let out = Command::new(bin("registry"))
        .args(["--listen", "no-such-host.invalid:7000"])
        .env("XDG_DATA_HOME", data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen no-such-host.invalid:7000"),
        "{stderr}"
    );
}

#[test]
fn ipv6_listen_and_observed_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let reg = Registry::start_on("[::1]:0", &[]);
    let (_c, welcome) = Client::register(reg.addr, "six", 4006);
    let FromRegistry::Welcome { addr, .. } = welcome else {
        panic!()
    };
    assert_eq!(addr, "[::1]:4006");
}

#[test]
fn bad_command_lines_are_usage_errors() {
    for args in [
        vec![],
        vec!["--listen", "nonsense"],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--heartbeat",
            "5s",
            "--timeout",
            "2s",
        ],
        vec!["--listen", "127.0.0.1:0", "--heartbeat", "fast"],
        vec!["--listen", "127.0.0.1:0", "--stats-interval", "5"],
        vec!["--listen", "127.0.0.1:0", "--bogus"],
        vec!["--listen", "127.0.0.1:0", "--max-peers", "0"],
        vec!["--listen", "127.0.0.1:0", "--max-connections", "0"],
        vec!["--listen", "127.0.0.1:0", "--max-queue", "1000"],
        vec!["--print-key", "--listen", "127.0.0.1:0"],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "nats://no such host",
        ],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "nats://127.0.0.1:4222",
            "--names",
            "n",
        ],
        vec!["--listen", "127.0.0.1:0", "--cluster-replicas", "0"],
    ] {
        let data = DataDir::fresh();
        let out = Command::new(bin("registry"))
            .args(&args)
            .env("XDG_DATA_HOME", data.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Usage") || stderr.contains("usage"),
            "{args:?}: {stderr}"
        );
        // In clap's order: the error, the usage, then the pointer to help.
        if let (Some(usage), Some(more)) =
            (stderr.find("Usage:"), stderr.find("For more information"))
        {
            assert!(usage < more, "{args:?}: {stderr}");
        }
    }
}

#[test]
fn print_key_shows_the_key_a_registry_proves_without_starting() {
    let data = DataDir::fresh();
    let key_file = data.path().join("registry.key");
    let print = || {
        Command::new(bin("registry"))
            .arg("--print-key")
            .arg("--key")
            .arg(&key_file)
            .output()
            .unwrap()
    };
    let missing = print();
    assert_eq!(missing.status.code(), Some(1), "no key file: an error");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
    assert!(!key_file.exists(), "--print-key makes no key");
    let reg = Registry::start(&["--key", key_file.to_str().unwrap()]);
    let out = print();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        reg.key.to_string()
    );
}

#[test]
fn oversized_and_garbage_frames_close_only_that_connection() {
    let reg = Registry::start(&[]);
    let (mut control, _) = Client::register(reg.addr, "control", 4001);
    let mut huge = Client::connect(reg.addr);
    huge.send_raw(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(code_of(huge.recv()), "frame_too_large");
    let mut garbage = Client::connect(reg.addr);
    garbage.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).unwrap();
    assert_eq!(code_of(garbage.recv()), "protocol");
    // Plaintext where the Noise handshake belongs is not a peerchat peer:
    // dropped at once, without a word (no session, so no error frame).
    let mut plain = std::net::TcpStream::connect(reg.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let started = Instant::now();
    std::io::Write::write_all(
        &mut plain,
        &codec::encode_frame(&register_msg("plain", 4003)).unwrap(),
    )
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(plain.read(&mut buf), Ok(0) | Err(_)),
        "plaintext gets no answer, only a close"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
    let (_late, _) = Client::register(reg.addr, "late", 4002);
    assert!(matches!(
        control.recv(),
        Some(FromRegistry::Update { changes }) if changes.len() == 1
    ));
}

#[test]
fn frames_before_a_bad_noise_message_in_one_read_still_count() {
    let reg = Registry::start(&["--max-frame", "256"]);
    let (mut watcher, _) = Client::register(reg.addr, "watcher", 4001);
    let (mut leaver, _) = Client::register(reg.addr, "leaver", 4002);
    assert!(matches!(watcher.recv(), Some(FromRegistry::Update { .. })));
    // A leave, then a Noise message over the limit, in one write.
    let leave = codec::encode_frame(&ToRegistry::Leave {}).unwrap();
    let mut wire = leaver.conn.seal(&leave).unwrap();
    wire.extend(leaver.conn.seal(&[0u8; 1000]).unwrap());
    leaver.send_wire(&wire).unwrap();
    assert_eq!(
        watcher.recv(),
        Some(FromRegistry::Update {
            changes: vec![Change::Left {
                name: "leaver".into(),
                reason: "quit".into()
            }]
        }),
        "the leave counts"
    );
}

#[test]
fn a_large_message_right_behind_register_in_one_read_is_measured_after_registration() {
    let reg = Registry::start(&[]);
    let mut c = Client::connect(reg.addr);
    // A register, then 600 heartbeats (9,600 bytes, over the 4 KiB limit
    // before registration, well within the one after it) in one Noise
    // message, in one write: the registry reads both at once.
    let register = codec::encode_frame(&register_msg("eager", 4001)).unwrap();
    let heartbeat = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
    let mut wire = c.conn.seal(&register).unwrap();
    wire.extend(c.conn.seal(&heartbeat.repeat(600)).unwrap());
    c.send_wire(&wire).unwrap();
    assert!(
        matches!(c.recv(), Some(FromRegistry::Welcome { .. })),
        "registered"
    );
    for k in 0..600 {
        assert_eq!(
            c.recv_any(),
            Some(FromRegistry::Heartbeat {}),
            "heartbeat reply {k}"
        );
    }
}

#[test]
fn a_client_that_half_closes_still_gets_its_answer() {
    let reg = Registry::start(&[]);
    let mut c = Client::connect(reg.addr);
    c.send(&register_msg("brief", 4001));
    c.stream_mut().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.recv(), Some(FromRegistry::Welcome { .. })));
    assert!(c.closed());
}

#[test]
fn a_client_that_never_registers_is_told_handshake_timeout_and_a_silent_one_is_dropped() {
    let reg = Registry::start(&["--handshake-timeout", "500ms"]);
    let t = Instant::now();
    let mut lazy = Client::connect(reg.addr);
    assert_eq!(code_of(lazy.recv()), "handshake_timeout");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "told after {took:?}"
    );
    assert!(lazy.closed());
    // No Noise handshake at all: closed at the deadline with nothing said.
    let t = Instant::now();
    let mut silent = std::net::TcpStream::connect(reg.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[test]
fn a_name_belongs_to_the_key_that_registered_it() {
    // A grace long enough for the checks within it on a busy machine.
    let reg = Registry::start(&["--name-grace", "3s"]);
    let (mut watcher, _) = Client::register(reg.addr, "watcher", 4000);
    let alice_id = Identity::generate();
    let (mut alice, welcome) = Client::register_as(reg.addr, &alice_id, "alice", 4001);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );
    assert!(matches!(
        watcher.recv(),
        Some(FromRegistry::Update { changes }) if matches!(&changes[..], [Change::Joined { name, key, .. }] if name == "alice" && *key == alice_id.public())
    ));

    // Another key: the name is taken, in any case of letters.
    let (mut thief, reply) = Client::register(reg.addr, "ALICE", 4002);
    assert_eq!(code_of(Some(reply)), "name_taken");
    assert!(thief.closed());

    // The same key again, from another port: the new session replaces the
    // old one, which is told so; the others see it move, not leave.
    let (mut again, welcome) = Client::register_as(reg.addr, &alice_id, "alice", 4003);
    assert!(
        matches!(&welcome, FromRegistry::Welcome { addr, .. } if addr == "127.0.0.1:4003"),
        "{welcome:?}"
    );
    assert_eq!(code_of(alice.recv()), "replaced");
    assert!(alice.closed());
    assert_eq!(
        watcher.recv(),
        Some(FromRegistry::Update {
            changes: vec![Change::Moved {
                name: "alice".into(),
                addr: "127.0.0.1:4003".into(),
                reachable: None,
            }]
        })
    );

    // After a leave the name is kept for its key through the grace period.
    again.send(&ToRegistry::Leave {});
    assert!(again.closed());
    assert!(matches!(
        watcher.recv(),
        Some(FromRegistry::Update { changes }) if matches!(&changes[..], [Change::Left { name, reason }] if name == "alice" && reason == "quit")
    ));
    let (_, reply) = Client::register(reg.addr, "alice", 4004);
    assert_eq!(code_of(Some(reply)), "name_taken", "kept for its key");
    let (mut back, welcome) = Client::register_as(reg.addr, &alice_id, "Alice", 4005);
    assert!(
        matches!(&welcome, FromRegistry::Welcome { name, .. } if name == "Alice"),
        "its own key gets it back: {welcome:?}"
    );
    back.send(&ToRegistry::Leave {});
    assert!(back.closed());
    let left_at = Instant::now();

    // Once the grace is over, anyone may take it.
    std::thread::sleep(
        (left_at + Duration::from_millis(3300)).saturating_duration_since(Instant::now()),
    );
    let (_, welcome) = Client::register(reg.addr, "alice", 4006);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "free after the grace: {welcome:?}"
    );
}

#[test]
fn the_registry_key_lives_in_its_key_file_across_restarts() {
    let data = DataDir::fresh();
    let first = Registry::start_in(&data, "127.0.0.1:0", &[]);
    let key = first.key;
    let file = data.registry_key_file();
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&file), 0o600, "{}", file.display());
    assert_eq!(
        Identity::load(&file).unwrap().public(),
        key,
        "the printed key is the one in the file"
    );
    drop(first);
    let second = Registry::start_in(&data, "127.0.0.1:0", &[]);
    assert_eq!(second.key, key, "the same key after a restart");
    let c = Client::connect(second.addr);
    assert_eq!(c.conn.remote_key(), key);

    // --key names the file; a missing one is made.
    let other = DataDir::fresh();
    let path = other.path().join("keys/reg.key");
    let path_text = path.to_str().unwrap().to_string();
    let third = Registry::start(&["--key", &path_text]);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(Identity::load(&path).unwrap().public(), third.key);
    assert_ne!(third.key, key);
}
