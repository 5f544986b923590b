//! Case 15: ways to close.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::Duration;

use peerchat_core::limits::raise_fd_limit;
use peerchat_core::protocol::Change;
use peerchat_core::secure::MAX_PLAINTEXT;
use peerchat_testkit::client::{register_frame, secure, Client};
use peerchat_testkit::procfs::{cpu_ticks, rss_kib};

use crate::case::Case;
use crate::crowd::Crowd;
use crate::ending::{finish_client, End};
use crate::system::{assert_alive, close_with_reset, connect_small_rcvbuf, heavy};
use crate::wire::{change_name, heartbeat_frame};

#[test]
fn reset_fin_and_close_during_a_big_snapshot_each_yield_one_left() {
    raise_fd_limit(u64::MAX);
    let _heavy = heavy();
    let mut case = Case::start("closes", &[]);
    case.unordered_prefix = Some("filler".into());
    let addr = case.reg.addr;
    // 300 others with 32-character names make the snapshot ~20 KB.
    let fillers: Vec<String> = (0..300)
        .map(|i| format!("filler-{i:03}-{}", "f".repeat(21)))
        .collect();
    assert!(fillers.iter().all(|n| n.chars().count() == 32));
    let crowd = Crowd::start(addr, fillers.clone(), 30_000);
    // Each filler's Noise handshake takes a while in a debug build.
    let all_in = case.watcher.wait_until(Duration::from_secs(60), |c| {
        c.iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name.starts_with("filler")))
            .count()
            == 300
    });
    assert!(all_in, "the 300 fillers registered");

    let mut names: Vec<String> = Vec::new();
    // RST.
    let (c, _) = Client::register(addr, "rst-close", 4401);
    close_with_reset(c.conn);
    names.push("rst-close".into());
    // FIN: shut our side, the registry closes its side.
    let (mut c, _) = Client::register(addr, "fin-close", 4402);
    c.stream().shutdown(Shutdown::Write).unwrap();
    let f = finish_client(&mut c, Duration::from_secs(3));
    assert_ne!(
        f.end,
        End::Open,
        "closes: the registry closes after our FIN"
    );
    drop(c);
    names.push("fin-close".into());
    // Closing while the registry still writes a snapshot that the small
    // receive window cannot take at once.
    for k in 0..6 {
        let name = format!("bigsnap-{k}");
        let mut s = secure(connect_small_rcvbuf(addr, 2048));
        s.write_plain(&register_frame(&name, 4410 + k)).unwrap();
        let mut first = [0u8; 1];
        s.get_ref()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        s.get_mut()
            .read_exact(&mut first)
            .expect("the welcome starts");
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s); // unread data: the kernel resets too
        }
        names.push(name);
    }
    // The snapshot above fits the registry's kernel send buffer (autotuned
    // up to 4 MiB on loopback), so the kernel, not the registry, is still
    // sending it. To close while the registry itself holds unsent bytes, a
    // client that never reads asks for 4 MiB of heartbeat replies: the
    // kernel buffer fills and the rest waits in the registry's queue (under
    // the default 4 MiB --max-queue, so it is not dropped as slow).
    let pid = case.pid();
    for k in 0..2 {
        let name = format!("flood-{k}");
        let mut s = secure(connect_small_rcvbuf(addr, 2048));
        s.write_plain(&register_frame(&name, 4430 + k)).unwrap();
        let rss_before = rss_kib(pid);
        s.get_ref()
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // Sealed and written a Noise message at a time: sealing 4 MiB in
        // one go takes a debug build longer than the 1 s eviction timeout.
        let beats = heartbeat_frame().repeat(1 << 18);
        let written = beats
            .chunks(MAX_PLAINTEXT - MAX_PLAINTEXT % 16)
            .try_for_each(|piece| s.write_plain(piece));
        if let Err(e) = written {
            panic!(
                "closes: {name}: the registry did not read every heartbeat ({e}); it said {:?}",
                case.reg.proc.stderr.tail(5)
            );
        }
        // Wait (bounded) until the registry has answered them all: its CPU
        // time stops moving, or nearly (the crowd's heartbeats cost a debug
        // build a tick now and then). Heartbeat meanwhile: the registry
        // may take longer than the 1 s timeout to get through them.
        let hb = heartbeat_frame();
        let mut last = cpu_ticks(pid);
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(100));
            let _ = s.write_plain(&hb);
            let now = cpu_ticks(pid);
            if now - last <= 1 {
                break;
            }
            last = now;
        }
        eprintln!(
            "[closes] {name}: registry VmRSS {} -> {} KiB with the replies queued",
            rss_before,
            rss_kib(pid)
        );
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s);
        }
        names.push(name);
    }
    // Closing right after the register, before any reply.
    for k in 0..4 {
        let name = format!("quick-{k}");
        let mut s = secure(TcpStream::connect(addr).unwrap());
        s.write_plain(&register_frame(&name, 4420 + k)).unwrap();
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s);
        }
        names.push(name);
    }
    let lefts = |c: &[Change], n: &str| {
        c.iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name == n))
            .count()
    };
    let joins = |c: &[Change], n: &str| {
        c.iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name == n))
            .count()
    };
    // Wait (bounded) for every name that surely registered to leave, and
    // for every quick one that joined, then longer than a busy registry's
    // update window (700 ms by default) and the sweep after it: a quick
    // one's join, and duplicates, would come by then, if at all.
    case.watcher.wait_until(Duration::from_secs(5), |c| {
        names.iter().all(|n| {
            let may_never_join = n.starts_with("quick") && joins(c, n) == 0;
            lefts(c, n) >= 1 || may_never_join
        })
    });
    thread::sleep(Duration::from_millis(1500));
    let seen = case.watcher.changes();
    for name in &names {
        let mine: Vec<&Change> = seen.iter().filter(|c| change_name(c) == name).collect();
        let quick = name.starts_with("quick");
        match mine.as_slice() {
            [Change::Joined { .. }, Change::Left { reason, .. }] if reason == "disconnected" => {}
            // A register the registry never read before the reset.
            [] if quick => eprintln!("[closes] {name}: the reset beat the register"),
            other => panic!("closes: {name}: expected one join and one left, got {other:?}"),
        }
    }
    assert_alive("closes", &mut case.reg);
    // The order of the named ones is that of the steps above.
    for c in seen
        .iter()
        .filter(|c| names.iter().any(|n| n == change_name(c)))
    {
        case.expected.push(c.clone());
    }
    crowd.stop();
    let all_gone = case.watcher.wait_until(Duration::from_secs(10), |c| {
        c.iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name.starts_with("filler")))
            .count()
            == 300
    });
    assert!(all_gone, "the 300 fillers left");
    let seen = case.watcher.changes();
    for f in &fillers {
        let mine: Vec<&Change> = seen.iter().filter(|c| change_name(c) == f).collect();
        assert!(
            matches!(mine.as_slice(), [Change::Joined { .. }, Change::Left { reason, .. }] if reason == "disconnected"),
            "closes: {f}: {mine:?}"
        );
    }
    case.finish();
}
