//! Cases 6-9: floods.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::identity::Identity;
use peerchat_core::limits::raise_fd_limit;
use peerchat_core::protocol::{Change, FromRegistry, ToRegistry};
use peerchat_testkit::client::{
    first_noise_message, register_frame, register_msg, secure_as, Client, Next,
};
use peerchat_testkit::launch::Registry;
use peerchat_testkit::procfs::{clock_ticks_per_second, cpu_ticks, fd_count};

use crate::case::Case;
use crate::ending::{finish_client, read_to_close, End};
use crate::herd::Herd;
use crate::system::{assert_alive, connect_small_rcvbuf, heavy};
use crate::wire::{change_name, heartbeat_frame, joined, left};

/// Case 6. Slow at both of the registry's deadlines: most dribble the
/// first Noise handshake message (cut at the handshake deadline without a
/// word: there is no session yet), a few finish the handshake and dribble
/// their register frame one Noise message per byte (told `handshake_timeout`
/// at the same deadline counted again from the end of the handshake).
#[test]
fn slowloris_connections_are_cut_at_the_handshake_deadline() {
    raise_fd_limit(u64::MAX);
    let _heavy = heavy();
    let mut case = Case::start("slowloris", &["--handshake-timeout", "3s"]);
    let deadline_after = Duration::from_secs(3);
    const SECURED: usize = 10;
    const N: usize = 500;
    let first = first_noise_message();
    let scripts: Vec<Vec<u8>> = (0..SECURED + N)
        .map(|i| {
            if i < SECURED {
                register_frame(&format!("slow{i}"), 6000)
            } else {
                first.clone()
            }
        })
        .collect();
    let mut herd = Herd::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    herd.add(case.reg.addr, SECURED, deadline, true);
    herd.add(case.reg.addr, N, deadline, false);
    herd.write_next(&scripts);
    let earliest_deadline = herd.conns[0].opened + deadline_after;

    // A real client gets in while they dribble.
    let t = Instant::now();
    let (mut real, welcome) = Client::register(case.reg.addr, "real", 4100);
    let took = t.elapsed();
    let registered_at = Instant::now();
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );
    herd.pump();
    // Every slow connection dribbles a second byte now, whatever the pace
    // of `pump_until_closed` below.
    herd.write_next(&scripts);
    eprintln!(
        "[slowloris] a real client registered in {took:?} beside {} slow connections",
        SECURED + N
    );
    assert!(took < Duration::from_secs(2), "registering took {took:?}");
    assert!(
        registered_at < earliest_deadline,
        "the slow connections were opened too slowly to test anything"
    );
    assert_eq!(
        herd.open_count(),
        SECURED + N,
        "all slow connections still open"
    );
    real.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut real, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("real", 4100, real.key()));
    case.expected.push(left("real", "quit"));

    let last_opened = herd.conns[SECURED + N - 1].opened;
    herd.pump_until_closed(last_opened + Duration::from_secs(5), Some(&scripts));
    assert!(
        herd.conns
            .iter()
            .zip(&scripts)
            .all(|(c, script)| c.sent >= 2 && c.sent <= 9 && c.sent < script.len()),
        "each slow connection sent 2-9 bytes (one every 500 ms), never all of them: {:?}",
        herd.conns.iter().map(|c| c.sent).collect::<Vec<_>>()
    );
    let (early, late) = (
        deadline_after - Duration::from_millis(50),
        deadline_after + Duration::from_millis(1500),
    );
    herd.assert_all_refused(
        "slowloris/registering",
        0..SECURED,
        "handshake_timeout",
        early,
        late,
    );
    herd.assert_all_refused(
        "slowloris/handshaking",
        SECURED..SECURED + N,
        "handshake_timeout",
        early,
        late,
    );
    drop(herd);
    case.finish();
}

