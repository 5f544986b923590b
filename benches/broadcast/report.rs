//! Samples and the report: what criterion measured, reduced to p50/p99
//! and rates, and the summary printed at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use peerchat_testkit::stats::percentile;

use crate::{FLOOR_MSG, K, LATENCY_SAMPLES, RATE_SAMPLES};

/// What each call of an `iter_custom` routine measured. Criterion makes
/// exactly `sample_size` calls after its warm-up, so the last ones are the
/// measurement.
pub struct Calls<T> {
    pub calls: Vec<Vec<T>>,
}

impl<T> Calls<T> {
    pub fn new() -> Self {
        Calls { calls: Vec::new() }
    }

    pub fn begin(&mut self) {
        self.calls.push(Vec::new());
    }

    pub fn push(&mut self, x: T) {
        if let Some(last) = self.calls.last_mut() {
            last.push(x);
        }
    }

    pub fn measured(&self, samples: usize) -> &[Vec<T>] {
        &self.calls[self.calls.len().saturating_sub(samples)..]
    }
}

#[derive(Clone, Copy)]
pub struct Lat {
    pub p50: Duration,
    pub p99: Duration,
    /// Criterion's mean: the mean of each sample's time per iteration.
    pub mean: Duration,
    pub count: usize,
}

pub fn latency_of(calls: &[Vec<Duration>]) -> Lat {
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
pub fn rate_of(calls: &[Vec<(u64, Duration)>]) -> f64 {
    let (n, t) = calls
        .iter()
        .flatten()
        .fold((0u64, Duration::ZERO), |(n, t), (dn, dt)| (n + dn, t + *dt));
    n as f64 / t.as_secs_f64().max(1e-9)
}

pub fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.1} k/s", r / 1e3)
    }
}

pub fn ratio(ours: Duration, floor: Duration) -> f64 {
    ours.as_secs_f64() / floor.as_secs_f64().max(1e-12)
}

