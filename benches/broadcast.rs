//! How fast changes and messages fan out, measured on the real release
//! binaries over loopback, each figure beside a floor: the same fan-out done
//! by plain TCP with no framework at all.
//!
//! 1. `registry_latency/N`: N raw-protocol clients are registered with a real
//!    `registry`; one more client registers (next iteration: leaves), and the
//!    clock runs from its `register` (`leave`) write until the last of the N
//!    has the matching `update` frame.
//! 2. `registry_churn/depthD/N`: N listeners; churn clients register and
//!    leave as fast as they can, D connections in flight (32, then 128); the
//!    rate is changes received, summed over the listeners, per second.
//! 3. `peer_latency/N`, `peer_latency_acking/N`, `peer_pipelined/N`: one real
//!    `peer --json` sends to N fake receivers owned by this bench (each
//!    registers with the registry, accepts the peer's link, acks every
//!    chat). Latency: one stdin line, clock stopped when all N have the chat;
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
//!    in one write.
//!
//! Every connection to the registry, and every link the peer dials to a
//! receiver, is a Noise session (protocol 2), as the binaries require: the
//! bench's clients are Noise initiators, its receivers Noise responders
//! whose keys the registry lists, so that the real peer accepts their links.
//! Handshakes happen outside timing in sections 1 and 3 (for a join in
//! section 1 the clock starts at the sealed `register`, after the registry
//! is known to have finished the handshake); in section 2 each churn
//! cycle's handshake is part of the work. The floor stays plain TCP.
//!
//! Sizes run in order, and for each size the floor runs right before the
//! figures compared with it. Every waiting side is one thread with one
//! `mio::Poll` over all its sockets, never a thread per socket. Latencies of
//! every measured iteration are kept; p50/p99, the ratios to the floor, CPU
//! shares and write calls per delivery go to stderr, with a summary at the
//! end. Servers start once, outside timing; every child process is killed on
//! drop; their key files and data directories live in a temporary directory
//! removed at the end. Run with `cargo bench --bench broadcast` (about two
//! minutes). For a quick check that everything works, pick sizes with
//! `BROADCAST_SIZES` (comma-separated; the churn bench runs for the sizes
//! among 100 and 1000) and let criterion sample briefly:
//! `BROADCAST_SIZES=10,100 cargo bench --bench broadcast -- --quick`.
//!
//! Longer than the project's 800-line aim, for now: its own process, wire and
//! report harness comes first; that harness moves into the shared dev-only
//! testkit, and the four bench sections then become files of their own. That
//! split is one step of the planned architecture work (transport, machine
//! contract, peer rooms, testkit); done here alone, it would be done twice.

#[path = "../tests/common/workspace_bins.rs"]
mod workspace_bins;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{
    Change, FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION,
};
use peerchat_core::secure::{self, SecureChannel};
use peerchat_core::wire::FrameDecoder;

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

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// The bench's own directory for key files and the peers' data: nothing
/// touches `~/.local/share`. Removed when dropped.
struct BenchDir(PathBuf);