/// Case 7.
#[test]
fn two_thousand_silent_connections_are_closed_at_the_deadline() {
    raise_fd_limit(u64::MAX);
    let _heavy = heavy();
    let case = Case::start("silent", &["--handshake-timeout", "2s"]);
    let deadline_after = Duration::from_secs(2);
    const N: usize = 2000;
    let mut herd = Herd::open(case.reg.addr, N, Instant::now() + Duration::from_secs(10));
    let opened_in = herd.conns[N - 1]
        .opened
        .duration_since(herd.conns[0].opened);
    // The registry holds them all before the deadline.
    let pid = case.pid();
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(fd_count(pid));
        if peak >= case.base.fds + N || Instant::now() >= herd.conns[0].opened + deadline_after / 2
        {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "[silent] opened {N} in {opened_in:?}; registry fds peaked at {peak} (baseline {})",
        case.base.fds
    );
    herd.pump();
    assert_eq!(herd.open_count(), N, "none closed before the deadline");
    assert!(
        peak >= case.base.fds + N,
        "the registry accepted only {} of {N}",
        peak - case.base.fds
    );
    let last_opened = herd.conns[N - 1].opened;
    herd.pump_until_closed(last_opened + Duration::from_secs(5), None);
    // Without a Noise handshake there is no session to say anything in.
    herd.assert_all_refused(
        "silent",
        0..N,
        "handshake_timeout",
        deadline_after - Duration::from_millis(50),
        deadline_after + Duration::from_millis(1500),
    );
    drop(herd);
    case.finish();
}

/// Case 8. A client that never reads. A Noise handshake per change would
/// make the thousands of updates that fill the registry's kernel send buffer
/// (autotuned up to tcp_wmem's maximum, 4 MiB here) take minutes in a debug
/// build, so the sloth also asks for heartbeat replies it never reads: its
/// connection then holds both the others' updates and its own replies.
#[test]
fn a_client_that_never_reads_is_dropped_as_slow_and_the_others_miss_nothing() {
    let _heavy = heavy();
    let mut case = Case::start("slow", &["--max-queue", "65536", "--no-relay"]);
    let addr = case.reg.addr;
    let sloth_id = Identity::generate();
    let mut sloth = secure_as(connect_small_rcvbuf(addr, 4096), &sloth_id);
    sloth.write_plain(&register_frame("sloth", 4200)).unwrap();
    let sloth_joined = joined("sloth", 4200, sloth_id.public());
    assert!(
        case.watcher.wait_for(&sloth_joined, Duration::from_secs(3)),
        "the sloth registered"
    );
    case.expected.push(sloth_joined.clone());

    // The sloth heartbeats, 256 at a time (some 400 KB/s), so it is
    // never evicted, but never reads: the replies pile up with the updates.
    // A write that times out (the registry busy for a while) is resumed
    // where it stopped, not given up: a sloth that went quiet would be
    // evicted for its silence before it could be dropped as slow.
    let stop = Arc::new(AtomicBool::new(false));
    let beats = {
        sloth
            .get_ref()
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            let batch = heartbeat_frame().repeat(256);
            let cap = Instant::now() + Duration::from_secs(60);
            let over = || stop.load(Ordering::Relaxed) || Instant::now() >= cap;
            let mut written = 0;
            'beats: for _ in 0..100_000 {
                if over() || written >= 64 << 20 {
                    break;
                }
                let wire = sloth.seal(&batch).expect("a heartbeat batch seals");
                let mut at = 0;
                while at < wire.len() {
                    match sloth.get_mut().write(&wire[at..]) {
                        Ok(n) => at += n,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            if over() {
                                break 'beats;
                            }
                        }
                        // Closed by the registry: dropped, as it should be.
                        Err(_) => break 'beats,
                    }
                }
                written += batch.len();
                thread::sleep(Duration::from_millis(10));
            }
            (sloth, written)
        })
    };

    // Meanwhile others come and go. Names of 32 four-byte characters make
    // every update as large as the protocol allows.
    const MIN_CYCLES: i64 = 20;
    let sloth_gone = left("sloth", "slow");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(45);
    let mut cycles = 0;
    let mut dropped_after = None;
    for i in 0..20_000i64 {
        if dropped_after.is_none() && case.watcher.changes().contains(&sloth_gone) {
            dropped_after = Some(i);
        }
        if (i >= MIN_CYCLES && dropped_after.is_some()) || Instant::now() >= deadline {
            break;
        }
        let name = format!("{i:05}{}", "\u{20000}".repeat(27));
        let port = 10_000 + i;
        let (mut c, welcome) = Client::register(addr, &name, port);
        assert!(
            matches!(welcome, FromRegistry::Welcome { .. }),
            "{welcome:?}"
        );
        c.send(&ToRegistry::Leave {});
        assert_ne!(finish_client(&mut c, Duration::from_secs(3)).end, End::Open);
        case.expected.push(joined(&name, port, c.key()));
        case.expected.push(left(&name, "quit"));
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sloth, written) = beats.join().expect("the sloth's heartbeat thread");
    eprintln!(
        "[slow] {cycles} register/leave cycles in {:?}; the sloth was seen dropped by cycle {dropped_after:?}, after sending {} KiB of heartbeats",
        start.elapsed(),
        written / 1024
    );
    assert!(
        case.watcher.wait_for(&sloth_gone, Duration::from_secs(3)),
        "the sloth was never dropped as slow after {cycles} cycles"
    );
    let seen = case.watcher.changes();
    let sloth_changes: Vec<&Change> = seen.iter().filter(|c| change_name(c) == "sloth").collect();
    assert_eq!(
        sloth_changes,
        vec![&sloth_joined, &sloth_gone],
        "one join and one slow leave for the sloth"
    );
    // Its leave comes where it happened among the others' changes.
    let at = seen.iter().position(|c| *c == sloth_gone).unwrap();
    case.expected.insert(at, sloth_gone.clone());
    assert!(
        case.reg
            .proc
            .stderr
            .wait_for("slow consumer", Duration::from_secs(2)),
        "the registry logs the slow close: {:?}",
        case.reg.proc.stderr.tail(5)
    );
    // The sloth's connection is closed: reading it to the end finds the end.
    let f = read_to_close(&mut sloth, Duration::from_secs(5));
    eprintln!(
        "[slow] the sloth could still read {} frames, then {:?}",
        f.frames.len(),
        f.end
    );
    assert_ne!(f.end, End::Open, "the slow connection was closed");
    drop(sloth);
    case.finish();
}

