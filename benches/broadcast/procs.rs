//! The processes under measurement: the registry as shipped, and what it
//! and this bench process spent over a benchmark.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_testkit::launch::announced;
use peerchat_testkit::process::{DataDir, LoggedProc};
use peerchat_testkit::procfs::{cpu_time, write_calls};

/// whole benchmark, warm-up and untimed parts included: CPU as a share of
/// one core, and the child's `write`/`writev` calls per delivery.
pub struct Usage {
    pub wall: Instant,
    pub child: Duration,
    pub me: Duration,
    pub writes: u64,
}

impl Usage {
    pub fn start(child: &LoggedProc) -> Usage {
        Usage {
            wall: Instant::now(),
            child: cpu_time(child.pid()),
            me: cpu_time(std::process::id() as i32),
            writes: write_calls(child.pid()),
        }
    }

    pub fn finish(self, child: &LoggedProc, deliveries: u64) -> String {
        self.finish_discounting(child, deliveries, 0)
    }

    /// Like [`Usage::finish`], not counting `extra` writes the bench caused
    /// for its own bookkeeping (heartbeat replies to [`Fleet::fence`]).
    pub fn finish_discounting(self, child: &LoggedProc, deliveries: u64, extra: u64) -> String {
        let wall = self.wall.elapsed().as_secs_f64();
        let child_share = (cpu_time(child.pid()) - self.child).as_secs_f64() / wall * 100.0;
        let me_share = (cpu_time(std::process::id() as i32) - self.me).as_secs_f64() / wall * 100.0;
        let writes = (write_calls(child.pid()) - self.writes).saturating_sub(extra);
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
pub struct RegistryInfo {
    pub addr: SocketAddr,
    pub key: PublicKey,
}

pub fn start_registry(bins: &Path, dir: &DataDir) -> (LoggedProc, RegistryInfo) {
    let key_file = dir.unique("registry.key");
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
    .env("XDG_DATA_HOME", dir.unique("registry-data"))
    // As shipped: one log line per join and leave.
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut proc = LoggedProc::spawn("registry", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = fs::read_to_string(&proc.log).unwrap_or_default();
        if let Some((addr, key)) = announced(text.lines()) {
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
