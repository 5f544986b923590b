//! `--metrics ADDR`: the registry's counters for Prometheus, in the
//! OpenMetrics text format (prometheus-client), over HTTP from a thread of
//! its own, so that a scrape (or a client that connects and says nothing)
//! never holds up the loop.
//!
//! The loop's thread owns [`Metrics`], handles on the same atomics the
//! server's registry reads: it copies its counters in once a second
//! ([`Metrics::update`]) and times every turn ([`Metrics::turn`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peerchat_core::LoopStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as MetricRegistry;
use std::sync::atomic::AtomicU64;

use crate::{RelayStats, Stats};

/// A request longer than this (headers included) is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request and take the answer,
/// in all: the thread answers one client at a time.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

type Labels = Vec<(String, String)>;

/// What the registry knows at one moment, copied into the metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub peers: usize,
    pub connections: usize,
    pub reserved: usize,
    pub queued_bytes: usize,
    /// The update window now (`Registry::update_delay`).
    pub update_delay: Duration,
    pub loop_stats: LoopStats,
    pub stats: Stats,
    pub relay: RelayStats,
}

/// The loop's side: handles on the metrics, and the cumulative values last
/// copied in (counters only ever grow by the difference).
pub struct Metrics {
    peers: Gauge,
    connections: Gauge,
    reserved: Gauge,
    queued_bytes: Gauge,
    update_delay: Gauge<f64, AtomicU64>,
    joins: Counter,
    evictions: Counter,
    leaves: Family<Labels, Counter>,
    rejections: Family<Labels, Counter>,
    accepted: Counter,
    refused: Counter,
    frames_in: Counter,
    frames_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    slow: Counter,
    noise_failed: Counter,
    relays_open: Gauge,
    relayed_bytes: Counter,
    relays_opened: Counter,
    relays_refused: Counter,
    reversals: Counter,
    reversals_failed: Counter,
    turn_seconds: Histogram,
    last: Snapshot,
}

