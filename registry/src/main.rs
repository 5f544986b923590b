//! The `registry` binary: command line, logging, and the host around the
//! sans-IO [`Registry`], which core's driver runs on the event loop.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::CommandFactory;
use peerchat_core::identity::{self, Identity};
use peerchat_core::machine::{Driver, Host, HostCtx, LinkId, Wake};
use peerchat_core::protocol;
use peerchat_core::secure::NoiseConfig;
use peerchat_core::trusted_file::Lock;
use peerchat_core::{EventLoop, LoopConfig};
use peerchat_registry::args::{Args, LogFormat};
use peerchat_registry::metrics::{self, Metrics, Snapshot};
use peerchat_registry::names_file::{self, Saver};
use peerchat_registry::nats::{ClusterLink, ClusterOptions};
use peerchat_registry::{Config, Owner, Registry, RelayConfig};

/// The registry binary's own periodic work.
enum HostTimer {
    Stats,
    SaveNames,
    Metrics,
    Load,
}

/// How often the loop's load is measured and handed to the registry (which
/// sets its update window from it): short, so that a burst is met within
/// a second.
const LOAD_INTERVAL: Duration = Duration::from_millis(250);

/// How often the metrics are brought up to date: fresher than any scrape
/// interval needs.
const METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// How often changed name owners are saved: what a crash can lose.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

type RegistryMachine = Registry<LinkId>;

/// What the binary adds around the registry machine: the stats line, saving
/// name owners, and shutting down on a signal.
struct RegistryHost {
    stats_interval: Duration,
    /// `None` without `--names`, or when another registry holds the file.
    record: Option<Record>,
    /// Owners changed, but the saver was still busy with an older save.
    save_waiting: bool,
    /// The owners as they were when a signal stopped the registry (the
    /// shutdown empties the directory), and the time they were taken, for
    /// the last save.
    at_shutdown: Option<(Vec<Owner>, SystemTime)>,
    /// With `--metrics`.
    metrics: Option<Metrics>,
    /// The loop's busy time when the load was last measured, and when.
    last_load: (Duration, Instant),
    /// With `--cluster`.
    cluster: Option<ClusterLink>,
}

impl Host<RegistryMachine> for RegistryHost {
    type Timer = HostTimer;

    fn host_output(
        &mut self,
        _ctx: &mut HostCtx<RegistryMachine, Self>,
        _registry: &mut RegistryMachine,
        output: Infallible,
    ) {
        match output {}
    }

    fn on_timer(
        &mut self,
        ctx: &mut HostCtx<RegistryMachine, Self>,
        registry: &mut RegistryMachine,
        timer: HostTimer,
    ) {
        match timer {
            HostTimer::Stats => {
                let loop_stats = ctx.stats();
                let stats = registry.stats();
                let relay = registry.relay_stats();
                tracing::info!(
                    peers = registry.peer_count(),
                    cluster_peers = registry.remote_count(),
                    connections = ctx.connections(),
                    frames_in = loop_stats.frames_in,
                    frames_out = loop_stats.frames_out,
                    bytes_in = loop_stats.bytes_in,
                    bytes_out = loop_stats.bytes_out,
                    joins = stats.joins,
                    leaves = stats.leaves,
                    evictions = stats.evictions,
                    rejections = stats.rejections,
                    reserved = registry.reserved_count(),
                    update_delay_ms = registry.update_delay().as_millis() as u64,
                    busy_ms = loop_stats.busy.as_millis() as u64,
                    slow = loop_stats.slow_closed,
                    secure_failed = loop_stats.secure_failed,
                    relays = relay.ends / 2,
                    relayed_bytes = relay.bytes,
                    relays_refused = relay.refused,
                    reversals = stats.reversals,
                    reversals_failed = stats.reversals_failed,
                    "stats"
                );
                registry.release_caches();
                release_free_memory();
                let next = ctx.now() + self.stats_interval;
                ctx.arm(next, Wake::Host(HostTimer::Stats));
            }
            HostTimer::Load => {
                let (busy, at) = self.last_load;
                let now = Instant::now();
                let busy_now = ctx.stats().busy;
                let spent = busy_now.saturating_sub(busy).as_secs_f64();
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                if elapsed > 0.0 {
                    registry.set_load(spent / elapsed, now.saturating_duration_since(at));
                }
                self.last_load = (busy_now, now);
                let next = ctx.now() + LOAD_INTERVAL;
                ctx.arm(next, Wake::Host(HostTimer::Load));
            }
            HostTimer::Metrics => {
                if let Some(metrics) = &mut self.metrics {
                    metrics.update(Snapshot {
                        peers: registry.peer_count(),
                        connections: ctx.connections(),
                        reserved: registry.reserved_count(),
                        queued_bytes: ctx.queued_bytes(),
                        update_delay: registry.update_delay(),
                        loop_stats: ctx.stats().clone(),
                        stats: registry.stats().clone(),
                        relay: registry.relay_stats(),
                    });
                }
                let next = ctx.now() + METRICS_INTERVAL;
                ctx.arm(next, Wake::Host(HostTimer::Metrics));
            }
            // Once stopping, the directory is empty: only the last save,
            // with the owners from before, may be written.
            HostTimer::SaveNames if self.at_shutdown.is_some() => {}
            HostTimer::SaveNames => {
                let Some(record) = &self.record else {
                    return;
                };
                let failed = record.saver.take_failed();
                if registry.take_owners_changed() || self.save_waiting || failed {
                    let owners = registry.owners(ctx.now());
                    self.save_waiting = !record.saver.offer(owners, SystemTime::now());
                }
                let next = ctx.now() + SAVE_INTERVAL;
                ctx.arm(next, Wake::Host(HostTimer::SaveNames));
            }
        }
    }

