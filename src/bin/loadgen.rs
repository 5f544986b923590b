//! `loadgen`: simulates many peers from one process against a running
//! registry (or the registries of a cluster), to show how far one
//! registry scales.
//!
//! It opens `--peers` idle connections (spread over several loopback source
//! addresses so that no source runs out of ephemeral ports), registers them,
//! keeps them heartbeating, and then drives churn: short-lived peers that
//! join and leave at `--churn` per second. It reports how long a join takes
//! to reach everyone (measured at `--probes` sampled listeners spread over
//! the registration order; from the join's `register`, and again from its
//! connect, which adds the TCP connect and the Noise handshake), how many
//! deltas per second the registry delivers, and, given `--registry-pid`,
//! the registry's memory per peer and CPU. Every phase is bounded in time;
//! everything it opened is closed when it ends.
//!
//! Every connection is a Noise session, as the registry requires: all the
//! simulated peers share one key made for the run (one key may hold many
//! names), and each sends its `register` once its handshake is done. Names
//! carry a tag taken from that key, so that a second run against the same
//! registry does not collide with the names the registry still keeps for
//! the first run's key (`--name-grace`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use peerchat_core::codec;
use peerchat_core::identity::Identity;
use peerchat_core::protocol::{self, Change, FromRegistry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::NoiseConfig;
use peerchat_core::{App, CloseReason, ConnId, Ctx, EventLoop, LoopConfig};
use peerchat_testkit::stats::percentile;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for a peerchat registry"
)]
struct Args {
    /// The registry to load, e.g. 127.0.0.1:7000. Give it several times
    /// for the registries of a cluster: peers are spread over them in
    /// turn, so that a join is timed to probes on every registry.
    #[arg(long, value_name = "ADDR", required = true)]
    registry: Vec<SocketAddr>,
    /// Idle peers to keep registered.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Loopback source addresses to spread connections over
    /// (127.0.0.2, 127.0.0.3, …); 0 lets the kernel choose.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(0..=200))]
    sources: u8,
    /// Idle peers connected per second while ramping up.
    #[arg(long, default_value_t = 2000)]
    ramp: u32,
    /// How long to watch the idle peers heartbeat before churning.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Churn: short-lived peers joining per second.
    #[arg(long, default_value_t = 50)]
    churn: u32,
    /// How long each churn peer stays before it leaves.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    churn_life: Duration,
    /// How long to churn.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Idle peers that decode every update to time propagation.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// The registry's process id, for its memory and CPU (read from
    /// /proc); several times for a cluster's registries, whose figures are
    /// then added up.
    #[arg(long, value_name = "PID")]
    registry_pid: Vec<u32>,
    /// Give up on the ramp after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    ramp_timeout: Duration,
    /// Time each connection has to complete its Noise handshake.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ramp,
    Idle,
    Churn,
    /// Churn stopped; waiting for the last joins to propagate.
    Settle,
}

enum Timer {
    RampTick,
    /// An idle peer refused as `unavailable` tries again, as a peer would.
    Retry {
        name: String,
        probe: bool,
    },
    Heartbeat(ConnId),
    ChurnTick,
    ChurnLeave(ConnId),
    PhaseEnd(Phase),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Idle { probe: bool },
    Churn,
}

struct Conn {
    role: Role,
    registered: bool,
    name: String,
    /// The port it declares in its `register`.
    port: i64,
}

/// One churn join on its way to every probe.
struct Join {
    /// When its connection was opened.
    opened: Instant,
    /// When its `register` was queued: once its Noise handshake was done.
    sent: Instant,
    seen_by: usize,
    last: Option<Instant>,
}

/// Samples of /proc for one process.
#[derive(Clone, Copy)]
struct ProcSample {
    at: Instant,
    cpu_ticks: u64,
    rss_kib: u64,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The processes' figures added up; `None` if there are none, or one is
/// gone.
fn sample_all(pids: &[u32]) -> Option<ProcSample> {
    let samples: Option<Vec<ProcSample>> = pids.iter().map(|pid| sample(*pid)).collect();
    samples?.into_iter().reduce(|a, b| ProcSample {
        at: a.at.max(b.at),
        cpu_ticks: a.cpu_ticks + b.cpu_ticks,
        rss_kib: a.rss_kib + b.rss_kib,
    })
}

fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cpu_ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(ProcSample {
        at: Instant::now(),
        cpu_ticks,
        rss_kib,
    })
}