impl BenchDir {
    fn create() -> BenchDir {
        let dir = std::env::temp_dir().join(format!("peerchat-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("bench directory");
        BenchDir(dir)
    }

    /// A fresh path inside it, for a key file or a data directory.
    fn fresh(&self, what: &str) -> PathBuf {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        self.0
            .join(format!("{what}-{}", SEQ.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed when dropped; its stderr goes to a log file.
struct Proc {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &'static str, cmd: &mut Command) -> Proc {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "peerchat-bench-{}-{what}-{}.log",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&log).expect("log file");
        let child = cmd
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc { what, child, log }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); log:\n{}", self.what, self.log_tail());
        }
    }

    /// User + system CPU time so far, from /proc.
    fn cpu(&self) -> Duration {
        cpu_time(&format!("/proc/{}/stat", self.child.id()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

fn cpu_time(stat_path: &str) -> Duration {
    let Ok(stat) = fs::read_to_string(stat_path) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// `write`/`writev` calls of a process so far, all threads (`syscw` in
/// /proc/PID/io; `send` and `recv` are not counted there).
fn write_calls(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the registry (or the peer) and this bench process spent over a
/// whole benchmark, warm-up and untimed parts included: CPU as a share of
/// one core, and the child's `write`/`writev` calls per delivery.
struct Usage {
    wall: Instant,
    child: Duration,
    me: Duration,
    writes: u64,
}

impl Usage {
    fn start(child: &Proc) -> Usage {
        Usage {
            wall: Instant::now(),
            child: child.cpu(),
            me: cpu_time("/proc/self/stat"),
            writes: write_calls(child.child.id()),
        }
    }

    fn finish(self, child: &Proc, deliveries: u64) -> String {
        self.finish_discounting(child, deliveries, 0)
    }

    /// Like [`Usage::finish`], not counting `extra` writes the bench caused
    /// for its own bookkeeping (heartbeat replies to [`Fleet::fence`]).
    fn finish_discounting(self, child: &Proc, deliveries: u64, extra: u64) -> String {
        let wall = self.wall.elapsed().as_secs_f64();
        let child_share = (child.cpu() - self.child).as_secs_f64() / wall * 100.0;
        let me_share = (cpu_time("/proc/self/stat") - self.me).as_secs_f64() / wall * 100.0;
        let writes = (write_calls(child.child.id()) - self.writes).saturating_sub(extra);
        format!(
            "{} used {child_share:.0}% of a core, the bench process {me_share:.0}% ({wall:.1} s of wall time, untimed parts included); {} made {:.3} write/writev calls per delivery ({deliveries} deliveries)",
            child.what,
            child.what,
            writes as f64 / deliveries.max(1) as f64,
        )
    }
}

/// Where a registry listens and the key it proves.
#[derive(Clone, Copy)]
struct RegistryInfo {
    addr: SocketAddr,
    key: PublicKey,
}

fn start_registry(bins: &Path, dir: &BenchDir) -> (Proc, RegistryInfo) {
    let key_file = dir.fresh("registry.key");
    let mut cmd = Command::new(bins.join("registry"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--heartbeat",
        "5s",
        "--timeout",
        "60s",
    ])
    .arg("--key")
    .arg(&key_file)
    // Whatever else it keeps goes with it, not into the user's data
    // directory where a later run would find it.
    .env("XDG_DATA_HOME", dir.fresh("registry-data"))
    // As shipped: one log line per join and leave.
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut proc = Proc::spawn("registry", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = fs::read_to_string(&proc.log).unwrap_or_default();
        // It names its key before it says where it listens.
        if let Some(addr) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
            let addr = addr.trim().parse().expect("listening address");
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("registry key "))
                .map(|k| PublicKey::parse(k).expect("the registry's key"))
                .expect("the registry names its key before it listens");
            return (proc, RegistryInfo { addr, key });
        }
        proc.assert_alive();
        assert!(
            Instant::now() < deadline,
            "the registry never said it was listening"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) {
    loop {
        match poll.poll(events, Some(timeout)) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("poll failed: {e}"),
        }
    }
}

/// Reads what a readable socket holds, handing each chunk to `sink`.
/// Returns false at end of stream. A short read ends the drain: with
/// edge-triggered epoll on Linux every later arrival raises a new event, so
/// the extra read that would only return `WouldBlock` is skipped. The floor
/// reads the same way.
fn read_into(stream: &mut TcpStream, scratch: &mut [u8], mut sink: impl FnMut(&[u8])) -> bool {
    loop {
        match stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => {
                sink(&scratch[..n]);
                if n < scratch.len() {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return false,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Writes a few bytes to a non-blocking socket whose send buffer is empty.
fn write_small(stream: &mut TcpStream, bytes: &[u8]) {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => {}
        other => panic!(
            "a {}-byte write did not go out whole: {other:?}",
            bytes.len()
        ),
    }
}

fn register_frame(name: &str, port: i64) -> Vec<u8> {
    codec::encode_frame(&ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: name.into(),
        port,
    })
    .expect("encode register")
    .to_vec()
}

/// Seals frame-stream bytes into what goes on the wire.
fn sealed(channel: &mut SecureChannel, plain: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    channel
        .seal(plain, &mut wire)
        .expect("an open session seals");
    wire
}

/// Feeds bytes read off a secured connection to its session: plaintext
/// into `dec`, handshake replies (if any) onto `replies`. A failed session
/// fails the bench.
fn open_into(
    channel: &mut SecureChannel,
    bytes: &[u8],
    open: &mut [u8],
    replies: &mut Vec<u8>,
    dec: &mut FrameDecoder,
) {
    if let Err(e) = channel.receive(bytes, open, replies, &mut |p| dec.push(p)) {
        panic!("a Noise session failed: {e}");
    }
}

/// Reads what a readable secured socket holds, like [`read_into`], through
/// its session. Returns false at end of stream.
fn read_secure(
    stream: &mut TcpStream,
    scratch: &mut [u8],
    open: &mut [u8],
    channel: &mut SecureChannel,
    replies: &mut Vec<u8>,
    dec: &mut FrameDecoder,
) -> bool {
    read_into(stream, scratch, |b| {
        open_into(channel, b, open, replies, dec)
    })
}

/// A blocking connection to the registry with its Noise handshake done, all
/// three messages: nothing but frames is left to send.
struct Dialed {
    stream: StdStream,
    channel: SecureChannel,
    dec: FrameDecoder,
}

fn dial(registry: SocketAddr, key: PublicKey, identity: &Identity, open: &mut [u8]) -> Dialed {
    let mut stream = StdStream::connect(registry).expect("connect to the registry");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let mut channel = SecureChannel::initiator(
        identity,
        &peerchat_core::protocol::noise_prologue(),
        &mut out,
    );
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 1024];
    while !channel.is_established() {
        stream.write_all(&out).expect("handshake write");
        out.clear();
        let n = match stream.read(&mut buf) {
            Ok(0) => panic!("the registry closed a connection during its handshake"),
            Ok(n) => n,
            Err(e) => panic!("handshake read: {e}"),
        };
        open_into(&mut channel, &buf[..n], open, &mut out, &mut dec);
    }
    stream.write_all(&out).expect("handshake write");
    assert_eq!(channel.remote_key(), Some(key), "the registry's key");
    Dialed {
        stream,
        channel,
        dec,
    }
}

/// Byte patterns that let the readers classify frames without decoding
/// them; each is checked against the codec once, at start.
struct Shapes {
    heartbeat: Vec<u8>,
    /// An `update` body up to its `changes` array header.
    update_prefix: Vec<u8>,
    /// A `welcome` body's first bytes: `{"welcome": …`.
    welcome_prefix: Vec<u8>,
    /// An `error` body's first bytes.
    error_prefix: Vec<u8>,
    /// A `chat` body up to its `id` value: `{"chat": {"id": …`.
    chat_prefix: Vec<u8>,
}

impl Shapes {
    fn new() -> Shapes {
        let heartbeat = codec::encode(&FromRegistry::Heartbeat {}).unwrap();
        let mut update_prefix = codec::encode(&FromRegistry::Update { changes: vec![] }).unwrap();
        assert_eq!(update_prefix.pop(), Some(0x80), "empty changes array");
        let welcome = codec::encode(&FromRegistry::Welcome {
            version: PROTOCOL_VERSION,
            name: "x".into(),
            addr: "127.0.0.1:9".into(),
            heartbeat_ms: 1,
            timeout_ms: 2,
            more: false,
            peers: vec![],
        })
        .unwrap();
        let error = codec::encode(&FromRegistry::Error {
            code: "c".into(),
            reason: "r".into(),
        })
        .unwrap();
        let shapes = Shapes {
            heartbeat,
            update_prefix,
            welcome_prefix: welcome[..9].to_vec(),
            error_prefix: error[..7].to_vec(),
            chat_prefix: b"\xa1\x64chat\xa3\x62id".to_vec(),
        };
        assert_eq!(&shapes.welcome_prefix[2..], b"welcome");
        assert_eq!(&shapes.error_prefix[2..], b"error");
        shapes.check();
        shapes
    }

    /// The fast paths must agree with the codec, or the figures are wrong.
    fn check(&self) {
        let key = Identity::from_private(&[7; 32]).public();
        for count in [0usize, 1, 23, 24, 255, 256] {
            let changes = (0..count)
                .map(|i| match i % 2 {
                    0 => Change::Left {
                        name: format!("n{i}"),
                        reason: "quit".into(),
                    },
                    _ => Change::Joined {
                        name: format!("n{i}"),
                        addr: "127.0.0.1:9".into(),
                        key,
                    },
                })
                .collect();
            let body = codec::encode(&FromRegistry::Update { changes }).unwrap();
            assert_eq!(self.change_count(&body), Some(count as u64));
        }
        for id in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
        ] {
            let body = codec::encode(&LinkMsg::Chat {
                id,
                text: TEXT.into(),
                direct: false,
                sent_at: Some(1_796_000_000_000),
            })
            .unwrap();
            assert_eq!(self.chat_id(&body), Some(id), "chat id {id}");
        }
        let hb = codec::encode(&ToRegistry::Heartbeat {}).unwrap();
        assert_eq!(hb, self.heartbeat);
        let welcome = FromRegistry::Welcome {
            version: PROTOCOL_VERSION,
            name: "somebody".into(),
            addr: "127.0.0.1:9".into(),
            heartbeat_ms: 5000,
            timeout_ms: 60000,
            more: true,
            peers: vec![PeerEntry {
                name: "a".into(),
                addr: "127.0.0.1:9".into(),
                key,
            }],
        };
        assert!(codec::encode(&welcome)
            .unwrap()
            .starts_with(&self.welcome_prefix));
    }

    /// Changes in an `update` body; `None` for any other message.
    fn change_count(&self, body: &[u8]) -> Option<u64> {
        let rest = body.strip_prefix(self.update_prefix.as_slice())?;
        let (&head, rest) = rest.split_first()?;
        match head {
            0x80..=0x97 => Some(u64::from(head - 0x80)),
            0x98 => rest.first().map(|&b| u64::from(b)),
            0x99 => rest
                .get(..2)
                .map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
            0x9a => rest
                .get(..4)
                .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
            _ => None,
        }
    }

    /// The id of a `chat` body; `None` for any other message.
    fn chat_id(&self, body: &[u8]) -> Option<u64> {
        let rest = body.strip_prefix(self.chat_prefix.as_slice())?;
        let (&head, rest) = rest.split_first()?;
        let be = |n: usize| {
            rest.get(..n)
                .map(|b| b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
        };
        match head {
            0x00..=0x17 => Some(u64::from(head)),
            0x18 => be(1),
            0x19 => be(2),
            0x1a => be(4),
            0x1b => be(8),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Samples and the report
// ---------------------------------------------------------------------------

/// What each call of an `iter_custom` routine measured. Criterion makes
/// exactly `sample_size` calls after its warm-up, so the last ones are the
/// measurement.
struct Calls<T> {
    calls: Vec<Vec<T>>,
}

impl<T> Calls<T> {
    fn new() -> Self {
        Calls { calls: Vec::new() }
    }

    fn begin(&mut self) {
        self.calls.push(Vec::new());
    }

    fn push(&mut self, x: T) {
        if let Some(last) = self.calls.last_mut() {
            last.push(x);
        }
    }

    fn measured(&self, samples: usize) -> &[Vec<T>] {
        &self.calls[self.calls.len().saturating_sub(samples)..]
    }
}

#[derive(Clone, Copy)]
struct Lat {
    p50: Duration,
    p99: Duration,
    /// Criterion's mean: the mean of each sample's time per iteration.
    mean: Duration,
    count: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency_of(calls: &[Vec<Duration>]) -> Lat {
    let mut all: Vec<Duration> = calls.iter().flatten().copied().collect();
    all.sort_unstable();
    let per_sample: Vec<f64> = calls
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| c.iter().sum::<Duration>().as_secs_f64() / c.len() as f64)
        .collect();
    let mean = per_sample.iter().sum::<f64>() / per_sample.len().max(1) as f64;
    Lat {
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        mean: Duration::from_secs_f64(mean),
        count: all.len(),
    }
}

/// Deliveries per second over every measured iteration.
fn rate_of(calls: &[Vec<(u64, Duration)>]) -> f64 {
    let (n, t) = calls
        .iter()
        .flatten()
        .fold((0u64, Duration::ZERO), |(n, t), (dn, dt)| (n + dn, t + *dt));
    n as f64 / t.as_secs_f64().max(1e-9)
}

fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.1} k/s", r / 1e3)
    }
}

fn ratio(ours: Duration, floor: Duration) -> f64 {
    ours.as_secs_f64() / floor.as_secs_f64().max(1e-12)
}

#[derive(Default)]
struct Report {
    floor_lat: BTreeMap<usize, Lat>,
    floor_rate: BTreeMap<usize, f64>,
    reg_lat: BTreeMap<usize, (Lat, Duration, Duration)>,
    /// By (churn connections in flight, N): rate, changes per frame.
    churn: BTreeMap<(usize, usize), (f64, f64)>,
    /// With the p50 from the stdin write to reading the `sent` event.
    peer_lat: BTreeMap<usize, (Lat, Duration)>,
    /// The same with acks sent as the chats arrive.
    peer_lat_acking: BTreeMap<usize, (Lat, Duration)>,
    peer_rate: BTreeMap<usize, f64>,
    /// The same with acks held until the clock stops (diagnostic).
    peer_rate_held: BTreeMap<usize, f64>,
}

impl Report {
    fn latency_line(&self, what: &str, n: usize, lat: &Lat) {
        if lat.count == 0 {
            return; // filtered out on the command line
        }
        let vs = match self.floor_lat.get(&n) {
            Some(f) => format!(
                "; ratio to floor: p50 {:.2}x, p99 {:.2}x, mean {:.2}x",
                ratio(lat.p50, f.p50),
                ratio(lat.p99, f.p99),
                ratio(lat.mean, f.mean)
            ),
            None => String::new(),
        };
        eprintln!(
            "{what}/{n}: p50 {} p99 {} mean {} ({} iterations){vs}",
            fmt_d(lat.p50),
            fmt_d(lat.p99),
            fmt_d(lat.mean),
            lat.count
        );
    }

    fn rate_line(&self, what: &str, n: usize, rate: f64) {
        if rate <= 0.0 {
            return;
        }
        let vs = match self.floor_rate.get(&n) {
            Some(f) => format!("; ratio to coalesced floor {:.3}x", rate / f),
            None => String::new(),
        };
        eprintln!("{what}/{n}: {} deliveries{vs}", fmt_rate(rate));
    }

    fn print(&self) {
        let floor_p50 = |n: &usize| self.floor_lat.get(n).map(|f| f.p50);
        let floor_rate = |n: &usize| self.floor_rate.get(n).copied();
        eprintln!("\n===== broadcast summary =====");
        eprintln!("floor (plain TCP, {FLOOR_MSG}-byte messages, K = {K} when coalesced):");
        eprintln!("| N | p50 | p99 | mean | coalesced deliveries/s |");
        for (n, l) in &self.floor_lat {
            let r = floor_rate(n).map_or("-".into(), fmt_rate);
            eprintln!(
                "| {n} | {} | {} | {} | {r} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean)
            );
        }
        eprintln!("registry broadcast latency (join and leave together; then each alone):");
        eprintln!(
            "| N | p50 | p99 | mean | p50/floor | p99/floor | mean/floor | join p50 | leave p50 |"
        );
        for (n, (l, join, leave)) in &self.reg_lat {
            let f = self.floor_lat.get(n);
            let r = |ours: Duration, pick: fn(&Lat) -> Duration| {
                f.map_or("-".into(), |f| format!("{:.2}x", ratio(ours, pick(f))))
            };
            eprintln!(
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean),
                r(l.p50, |f| f.p50),
                r(l.p99, |f| f.p99),
                r(l.mean, |f| f.mean),
                fmt_d(*join),
                fmt_d(*leave)
            );
        }
        eprintln!("registry delta throughput under churn:");
        eprintln!("| in flight | N | deliveries/s | changes/s | changes per update frame | ratio to coalesced floor |");
        for ((depth, n), (rate, per_frame)) in &self.churn {
            let r = floor_rate(n).map_or("-".into(), |f| format!("{:.3}x", rate / f));
            eprintln!(
                "| {depth} | {n} | {} | {} | {per_frame:.1} | {r} |",
                fmt_rate(*rate),
                fmt_rate(rate / *n as f64)
            );
        }
        eprintln!("peer fan-out latency (acks: held until the clock stops, then as they arrive):");
        eprintln!(
            "| acks | N | p50 | p99 | mean | p50/floor | p99/floor | stdin to `sent` read, p50 |"
        );
        let rows = self
            .peer_lat
            .iter()
            .map(|r| ("held", r))
            .chain(self.peer_lat_acking.iter().map(|r| ("sent", r)));
        for (acks, (n, (l, sent))) in rows {
            let f = self.floor_lat.get(n);
            eprintln!(
                "| {acks} | {n} | {} | {} | {} | {} | {} | {} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean),
                floor_p50(n).map_or("-".into(), |f| format!("{:.2}x", ratio(l.p50, f))),
                f.map_or("-".into(), |f| format!("{:.2}x", ratio(l.p99, f.p99))),
                fmt_d(*sent)
            );
        }
        eprintln!(
            "peer fan-out pipelined (K = {K} lines per round; acks as they arrive, then held):"
        );
        eprintln!("| acks | N | deliveries/s | ratio to coalesced floor |");
        let rows = self
            .peer_rate
            .iter()
            .map(|r| ("sent", r))
            .chain(self.peer_rate_held.iter().map(|r| ("held", r)));
        for (acks, (n, rate)) in rows {
            let r = floor_rate(n).map_or("-".into(), |f| format!("{:.3}x", rate / f));
            eprintln!("| {acks} | {n} | {} | {r} |", fmt_rate(*rate));
        }
    }
}

fn latency_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(LATENCY_SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

/// Rounds of throughput benches are long: flat sampling, fewest samples.
fn rate_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(RATE_SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

// ---------------------------------------------------------------------------
// 4. The floor: plain TCP fan-out
// ---------------------------------------------------------------------------

struct Floor {
    arm: Option<Sender<u64>>,
    go: Option<Sender<usize>>,
    started: Receiver<Instant>,
    finished: Receiver<Result<Instant, String>>,
    threads: Vec<JoinHandle<()>>,
}

impl Floor {
    fn start(n: usize) -> Floor {
        let listener = StdListener::bind("127.0.0.1:0").expect("floor listener");
        let addr = listener.local_addr().unwrap();
        let mut writers = Vec::with_capacity(n);
        let mut readers = Vec::with_capacity(n);
        for _ in 0..n {
            let w = StdStream::connect(addr).expect("floor connect");
            w.set_nodelay(true).unwrap();
            let (r, _) = listener.accept().expect("floor accept");
            r.set_nonblocking(true).unwrap();
            writers.push(w);
            readers.push(TcpStream::from_std(r));
        }
        let (arm_tx, arm_rx) = mpsc::channel::<u64>();
        let (go_tx, go_rx) = mpsc::channel::<usize>();
        let (started_tx, started) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel();
        let writer = thread::spawn(move || {
            let msg: Vec<u8> = (0..FLOOR_MSG as u8).collect();
            for k in go_rx {
                let buf = msg.repeat(k);
                let t0 = Instant::now();
                for w in &mut writers {
                    w.write_all(&buf).expect("floor write");
                }
                if started_tx.send(t0).is_err() {
                    return;
                }
            }
        });
        let reader = thread::spawn(move || {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(1024);
            for (i, r) in readers.iter_mut().enumerate() {
                poll.registry()
                    .register(r, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let mut scratch = vec![0u8; SCRATCH];
            let mut got = vec![0u64; readers.len()];
            let mut target = 0u64;
            for bytes in arm_rx {
                target += bytes;
                let mut pending = got.iter().filter(|&&g| g < target).count();
                let deadline = Instant::now() + WAIT;
                let mut result = Ok(());
                while pending > 0 {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        result = Err(format!("floor: {pending} sockets short after {WAIT:?}"));
                        break;
                    };
                    poll_once(&mut poll, &mut events, left);
                    for event in events.iter() {
                        let i = event.token().0;
                        let before = got[i] >= target;
                        let mut count = 0;
                        read_into(&mut readers[i], &mut scratch, |b| count += b.len() as u64);
                        got[i] += count;
                        if !before && got[i] >= target {
                            pending -= 1;
                        }
                    }
                }
                let done = result.map(|()| Instant::now());
                if finished_tx.send(done).is_err() {
                    return;
                }
            }
        });
        Floor {
            arm: Some(arm_tx),
            go: Some(go_tx),
            started,
            finished,
            threads: vec![writer, reader],
        }
    }

    /// `k` messages to every socket, in one write each; the time from the
    /// first write to the last byte read.
    fn round(&self, k: usize) -> Duration {
        self.arm
            .as_ref()
            .unwrap()
            .send((k * FLOOR_MSG) as u64)
            .unwrap();
        self.go.as_ref().unwrap().send(k).unwrap();
        let t0 = self
            .started
            .recv_timeout(WAIT)
            .expect("the floor writer finished");
        let t1 = self
            .finished
            .recv_timeout(WAIT)
            .expect("the floor reader answered")
            .unwrap_or_else(|e| panic!("{e}"));
        t1 - t0
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.arm = None;
        self.go = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn floor_benches(c: &mut Criterion, n: usize, report: &mut Report) {
    {
        let floor = Floor::start(n);
        for _ in 0..10 {
            floor.round(1);
        }
        let mut calls = Calls::new();
        let mut group = latency_group(c, "floor_latency");
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                calls.begin();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = floor.round(1);
                    calls.push(d);
                    total += d;
                }
                total
            })
        });
        group.finish();
        let lat = latency_of(calls.measured(LATENCY_SAMPLES));
        report.latency_line("floor_latency", n, &lat);
        if lat.count > 0 {
            report.floor_lat.insert(n, lat);
        }

        let deliveries = (n * K) as u64;
        let mut calls = Calls::new();
        let mut group = rate_group(c, "floor_coalesced");
        group.throughput(Throughput::Elements(deliveries));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                calls.begin();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = floor.round(K);
                    calls.push((deliveries, d));
                    total += d;
                }
                total
            })
        });
        group.finish();
        let rate = rate_of(calls.measured(RATE_SAMPLES));
        report.rate_line("floor_coalesced", n, rate);
        if rate > 0.0 {
            report.floor_rate.insert(n, rate);
        }
    }
}

// ---------------------------------------------------------------------------
// 1 and 2. Raw registry listeners
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    /// The round whose awaited change this listener has seen.
    matched: u64,
    changes: u64,
    updates: u64,
    heartbeats: u64,
    change_target: u64,
    heartbeat_target: u64,
}

struct Listener {
    stream: TcpStream,
    channel: SecureChannel,
    dec: FrameDecoder,
    tally: Tally,
    open: bool,
}

/// What a wait waits for, on every listener.
enum Want<'a> {
    /// The `update` with this change (fast path: exactly this body).
    Change {
        body: &'a [u8],
        change: &'a Change,
        round: u64,
    },
    /// `change_target` changes counted.
    Changes,
    /// `heartbeat_target` heartbeat replies.
    Heartbeats,
}

impl Want<'_> {
    fn satisfied(&self, t: &Tally) -> bool {
        match self {
            Want::Change { round, .. } => t.matched == *round,
            Want::Changes => t.changes >= t.change_target,
            Want::Heartbeats => t.heartbeats >= t.heartbeat_target,
        }
    }
}

