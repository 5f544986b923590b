//! Section 4, the floor: plain TCP fan-out.

use std::io::Write;
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::report::{latency_group, latency_of, rate_group, rate_of, Calls, Report};
use crate::wire::{poll_once, read_into};
use crate::{FLOOR_MSG, K, LATENCY_SAMPLES, RATE_SAMPLES, SCRATCH, WAIT};

pub struct Floor {
    pub arm: Option<Sender<u64>>,
    pub go: Option<Sender<usize>>,
    pub started: Receiver<Instant>,
    pub finished: Receiver<Result<Instant, String>>,
    pub threads: Vec<JoinHandle<()>>,
}

impl Floor {
    pub fn start(n: usize) -> Floor {
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
    pub fn round(&self, k: usize) -> Duration {
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

pub fn floor_benches(c: &mut Criterion, n: usize, report: &mut Report) {
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