/// Case 9.
#[test]
fn out_of_descriptors_the_registry_neither_spins_nor_stays_stuck() {
    const PRLIMIT: &str = "/usr/bin/prlimit";
    if !std::path::Path::new(PRLIMIT).exists() {
        eprintln!("skipped: {PRLIMIT} (util-linux) is missing, so the registry cannot be started with 64 descriptors");
        return;
    }
    raise_fd_limit(u64::MAX);
    let _heavy = heavy();
    let reg = Registry::start_wrapped(&[PRLIMIT, "--nofile=64:64"], &["--stats-interval", "1s"]);
    let pid = reg.proc.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "registry", "prlimit exec'd the registry");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    let mut case = Case::with_registry("fds", reg);

    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(case.reg.addr).expect("connect (the backlog takes it)"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let held = fd_count(pid);
    let hz = clock_ticks_per_second();
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid) - cpu0;
    let wall = t0.elapsed();
    let share = cpu as f64 / hz as f64 / wall.as_secs_f64();
    eprintln!(
        "[fds] registry at {held} of 64 descriptors; CPU {cpu} ticks over {wall:?} ({:.1}%)",
        share * 100.0
    );
    assert!(
        case.reg.proc.stderr.contains("out of file descriptors"),
        "the registry ran out of descriptors and said so: {:?}",
        case.reg.proc.stderr.snapshot()
    );
    assert!(share < 0.3, "the registry spins: {:.1}% CPU", share * 100.0);
    assert_alive("fds", &mut case.reg);
    case.watcher.assert_open("fds");
    drop(flood);

    let t = Instant::now();
    let mut real = Client::connect(case.reg.addr);
    real.send(&register_msg("real", 4100));
    let welcome = real.next(Duration::from_secs(5));
    let took = t.elapsed();
    eprintln!("[fds] after the flood a real client registered in {took:?}");
    assert!(
        matches!(welcome, Next::Msg(FromRegistry::Welcome { .. })) && took < Duration::from_secs(5),
        "a real client registers within 5 s after the flood: {welcome:?} after {took:?}"
    );
    real.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut real, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("real", 4100, real.key()));
    case.expected.push(left("real", "quit"));
    case.finish();
}