/// Share of one core the process used between two samples.
fn cpu_share(a: ProcSample, b: ProcSample) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / hz / wall
}

struct LoadGen {
    args: Args,
    /// Registrations tried again after `unavailable`.
    retried: usize,
    /// Idle peers the ramp has started (their retries not counted).
    ramped: usize,
    /// Prefix of every name: `lg` or `ch` follow it.
    tag: String,
    sources: Vec<IpAddr>,
    phase: Phase,
    phase_started: Instant,
    ramp_started: Instant,
    conns: HashMap<ConnId, Conn>,
    opened: usize,
    registered: usize,
    failed: usize,
    /// Idle peers among `failed`.
    idle_failed: usize,
    probes_registered: usize,
    next_churn: u64,
    joins: HashMap<String, Join>,
    /// Changes delivered to the idle peers during churn, all of them
    /// counted.
    deltas: u64,
    churn_started: Option<Instant>,
    /// From the first welcome.
    heartbeat: Option<Duration>,
    heartbeat_frame: Bytes,
    leave_frame: Bytes,
    welcome_prefix: Vec<u8>,
    registry_before: Option<ProcSample>,
    registry_ramped: Option<ProcSample>,
    registry_idle_end: Option<ProcSample>,
    registry_churn_end: Option<ProcSample>,
    /// The load generator's own CPU under churn: when it nears a whole core,
    /// the propagation it measures includes its own backlog.
    own_churn_start: Option<ProcSample>,
    own_churn_end: Option<ProcSample>,
    report: Vec<String>,
}

