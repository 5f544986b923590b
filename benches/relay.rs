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
//! relayed MiB/s costs. Meanwhile, and before it on a quiet registry,
//! `RELAY_REGISTRATIONS` (default 100) raw clients register one after the
//! other (connect, Noise handshake, `register`, the whole welcome), to
//! show what a relay flood does to everyone else's registrations, and
//! the registry's resident memory is sampled. The same again on a second
//! registry with its default rates, where the flood is a 16 MiB file held
//! to `--relay-rate` (2 MiB/s). Every wait is bounded.
//!
//! `cargo bench --bench relay`

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peerchat_testkit::client::Client;
use peerchat_testkit::launch::{is, PeerProc, Registry};
use peerchat_testkit::process::{write_payload, DataDir};
use peerchat_testkit::procfs::{cpu_time, rss_kib};
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
    let registrations = env_or("RELAY_REGISTRATIONS", 100) as usize;
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

    let mut quiet = register_many(&reg, registrations, "quiet");
    let rss_quiet = rss_kib(reg.proc.pid());

    let cpu_before = cpu_time(reg.proc.pid());
    ann.say(&format!("/send ben {}", source.display()));
    ben.expect("file_offer", WAIT * 4, is("file_offer", "direction", "in"));
    let started = Instant::now();
    let ended = |e: &serde_json::Value| e["event"] == "file_done" || e["event"] == "file_failed";
    // Registrations ten at a time while the file is on its way.
    let mut flooded = Vec::new();
    let mut rss_flood = 0;
    while flooded.len() < registrations && !ben.seen.iter().any(ended) {
        let round = flooded.len() / 10;
        flooded.extend(register_many(&reg, 10, &format!("flood{round}-")));
        rss_flood = rss_flood.max(rss_kib(reg.proc.pid()));
        let _ = ben.try_expect(Duration::from_millis(1), ended);
    }
    let end = ben.expect("the end of the transfer", WAIT * 20, ended);
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
    quiet.sort();
    flooded.sort();
    for (what, times) in [("quiet", &quiet), ("during the relay flood", &flooded)] {
        eprintln!(
            "registrations, {what}: {}, p50 {:.3} ms, p99 {:.3} ms",
            times.len(),
            ms(times, 50.0),
            ms(times, 99.0)
        );
    }
    eprintln!(
        "registration during the flood / quiet: p50 {:.2}x, p99 {:.2}x",
        ms(&flooded, 50.0) / ms(&quiet, 50.0),
        ms(&flooded, 99.0) / ms(&quiet, 99.0)
    );
    eprintln!(
        "registry resident memory: {rss_quiet} KiB quiet, at most {rss_flood} KiB during the flood"
    );
    let (quiet, flooded) = capped_flood(registrations, &files);
    eprintln!(
        "with the default relay rates: registrations p50 {:.3} ms quiet, {:.3} ms during a capped flood ({:.2}x); p99 {:.3} / {:.3} ms ({:.2}x)",
        ms(&quiet, 50.0),
        ms(&flooded, 50.0),
        ms(&flooded, 50.0) / ms(&quiet, 50.0),
        ms(&quiet, 99.0),
        ms(&flooded, 99.0),
        ms(&flooded, 99.0) / ms(&quiet, 99.0)
    );
    let cores = cpu.as_secs_f64() / took.as_secs_f64();
    eprintln!(
        "registry CPU over the transfer: {:.2} s, {cores:.2} cores; {:.4} cores per relayed MiB/s",
        cpu.as_secs_f64(),
        cores / rate
    );
}

/// Registrations on a registry with the default relay rates, quiet and
/// while two peers nobody can dial send a file through it as fast as it
/// lets them; both sorted.
fn capped_flood(registrations: usize, files: &DataDir) -> (Vec<Duration>, Vec<Duration>) {
    const MIB: u64 = 16;
    let source = files.path().join("capped.bin");
    write_payload(&source, MIB << 20);
    let downloads = files.path().join("capped-in");
    let downloads = downloads.display().to_string();
    let reg = Registry::start(&[]);
    let registry = reg.addr.to_string();
    let mut sender = PeerProc::start_with("sender", &registry, &["--listen", "127.0.0.2:0"]);
    sender.registered();
    let receiving = [
        "--listen",
        "127.0.0.3:0",
        "--accept-files-from",
        "sender",
        "--downloads",
        &downloads,
    ];
    let mut receiver = PeerProc::start_with("receiver", &registry, &receiving);
    receiver.registered();
    sender.expect(
        "the receiver joined",
        WAIT,
        is("joined", "name", "receiver"),
    );
    let mut quiet = register_many(&reg, registrations, "quiet");
    sender.say(&format!("/send receiver {}", source.display()));
    let ended = |e: &serde_json::Value| e["event"] == "file_done" || e["event"] == "file_failed";
    receiver.expect("the first bytes", WAIT, |e| {
        e["event"] == "file_progress" || ended(e)
    });
    let mut flooded = Vec::new();
    while flooded.len() < registrations && !receiver.seen.iter().any(ended) {
        let round = flooded.len() / 10;
        flooded.extend(register_many(&reg, 10, &format!("flood{round}-")));
        let _ = receiver.try_expect(Duration::from_millis(1), ended);
    }
    let end = receiver.expect("the end of the transfer", WAIT * 4, ended);
    assert_eq!(end["event"], "file_done", "{end}");
    quiet.sort();
    flooded.sort();
    (quiet, flooded)
}

/// `n` raw clients register one after the other, each timed from its
/// connect to its whole welcome; they leave once all are in.
fn register_many(reg: &Registry, n: usize, tag: &str) -> Vec<Duration> {
    let mut clients = Vec::with_capacity(n);
    let times = (0..n)
        .map(|i| {
            let start = Instant::now();
            let (client, _) = Client::register(reg.addr, &format!("{tag}{i}"), 4000);
            clients.push(client);
            start.elapsed()
        })
        .collect();
    drop(clients);
    times
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
