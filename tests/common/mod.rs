//! Shared helpers for the end-to-end tests: build and start the real
//! `registry` and `peer` binaries on loopback, talk raw protocol to the
//! registry, and follow a peer's `--json` events.
#![allow(dead_code)] // Each test file uses its own subset.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::protocol::{FromRegistry, ToRegistry};
use peerchat_core::wire::FrameDecoder;
use serde_json::Value;

/// Small limits keep fault tests fast (see the reliability issue).
pub const HEARTBEAT: &str = "200ms";
pub const TIMEOUT: &str = "1s";

/// Path of a workspace binary, built once per test process. The binaries
/// belong to other packages of the workspace, so Cargo does not build them
/// for this package's tests by itself.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "peerchat-registry",
            "-p",
            "peerchat-peer",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        profile_dir
    });
    dir.join(name)
}

/// Lines a child wrote to one of its streams, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
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
}

impl Registry {
    pub fn start(extra: &[&str]) -> Registry {
        Self::launch(&[], "127.0.0.1:0", extra)
    }

    pub fn start_on(listen: &str, extra: &[&str]) -> Registry {
        Self::launch(&[], listen, extra)
    }

    /// Like [`Registry::start`], but run under a wrapper that execs the
    /// registry in its own process (for example `prlimit --nofile=64:64`),
    /// so that the child's pid is the registry's.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Registry {
        Self::launch(wrapper, "127.0.0.1:0", extra)
    }

    /// Runs the registry under `wrapper` (e.g. `ip netns exec NS`), which
    /// may be empty. Returns once it has said where it listens.
    pub fn launch(wrapper: &[&str], listen: &str, extra: &[&str]) -> Registry {
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("registry starts");
        let (tx, rx) = mpsc::channel();
        let stderr = collect(child.stderr.take().unwrap(), Some(tx));
        let proc = Proc { child, stderr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let addr = addr.trim().parse().expect("listening address");
                        return Registry { proc, addr };
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

/// A raw-protocol client of the registry.
pub struct Client {
    pub stream: TcpStream,
    dec: FrameDecoder,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to the registry");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            dec: FrameDecoder::new(1 << 20),
        }
    }

    pub fn send(&mut self, msg: &ToRegistry) {
        let frame = codec::encode_frame(msg).unwrap();
        self.stream.write_all(&frame).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn register(addr: SocketAddr, name: &str, port: i64) -> (Client, FromRegistry) {
        let mut c = Client::connect(addr);
        c.send(&ToRegistry::Register {
            version: 1,
            name: name.into(),
            port,
            secret: None,
        });
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

    pub fn try_decoded(&mut self) -> Option<FromRegistry> {
        let body = self
            .dec
            .next_frame()
            .expect("valid frames from the registry")?;
        Some(codec::decode(&body).expect("a known message"))
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.dec.push(bytes);
    }

    pub fn recv_any(&mut self) -> Option<FromRegistry> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(body) = self
                .dec
                .next_frame()
                .expect("valid frames from the registry")
            {
                return Some(codec::decode(&body).expect("a known message"));
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the registry: {e}"),
            }
        }
    }

    /// True once the registry has closed the connection (within the
    /// stream's read timeout).
    pub fn closed(&mut self) -> bool {
        loop {
            match self.recv_any() {
                None => return true,
                Some(FromRegistry::Heartbeat {}) => {}
                Some(_) => {}
            }
        }
    }
}

/// A `peer --json` process and the events it printed.
pub struct PeerProc {
    pub proc: Proc,
    pub name: String,
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
    /// empty. It listens on 127.0.0.1 unless `extra` says `--listen`.
    pub fn start_in(wrapper: &[&str], name: &str, registry: &str, extra: &[&str]) -> PeerProc {
        let mut cmd = wrapped(wrapper, "peer");
        cmd.args(["--name", name, "--registry", registry, "--json"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "warn")
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
            stdin,
            events: rx,
            seen: Vec::new(),
        }
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
                        return value;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: no {what} within {timeout:?}; saw {:?}; stderr {:?}",
                    self.name,
                    self.seen,
                    self.proc.stderr.snapshot()
                ),
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

impl Client {
    /// The client's frame decoder: lets a test read the rest of the stream
    /// by hand without losing bytes the client already buffered.
    pub fn decoder(&mut self) -> &mut FrameDecoder {
        &mut self.dec
    }
}
