//! Case 10: split and coalesced frames.

use std::time::{Duration, Instant};

use peerchat_core::protocol::{Change, FromRegistry, ToRegistry};
use peerchat_testkit::client::{register_frame, Client, Next};

use crate::case::Case;
use crate::ending::{finish_client, registry_msgs, End};
use crate::wire::{dribble, heartbeat_frame, joined, leave_frame, left};

/// Exactly `n` heartbeat replies and nothing else within `timeout`, and no
/// more right after.
fn expect_heartbeats(label: &str, c: &mut Client, n: usize, timeout: Duration) {
    let mut got = 0;
    let deadline = Instant::now() + timeout;
    for _ in 0..n * 10 + 10 {
        if got == n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match c.next(left) {
            Next::Msg(FromRegistry::Heartbeat {}) => got += 1,
            Next::Msg(other) => panic!("{label}: expected heartbeats only, got {other:?}"),
            Next::Closed | Next::Timeout => break,
        }
    }
    assert_eq!(got, n, "{label}: heartbeat replies");
    let extra = c.next(Duration::from_millis(300));
    assert_eq!(
        extra,
        Next::Timeout,
        "{label}: one reply more than asked for"
    );
}

#[test]
fn frames_one_byte_per_write_or_a_hundred_per_write_work_as_usual() {
    let mut case = Case::start("split", &[]);
    let addr = case.reg.addr;
    let (mut normal, normal_welcome) = Client::register(addr, "normal", 4300);
    normal.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut normal, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("normal", 4300, normal.key()));
    case.expected.push(left("normal", "quit"));

    // Registration one byte per Noise message, one wire byte per write.
    let mut d = Client::connect(addr);
    dribble(&mut d.conn, &register_frame("dribble", 4301));
    let welcome = d.recv().expect("a welcome");
    case.expected.push(joined("dribble", 4301, d.key()));
    match (&welcome, &normal_welcome) {
        (
            FromRegistry::Welcome {
                version,
                name,
                addr,
                heartbeat_ms,
                timeout_ms,
                probes: _,
                more,
                peers,
            },
            FromRegistry::Welcome {
                version: v0,
                heartbeat_ms: h0,
                timeout_ms: t0,
                peers: p0,
                ..
            },
        ) => {
            assert_eq!(
                (
                    version,
                    name.as_str(),
                    addr.as_str(),
                    heartbeat_ms,
                    timeout_ms,
                    more
                ),
                (v0, "dribble", "127.0.0.1:4301", h0, t0, &false)
            );
            assert_eq!(peers, p0, "the same directory: just the control client");
        }
        other => panic!("split: {other:?}"),
    }
    // A heartbeat one byte per write, then a hundred in one Noise message,
    // then a hundred Noise messages of one heartbeat each in one write.
    dribble(&mut d.conn, &heartbeat_frame());
    expect_heartbeats("split/dribbled", &mut d, 1, Duration::from_secs(3));
    d.send_raw(&heartbeat_frame().repeat(100)).unwrap();
    expect_heartbeats(
        "split/100 in one message",
        &mut d,
        100,
        Duration::from_secs(3),
    );
    let mut wire = Vec::new();
    for _ in 0..100 {
        wire.extend(d.conn.seal(&heartbeat_frame()).unwrap());
    }
    d.send_wire(&wire).unwrap();
    expect_heartbeats(
        "split/100 messages in one write",
        &mut d,
        100,
        Duration::from_secs(3),
    );

    // Register and a hundred heartbeats in one write, cut into Noise
    // messages of 5 bytes that split every frame.
    let mut b = Client::connect(addr);
    let mut burst = register_frame("burst", 4302);
    burst.extend(heartbeat_frame().repeat(100));
    let mut wire = Vec::new();
    for piece in burst.chunks(5) {
        wire.extend(b.conn.seal(piece).unwrap());
    }
    b.send_wire(&wire).unwrap();
    let welcome = b.recv_any().expect("a welcome");
    assert!(
        matches!(&welcome, FromRegistry::Welcome { name, .. } if name == "burst"),
        "{welcome:?}"
    );
    case.expected.push(joined("burst", 4302, b.key()));
    expect_heartbeats("split/register+100", &mut b, 100, Duration::from_secs(3));
    // Leave and a heartbeat after it in one write: the leave wins.
    let mut last = leave_frame();
    last.extend(heartbeat_frame());
    b.send_raw(&last).unwrap();
    let f = finish_client(&mut b, Duration::from_secs(3));
    assert_ne!(f.end, End::Open);
    assert_eq!(registry_msgs("split/burst leave", &f), vec![]);
    case.expected.push(left("burst", "quit"));

    // Leave one byte per write.
    dribble(&mut d.conn, &leave_frame());
    let f = finish_client(&mut d, Duration::from_secs(3));
    assert_ne!(f.end, End::Open, "split: leave closes");
    // What the dribbler was told meanwhile: burst came and went.
    let told: Vec<Change> = registry_msgs("split/dribble leave", &f)
        .into_iter()
        .flat_map(|m| match m {
            FromRegistry::Update { changes } => changes,
            other => panic!("split: unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        told,
        vec![joined("burst", 4302, b.key()), left("burst", "quit")]
    );
    case.expected.push(left("dribble", "quit"));
    case.finish();
}