impl LoadGen {
    fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }

    fn open(&mut self, ctx: &mut Ctx<Timer>, role: Role, name: String) {
        let source = self.source(self.opened);
        let registry = self.args.registry[self.opened % self.args.registry.len()];
        self.opened += 1;
        let result = match source {
            Some(ip) => ctx.connect_from(ip, registry),
            None => ctx.connect(registry),
        };
        let conn = match result {
            Ok(conn) => conn,
            Err(e) => {
                self.failure(ctx, role, format!("{name}: connect failed: {e}"));
                return;
            }
        };
        // The register goes out in `on_connected`, once the handshake is
        // done: the loop drops frames sent before that.
        self.conns.insert(
            conn,
            Conn {
                role,
                registered: false,
                name,
                port: 1 + (self.opened % 65_000) as i64,
            },
        );
    }

    /// Counts a peer that failed; the first few are shown.
    fn failure(&mut self, ctx: &mut Ctx<Timer>, role: Role, what: String) {
        self.failed += 1;
        if self.failed <= 5 {
            eprintln!("loadgen: {what}");
        }
        if let Role::Idle { .. } = role {
            self.idle_failed += 1;
            self.end_ramp_when_settled(ctx);
        }
    }

    /// The ramp ends once every idle peer has registered or failed.
    fn end_ramp_when_settled(&mut self, ctx: &mut Ctx<Timer>) {
        if self.phase == Phase::Ramp && self.registered + self.idle_failed >= self.args.peers {
            self.start_phase(ctx, Phase::Idle);
        }
    }

    fn start_phase(&mut self, ctx: &mut Ctx<Timer>, phase: Phase) {
        self.phase = phase;
        self.phase_started = ctx.now();
        let pid = &self.args.registry_pid;
        let now = ctx.now();
        match phase {
            Phase::Ramp => {}
            Phase::Idle => {
                self.registry_ramped = sample_all(pid);
                let took = now.duration_since(self.ramp_started);
                self.report.push(format!(
                    "ramp: {} of {} idle peers registered in {:.1} s ({} failed, {} retried after unavailable)",
                    self.registered,
                    self.args.peers,
                    took.as_secs_f64(),
                    self.failed,
                    self.retried
                ));
                ctx.arm(now + self.args.idle, Timer::PhaseEnd(Phase::Idle));
            }
            Phase::Churn => {
                self.registry_idle_end = sample_all(pid);
                self.own_churn_start = sample(std::process::id());
                self.churn_started = Some(now);
                ctx.arm(now, Timer::ChurnTick);
                ctx.arm(now + self.args.duration, Timer::PhaseEnd(Phase::Churn));
            }
            Phase::Settle => {
                self.registry_churn_end = sample_all(pid);
                self.own_churn_end = sample(std::process::id());
                ctx.arm(now + Duration::from_secs(5), Timer::PhaseEnd(Phase::Settle));
            }
        }
    }

    fn summarize(&mut self) {
        let idle = self.registered;
        // Memory is read at the end of the idle phase: by then the registry
        // has handed back what the ramp's snapshots needed (given a
        // --stats-interval shorter than --idle).
        if let (Some(before), Some(idle_end)) = (self.registry_before, self.registry_idle_end) {
            let per_peer = (idle_end.rss_kib.saturating_sub(before.rss_kib) * 1024) as f64
                / idle.max(1) as f64;
            let peak = self.registry_ramped.map_or(0, |s| s.rss_kib);
            self.report.push(format!(
                "registry memory: {} KiB before, {peak} KiB right after the ramp, {} KiB after the idle phase with {idle} idle peers: {per_peer:.0} bytes per peer",
                before.rss_kib, idle_end.rss_kib
            ));
        }
        if let (Some(a), Some(b)) = (self.registry_ramped, self.registry_idle_end) {
            self.report.push(format!(
                "registry CPU at idle heartbeats: {:.1}% of one core over {:.0} s",
                cpu_share(a, b) * 100.0,
                b.at.duration_since(a.at).as_secs_f64()
            ));
        }
        if let (Some(a), Some(b)) = (self.registry_idle_end, self.registry_churn_end) {
            self.report.push(format!(
                "registry CPU under churn: {:.1}% of one core; RSS {} KiB",
                cpu_share(a, b) * 100.0,
                b.rss_kib
            ));
        }
        if let (Some(a), Some(b)) = (self.own_churn_start, self.own_churn_end) {
            self.report.push(format!(
                "loadgen CPU under churn: {:.1}% of one core",
                cpu_share(a, b) * 100.0
            ));
        }
        let probes = self.probes_registered;
        let since = |start: fn(&Join) -> Instant| -> Vec<Duration> {
            let mut times: Vec<Duration> = self
                .joins
                .values()
                .filter(|j| j.seen_by >= probes)
                .filter_map(|j| j.last.map(|l| l.duration_since(start(j))))
                .collect();
            times.sort_unstable();
            times
        };
        let complete = since(|j| j.sent);
        let from_open = since(|j| j.opened);
        let incomplete = self.joins.len() - complete.len();
        self.report.push(format!(
            "churn: {} joins at {}/s; join-to-every-probe propagation p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({probes} probes; {incomplete} joins did not reach every probe)",
            self.joins.len(),
            self.args.churn,
            percentile(&complete, 50.0).as_secs_f64() * 1e3,
            percentile(&complete, 99.0).as_secs_f64() * 1e3,
            complete.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        ));
        self.report.push(format!(
            "churn: the same from each join's connect (TCP connect and Noise handshake included): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&from_open, 50.0).as_secs_f64() * 1e3,
            percentile(&from_open, 99.0).as_secs_f64() * 1e3,
            from_open.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        ));
        if self.churn_started.is_some() {
            let secs = self.args.duration.as_secs_f64().max(1e-9);
            let all = self.deltas as f64 / secs;
            self.report.push(format!(
                "deltas delivered (counted at every listener): {:.0}/s over all {idle} listeners, {:.0}/s per listener",
                all,
                all / idle.max(1) as f64
            ));
        }
    }
}

impl App for LoadGen {
    type Timer = Timer;

    fn on_connected(&mut self, ctx: &mut Ctx<Timer>, conn: ConnId) {
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        let register = ToRegistry::Register {
            version: PROTOCOL_VERSION,
            name: state.name.clone(),
            port: state.port,
            relay: false,
            dial_back: false,
        };
        let (role, name) = (state.role, state.name.clone());
        if !ctx.send(conn, protocol::frame(&register)) {
            self.conns.remove(&conn);
            ctx.close(conn, "cannot register");
            self.failure(
                ctx,
                role,
                format!("{name}: the register could not be queued"),
            );
            return;
        }
        if role == Role::Churn {
            // Propagation is timed from the register, as before the
            // handshake existed: the handshake is the connection's cost,
            // not the broadcast's (the report shows it with the handshake
            // too, from `opened`).
            if let Some(join) = self.joins.get_mut(&name) {
                join.sent = ctx.now();
            }
        }
    }