#[derive(Default)]
pub struct Report {
    pub floor_lat: BTreeMap<usize, Lat>,
    pub floor_rate: BTreeMap<usize, f64>,
    /// The sealed floor's: the like-for-like one for encrypted systems.
    pub sealed_lat: BTreeMap<usize, Lat>,
    pub sealed_rate: BTreeMap<usize, f64>,
    /// By (system, N): latency, and pipelined deliveries a second.
    pub pubsub: BTreeMap<(&'static str, usize), (Lat, f64)>,
    pub reg_lat: BTreeMap<usize, (Lat, Duration, Duration)>,
    /// By (churn connections in flight, N): rate, changes per frame.
    pub churn: BTreeMap<(usize, usize), (f64, f64)>,
    /// With the p50 from the stdin write to reading the `sent` event.
    pub peer_lat: BTreeMap<usize, (Lat, Duration)>,
    /// The same with acks sent as the chats arrive.
    pub peer_lat_acking: BTreeMap<usize, (Lat, Duration)>,
    pub peer_rate: BTreeMap<usize, f64>,
    /// The same with acks held until the clock stops (diagnostic).
    pub peer_rate_held: BTreeMap<usize, f64>,
    /// The registry's leave burst: the median round's deliveries a
    /// second, and the slowest and fastest round's.
    pub leave_burst: BTreeMap<usize, (f64, f64, f64)>,
}

impl Report {
    pub fn latency_line(&self, what: &str, n: usize, lat: &Lat) {
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

    /// Records the leave burst's rounds (deliveries a second each).
    pub fn leave_burst_line(&mut self, n: usize, rates: &[f64]) {
        let mut sorted = rates.to_vec();
        sorted.sort_by(f64::total_cmp);
        let Some((&low, &high)) = sorted.first().zip(sorted.last()) else {
            return;
        };
        // The nearest-rank median, like every percentile here.
        let median = sorted[sorted.len().div_ceil(2) - 1];
        eprintln!(
            "registry_leave_burst/{n}: {} deliveries (median of {} rounds; {} to {})",
            fmt_rate(median),
            sorted.len(),
            fmt_rate(low),
            fmt_rate(high)
        );
        self.leave_burst.insert(n, (median, low, high));
    }

    pub fn rate_line(&self, what: &str, n: usize, rate: f64) {
        if rate <= 0.0 {
            return;
        }
        let vs = match self.floor_rate.get(&n) {
            Some(f) => format!("; ratio to coalesced floor {:.3}x", rate / f),
            None => String::new(),
        };
        eprintln!("{what}/{n}: {} deliveries{vs}", fmt_rate(rate));
    }

    pub fn print(&self) {
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
        eprintln!("sealed floor (a Noise session per socket, the round's frames sealed as one message, opened and framed by the reader):");
        eprintln!("| N | p50 | p99 | mean | coalesced deliveries/s | p50 / plain floor | rate / plain floor |");
        for (n, l) in &self.sealed_lat {
            let rate = self.sealed_rate.get(n).copied();
            eprintln!(
                "| {n} | {} | {} | {} | {} | {} | {} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean),
                rate.map_or("-".into(), fmt_rate),
                floor_p50(n).map_or("-".into(), |f| format!("{:.2}x", ratio(l.p50, f))),
                rate.zip(floor_rate(n))
                    .map_or("-".into(), |(r, f)| format!("{:.3}x", r / f))
            );
        }
        let sealed_p50 = |n: &usize, ours: Duration| {
            self.sealed_lat
                .get(n)
                .map_or("-".into(), |f| format!("{:.2}x", ratio(ours, f.p50)))
        };
        eprintln!("registry broadcast latency (join and leave together; then each alone):");
        eprintln!(
            "| N | p50 | p99 | mean | p50/floor | p99/floor | mean/floor | join p50 | leave p50 | leave p50/sealed floor |"
        );
        for (n, (l, join, leave)) in &self.reg_lat {
            let f = self.floor_lat.get(n);
            let r = |ours: Duration, pick: fn(&Lat) -> Duration| {
                f.map_or("-".into(), |f| format!("{:.2}x", ratio(ours, pick(f))))
            };
            eprintln!(
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean),
                r(l.p50, |f| f.p50),
                r(l.p99, |f| f.p99),
                r(l.mean, |f| f.mean),
                fmt_d(*join),
                fmt_d(*leave),
                sealed_p50(n, *leave)
            );
        }
        if !self.pubsub.is_empty() {
            eprintln!("pub/sub systems (one publisher, N subscribers; K = {K} publishes pipelined), and the registry's leave against them:");
            eprintln!("| system | N | p50 | p99 | mean | pipelined deliveries/s | p50 / sealed floor | registry leave p50 / its p50 | peer fan-out p50 (acks held) / its p50 |");
            for ((system, n), (l, rate)) in &self.pubsub {
                let leave = self.reg_lat.get(n).map_or("-".into(), |(_, _, leave)| {
                    format!("{:.2}x", ratio(*leave, l.p50))
                });
                let peer = self
                    .peer_lat
                    .get(n)
                    .map_or("-".into(), |(p, _)| format!("{:.2}x", ratio(p.p50, l.p50)));
                eprintln!(
                    "| {system} | {n} | {} | {} | {} | {} | {} | {leave} | {peer} |",
                    fmt_d(l.p50),
                    fmt_d(l.p99),
                    fmt_d(l.mean),
                    fmt_rate(*rate),
                    sealed_p50(n, l.p50)
                );
            }
        }
        if !self.leave_burst.is_empty() {
            eprintln!("registry leave burst (K = {K} leaves from K connections at once, each a change for all N; median round, range):");
            eprintln!("| N | deliveries/s | range | / sealed coalesced floor | / Redis pipelined | / NATS pipelined |");
            for (n, (median, low, high)) in &self.leave_burst {
                let vs =
                    |rate: Option<f64>| rate.map_or("-".into(), |r| format!("{:.2}x", median / r));
                let pubsub = |system| self.pubsub.get(&(system, *n)).map(|(_, rate)| *rate);
                eprintln!(
                    "| {n} | {} | {} to {} | {} | {} | {} |",
                    fmt_rate(*median),
                    fmt_rate(*low),
                    fmt_rate(*high),
                    vs(self.sealed_rate.get(n).copied()),
                    vs(pubsub("redis")),
                    vs(pubsub("nats"))
                );
            }
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
            "| acks | N | p50 | p99 | mean | p50/floor | p99/floor | stdin to `sent` read, p50 | p50/sealed floor |"
        );
        let rows = self
            .peer_lat
            .iter()
            .map(|r| ("held", r))
            .chain(self.peer_lat_acking.iter().map(|r| ("sent", r)));
        for (acks, (n, (l, sent))) in rows {
            let f = self.floor_lat.get(n);
            eprintln!(
                "| {acks} | {n} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_d(l.p50),
                fmt_d(l.p99),
                fmt_d(l.mean),
                floor_p50(n).map_or("-".into(), |f| format!("{:.2}x", ratio(l.p50, f))),
                f.map_or("-".into(), |f| format!("{:.2}x", ratio(l.p99, f.p99))),
                fmt_d(*sent),
                sealed_p50(n, l.p50)
            );
        }
        eprintln!(
            "peer fan-out pipelined (K = {K} lines per round; acks as they arrive, then held):"
        );
        eprintln!("| acks | N | deliveries/s | ratio to coalesced floor | ratio to sealed coalesced floor |");
        let rows = self
            .peer_rate
            .iter()
            .map(|r| ("sent", r))
            .chain(self.peer_rate_held.iter().map(|r| ("held", r)));
        for (acks, (n, rate)) in rows {
            let r = floor_rate(n).map_or("-".into(), |f| format!("{:.3}x", rate / f));
            let sealed = self
                .sealed_rate
                .get(n)
                .map_or("-".into(), |f| format!("{:.3}x", rate / f));
            eprintln!("| {acks} | {n} | {} | {r} | {sealed} |", fmt_rate(*rate));
        }
    }
}

pub fn latency_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(LATENCY_SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

/// Rounds of throughput benches are long: flat sampling, fewest samples.
pub fn rate_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(RATE_SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}
