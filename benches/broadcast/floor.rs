//! Section 4, the floors: the same fan-out with no framework at all, as
//! plain TCP, and sealed as peerchat seals it (one Noise session per
//! socket, the project's cipher), with the receiver opening every message
//! and finding its frames, as the systems measured against it do.

use std::io::Write;
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use peerchat_core::identity::Identity;
use peerchat_core::protocol::noise_prologue;
use peerchat_core::secure::{self, SecureChannel};
use peerchat_core::wire::{FrameDecoder, DEFAULT_MAX_FRAME, PREFIX_LEN};

use crate::report::{latency_group, latency_of, rate_group, rate_of, Calls, Lat, Report};
use crate::wire::{poll_once, read_into};
use crate::{FLOOR_MSG, K, LATENCY_SAMPLES, RATE_SAMPLES, SCRATCH, WAIT};

/// How a floor puts messages on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `FLOOR_MSG` raw bytes a message; the reader counts bytes.
    Plain,
    /// A `FLOOR_MSG`-byte frame a message, a round's frames sealed as one
    /// Noise message per socket (as the event loop seals a turn's frames);
    /// the reader opens it and counts frames.
    Sealed,
}

/// Two ends of one Noise session, handshaken in memory.
fn session_pair() -> (SecureChannel, SecureChannel) {
    let prologue = noise_prologue();
    let (a, b) = (Identity::generate(), Identity::generate());
    let mut scratch = secure::scratch();
    let mut to_responder = Vec::new();
    let mut initiator = SecureChannel::initiator(&a, &prologue, &mut to_responder);
    let mut responder = SecureChannel::responder(&b, &prologue);
    let mut ignore = |_: &[u8]| {};
    while !(initiator.is_established() && responder.is_established()) {
        let mut to_initiator = Vec::new();
        responder
            .receive(&to_responder, &mut scratch, &mut to_initiator, &mut ignore)
            .expect("the responder's half of the handshake");
        to_responder.clear();
        initiator
            .receive(&to_initiator, &mut scratch, &mut to_responder, &mut ignore)
            .expect("the initiator's half of the handshake");
    }
    (initiator, responder)
}

/// Where a round's clock starts. Every system measured against a floor
/// first wakes up to the message (a server's poll returns with it) on
/// another core, about 45 µs here; timed from an awake writer, a floor
/// would skip that, and its ratios would favour it most at small N.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Before the writer thread is woken: a floor pays one wake-up, as
    /// the systems compared with it do.
    BeforeWake,
    /// In the awake writer, right before it writes: for a driver whose
    /// write wakes the server measured (Redis, NATS), which pays its own.
    AtWrite,
}

pub struct Floor {
    pub arm: Option<Sender<u64>>,
    pub go: Option<Sender<usize>>,
    pub started: Receiver<Instant>,
    pub finished: Receiver<Result<Instant, String>>,
    pub threads: Vec<JoinHandle<()>>,
    /// What the reader counts for one message: bytes, or frames when
    /// sealed.
    pub units: u64,
    pub clock: Clock,
}

impl Floor {
    pub fn start(n: usize, wire: Wire) -> Floor {
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
        let (mut sealers, openers): (Vec<_>, Vec<_>) = match wire {
            Wire::Plain => (Vec::new(), Vec::new()),
            Wire::Sealed => (0..n).map(|_| session_pair()).unzip(),
        };
        let mut msg: Vec<u8> = (0..FLOOR_MSG as u8).collect();
        if wire == Wire::Sealed {
            let body = (FLOOR_MSG - PREFIX_LEN) as u32;
            msg[..PREFIX_LEN].copy_from_slice(&body.to_be_bytes());
        }
        let mut sealed = Vec::new();
        let write = move |k: usize| {
            let buf = msg.repeat(k);
            for (i, w) in writers.iter_mut().enumerate() {
                let bytes = match sealers.get_mut(i) {
                    Some(sealer) => {
                        sealed.clear();
                        sealer.seal(&buf, &mut sealed).expect("floor seal");
                        &sealed
                    }
                    None => &buf,
                };
                w.write_all(bytes).expect("floor write");
            }
        };
        let units = match wire {
            Wire::Plain => FLOOR_MSG as u64,
            Wire::Sealed => 1,
        };
        Floor::spawn(readers, openers, units, Clock::BeforeWake, write)
    }

