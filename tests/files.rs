//! Files between real `peer --json` processes on 127.0.0.1: offered,
//! accepted, verified and saved; refused when too large; never over a
//! file already there; chat going on meanwhile.

use std::fs;
use std::path::Path;

use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use serde_json::Value;

/// Bytes that do not repeat in any short period, so that a misplaced
/// chunk shows.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn transfer_of(event: &Value) -> u64 {
    event["transfer"].as_u64().expect("a transfer number")
}

/// alice and bob, registered and linked both ways.
fn pair(reg: &Registry, bob_args: &[&str]) -> (PeerProc, PeerProc) {
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.registered();
    let mut bob = PeerProc::start_with("bob", &reg.addr.to_string(), bob_args);
    bob.registered();
    alice.expect("joined", LONG, is("joined", "name", "bob"));
    (alice, bob)
}

fn offered_to(bob: &mut PeerProc) -> Value {
    bob.expect("file_offer", LONG, |e| {
        e["event"] == "file_offer" && e["direction"] == "in"
    })
}

#[test]
fn a_file_is_offered_accepted_checked_and_saved_while_chat_goes_on() {
    let reg = Registry::start(&[]);
    let (mut alice, mut bob) = pair(&reg, &[]);
    let files = DataDir::fresh();
    let data = content(5 << 20, 7);
    let source = files.path().join("photo album.tar");
    fs::write(&source, &data).unwrap();

    alice.say(&format!("/send bob {}", source.display()));
    let out = alice.expect("file_offer", LONG, is("file_offer", "direction", "out"));
    assert_eq!(out["size"], data.len() as u64);
    let offer = offered_to(&mut bob);
    assert_eq!(offer["peer"], "alice");
    assert_eq!(offer["name"], "photo album.tar");
    assert_eq!(offer["sha256"], out["sha256"]);

    let inbox = files.path().join("inbox");
    bob.say(&format!(
        "/accept {} {}",
        transfer_of(&offer),
        inbox.display()
    ));
    alice.say("/msg bob still there?");
    let chat = bob.expect_event("message", LONG);
    assert_eq!(chat["text"], "still there?");
    let done = bob.expect("file_done", LONG, is("file_done", "direction", "in"));
    let saved = Path::new(done["path"].as_str().unwrap());
    assert_eq!(saved, inbox.join("photo album.tar"));
    assert!(
        fs::read(saved).unwrap() == data,
        "the saved file is the one sent"
    );
    alice.expect("file_done", LONG, is("file_done", "direction", "out"));
    assert_eq!(
        fs::read_dir(&inbox).unwrap().count(),
        1,
        "no partial file is left"
    );

    // The same file again: saved beside the first, never over it.
    alice.say(&format!("/send bob {}", source.display()));
    let offer = offered_to(&mut bob);
    bob.say(&format!(
        "/accept {} {}",
        transfer_of(&offer),
        inbox.display()
    ));
    let done = bob.expect("file_done", LONG, is("file_done", "direction", "in"));
    assert_eq!(
        Path::new(done["path"].as_str().unwrap()),
        inbox.join("photo album (1).tar")
    );
    assert!(fs::read(inbox.join("photo album.tar")).unwrap() == data);
}

#[test]
fn offers_too_large_or_rejected_end_on_both_sides_and_trusted_senders_are_taken_at_once() {
    let reg = Registry::start(&[]);
    let downloads = DataDir::fresh();
    let dir = downloads.path().display().to_string();
    let args = [
        "--max-file-size",
        "1MiB",
        "--accept-files-from",
        "carol,alice",
        "--downloads",
        dir.as_str(),
    ];
    let (mut alice, mut bob) = pair(&reg, &args);
    let files = DataDir::fresh();
    let big = files.path().join("big.bin");
    fs::write(&big, content((1 << 20) + 1, 3)).unwrap();
    alice.say(&format!("/send bob {}", big.display()));
    let failed = alice.expect("file_failed", LONG, is("file_failed", "direction", "out"));
    assert_eq!(failed["code"], "too_large");
    let failed = bob.expect("file_failed", LONG, is("file_failed", "direction", "in"));
    assert_eq!(failed["code"], "too_large");

    // alice is trusted: her file is saved without /accept, as a name that
    // cannot hide or climb out of the downloads directory.
    let small = files.path().join(".profile");
    fs::write(&small, b"export EVIL=1\n").unwrap();
    alice.say(&format!("/send bob {}", small.display()));
    let done = bob.expect("file_done", LONG, is("file_done", "direction", "in"));
    assert_eq!(
        Path::new(done["path"].as_str().unwrap()),
        downloads.path().join("profile")
    );

    // A file that is not there fails at once, on the sender alone.
    alice.say("/send bob /nonexistent/file");
    let failed = alice.expect("file_failed", LONG, is("file_failed", "direction", "out"));
    assert_eq!(failed["code"], "io");

    // carol trusts nobody, is asked, and says no.
    let mut carol = PeerProc::start("carol", reg.addr);
    carol.registered();
    alice.expect("joined", LONG, is("joined", "name", "carol"));
    alice.say(&format!("/send carol {}", small.display()));
    let offer = offered_to(&mut carol);
    carol.say(&format!("/reject {}", transfer_of(&offer)));
    let failed = alice.expect("file_failed", LONG, is("file_failed", "direction", "out"));
    assert_eq!(failed["code"], "rejected");
    // The offer is gone: accepting it now is an error.
    carol.say(&format!("/accept {}", transfer_of(&offer)));
    let error = carol.expect_event("error", LONG);
    assert_eq!(error["code"], "bad_command");
}

