//! Child processes of a test or a bench: each is killed when dropped, its
//! output is kept for the failure message, and it gets a data directory of
//! its own.
//!
//! Every process a test starts gets a data directory of its own (a fresh
//! `XDG_DATA_HOME` under the system's temporary directory), so that tests
//! never read or write the user's keys and `known_peers`, and never share
//! keys by accident. A test that restarts a process with the same keys
//! passes the same [`DataDir`] again.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Data directories
// ---------------------------------------------------------------------------

struct DataDirInner {
    path: PathBuf,
}

impl Drop for DataDirInner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A private `XDG_DATA_HOME` for one process (or for one process and its
/// restarts): its key files and `known_peers` live here. Removed when the
/// last clone is dropped, so keep a clone to restart a process with it.
#[derive(Clone)]
pub struct DataDir(Arc<DataDirInner>);

impl DataDir {
    /// A new, empty directory, `peerchat-tests-<pid>-<n>` in the temporary
    /// directory, mode 0700.
    pub fn fresh() -> DataDir {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("peerchat-tests-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .expect("a test data directory");
        DataDir(Arc::new(DataDirInner { path }))
    }

    /// The directory itself, for `XDG_DATA_HOME` and for files placed by hand.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Where a peer started with this directory keeps its pins.
    pub fn known_peers(&self) -> PathBuf {
        self.path().join("peerchat/known_peers")
    }

    /// The pins a peer wrote here so far ("" if none).
    pub fn known_peers_text(&self) -> String {
        std::fs::read_to_string(self.known_peers()).unwrap_or_default()
    }

    /// Where a registry started with this directory keeps its key.
    pub fn registry_key_file(&self) -> PathBuf {
        self.path().join("peerchat-registry/registry.key")
    }

    /// Where a peer named `name` started with this directory keeps its key.
    pub fn peer_key_file(&self, name: &str) -> PathBuf {
        peerchat_peer::trust::key_file(&self.path().join("peerchat"), name)
    }

    /// A new path inside it, `<what>-<n>`, not created: for a key file or a
    /// data directory of one of several processes that share this one.
    pub fn unique(&self, what: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.path().join(format!("{what}-{n}"))
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Lines a child wrote to one of its streams, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    /// Every line so far, for a failure message or a check over all of them.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The last `n` lines, newest first: what to show when a test fails.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take(n)
            .cloned()
            .collect()
    }

    /// Whether some line so far contains `needle`, without waiting.
    pub fn contains(&self, needle: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits until some line contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The rest of the first line that starts with `prefix`, waiting for it
    /// at most `timeout`.
    pub fn wait_for_prefix(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_string));
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn collect(
    stream: impl Read + Send + 'static,
    tx: Option<mpsc::Sender<String>>,
) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            sink.0.lock().unwrap().push(line);
        }
    });
    lines
}

/// Kills and reaps a child: no test or bench leaves a process behind, not
/// even when it fails.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process that is killed when dropped; a thread collects its
/// stderr line by line, for tests that wait for what it says.
pub struct Proc {
    /// The process, for its exit status and its pipes.
    pub child: Child,
    /// What it wrote to stderr so far.
    pub stderr: Lines,
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

impl Proc {
    /// Its pid, as /proc and `kill` take it.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` (a `libc::SIG*`), to stop, continue or hang it up.
    pub fn signal(&self, signal: i32) {
        // SAFETY: sends a signal to our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the exit status, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A child process that is killed when dropped, whose stderr goes to a log
/// file instead of a reader thread: a bench that times the process must not
/// spend its own CPU on the child's log.
pub struct LoggedProc {
    /// What it is, for messages.
    pub what: &'static str,
    /// The process, for its exit status and its pipes.
    pub child: Child,
    /// Its stderr, removed when dropped.
    pub log: PathBuf,
}

impl LoggedProc {
    /// Runs `cmd` with stderr into a fresh log file in the temporary
    /// directory.
    pub fn spawn(what: &'static str, cmd: &mut Command) -> LoggedProc {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "peerchat-bench-{}-{what}-{}.log",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&log).expect("log file");
        let child = cmd
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        LoggedProc { what, child, log }
    }

    /// Its pid, as /proc takes it.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The end of its log, for the message when it died.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// Panics with the log's tail if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); log:\n{}", self.what, self.log_tail());
        }
    }
}

impl Drop for LoggedProc {
    fn drop(&mut self) {
        kill(&mut self.child);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Writes `len` bytes (whole MiB) that do not compress or repeat, in 1 MiB
/// writes, and syncs them: a payload on disk before anything is timed,
/// whose writeback cannot stall what is measured.
pub fn write_payload(path: &Path, len: u64) {
    use std::io::{BufWriter, Write};
    let mut out = BufWriter::new(File::create(path).expect("the payload file"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..len >> 20 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        out.write_all(&block).expect("writing the payload");
    }
    out.into_inner()
        .expect("writing the payload")
        .sync_all()
        .expect("writing the payload");
}

/// Runs `program` with `args` to its end: `Err` with what it printed on
/// stderr unless it succeeded (for the `ip`, `nft` and the like that set up
/// a test's network).
pub fn run_ok(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
