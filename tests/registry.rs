//! The real `registry` binary on 127.0.0.1, driven by raw-protocol clients.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, Client, Registry};
use peerchat_core::protocol::{Change, FromRegistry, PeerEntry, ToRegistry};

fn code_of(msg: Option<FromRegistry>) -> String {
    match msg {
        Some(FromRegistry::Error { code, .. }) => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn welcome_then_deltas_in_order() {
    let reg = Registry::start(&[]);
    let (mut alice, welcome) = Client::register(reg.addr, "alice", 4001);
    let FromRegistry::Welcome {
        name,
        addr,
        heartbeat_ms,
        timeout_ms,
        secret,
        peers,
        ..
    } = welcome
    else {
        panic!("{welcome:?}")
    };
    assert_eq!(name, "alice");
    assert_eq!(addr, "127.0.0.1:4001", "observed IP plus declared port");
    assert_eq!((heartbeat_ms, timeout_ms), (200, 1000));
    assert_eq!(secret.len(), 32);
    assert!(peers.is_empty());

    let (mut bob, welcome) = Client::register(reg.addr, "bob", 4002);
    let FromRegistry::Welcome { peers, .. } = welcome else {
        panic!()
    };
    assert_eq!(
        peers,
        vec![PeerEntry {
            name: "alice".into(),
            addr: "127.0.0.1:4001".into()
        }]
    );
    assert_eq!(
        alice.recv(),
        Some(FromRegistry::Update {
            changes: vec![Change::Joined {
                name: "bob".into(),
                addr: "127.0.0.1:4002".into()
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
    let reg = Registry::start(&[]);
    let (mut watcher, _) = Client::register(reg.addr, "watcher", 4001);
    let (silent, _) = Client::register(reg.addr, "silent", 4002);
    let joined = watcher.recv();
    assert!(matches!(joined, Some(FromRegistry::Update { .. })));
    let registered_at = Instant::now();
    // The watcher heartbeats; the other never says anything again.
    let update = loop {
        watcher.send(&ToRegistry::Heartbeat {});
        watcher
            .stream
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        match watcher.recv_any_timeout() {
            Some(FromRegistry::Heartbeat {}) | None => {}
            Some(other) => break other,
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
    assert!(
        elapsed >= Duration::from_millis(950),
        "evicted early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1600),
        "evicted late: {elapsed:?}"
    );
    drop(silent);
}

impl Client {
    /// Like `recv_any`, but `None` on a read timeout too.
    fn recv_any_timeout(&mut self) -> Option<FromRegistry> {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(msg) = self.try_decoded() {
                return Some(msg);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.push(&buf[..n]),
                Err(_) => return None,
            }
        }
    }
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
        secret: None,
    });
    assert_eq!(code_of(future.recv()), "unsupported_version");
    let (_bob, _) = Client::register(reg.addr, "张伟", 4003);
    let (_, reply) = Client::register(reg.addr, "carol", 4004);
    assert_eq!(code_of(Some(reply)), "registry_full");
}

#[test]
fn shutdown_notifies_peers_and_exits_zero() {
    let mut reg = Registry::start(&[]);
    let (mut alice, _) = Client::register(reg.addr, "alice", 4001);
    reg.proc.signal(libc::SIGTERM);
    assert!(matches!(alice.recv(), Some(FromRegistry::Shutdown { .. })));
    assert!(alice.closed());
    let status = reg.proc.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
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
        vec!["--listen", "127.0.0.1:0", "--bogus"],
    ] {
        let out = Command::new(bin("registry")).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Usage") || stderr.contains("usage"),
            "{args:?}: {stderr}"
        );
    }
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
    let (_late, _) = Client::register(reg.addr, "late", 4002);
    assert!(matches!(
        control.recv(),
        Some(FromRegistry::Update { changes }) if changes.len() == 1
    ));
}

#[test]
fn a_client_that_half_closes_still_gets_its_answer() {
    let reg = Registry::start(&[]);
    let mut c = Client::connect(reg.addr);
    c.send(&ToRegistry::Register {
        version: 1,
        name: "brief".into(),
        port: 4001,
        secret: None,
    });
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.recv(), Some(FromRegistry::Welcome { .. })));
    assert!(c.closed());
}