    /// The writer (`write(k)` sends `k` messages to every reader) and the
    /// reader threads, over the receiving ends `readers` (opened with
    /// `openers` when sealed).
    pub fn spawn(
        mut readers: Vec<TcpStream>,
        mut openers: Vec<SecureChannel>,
        units: u64,
        clock: Clock,
        mut write: impl FnMut(usize) + Send + 'static,
    ) -> Floor {
        let (arm_tx, arm_rx) = mpsc::channel::<u64>();
        let (go_tx, go_rx) = mpsc::channel::<usize>();
        let (started_tx, started) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel();
        let writer = thread::spawn(move || {
            for k in go_rx {
                let t0 = Instant::now();
                write(k);
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
            let mut open_scratch = secure::scratch();
            let mut decoders: Vec<FrameDecoder> = openers
                .iter()
                .map(|_| FrameDecoder::new(DEFAULT_MAX_FRAME))
                .collect();
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
                        match openers.get_mut(i) {
                            Some(opener) => {
                                let decoder = &mut decoders[i];
                                let mut replies = Vec::new();
                                read_into(&mut readers[i], &mut scratch, |b| {
                                    opener
                                        .receive(b, &mut open_scratch, &mut replies, &mut |p| {
                                            decoder.push(p)
                                        })
                                        .expect("floor open");
                                });
                                while let Ok(Some(_)) = decoder.next_frame() {
                                    count += 1;
                                }
                            }
                            None => {
                                read_into(&mut readers[i], &mut scratch, |b| {
                                    count += b.len() as u64
                                });
                            }
                        }
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
            units,
            clock,
        }
    }

    /// `k` messages to every socket, in one write each; the time from
    /// [`Floor::clock`]'s start to the last byte read.
    pub fn round(&self, k: usize) -> Duration {
        let units = k as u64 * self.units;
        self.arm.as_ref().unwrap().send(units).unwrap();
        let woken = Instant::now();
        self.go.as_ref().unwrap().send(k).unwrap();
        let writing = self
            .started
            .recv_timeout(WAIT)
            .expect("the floor writer finished");
        let t0 = match self.clock {
            Clock::BeforeWake => woken,
            Clock::AtWrite => writing,
        };
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

pub fn floor_benches(c: &mut Criterion, n: usize, report: &mut Report) {
    let (lat, rate) = floor_bench(c, n, Wire::Plain, "floor", report);
    if lat.count > 0 {
        report.floor_lat.insert(n, lat);
    }
    if rate > 0.0 {
        report.floor_rate.insert(n, rate);
    }
    let (lat, rate) = floor_bench(c, n, Wire::Sealed, "sealed_floor", report);
    if lat.count > 0 {
        report.sealed_lat.insert(n, lat);
    }
    if rate > 0.0 {
        report.sealed_rate.insert(n, rate);
    }
}

/// One floor's latency (one message a socket) and coalesced rate (`K`).
fn floor_bench(c: &mut Criterion, n: usize, wire: Wire, name: &str, report: &Report) -> (Lat, f64) {
    measure(c, n, &Floor::start(n, wire), name, report)
}

/// Latency (one message to each reader) and pipelined rate (`K` each) of
/// any fan-out driven as a [`Floor`].
pub fn measure(
    c: &mut Criterion,
    n: usize,
    floor: &Floor,
    name: &str,
    report: &Report,
) -> (Lat, f64) {
    for _ in 0..10 {
        floor.round(1);
    }
    let mut calls = Calls::new();
    let mut group = latency_group(c, &format!("{name}_latency"));
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
    report.latency_line(&format!("{name}_latency"), n, &lat);

    let deliveries = (n * K) as u64;
    let mut calls = Calls::new();
    let mut group = rate_group(c, &format!("{name}_coalesced"));
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
    report.rate_line(&format!("{name}_coalesced"), n, rate);
    (lat, rate)
}