/// A client that joins (and, next time, leaves) to make one change.
struct Changer {
    dialed: Dialed,
    name: String,
}

/// N raw registry clients behind one `Poll`, read by the calling thread.
/// They, and the changers, share one key: one key may hold many names.
struct Fleet {
    registry: SocketAddr,
    registry_key: PublicKey,
    identity: Identity,
    poll: Poll,
    events: Events,
    conns: Vec<Listener>,
    scratch: Vec<u8>,
    /// Where Noise messages are decrypted.
    open: Box<[u8]>,
    shapes: Shapes,
    round: u64,
    names: u64,
    /// Calls of [`Fleet::fence`] so far: each costs the registry a write.
    fences: u64,
    last_keepalive: Instant,
}

impl Fleet {
    fn new(registry: RegistryInfo) -> Fleet {
        Fleet {
            registry: registry.addr,
            registry_key: registry.key,
            identity: Identity::generate(),
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            scratch: vec![0u8; SCRATCH],
            open: secure::scratch(),
            shapes: Shapes::new(),
            round: 0,
            names: 0,
            fences: 0,
            last_keepalive: Instant::now(),
        }
    }

    fn dial(&mut self) -> Dialed {
        dial(
            self.registry,
            self.registry_key,
            &self.identity,
            &mut self.open,
        )
    }

