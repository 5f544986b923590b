//! Raw registry listeners, for sections 1 and 2, and section 1 itself:
//! the registry's broadcast latency.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{self, Change, FromRegistry, ToRegistry};
use peerchat_core::secure::{self, SecureChannel};
use peerchat_core::wire::FrameDecoder;
use peerchat_testkit::client::register_frame;
use peerchat_testkit::process::{DataDir, LoggedProc};

use crate::procs::{start_registry, RegistryInfo, Usage};
use crate::report::{fmt_d, latency_group, latency_of, Calls, Report};
use crate::wire::{dial, open_into, poll_once, read_secure, sealed, write_small, Dialed, Shapes};
use crate::{BURSTS, DECLARED_PORT, K, KEEPALIVE, LATENCY_SAMPLES, SCRATCH, WAIT};

#[derive(Default)]
pub struct Tally {
    /// The round whose awaited change this listener has seen.
    pub matched: u64,
    pub changes: u64,
    pub updates: u64,
    /// Heartbeat replies, and updates, which answer a heartbeat that came
    /// while they were held (PROTOCOL.md 4.5).
    pub answers: u64,
    pub change_target: u64,
    pub answer_target: u64,
}

pub struct Listener {
    pub stream: TcpStream,
    pub channel: SecureChannel,
    pub dec: FrameDecoder,
    pub tally: Tally,
    pub open: bool,
}

/// What a wait waits for, on every listener.
pub enum Want<'a> {
    /// The `update` with this change (fast path: exactly this body).
    Change {
        body: &'a [u8],
        change: &'a Change,
        round: u64,
    },
    /// `change_target` changes counted.
    Changes,
    /// `answer_target` answers to heartbeats.
    Answers,
}

impl Want<'_> {
    pub fn satisfied(&self, t: &Tally) -> bool {
        match self {
            Want::Change { round, .. } => t.matched == *round,
            Want::Changes => t.changes >= t.change_target,
            Want::Answers => t.answers >= t.answer_target,
        }
    }
}

/// A client that joins (and, next time, leaves) to make one change.
pub struct Changer {
    pub dialed: Dialed,
    pub name: String,
}

/// N raw registry clients behind one `Poll`, read by the calling thread.
/// They, and the changers, share one key: one key may hold many names.
pub struct Fleet {
    pub registry: SocketAddr,
    pub registry_key: PublicKey,
    pub identity: Identity,
    pub poll: Poll,
    pub events: Events,
    pub conns: Vec<Listener>,
    pub scratch: Vec<u8>,
    /// Where Noise messages are decrypted.
    pub open: Box<[u8]>,
    pub shapes: Shapes,
    pub round: u64,
    pub names: u64,
    /// Calls of [`Fleet::fence`] so far: each costs the registry a write.
    pub fences: u64,
    pub last_keepalive: Instant,
}

