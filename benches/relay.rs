//! Links through the registry's relay against direct ones, between real
//! `peer --json` processes (release builds) on loopback: chat latency both
//! ways, a relayed file's rate, and the registry's CPU per relayed MiB.
//!
//! Two pairs on one registry: `alice` and `bob` listen on 127.0.0.1 and
//! link directly; `ann` and `ben` listen on 127.0.0.2 and 127.0.0.3 while
//! the registry lists 127.0.0.1, so nobody can dial them and their link is
//! relayed (the loopback stand-in for two NATs). Each sends `RELAY_PINGS`
//! (default 300) `/msg` pings, one at a time, 10 ms apart; the clock runs
//! from the stdin write to the other's `message` event. A loopback round
//! trip between two plain sockets is measured too: the extra hop a relay
//! adds is about that. Then ann sends ben a file of `RELAY_BENCH_MIB` MiB
//! (default 256), with the registry's relay rates lifted
//! (`--relay-rate 8GiB --relay-max 8GiB`) so the rate shown is the relay's
//! own; the registry's CPU time over the transfer gives the cores one
//! relayed MiB/s costs. Every wait is bounded.
//!
//! `cargo bench --bench relay`

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peerchat_testkit::launch::{is, PeerProc, Registry};
use peerchat_testkit::process::DataDir;
use peerchat_testkit::procfs::cpu_time;
use peerchat_testkit::stats::percentile;

const PING_EVERY: Duration = Duration::from_millis(10);
const WAIT: Duration = Duration::from_secs(30);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let pings = env_or("RELAY_PINGS", 300) as usize;
    let mib = env_or("RELAY_BENCH_MIB", 256);
    let files = DataDir::fresh();
    let source = files.path().join("payload.bin");
    write_payload(&source, mib << 20);
    let downloads = files.path().join("in");
    let downloads_arg = downloads.display().to_string();
    let max_size = format!("{mib}MiB");

    let reg = Registry::start(&["--relay-rate", "8GiB", "--relay-max", "8GiB"]);
    let registry = reg.addr.to_string();
    let start = |name: &str, listen: &str, extra: &[&str]| {
        let mut args = vec!["--listen", listen];
        args.extend_from_slice(extra);
        let mut peer = PeerProc::start_with(name, &registry, &args);
        peer.registered();
        peer
    };
    let mut alice = start("alice", "127.0.0.1:0", &[]);
    let mut bob = start("bob", "127.0.0.1:0", &[]);
    let mut ann = start("ann", "127.0.0.2:0", &[]);
    let receiving = [
        "--accept-files-from",
        "ann",
        "--downloads",
        &downloads_arg,
        "--max-file-size",
        &max_size,
    ];
    let mut ben = start("ben", "127.0.0.3:0", &receiving);
    for peer in [&mut alice, &mut bob, &mut ann] {
        peer.expect("ben joined", WAIT, is("joined", "name", "ben"));
    }

    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    // The first ping of each pair brings its links up; it is not counted.
    // The first ping after the pause pays for waking up: which pair goes
    // first alternates, so that neither pays it more.
    for n in 0..=pings {
        let (d1, r1, d2, r2) = if n % 2 == 0 {
            let d1 = ping(&mut alice, &mut bob, n);
            let r1 = ping(&mut ann, &mut ben, n);
            (
                d1,
                r1,
                ping(&mut bob, &mut alice, n),
                ping(&mut ben, &mut ann, n),
            )
        } else {
            let r1 = ping(&mut ann, &mut ben, n);
            let d1 = ping(&mut alice, &mut bob, n);
            let r2 = ping(&mut ben, &mut ann, n);
            (d1, r1, ping(&mut bob, &mut alice, n), r2)
        };
        if n > 0 {
            direct.extend([d1, d2]);
            relayed.extend([r1, r2]);
        }
        std::thread::sleep(PING_EVERY);
    }
    ann.say("/whois ben");
    let whois = ann.expect_event("whois", WAIT);
    assert_eq!(whois["link"], "relayed", "ann's link to ben is relayed");
    let hop = loopback_round_trips(pings);

    let cpu_before = cpu_time(reg.proc.pid());
    ann.say(&format!("/send ben {}", source.display()));
    ben.expect("file_offer", WAIT * 4, is("file_offer", "direction", "in"));
    let started = Instant::now();
    let end = ben.expect("the end of the transfer", WAIT * 20, |e| {
        e["event"] == "file_done" || e["event"] == "file_failed"
    });
    let took = started.elapsed();
    let cpu = cpu_time(reg.proc.pid()).saturating_sub(cpu_before);
    assert_eq!(end["event"], "file_done", "{end}");
    let saved = fs::metadata(downloads.join("payload.bin")).expect("the file is saved");
    assert_eq!(saved.len(), mib << 20);

    let ms = |sorted: &[Duration], p: f64| percentile(sorted, p).as_secs_f64() * 1000.0;
    for (what, latencies) in [("direct", &mut direct), ("relayed", &mut relayed)] {
        latencies.sort();
        eprintln!(
            "chat, {what}: {} pings, p50 {:.3} ms, p99 {:.3} ms",
            latencies.len(),
            ms(latencies, 50.0),
            ms(latencies, 99.0)
        );
    }
    eprintln!(
        "loopback round trip (two plain sockets): p50 {:.3} ms",
        ms(&hop, 50.0)
    );
    eprintln!(
        "relayed / direct: p50 {:.2}x, p99 {:.2}x; relayed - direct, p50: {:.3} ms",
        ms(&relayed, 50.0) / ms(&direct, 50.0),
        ms(&relayed, 99.0) / ms(&direct, 99.0),
        ms(&relayed, 50.0) - ms(&direct, 50.0)
    );
    let rate = (mib << 20) as f64 / took.as_secs_f64() / 1048576.0;
    eprintln!(
        "relayed file: {mib} MiB in {:.2} s, {rate:.0} MiB/s",
        took.as_secs_f64()
    );
    let cores = cpu.as_secs_f64() / took.as_secs_f64();
    eprintln!(
        "registry CPU over the transfer: {:.2} s, {cores:.2} cores; {:.4} cores per relayed MiB/s",
        cpu.as_secs_f64(),
        cores / rate
    );
}