    fn fresh_name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    /// Registers listeners until there are `n`, then waits until every
    /// listener has read everything sent before one more join and leave.
    fn grow(&mut self, n: usize) {
        while self.conns.len() < n {
            let name = self.fresh_name("l");
            let Dialed {
                stream: mut std,
                mut channel,
                dec,
            } = self.dial();
            let register = sealed(&mut channel, &register_frame(&name, DECLARED_PORT));
            std.write_all(&register).unwrap();
            std.set_nonblocking(true).unwrap();
            let mut stream = TcpStream::from_std(std);
            self.poll
                .registry()
                .register(&mut stream, Token(self.conns.len()), Interest::READABLE)
                .unwrap();
            self.conns.push(Listener {
                stream,
                channel,
                dec,
                tally: Tally::default(),
                open: true,
            });
        }
        let mut changer = None;
        self.change_once(&mut changer);
        self.change_once(&mut changer);
        self.last_keepalive = Instant::now();
    }

    fn wait(&mut self, want: &Want, what: &str) -> Instant {
        let mut pending = self
            .conns
            .iter()
            .filter(|c| !want.satisfied(&c.tally))
            .count();
        let deadline = Instant::now() + WAIT;
        while pending > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!(
                    "{pending} of {} listeners still wait for {what} after {WAIT:?}",
                    self.conns.len()
                );
            };
            poll_once(&mut self.poll, &mut self.events, left);
            for event in self.events.iter() {
                let i = event.token().0;
                let c = &mut self.conns[i];
                if !c.open {
                    continue;
                }
                let before = want.satisfied(&c.tally);
                let mut replies = Vec::new();
                c.open = read_secure(
                    &mut c.stream,
                    &mut self.scratch,
                    &mut self.open,
                    &mut c.channel,
                    &mut replies,
                    &mut c.dec,
                );
                assert!(replies.is_empty(), "handshake messages in an open session");
                while let Some(body) = c.dec.next_frame().expect("valid framing") {
                    on_registry_frame(&self.shapes, &mut c.tally, &body, want);
                }
                let after = want.satisfied(&c.tally);
                if !before && after {
                    pending -= 1;
                }
                assert!(
                    c.open || after,
                    "the registry closed listener {i} while it waited for {what}"
                );
            }
        }
        Instant::now()
    }

    /// Between iterations: a heartbeat from everyone once in a while, and
    /// the replies read, so that the registry's timeout never strikes and
    /// no reply lands inside a timed iteration.
    fn keepalive(&mut self) {
        if self.last_keepalive.elapsed() < KEEPALIVE {
            return;
        }
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        for c in &mut self.conns {
            c.tally.heartbeat_target = c.tally.heartbeats + 1;
            let wire = sealed(&mut c.channel, &frame);
            write_small(&mut c.stream, &wire);
        }
        self.wait(&Want::Heartbeats, "heartbeat replies");
        self.last_keepalive = Instant::now();
    }

    /// Returns once the registry has read everything written to it before
    /// this call, on any connection: a heartbeat's reply on one listener.
    /// On loopback a write is in the receiving socket before it returns,
    /// so the registry's poll that sees the heartbeat sees every earlier
    /// write too, and it answers at the end of that turn.
    fn fence(&mut self) {
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        let c = &mut self.conns[0];
        c.tally.heartbeat_target = c.tally.heartbeats + 1;
        let wire = sealed(&mut c.channel, &frame);
        write_small(&mut c.stream, &wire);
        self.wait(&Want::Heartbeats, "a heartbeat reply");
        self.fences += 1;
    }

    /// One change, timed from the write that causes it until the last
    /// listener has it: a new client's registration, or, when `changer`
    /// holds one, that client's leave. Returns the time and whether it was a
    /// join. A new client's handshake is done before the clock starts, and
    /// [`Fleet::fence`] makes sure the registry has finished its side too,
    /// so that a join is timed from the `register` as before: the handshake
    /// is the connection's cost, not the broadcast's.
    fn change_once(&mut self, changer: &mut Option<Changer>) -> (Duration, bool) {
        self.round += 1;
        let round = self.round;
        match changer.take() {
            None => {
                let name = self.fresh_name("c");
                let mut dialed = self.dial();
                self.fence();
                let frame = sealed(&mut dialed.channel, &register_frame(&name, DECLARED_PORT));
                let change = Change::Joined {
                    name: name.clone(),
                    addr: format!("127.0.0.1:{DECLARED_PORT}"),
                    key: self.identity.public(),
                };
                let body = codec::encode(&FromRegistry::Update {
                    changes: vec![change.clone()],
                })
                .unwrap();
                let want = Want::Change {
                    body: &body,
                    change: &change,
                    round,
                };
                let t0 = Instant::now();
                dialed.stream.write_all(&frame).expect("send register");
                let t1 = self.wait(&want, "a join");
                expect_welcome(&mut dialed, &mut self.open);
                *changer = Some(Changer { dialed, name });
                (t1 - t0, true)
            }
            Some(Changer { mut dialed, name }) => {
                let leave = codec::encode_frame(&ToRegistry::Leave {}).unwrap();
                let frame = sealed(&mut dialed.channel, &leave);
                let change = Change::Left {
                    name,
                    reason: "quit".into(),
                };
                let body = codec::encode(&FromRegistry::Update {
                    changes: vec![change.clone()],
                })
                .unwrap();
                let want = Want::Change {
                    body: &body,
                    change: &change,
                    round,
                };
                let t0 = Instant::now();
                dialed.stream.write_all(&frame).expect("send leave");
                let t1 = self.wait(&want, "a leave");
                drain_to_eof(&mut dialed.stream);
                (t1 - t0, false)
            }
        }
    }
}

