//! Names belong to keys: an impostor cannot take one, a names file keeps
//! them across restarts, the same key replaces its old session.

use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::identity::Identity;
use peerchat_core::protocol::FromRegistry;
use peerchat_testkit::client::{code_of, Client};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;

use crate::key_files::registry_exit;

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

    // The same key file, as a second machine would have it; a store is
    // one process's, so this one names its own.
    let store = first.data.unique("second.db");
    let store = store.to_str().unwrap();
    let mut second = PeerProc::start_again(
        &first.data,
        "alice",
        &reg.addr.to_string(),
        &["--store", store],
    );
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
