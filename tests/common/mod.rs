//! Shared helpers for the end-to-end tests: build and start the real
//! `registry` and `peer` binaries on loopback, talk raw protocol to the
//! registry inside a Noise session, and follow a peer's `--json` events.
//!
//! Every process a test starts gets a data directory of its own (a fresh
//! `XDG_DATA_HOME` under the system's temporary directory), so that tests
//! never read or write the user's keys and `known_peers`, and never share
//! keys by accident. A test that restarts a process with the same keys
//! passes the same [`DataDir`] again.
#![allow(dead_code)] // Each test file uses its own subset.

mod workspace_bins;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{FromRegistry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::SecureStream;
use serde_json::Value;

/// Frequent heartbeats keep fault tests fast (see the reliability issue).
pub const HEARTBEAT: &str = "200ms";
/// Long enough that a test thread or a client stalled by a busy machine is
/// not evicted; the tests of eviction itself pass `--timeout` with
/// [`EVICT_AFTER`].
pub const TIMEOUT: &str = "5s";
pub const EVICT_AFTER: &str = "1s";

/// Path of a workspace binary, built once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(workspace_bins::build).join(name)
}

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
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Lines a child wrote to one of its streams, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
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

fn collect(stream: impl Read + Send + 'static, tx: Option<mpsc::Sender<String>>) -> Lines {
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

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub stderr: Lines,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

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

pub struct Registry {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// The static key it printed at start.
    pub key: PublicKey,
    /// Its `XDG_DATA_HOME` (where its key file is unless `--key` says).
    pub data: DataDir,
}

impl Registry {
    pub fn start(extra: &[&str]) -> Registry {
        Self::launch(&[], "127.0.0.1:0", extra)
    }

    pub fn start_on(listen: &str, extra: &[&str]) -> Registry {
        Self::launch(&[], listen, extra)
    }

    /// A registry with the data directory (so the key) of an earlier one:
    /// what a restart of the same registry is.
    pub fn start_in(data: &DataDir, listen: &str, extra: &[&str]) -> Registry {
        Self::launch_in(&[], data, listen, extra)
    }

    /// Like [`Registry::start`], but run under a wrapper that execs the
    /// registry in its own process (for example `prlimit --nofile=64:64`),
    /// so that the child's pid is the registry's.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Registry {
        Self::launch(wrapper, "127.0.0.1:0", extra)
    }

    /// Runs the registry under `wrapper` (e.g. `ip netns exec NS`), which
    /// may be empty, with a fresh data directory. Returns once it has said
    /// where it listens.
    pub fn launch(wrapper: &[&str], listen: &str, extra: &[&str]) -> Registry {
        Self::launch_in(wrapper, &DataDir::fresh(), listen, extra)
    }

    pub fn launch_in(wrapper: &[&str], data: &DataDir, listen: &str, extra: &[&str]) -> Registry {
        let mut cmd = wrapped(wrapper, "registry");
        cmd.args(["--listen", listen]);
        for (flag, value) in [("--heartbeat", HEARTBEAT), ("--timeout", TIMEOUT)] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .env("XDG_DATA_HOME", data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("registry starts");
        let (tx, rx) = mpsc::channel();
        let stderr = collect(child.stderr.take().unwrap(), Some(tx));
        let proc = Proc { child, stderr };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut key = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(k) = line.strip_prefix("registry key ") {
                        key = Some(PublicKey::parse(k).expect("the registry's key"));
                    }
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let addr = addr.trim().parse().expect("listening address");
                        let key = key.expect("the registry prints its key before it listens");
                        return Registry {
                            proc,
                            addr,
                            key,
                            data: data.clone(),
                        };
                    }
                }
                Err(_) => panic!(
                    "registry never said it was listening: {:?}",
                    proc.stderr.snapshot()
                ),
            }
        }
    }
}

/// A command that runs one of our binaries, under `wrapper` if not empty.
fn wrapped(wrapper: &[&str], binary: &str) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin(binary));
            cmd
        }
        None => Command::new(bin(binary)),
    }
}

// ---------------------------------------------------------------------------
// The raw-protocol client
// ---------------------------------------------------------------------------

/// What a bounded read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Msg(FromRegistry),
    /// The other side closed (EOF or reset).
    Closed,
    /// Nothing within the time given.
    Timeout,
}