fn on_registry_frame(shapes: &Shapes, tally: &mut Tally, body: &[u8], want: &Want) {
    if body == shapes.heartbeat.as_slice() {
        tally.heartbeats += 1;
        return;
    }
    if let Some(k) = shapes.change_count(body) {
        tally.changes += k;
        tally.updates += 1;
        if let Want::Change {
            body: expected,
            change,
            round,
        } = want
        {
            let hit = body == *expected
                || matches!(
                    codec::decode::<FromRegistry>(body),
                    Ok(FromRegistry::Update { changes }) if changes.contains(change)
                );
            if hit {
                tally.matched = *round;
            }
        }
        return;
    }
    match codec::decode::<FromRegistry>(body) {
        Ok(FromRegistry::Error { code, reason }) => {
            panic!("the registry refused a listener: {code}: {reason}")
        }
        Ok(FromRegistry::Shutdown { reason }) => panic!("the registry shut down: {reason}"),
        Ok(_) => {} // welcome, snapshot
        Err(e) => panic!("undecodable frame from the registry: {e}"),
    }
}

/// Blocking read of a fresh client's first frame, which must be a welcome.
fn expect_welcome(dialed: &mut Dialed, open: &mut [u8]) {
    let mut buf = [0u8; 16 * 1024];
    let mut replies = Vec::new();
    loop {
        if let Some(body) = dialed.dec.next_frame().expect("valid framing") {
            match codec::decode::<FromRegistry>(&body) {
                Ok(FromRegistry::Welcome { .. }) => return,
                other => panic!("expected a welcome, got {other:?}"),
            }
        }
        match dialed.stream.read(&mut buf) {
            Ok(0) => panic!("the registry closed a new client before its welcome"),
            Ok(n) => open_into(
                &mut dialed.channel,
                &buf[..n],
                open,
                &mut replies,
                &mut dialed.dec,
            ),
            Err(e) => panic!("reading a welcome: {e}"),
        }
    }
}

/// Reads and discards until the registry closes the connection.
fn drain_to_eof(stream: &mut StdStream) {
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("waiting for the registry to close: {e}"),
        }
    }
    panic!("the registry did not close a client that left");
}

/// Bench 1: its own registry and listeners, kept across sizes.
struct LatencySection {
    registry: Proc,
    fleet: Fleet,
}

impl LatencySection {
    fn start(bins: &Path, dir: &BenchDir) -> Self {
        let (registry, info) = start_registry(bins, dir);
        LatencySection {
            registry,
            fleet: Fleet::new(info),
        }
    }

    fn keepalive(&mut self) {
        self.fleet.keepalive();
    }

    fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
        let LatencySection { registry, fleet } = self;
        fleet.grow(n);
        let mut changer = None;
        let mut calls: Calls<(Duration, bool)> = Calls::new();
        let usage = Usage::start(registry);
        let fences = fleet.fences;
        let mut group = latency_group(c, "registry_latency");
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                calls.begin();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    fleet.keepalive();
                    let (d, join) = fleet.change_once(&mut changer);
                    calls.push((d, join));
                    total += d;
                }
                total
            })
        });
        group.finish();
        if changer.is_some() {
            fleet.change_once(&mut changer);
        }
        let rounds: usize = calls.calls.iter().map(Vec::len).sum();
        let usage = usage.finish_discounting(registry, (rounds * n) as u64, fleet.fences - fences);
        registry.assert_alive();
        let measured = calls.measured(LATENCY_SAMPLES);
        let only = |join: bool| -> Vec<Vec<Duration>> {
            measured
                .iter()
                .map(|c| c.iter().filter(|x| x.1 == join).map(|x| x.0).collect())
                .collect()
        };
        let both: Vec<Vec<Duration>> = measured
            .iter()
            .map(|c| c.iter().map(|x| x.0).collect())
            .collect();
        let lat = latency_of(&both);
        let (join, leave) = (latency_of(&only(true)).p50, latency_of(&only(false)).p50);
        report.latency_line("registry_latency", n, &lat);
        if lat.count > 0 {
            eprintln!(
                "registry_latency/{n}: join p50 {}, leave p50 {}; {usage}",
                fmt_d(join),
                fmt_d(leave)
            );
        }
        if lat.count > 0 {
            report.reg_lat.insert(n, (lat, join, leave));
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Churn
// ---------------------------------------------------------------------------

enum ChurnState {
    Connecting,
    /// The first Noise message is out; the registry's answer is awaited.
    Handshake,
    AwaitWelcome,
    Leaving,
}

struct ChurnConn {
    stream: TcpStream,
    state: ChurnState,
    /// The Noise session, from the connect until the leave is sealed.
    channel: Option<SecureChannel>,
    /// The frame stream's plaintext until the welcome's first bytes.
    buf: Vec<u8>,
}

/// What every churn connection of the thread shares. All of them prove the
/// same key: one key may hold many names.
struct ChurnKit {
    registry: SocketAddr,
    registry_key: PublicKey,
    identity: Identity,
    shapes: Shapes,
    /// Where Noise messages are decrypted.
    open: Box<[u8]>,
    leave: Vec<u8>,
}

/// A thread that runs register/leave cycles on command, a given number of
/// connections in flight, and answers when a batch is done.
struct Churn {
    cmd: Option<Sender<(usize, usize)>>,
    done: Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

impl Churn {
    fn start(registry: RegistryInfo) -> Churn {
        let (cmd, cmd_rx) = mpsc::channel::<(usize, usize)>();
        let (done_tx, done) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut kit = ChurnKit {
                registry: registry.addr,
                registry_key: registry.key,
                identity: Identity::generate(),
                shapes: Shapes::new(),
                open: secure::scratch(),
                leave: codec::encode_frame(&ToRegistry::Leave {}).unwrap().to_vec(),
            };
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(256);
            let mut seq = 0u64;
            for (cycles, depth) in cmd_rx {
                let mut slots: Vec<Option<ChurnConn>> = (0..depth).map(|_| None).collect();
                let result = churn_batch(
                    &mut poll,
                    &mut events,
                    &mut slots,
                    &mut kit,
                    cycles,
                    &mut seq,
                );
                for slot in &mut slots {
                    if let Some(mut conn) = slot.take() {
                        let _ = poll.registry().deregister(&mut conn.stream);
                    }
                }
                if done_tx.send(result).is_err() {
                    return;
                }
            }
        });
        Churn {
            cmd: Some(cmd),
            done,
            thread: Some(thread),
        }
    }

    fn run(&self, cycles: usize, depth: usize) {
        self.cmd.as_ref().unwrap().send((cycles, depth)).unwrap();
    }

    fn finish(&self) {
        match self.done.recv_timeout(WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("churn failed: {e}"),
            Err(e) => panic!("churn did not finish: {e}"),
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.cmd = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn churn_open(
    poll: &Poll,
    slot: usize,
    registry: SocketAddr,
    seq: &mut u64,
) -> Result<ChurnConn, String> {
    *seq += 1;
    let source = Ipv4Addr::new(127, 0, 2, 1 + (*seq % CHURN_SOURCES) as u8);
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    match socket.connect(&registry.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(format!("connect: {e}")),
    }
    let mut stream = TcpStream::from_std(socket.into());
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    poll.registry()
        .register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(|e| e.to_string())?;
    Ok(ChurnConn {
        stream,
        state: ChurnState::Connecting,
        channel: None,
        buf: Vec::new(),
    })
}

/// Writes a few bytes whole to a non-blocking socket, or says why not.
fn write_whole(stream: &mut TcpStream, bytes: &[u8], what: &str) -> Result<(), String> {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        other => Err(format!("{what} write: {other:?}")),
    }
}

/// Advances one churn connection: connect, Noise handshake, `register`
/// (sent with the handshake's last message, as a peer does), welcome,
/// `leave`; `Ok(true)` once the registry has closed it after its leave.
fn churn_step(conn: &mut ChurnConn, kit: &mut ChurnKit, seq: u64) -> Result<bool, String> {
    if let ChurnState::Connecting = conn.state {
        if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
            return Err(format!("connect: {e}"));
        }
        match conn.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) => return Err(format!("connect: {e}")),
        }
        let mut first = Vec::new();
        conn.channel = Some(SecureChannel::initiator(
            &kit.identity,
            &peerchat_core::protocol::noise_prologue(),
            &mut first,
        ));
        write_whole(&mut conn.stream, &first, "handshake")?;
        conn.state = ChurnState::Handshake;
    }
    let mut scratch = [0u8; 16 * 1024];
    loop {
        let n = match conn.stream.read(&mut scratch) {
            Ok(0) => {
                return match conn.state {
                    ChurnState::Leaving => Ok(true),
                    _ => Err("the registry closed a churn client before its welcome".into()),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return match conn.state {
                    ChurnState::Leaving => Ok(true),
                    _ => Err("a churn client was reset".into()),
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        // After the leave, the rest (welcome, snapshot, updates) is dropped
        // unread.
        let Some(channel) = conn.channel.as_mut() else {
            continue;
        };
        let mut out = Vec::new();
        let buf = &mut conn.buf;
        let completed = channel
            .receive(&scratch[..n], &mut kit.open, &mut out, &mut |p| {
                buf.extend_from_slice(p)
            })
            .map_err(|e| format!("Noise session: {e}"))?;
        if completed {
            if channel.remote_key() != Some(kit.registry_key) {
                return Err(format!(
                    "the registry proved {:?}, not its key",
                    channel.remote_key()
                ));
            }
            let register = register_frame(&format!("z{seq}"), DECLARED_PORT);
            channel
                .seal(&register, &mut out)
                .map_err(|e| format!("seal: {e}"))?;
            conn.state = ChurnState::AwaitWelcome;
        }
        if !out.is_empty() {
            write_whole(&mut conn.stream, &out, "handshake and register")?;
        }
        if let ChurnState::AwaitWelcome = conn.state {
            let tag = kit.shapes.welcome_prefix.len();
            if conn.buf.len() < 4 + tag {
                continue;
            }
            if conn.buf[4..4 + tag] != kit.shapes.welcome_prefix[..] {
                // Not a welcome: show what it was once it is whole.
                let mut dec = FrameDecoder::new(1 << 20);
                dec.push(&conn.buf);
                if let Ok(Some(body)) = dec.next_frame() {
                    return Err(format!(
                        "expected a welcome, got {:?}",
                        codec::decode::<FromRegistry>(&body)
                    ));
                }
                continue;
            }
            // Registered: the join went out; leave at once. The rest of the
            // welcome and snapshot is read and dropped.
            let leave = sealed(channel, &kit.leave);
            write_whole(&mut conn.stream, &leave, "leave")?;
            conn.state = ChurnState::Leaving;
            conn.channel = None;
            conn.buf = Vec::new();
        }
    }
}

fn churn_batch(
    poll: &mut Poll,
    events: &mut Events,
    slots: &mut [Option<ChurnConn>],
    kit: &mut ChurnKit,
    cycles: usize,
    seq: &mut u64,
) -> Result<(), String> {
    let registry = kit.registry;
    let mut started = 0;
    let mut finished = 0;
    let mut names = vec![0u64; slots.len()];
    for (i, slot) in slots.iter_mut().enumerate() {
        if started < cycles {
            *slot = Some(churn_open(poll, i, registry, seq)?);
            names[i] = *seq;
            started += 1;
        }
    }
    let deadline = Instant::now() + WAIT;
    while finished < cycles {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(format!("{finished} of {cycles} cycles done after {WAIT:?}"));
        };
        poll_once(poll, events, left);
        for event in events.iter() {
            let i = event.token().0;
            let Some(conn) = slots[i].as_mut() else {
                continue;
            };
            if !churn_step(conn, kit, names[i])? {
                continue;
            }
            if let Some(mut conn) = slots[i].take() {
                let _ = poll.registry().deregister(&mut conn.stream);
            }
            finished += 1;
            if started < cycles {
                // A stale event for this slot later in the batch finds a
                // connection still connecting, or nothing to read: harmless.
                slots[i] = Some(churn_open(poll, i, registry, seq)?);
                names[i] = *seq;
                started += 1;
            }
        }
    }
    Ok(())
}

/// Register/leave cycles per timed round: each is two changes for every
/// listener. Enough that filling and draining the pipeline is a small part
/// of a round; few enough that a round lasts tens of milliseconds.
fn churn_cycles(n: usize, depth: usize) -> usize {
    let base = if n >= 1000 { 200 } else { 1000 };
    base.max(4 * depth)
}

/// Bench 2: its own registry, listeners and churn thread.
struct ChurnSection {
    registry: Proc,
    fleet: Fleet,
    churn: Churn,
}

impl ChurnSection {
    fn start(bins: &Path, dir: &BenchDir) -> Self {
        let (registry, info) = start_registry(bins, dir);
        ChurnSection {
            registry,
            fleet: Fleet::new(info),
            churn: Churn::start(info),
        }
    }

    fn keepalive(&mut self) {
        self.fleet.keepalive();
    }

    fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
        for depth in CHURN_DEPTHS {
            self.bench_depth(c, n, depth, report);
        }
    }

    fn bench_depth(&mut self, c: &mut Criterion, n: usize, depth: usize, report: &mut Report) {
        let ChurnSection {
            registry,
            fleet,
            churn,
        } = self;
        fleet.grow(n);
        let cycles = churn_cycles(n, depth);
        let per_listener = 2 * cycles as u64;
        let deliveries = n as u64 * per_listener;
        let mut calls = Calls::new();
        let mut frames: Vec<(u64, u64)> = Vec::new();
        let usage = Usage::start(registry);
        let mut group = rate_group(c, "registry_churn");
        group.throughput(Throughput::Elements(deliveries));
        group.bench_function(BenchmarkId::new(format!("depth{depth}"), n), |b| {
            b.iter_custom(|iters| {
                calls.begin();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    fleet.keepalive();
                    let (changes0, updates0) = totals(fleet);
                    for l in &mut fleet.conns {
                        l.tally.change_target = l.tally.changes + per_listener;
                    }
                    let t0 = Instant::now();
                    churn.run(cycles, depth);
                    let t1 = fleet.wait(&Want::Changes, "churn changes");
                    churn.finish();
                    let (changes1, updates1) = totals(fleet);
                    assert_eq!(changes1 - changes0, deliveries, "changes delivered");
                    frames.push((changes1 - changes0, updates1 - updates0));
                    calls.push((deliveries, t1 - t0));
                    total += t1 - t0;
                }
                total
            })
        });
        group.finish();
        let (ch, up) = frames.iter().fold((0, 0), |(a, b), (c, u)| (a + c, b + u));
        let usage = usage.finish(registry, ch);
        registry.assert_alive();
        let rate = rate_of(calls.measured(RATE_SAMPLES));
        let per_frame = ch as f64 / up.max(1) as f64;
        let what = format!("registry_churn/depth{depth}");
        report.rate_line(&what, n, rate);
        if rate > 0.0 {
            eprintln!(
                "{what}/{n}: {cycles} register/leave cycles per round; {per_frame:.1} changes per update frame; {usage}"
            );
            report.churn.insert((depth, n), (rate, per_frame));
        }
    }
}