impl Metrics {
    /// The handles, and the registry of metrics to serve.
    pub fn new() -> (Metrics, MetricRegistry) {
        let mut registry = MetricRegistry::with_prefix("peerchat_registry");
        let metrics = Metrics {
            peers: Gauge::default(),
            connections: Gauge::default(),
            reserved: Gauge::default(),
            queued_bytes: Gauge::default(),
            update_delay: Gauge::default(),
            joins: Counter::default(),
            evictions: Counter::default(),
            leaves: Family::default(),
            rejections: Family::default(),
            accepted: Counter::default(),
            refused: Counter::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            slow: Counter::default(),
            noise_failed: Counter::default(),
            relays_open: Gauge::default(),
            relayed_bytes: Counter::default(),
            relays_opened: Counter::default(),
            relays_refused: Counter::default(),
            reversals: Counter::default(),
            reversals_failed: Counter::default(),
            // 10 µs to about 1.3 s.
            turn_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 9)),
            last: Snapshot::default(),
        };
        let m = &metrics;
        for (name, help, gauge) in [
            ("peers", "Peers registered now", &m.peers),
            (
                "connections",
                "Open connections, registered or not",
                &m.connections,
            ),
            (
                "names_reserved",
                "Names kept for their keys after their peers left",
                &m.reserved,
            ),
            (
                "queued_output_bytes",
                "Bytes waiting to be written to peers",
                &m.queued_bytes,
            ),
            (
                "relay_connections",
                "Relay connections open now (two per relayed link)",
                &m.relays_open,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "update_delay_seconds",
            "How long a change takes to reach every peer at most, a busy registry's update window (0: at once)",
            m.update_delay.clone(),
        );
        for (name, help, counter) in [
            ("joins", "Peers that registered", &m.joins),
            (
                "evictions",
                "Peers evicted for silence past the timeout",
                &m.evictions,
            ),
            ("connections_accepted", "Connections accepted", &m.accepted),
            (
                "connections_refused",
                "Connections closed at once: --max-connections reached",
                &m.refused,
            ),
            ("frames_in", "Frames read", &m.frames_in),
            ("frames_out", "Frames written", &m.frames_out),
            ("bytes_in", "Bytes read", &m.bytes_in),
            ("bytes_out", "Bytes written", &m.bytes_out),
            (
                "slow_consumers",
                "Peers dropped for not reading (--max-queue)",
                &m.slow,
            ),
            (
                "noise_failures",
                "Noise sessions that failed or timed out",
                &m.noise_failed,
            ),
            (
                "relayed_bytes",
                "Bytes passed between the two ends of relayed links",
                &m.relayed_bytes,
            ),
            ("relays_opened", "Relayed links that came up", &m.relays_opened),
            (
                "relays_refused",
                "Relays refused (--no-relay, limits, an unknown or unreachable peer) or not answered",
                &m.relays_refused,
            ),
            (
                "reversals",
                "Requests to dial a peer back that were passed on",
                &m.reversals,
            ),
            (
                "reversals_failed",
                "Requests to dial a peer back that were answered reverse_failed",
                &m.reversals_failed,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        for (name, help, family) in [
            (
                "leaves",
                "Peers that left, by the reason everyone was told",
                &m.leaves,
            ),
            (
                "rejections",
                "Registrations refused, by error code",
                &m.rejections,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "loop_turn_seconds",
            "Time the event loop spent on one turn",
            m.turn_seconds.clone(),
        );
        (metrics, registry)
    }

    /// One turn of the loop took `took`.
    pub fn turn(&self, took: Duration) {
        self.turn_seconds.observe(took.as_secs_f64());
    }

    /// Copies `now` in.
    pub fn update(&mut self, now: Snapshot) {
        let gauge = |g: &Gauge, v: usize| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.peers, now.peers);
        gauge(&self.connections, now.connections);
        gauge(&self.reserved, now.reserved);
        gauge(&self.queued_bytes, now.queued_bytes);
        gauge(&self.relays_open, now.relay.ends);
        self.update_delay.set(now.update_delay.as_secs_f64());
        let (was, is) = (&self.last, &now);
        let grow = |c: &Counter, before: u64, after: u64| {
            c.inc_by(after.saturating_sub(before));
        };
        grow(&self.joins, was.stats.joins, is.stats.joins);
        grow(&self.evictions, was.stats.evictions, is.stats.evictions);
        let (wl, il) = (&was.loop_stats, &is.loop_stats);
        grow(&self.accepted, wl.accepted, il.accepted);
        grow(&self.refused, wl.refused, il.refused);
        grow(&self.frames_in, wl.frames_in, il.frames_in);
        grow(&self.frames_out, wl.frames_out, il.frames_out);
        grow(&self.bytes_in, wl.bytes_in, il.bytes_in);
        grow(&self.bytes_out, wl.bytes_out, il.bytes_out);
        grow(&self.slow, wl.slow_closed, il.slow_closed);
        grow(&self.noise_failed, wl.secure_failed, il.secure_failed);
        grow(&self.relayed_bytes, was.relay.bytes, is.relay.bytes);
        grow(&self.relays_opened, was.relay.opened, is.relay.opened);
        grow(&self.relays_refused, was.relay.refused, is.relay.refused);
        grow(&self.reversals, was.stats.reversals, is.stats.reversals);
        let failed = (was.stats.reversals_failed, is.stats.reversals_failed);
        grow(&self.reversals_failed, failed.0, failed.1);
        let by = |family: &Family<Labels, Counter>,
                  label: &str,
                  before: &BTreeMap<&'static str, u64>,
                  after: &BTreeMap<&'static str, u64>| {
            for (value, count) in after {
                let old = before.get(value).copied().unwrap_or(0);
                let labels = vec![(label.to_string(), (*value).to_string())];
                family
                    .get_or_create(&labels)
                    .inc_by(count.saturating_sub(old));
            }
        };
        by(
            &self.leaves,
            "reason",
            &was.stats.leaves_by_reason,
            &is.stats.leaves_by_reason,
        );
        by(
            &self.rejections,
            "code",
            &was.stats.rejections_by_code,
            &is.stats.rejections_by_code,
        );
        self.last = now;
    }
}

