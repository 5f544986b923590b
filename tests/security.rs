//! What the Noise sessions and the keys buy, end to end, with the real
//! `registry` and `peer --json` binaries on loopback: an eavesdropper on the
//! path learns nothing, a name belongs to its key, a peer's pins catch a
//! registry that lies, broken sessions close alone, and key files are kept
//! private.
//!
//! Longer than the project's 800-line aim, for now: its two thread servers
//! and their accept loops move into the shared dev-only testkit, and the
//! cases split along its banners. That split is one step of the planned
//! architecture work (transport, machine contract, peer rooms, testkit); done
//! here alone, it would be done twice.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{bin, Client, DataDir, Next, PeerProc, Proc, Registry, LONG};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{
    self, Change, FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION,
};
use peerchat_core::secure::SecureStream;
use serde_json::Value;

fn is(event: &str, key: &str, value: &str) -> impl Fn(&Value) -> bool {
    let (event, key, value) = (event.to_string(), key.to_string(), value.to_string());
    move |v: &Value| v["event"] == event.as_str() && v[key.as_str()] == value.as_str()
}

fn code_of(msg: Option<FromRegistry>) -> String {
    match msg {
        Some(FromRegistry::Error { code, .. }) => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// A recording TCP relay
// ---------------------------------------------------------------------------

/// Everything one relay saw: each direction of each connection on its own.
type Recording = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay on the path between a client and `target`: forwards every
/// byte both ways and keeps a copy, as an eavesdropper (or anyone who can
/// read the wire) would.
struct Relay {
    addr: SocketAddr,
    streams: Recording,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(listener: TcpListener, target: SocketAddr) -> Relay {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let streams: Recording = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (streams, connections, stop) = (streams.clone(), connections.clone(), stop.clone());
            thread::spawn(move || {
                let cap = Instant::now() + Duration::from_secs(120);
                let mut pumps = Vec::new();
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= cap {
                        break;
                    }
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(server) = TcpStream::connect(target) else {
                                continue;
                            };
                            connections.fetch_add(1, Ordering::Relaxed);
                            client.set_nonblocking(false).unwrap();
                            for (from, to) in [
                                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                                (server, client),
                            ] {
                                let index = {
                                    let mut s = streams.lock().unwrap();
                                    s.push(Vec::new());
                                    s.len() - 1
                                };
                                let (streams, stop) = (streams.clone(), stop.clone());
                                pumps.push(thread::spawn(move || {
                                    pump(from, to, &streams, index, &stop)
                                }));
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
                stop.store(true, Ordering::Relaxed);
                for p in pumps {
                    let _ = p.join();
                }
            })
        };
        Relay {
            addr,
            streams,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    /// A relay on a new port of 127.0.0.1 in front of `target`.
    fn to(target: SocketAddr) -> Relay {
        Relay::start(TcpListener::bind("127.0.0.1:0").unwrap(), target)
    }

    fn recorded(&self) -> Vec<Vec<u8>> {
        self.streams.lock().unwrap().clone()
    }

    fn bytes(&self) -> usize {
        self.recorded().iter().map(Vec::len).sum()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies one direction until EOF, an error or the stop flag.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    streams: &Recording,
    index: usize,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                streams.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if common::is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
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

// ---------------------------------------------------------------------------
// Names belong to keys
// ---------------------------------------------------------------------------

#[test]
fn an_impostor_cannot_take_a_name_while_its_owner_holds_it_or_is_away() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.registered();
    let alice_key = alice.key();

    // A raw client with another key.
    let (mut thief, reply) = Client::register(reg.addr, "alice", 4001);
    assert_eq!(code_of(Some(reply)), "name_taken");
    assert!(thief.closed());
    // A peer process with its own data directory, so its own key.
    let mut other = PeerProc::start("ALICE", reg.addr);
    assert_ne!(other.key(), alice_key);
    let err = other.expect_event("error", LONG);
    assert_eq!(err["code"], "name_taken", "{err}");
    assert_eq!(other.proc.wait_exit(LONG).unwrap().code(), Some(2));

    // Alice leaves; her name stays hers through the grace period.
    alice.say("/quit");
    assert_eq!(alice.proc.wait_exit(LONG).unwrap().code(), Some(0));
    let (_, reply) = Client::register(reg.addr, "alice", 4002);
    assert_eq!(code_of(Some(reply)), "name_taken", "kept for alice's key");
    let mut other = PeerProc::start("alice", reg.addr);
    let err = other.expect_event("error", LONG);
    assert_eq!(err["code"], "name_taken", "{err}");
    assert_eq!(other.proc.wait_exit(LONG).unwrap().code(), Some(2));

    // Alice again, with her data directory: her key, her name.
    let mut back = PeerProc::start_again(&alice.data, "alice", &reg.addr.to_string(), &[]);
    let registered = back.registered();
    assert_eq!(registered["key"], alice_key.to_string().as_str());
    assert_eq!(back.key(), alice_key);
}

#[test]
fn a_registry_with_a_names_file_keeps_names_for_their_keys_across_restarts() {
    let data = DataDir::fresh();
    let names = data.path().join("peerchat-registry/names");
    let with_names = ["--names", names.to_str().unwrap()];
    let saved = |name: &str| {
        let deadline = Instant::now() + LONG;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&names).unwrap_or_default();
            if text.lines().any(|l| l.ends_with(&format!(" {name}"))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} never saved in {}", names.display());
    };
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let welcomed = |addr, id: &Identity, name: &str, port| {
        let (session, welcome) = Client::register_as(addr, id, name, port);
        assert!(
            matches!(welcome, FromRegistry::Welcome { .. }),
            "{name}: {welcome:?}"
        );
        session
    };

    // A crash: alice is online, then the registry is killed.
    let reg = Registry::start_in(&data, "127.0.0.1:0", &with_names);
    let _alice_session = welcomed(reg.addr, &alice, "alice", 4001);
    saved("alice");
    // One registry writes a record: a second one on the same file takes
    // the owners in it (alice stays alice's) but never writes it.
    let mut second = Registry::start_in(&data, "127.0.0.1:0", &with_names);
    assert!(second
        .proc
        .stderr
        .wait_for("another registry is using this names file", LONG));
    let (_, reply) = Client::register(second.addr, "alice", 5000);
    assert_eq!(code_of(Some(reply)), "name_taken", "the second one knows");
    let _zed_session = welcomed(second.addr, &bob, "zed", 4009);
    // A clean stop, which would save if this one wrote the record.
    second.proc.signal(libc::SIGTERM);
    assert_eq!(second.proc.wait_exit(LONG).unwrap().code(), Some(0));
    let record = std::fs::read_to_string(&names).unwrap();
    assert!(
        !record.contains(" zed"),
        "the second registry wrote: {record}"
    );
    reg.proc.signal(libc::SIGKILL);
    drop(reg);
    let mut reg = Registry::start_in(&data, "127.0.0.1:0", &with_names);
    assert!(reg.proc.stderr.wait_for("names kept for their keys", LONG));
    let (_, reply) = Client::register(reg.addr, "Alice", 5000);
    assert_eq!(
        code_of(Some(reply)),
        "name_taken",
        "a stranger after a crash"
    );
    let _alice_session = welcomed(reg.addr, &alice, "alice", 4001);

    // A clean stop saves at once: bob registers just before it.
    let _bob_session = welcomed(reg.addr, &bob, "bob", 4002);
    reg.proc.signal(libc::SIGTERM);
    assert_eq!(reg.proc.wait_exit(LONG).unwrap().code(), Some(0));
    let reg = Registry::start_in(&data, "127.0.0.1:0", &with_names);
    for name in ["alice", "bob"] {
        let (_, reply) = Client::register(reg.addr, name, 5000);
        assert_eq!(code_of(Some(reply)), "name_taken", "{name}, after a stop");
    }
    welcomed(reg.addr, &bob, "bob", 4002);
    drop(reg);

    // The record decides who owns a name, so others may not write it.
    std::fs::set_permissions(&names, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, stderr) =
        registry_exit(&["--listen", "127.0.0.1:0", with_names[0], with_names[1]]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("writable by nobody else"), "{stderr}");

    // Without --names the owners live in memory only, as documented.
    let data = DataDir::fresh();
    let mut reg = Registry::start_in(&data, "127.0.0.1:0", &[]);
    let _alice_session = welcomed(reg.addr, &alice, "alice", 4001);
    reg.proc.signal(libc::SIGTERM);
    assert_eq!(reg.proc.wait_exit(LONG).unwrap().code(), Some(0));
    let reg = Registry::start_in(&data, "127.0.0.1:0", &[]);
    welcomed(reg.addr, &bob, "alice", 4002);
}

#[test]
fn the_same_key_starting_again_replaces_the_old_session() {
    let reg = Registry::start(&[]);
    let mut bob = PeerProc::start("bob", reg.addr);
    bob.registered();
    let mut first = PeerProc::start("alice", reg.addr);
    let old_addr = first.registered()["addr"].as_str().unwrap().to_string();
    bob.expect("alice joined", LONG, is("joined", "name", "alice"));

    let mut second = PeerProc::start_again(&first.data, "alice", &reg.addr.to_string(), &[]);
    let registered = second.registered();
    assert_eq!(second.key(), first.key(), "the same key file");
    let new_addr = registered["addr"].as_str().unwrap().to_string();
    assert_ne!(new_addr, old_addr, "a new process listens on a new port");

    let err = first.expect_event("error", LONG);
    assert_eq!(err["code"], "replaced", "{err}");
    assert_eq!(
        first.proc.wait_exit(LONG).unwrap().code(),
        Some(2),
        "the replaced process exits with status 2"
    );
    // The others see alice move, not leave; chat goes to the new process.
    let moved = bob.expect("alice moved", LONG, is("moved", "name", "alice"));
    assert_eq!(moved["addr"], new_addr.as_str());
    assert_eq!(bob.count(|v| v["event"] == "left"), 0, "nobody left");
    bob.say("/msg alice are you the new one?");
    second.expect(
        "the message",
        LONG,
        is("message", "text", "are you the new one?"),
    );
    bob.expect_event("delivered", LONG);
}

// ---------------------------------------------------------------------------
// Pins
// ---------------------------------------------------------------------------

/// What a fake registry tells every peer that registers with it.
#[derive(Clone)]
struct Script {
    peers: Vec<PeerEntry>,
}

/// A registry written here: a real Noise session under its own key, and a
/// directory of its choosing.
struct FakeRegistry {
    addr: SocketAddr,
    key: PublicKey,
    registrations: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRegistry {
    fn start(script: Script) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let identity = Identity::generate();
        let key = identity.public();
        let registrations = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (registrations, stop) = (registrations.clone(), stop.clone());
            thread::spawn(move || {
                let cap = Instant::now() + Duration::from_secs(120);
                let mut sessions = Vec::new();
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= cap {
                        break;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (identity, script) = (identity.clone(), script.clone());
                            let (registrations, stop) = (registrations.clone(), stop.clone());
                            sessions.push(thread::spawn(move || {
                                serve_fake(stream, &identity, &script, &registrations, &stop)
                            }));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
                stop.store(true, Ordering::Relaxed);
                for s in sessions {
                    let _ = s.join();
                }
            })
        };
        FakeRegistry {
            addr,
            key,
            registrations,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_fake(
    stream: TcpStream,
    identity: &Identity,
    script: &Script,
    registrations: &AtomicUsize,
    stop: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Ok(mut s) =
        SecureStream::accept(stream, identity, &peerchat_core::protocol::noise_prologue())
    else {
        return;
    };
    s.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let observed = s.get_ref().peer_addr().unwrap().ip();
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let body = match s.read_frame() {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(e) if common::is_timeout(&e) => continue,
            Err(_) => return,
        };
        let reply = match codec::decode::<ToRegistry>(&body) {
            Ok(ToRegistry::Register { name, port, .. }) => {
                registrations.fetch_add(1, Ordering::Relaxed);
                FromRegistry::Welcome {
                    version: PROTOCOL_VERSION,
                    name,
                    addr: SocketAddr::new(observed, port as u16).to_string(),
                    heartbeat_ms: 200,
                    timeout_ms: 5000,
                    more: false,
                    peers: script.peers.clone(),
                }
            }
            Ok(ToRegistry::Heartbeat {}) => FromRegistry::Heartbeat {},
            Ok(ToRegistry::Leave {}) | Err(_) => return,
        };
        if s.write_plain(&protocol::frame(&reply)).is_err() {
            return;
        }
    }
}

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
// ---------------------------------------------------------------------------
// Broken sessions close alone
// ---------------------------------------------------------------------------

#[test]
fn tampered_and_truncated_noise_messages_close_only_their_connection() {
    // The bystander b hears that `name` is gone and is still answered.
    fn gone_and_still_served(b: &mut Client, name: &str) {
        assert_eq!(
            b.recv(),
            Some(FromRegistry::Update {
                changes: vec![Change::Left {
                    name: name.into(),
                    reason: "disconnected".into()
                }]
            })
        );
        b.send(&ToRegistry::Heartbeat {});
        assert_eq!(
            b.next(Duration::from_secs(2)),
            Next::Msg(FromRegistry::Heartbeat {})
        );
    }
    let reg = Registry::start(&[]);
    let (mut b, _) = Client::register(reg.addr, "b", 4002);
    let (mut a, _) = Client::register(reg.addr, "a", 4001);
    assert!(matches!(b.recv(), Some(FromRegistry::Update { .. })));

    // A flipped byte in a sealed heartbeat: a is closed without a word.
    let mut wire = a
        .conn
        .seal(&protocol::frame(&ToRegistry::Heartbeat {}))
        .unwrap();
    wire[5] ^= 0x20;
    a.send_wire(&wire).unwrap();
    assert!(a.closed_within(Duration::from_secs(2)), "a is closed");
    gone_and_still_served(&mut b, "a");

    // Part of a Noise message, then the end of the stream: c is closed.
    let (mut c, _) = Client::register(reg.addr, "c", 4003);
    assert!(matches!(b.recv(), Some(FromRegistry::Update { .. })));
    let wire = c
        .conn
        .seal(&protocol::frame(&ToRegistry::Heartbeat {}))
        .unwrap();
    c.send_wire(&wire[..wire.len() / 2]).unwrap();
    c.stream().shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_within(Duration::from_secs(2)), "c is closed");
    gone_and_still_served(&mut b, "c");
    // And a newcomer still registers.
    let (_d, welcome) = Client::register(reg.addr, "d", 4004);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );

    // The same against a peer's listening socket.
    let mut alice = PeerProc::start("alice", reg.addr);
    let alice_addr: SocketAddr = alice.registered()["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let hello = protocol::frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 1,
    });
    for truncated in [false, true] {
        let stream = TcpStream::connect(alice_addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut link = SecureStream::connect(
            stream,
            &Identity::generate(),
            &peerchat_core::protocol::noise_prologue(),
        )
        .unwrap();
        assert_eq!(link.remote_key(), alice.key());
        let mut wire = link.seal(&hello).unwrap();
        if truncated {
            wire.truncate(wire.len() - 4);
            link.get_mut().write_all(&wire).unwrap();
            link.get_ref().shutdown(Shutdown::Write).unwrap();
        } else {
            let last = wire.len() - 1;
            wire[last] ^= 0x01;
            link.get_mut().write_all(&wire).unwrap();
        }
        let started = Instant::now();
        let end = link.read_frame();
        assert!(
            matches!(end, Ok(None)) || end.as_ref().is_err_and(common::is_reset),
            "the link is closed without a word: {end:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let mut bob = PeerProc::start("bob", reg.addr);
    bob.registered();
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    bob.say("/msg alice still here?");
    alice.expect("bob's message", LONG, is("message", "text", "still here?"));
    bob.expect_event("delivered", LONG);
    assert_eq!(alice.count(|v| v["event"] == "message"), 1);
    assert!(
        alice.proc.child.try_wait().unwrap().is_none(),
        "alice is alive"
    );
}

// ---------------------------------------------------------------------------
// Key files
// ---------------------------------------------------------------------------

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs the registry with `args` (and a fresh data directory) and returns
/// its exit status and stderr; it must exit within `LONG`.
fn registry_exit(args: &[&str]) -> (Option<i32>, String) {
    let data = DataDir::fresh();
    let mut child = Command::new(bin("registry"))
        .args(args)
        .env("XDG_DATA_HOME", data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut proc = Proc {
        child,
        stderr: Default::default(),
    };
    let status = proc.wait_exit(LONG).expect("the registry exits");
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    (status.code(), text)
}

#[test]
fn key_files_that_others_may_read_or_that_are_not_keys_are_refused() {
    let reg = Registry::start(&[]);
    let dir = DataDir::fresh();
    let open = dir.path().join("open.key");
    Identity::load_or_create(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "hello\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();

    for (path, what, says) in [
        (&open, "a key others may read", "0644"),
        (&garbage, "a file that is not a key", "not a peerchat key"),
    ] {
        let path = path.to_str().unwrap();
        let mut peer = PeerProc::start_with("x", &reg.addr.to_string(), &["--identity", path]);
        let err = peer.expect_event("error", LONG);
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(says), "peer, {what}: {err}");
        assert_eq!(
            peer.proc.wait_exit(LONG).unwrap().code(),
            Some(2),
            "peer, {what}"
        );
        assert!(
            peer.proc.stderr.wait_for(says, Duration::from_secs(2)),
            "peer, {what}: stderr says why: {:?}",
            peer.proc.stderr.snapshot()
        );

        let (code, stderr) = registry_exit(&["--listen", "127.0.0.1:0", "--key", path]);
        assert!(
            matches!(code, Some(c) if c != 0),
            "registry, {what}: exits with {code:?}"
        );
        assert!(
            stderr.contains(says) && stderr.contains(path),
            "registry, {what}: {stderr}"
        );
        assert!(
            !stderr.contains("listening on"),
            "registry, {what}: {stderr}"
        );
    }
    assert_eq!(mode(&open), 0o644, "a refused key file is left as it was");
    assert_eq!(std::fs::read_to_string(&garbage).unwrap(), "hello\n");

    // A missing --identity is made, private, and is the key the peer uses.
    let fresh = dir.path().join("new/dir/mine.key");
    let fresh_text = fresh.to_str().unwrap().to_string();
    let mut peer = PeerProc::start_with("y", &reg.addr.to_string(), &["--identity", &fresh_text]);
    let registered = peer.registered();
    assert_eq!(mode(&fresh), 0o600);
    assert_eq!(mode(fresh.parent().unwrap()), 0o700);
    let key = Identity::load(&fresh).unwrap().public();
    assert_eq!(registered["key"], key.to_string().as_str());
    assert_eq!(peer.key(), key);
    // And the default one, in the data directory, is private too.
    let mut z = PeerProc::start("z", reg.addr);
    z.registered();
    let default = z.data.peer_key_file("z");
    assert_eq!(mode(&default), 0o600, "{}", default.display());
    assert_eq!(Identity::load(&default).unwrap().public(), z.key());
}