fn totals(fleet: &Fleet) -> (u64, u64) {
    fleet.conns.iter().fold((0, 0), |(c, u), l| {
        (c + l.tally.changes, u + l.tally.updates)
    })
}

// ---------------------------------------------------------------------------
// 3. Peer fan-out: fake receivers and a real `peer --json`
// ---------------------------------------------------------------------------

enum RxEntry {
    /// A receiver's registry connection.
    Registry {
        stream: TcpStream,
        channel: SecureChannel,
        dec: FrameDecoder,
        heartbeats: u64,
        open: bool,
    },
    /// A receiver's listening socket, whose port it registered.
    Listener {
        listener: TcpListener,
        receiver: usize,
    },
    /// A link the peer dialed to a receiver: a Noise session in which the
    /// receiver proves the key the registry lists for it.
    Link {
        stream: TcpStream,
        channel: SecureChannel,
        dec: FrameDecoder,
        receiver: usize,
        hello: bool,
        /// Ack frames not yet sealed.
        acks: Vec<u8>,
        /// Bytes for the wire: handshake replies, sealed acks.
        out: Vec<u8>,
        open: bool,
    },
}

/// N fake receivers behind one `Poll`, run by the calling thread. Each has
/// its own key, which it proves both to the registry and on its links.
struct Receivers {
    registry: SocketAddr,
    registry_key: PublicKey,
    identities: Vec<Identity>,
    poll: Poll,
    events: Events,
    entries: Vec<RxEntry>,
    chats: Vec<u64>,
    target: Vec<u64>,
    scratch: Vec<u8>,
    /// Where Noise messages are decrypted.
    open: Box<[u8]>,
    shapes: Shapes,
    last_keepalive: Instant,
    /// Keep acks queued until [`Receivers::release_acks`].
    hold_acks: bool,
}

/// Seals the acks waiting as plaintext (unless they are held) into one
/// Noise message, then writes what is ready for the wire as far as the
/// socket takes it; the rest goes on the next writable event.
fn flush_link(
    stream: &mut TcpStream,
    channel: &mut SecureChannel,
    acks: &mut Vec<u8>,
    out: &mut Vec<u8>,
    open: &mut bool,
    hold: bool,
) {
    if !hold && !acks.is_empty() && channel.is_established() {
        channel.seal(acks, out).expect("an open session seals");
        acks.clear();
    }
    while !out.is_empty() && *open {
        match stream.write(out) {
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => *open = false,
        }
    }
}

impl Receivers {
    fn new(registry: RegistryInfo) -> Receivers {
        Receivers {
            registry: registry.addr,
            registry_key: registry.key,
            identities: Vec::new(),
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(1024),
            entries: Vec::new(),
            chats: Vec::new(),
            target: Vec::new(),
            scratch: vec![0u8; SCRATCH],
            open: secure::scratch(),
            shapes: Shapes::new(),
            last_keepalive: Instant::now(),
            hold_acks: false,
        }
    }