    fn on_frame(&mut self, ctx: &mut Ctx<Timer>, conn: ConnId, body: Bytes) {
        let now = ctx.now();
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        if !state.registered {
            if !body.starts_with(&self.welcome_prefix) {
                let refusal = codec::decode::<FromRegistry>(&body);
                let (role, name) = (state.role, state.name.clone());
                // Forgotten first, so that its close is not counted again.
                self.conns.remove(&conn);
                ctx.close(conn, "refused");
                // A cluster that cannot confirm a name now may later.
                if let (Role::Idle { probe }, Ok(FromRegistry::Error { code, .. })) =
                    (role, &refusal)
                {
                    if code == "unavailable" && self.phase == Phase::Ramp {
                        self.retried += 1;
                        ctx.arm(now + Duration::from_secs(1), Timer::Retry { name, probe });
                        return;
                    }
                }
                let why = refusal.map_or_else(|e| e.to_string(), |m| format!("{m:?}"));
                self.failure(ctx, role, format!("{name} was refused: {why}"));
                return;
            }
            state.registered = true;
            let heartbeat =
                *self
                    .heartbeat
                    .get_or_insert_with(|| match codec::decode::<FromRegistry>(&body) {
                        Ok(FromRegistry::Welcome { heartbeat_ms, .. }) => {
                            Duration::from_millis(heartbeat_ms.max(10))
                        }
                        _ => Duration::from_secs(5),
                    });
            match state.role {
                Role::Idle { probe } => {
                    self.registered += 1;
                    self.probes_registered += usize::from(probe);
                    // Spread heartbeats over the interval.
                    let offset = heartbeat.mul_f64((self.registered % 997) as f64 / 997.0);
                    ctx.arm(now + offset, Timer::Heartbeat(conn));
                    self.end_ramp_when_settled(ctx);
                }
                Role::Churn => {
                    ctx.arm(now + self.args.churn_life, Timer::ChurnLeave(conn));
                }
            }
            return;
        }
        let Role::Idle { probe } = state.role else {
            return;
        };
        if self.phase == Phase::Churn {
            self.deltas += protocol::update_change_count(&body).unwrap_or(0);
        }
        if !probe {
            return;
        }
        if let Ok(FromRegistry::Update { changes }) = codec::decode::<FromRegistry>(&body) {
            for change in changes {
                if let Change::Joined { name, .. } = change {
                    if let Some(join) = self.joins.get_mut(&name) {
                        join.seen_by += 1;
                        join.last = Some(now);
                    }
                }
            }
        }
    }

