//! `registry --metrics`: scraped over HTTP while peers register, are
//! refused and leave, parsed as the Prometheus text format, and the
//! counters and gauges move as they should.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use peerchat_core::protocol::ToRegistry;
use peerchat_testkit::client::{code_of, Client};
use peerchat_testkit::launch::{Registry, LONG};
use prometheus_parse::{Scrape, Value};

/// The address the registry said it serves metrics at.
fn metrics_addr(reg: &Registry) -> SocketAddr {
    let deadline = Instant::now() + LONG;
    loop {
        let found = reg.proc.stderr.snapshot().iter().find_map(|line| {
            let (_, rest) = line.split_once("metrics at http://")?;
            rest.trim().strip_suffix("/metrics")?.parse().ok()
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "the registry never said where its metrics are"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scrape(addr: SocketAddr) -> Scrape {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the exposition format parses")
}

/// The value of `metric` with `labels` (a counter by its `_total` name).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

/// Scrapes until `ok` holds (the metrics are brought up to date once a
/// second); fails with the last scrape.
fn until(addr: SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + LONG;
    loop {
        let scrape = scrape(addr);
        if ok(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "waited {LONG:?} for {what}; last scrape: {:#?}",
            scrape
                .samples
                .iter()
                .map(|s| (&s.metric, &s.labels, &s.value))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_metrics_follow_joins_refusals_and_leaves() {
    let reg = Registry::start(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&reg);
    let first = scrape(addr);
    assert_eq!(value(&first, "peerchat_registry_peers", &[]), Some(0.0));
    assert_eq!(
        value(&first, "peerchat_registry_joins_total", &[]),
        Some(0.0)
    );

    let (mut alice, _) = Client::register(reg.addr, "alice", 4001);
    let (bob, _) = Client::register(reg.addr, "bob", 4002);
    let (_carol, _) = Client::register(reg.addr, "carol", 4003);
    until(addr, "3 peers and 3 joins", |s| {
        value(s, "peerchat_registry_peers", &[]) == Some(3.0)
            && value(s, "peerchat_registry_joins_total", &[]) == Some(3.0)
    });

    let (_, refused) = Client::register(reg.addr, "ALICE", 4004);
    assert_eq!(code_of(Some(refused)), "name_taken");
    until(addr, "a name_taken rejection", |s| {
        value(
            s,
            "peerchat_registry_rejections_total",
            &[("code", "name_taken")],
        ) == Some(1.0)
    });

    drop(bob);
    alice.send(&ToRegistry::Leave {});
    let s = until(addr, "a disconnect and a quit", |s| {
        value(
            s,
            "peerchat_registry_leaves_total",
            &[("reason", "disconnected")],
        ) == Some(1.0)
            && value(s, "peerchat_registry_leaves_total", &[("reason", "quit")]) == Some(1.0)
            && value(s, "peerchat_registry_peers", &[]) == Some(1.0)
    });
    assert_eq!(
        value(&s, "peerchat_registry_names_reserved", &[]),
        Some(2.0)
    );
    assert!(value(&s, "peerchat_registry_connections_accepted_total", &[]) >= Some(4.0));
    assert!(value(&s, "peerchat_registry_frames_in_total", &[]) >= Some(5.0));
    assert!(value(&s, "peerchat_registry_bytes_out_total", &[]) > Some(0.0));
    assert!(
        value(&s, "peerchat_registry_loop_turn_seconds", &[]) > Some(0.0),
        "turns timed"
    );
    assert_eq!(
        value(&s, "peerchat_registry_evictions_total", &[]),
        Some(0.0)
    );
}

/// A client that sends its request a byte at a time, each byte in time
/// for the read before it not to time out, is cut off once its whole
/// request has taken the client timeout (5 s): it does not hold the
/// metrics thread, and the scrapes behind it, for as long as it likes.
#[test]
fn a_client_that_trickles_its_request_is_cut_off_and_scrapes_go_on() {
    let reg = Registry::start(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&reg);
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).unwrap();
    let trickle = std::thread::spawn(move || {
        // 30 s of trickling if nobody cuts it off; the request never ends.
        for byte in b"GET /metrics HTTP/1.1\r\nX: ".iter().cycle().take(60) {
            if slow.write_all(&[*byte]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    });
    std::thread::sleep(Duration::from_millis(300));
    let scraped = scrape(addr);
    assert_eq!(value(&scraped, "peerchat_registry_peers", &[]), Some(0.0));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "the scrape waited {:?} behind the slow client",
        started.elapsed()
    );
    assert!(trickle.join().unwrap(), "the slow client was never cut off");
}
