//! A file between two real `peer --json` processes (release builds) over
//! loopback: how fast it goes, how long a chat to the same peer takes
//! meanwhile, and how much memory either side holds.
//!
//! alice sends bob a file of `FILES_BENCH_MIB` MiB (default 1024) of
//! pseudo-random bytes; bob takes alice's files without asking
//! (`--accept-files-from`). Before the transfer, and all through it, alice
//! sends bob `/msg` pings (one at a time, 20 ms apart) and the clock runs
//! from the stdin write to bob's `message` event. Reported: the time to
//! hash the file (`/send` to `file_offer`), the transfer's rate (bob's
//! `file_offer` to his `file_done`), ping latency idle and during the
//! transfer (p50, p99, max), and each peer's peak resident memory
//! (`VmHWM`) before the transfer and after it. Every wait is bounded; the
//! file and both peers' data live in temporary directories removed at the
//! end. Bob takes files up to the size sent (`--max-file-size`).
//!
//! `cargo bench --bench files` (about half a minute for 1 GiB; the file is
//! written to the temporary directory, which needs twice its size free).

use std::fs;
use std::time::{Duration, Instant};

use peerchat_testkit::launch::{is, PeerProc, Registry};
use peerchat_testkit::process::{write_payload, DataDir};
use peerchat_testkit::stats::percentile;

const PING_EVERY: Duration = Duration::from_millis(20);
const IDLE_PINGS: usize = 50;
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let mib: u64 = std::env::var("FILES_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let files = DataDir::fresh();
    let source = files.path().join("payload.bin");
    write_payload(&source, mib << 20);
    let downloads = files.path().join("in");
    let downloads_arg = downloads.display().to_string();
    let max_size = format!("{mib}MiB");

    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    alice.registered();
    let mut bob = PeerProc::start_with(
        "bob",
        &reg.addr.to_string(),
        &[
            "--accept-files-from",
            "alice",
            "--downloads",
            &downloads_arg,
            "--max-file-size",
            &max_size,
        ],
    );
    bob.registered();
    alice.expect("joined", WAIT, is("joined", "name", "bob"));

    let mut n = 0;
    let mut ping = |alice: &mut PeerProc, bob: &mut PeerProc| -> Option<Duration> {
        n += 1;
        let text = format!("ping {n}");
        let start = Instant::now();
        alice.say(&format!("/msg bob {text}"));
        bob.try_expect(WAIT, |e| {
            e["event"] == "message" && e["text"] == text.as_str()
        })
        .ok()?;
        Some(start.elapsed())
    };
    ping(&mut alice, &mut bob).expect("the chat link comes up");
    let mut idle = Vec::new();
    for _ in 0..IDLE_PINGS {
        idle.extend(ping(&mut alice, &mut bob));
        std::thread::sleep(PING_EVERY);
    }

    let before = [peak_kib(alice.proc.pid()), peak_kib(bob.proc.pid())];
    let asked = Instant::now();
    alice.say(&format!("/send bob {}", source.display()));
    alice.expect("file_offer", WAIT * 4, is("file_offer", "direction", "out"));
    let hashed = asked.elapsed();
    bob.expect("file_offer", WAIT, is("file_offer", "direction", "in"));
    let started = Instant::now();
    let mut busy = Vec::new();
    let deadline = started + WAIT * 20;
    let mut done = None;
    while Instant::now() < deadline {
        busy.extend(ping(&mut alice, &mut bob));
        let finished = bob
            .seen
            .iter()
            .any(|e| e["event"] == "file_done" || e["event"] == "file_failed");
        if finished {
            done = Some(started.elapsed());
            break;
        }
        std::thread::sleep(PING_EVERY);
    }
    let end = bob
        .seen
        .iter()
        .find(|e| e["event"] == "file_done" || e["event"] == "file_failed")
        .cloned()
        .expect("the transfer ends within the bench's bound");
    assert_eq!(end["event"], "file_done", "{end}");
    // The ping loop sees the end up to one ping late.
    let took = done.expect("an end time");
    let saved = fs::metadata(downloads.join("payload.bin")).expect("the file is saved");
    assert_eq!(saved.len(), mib << 20);

    let size = (mib << 20) as f64;
    eprintln!("file: {mib} MiB");
    eprintln!(
        "hash (/send to file_offer): {:.2} s ({:.0} MiB/s)",
        hashed.as_secs_f64(),
        size / hashed.as_secs_f64() / 1048576.0
    );
    eprintln!(
        "transfer (offer to file_done, ±1 ping): {:.2} s, {:.0} MiB/s",
        took.as_secs_f64(),
        size / took.as_secs_f64() / 1048576.0
    );
    report("chat to the same peer, idle", &mut idle);
    report("chat to the same peer, during the transfer", &mut busy);
    for (peer, before) in [&alice, &bob].into_iter().zip(before) {
        eprintln!(
            "{} peak resident memory (VmHWM): {} KiB before the transfer, {} KiB after",
            peer.name,
            before,
            peak_kib(peer.proc.pid())
        );
    }
}

fn report(what: &str, latencies: &mut [Duration]) {
    latencies.sort();
    let ms = |p: f64| percentile(latencies, p).as_secs_f64() * 1000.0;
    match latencies.last() {
        Some(max) => eprintln!(
            "{what}: {} pings, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            ms(50.0),
            ms(99.0),
            max.as_secs_f64() * 1000.0
        ),
        None => eprintln!("{what}: no pings"),
    }
}

fn peak_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