    /// The cluster thread woke the loop: its news goes to the registry.
    fn on_wake(
        &mut self,
        ctx: &mut HostCtx<RegistryMachine, Self>,
        registry: &mut RegistryMachine,
    ) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        while let Some(event) = cluster.try_event() {
            registry.cluster_event(event, ctx.now());
        }
    }

    fn end_turn(
        &mut self,
        ctx: &mut HostCtx<RegistryMachine, Self>,
        registry: &mut RegistryMachine,
    ) {
        if let Some(cluster) = &self.cluster {
            while let Some(write) = registry.poll_cluster_write() {
                cluster.write(write);
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.turn(ctx.turn_started().elapsed());
        }
    }

    fn on_signal(
        &mut self,
        ctx: &mut HostCtx<RegistryMachine, Self>,
        registry: &mut RegistryMachine,
        signal: i32,
    ) {
        tracing::info!(signal, peers = registry.peer_count(), "shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if self.record.is_some() && self.at_shutdown.is_none() {
            self.at_shutdown = Some((registry.owners(ctx.now()), SystemTime::now()));
        }
        registry.shutdown("the registry is shutting down");
        ctx.stop(Duration::from_secs(1));
    }
}

/// Hands memory freed after a burst (snapshots for a wave of joins) back to
/// the system, so that the registry's size follows its peers, not its
/// busiest minute.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The key file: `--key`, else the default.
fn key_path(path: Option<PathBuf>) -> Result<PathBuf, String> {
    match path {
        Some(path) => Ok(path),
        None => Ok(identity::data_home()
            .ok_or("neither XDG_DATA_HOME nor HOME is set; name a key file with --key")?
            .join("peerchat-registry/registry.key")),
    }
}