impl Fleet {
    pub fn new(registry: RegistryInfo) -> Fleet {
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

    pub fn dial(&mut self) -> Dialed {
        dial(
            self.registry,
            self.registry_key,
            &self.identity,
            &mut self.open,
        )
    }

    pub fn fresh_name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    /// Registers listeners until there are `n`, then waits until every
    /// listener has read everything sent before one more join and leave.
    pub fn grow(&mut self, n: usize) {
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

    pub fn wait(&mut self, want: &Want, what: &str) -> Instant {
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
    /// the answers read, so that the registry's timeout never strikes and
    /// no reply lands inside a timed iteration.
    pub fn keepalive(&mut self) {
        if self.last_keepalive.elapsed() < KEEPALIVE {
            return;
        }
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        for c in &mut self.conns {
            c.tally.answer_target = c.tally.answers + 1;
            let wire = sealed(&mut c.channel, &frame);
            write_small(&mut c.stream, &wire);
        }
        self.wait(&Want::Answers, "heartbeat replies");
        self.last_keepalive = Instant::now();
    }

    /// Returns once the registry has read everything written to it before
    /// this call, on any connection: a heartbeat's answer on one listener.
    /// On loopback a write is in the receiving socket before it returns,
    /// so the registry's poll that sees the heartbeat sees every earlier
    /// write too, and it answers at the end of that turn (or with the
    /// update it is holding, PROTOCOL.md 4.5).
    pub fn fence(&mut self) {
        let frame = codec::encode_frame(&ToRegistry::Heartbeat {}).unwrap();
        let c = &mut self.conns[0];
        c.tally.answer_target = c.tally.answers + 1;
        let wire = sealed(&mut c.channel, &frame);
        write_small(&mut c.stream, &wire);
        self.wait(&Want::Answers, "a heartbeat reply");
        self.fences += 1;
    }

    /// One change, timed from the write that causes it until the last
    /// listener has it: a new client's registration, or, when `changer`
    /// holds one, that client's leave. Returns the time and whether it was a
    /// join. A new client's handshake is done before the clock starts, and
    /// [`Fleet::fence`] makes sure the registry has finished its side too,
    /// so that a join is timed from the `register` as before: the handshake
    /// is the connection's cost, not the broadcast's.
    pub fn change_once(&mut self, changer: &mut Option<Changer>) -> (Duration, bool) {
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

pub fn on_registry_frame(shapes: &Shapes, tally: &mut Tally, body: &[u8], want: &Want) {
    if body == shapes.heartbeat.as_slice() {
        tally.answers += 1;
        return;
    }
    if let Some(k) = protocol::update_change_count(body) {
        tally.changes += k;
        tally.updates += 1;
        tally.answers += 1;
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
pub fn expect_welcome(dialed: &mut Dialed, open: &mut [u8]) {
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
pub fn drain_to_eof(stream: &mut StdStream) {
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
pub struct LatencySection {
    pub registry: LoggedProc,
    pub fleet: Fleet,
}

impl LatencySection {
    pub fn start(bins: &Path, dir: &DataDir) -> Self {
        let (registry, info) = start_registry(bins, dir);
        LatencySection {
            registry,
            fleet: Fleet::new(info),
        }
    }

    pub fn keepalive(&mut self) {
        self.fleet.keepalive();
    }

    pub fn bench(&mut self, c: &mut Criterion, n: usize, report: &mut Report) {
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

    /// `registry_leave_burst/N`: [`K`] clients, registered outside timing,
    /// send `leave` at once, each on its own connection (the analogue of
    /// K pipelined PUBLISHes: K small messages in, each a change for all
    /// N); the clock runs from the first write until every listener has
    /// all K changes. [`BURSTS`] rounds, not criterion's sampling: each
    /// round's registrations take far longer than its timed part.
    pub fn leave_burst(&mut self, n: usize, report: &mut Report) {
        if !crate::wanted("registry_leave_burst") {
            return;
        }
        let fleet = &mut self.fleet;
        let deliveries = (n * K) as u64;
        let mut rates = Vec::with_capacity(BURSTS);
        for _ in 0..BURSTS {
            fleet.keepalive();
            let mut leaving: Vec<(Dialed, Vec<u8>)> = Vec::with_capacity(K);
            for _ in 0..K {
                let name = fleet.fresh_name("b");
                let mut dialed = fleet.dial();
                let register = sealed(&mut dialed.channel, &register_frame(&name, DECLARED_PORT));
                dialed.stream.write_all(&register).expect("send register");
                expect_welcome(&mut dialed, &mut fleet.open);
                let leave = codec::encode_frame(&ToRegistry::Leave {}).unwrap();
                let frame = sealed(&mut dialed.channel, &leave);
                leaving.push((dialed, frame));
            }
            for c in &mut fleet.conns {
                c.tally.change_target = c.tally.changes + K as u64;
            }
            fleet.wait(&Want::Changes, "the burst's joins");
            for c in &mut fleet.conns {
                c.tally.change_target = c.tally.changes + K as u64;
            }
            let t0 = Instant::now();
            for (dialed, frame) in &mut leaving {
                dialed.stream.write_all(frame).expect("send leave");
            }
            let t1 = fleet.wait(&Want::Changes, "the burst's leaves");
            rates.push(deliveries as f64 / (t1 - t0).as_secs_f64());
            for (dialed, _) in &mut leaving {
                drain_to_eof(&mut dialed.stream);
            }
        }
        report.leave_burst_line(n, &rates);
    }
}