    fn add(&mut self, mut entry: RxEntry) {
        let token = Token(self.entries.len());
        let registry = self.poll.registry();
        match &mut entry {
            RxEntry::Registry { stream, .. } => {
                registry.register(stream, token, Interest::READABLE)
            }
            RxEntry::Listener { listener, .. } => {
                registry.register(listener, token, Interest::READABLE)
            }
            RxEntry::Link { stream, .. } => {
                registry.register(stream, token, Interest::READABLE | Interest::WRITABLE)
            }
        }
        .expect("register with the poll");
        self.entries.push(entry);
    }

    /// Registers receivers (listening socket + registry client) up to `n`.
    fn grow(&mut self, n: usize) {
        while self.chats.len() < n {
            let receiver = self.chats.len();
            let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
            let port = listener.local_addr().unwrap().port();
            let identity = Identity::generate();
            let Dialed {
                stream: mut std,
                mut channel,
                dec,
            } = dial(self.registry, self.registry_key, &identity, &mut self.open);
            self.identities.push(identity);
            let frame = register_frame(&format!("r{receiver}"), i64::from(port));
            std.write_all(&sealed(&mut channel, &frame)).unwrap();
            std.set_nonblocking(true).unwrap();
            self.add(RxEntry::Listener { listener, receiver });
            self.add(RxEntry::Registry {
                stream: TcpStream::from_std(std),
                channel,
                dec,
                heartbeats: 0,
                open: true,
            });
            self.chats.push(0);
            self.target.push(0);
        }
    }

    /// One poll; returns how many receivers reached their target.
    fn pump(&mut self, timeout: Duration) -> usize {
        poll_once(&mut self.poll, &mut self.events, timeout);
        let mut reached = 0;
        let mut accepted = Vec::new();
        for event in self.events.iter() {
            let key = event.token().0;
            match &mut self.entries[key] {
                RxEntry::Registry {
                    stream,
                    channel,
                    dec,
                    heartbeats,
                    open,
                } => {
                    if !*open {
                        continue;
                    }
                    let mut replies = Vec::new();
                    *open = read_secure(
                        stream,
                        &mut self.scratch,
                        &mut self.open,
                        channel,
                        &mut replies,
                        dec,
                    );
                    assert!(*open, "the registry closed a receiver's connection");
                    while let Some(body) = dec.next_frame().expect("valid framing") {
                        if body == self.shapes.heartbeat.as_slice() {
                            *heartbeats += 1;
                        } else if body.starts_with(&self.shapes.error_prefix) {
                            panic!(
                                "the registry refused a receiver: {:?}",
                                codec::decode::<FromRegistry>(&body)
                            );
                        }
                    }
                }
                RxEntry::Listener { listener, receiver } => loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nodelay(true).unwrap();
                            accepted.push((stream, *receiver));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => panic!("accept failed: {e}"),
                    }
                },
                RxEntry::Link {
                    stream,
                    channel,
                    dec,
                    receiver,
                    hello,
                    acks,
                    out,
                    open,
                } => {
                    if !*open {
                        continue;
                    }
                    if event.is_readable() {
                        // The peer's handshake messages are answered
                        // through `out`; the chats come out of `dec`.
                        *open = read_secure(
                            stream,
                            &mut self.scratch,
                            &mut self.open,
                            channel,
                            out,
                            dec,
                        );
                        let r = *receiver;
                        let before = self.chats[r] >= self.target[r];
                        while let Some(body) = dec.next_frame().expect("valid framing") {
                            let id = match self.shapes.chat_id(&body) {
                                Some(id) if *hello => id,
                                _ => match codec::decode::<LinkMsg>(&body) {
                                    Ok(LinkMsg::Hello { .. }) if !*hello => {
                                        *hello = true;
                                        continue;
                                    }
                                    Ok(LinkMsg::Chat { id, .. }) if *hello => id,
                                    other => panic!("unexpected on a link: {other:?}"),
                                },
                            };
                            self.chats[r] += 1;
                            acks.extend_from_slice(
                                &codec::encode_frame(&LinkMsg::Ack { id }).unwrap(),
                            );
                        }
                        if !before && self.chats[r] >= self.target[r] {
                            reached += 1;
                        }
                    }
                    // Acks go out as the chats arrive, one Noise message and
                    // one write per read, unless this round holds them until
                    // the clock stops.
                    flush_link(stream, channel, acks, out, open, self.hold_acks);
                    if !*open {
                        let _ = self.poll.registry().deregister(stream);
                    }
                }
            }
        }
        for (stream, receiver) in accepted {
            let channel = SecureChannel::responder(
                &self.identities[receiver],
                &peerchat_core::protocol::noise_prologue(),
            );
            self.add(RxEntry::Link {
                stream,
                channel,
                dec: FrameDecoder::new(1 << 20),
                receiver,
                hello: false,
                acks: Vec::new(),
                out: Vec::new(),
                open: true,
            });
        }
        reached
    }

    /// Sends the acks held during a round.
    fn release_acks(&mut self) {
        self.hold_acks = false;
        for e in &mut self.entries {
            if let RxEntry::Link {
                stream,
                channel,
                acks,
                out,
                open,
                ..
            } = e
            {
                if *open {
                    flush_link(stream, channel, acks, out, open, false);
                }
            }
        }
    }

    /// Every receiver's target becomes `k` more chats than it has.
    fn arm(&mut self, k: u64) {
        for (t, c) in self.target.iter_mut().zip(&self.chats) {
            *t = c + k;
        }
    }

    fn until_all_reached(&mut self) -> Instant {
        let mut pending = self
            .chats
            .iter()
            .zip(&self.target)
            .filter(|(c, t)| c < t)
            .count();
        let deadline = Instant::now() + WAIT;
        while pending > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!(
                    "{pending} of {} receivers still wait for chats after {WAIT:?}",
                    self.chats.len()
                );
            };
            pending -= self.pump(left);
        }
        Instant::now()
    }

    fn open_links(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, RxEntry::Link { open: true, .. }))
            .count()
    }

    fn wait_links_closed(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.open_links() > 0 {
            assert!(
                Instant::now() < deadline,
                "links of a killed peer stay open"
            );
            self.pump(Duration::from_millis(5));
        }
    }

    fn heartbeat_counts(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                RxEntry::Registry { heartbeats, .. } => Some(*heartbeats),
                _ => None,
            })
            .collect()
    }

    /// Between iterations: heartbeats for the receivers' registry sessions.
    fn keepalive(&mut self) {
        if self.last_keepalive.elapsed() < KEEPALIVE {
            return;
        }
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        let before = self.heartbeat_counts();
        for e in &mut self.entries {
            if let RxEntry::Registry {
                stream, channel, ..
            } = e
            {
                let wire = sealed(channel, &frame);
                write_small(stream, &wire);
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.heartbeat_counts();
            if now.iter().zip(&before).all(|(a, b)| a > b) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "receivers' heartbeats unanswered"
            );
            self.pump(Duration::from_millis(5));
        }
        self.last_keepalive = Instant::now();
    }
}

#[derive(Default)]
struct PeerCounters {
    delivered: AtomicU64,
    known: AtomicI64,
    /// When the stdout thread last read a `sent` event.
    sent_seen: Mutex<Option<Instant>>,
    odd: Mutex<Vec<String>>,
}

/// A `peer --json` process; a thread counts what it prints.
struct PeerProc {
    proc: Proc,
    stdin: ChildStdin,
    counters: Arc<PeerCounters>,
    delivered: u64,
    /// From the last round's stdin write until the bench read the peer's
    /// `sent` event for it (the peer prints it before queueing the chats).
    sent_after: Option<Duration>,
}

impl PeerProc {
    /// Starts a peer with its own data directory (key file, known_peers)
    /// under `data_home`, pinned to the registry's key from the start.
    fn start(bins: &Path, registry: &RegistryInfo, data_home: &Path, name: &str) -> PeerProc {
        let mut cmd = Command::new(bins.join("peer"));
        cmd.args([
            "--name",
            name,
            "--registry",
            &registry.addr.to_string(),
            "--registry-key",
            &registry.key.to_string(),
            "--json",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("XDG_DATA_HOME", data_home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut proc = Proc::spawn("peer", &mut cmd);
        let stdin = proc.child.stdin.take().unwrap();
        let stdout = proc.child.stdout.take().unwrap();
        let counters = Arc::new(PeerCounters::default());
        let sink = counters.clone();
        thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 20, stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line.starts_with(r#"{"event":"delivered""#) {
                    sink.delivered.fetch_add(1, Ordering::Relaxed);
                } else if line.starts_with(r#"{"event":"sent""#) {
                    *sink.sent_seen.lock().unwrap() = Some(Instant::now());
                } else if line.starts_with(r#"{"event":"joined""#) {
                    sink.known.fetch_add(1, Ordering::Relaxed);
                } else if line.starts_with(r#"{"event":"registered""#) {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                    let peers = v["peers"].as_array().map_or(0, |p| p.len());
                    sink.known.store(peers as i64, Ordering::Relaxed);
                } else {
                    if line.starts_with(r#"{"event":"left""#) {
                        sink.known.fetch_sub(1, Ordering::Relaxed);
                    }
                    let mut odd = sink.odd.lock().unwrap();
                    if odd.len() < 50 {
                        odd.push(line.trim_end().to_string());
                    }
                }
            }
        });
        PeerProc {
            proc,
            stdin,
            counters,
            delivered: 0,
            sent_after: None,
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "peer printed {:?}; log:\n{}",
            self.counters.odd.lock().unwrap(),
            self.proc.log_tail()
        )
    }