/// Listens on `addr`; the thread serves `registry` until the process ends.
pub fn serve(addr: SocketAddr, registry: MetricRegistry) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &registry) {
                            tracing::debug!(error = %e, "a metrics request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept a metrics request");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(local)
}

/// What is left of the time a client has, or an error once it is over.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the client took too long"))
}

/// `write_all`, within the client's time: a client that takes the answer
/// a byte at a time is cut off when its time is over, not after each
/// write's own timeout.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One request, one answer, then the connection closes.
fn answer(mut stream: TcpStream, registry: &MetricRegistry) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    let (status, content_type, body) = loop {
        stream.set_read_timeout(Some(time_left(deadline)?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&request) {
            Ok(httparse::Status::Complete(_)) => break respond(&parsed, registry),
            Ok(httparse::Status::Partial) if request.len() < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) => {
                break (
                    "431 Request Header Fields Too Large",
                    TEXT,
                    "too long\n".into(),
                )
            }
            Err(e) => break ("400 Bad Request", TEXT, format!("{e}\n")),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write_by(&mut stream, head.as_bytes(), deadline)?;
    write_by(&mut stream, body.as_bytes(), deadline)?;
    // What the client sent past the request is read and dropped before the
    // close: closing with it unread would reset the connection, and the
    // client could lose the answer. For 200 ms in all, however it trickles.
    stream.shutdown(std::net::Shutdown::Write)?;
    let drained_by = Instant::now() + Duration::from_millis(200);
    let mut left = MAX_REQUEST * 8;
    while left > 0 {
        let Ok(time) = time_left(drained_by) else {
            break;
        };
        stream.set_read_timeout(Some(time))?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond(
    request: &httparse::Request,
    registry: &MetricRegistry,
) -> (&'static str, &'static str, String) {
    let path = request.path.unwrap_or("");
    let path = path.split('?').next().unwrap_or(path);
    match (request.method, path) {
        (Some("GET"), "/metrics") => {
            let mut body = String::new();
            match encode(&mut body, registry) {
                Ok(()) => ("200 OK", OPENMETRICS, body),
                Err(e) => ("500 Internal Server Error", TEXT, format!("{e}\n")),
            }
        }
        (Some("GET"), _) => (
            "404 Not Found",
            TEXT,
            "the metrics are at /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", TEXT, "only GET\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn counters_grow_by_what_changed_and_are_served() {
        let (mut metrics, registry) = Metrics::new();
        let mut snapshot = Snapshot {
            peers: 2,
            ..Snapshot::default()
        };
        snapshot.stats.joins = 3;
        snapshot.stats.leaves_by_reason.insert("quit", 1);
        snapshot.stats.rejections_by_code.insert("name_taken", 2);
        snapshot.relay.bytes = 1000;
        metrics.update(snapshot.clone());
        snapshot.stats.joins = 5;
        snapshot.stats.leaves_by_reason.insert("quit", 4);
        snapshot.relay.bytes = 4096;
        snapshot.relay.ends = 2;
        metrics.update(snapshot);
        metrics.turn(Duration::from_micros(50));
        let addr = serve("127.0.0.1:0".parse().unwrap(), registry).unwrap();

        let answer = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        for line in [
            "peerchat_registry_peers 2\n",
            "peerchat_registry_joins_total 5\n",
            "peerchat_registry_leaves_total{reason=\"quit\"} 4\n",
            "peerchat_registry_rejections_total{code=\"name_taken\"} 2\n",
            "peerchat_registry_loop_turn_seconds_count 1\n",
            "peerchat_registry_relayed_bytes_total 4096\n",
            "peerchat_registry_relay_connections 2\n",
            "# EOF\n",
        ] {
            assert!(answer.contains(line), "{line:?} in\n{answer}");
        }
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(addr, b"\x00\x01 nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_REQUEST)
        );
        assert!(get(addr, long.as_bytes()).starts_with("HTTP/1.1 431"));
    }
}
