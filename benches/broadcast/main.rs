//! How fast changes and messages fan out, measured on the real release
//! binaries over loopback, each figure beside a floor: the same fan-out done
//! by plain TCP with no framework at all.
//!
//! 1. `registry_latency/N`: N raw-protocol clients are registered with a real
//!    `registry`; one more client registers (next iteration: leaves), and the
//!    clock runs from its `register` (`leave`) write until the last of the N
//!    has the matching `update` frame. `registry_leave_burst/N` (ten
//!    rounds of its own, not criterion's): `K` clients registered outside
//!    timing send `leave` at once, and the clock runs until all N have
//!    all `K` changes: the analogue of `K` pipelined PUBLISHes.
//! 2. `registry_churn/depthD/N`: N listeners; churn clients register and
//!    leave as fast as they can, D connections in flight (32, then 128); the
//!    rate is changes received, summed over the listeners, per second.
//! 3. `peer_latency/N`, `peer_latency_acking/N`, `peer_pipelined/N`: one real
//!    `peer --json` sends to N fake receivers owned by this bench (each
//!    registers with the registry, accepts the peer's link, and acks the
//!    chats of each read with one ack for the last, as a peer does).
//!    Latency: one stdin line, clock stopped when all N have the chat;
//!    `peer_latency` holds the acks until the clock stops (so that the one
//!    receiving thread does what the floor's reader does while timed),
//!    `peer_latency_acking` sends them as the chats arrive. Pipelined: `K`
//!    lines in one write, acks as the chats arrive, clock stopped when all
//!    N×K chats are in; `peer_pipelined_held` holds the acks instead, to
//!    show what handling them costs the peer.
//! 4. `floor_latency/N`, `floor_coalesced/N`: one thread writes a 64-byte
//!    message to N connected loopback sockets (TCP_NODELAY, as both binaries
//!    set), another thread with one mio `Poll` over the N receiving ends stops
//!    the clock when the last byte is in; coalesced: `K` messages per socket
//!    in one write. `sealed_floor_latency/N`, `sealed_floor_coalesced/N`:
//!    the same with a Noise session per socket (the project's handshake and
//!    cipher, set up in memory before timing): each message a 64-byte frame,
//!    a round's frames sealed as one Noise message per socket (as the event
//!    loop seals a turn's frames), and the reader opening each and counting
//!    its frames, the work every system compared with it does. Its ratios
//!    are the like-for-like ones for the registry's `leave` and the peer.
//!    A floor's clock starts before its writer thread is woken, so that
//!    it pays the one cross-core wake-up every system compared with it
//!    pays to take in the message (a registry, Redis or NATS waking to a
//!    write; section 5's clock starts at the awake writer's write).
//!
//! Every connection to the registry, and every link the peer dials to a
//! receiver, is a Noise session (protocol 2), as the binaries require: the
//! bench's clients are Noise initiators, its receivers Noise responders
//! whose keys the registry lists, so that the real peer accepts their links.
//! Handshakes happen outside timing in sections 1 and 3 (for a join in
//! section 1 the clock starts at the sealed `register`, after the registry
//! is known to have finished the handshake); in section 2 each churn
//! cycle's handshake is part of the work. The plain floor stays plain TCP.
//!
//! Sizes run in order, and for each size the floor runs right before the
//! figures compared with it. Every waiting side is one thread with one
//! `mio::Poll` over all its sockets, never a thread per socket. Latencies of
//! every measured iteration are kept; p50/p99, the ratios to the floor, CPU
//! shares and write calls per delivery go to stderr, with a summary at the
//! end. Servers start once, outside timing; every child process is killed on
//! drop; their key files and data directories live in a temporary directory
//! removed at the end. Run with `cargo bench --bench broadcast` (about four
//! minutes with Redis and NATS installed). For a quick check that everything works, pick sizes with
//! `BROADCAST_SIZES` (comma-separated; the churn bench runs for the sizes
//! among 100 and 1000) and let criterion sample briefly:
//! `BROADCAST_SIZES=10,100 cargo bench --bench broadcast -- --quick`.
//! `BROADCAST_PEER_ARGS` adds arguments to the peer's command line:
//! `BROADCAST_PEER_ARGS=--no-store` measures section 3 without the store.
//!
//! 5. `redis_latency/N`, `redis_coalesced/N`, `nats_latency/N`,
//!    `nats_coalesced/N`: Redis pub/sub and NATS, N subscribers of one
//!    subject, 64-byte publishes (one, then `K` pipelined), driven like the
//!    floors; each skipped where its server is not installed.
//!
//! One bench binary: its process, wire and report harness (what other
//! benches and tests share is in the testkit), and one module per section.

mod churn;
mod floor;
mod listeners;
mod peer;
mod procs;
mod pubsub;
mod report;
mod wire;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use peerchat_testkit::bins;
use peerchat_testkit::process::DataDir;