/// alice (and bob, with `bob_args`) with stores, registered and linked,
/// and a file of `mib` MiB for bob, which he takes without asking.
fn stored_pair(reg: &Registry, mib: usize) -> (PeerProc, PeerProc, DataDir, Vec<u8>) {
    let files = DataDir::fresh();
    let inbox = files.path().join("inbox").display().to_string();
    let (alice, bob) = pair(
        reg,
        &[
            "--accept-files-from",
            "alice",
            "--downloads",
            inbox.as_str(),
        ],
    );
    let data = content(mib << 20, 11);
    fs::write(files.path().join("big.bin"), &data).unwrap();
    (alice, bob, files, data)
}

/// The hidden partial file in `dir`, and how much it holds.
fn partial_in(dir: &Path) -> Option<u64> {
    fs::read_dir(dir).ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        name.ends_with(".peerchat-part")
            .then(|| entry.metadata().ok().map(|m| m.len()))
            .flatten()
    })
}

enum Victim {
    Sender,
    Receiver,
}

/// alice sends bob `big.bin`; once bob has written some of it, one of
/// them is killed (SIGKILL: no goodbye, nothing flushed).
fn send_and_kill_mid_way(
    alice: &mut PeerProc,
    bob: &mut PeerProc,
    files: &DataDir,
    victim: Victim,
) {
    alice.say(&format!(
        "/send bob {}",
        files.path().join("big.bin").display()
    ));
    bob.expect(
        "file_progress",
        LONG,
        is("file_progress", "direction", "in"),
    );
    let killed = match victim {
        Victim::Sender => alice,
        Victim::Receiver => bob,
    };
    killed.proc.signal(libc::SIGKILL);
    killed.proc.wait_exit(LONG).expect("the process is gone");
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_it_after_a_restart_without_asking() {
    let reg = Registry::start(&[]);
    let (mut alice, mut bob, files, data) = stored_pair(&reg, 96);
    send_and_kill_mid_way(&mut alice, &mut bob, &files, Victim::Receiver);
    let inbox = files.path().join("inbox");
    let held = partial_in(&inbox).expect("a partial file is left");
    assert!(
        held > 0 && held < data.len() as u64,
        "killed mid-way: {held} bytes held"
    );

    let args = [
        "--accept-files-from",
        "alice",
        "--downloads",
        inbox.to_str().unwrap(),
    ];
    let mut bob = PeerProc::start_again(&bob.data, "bob", &reg.addr.to_string(), &args);
    let done = bob.expect("file_done", LONG, is("file_done", "direction", "in"));
    assert!(
        bob.count(|e| e["event"] == "file_offer") == 0,
        "a transfer accepted before is not offered to the user again"
    );
    assert!(fs::read(done["path"].as_str().unwrap()).unwrap() == data);
    assert_eq!(partial_in(&inbox), None, "no partial file is left");
    alice.expect("file_done", LONG, is("file_done", "direction", "out"));
}

#[test]
fn a_sender_killed_mid_transfer_offers_it_again_after_a_restart_and_it_resumes() {
    let reg = Registry::start(&[]);
    let (mut alice, mut bob, files, data) = stored_pair(&reg, 96);
    send_and_kill_mid_way(&mut alice, &mut bob, &files, Victim::Sender);

    let mut alice = PeerProc::start_again(&alice.data, "alice", &reg.addr.to_string(), &[]);
    let offer = alice.expect("file_offer", LONG, is("file_offer", "direction", "out"));
    assert_eq!(offer["size"], data.len() as u64);
    let done = bob.expect("file_done", LONG, is("file_done", "direction", "in"));
    assert!(fs::read(done["path"].as_str().unwrap()).unwrap() == data);
    alice.expect("file_done", LONG, is("file_done", "direction", "out"));
    assert_eq!(
        bob.count(|e| e["event"] == "file_offer"),
        1,
        "bob was offered the file once, and took it back where it broke"
    );
}

#[test]
fn transfers_run_both_ways_at_once() {
    let reg = Registry::start(&[]);
    let files = DataDir::fresh();
    let dir = |who: &str| files.path().join(who).display().to_string();
    let (a_dir, b_dir) = (dir("to-alice"), dir("to-bob"));
    let mut alice = PeerProc::start_with(
        "alice",
        &reg.addr.to_string(),
        &["--accept-files-from", "bob", "--downloads", a_dir.as_str()],
    );
    alice.registered();
    let mut bob = PeerProc::start_with(
        "bob",
        &reg.addr.to_string(),
        &[
            "--accept-files-from",
            "alice",
            "--downloads",
            b_dir.as_str(),
        ],
    );
    bob.registered();
    alice.expect("joined", LONG, is("joined", "name", "bob"));
    let (for_bob, for_alice) = (content(3 << 20, 5), content(2 << 20, 9));
    for (name, data) in [("for-bob.bin", &for_bob), ("for-alice.bin", &for_alice)] {
        fs::write(files.path().join(name), data).unwrap();
    }
    alice.say(&format!(
        "/send bob {}",
        files.path().join("for-bob.bin").display()
    ));
    bob.say(&format!(
        "/send alice {}",
        files.path().join("for-alice.bin").display()
    ));
    for (peer, data) in [(&mut alice, &for_alice), (&mut bob, &for_bob)] {
        let done = peer.expect("file_done", LONG, is("file_done", "direction", "in"));
        assert!(fs::read(done["path"].as_str().unwrap()).unwrap() == *data);
        // Its own file may have been done first, on the way to this one.
        let sent = is("file_done", "direction", "out");
        if peer.count(&sent) == 0 {
            peer.expect("file_done", LONG, sent);
        }
    }
}

/// `unshare -m`, with a tmpfs of `size` mounted over `dir`, for the peer
/// it runs: a disk that fills, seen by that peer alone. `None` where mount
/// namespaces cannot be made (not root).
fn small_disk(dir: &Path, size: &str) -> Option<Vec<String>> {
    let works = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    works.then(|| {
        let script = format!(
            "mount -t tmpfs -o size={size} tmpfs '{}' && exec \"$0\" \"$@\"",
            dir.display()
        );
        vec![
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            script,
        ]
    })
}

#[test]
fn a_full_disk_fails_the_transfer_on_both_sides_and_leaves_nothing_behind() {
    let files = DataDir::fresh();
    let inbox = files.path().join("inbox");
    fs::create_dir(&inbox).unwrap();
    let Some(wrapper) = small_disk(&inbox, "1m") else {
        eprintln!("skipped: cannot make a mount namespace here (needs root)");
        return;
    };
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.registered();
    let inbox_arg = inbox.display().to_string();
    let mut bob = PeerProc::start_in(
        &wrapper,
        "bob",
        &reg.addr.to_string(),
        &[
            "--accept-files-from",
            "alice",
            "--downloads",
            inbox_arg.as_str(),
        ],
    );
    bob.registered();
    alice.expect("joined", LONG, is("joined", "name", "bob"));
    fs::write(files.path().join("big.bin"), content(4 << 20, 3)).unwrap();
    alice.say(&format!(
        "/send bob {}",
        files.path().join("big.bin").display()
    ));

    let failed = bob.expect("file_failed", LONG, is("file_failed", "direction", "in"));
    assert_eq!(failed["code"], "io");
    assert!(
        failed["reason"].as_str().unwrap().contains("No space left"),
        "{failed}"
    );
    let failed = alice.expect("file_failed", LONG, is("file_failed", "direction", "out"));
    assert_eq!(failed["code"], "io");
    // bob's own view of the directory, through his mount namespace.
    let seen =
        Path::new(&format!("/proc/{}/root", bob.proc.pid())).join(inbox.strip_prefix("/").unwrap());
    assert_eq!(
        fs::read_dir(&seen).unwrap().count(),
        0,
        "the partial file is removed"
    );
    alice.say("/msg bob still here?");
    let chat = bob.expect_event("message", LONG);
    assert_eq!(chat["text"], "still here?");
}