/// `--print-key`: the key file's public key on stdout. A missing file is
/// an error, not made: the key a registry will prove is the one it makes.
fn print_key(path: Option<PathBuf>) -> ExitCode {
    let loaded = key_path(path).and_then(|path| {
        Identity::load(&path).map_err(|e| {
            format!("{e} (a registry makes its key file when it first starts; --key names another)")
        })
    });
    match loaded {
        Ok(identity) => {
            println!("{}", identity.public());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("registry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The registry's identity: the same key across restarts, so that its peers
/// (which pin it) still know it.
fn load_identity(path: Option<PathBuf>) -> Result<Identity, String> {
    let path = key_path(path)?;
    let (identity, created) = Identity::load_or_create(&path).map_err(|e| e.to_string())?;
    if created {
        tracing::info!("created a new registry key in {}", path.display());
    }
    Ok(identity)
}

/// Logs on stderr, each line with its time and level and without the
/// module it came from (one name per binary: the registry's). They go
/// through a writer thread: a stalled stderr (a full pipe nobody reads)
/// drops log lines instead of freezing the loop. Keep the guard until exit.
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    guard
}

/// The file of name owners (`--names`), held by this registry.
struct Record {
    path: PathBuf,
    saver: Saver,
    _lock: Lock,
}

/// Opens the file of name owners: the owners in it, and the thread that
/// saves them. No record without `--names`. When another registry holds
/// the file, this one takes the owners in it but never writes it: two
/// registries writing one record would each undo the other's owners.
fn open_record(path: Option<PathBuf>) -> Result<(Option<Record>, Vec<Owner>), String> {
    let Some(path) = path else {
        return Ok((None, Vec::new()));
    };
    let lock = match Lock::take(&path) {
        Ok(lock) => Some(lock),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            tracing::warn!(
                path = %path.display(),
                "another registry is using this names file; this one takes the owners in it and keeps its own changes in memory only"
            );
            None
        }
        Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
    };
    let loaded = names_file::load(&path, SystemTime::now())
        .map_err(|e| format!("{e} (fix or remove it; it says which key owns which name)"))?;
    for why in &loaded.skipped {
        tracing::warn!(path = %path.display(), "left out of the name owners: {why}");
    }
    if !loaded.owners.is_empty() {
        tracing::info!(owners = loaded.owners.len(), path = %path.display(), "names kept for their keys");
    }
    let Some(lock) = lock else {
        return Ok((None, loaded.owners));
    };
    let saver =
        Saver::start(path.clone()).map_err(|e| format!("cannot start saving name owners: {e}"))?;
    let record = Record {
        path,
        saver,
        _lock: lock,
    };
    Ok((Some(record), loaded.owners))
}

/// The addresses `--listen` names, each once; a bad one is a usage error.
fn resolve_listen(listen: &str) -> Vec<SocketAddr> {
    let usage = |why: String| -> ! {
        Args::command()
            .error(
                clap::error::ErrorKind::InvalidValue,
                format!("--listen {listen}: {why}"),
            )
            .exit()
    };
    let mut addrs: Vec<SocketAddr> = match listen.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => usage(format!("{e} (write it as HOST:PORT, e.g. 0.0.0.0:7000)")),
    };
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    if addrs.is_empty() {
        usage("no address found".into());
    }
    addrs
}

/// Listens on every address; with port 0, the later ones take the port the
/// first one got, so that a host name means one port. An address that
/// fails is skipped with a warning (`localhost` may name an IPv6 address on
/// a host without IPv6); none at all is fatal.
fn listen_all<T>(event_loop: &mut EventLoop<T>, addrs: &[SocketAddr]) -> Option<Vec<SocketAddr>> {
    let mut listening: Vec<SocketAddr> = Vec::new();
    for addr in addrs {
        let mut addr = *addr;
        if let Some(first) = listening.first().filter(|_| addr.port() == 0) {
            addr.set_port(first.port());
        }
        match event_loop.listen(addr) {
            Ok(local) => listening.push(local),
            Err(e) if addrs.len() > 1 => {
                tracing::warn!(%addr, error = %e, "cannot listen here; going on without it")
            }
            Err(e) => {
                tracing::error!("cannot listen on {addr}: {e}");
                return None;
            }
        }
    }
    if listening.is_empty() {
        tracing::error!("cannot listen on any address of the --listen host");
        return None;
    }
    Some(listening)
}

/// With `--cluster`: the thread that talks to NATS, and this registry's
/// id in the cluster (new at every start: a restarted registry is a new
/// one, and its old self's peers are judged by its silence).
fn start_cluster<T>(
    servers: &[String],
    replicas: u8,
    event_loop: &EventLoop<T>,
    heartbeat: Duration,
) -> std::io::Result<Option<(ClusterLink, String)>> {
    if servers.is_empty() {
        return Ok(None);
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let waker = event_loop.waker();
    let wake = std::sync::Arc::new(move || {
        if let Err(e) = waker.wake() {
            tracing::error!(error = %e, "cannot wake the event loop");
        }
    });
    let options = ClusterOptions {
        servers: servers.to_vec(),
        replicas: usize::from(replicas),
        id: id.clone(),
        heartbeat,
    };
    Ok(Some((ClusterLink::start(options, wake)?, id)))
}

fn main() -> ExitCode {
    let args: Args = peerchat_core::args::parse_args();
    if args.print_key {
        return print_key(args.key);
    }
    if args.timeout <= args.heartbeat {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--timeout ({:?}) must be longer than --heartbeat ({:?})",
                    args.timeout, args.heartbeat
                ),
            )
            .exit();
    }
    // A relayed direction holds up to its window unwritten: a smaller
    // queue would drop a receiver as slow instead of holding its sender.
    let relay_queue = 2 * peerchat_registry::RELAY_WINDOW;
    if !args.no_relay && args.max_queue < relay_queue {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--max-queue {} is below the {relay_queue} bytes a relayed link may hold; raise it, or pass --no-relay",
                    args.max_queue
                ),
            )
            .exit();
    }
    let listen_addrs = resolve_listen(args.listen.as_deref().unwrap_or_default());
    let _log_flush_on_exit = init_logs(args.log_format);
    let max_connections = args
        .max_connections
        .unwrap_or(args.max_peers.saturating_mul(2).saturating_add(1024));
    // One descriptor per connection: make room for all of them if we may.
    let fd_limit = peerchat_core::limits::raise_fd_limit(max_connections as u64 + 64);
    if (fd_limit as usize) < max_connections && args.max_connections.is_some() {
        tracing::warn!(
            fd_limit,
            max_connections,
            "the open-file limit is below --max-connections; accepts will pause when it is reached"
        );
    }
    let config = Config {
        heartbeat: args.heartbeat,
        timeout: args.timeout,
        max_peers: args.max_peers,
        max_frame: args.max_frame as usize,
        register_timeout: args.handshake_timeout,
        unregistered_max_frame: 4096.min(args.max_frame as usize),
        name_grace: args.name_grace,
        max_update_delay: args.max_update_delay,
        relay: RelayConfig {
            enabled: !args.no_relay,
            peer_rate: args.relay_rate,
            total_rate: args.relay_max,
            ..RelayConfig::default()
        },
        probe: !args.no_probe,
    };
    let identity = match load_identity(args.key) {
        Ok(identity) => identity,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (record, owners) = match open_record(args.names) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let loop_config = LoopConfig {
        max_frame: config.unregistered_max_frame,
        max_queued: args.max_queue,
        max_connections,
        handle_signals: true,
        noise: Some(NoiseConfig::new(
            identity.clone(),
            protocol::noise_prologue(),
        )),
        handshake_timeout: args.handshake_timeout,
        ..LoopConfig::default()
    };
    let mut event_loop = match EventLoop::new(loop_config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot start the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(listening) = listen_all(&mut event_loop, &listen_addrs) else {
        return ExitCode::FAILURE;
    };
    let now = event_loop.ctx().now();
    event_loop
        .ctx()
        .arm(now + args.stats_interval, Wake::Host(HostTimer::Stats));
    if record.is_some() {
        event_loop
            .ctx()
            .arm(now + SAVE_INTERVAL, Wake::Host(HostTimer::SaveNames));
    }
    let mut registry = Registry::new(config, now);
    registry.restore(owners, now);
    let cluster = match start_cluster(
        &args.cluster,
        args.cluster_replicas,
        &event_loop,
        args.heartbeat,
    ) {
        Ok(None) => None,
        Ok(Some((link, id))) => {
            tracing::info!(id = %id, servers = %args.cluster.join(","), "joining the cluster");
            registry.join_cluster(id, now, SystemTime::now());
            Some(link)
        }
        Err(e) => {
            tracing::error!("cannot start the cluster thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match args.metrics {
        None => None,
        Some(addr) => {
            let (metrics, served) = Metrics::new();
            match metrics::serve(addr, served) {
                Ok(local) => tracing::info!("metrics at http://{local}/metrics"),
                Err(e) => {
                    tracing::error!("cannot serve metrics on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            event_loop.ctx().arm(now, Wake::Host(HostTimer::Metrics));
            Some(metrics)
        }
    };
    let host = RegistryHost {
        stats_interval: args.stats_interval,
        record,
        save_waiting: false,
        at_shutdown: None,
        metrics,
        last_load: (Duration::ZERO, Instant::now()),
        cluster,
    };
    event_loop
        .ctx()
        .arm(now + LOAD_INTERVAL, Wake::Host(HostTimer::Load));
    let mut app = Driver::new(registry, host);
    // Scripts read these two: their text stays as documented.
    tracing::info!("registry key {}", identity.public());
    for local in listening {
        tracing::info!("listening on {local}");
    }
    // Under systemd (`Type=notify`): ready once it listens. Elsewhere there
    // is no socket to tell, and nothing happens.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell the service manager the registry is ready");
    }
    let mut status = ExitCode::SUCCESS;
    if let Err(e) = event_loop.run(&mut app) {
        tracing::error!("the event loop failed: {e}");
        status = ExitCode::FAILURE;
    }
    if let Some(record) = app.host.record {
        let (owners, taken) = match app.host.at_shutdown {
            Some(taken) => taken,
            None => (app.machine.owners(Instant::now()), SystemTime::now()),
        };
        if let Err(e) = record.saver.finish(owners, taken) {
            tracing::error!(
                "cannot save the name owners in {}: {e}; a restart will not know them",
                record.path.display()
            );
            status = ExitCode::FAILURE;
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerchat_core::args::parse_duration;

    #[test]
    fn command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_parse_as_documented() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