    /// Waits until the peer's directory lists `n` receivers.
    fn wait_known(&mut self, n: usize, rx: &mut Receivers) {
        let deadline = Instant::now() + WAIT;
        while self.counters.known.load(Ordering::Relaxed) != n as i64 {
            self.proc.assert_alive();
            assert!(
                Instant::now() < deadline,
                "the peer knows {} of {n} receivers; {}",
                self.counters.known.load(Ordering::Relaxed),
                self.diagnostics()
            );
            rx.pump(Duration::from_millis(5));
        }
    }

    /// Waits (untimed) until every chat sent so far is reported delivered,
    /// so that no ack handling of one round spills into the next.
    fn wait_delivered(&mut self, rx: &mut Receivers) {
        let deadline = Instant::now() + WAIT;
        while self.counters.delivered.load(Ordering::Relaxed) < self.delivered {
            assert!(
                Instant::now() < deadline,
                "{} of {} deliveries reported; {}",
                self.counters.delivered.load(Ordering::Relaxed),
                self.delivered,
                self.diagnostics()
            );
            rx.pump(Duration::from_millis(1));
        }
    }

    /// One round: `k` lines in one write to stdin, timed until every
    /// receiver has `k` more chats. With `hold_acks` the receivers send
    /// their acks only once the clock has stopped.
    fn round(&mut self, rx: &mut Receivers, lines: &[u8], k: usize, hold_acks: bool) -> Duration {
        rx.keepalive();
        rx.arm(k as u64);
        rx.hold_acks = hold_acks;
        *self.counters.sent_seen.lock().unwrap() = None;
        let t0 = Instant::now();
        self.stdin.write_all(lines).expect("write to the peer");
        let t1 = rx.until_all_reached();
        rx.release_acks();
        self.delivered += (k * rx.chats.len()) as u64;
        self.wait_delivered(rx);
        let seen = *self.counters.sent_seen.lock().unwrap();
        self.sent_after = seen.map(|s| s.saturating_duration_since(t0));
        t1 - t0
    }
}

/// One message at a time; returns the latencies and the p50 from the stdin
/// write until the bench read the peer's `sent` event.
fn peer_latency(
    c: &mut Criterion,
    name: &str,
    n: usize,
    peer: &mut PeerProc,
    rx: &mut Receivers,
    hold_acks: bool,
) -> (Lat, Duration) {
    let line = format!("{TEXT}\n");
    let mut calls = Calls::new();
    let usage = Usage::start(&peer.proc);
    let delivered = peer.delivered;
    let mut group = latency_group(c, name);
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            calls.begin();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = peer.round(rx, line.as_bytes(), 1, hold_acks);
                calls.push((d, peer.sent_after.unwrap_or(Duration::ZERO)));
                total += d;
            }
            total
        })
    });
    group.finish();
    let usage = usage.finish(&peer.proc, peer.delivered - delivered);
    let measured = calls.measured(LATENCY_SAMPLES);
    let pick = |f: fn(&(Duration, Duration)) -> Duration| -> Vec<Vec<Duration>> {
        measured.iter().map(|c| c.iter().map(f).collect()).collect()
    };
    let lat = latency_of(&pick(|x| x.0));
    let sent = latency_of(&pick(|x| x.1));
    if lat.count > 0 {
        eprintln!(
            "{name}/{n}: stdin write to `sent` event read back: p50 {}; {usage}",
            fmt_d(sent.p50)
        );
    }
    (lat, sent.p50)
}

/// `K` messages per round; returns deliveries per second. With
/// `hold_acks` (a diagnostic, not the figure) the receivers ack only after
/// the clock stops, which shows what the peer's ack handling costs.
fn peer_pipelined(
    c: &mut Criterion,
    name: &str,
    n: usize,
    peer: &mut PeerProc,
    rx: &mut Receivers,
    hold_acks: bool,
) -> f64 {
    let lines = format!("{TEXT}\n").repeat(K);
    let deliveries = (n * K) as u64;
    let mut calls = Calls::new();
    let usage = Usage::start(&peer.proc);
    let delivered = peer.delivered;
    let mut group = rate_group(c, name);
    group.throughput(Throughput::Elements(deliveries));
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            calls.begin();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = peer.round(rx, lines.as_bytes(), K, hold_acks);
                calls.push((deliveries, d));
                total += d;
            }
            total
        })
    });
    group.finish();
    let usage = usage.finish(&peer.proc, peer.delivered - delivered);
    let rate = rate_of(calls.measured(RATE_SAMPLES));
    if rate > 0.0 {
        eprintln!("{name}/{n}: {usage}");
    }
    rate
}

/// Bench 3: its own registry and receivers, and a fresh peer process for
/// each size, so that what one size's rounds leave behind in the peer
/// (delivery deadlines that fire 30 s later, queued output) never lands in
/// the next size's, or another section's, measurements.
struct PeerSection {
    bins: PathBuf,
    registry: Proc,
    info: RegistryInfo,
    /// Where each peer process gets its own data directory.
    dir: PathBuf,
    rx: Receivers,
    peer: Option<PeerProc>,
}

impl PeerSection {
    fn start(bins: &Path, dir: &BenchDir) -> Self {
        let (registry, info) = start_registry(bins, dir);
        let frame = codec::encode_frame(&LinkMsg::Chat {
            id: 1000,
            text: TEXT.into(),
            direct: false,
            sent_at: Some(1_796_000_000_000),
        })
        .unwrap();
        assert_eq!(
            frame.len(),
            FLOOR_MSG,
            "a chat frame as long as the floor's message"
        );
        PeerSection {
            bins: bins.to_path_buf(),
            registry,
            info,
            dir: dir.0.clone(),
            rx: Receivers::new(info),
            peer: None,
        }
    }

    fn keepalive(&mut self) {
        self.rx.keepalive();
    }

    fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
        let PeerSection {
            bins,
            registry,
            info,
            dir,
            rx,
            peer,
        } = self;
        let one = format!("{TEXT}\n");
        rx.grow(n);
        if peer.take().is_some() {
            // Killed: wait until the receivers have seen its links close.
            rx.wait_links_closed();
        }
        let data_home = dir.join(format!("peer-sender{n}"));
        let peer = peer.insert(PeerProc::start(
            bins,
            info,
            &data_home,
            &format!("sender{n}"),
        ));
        peer.wait_known(n, rx);
        // Untimed: the first message makes the peer dial every new receiver.
        peer.round(rx, one.as_bytes(), 1, false);
        assert_eq!(rx.open_links(), n, "one link per receiver");

        for (name, hold) in [("peer_latency", true), ("peer_latency_acking", false)] {
            let (lat, sent) = peer_latency(c, name, n, peer, rx, hold);
            report.latency_line(name, n, &lat);
            if lat.count > 0 {
                let hold = if hold {
                    &mut report.peer_lat
                } else {
                    &mut report.peer_lat_acking
                };
                hold.insert(n, (lat, sent));
            }
        }

        for (name, hold) in [("peer_pipelined", false), ("peer_pipelined_held", true)] {
            let rate = peer_pipelined(c, name, n, peer, rx, hold);
            report.rate_line(name, n, rate);
            if rate > 0.0 {
                let map = if hold {
                    &mut report.peer_rate_held
                } else {
                    &mut report.peer_rate
                };
                map.insert(n, rate);
            }
        }
        peer.proc.assert_alive();
        registry.assert_alive();
    }
}

// ---------------------------------------------------------------------------

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
    let bins = workspace_bins::build();
    // Dropped last, once every process using it is gone.
    let dir = BenchDir::create();
    let mut report = Report::default();
    let mut latency = LatencySection::start(&bins, &dir);
    let mut churn = ChurnSection::start(&bins, &dir);
    let mut fanout = PeerSection::start(&bins, &dir);
    // Size by size, each floor right before the figures compared with it,
    // so that load from elsewhere on the machine drifts less between them.
    // The sections waiting their turn send heartbeats in between.
    for n in sizes() {
        floor_benches(c, n, &mut report);
        latency.bench(c, n, &mut report);
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