/// The register message this version sends.
pub fn register_msg(name: &str, port: i64) -> ToRegistry {
    ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: name.into(),
        port,
    }
}

/// A raw-protocol client of the registry: a Noise session under its own
/// static key, carrying frames written and read by hand.
pub struct Client {
    pub conn: SecureStream<TcpStream>,
    /// The key it proved; connect again with it to be the same peer.
    pub identity: Identity,
}

impl Client {
    /// Connects under a new key.
    pub fn connect(addr: SocketAddr) -> Client {
        Self::connect_as(addr, &Identity::generate())
    }

    /// Connects under `identity`: the same key as an earlier client.
    pub fn connect_as(addr: SocketAddr, identity: &Identity) -> Client {
        Self::try_connect_as(addr, identity)
            .unwrap_or_else(|e| panic!("Noise handshake with {addr}: {e}"))
    }

    /// The handshake's outcome, for tests where it may fail.
    pub fn try_connect_as(addr: SocketAddr, identity: &Identity) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let conn =
            SecureStream::connect(stream, identity, &peerchat_core::protocol::noise_prologue())?;
        Ok(Client {
            conn,
            identity: identity.clone(),
        })
    }

    pub fn key(&self) -> PublicKey {
        self.identity.public()
    }

    /// The TCP stream under the session (timeouts, shutdown).
    pub fn stream(&self) -> &TcpStream {
        self.conn.get_ref()
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.conn.get_mut()
    }

    pub fn send(&mut self, msg: &ToRegistry) {
        let frame = codec::encode_frame(msg).unwrap();
        self.conn.write_plain(&frame).unwrap();
    }

    /// Bytes of the frame stream, sealed: whole frames or deliberately
    /// broken ones, still inside the Noise session.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_plain(bytes)
    }

    /// Bytes straight onto the wire, past the Noise session.
    pub fn send_wire(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.get_mut().write_all(bytes)
    }

    pub fn register(addr: SocketAddr, name: &str, port: i64) -> (Client, FromRegistry) {
        Self::register_as(addr, &Identity::generate(), name, port)
    }

    /// Registers under `identity` (to reclaim a name that key holds).
    pub fn register_as(
        addr: SocketAddr,
        identity: &Identity,
        name: &str,
        port: i64,
    ) -> (Client, FromRegistry) {
        let mut c = Client::connect_as(addr, identity);
        c.send(&register_msg(name, port));
        let welcome = c.recv().expect("a reply to register");
        (c, welcome)
    }

    /// The next message, skipping heartbeat replies; `None` on close.
    pub fn recv(&mut self) -> Option<FromRegistry> {
        loop {
            let msg = self.recv_any()?;
            if msg != (FromRegistry::Heartbeat {}) {
                return Some(msg);
            }
        }
    }

    /// The next message; `None` on close. Panics on a read timeout (the
    /// stream's, 10 s unless a test set another) or on bad data.
    pub fn recv_any(&mut self) -> Option<FromRegistry> {
        match self.conn.read_frame() {
            Ok(Some(body)) => Some(codec::decode(&body).expect("a known message")),
            Ok(None) => None,
            Err(e) if is_reset(&e) => None,
            Err(e) => panic!("reading from the registry: {e}"),
        }
    }

    /// The next message within `timeout` (heartbeat replies included).
    pub fn next(&mut self, timeout: Duration) -> Next {
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream().set_read_timeout(Some(timeout)).unwrap();
        let next = match self.conn.read_frame() {
            Ok(Some(body)) => Next::Msg(codec::decode(&body).expect("a known message")),
            Ok(None) => Next::Closed,
            Err(e) if is_reset(&e) => Next::Closed,
            Err(e) if is_timeout(&e) => Next::Timeout,
            Err(e) => panic!("reading from the registry: {e}"),
        };
        self.stream()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        next
    }

    /// True once the registry has closed the connection (within the
    /// stream's read timeout).
    pub fn closed(&mut self) -> bool {
        for _ in 0..100_000 {
            if self.recv_any().is_none() {
                return true;
            }
        }
        false
    }

    /// Whether the registry closes the connection within `timeout`, skipping
    /// whatever it still says (it may say nothing at all: a broken Noise
    /// session has no way to carry an error).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream().set_read_timeout(Some(left)).unwrap();
            match self.conn.read_frame() {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(e) if is_timeout(&e) => return false,
                // Reset, or bytes that no longer decrypt: gone either way.
                Err(_) => return true,
            }
        }
        false
    }
}

pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

// ---------------------------------------------------------------------------
// Peer processes
// ---------------------------------------------------------------------------

/// A `peer --json` process and the events it printed.
pub struct PeerProc {
    pub proc: Proc,
    pub name: String,
    /// Its `XDG_DATA_HOME`: its key file and `known_peers`.
    pub data: DataDir,
    stdin: Option<ChildStdin>,
    events: Receiver<String>,
    pub seen: Vec<Value>,
}

impl PeerProc {
    pub fn start(name: &str, registry: SocketAddr) -> PeerProc {
        Self::start_with(name, &registry.to_string(), &[])
    }

    pub fn start_with(name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::start_in(&[], name, registry, extra)
    }

    /// Runs the peer under `wrapper` (e.g. `ip netns exec NS`), which may be
    /// empty, with a fresh data directory. It listens on 127.0.0.1 unless
    /// `extra` says `--listen`.
    pub fn start_in(wrapper: &[&str], name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::launch(wrapper, &DataDir::fresh(), name, registry, extra)
    }

    /// A peer with the data directory (so the key and pins) of an earlier
    /// one: what a restart of the same peer is.
    pub fn start_again(data: &DataDir, name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        Self::launch(&[], data, name, registry, extra)
    }

    pub fn launch(
        wrapper: &[&str],
        data: &DataDir,
        name: &str,
        registry: &str,
        extra: &[&str],
    ) -> PeerProc {
        let mut cmd = wrapped(wrapper, "peer");
        cmd.args(["--name", name, "--registry", registry, "--json"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("XDG_DATA_HOME", data.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("peer starts");
        let (tx, rx) = mpsc::channel();
        collect(child.stdout.take().unwrap(), Some(tx));
        let stderr = collect(child.stderr.take().unwrap(), None);
        let stdin = child.stdin.take();
        PeerProc {
            proc: Proc { child, stderr },
            name: name.into(),
            data: data.clone(),
            stdin,
            events: rx,
            seen: Vec::new(),
        }
    }

    /// The key fingerprint it printed at start.
    pub fn key(&self) -> PublicKey {
        let text = self
            .proc
            .stderr
            .wait_for_prefix("peer: your key fingerprint is ", LONG)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no key fingerprint on stderr: {:?}",
                    self.name,
                    self.proc.stderr.snapshot()
                )
            });
        PublicKey::parse(&text).expect("a fingerprint")
    }

    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin: the peer treats it as /quit.
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Waits for the first new event matching `pred`; every event read on
    /// the way is kept in `seen`.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.try_expect(timeout, pred) {
            Ok(value) => value,
            Err(why) => panic!(
                "{}: no {what} within {timeout:?} ({why}); saw {:?}; stderr {:?}",
                self.name,
                self.seen,
                self.proc.stderr.snapshot()
            ),
        }
    }

    /// Like [`PeerProc::expect`], but says why nothing matched instead of
    /// panicking: for tests that check that something does not happen.
    pub fn try_expect(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, &'static str> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("{}: stdout line is not JSON ({e}): {line}", self.name)
                    });
                    self.seen.push(value.clone());
                    if pred(&value) {
                        return Ok(value);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("timed out"),
                Err(RecvTimeoutError::Disconnected) => return Err("stdout closed"),
            }
        }
    }

    pub fn expect_event(&mut self, event: &str, timeout: Duration) -> Value {
        self.expect(event, timeout, |v| v["event"] == event)
    }

    /// Reads every event printed until the process's stdout closes.
    pub fn drain_until_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => self.seen.push(serde_json::from_str(&line).expect("JSON")),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: still printing after {timeout:?}", self.name)
                }
            }
        }
    }

    /// Registers and returns the `registered` event.
    pub fn registered(&mut self) -> Value {
        self.expect_event("registered", Duration::from_secs(10))
    }

    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.seen.iter().filter(|v| pred(v)).count()
    }
}

pub const LONG: Duration = Duration::from_secs(15);
