//! Section 2, churn: the registry's delta throughput while clients
//! register and leave as fast as they can.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{FromRegistry, ToRegistry};
use peerchat_core::secure::{self, SecureChannel};
use peerchat_core::wire::FrameDecoder;
use peerchat_testkit::client::register_frame;
use peerchat_testkit::process::{DataDir, LoggedProc};

use crate::listeners::{Fleet, Want};
use crate::procs::{start_registry, RegistryInfo, Usage};
use crate::report::{rate_group, rate_of, Calls, Report};
use crate::wire::{poll_once, sealed, Shapes};
use crate::{CHURN_DEPTHS, CHURN_SOURCES, DECLARED_PORT, RATE_SAMPLES, WAIT};

pub enum ChurnState {
    Connecting,
    /// The first Noise message is out; the registry's answer is awaited.
    Handshake,
    AwaitWelcome,
    Leaving,
}

pub struct ChurnConn {
    pub stream: TcpStream,
    pub state: ChurnState,
    /// The Noise session, from the connect until the leave is sealed.
    pub channel: Option<SecureChannel>,
    /// The frame stream's plaintext until the welcome's first bytes.
    pub buf: Vec<u8>,
}

/// What every churn connection of the thread shares. All of them prove the
/// same key: one key may hold many names.
pub struct ChurnKit {
    pub registry: SocketAddr,
    pub registry_key: PublicKey,
    pub identity: Identity,
    pub shapes: Shapes,
    /// Where Noise messages are decrypted.
    pub open: Box<[u8]>,
    pub leave: Vec<u8>,
}

/// A thread that runs register/leave cycles on command, a given number of
/// connections in flight, and answers when a batch is done.
pub struct Churn {
    pub cmd: Option<Sender<(usize, usize)>>,
    pub done: Receiver<Result<(), String>>,
    pub thread: Option<JoinHandle<()>>,
}

impl Churn {
    pub fn start(registry: RegistryInfo) -> Churn {
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

    pub fn run(&self, cycles: usize, depth: usize) {
        self.cmd.as_ref().unwrap().send((cycles, depth)).unwrap();
    }

    pub fn finish(&self) {
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

pub fn churn_open(
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
pub fn write_whole(stream: &mut TcpStream, bytes: &[u8], what: &str) -> Result<(), String> {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        other => Err(format!("{what} write: {other:?}")),
    }
}

/// Advances one churn connection: connect, Noise handshake, `register`
/// (sent with the handshake's last message, as a peer does), welcome,
/// `leave`; `Ok(true)` once the registry has closed it after its leave.
pub fn churn_step(conn: &mut ChurnConn, kit: &mut ChurnKit, seq: u64) -> Result<bool, String> {
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

pub fn churn_batch(
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
pub fn churn_cycles(n: usize, depth: usize) -> usize {
    let base = if n >= 1000 { 200 } else { 1000 };
    base.max(4 * depth)
}

/// Bench 2: its own registry, listeners and churn thread.
pub struct ChurnSection {
    pub registry: LoggedProc,
    pub fleet: Fleet,
    pub churn: Churn,
}

impl ChurnSection {
    pub fn start(bins: &Path, dir: &DataDir) -> Self {
        let (registry, info) = start_registry(bins, dir);
        ChurnSection {
            registry,
            fleet: Fleet::new(info),
            churn: Churn::start(info),
        }
    }

    pub fn keepalive(&mut self) {
        self.fleet.keepalive();
    }

    pub fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
        for depth in CHURN_DEPTHS {
            self.bench_depth(c, n, depth, report);
        }
    }

    pub fn bench_depth(&mut self, c: &mut Criterion, n: usize, depth: usize, report: &mut Report) {
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

pub fn totals(fleet: &Fleet) -> (u64, u64) {
    fleet.conns.iter().fold((0, 0), |(c, u), l| {
        (c + l.tally.changes, u + l.tally.updates)
    })
}
