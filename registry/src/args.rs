//! The `registry` command line, here rather than in the binary so that the
//! packaging can make the manual page and shell completions from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use peerchat_core::args::{parse_duration, parse_size};

/// The peerchat registry: who is online and where.
///
/// It knows who is online and where, and tells everyone of every join and
/// leave; chat never passes through it. It prints `registry key KEY` (what
/// peers pass as --registry-key) and `listening on ADDR` on stderr at
/// start, and under systemd tells the service manager it is ready once it
/// listens. SIGINT, SIGTERM and SIGHUP stop it cleanly.
#[derive(Debug, Parser)]
#[command(name = "registry", version)]
pub struct Args {
    /// Address to listen on, e.g. 0.0.0.0:7000, 127.0.0.1:0, [::]:7000, or
    /// a host name such as localhost:7000 (every address it resolves to).
    #[arg(long, value_name = "ADDR", required_unless_present = "print_key")]
    pub listen: Option<String>,
    /// Print the public key of the key file (--key, or the default) and
    /// exit, without starting: what peers pass as --registry-key.
    #[arg(long, conflicts_with = "listen")]
    pub print_key: bool,
    /// How often peers send a heartbeat (e.g. 200ms, 5s, 1m).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Silence after which a peer is evicted; must exceed --heartbeat.
    #[arg(long, value_name = "DUR", default_value = "15s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Most peers registered at once; more get `registry_full`.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = at_least_one)]
    pub max_peers: usize,
    /// Largest frame body a registered peer may send, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..))]
    pub max_frame: u32,
    /// Most open connections, registered or not; extra ones are closed at
    /// once. Default: twice --max-peers plus 1024.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub max_connections: Option<usize>,
    /// Time a new connection has for its Noise handshake, and then again to
    /// register.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// How long a name stays reserved for its owner's key after the peer
    /// left (quit, timeout or disconnect).
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = parse_duration)]
    pub name_grace: Duration,
    /// The registry's static key file, created (mode 0600) if missing.
    /// Default: $XDG_DATA_HOME/peerchat-registry/registry.key, else
    /// ~/.local/share/peerchat-registry/registry.key.
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// A file in which the registry keeps which key owns which name, so
    /// that a restart hands no name to another key. Without it, owners are
    /// kept in memory only. One registry at a time writes a file; a second
    /// one on it takes the owners in it and keeps its own in memory.
    #[arg(long, value_name = "PATH")]
    pub names: Option<PathBuf>,
    /// Serve one directory with the other registries of a cluster,
    /// through these NATS servers (JetStream on): nats://HOST:PORT,
    /// comma-separated or repeated. Names are then kept by the cluster,
    /// not in a --names file.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        conflicts_with = "names",
        value_parser = nats_url
    )]
    pub cluster: Vec<String>,
    /// Copies of the cluster's records NATS keeps, each on another server:
    /// at most the number of NATS servers. 3 survives the loss of one.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub cluster_replicas: u8,
    /// Bytes that may wait to be sent to one peer before it is dropped as
    /// too slow; at least 64 KiB, so that a welcome fits.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(65_536..))]
    pub max_queue: usize,
    /// The longest a busy registry takes to send a join or leave to every
    /// peer: its update window, over which it spreads one update per peer
    /// with every change that peer has not seen, instead of one per
    /// change. Idle, it sends at once.
    #[arg(long, value_name = "DUR", default_value = "700ms", value_parser = parse_duration)]
    pub max_update_delay: Duration,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9100. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// How log lines are written on stderr: `text` (timestamp, level,
    /// message, fields) or `json` (one object per line, for log shippers).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How often to log a stats line (and hand back memory not needed since
    /// the last one).
    #[arg(long, value_name = "DUR", default_value = "1m", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Relay nothing: peers that cannot dial each other cannot talk.
    #[arg(long)]
    pub no_relay: bool,
    /// Do not dial peers back to learn whether others can reach them: the
    /// directory then says nothing of it, and peers find out by dialing.
    #[arg(long)]
    pub no_probe: bool,
    /// Bytes a second one peer may send through the registry's relays, all
    /// its relayed links together (e.g. 2MiB).
    #[arg(long, value_name = "SIZE", default_value = "2MiB", value_parser = parse_rate)]
    pub relay_rate: u64,
    /// Bytes a second the registry relays in all.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_rate)]
    pub relay_max: u64,
}

/// A byte rate: a size of at least one byte.
fn parse_rate(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("must be at least 1 byte a second".into()),
        n => Ok(n),
    }
}

/// A count that must not be zero (a registry that takes no peer is a
/// mistake, not a setting).
/// A NATS server's address as the client takes it (`nats://HOST:PORT`,
/// or `HOST[:PORT]`), kept as given.
fn nats_url(text: &str) -> Result<String, String> {
    text.parse::<async_nats::ServerAddr>()
        .map(|_| text.to_string())
        .map_err(|e| format!("{e} (write it as nats://HOST:PORT)"))
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
