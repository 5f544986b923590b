//! Section 3, peer fan-out: fake receivers and a real `peer --json`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{self, FromRegistry, LinkMsg, ToRegistry};
use peerchat_core::secure::{self, SecureChannel};
use peerchat_core::wire::FrameDecoder;
use peerchat_testkit::client::register_frame;
use peerchat_testkit::process::{DataDir, LoggedProc};

use crate::procs::{start_registry, RegistryInfo, Usage};
use crate::report::{fmt_d, latency_group, latency_of, rate_group, rate_of, Calls, Lat, Report};
use crate::wire::{dial, poll_once, read_secure, sealed, write_small, Dialed, Shapes};
use crate::{FLOOR_MSG, K, KEEPALIVE, LATENCY_SAMPLES, RATE_SAMPLES, SCRATCH, TEXT, WAIT};

pub enum RxEntry {
    /// A receiver's registry connection.
    Registry {
        stream: TcpStream,
        channel: SecureChannel,
        dec: FrameDecoder,
        answers: u64,
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
pub struct Receivers {
    pub registry: SocketAddr,
    pub registry_key: PublicKey,
    pub identities: Vec<Identity>,
    pub poll: Poll,
    pub events: Events,
    pub entries: Vec<RxEntry>,
    pub chats: Vec<u64>,
    pub target: Vec<u64>,
    pub scratch: Vec<u8>,
    /// Where Noise messages are decrypted.
    pub open: Box<[u8]>,
    pub shapes: Shapes,
    pub last_keepalive: Instant,
    /// Keep acks queued until [`Receivers::release_acks`].
    pub hold_acks: bool,
}

/// Seals the acks waiting as plaintext (unless they are held) into one
/// Noise message, then writes what is ready for the wire as far as the
/// socket takes it; the rest goes on the next writable event.
pub fn flush_link(
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
    pub fn new(registry: RegistryInfo) -> Receivers {
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

    pub fn add(&mut self, mut entry: RxEntry) {
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
    pub fn grow(&mut self, n: usize) {
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
                answers: 0,
                open: true,
            });
            self.chats.push(0);
            self.target.push(0);
        }
    }

    /// One poll; returns how many receivers reached their target.
    pub fn pump(&mut self, timeout: Duration) -> usize {
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
                    answers,
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
                        // An update answers a heartbeat that came while it
                        // was held (PROTOCOL.md 4.5).
                        if body == self.shapes.heartbeat.as_slice()
                            || protocol::update_change_count(&body).is_some()
                        {
                            *answers += 1;
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
                        let mut last = None;
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
                            last = Some(id);
                        }
                        // As the peer does: one ack for the chats read
                        // together, carrying the last one's id.
                        if let Some(id) = last {
                            acks.extend_from_slice(
                                &codec::encode_frame(&LinkMsg::Ack { id }).unwrap(),
                            );
                        }
                        if !before && self.chats[r] >= self.target[r] {
                            reached += 1;
                        }
                    }
                    // Acks go out as the chats arrive, one ack, one Noise
                    // message and one write per read, unless this round
                    // holds them until the clock stops.
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
    pub fn release_acks(&mut self) {
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
    pub fn arm(&mut self, k: u64) {
        for (t, c) in self.target.iter_mut().zip(&self.chats) {
            *t = c + k;
        }
    }

    pub fn until_all_reached(&mut self) -> Instant {
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

    /// Links open that said hello: the registry's probes (4.7) connect
    /// too, and leave once their handshake is done.
    pub fn open_links(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    RxEntry::Link {
                        open: true,
                        hello: true,
                        ..
                    }
                )
            })
            .count()
    }

    pub fn wait_links_closed(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.open_links() > 0 {
            assert!(
                Instant::now() < deadline,
                "links of a killed peer stay open"
            );
            self.pump(Duration::from_millis(5));
        }
    }

    pub fn answer_counts(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                RxEntry::Registry { answers, .. } => Some(*answers),
                _ => None,
            })
            .collect()
    }

    /// Between iterations: heartbeats for the receivers' registry sessions.
    pub fn keepalive(&mut self) {
        if self.last_keepalive.elapsed() < KEEPALIVE {
            return;
        }
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        let before = self.answer_counts();
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
            let now = self.answer_counts();
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
pub struct PeerCounters {
    pub delivered: AtomicU64,
    pub known: AtomicI64,
    /// When the stdout thread last read a `sent` event.
    pub sent_seen: Mutex<Option<Instant>>,
    pub odd: Mutex<Vec<String>>,
}

/// A `peer --json` process; a thread counts what it prints.
pub struct PeerProc {
    pub proc: LoggedProc,
    pub stdin: ChildStdin,
    pub counters: Arc<PeerCounters>,
    pub delivered: u64,
    /// From the last round's stdin write until the bench read the peer's
    /// `sent` event for it (the peer prints it before queueing the chats).
    pub sent_after: Option<Duration>,
}

/// Names the peer's extra arguments (whitespace-separated), e.g.
/// `--no-store` to measure the fan-out without the store.
const PEER_ARGS_VAR: &str = "BROADCAST_PEER_ARGS";

fn extra_args() -> Vec<String> {
    std::env::var(PEER_ARGS_VAR)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

impl PeerProc {
    /// Starts a peer with its own data directory (key file, known_peers)
    /// under `data_home`, pinned to the registry's key from the start.
    pub fn start(bins: &Path, registry: &RegistryInfo, data_home: &Path, name: &str) -> PeerProc {
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
        .args(extra_args())
        .env("XDG_DATA_HOME", data_home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut proc = LoggedProc::spawn("peer", &mut cmd);
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

    pub fn diagnostics(&self) -> String {
        format!(
            "peer printed {:?}; log:\n{}",
            self.counters.odd.lock().unwrap(),
            self.proc.log_tail()
        )
    }

    /// Waits until the peer's directory lists `n` receivers.
    pub fn wait_known(&mut self, n: usize, rx: &mut Receivers) {
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
    pub fn wait_delivered(&mut self, rx: &mut Receivers) {
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
    pub fn round(
        &mut self,
        rx: &mut Receivers,
        lines: &[u8],
        k: usize,
        hold_acks: bool,
    ) -> Duration {
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
pub fn peer_latency(
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
pub fn peer_pipelined(
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
pub struct PeerSection {
    pub bins: PathBuf,
    pub registry: LoggedProc,
    pub info: RegistryInfo,
    /// Where each peer process gets its own data directory.
    pub dir: PathBuf,
    pub rx: Receivers,
    pub peer: Option<PeerProc>,
}

impl PeerSection {
    pub fn start(bins: &Path, dir: &DataDir) -> Self {
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
            dir: dir.path().to_path_buf(),
            rx: Receivers::new(info),
            peer: None,
        }
    }

    pub fn keepalive(&mut self) {
        self.rx.keepalive();
    }

    pub fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
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