use crate::churn::ChurnSection;
use crate::floor::{floor_benches, measure};
use crate::listeners::LatencySection;
use crate::peer::PeerSection;
use crate::report::Report;

/// Receivers for the latency and fan-out benches.
const SIZES: [usize; 3] = [10, 100, 1000];
/// Listeners for the churn bench.
const CHURN_SIZES: [usize; 2] = [100, 1000];
/// Names the sizes to run instead of [`SIZES`], e.g. `10,100`.
const SIZES_VAR: &str = "BROADCAST_SIZES";
/// Messages per socket in one pipelined or coalesced round.
const K: usize = 100;
/// The floor's message; a one-change `update` and the peer's chat below are
/// about this size too.
const FLOOR_MSG: usize = 64;
/// What the peer sends: 16 bytes of text make a 64-byte chat frame (with
/// its `sent_at`) once ids pass 255.
const TEXT: &str = "fan-out 16 bytes";
/// Churn connections in flight at once: the first is the figure, the
/// second shows how the registry's per-turn coalescing responds to more.
const CHURN_DEPTHS: [usize; 2] = [32, 128];
/// Churn connections come from 127.0.2.1 … 127.0.2.64 so that one source
/// address's ephemeral ports never run short.
const CHURN_SOURCES: u64 = 64;
/// The port every raw registry client declares (nobody dials it).
const DECLARED_PORT: i64 = 9;
/// Longest any single wait may take before the bench gives up loudly.
const WAIT: Duration = Duration::from_secs(30);
/// The registry runs with `--heartbeat 5s --timeout 60s`; raw clients say
/// hello well before that, between iterations.
const KEEPALIVE: Duration = Duration::from_secs(4);
const SCRATCH: usize = 64 * 1024;
const LATENCY_SAMPLES: usize = 20;
const RATE_SAMPLES: usize = 10;
/// Rounds of the registry's leave burst, each timed alone.
const BURSTS: usize = 10;

/// Whether the command line's filter (criterion's, the first argument
/// that is not a flag) lets `name` run, for the parts measured without
/// criterion.
fn wanted(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|filter| name.contains(&filter))
}

/// [`SIZES`], or those named in `BROADCAST_SIZES`, smallest first (the
/// sections only ever add clients).
fn sizes() -> Vec<usize> {
    let Ok(list) = std::env::var(SIZES_VAR) else {
        return SIZES.to_vec();
    };
    let mut sizes: Vec<usize> = list
        .split(',')
        .map(|n| match n.trim().parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("{SIZES_VAR}={list:?}: write sizes like 10,100"),
        })
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn broadcast(c: &mut Criterion) {
    let fds = peerchat_core::limits::raise_fd_limit(u64::MAX);
    assert!(
        fds >= 4096,
        "the open-file limit is {fds}; these benches need about 4000 descriptors (raise `ulimit -Hn`)"
    );
    let bins = bins::dir();
    // Dropped last, once every process using it is gone.
    let dir = DataDir::fresh();
    let mut report = Report::default();
    let mut latency = LatencySection::start(bins, &dir);
    let mut churn = ChurnSection::start(bins, &dir);
    let mut fanout = PeerSection::start(bins, &dir);
    let redis = pubsub::Server::redis();
    let nats = pubsub::Server::nats();
    // Size by size, each floor right before the figures compared with it,
    // so that load from elsewhere on the machine drifts less between them.
    // The sections waiting their turn send heartbeats in between.
    for n in sizes() {
        floor_benches(c, n, &mut report);
        if let Some(server) = &redis {
            let floor = pubsub::redis_floor(server, n);
            let figures = measure(c, n, &floor, "redis", &report);
            // A filter that left it out measured nothing.
            if figures.0.count > 0 {
                report.pubsub.insert(("redis", n), figures);
            }
        }
        if let Some(server) = &nats {
            let floor = pubsub::nats_floor(server, n);
            let figures = measure(c, n, &floor, "nats", &report);
            // A filter that left it out measured nothing.
            if figures.0.count > 0 {
                report.pubsub.insert(("nats", n), figures);
            }
        }
        latency.bench(c, n, &mut report);
        latency.leave_burst(n, &mut report);
        churn.keepalive();
        fanout.keepalive();
        if CHURN_SIZES.contains(&n) {
            churn.bench(c, n, &mut report);
            latency.keepalive();
            fanout.keepalive();
        }
        fanout.bench(c, n, &mut report);
        latency.keepalive();
        churn.keepalive();
    }
    report.print();
}

criterion_group! {
    name = benches;
    // Short runs (the whole file in a few minutes on 2 cores); no plots.
    config = Criterion::default()
        .nresamples(10_000)
        .without_plots();
    targets = broadcast
}
criterion_main!(benches);