    fn on_closed(&mut self, ctx: &mut Ctx<Timer>, conn: ConnId, reason: &CloseReason) {
        if let Some(state) = self.conns.remove(&conn) {
            let expected = state.role == Role::Churn
                && matches!(reason, CloseReason::Eof | CloseReason::Local(_));
            if !expected && self.phase != Phase::Settle {
                let what = format!("{} closed: {reason}", state.name);
                self.failure(ctx, state.role, what);
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<Timer>, timer: Timer) {
        let now = ctx.now();
        match timer {
            Timer::RampTick => {
                if self.phase != Phase::Ramp {
                    return;
                }
                let per_tick = (self.args.ramp / 100).max(1) as usize;
                let target = self.args.peers;
                // Coprime to the number of registries, so that probes are
                // spread over all of them.
                let registries = self.args.registry.len();
                let mut stride = (target / self.args.probes.max(1)).max(1);
                while registries > 1 && gcd(stride, registries) != 1 {
                    stride += 1;
                }
                for _ in 0..per_tick {
                    let i = self.ramped;
                    if i >= target {
                        break;
                    }
                    self.ramped += 1;
                    let probe = i % stride == stride - 1 && i / stride < self.args.probes;
                    let name = format!("{}lg{i}", self.tag);
                    self.open(ctx, Role::Idle { probe }, name);
                }
                if now.duration_since(self.phase_started) > self.args.ramp_timeout {
                    self.report.push("ramp timed out".into());
                    self.start_phase(ctx, Phase::Idle);
                    return;
                }
                ctx.arm(now + Duration::from_millis(10), Timer::RampTick);
            }
            Timer::Retry { name, probe } => self.open(ctx, Role::Idle { probe }, name),
            Timer::Heartbeat(conn) => {
                let every = self.heartbeat.unwrap_or(Duration::from_secs(5));
                if self.conns.contains_key(&conn) && ctx.send(conn, self.heartbeat_frame.clone()) {
                    ctx.arm(now + every, Timer::Heartbeat(conn));
                }
            }
            Timer::ChurnTick => {
                if self.phase != Phase::Churn {
                    return;
                }
                let name = format!("{}ch{}", self.tag, self.next_churn);
                self.next_churn += 1;
                self.joins.insert(
                    name.clone(),
                    Join {
                        opened: now,
                        sent: now,
                        seen_by: 0,
                        last: None,
                    },
                );
                self.open(ctx, Role::Churn, name);
                // On a fixed schedule, so that slow turns do not lower the rate.
                let every = Duration::from_secs(1) / self.args.churn.max(1);
                let started = self.churn_started.unwrap_or(now);
                ctx.arm(started + every * self.next_churn as u32, Timer::ChurnTick);
            }
            Timer::ChurnLeave(conn) => {
                if self.conns.contains_key(&conn) {
                    ctx.send(conn, self.leave_frame.clone());
                }
            }
            Timer::PhaseEnd(phase) => match phase {
                Phase::Idle => self.start_phase(ctx, Phase::Churn),
                Phase::Churn => self.start_phase(ctx, Phase::Settle),
                Phase::Settle | Phase::Ramp => {
                    self.summarize();
                    ctx.stop(Duration::from_secs(1));
                }
            },
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fd_limit = peerchat_core::limits::raise_fd_limit(args.peers as u64 + 1024);
    if (fd_limit as usize) < args.peers + 100 {
        eprintln!(
            "loadgen: the open-file limit is {fd_limit}, too low for {} peers; raise it first (ulimit -n, prlimit)",
            args.peers
        );
        return ExitCode::from(2);
    }
    let on_loopback = args
        .registry
        .iter()
        .all(|r| r.ip().is_loopback() && r.is_ipv4());
    let sources: Vec<IpAddr> = if on_loopback {
        (0..args.sources)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
            .collect()
    } else {
        Vec::new()
    };
    let identity = Identity::generate();
    // Four bytes of the key, in hex: "a1b2c3d4-lg17" is 13 characters, well
    // under the 32 a name may have.
    let tag: String = identity.public().as_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "-";
    let loop_config = LoopConfig {
        max_connections: args.peers + 100_000,
        handle_signals: true,
        noise: Some(NoiseConfig::new(identity, protocol::noise_prologue())),
        handshake_timeout: args.handshake_timeout,
        ..LoopConfig::default()
    };
    let mut event_loop: EventLoop<Timer> = match EventLoop::new(loop_config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let welcome = protocol::frame(&FromRegistry::Welcome {
        version: PROTOCOL_VERSION,
        name: String::new(),
        addr: String::new(),
        heartbeat_ms: 0,
        timeout_ms: 0,
        probes: false,
        more: false,
        peers: Vec::new(),
    });
    // The frame's body starts with the map header and the "welcome" key.
    let welcome_prefix = welcome[4..4 + 1 + 1 + "welcome".len()].to_vec();
    let registry_before = sample_all(&args.registry_pid);
    let now = event_loop.ctx().now();
    let mut app = LoadGen {
        retried: 0,
        ramped: 0,
        heartbeat: None,
        heartbeat_frame: protocol::frame(&ToRegistry::Heartbeat {}),
        leave_frame: protocol::frame(&ToRegistry::Leave {}),
        welcome_prefix,
        tag,
        sources,
        phase: Phase::Ramp,
        phase_started: now,
        ramp_started: now,
        conns: HashMap::new(),
        opened: 0,
        registered: 0,
        failed: 0,
        idle_failed: 0,
        probes_registered: 0,
        next_churn: 0,
        joins: HashMap::new(),
        deltas: 0,
        churn_started: None,
        registry_before,
        registry_ramped: None,
        registry_idle_end: None,
        registry_churn_end: None,
        own_churn_start: None,
        own_churn_end: None,
        report: Vec::new(),
        args,
    };
    event_loop.ctx().arm(now, Timer::RampTick);
    let result = event_loop.run(&mut app);
    for line in &app.report {
        println!("{line}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