/// One `/msg` from `from` to `to`, timed to its `message` event.
fn ping(from: &mut PeerProc, to: &mut PeerProc, n: usize) -> Duration {
    let text = format!("ping {n} from {}", from.name);
    let start = Instant::now();
    from.say(&format!("/msg {} {text}", to.name));
    to.expect("the ping", WAIT, |e| {
        e["event"] == "message" && e["text"] == text.as_str()
    });
    start.elapsed()
}

/// Round trips of one small write between two plain loopback sockets,
/// sorted: the cost of one more hop through a process on this machine,
/// without the process's own work.
fn loopback_round_trips(n: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the client");
        stream.set_nodelay(true).expect("nodelay");
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() {
            if stream.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut client = TcpStream::connect(addr).expect("a loopback connection");
    client.set_nodelay(true).expect("nodelay");
    let mut times = Vec::with_capacity(n);
    let mut byte = [7u8; 1];
    for _ in 0..n {
        let start = Instant::now();
        client.write_all(&byte).expect("a write");
        client.read_exact(&mut byte).expect("the echo");
        times.push(start.elapsed());
    }
    drop(client);
    echo.join().expect("the echo thread");
    times.sort();
    times
}

/// Writes `len` bytes that do not compress or repeat, in 1 MiB writes, and
/// syncs them.
fn write_payload(path: &std::path::Path, len: u64) {
    let mut out = BufWriter::new(File::create(path).expect("the payload file"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..len >> 20 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        out.write_all(&block).expect("writing the payload");
    }
    out.into_inner()
        .expect("writing the payload")
        .sync_all()
        .expect("writing the payload");
}
