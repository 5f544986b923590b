//! Reliability and abuse: the real `registry` and `peer --json` binaries on
//! 127.0.0.1, fed hostile bytes, floods, slow readers and odd closes.
//!
//! Every bad-input case checks the same four things: the offending
//! connection is closed (after an `error` frame with the documented code
//! where PROTOCOL.md promises one), the process is still alive, a control
//! client registered before the attack keeps its registration and sees every
//! update in order, and the registry's descriptors and resident memory come
//! back near their baseline once the connections are gone.
//!
//! Every connection is a Noise session: hostile frames travel inside one
//! (so they still reach the frame and CBOR checks and earn the same codes),
//! and hostile bytes where the Noise messages belong close the connection
//! without a word, since there is no session to carry one.
//!
//! Limits are small (heartbeat 200 ms, handshake 2-3 s where a test waits for
//! it) and every loop is bounded in count and in time. Tests that open
//! hundreds of sockets take the `HEAVY` lock, so that they do not disturb
//! each other's timings on a two-core machine. Time bounds leave room for a
//! busy machine: what they catch is a deadline missed by seconds or a
//! connection kept forever, not a slow turn.
//!
//! Longer than the project's 800-line aim, for now: its harness (more than a
//! thousand lines before the first test) moves into the shared dev-only
//! testkit, and the cases split along its banners. That split is one step of
//! the planned architecture work (transport, machine contract, peer rooms,
//! testkit); done here alone, it would be done twice.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{is_reset, is_timeout, register_msg, Client, Next, PeerProc, Registry, LONG};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{Change, FromRegistry, LinkMsg, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::{SecureChannel, SecureStream, MAX_HANDSHAKE_MESSAGE, MAX_PLAINTEXT};
use serde_json::Value;

/// What "closed at once" means for a connection that broke the rules: well
/// under every deadline a connection could be closed by instead.
const AT_ONCE: Duration = Duration::from_secs(3);
/// Descriptors the registry may hold above its baseline once a case is over.
const FD_SLACK: usize = 5;
/// Resident memory the registry may hold above its baseline (KiB).
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// A Noise session over TCP, as the tests open them by hand.
type Secure = SecureStream<TcpStream>;

/// Something done to a Noise session by a test.
type SessionAct<'a> = Box<dyn Fn(&mut Secure) + 'a>;

/// Runs the dialer's Noise handshake on `stream` under a new key.
fn secure(stream: TcpStream) -> Secure {
    secure_as(stream, &Identity::generate())
}

/// Runs the dialer's Noise handshake on `stream` under `identity`.
fn secure_as(stream: TcpStream, identity: &Identity) -> Secure {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    SecureStream::connect(stream, identity, &peerchat_core::protocol::noise_prologue())
        .expect("a Noise handshake")
}

// ---------------------------------------------------------------------------
// Process and system helpers
// ---------------------------------------------------------------------------

/// Serialises the tests that open hundreds of sockets or measure time
/// closely; a failed test must not poison the others.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises this test process's soft open-file limit to the hard limit.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raised), 0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the registry's /proc/<pid>/fd")
        .count()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

fn usage(pid: i32) -> Usage {
    Usage {
        fds: fd_count(pid),
        rss_kib: rss_kib(pid),
    }
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    utime + stime
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// Waits (bounded) for the registry's descriptors and memory to come back
/// to its baseline (memory is trimmed at its next stats line), then checks
/// both against it.
fn settle(label: &str, pid: i32, base: Usage) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = usage(pid);
    for _ in 0..500 {
        let back = now.fds <= base.fds && now.rss_kib <= base.rss_kib + 2048;
        if back || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
        now = usage(pid);
    }
    eprintln!(
        "[{label}] registry fds {} -> {}, VmRSS {} -> {} KiB",
        base.fds, now.fds, base.rss_kib, now.rss_kib
    );
    assert!(
        now.fds <= base.fds + FD_SLACK,
        "{label}: the registry holds {} descriptors, {} at the baseline",
        now.fds,
        base.fds
    );
    assert!(
        now.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
        "{label}: the registry's VmRSS is {} KiB, {} KiB at the baseline",
        now.rss_kib,
        base.rss_kib
    );
    now
}

fn assert_alive(label: &str, reg: &mut Registry) {
    let status = reg.proc.child.try_wait().expect("try_wait");
    assert!(
        status.is_none(),
        "{label}: the registry died ({status:?}); stderr: {:?}",
        reg.proc.stderr.snapshot()
    );
    assert!(
        !reg.proc.stderr.contains("panicked"),
        "{label}: the registry panicked: {:?}",
        reg.proc.stderr.snapshot()
    );
}

/// Connects with a small receive buffer set before the handshake, so that
/// the advertised window stays small and the other side has to queue.
fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only: {addr}")
    };
    // SAFETY: plain socket calls on a descriptor we create and then hand to
    // a TcpStream that owns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("connect {addr}: {err}");
        }
        let stream = TcpStream::from_raw_fd(fd);
        stream.set_nodelay(true).unwrap();
        stream
    }
}

/// Closes with a reset instead of a FIN: SO_LINGER {on, 0 s}, then close.
fn close_with_reset(s: Secure) {
    let stream = s.get_ref();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: sets a socket option on a descriptor the stream owns.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

// ---------------------------------------------------------------------------
// Bytes on the wire
// ---------------------------------------------------------------------------

/// A CBOR head: major type and argument, in the shortest form.
fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    let mut out = Vec::with_capacity(9);
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes());
        }
    }
    out
}

fn cbor_text_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = head(3, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

fn cbor_text(s: &str) -> Vec<u8> {
    cbor_text_bytes(s.as_bytes())
}

fn cbor_uint(n: u64) -> Vec<u8> {
    head(0, n)
}

fn cbor_map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = head(5, entries.len() as u64);
    for (key, value) in entries {
        out.extend(cbor_text(key));
        out.extend_from_slice(value);
    }
    out
}

/// `{kind: {fields…}}`, the shape of every message.
fn cbor_msg(kind: &str, fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    cbor_map(&[(kind, cbor_map(fields))])
}

/// Length prefix plus body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A length prefix that claims `len` bytes, followed by `body`.
fn claimed(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn register_frame(name: &str, port: i64) -> Vec<u8> {
    codec::encode_frame(&register_msg(name, port))
        .unwrap()
        .to_vec()
}

fn heartbeat_frame() -> Vec<u8> {
    codec::encode_frame(&ToRegistry::Heartbeat {})
        .unwrap()
        .to_vec()
}

fn leave_frame() -> Vec<u8> {
    codec::encode_frame(&ToRegistry::Leave {}).unwrap().to_vec()
}

/// A register body with a name given as raw text-string bytes.
fn register_raw_name(name: &[u8], port: u64) -> Vec<u8> {
    frame(&cbor_msg(
        "register",
        &[
            ("version", cbor_uint(PROTOCOL_VERSION.into())),
            ("name", cbor_text_bytes(name)),
            ("port", cbor_uint(port)),
        ],
    ))
}

/// 100 bytes: an array that declares 2^60 items.
fn huge_array_body() -> Vec<u8> {
    let mut body = head(4, 1 << 60);
    body.resize(100, 0);
    body
}

/// 100 bytes: a register message whose value is a map of 2^60 entries.
fn huge_map_in_register_body() -> Vec<u8> {
    let mut body = head(5, 1);
    body.extend(cbor_text("register"));
    body.extend(head(5, 1 << 60));
    body.resize(100, 0);
    body
}

/// `n` bytes of 0x81: an array holding an array holding an array…
fn nested_arrays(n: usize) -> Vec<u8> {
    vec![0x81; n]
}

/// Sends frame-stream bytes one per Noise message, and those messages one
/// wire byte per write, each flushed on its own (TCP_NODELAY): both the
/// frame decoder and the Noise reassembly get the smallest pieces there are.
fn dribble(s: &mut Secure, bytes: &[u8]) {
    s.get_ref().set_nodelay(true).unwrap();
    s.get_ref()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for b in bytes {
        let wire = s.seal(std::slice::from_ref(b)).unwrap();
        for w in &wire {
            s.get_mut().write_all(std::slice::from_ref(w)).unwrap();
        }
        thread::sleep(Duration::from_millis(1));
    }
}

fn joined(name: &str, port: i64, key: PublicKey) -> Change {
    Change::Joined {
        name: name.into(),
        addr: format!("127.0.0.1:{port}"),
        key,
    }
}

fn left(name: &str, reason: &str) -> Change {
    Change::Left {
        name: name.into(),
        reason: reason.into(),
    }
}

fn change_name(c: &Change) -> &str {
    match c {
        Change::Joined { name, .. } | Change::Left { name, .. } | Change::Moved { name, .. } => {
            name
        }
    }
}

// ---------------------------------------------------------------------------
// Reading a connection to its end
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// Still open when the time ran out.
    Open,
}

#[derive(Debug)]
struct Finish {
    frames: Vec<Bytes>,
    end: End,
    elapsed: Duration,
}

/// Reads a Noise session until EOF, reset or `timeout`, collecting whole
/// frames (those it had buffered already included).
fn read_to_close(s: &mut Secure, timeout: Duration) -> Finish {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut frames = Vec::new();
    let mut end = End::Open;
    for _ in 0..1_000_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.get_ref()
            .set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match s.read_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {
                end = End::Eof;
                break;
            }
            Err(e) if is_reset(&e) => {
                end = End::Reset;
                break;
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading to the close: {e}"),
        }
    }
    Finish {
        frames,
        end,
        elapsed: start.elapsed(),
    }
}

/// Reads a plain TCP stream until EOF, reset or `timeout`: what a
/// connection that never got a Noise session is told (nothing, it should be).
fn read_raw_to_close(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, End, Duration) {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = End::Open;
    for _ in 0..1_000_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => {
                end = End::Eof;
                break;
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_reset(&e) => {
                end = End::Reset;
                break;
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading to the close: {e}"),
        }
    }
    (got, end, start.elapsed())
}

/// [`read_to_close`] for a [`Client`].
fn finish_client(c: &mut Client, timeout: Duration) -> Finish {
    read_to_close(&mut c.conn, timeout)
}

/// Registry messages of a finished connection, heartbeat replies left out.
fn registry_msgs(label: &str, f: &Finish) -> Vec<FromRegistry> {
    f.frames
        .iter()
        .map(|b| {
            codec::decode::<FromRegistry>(b)
                .unwrap_or_else(|e| panic!("{label}: the registry sent an undecodable frame: {e}"))
        })
        .filter(|m| *m != FromRegistry::Heartbeat {})
        .collect()
}

/// Exactly one `error` with `code`, then the connection closed.
fn assert_refused(label: &str, f: &Finish, code: &str) {
    let msgs = registry_msgs(label, f);
    assert!(
        f.end != End::Open,
        "{label}: still open after {:?}; got {msgs:?}",
        f.elapsed
    );
    match msgs.as_slice() {
        [FromRegistry::Error { code: got, .. }] if got == code => {}
        other => panic!("{label}: expected one error {code:?} before the close, got {other:?}"),
    }
}

/// Compares the control client's view with what happened, and says where
/// they first differ (the lists can be thousands long).
fn assert_same_changes(label: &str, got: &[Change], want: &[Change]) {
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    if first_diff == got.len() && got.len() == want.len() {
        return;
    }
    let from = first_diff.saturating_sub(2);
    panic!(
        "{label}: the control client's updates differ from what happened at index {first_diff} \
         (got {} changes, want {}):\n  got  {:?}\n  want {:?}",
        got.len(),
        want.len(),
        &got[from..got.len().min(first_diff + 3)],
        &want[from..want.len().min(first_diff + 3)],
    );
}

// ---------------------------------------------------------------------------
// The control client
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    changes: Vec<Change>,
    /// Why the control connection ended, if it did.
    ended: Option<String>,
}

/// A registered client that heartbeats and reads on its own thread, and
/// records every change it is told about, in order.
struct Watcher {
    name: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    fn start(addr: SocketAddr, name: &str) -> Watcher {
        let (client, welcome) = Client::register(addr, name, 4000);
        assert!(
            matches!(welcome, FromRegistry::Welcome { .. }),
            "the control client registers: {welcome:?}"
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            thread::spawn(move || watch(client, seen, stop))
        };
        Watcher {
            name: name.into(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn changes(&self) -> Vec<Change> {
        self.seen.lock().unwrap().changes.clone()
    }

    /// Polls (bounded) until `pred` holds for the changes seen so far.
    fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Change]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..100_000 {
            if pred(&self.seen.lock().unwrap().changes) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn wait_for(&self, change: &Change, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.contains(change))
    }

    fn assert_open(&self, label: &str) {
        let ended = self.seen.lock().unwrap().ended.clone();
        assert!(
            ended.is_none(),
            "{label}: the control client lost its registration: {ended:?}"
        );
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(mut c: Client, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let end = |seen: &Mutex<Seen>, why: String| {
        seen.lock().unwrap().ended.get_or_insert(why);
    };
    c.stream()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let hb = heartbeat_frame();
    let mut last_hb = Instant::now();
    let cap = Instant::now() + Duration::from_secs(300);
    for _ in 0..10_000_000 {
        if stop.load(Ordering::Relaxed) || Instant::now() >= cap {
            return;
        }
        if last_hb.elapsed() >= Duration::from_millis(100) {
            if let Err(e) = c.send_raw(&hb) {
                return end(&seen, format!("heartbeat failed: {e}"));
            }
            last_hb = Instant::now();
        }
        let msg = match c.conn.read_frame() {
            Ok(None) => return end(&seen, "closed by the registry".into()),
            Ok(Some(body)) => codec::decode::<FromRegistry>(&body),
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return end(&seen, format!("read failed: {e}")),
        };
        match msg {
            Ok(FromRegistry::Update { changes }) => seen.lock().unwrap().changes.extend(changes),
            Ok(FromRegistry::Heartbeat {} | FromRegistry::Snapshot { .. }) => {}
            other => return end(&seen, format!("unexpected {other:?}")),
        }
    }
}

/// Registers a client after an attack: it must find the control client in
/// its welcome, and the control client must see it join and leave. Returns
/// the key it joined with.
fn late_joiner(label: &str, reg: &Registry, w: &Watcher, name: &str, port: i64) -> PublicKey {
    let (mut c, welcome) = Client::register(reg.addr, name, port);
    let FromRegistry::Welcome { peers, .. } = welcome else {
        panic!("{label}: a late joiner was refused: {welcome:?}")
    };
    assert!(
        peers.iter().any(|p| p.name == w.name),
        "{label}: the control client is no longer listed: {peers:?}"
    );
    assert!(
        w.wait_for(&joined(name, port, c.key()), Duration::from_secs(3)),
        "{label}: the control client never heard of the late joiner; saw {:?}",
        w.changes().iter().rev().take(5).collect::<Vec<_>>()
    );
    c.send(&ToRegistry::Leave {});
    let f = finish_client(&mut c, Duration::from_secs(3));
    assert_ne!(f.end, End::Open, "{label}: leave closes the connection");
    assert!(
        w.wait_for(&left(name, "quit"), Duration::from_secs(3)),
        "{label}: the control client never heard the late joiner leave"
    );
    c.key()
}

// ---------------------------------------------------------------------------
// One case: a registry, its control client, a baseline, the expected updates
// ---------------------------------------------------------------------------

struct Case {
    name: String,
    watcher: Watcher,
    reg: Registry,
    base: Usage,
    /// What the control client must see, in order.
    expected: Vec<Change>,
    /// Names starting with this are checked by the test itself, not here.
    unordered_prefix: Option<String>,
    victims: usize,
}

impl Case {
    /// A registry with a stats line every second: the registry hands freed
    /// memory back to the system at each one, so that RSS measures what it
    /// holds, not what the allocator kept.
    fn start(name: &str, extra: &[&str]) -> Case {
        let mut args = vec!["--stats-interval", "1s"];
        args.extend_from_slice(extra);
        Self::with_registry(name, Registry::start(&args))
    }

    fn with_registry(name: &str, reg: Registry) -> Case {
        let watcher = Watcher::start(reg.addr, "control");
        let base = usage(reg.proc.pid());
        Case {
            name: name.into(),
            watcher,
            reg,
            base,
            expected: Vec::new(),
            unordered_prefix: None,
            victims: 0,
        }
    }

    fn pid(&self) -> i32 {
        self.reg.proc.pid()
    }

    /// Sends `bytes` of the frame stream, inside the Noise session, on a
    /// fresh connection (registered first when `registered`), and checks
    /// the refusal. Returns the key the victim used.
    fn attack(&mut self, label: &str, registered: bool, bytes: &[u8], code: &str) -> Identity {
        self.attack_with(label, registered, Some(code), |c| {
            // The registry may close before it has read everything; what it
            // sent before the close is what counts.
            let _ = c.send_raw(bytes);
        })
    }

    /// Breaks the Noise session itself on a fresh connection (registered
    /// first when `registered`): the registry must close it without a word.
    fn attack_session(&mut self, label: &str, registered: bool, act: impl FnOnce(&mut Client)) {
        self.attack_with(label, registered, None, act);
    }

    fn attack_with(
        &mut self,
        label: &str,
        registered: bool,
        code: Option<&str>,
        act: impl FnOnce(&mut Client),
    ) -> Identity {
        let label = format!("{}/{label}", self.name);
        self.victims += 1;
        let victim = format!("victim{}", self.victims);
        let port = 5000 + self.victims as i64;
        let mut c = if registered {
            let (c, welcome) = Client::register(self.reg.addr, &victim, port);
            assert!(
                matches!(welcome, FromRegistry::Welcome { .. }),
                "{label}: {welcome:?}"
            );
            self.expected.push(joined(&victim, port, c.key()));
            c
        } else {
            Client::connect(self.reg.addr)
        };
        c.stream()
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        act(&mut c);
        let f = finish_client(&mut c, Duration::from_secs(3));
        match code {
            Some(code) => assert_refused(&label, &f, code),
            None => {
                let msgs = registry_msgs(&label, &f);
                assert!(
                    f.end != End::Open && msgs.is_empty(),
                    "{label}: expected a close without a word, got {msgs:?} then {:?}",
                    f.end
                );
            }
        }
        assert!(
            f.elapsed < AT_ONCE,
            "{label}: closed only after {:?}",
            f.elapsed
        );
        if registered {
            let reason = if code.is_some() {
                "protocol"
            } else {
                "disconnected"
            };
            self.expected.push(left(&victim, reason));
        }
        let identity = c.identity.clone();
        drop(c);
        assert_alive(&label, &mut self.reg);
        identity
    }

    /// Bytes where the Noise handshake belongs, on a fresh connection: the
    /// registry must close it at once without a word, and the app never
    /// hears of it.
    fn attack_plain(&mut self, label: &str, bytes: &[u8]) {
        let label = format!("{}/{label}", self.name);
        plain_attack(&label, self.reg.addr, bytes);
        assert_alive(&label, &mut self.reg);
    }

    /// The closing checks shared by every case. Returns the usage after.
    fn finish(mut self) -> Usage {
        let label = self.name.clone();
        assert_alive(&label, &mut self.reg);
        let late = format!("late-{}", self.name);
        let key = late_joiner(&label, &self.reg, &self.watcher, &late, 4999);
        self.expected.push(joined(&late, 4999, key));
        self.expected.push(left(&late, "quit"));
        let prefix = self.unordered_prefix.clone();
        let keep = |c: &Change| {
            prefix
                .as_deref()
                .is_none_or(|p| !change_name(c).starts_with(p))
        };
        let want = self.expected.len();
        self.watcher.wait_until(Duration::from_secs(5), |c| {
            c.iter().filter(|c| keep(c)).count() >= want
        });
        let got: Vec<Change> = self
            .watcher
            .changes()
            .into_iter()
            .filter(|c| keep(c))
            .collect();
        assert_same_changes(&label, &got, &self.expected);
        self.watcher.assert_open(&label);
        assert_alive(&label, &mut self.reg);
        settle(&label, self.pid(), self.base)
    }
}

// ---------------------------------------------------------------------------
// Many connections at once, driven from one thread
// ---------------------------------------------------------------------------

enum HerdStream {
    /// Plain TCP: whatever it sends goes where the Noise handshake belongs.
    Raw(TcpStream),
    /// A Noise session, handshake done: it sends frame-stream bytes.
    Secure(Box<Secure>),
}

struct HerdConn {
    stream: Option<HerdStream>,
    /// When the registry's clock for it started: the TCP connect for a raw
    /// connection, the end of the handshake for a secured one.
    opened: Instant,
    /// Raw bytes received (raw connections).
    got: Vec<u8>,
    /// Frames received (secured connections).
    frames: Vec<Bytes>,
    /// Opened with a Noise session (known after the stream is gone).
    secured: bool,
    sent: usize,
    closed: Option<(Instant, End)>,
}

/// Hundreds of non-blocking connections, pumped by hand.
struct Herd {
    conns: Vec<HerdConn>,
}

impl Herd {
    fn new() -> Herd {
        Herd { conns: Vec::new() }
    }

    /// `n` plain TCP connections.
    fn open(addr: SocketAddr, n: usize, deadline: Instant) -> Herd {
        let mut herd = Herd::new();
        herd.add(addr, n, deadline, false);
        herd
    }

    /// Adds `n` connections, each with its Noise handshake done first when
    /// `secured`.
    fn add(&mut self, addr: SocketAddr, n: usize, deadline: Instant, secured: bool) {
        for i in 0..n {
            assert!(
                Instant::now() < deadline,
                "opened only {i} of {n} connections in time"
            );
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_nodelay(true).unwrap();
            let stream = if secured {
                let s = secure(stream);
                s.get_ref().set_nonblocking(true).unwrap();
                HerdStream::Secure(Box::new(s))
            } else {
                stream.set_nonblocking(true).unwrap();
                HerdStream::Raw(stream)
            };
            self.conns.push(HerdConn {
                stream: Some(stream),
                opened: Instant::now(),
                got: Vec::new(),
                frames: Vec::new(),
                secured,
                sent: 0,
                closed: None,
            });
        }
    }

    /// Reads whatever has arrived; notes closes and drops those sockets.
    fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        for c in &mut self.conns {
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            for _ in 0..16 {
                let read = match stream {
                    HerdStream::Raw(s) => match s.read(&mut buf) {
                        Ok(0) => Ok(false),
                        Ok(n) => {
                            c.got.extend_from_slice(&buf[..n]);
                            Ok(true)
                        }
                        Err(e) => Err(e),
                    },
                    HerdStream::Secure(s) => match s.read_frame() {
                        Ok(None) => Ok(false),
                        Ok(Some(f)) => {
                            c.frames.push(f);
                            Ok(true)
                        }
                        Err(e) => Err(e),
                    },
                };
                match read {
                    Ok(true) => {}
                    Ok(false) => {
                        c.closed = Some((Instant::now(), End::Eof));
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.closed = Some((Instant::now(), End::Reset));
                        break;
                    }
                }
            }
            if c.closed.is_some() {
                c.stream = None;
            }
        }
    }

    /// Sends the next byte of each connection's script, while the registry
    /// has said nothing to it: on the wire for a raw connection, as one
    /// Noise message for a secured one.
    fn write_next(&mut self, scripts: &[Vec<u8>]) {
        for (c, script) in self.conns.iter_mut().zip(scripts) {
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            if !c.got.is_empty() || !c.frames.is_empty() || c.sent >= script.len() {
                continue;
            }
            let byte = &script[c.sent..c.sent + 1];
            let sent = match stream {
                HerdStream::Raw(s) => matches!(s.write(byte), Ok(1)),
                // Nineteen bytes on the wire: a socket with room for a
                // handful of bytes takes them whole.
                HerdStream::Secure(s) => s.write_plain(byte).is_ok(),
            };
            if sent {
                c.sent += 1;
            }
        }
    }

    fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.closed.is_none()).count()
    }

    /// Pumps until every connection is closed or the deadline passes.
    fn pump_until_closed(&mut self, deadline: Instant, scripts: Option<&[Vec<u8>]>) {
        let mut last_write = Instant::now();
        for _ in 0..100_000 {
            self.pump();
            if self.open_count() == 0 || Instant::now() >= deadline {
                return;
            }
            if let Some(scripts) = scripts {
                if last_write.elapsed() >= Duration::from_millis(500) {
                    self.write_next(scripts);
                    last_write = Instant::now();
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every connection in `range` was closed `min..=max` after it was
    /// opened, secured ones after exactly one `error` `code`, raw ones
    /// without a byte (they never had a session to carry one). Returns the
    /// range of close times.
    fn assert_all_refused(
        &self,
        label: &str,
        range: std::ops::Range<usize>,
        code: &str,
        min: Duration,
        max: Duration,
    ) -> (Duration, Duration) {
        let mut problems: Vec<String> = Vec::new();
        let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
        let conns = &self.conns[range.clone()];
        for (i, c) in range.clone().zip(conns) {
            let Some((at, _end)) = c.closed else {
                problems.push(format!("#{i}: still open"));
                continue;
            };
            let after = at.duration_since(c.opened);
            first = first.min(after);
            last = last.max(after);
            if after < min || after > max {
                problems.push(format!("#{i}: closed after {after:?}"));
            }
            if !c.got.is_empty() {
                problems.push(format!("#{i}: got {} bytes outside a session", c.got.len()));
                continue;
            }
            let msgs: Vec<_> = c
                .frames
                .iter()
                .map(|body| codec::decode::<FromRegistry>(body))
                .collect();
            let secured = c.secured;
            match msgs.as_slice() {
                [Ok(FromRegistry::Error { code: got, .. })] if secured && got == code => {}
                [] if !secured => {}
                other => problems.push(format!("#{i}: got {other:?}")),
            }
        }
        eprintln!(
            "[{label}] {} connections closed between {first:?} and {last:?} after opening",
            conns.len()
        );
        assert!(
            problems.is_empty(),
            "{label}: {} of {} connections were not refused ({code:?} if secured) in {min:?}..{max:?}; first: {:?}",
            problems.len(),
            conns.len(),
            &problems[..problems.len().min(5)]
        );
        (first, last)
    }
}

// ---------------------------------------------------------------------------
// Registered clients kept alive in the background
// ---------------------------------------------------------------------------

/// Clients that register, heartbeat and drain everything sent to them, on
/// one thread, until stopped; stopping closes them all.
struct Crowd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Crowd {
    fn start(addr: SocketAddr, names: Vec<String>, first_port: i64) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let hb = heartbeat_frame();
            let mut conns: Vec<Secure> = Vec::new();
            let mut last_hb = Instant::now();
            let cap = Instant::now() + Duration::from_secs(120);
            for _ in 0..1_000_000 {
                if flag.load(Ordering::Relaxed) || Instant::now() >= cap {
                    break;
                }
                // A Noise handshake takes a while in a debug build: a few
                // per turn, so that the others still heartbeat in time.
                for _ in 0..2 {
                    let i = conns.len();
                    if i == names.len() {
                        break;
                    }
                    let mut s = secure(TcpStream::connect(addr).expect("crowd connect"));
                    s.write_plain(&register_frame(&names[i], first_port + i as i64))
                        .unwrap();
                    s.get_ref().set_nonblocking(true).unwrap();
                    conns.push(s);
                }
                if last_hb.elapsed() >= Duration::from_millis(100) {
                    for s in &mut conns {
                        let _ = s.write_plain(&hb);
                    }
                    last_hb = Instant::now();
                }
                for s in &mut conns {
                    for _ in 0..64 {
                        if !matches!(s.read_frame(), Ok(Some(_))) {
                            break;
                        }
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        Crowd {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the crowd thread");
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Cases 1-5: hostile bytes on a registry connection
// ---------------------------------------------------------------------------

#[test]
fn cbor_helpers_match_the_protocol_example() {
    assert_eq!(
        cbor_msg("heartbeat", &[]),
        [0xa1, 0x69, 0x68, 0x65, 0x61, 0x72, 0x74, 0x62, 0x65, 0x61, 0x74, 0xa0]
    );
    let ours = codec::encode(&register_msg("alice", 40123)).unwrap();
    let decoded: ToRegistry = codec::decode(&frame(&ours)[4..]).unwrap();
    let hand: ToRegistry = codec::decode(&register_raw_name(b"alice", 40123)[4..]).unwrap();
    assert_eq!(decoded, hand);
    assert_eq!(huge_array_body().len(), 100);
}

/// Case 1.
#[test]
fn registry_a_length_prefix_of_4_gib_is_frame_too_large_at_once() {
    let mut case = Case::start("case1", &[]);
    let prefix = [0xff, 0xff, 0xff, 0xff];
    case.attack(
        "ffffffff before register",
        false,
        &prefix,
        "frame_too_large",
    );
    case.attack("ffffffff after register", true, &prefix, "frame_too_large");
    // With the prefix, some body bytes: still refused on the prefix alone.
    case.attack(
        "ffffffff and a body",
        true,
        &claimed(u32::MAX, &[0xa0; 1000]),
        "frame_too_large",
    );
    case.finish();
}

/// Case 1b: bytes that are not a Noise session where one belongs. There is
/// no session to carry an error, so each is closed without a word, at once;
/// a registered victim leaves as `disconnected`.
#[test]
fn registry_broken_noise_sessions_close_only_that_connection_without_a_word() {
    let mut case = Case::start("noise", &[]);
    // Before any handshake.
    case.attack_plain("a plaintext register", &register_frame("plain", 4001));
    case.attack_plain("ASCII text", b"GET / HTTP/1.1\r\nHost: registry\r\n\r\n");
    case.attack_plain("a handshake message of 65535 bytes", &[0xff, 0xff]);
    case.attack_plain("an empty handshake message", &[0, 0]);
    // The dialer's first message twice: the registry answers the first
    // with its own handshake message, and the copy fails as the third.
    let mut first = Vec::new();
    SecureChannel::initiator(
        &Identity::generate(),
        &peerchat_core::protocol::noise_prologue(),
        &mut first,
    );
    case.attack_plain(
        "the first message sent twice",
        &[&first[..], &first[..]].concat(),
    );

    for registered in [false, true] {
        let when = if registered { "after" } else { "before" };
        case.attack_session(&format!("a flipped bit {when} register"), registered, |c| {
            let mut wire = c.conn.seal(&heartbeat_frame()).unwrap();
            let last = wire.len() - 1;
            wire[last] ^= 0x80;
            let _ = c.send_wire(&wire);
        });
        case.attack_session(
            &format!("a length one short {when} register"),
            registered,
            |c| {
                let mut wire = c.conn.seal(&heartbeat_frame()).unwrap();
                wire[1] -= 1;
                let _ = c.send_wire(&wire);
            },
        );
        case.attack_session(
            &format!("a message shorter than its tag {when} register"),
            registered,
            |c| {
                let _ = c.send_wire(&[0, 3, 1, 2, 3]);
            },
        );
        case.attack_session(
            &format!("a replayed message {when} register"),
            registered,
            |c| {
                // Two bytes of a frame: harmless the first time, in any state.
                let wire = c.conn.seal(&[0, 0]).unwrap();
                let _ = c.send_wire(&[&wire[..], &wire[..]].concat());
            },
        );
        case.attack_session(
            &format!("messages out of order {when} register"),
            registered,
            |c| {
                let one = c.conn.seal(&heartbeat_frame()).unwrap();
                let two = c.conn.seal(&heartbeat_frame()).unwrap();
                let _ = c.send_wire(&[two, one].concat());
            },
        );
        case.attack_session(
            &format!("a truncated message {when} register"),
            registered,
            |c| {
                let wire = c.conn.seal(&heartbeat_frame()).unwrap();
                let _ = c.send_wire(&wire[..wire.len() - 3]);
                let _ = c.stream().shutdown(Shutdown::Write);
            },
        );
        case.attack_session(
            &format!("plaintext inside {when} register"),
            registered,
            |c| {
                let _ = c.send_wire(&heartbeat_frame());
            },
        );
    }
    case.finish();
}

/// Case 2.
#[test]
fn registry_bodies_that_are_not_our_cbor_are_protocol_errors() {
    let mut case = Case::start("case2", &[]);
    let garbage = frame(&[0xff, 0xfe, 0xfd]);
    let text = frame(b"hello, registry!");
    let wrong_shapes = [
        ("a bare integer", frame(&cbor_uint(5))),
        ("an array", frame(&[0x83, 0x01, 0x02, 0x03])),
        (
            "register as text",
            frame(&cbor_map(&[("register", cbor_text("x"))])),
        ),
        (
            "a two-entry map",
            frame(&cbor_map(&[
                ("heartbeat", cbor_map(&[])),
                ("leave", cbor_map(&[])),
            ])),
        ),
        (
            "a name of the wrong type",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_uint(5)),
                    ("port", cbor_uint(4000)),
                ],
            )),
        ),
        (
            "register without a port",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_text("nop")),
                ],
            )),
        ),
        (
            "a port as text",
            frame(&cbor_msg(
                "register",
                &[
                    ("version", cbor_uint(PROTOCOL_VERSION.into())),
                    ("name", cbor_text("txt")),
                    ("port", cbor_text("4000")),
                ],
            )),
        ),
    ];
    let unknown = frame(&cbor_msg("frobnicate", &[]));
    let tagged = frame(&[0xc0, 0x60]);
    let trailing = {
        let mut body = cbor_msg("heartbeat", &[]);
        body.push(0x00);
        frame(&body)
    };
    let indefinite = frame(&[
        0xbf, 0x69, b'h', b'e', b'a', b'r', b't', b'b', b'e', b'a', b't', 0xa0, 0xff,
    ]);
    for registered in [false, true] {
        let when = if registered { "after" } else { "before" };
        case.attack(
            &format!("not CBOR {when}"),
            registered,
            &garbage,
            "protocol",
        );
        case.attack(&format!("ASCII text {when}"), registered, &text, "protocol");
        for (what, bytes) in &wrong_shapes {
            case.attack(&format!("{what} {when}"), registered, bytes, "protocol");
        }
        case.attack(
            &format!("unknown type {when}"),
            registered,
            &unknown,
            "protocol",
        );
        case.attack(&format!("a tag {when}"), registered, &tagged, "protocol");
        case.attack(
            &format!("trailing bytes {when}"),
            registered,
            &trailing,
            "protocol",
        );
        case.attack(
            &format!("indefinite map {when}"),
            registered,
            &indefinite,
            "protocol",
        );
    }
    case.finish();
}

/// Case 3.
#[test]
fn registry_empty_deep_and_huge_declared_frames_are_refused() {
    let mut case = Case::start("case3", &[]);
    let empty = [0u8, 0, 0, 0];
    case.attack("zero-length before", false, &empty, "protocol");
    case.attack("zero-length after", true, &empty, "protocol");
    // 100,000 nested arrays do not fit the 4 KiB first-frame limit...
    let deep = nested_arrays(100_000);
    case.attack(
        "100,000 nested before",
        false,
        &frame(&deep),
        "frame_too_large",
    );
    // ...nor the 64 KiB limit after registering.
    case.attack(
        "100,000 nested after",
        true,
        &frame(&deep),
        "frame_too_large",
    );
    // Limit-sized frames of nothing but nesting reach the CBOR check.
    case.attack(
        "4,096 nested before",
        false,
        &frame(&nested_arrays(4096)),
        "protocol",
    );
    case.attack(
        "60,000 nested after",
        true,
        &frame(&nested_arrays(60_000)),
        "protocol",
    );
    case.attack(
        "65,536 nested after",
        true,
        &frame(&nested_arrays(65_536)),
        "protocol",
    );
    // 17 levels is one too many; 2^60 items cannot fit 100 bytes.
    let mut seventeen = nested_arrays(17);
    seventeen.push(0x00);
    case.attack("17 nested before", false, &frame(&seventeen), "protocol");
    let huge = frame(&huge_array_body());
    case.attack("2^60 array before", false, &huge, "protocol");
    case.attack("2^60 array after", true, &huge, "protocol");
    let huge_map = frame(&huge_map_in_register_body());
    case.attack("2^60 map in register", false, &huge_map, "protocol");
    let mut huge_text = head(3, 1 << 60);
    huge_text.resize(100, 0);
    case.attack("2^60 text", false, &frame(&huge_text), "protocol");
    case.finish();
}

/// Case 4.
#[test]
fn registry_anything_but_register_first_and_register_twice_are_protocol_errors() {
    let mut case = Case::start("case4", &[]);
    let chat = frame(&cbor_msg(
        "chat",
        &[
            ("id", cbor_uint(1)),
            ("text", cbor_text("hi")),
            ("direct", vec![0xf5]),
        ],
    ));
    case.attack("chat before register", false, &chat, "protocol");
    case.attack("chat after register", true, &chat, "protocol");
    let hello = codec::encode_frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 7,
    })
    .unwrap();
    case.attack("hello before register", false, &hello, "protocol");
    case.attack(
        "heartbeat before register",
        false,
        &heartbeat_frame(),
        "protocol",
    );
    case.attack("leave before register", false, &leave_frame(), "protocol");
    // A second register on a registered connection, even for another name.
    let n = case.victims + 1;
    let first = case.attack(
        "register twice, same name",
        true,
        &register_frame(&format!("victim{n}"), 6001),
        "protocol",
    );
    case.attack(
        "register twice, new name",
        true,
        &register_frame("someone-else", 6002),
        "protocol",
    );
    // The name of the first is kept for its key after the protocol close:
    // another key is refused, the same key gets it back.
    let (mut other, reply) = Client::register(case.reg.addr, &format!("victim{n}"), 6003);
    assert!(
        matches!(&reply, FromRegistry::Error { code, .. } if code == "name_taken"),
        "the name is kept for its key through the grace period: {reply:?}"
    );
    assert_ne!(
        finish_client(&mut other, Duration::from_secs(3)).end,
        End::Open
    );
    let (mut again, welcome) =
        Client::register_as(case.reg.addr, &first, &format!("victim{n}"), 6003);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "the name is its key's again after the protocol close: {welcome:?}"
    );
    again.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut again, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected
        .push(joined(&format!("victim{n}"), 6003, first.public()));
    case.expected.push(left(&format!("victim{n}"), "quit"));
    case.finish();
}

/// Case 5.
#[test]
fn registry_bad_names_and_ports_get_their_codes() {
    let mut case = Case::start("case5", &[]);
    let reg = |name: &str, port: i64| register_frame(name, port);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty name", reg("", 4001), "bad_name"),
        ("only spaces", reg("   ", 4001), "bad_name"),
        ("33 characters", reg(&"x".repeat(33), 4001), "bad_name"),
        ("33 CJK characters", reg(&"名".repeat(33), 4001), "bad_name"),
        ("1000 characters", reg(&"y".repeat(1000), 4001), "bad_name"),
        ("a control character", reg("a\u{1}b", 4001), "bad_name"),
        ("a newline inside", reg("a\nb", 4001), "bad_name"),
        ("DEL", reg("a\u{7f}", 4001), "bad_name"),
        ("a C1 control", reg("a\u{85}b", 4001), "bad_name"),
        ("a space inside", reg("a b", 4001), "bad_name"),
        ("a NUL", reg("nul\u{0}", 4001), "bad_name"),
        (
            "invalid UTF-8",
            register_raw_name(&[b'a', 0xff, 0xfe, b'b'], 4001),
            "protocol",
        ),
        (
            "a lone surrogate (CESU)",
            register_raw_name(&[0xed, 0xa0, 0x80], 4001),
            "protocol",
        ),
        (
            "overlong UTF-8",
            register_raw_name(&[0xc0, 0xaf], 4001),
            "protocol",
        ),
        ("port 0", reg("porter", 0), "bad_port"),
        ("port 70000", reg("porter", 70_000), "bad_port"),
        ("port 65536", reg("porter", 65_536), "bad_port"),
        ("port -1", reg("porter", -1), "bad_port"),
        ("port i64::MIN", reg("porter", i64::MIN), "bad_port"),
        // The checks go in the documented order.
        ("bad name and bad port", reg("", 0), "bad_name"),
        (
            "bad version, name and port",
            codec::encode_frame(&ToRegistry::Register {
                version: 1,
                name: String::new(),
                port: 0,
            })
            .unwrap()
            .to_vec(),
            "unsupported_version",
        ),
        ("the control's name", reg("CONTROL", 4001), "name_taken"),
    ];
    for (what, bytes, code) in &cases {
        case.attack(what, false, bytes, code);
    }
    // The limits themselves are fine: 32 characters, trimmed spaces, the
    // ends of the port range.
    let edge = [
        ("x".repeat(32), "x".repeat(32), 1),
        ("名".repeat(32), "名".repeat(32), 65_535),
        ("  padded  ".to_string(), "padded".to_string(), 4002),
    ];
    for (sent, registered_as, port) in edge {
        let (mut c, welcome) = Client::register(case.reg.addr, &sent, port);
        match &welcome {
            FromRegistry::Welcome { name, .. } => assert_eq!(name, &registered_as),
            other => panic!("case5: {sent:?} port {port} refused: {other:?}"),
        }
        c.send(&ToRegistry::Leave {});
        assert_ne!(finish_client(&mut c, Duration::from_secs(3)).end, End::Open);
        case.expected.push(joined(&registered_as, port, c.key()));
        case.expected.push(left(&registered_as, "quit"));
    }
    case.finish();
}

// ---------------------------------------------------------------------------
// Cases 6-9: floods
// ---------------------------------------------------------------------------

/// Case 6. Slow at both of the registry's deadlines: most dribble the
/// first Noise handshake message (cut at the handshake deadline without a
/// word: there is no session yet), a few finish the handshake and dribble
/// their register frame one Noise message per byte (told `handshake_timeout`
/// at the same deadline counted again from the end of the handshake).
#[test]
fn slowloris_connections_are_cut_at_the_handshake_deadline() {
    raise_nofile();
    let _heavy = heavy();
    let mut case = Case::start("slowloris", &["--handshake-timeout", "3s"]);
    let deadline_after = Duration::from_secs(3);
    const SECURED: usize = 10;
    const N: usize = 500;
    let mut first = Vec::new();
    SecureChannel::initiator(
        &Identity::generate(),
        &peerchat_core::protocol::noise_prologue(),
        &mut first,
    );
    let scripts: Vec<Vec<u8>> = (0..SECURED + N)
        .map(|i| {
            if i < SECURED {
                register_frame(&format!("slow{i}"), 6000)
            } else {
                first.clone()
            }
        })
        .collect();
    let mut herd = Herd::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    herd.add(case.reg.addr, SECURED, deadline, true);
    herd.add(case.reg.addr, N, deadline, false);
    herd.write_next(&scripts);
    let earliest_deadline = herd.conns[0].opened + deadline_after;

    // A real client gets in while they dribble.
    let t = Instant::now();
    let (mut real, welcome) = Client::register(case.reg.addr, "real", 4100);
    let took = t.elapsed();
    let registered_at = Instant::now();
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );
    herd.pump();
    // Every slow connection dribbles a second byte now, whatever the pace
    // of `pump_until_closed` below.
    herd.write_next(&scripts);
    eprintln!(
        "[slowloris] a real client registered in {took:?} beside {} slow connections",
        SECURED + N
    );
    assert!(took < Duration::from_secs(2), "registering took {took:?}");
    assert!(
        registered_at < earliest_deadline,
        "the slow connections were opened too slowly to test anything"
    );
    assert_eq!(
        herd.open_count(),
        SECURED + N,
        "all slow connections still open"
    );
    real.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut real, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("real", 4100, real.key()));
    case.expected.push(left("real", "quit"));

    let last_opened = herd.conns[SECURED + N - 1].opened;
    herd.pump_until_closed(last_opened + Duration::from_secs(5), Some(&scripts));
    assert!(
        herd.conns
            .iter()
            .zip(&scripts)
            .all(|(c, script)| c.sent >= 2 && c.sent <= 9 && c.sent < script.len()),
        "each slow connection sent 2-9 bytes (one every 500 ms), never all of them: {:?}",
        herd.conns.iter().map(|c| c.sent).collect::<Vec<_>>()
    );
    let (early, late) = (
        deadline_after - Duration::from_millis(50),
        deadline_after + Duration::from_millis(1500),
    );
    herd.assert_all_refused(
        "slowloris/registering",
        0..SECURED,
        "handshake_timeout",
        early,
        late,
    );
    herd.assert_all_refused(
        "slowloris/handshaking",
        SECURED..SECURED + N,
        "handshake_timeout",
        early,
        late,
    );
    drop(herd);
    case.finish();
}

/// Case 7.
#[test]
fn two_thousand_silent_connections_are_closed_at_the_deadline() {
    raise_nofile();
    let _heavy = heavy();
    let case = Case::start("silent", &["--handshake-timeout", "2s"]);
    let deadline_after = Duration::from_secs(2);
    const N: usize = 2000;
    let mut herd = Herd::open(case.reg.addr, N, Instant::now() + Duration::from_secs(10));
    let opened_in = herd.conns[N - 1]
        .opened
        .duration_since(herd.conns[0].opened);
    // The registry holds them all before the deadline.
    let pid = case.pid();
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(fd_count(pid));
        if peak >= case.base.fds + N || Instant::now() >= herd.conns[0].opened + deadline_after / 2
        {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "[silent] opened {N} in {opened_in:?}; registry fds peaked at {peak} (baseline {})",
        case.base.fds
    );
    herd.pump();
    assert_eq!(herd.open_count(), N, "none closed before the deadline");
    assert!(
        peak >= case.base.fds + N,
        "the registry accepted only {} of {N}",
        peak - case.base.fds
    );
    let last_opened = herd.conns[N - 1].opened;
    herd.pump_until_closed(last_opened + Duration::from_secs(5), None);
    // Without a Noise handshake there is no session to say anything in.
    herd.assert_all_refused(
        "silent",
        0..N,
        "handshake_timeout",
        deadline_after - Duration::from_millis(50),
        deadline_after + Duration::from_millis(1500),
    );
    drop(herd);
    case.finish();
}

/// Case 8. A client that never reads. A Noise handshake per change would
/// make the thousands of updates that fill the registry's kernel send buffer
/// (autotuned up to tcp_wmem's maximum, 4 MiB here) take minutes in a debug
/// build, so the sloth also asks for heartbeat replies it never reads: its
/// connection then holds both the others' updates and its own replies.
#[test]
fn a_client_that_never_reads_is_dropped_as_slow_and_the_others_miss_nothing() {
    let _heavy = heavy();
    let mut case = Case::start("slow", &["--max-queue", "65536"]);
    let addr = case.reg.addr;
    let sloth_id = Identity::generate();
    let mut sloth = secure_as(connect_small_rcvbuf(addr, 4096), &sloth_id);
    sloth.write_plain(&register_frame("sloth", 4200)).unwrap();
    let sloth_joined = joined("sloth", 4200, sloth_id.public());
    assert!(
        case.watcher.wait_for(&sloth_joined, Duration::from_secs(3)),
        "the sloth registered"
    );
    case.expected.push(sloth_joined.clone());

    // The sloth heartbeats, 256 at a time (some 400 KB/s), so it is
    // never evicted, but never reads: the replies pile up with the updates.
    let stop = Arc::new(AtomicBool::new(false));
    let beats = {
        sloth
            .get_ref()
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            let batch = heartbeat_frame().repeat(256);
            let cap = Instant::now() + Duration::from_secs(60);
            let mut written = 0;
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() >= cap || written >= 64 << 20 {
                    break;
                }
                if sloth.write_plain(&batch).is_err() {
                    break;
                }
                written += batch.len();
                thread::sleep(Duration::from_millis(10));
            }
            (sloth, written)
        })
    };

    // Meanwhile others come and go. Names of 32 four-byte characters make
    // every update as large as the protocol allows.
    const MIN_CYCLES: i64 = 20;
    let sloth_gone = left("sloth", "slow");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(45);
    let mut cycles = 0;
    let mut dropped_after = None;
    for i in 0..20_000i64 {
        if dropped_after.is_none() && case.watcher.changes().contains(&sloth_gone) {
            dropped_after = Some(i);
        }
        if (i >= MIN_CYCLES && dropped_after.is_some()) || Instant::now() >= deadline {
            break;
        }
        let name = format!("{i:05}{}", "\u{20000}".repeat(27));
        let port = 10_000 + i;
        let (mut c, welcome) = Client::register(addr, &name, port);
        assert!(
            matches!(welcome, FromRegistry::Welcome { .. }),
            "{welcome:?}"
        );
        c.send(&ToRegistry::Leave {});
        assert_ne!(finish_client(&mut c, Duration::from_secs(3)).end, End::Open);
        case.expected.push(joined(&name, port, c.key()));
        case.expected.push(left(&name, "quit"));
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sloth, written) = beats.join().expect("the sloth's heartbeat thread");
    eprintln!(
        "[slow] {cycles} register/leave cycles in {:?}; the sloth was seen dropped by cycle {dropped_after:?}, after sending {} KiB of heartbeats",
        start.elapsed(),
        written / 1024
    );
    assert!(
        case.watcher.wait_for(&sloth_gone, Duration::from_secs(3)),
        "the sloth was never dropped as slow after {cycles} cycles"
    );
    let seen = case.watcher.changes();
    let sloth_changes: Vec<&Change> = seen.iter().filter(|c| change_name(c) == "sloth").collect();
    assert_eq!(
        sloth_changes,
        vec![&sloth_joined, &sloth_gone],
        "one join and one slow leave for the sloth"
    );
    // Its leave comes where it happened among the others' changes.
    let at = seen.iter().position(|c| *c == sloth_gone).unwrap();
    case.expected.insert(at, sloth_gone.clone());
    assert!(
        case.reg
            .proc
            .stderr
            .wait_for("slow consumer", Duration::from_secs(2)),
        "the registry logs the slow close: {:?}",
        case.reg.proc.stderr.tail(5)
    );
    // The sloth's connection is closed: reading it to the end finds the end.
    let f = read_to_close(&mut sloth, Duration::from_secs(5));
    eprintln!(
        "[slow] the sloth could still read {} frames, then {:?}",
        f.frames.len(),
        f.end
    );
    assert_ne!(f.end, End::Open, "the slow connection was closed");
    drop(sloth);
    case.finish();
}

/// Case 9.
#[test]
fn out_of_descriptors_the_registry_neither_spins_nor_stays_stuck() {
    const PRLIMIT: &str = "/usr/bin/prlimit";
    if !std::path::Path::new(PRLIMIT).exists() {
        eprintln!("skipped: {PRLIMIT} (util-linux) is missing, so the registry cannot be started with 64 descriptors");
        return;
    }
    raise_nofile();
    let _heavy = heavy();
    let reg = Registry::start_wrapped(&[PRLIMIT, "--nofile=64:64"], &["--stats-interval", "1s"]);
    let pid = reg.proc.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "registry", "prlimit exec'd the registry");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    let mut case = Case::with_registry("fds", reg);

    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(case.reg.addr).expect("connect (the backlog takes it)"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let held = fd_count(pid);
    let hz = clock_ticks_per_second();
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid) - cpu0;
    let wall = t0.elapsed();
    let share = cpu as f64 / hz as f64 / wall.as_secs_f64();
    eprintln!(
        "[fds] registry at {held} of 64 descriptors; CPU {cpu} ticks over {wall:?} ({:.1}%)",
        share * 100.0
    );
    assert!(
        case.reg.proc.stderr.contains("out of file descriptors"),
        "the registry ran out of descriptors and said so: {:?}",
        case.reg.proc.stderr.snapshot()
    );
    assert!(share < 0.3, "the registry spins: {:.1}% CPU", share * 100.0);
    assert_alive("fds", &mut case.reg);
    case.watcher.assert_open("fds");
    drop(flood);

    let t = Instant::now();
    let mut real = Client::connect(case.reg.addr);
    real.send(&register_msg("real", 4100));
    let welcome = real.next(Duration::from_secs(5));
    let took = t.elapsed();
    eprintln!("[fds] after the flood a real client registered in {took:?}");
    assert!(
        matches!(welcome, Next::Msg(FromRegistry::Welcome { .. })) && took < Duration::from_secs(5),
        "a real client registers within 5 s after the flood: {welcome:?} after {took:?}"
    );
    real.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut real, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("real", 4100, real.key()));
    case.expected.push(left("real", "quit"));
    case.finish();
}

// ---------------------------------------------------------------------------
// Case 10: split and coalesced frames
// ---------------------------------------------------------------------------

/// Exactly `n` heartbeat replies and nothing else within `timeout`, and no
/// more right after.
fn expect_heartbeats(label: &str, c: &mut Client, n: usize, timeout: Duration) {
    let mut got = 0;
    let deadline = Instant::now() + timeout;
    for _ in 0..n * 10 + 10 {
        if got == n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match c.next(left) {
            Next::Msg(FromRegistry::Heartbeat {}) => got += 1,
            Next::Msg(other) => panic!("{label}: expected heartbeats only, got {other:?}"),
            Next::Closed | Next::Timeout => break,
        }
    }
    assert_eq!(got, n, "{label}: heartbeat replies");
    let extra = c.next(Duration::from_millis(300));
    assert_eq!(
        extra,
        Next::Timeout,
        "{label}: one reply more than asked for"
    );
}

#[test]
fn frames_one_byte_per_write_or_a_hundred_per_write_work_as_usual() {
    let mut case = Case::start("split", &[]);
    let addr = case.reg.addr;
    let (mut normal, normal_welcome) = Client::register(addr, "normal", 4300);
    normal.send(&ToRegistry::Leave {});
    assert_ne!(
        finish_client(&mut normal, Duration::from_secs(3)).end,
        End::Open
    );
    case.expected.push(joined("normal", 4300, normal.key()));
    case.expected.push(left("normal", "quit"));

    // Registration one byte per Noise message, one wire byte per write.
    let mut d = Client::connect(addr);
    dribble(&mut d.conn, &register_frame("dribble", 4301));
    let welcome = d.recv().expect("a welcome");
    case.expected.push(joined("dribble", 4301, d.key()));
    match (&welcome, &normal_welcome) {
        (
            FromRegistry::Welcome {
                version,
                name,
                addr,
                heartbeat_ms,
                timeout_ms,
                more,
                peers,
            },
            FromRegistry::Welcome {
                version: v0,
                heartbeat_ms: h0,
                timeout_ms: t0,
                peers: p0,
                ..
            },
        ) => {
            assert_eq!(
                (
                    version,
                    name.as_str(),
                    addr.as_str(),
                    heartbeat_ms,
                    timeout_ms,
                    more
                ),
                (v0, "dribble", "127.0.0.1:4301", h0, t0, &false)
            );
            assert_eq!(peers, p0, "the same directory: just the control client");
        }
        other => panic!("split: {other:?}"),
    }
    // A heartbeat one byte per write, then a hundred in one Noise message,
    // then a hundred Noise messages of one heartbeat each in one write.
    dribble(&mut d.conn, &heartbeat_frame());
    expect_heartbeats("split/dribbled", &mut d, 1, Duration::from_secs(3));
    d.send_raw(&heartbeat_frame().repeat(100)).unwrap();
    expect_heartbeats(
        "split/100 in one message",
        &mut d,
        100,
        Duration::from_secs(3),
    );
    let mut wire = Vec::new();
    for _ in 0..100 {
        wire.extend(d.conn.seal(&heartbeat_frame()).unwrap());
    }
    d.send_wire(&wire).unwrap();
    expect_heartbeats(
        "split/100 messages in one write",
        &mut d,
        100,
        Duration::from_secs(3),
    );

    // Register and a hundred heartbeats in one write, cut into Noise
    // messages of 5 bytes that split every frame.
    let mut b = Client::connect(addr);
    let mut burst = register_frame("burst", 4302);
    burst.extend(heartbeat_frame().repeat(100));
    let mut wire = Vec::new();
    for piece in burst.chunks(5) {
        wire.extend(b.conn.seal(piece).unwrap());
    }
    b.send_wire(&wire).unwrap();
    let welcome = b.recv_any().expect("a welcome");
    assert!(
        matches!(&welcome, FromRegistry::Welcome { name, .. } if name == "burst"),
        "{welcome:?}"
    );
    case.expected.push(joined("burst", 4302, b.key()));
    expect_heartbeats("split/register+100", &mut b, 100, Duration::from_secs(3));
    // Leave and a heartbeat after it in one write: the leave wins.
    let mut last = leave_frame();
    last.extend(heartbeat_frame());
    b.send_raw(&last).unwrap();
    let f = finish_client(&mut b, Duration::from_secs(3));
    assert_ne!(f.end, End::Open);
    assert_eq!(registry_msgs("split/burst leave", &f), vec![]);
    case.expected.push(left("burst", "quit"));

    // Leave one byte per write.
    dribble(&mut d.conn, &leave_frame());
    let f = finish_client(&mut d, Duration::from_secs(3));
    assert_ne!(f.end, End::Open, "split: leave closes");
    // What the dribbler was told meanwhile: burst came and went.
    let told: Vec<Change> = registry_msgs("split/dribble leave", &f)
        .into_iter()
        .flat_map(|m| match m {
            FromRegistry::Update { changes } => changes,
            other => panic!("split: unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        told,
        vec![joined("burst", 4302, b.key()), left("burst", "quit")]
    );
    case.expected.push(left("dribble", "quit"));
    case.finish();
}

// ---------------------------------------------------------------------------
// Case 14: churn
// ---------------------------------------------------------------------------

/// Ten thousand cycles, each with its own Noise handshake.
#[test]
fn ten_thousand_register_and_close_cycles_leave_nothing_behind() {
    raise_nofile();
    let _heavy = heavy();
    let mut case = Case::start("cycles", &[]);
    case.unordered_prefix = Some("cyc".into());
    const THREADS: usize = 4;
    const PER_THREAD: usize = 2500;
    let addr = case.reg.addr;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let workers: Vec<JoinHandle<usize>> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let mut done = 0;
                // One key per thread, registering a new name each time.
                let identity = Identity::generate();
                for i in 0..PER_THREAD {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let name = format!("cyc{t}-{i}");
                    let (c, welcome) =
                        Client::register_as(addr, &identity, &name, 20_000 + i as i64);
                    assert!(
                        matches!(welcome, FromRegistry::Welcome { .. }),
                        "{name}: {welcome:?}"
                    );
                    drop(c);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let done: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    eprintln!("[cycles] {done} cycles in {:?}", start.elapsed());
    assert_eq!(done, THREADS * PER_THREAD, "cycles done within 60 s");
    let total = THREADS * PER_THREAD;
    let counts = |c: &[Change]| {
        let j = c
            .iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name.starts_with("cyc")))
            .count();
        let l = c
            .iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name.starts_with("cyc")))
            .count();
        (j, l)
    };
    case.watcher
        .wait_until(Duration::from_secs(20), |c| counts(c) == (total, total));
    let seen = case.watcher.changes();
    assert_eq!(counts(&seen), (total, total), "joined and left per cycle");
    // Every name joined once, then left once, as disconnected.
    let mut per_name: HashMap<&str, Vec<(usize, &Change)>> = HashMap::new();
    for (i, c) in seen.iter().enumerate() {
        if change_name(c).starts_with("cyc") {
            per_name.entry(change_name(c)).or_default().push((i, c));
        }
    }
    assert_eq!(per_name.len(), total, "distinct names");
    for (name, list) in &per_name {
        match list.as_slice() {
            [(a, Change::Joined { .. }), (b, Change::Left { reason, .. })]
                if a < b && reason == "disconnected" => {}
            other => panic!("cycles: {name}: {other:?}"),
        }
    }
    case.finish();
}

// ---------------------------------------------------------------------------
// Case 15: ways to close
// ---------------------------------------------------------------------------

#[test]
fn reset_fin_and_close_during_a_big_snapshot_each_yield_one_left() {
    raise_nofile();
    let _heavy = heavy();
    let mut case = Case::start("closes", &[]);
    case.unordered_prefix = Some("filler".into());
    let addr = case.reg.addr;
    // 300 others with 32-character names make the snapshot ~20 KB.
    let fillers: Vec<String> = (0..300)
        .map(|i| format!("filler-{i:03}-{}", "f".repeat(21)))
        .collect();
    assert!(fillers.iter().all(|n| n.chars().count() == 32));
    let crowd = Crowd::start(addr, fillers.clone(), 30_000);
    // Each filler's Noise handshake takes a while in a debug build.
    let all_in = case.watcher.wait_until(Duration::from_secs(60), |c| {
        c.iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name.starts_with("filler")))
            .count()
            == 300
    });
    assert!(all_in, "the 300 fillers registered");

    let mut names: Vec<String> = Vec::new();
    // RST.
    let (c, _) = Client::register(addr, "rst-close", 4401);
    close_with_reset(c.conn);
    names.push("rst-close".into());
    // FIN: shut our side, the registry closes its side.
    let (mut c, _) = Client::register(addr, "fin-close", 4402);
    c.stream().shutdown(Shutdown::Write).unwrap();
    let f = finish_client(&mut c, Duration::from_secs(3));
    assert_ne!(
        f.end,
        End::Open,
        "closes: the registry closes after our FIN"
    );
    drop(c);
    names.push("fin-close".into());
    // Closing while the registry still writes a snapshot that the small
    // receive window cannot take at once.
    for k in 0..6 {
        let name = format!("bigsnap-{k}");
        let mut s = secure(connect_small_rcvbuf(addr, 2048));
        s.write_plain(&register_frame(&name, 4410 + k)).unwrap();
        let mut first = [0u8; 1];
        s.get_ref()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        s.get_mut()
            .read_exact(&mut first)
            .expect("the welcome starts");
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s); // unread data: the kernel resets too
        }
        names.push(name);
    }
    // The snapshot above fits the registry's kernel send buffer (autotuned
    // up to 4 MiB on loopback), so the kernel, not the registry, is still
    // sending it. To close while the registry itself holds unsent bytes, a
    // client that never reads asks for 4 MiB of heartbeat replies: the
    // kernel buffer fills and the rest waits in the registry's queue (under
    // the default 4 MiB --max-queue, so it is not dropped as slow).
    let pid = case.pid();
    for k in 0..2 {
        let name = format!("flood-{k}");
        let mut s = secure(connect_small_rcvbuf(addr, 2048));
        s.write_plain(&register_frame(&name, 4430 + k)).unwrap();
        let rss_before = rss_kib(pid);
        s.get_ref()
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // Sealed and written a Noise message at a time: sealing 4 MiB in
        // one go takes a debug build longer than the 1 s eviction timeout.
        let beats = heartbeat_frame().repeat(1 << 18);
        let written = beats
            .chunks(MAX_PLAINTEXT - MAX_PLAINTEXT % 16)
            .try_for_each(|piece| s.write_plain(piece));
        if let Err(e) = written {
            panic!(
                "closes: {name}: the registry did not read every heartbeat ({e}); it said {:?}",
                case.reg.proc.stderr.tail(5)
            );
        }
        // Wait (bounded) until the registry has answered them all: its CPU
        // time stops moving, or nearly (the crowd's heartbeats cost a debug
        // build a tick now and then). Heartbeat meanwhile: the registry
        // may take longer than the 1 s timeout to get through them.
        let hb = heartbeat_frame();
        let mut last = cpu_ticks(pid);
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(100));
            let _ = s.write_plain(&hb);
            let now = cpu_ticks(pid);
            if now - last <= 1 {
                break;
            }
            last = now;
        }
        eprintln!(
            "[closes] {name}: registry VmRSS {} -> {} KiB with the replies queued",
            rss_before,
            rss_kib(pid)
        );
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s);
        }
        names.push(name);
    }
    // Closing right after the register, before any reply.
    for k in 0..4 {
        let name = format!("quick-{k}");
        let mut s = secure(TcpStream::connect(addr).unwrap());
        s.write_plain(&register_frame(&name, 4420 + k)).unwrap();
        if k % 2 == 0 {
            close_with_reset(s);
        } else {
            drop(s);
        }
        names.push(name);
    }
    let lefts = |c: &[Change], n: &str| {
        c.iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name == n))
            .count()
    };
    let joins = |c: &[Change], n: &str| {
        c.iter()
            .filter(|c| matches!(c, Change::Joined { name, .. } if name == n))
            .count()
    };
    // Wait (bounded) for every name that surely registered to leave, and
    // for every quick one that joined, then a little longer: duplicates
    // would come later, if at all.
    case.watcher.wait_until(Duration::from_secs(5), |c| {
        names.iter().all(|n| {
            let may_never_join = n.starts_with("quick") && joins(c, n) == 0;
            lefts(c, n) >= 1 || may_never_join
        })
    });
    thread::sleep(Duration::from_millis(500));
    let seen = case.watcher.changes();
    for name in &names {
        let mine: Vec<&Change> = seen.iter().filter(|c| change_name(c) == name).collect();
        let quick = name.starts_with("quick");
        match mine.as_slice() {
            [Change::Joined { .. }, Change::Left { reason, .. }] if reason == "disconnected" => {}
            // A register the registry never read before the reset.
            [] if quick => eprintln!("[closes] {name}: the reset beat the register"),
            other => panic!("closes: {name}: expected one join and one left, got {other:?}"),
        }
    }
    assert_alive("closes", &mut case.reg);
    // The order of the named ones is that of the steps above.
    for c in seen
        .iter()
        .filter(|c| names.iter().any(|n| n == change_name(c)))
    {
        case.expected.push(c.clone());
    }
    crowd.stop();
    let all_gone = case.watcher.wait_until(Duration::from_secs(10), |c| {
        c.iter()
            .filter(|c| matches!(c, Change::Left { name, .. } if name.starts_with("filler")))
            .count()
            == 300
    });
    assert!(all_gone, "the 300 fillers left");
    let seen = case.watcher.changes();
    for f in &fillers {
        let mine: Vec<&Change> = seen.iter().filter(|c| change_name(c) == f).collect();
        assert!(
            matches!(mine.as_slice(), [Change::Joined { .. }, Change::Left { reason, .. }] if reason == "disconnected"),
            "closes: {f}: {mine:?}"
        );
    }
    case.finish();
}

// ---------------------------------------------------------------------------
// The peer's listening socket
// ---------------------------------------------------------------------------

fn link_msgs(label: &str, f: &Finish) -> Vec<LinkMsg> {
    f.frames
        .iter()
        .map(|b| {
            codec::decode::<LinkMsg>(b)
                .unwrap_or_else(|e| panic!("{label}: the peer sent an undecodable frame: {e}"))
        })
        .collect()
}

fn peer_addr(registered: &Value) -> SocketAddr {
    registered["addr"]
        .as_str()
        .expect("registered carries addr")
        .parse()
        .expect("an address")
}

fn assert_peer_alive(label: &str, p: &mut PeerProc) {
    let status = p.proc.child.try_wait().unwrap();
    assert!(
        status.is_none(),
        "{label}: the peer died ({status:?}); stderr {:?}",
        p.proc.stderr.snapshot()
    );
}

/// Bytes to a peer's listening socket; returns what it answered.
/// Frame-stream bytes inside a Noise session (under a new key) to a peer's
/// listening socket; returns what it answered.
fn link_attack(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Finish {
    link_attack_with(addr, timeout, |s| {
        let _ = s.write_plain(bytes);
    })
}

/// Does `act` on a fresh Noise session to a peer's listening socket;
/// returns what it answered.
fn link_attack_with(addr: SocketAddr, timeout: Duration, act: impl FnOnce(&mut Secure)) -> Finish {
    let mut s = secure(TcpStream::connect(addr).expect("connect to the peer"));
    s.get_ref()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    act(&mut s);
    read_to_close(&mut s, timeout)
}

/// Bytes where a registry or a peer expects a Noise handshake: it must
/// close at once, saying at most its own handshake message (there is no
/// session, so nothing of the protocol).
fn plain_attack(label: &str, addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect to the peer");
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let (got, end, elapsed) = read_raw_to_close(&mut s, Duration::from_secs(3));
    assert!(
        end != End::Open && got.len() <= 2 + MAX_HANDSHAKE_MESSAGE,
        "{label}: expected a close without a word, got {} bytes then {end:?}",
        got.len()
    );
    assert!(elapsed < AT_ONCE, "{label}: closed only after {elapsed:?}");
}

/// Chat from a real second peer still arrives.
fn chat_still_arrives(label: &str, reg: &Registry, alice: &mut PeerProc) {
    let mut bob = PeerProc::start("bob", reg.addr);
    bob.registered();
    alice.expect("bob joined", LONG, |v| {
        v["event"] == "joined" && v["name"] == "bob"
    });
    bob.say("/msg alice still listening?");
    let m = alice.expect("a message", LONG, |v| v["event"] == "message");
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("bob"), Some("still listening?")),
        "{label}"
    );
    bob.expect("delivered", LONG, |v| v["event"] == "delivered");
    assert_eq!(
        alice.count(|v| v["event"] == "message"),
        1,
        "{label}: nothing from the attackers was shown"
    );
    assert_peer_alive(label, alice);
}

#[test]
fn peer_hostile_bytes_on_a_link_close_only_that_link() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let hello = |name: &str| {
        codec::encode_frame(&LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            instance: 7,
        })
        .unwrap()
        .to_vec()
    };
    let chat = codec::encode_frame(&LinkMsg::Chat {
        id: 1,
        text: "sneaky".into(),
        direct: true,
        sent_at: None,
    })
    .unwrap()
    .to_vec();
    // Answered with `error` `protocol`, then closed (PROTOCOL.md 4.2.5).
    let protocol_cases: Vec<(&str, Vec<u8>)> = vec![
        ("not CBOR", frame(&[0xff, 0xfe, 0xfd])),
        ("a bare integer", frame(&cbor_uint(5))),
        (
            "hello as text",
            frame(&cbor_map(&[("hello", cbor_text("x"))])),
        ),
        ("unknown type", frame(&cbor_msg("frobnicate", &[]))),
        ("chat before hello", chat.clone()),
        ("65,536 nested", frame(&nested_arrays(65_536))),
        (
            "17 nested",
            frame(&{
                let mut b = nested_arrays(17);
                b.push(0);
                b
            }),
        ),
        ("2^60 array", frame(&huge_array_body())),
        ("hello with its own name", hello("ALICE")),
    ];
    for (what, bytes) in &protocol_cases {
        let label = format!("peer/{what}");
        let f = link_attack(addr, bytes, Duration::from_secs(3));
        let msgs = link_msgs(&label, &f);
        assert_ne!(
            f.end,
            End::Open,
            "{label}: the link stays open; got {msgs:?}"
        );
        assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
        match msgs.as_slice() {
            [LinkMsg::Error { code, .. }] if code == "protocol" => {}
            other => panic!("{label}: expected one error \"protocol\", got {other:?}"),
        }
        assert_peer_alive(&label, &mut alice);
    }
    let bad_name = link_attack(addr, &hello("has space"), Duration::from_secs(3));
    match link_msgs("peer/bad name", &bad_name).as_slice() {
        [LinkMsg::Error { code, .. }] if code == "bad_name" && bad_name.end != End::Open => {}
        other => panic!(
            "peer/hello with a bad name: {other:?} then {:?}",
            bad_name.end
        ),
    }
    let old = codec::encode_frame(&LinkMsg::Hello {
        version: 1,
        name: "oldtimer".into(),
        instance: 7,
    })
    .unwrap();
    let old = link_attack(addr, &old, Duration::from_secs(3));
    match link_msgs("peer/version 1", &old).as_slice() {
        [LinkMsg::Error { code, .. }] if code == "unsupported_version" && old.end != End::Open => {}
        other => panic!("peer/hello of version 1: {other:?} then {:?}", old.end),
    }
    // The link proves alice's key.
    let probe = secure(TcpStream::connect(addr).unwrap());
    assert_eq!(
        probe.remote_key(),
        alice.key(),
        "the link proves alice's key"
    );
    drop(probe);
    // No Noise session: closed at once, without a word.
    plain_attack("peer/a plaintext hello", addr, &hello("bob"));
    plain_attack(
        "peer/a handshake message of 65535 bytes",
        addr,
        &[0xff, 0xff],
    );
    plain_attack(
        "peer/ASCII text",
        addr,
        b"GET / HTTP/1.1\r\nHost: alice\r\n\r\n",
    );
    // A broken Noise session: closed without a word, before or after hello.
    for after_hello in [false, true] {
        let when = if after_hello { "after" } else { "before" };
        let start = |s: &mut Secure| {
            if after_hello {
                s.write_plain(&hello("mallory")).unwrap();
            }
        };
        let cases: Vec<(&str, SessionAct)> = vec![
            (
                "a flipped bit",
                Box::new(|s: &mut Secure| {
                    let mut wire = s.seal(&chat).unwrap();
                    let at = wire.len() / 2;
                    wire[at] ^= 0x04;
                    let _ = s.get_mut().write_all(&wire);
                }),
            ),
            (
                "a replayed message",
                Box::new(|s: &mut Secure| {
                    let wire = s.seal(&chat[..2]).unwrap();
                    let _ = s.get_mut().write_all(&[&wire[..], &wire[..]].concat());
                }),
            ),
            (
                "a truncated message",
                Box::new(|s: &mut Secure| {
                    let wire = s.seal(&chat).unwrap();
                    let _ = s.get_mut().write_all(&wire[..wire.len() - 1]);
                    let _ = s.get_ref().shutdown(Shutdown::Write);
                }),
            ),
            (
                "plaintext inside",
                Box::new(|s: &mut Secure| {
                    let _ = s.get_mut().write_all(&chat);
                }),
            ),
        ];
        for (what, act) in cases {
            let label = format!("peer/{what} {when} hello");
            let f = link_attack_with(addr, Duration::from_secs(3), |s| {
                start(s);
                act(s);
            });
            let msgs = link_msgs(&label, &f);
            assert!(
                f.end != End::Open && msgs.is_empty(),
                "{label}: expected a close without a word, got {msgs:?} then {:?}",
                f.end
            );
            assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
            assert_peer_alive(&label, &mut alice);
        }
    }
    // Over the 64 KiB limit: closed; PROTOCOL.md promises frame_too_large
    // only from the registry, so the peer may close without a word.
    let too_large: Vec<(&str, Vec<u8>)> = vec![
        ("length 0xFFFFFFFF", vec![0xff; 4]),
        ("100,000 nested", frame(&nested_arrays(100_000))),
    ];
    for (what, bytes) in &too_large {
        let label = format!("peer/{what}");
        let f = link_attack(addr, bytes, Duration::from_secs(3));
        let msgs = link_msgs(&label, &f);
        eprintln!(
            "[{label}] answered {msgs:?}, then {:?} after {:?}",
            f.end, f.elapsed
        );
        assert_ne!(f.end, End::Open, "{label}: the link stays open");
        assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
        assert!(
            matches!(msgs.as_slice(), [] | [LinkMsg::Error { .. }]),
            "{label}: {msgs:?}"
        );
        if let [LinkMsg::Error { code, .. }] = msgs.as_slice() {
            assert!(
                code == "frame_too_large" || code == "protocol",
                "{label}: {code}"
            );
        }
        assert_peer_alive(&label, &mut alice);
    }
    chat_still_arrives("peer", &reg, &mut alice);
}

#[test]
fn peer_a_hello_from_a_name_nobody_registered_is_refused_after_5s() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let mut bytes = codec::encode_frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 99,
    })
    .unwrap()
    .to_vec();
    for id in 1..=3 {
        bytes.extend_from_slice(
            &codec::encode_frame(&LinkMsg::Chat {
                id,
                text: format!("held {id}"),
                direct: true,
                sent_at: None,
            })
            .unwrap(),
        );
    }
    let f = link_attack(addr, &bytes, Duration::from_secs(8));
    let msgs = link_msgs("peer/unknown hello", &f);
    eprintln!(
        "[peer/unknown hello] {msgs:?} then {:?} after {:?}",
        f.end, f.elapsed
    );
    assert_ne!(f.end, End::Open, "the link is closed");
    match msgs.as_slice() {
        [LinkMsg::Error { code, .. }] if code == "unknown_peer" => {}
        other => panic!("expected one error unknown_peer and no acks, got {other:?}"),
    }
    assert!(
        f.elapsed >= Duration::from_millis(4500) && f.elapsed < Duration::from_secs(7),
        "refused after {:?}, not about 5 s",
        f.elapsed
    );
    assert_peer_alive("peer/unknown hello", &mut alice);
    chat_still_arrives("peer/unknown hello", &reg, &mut alice);
}

/// A zero-length frame is invalid framing (PROTOCOL.md 1); on a link, an
/// undecodable frame earns `error` `protocol` (4.2, step 5), as it does at
/// the registry.
#[test]
fn peer_a_zero_length_frame_on_a_link_gets_a_protocol_error() {
    let reg = Registry::start(&[]);
    let mut alice = PeerProc::start("alice", reg.addr);
    let addr = peer_addr(&alice.registered());
    let label = "peer/zero-length frame";
    let f = link_attack(addr, &[0, 0, 0, 0], Duration::from_secs(3));
    let msgs = link_msgs(label, &f);
    assert_ne!(f.end, End::Open, "{label}: the link stays open");
    assert!(f.elapsed < AT_ONCE, "{label}: closed after {:?}", f.elapsed);
    assert_peer_alive(label, &mut alice);
    match msgs.as_slice() {
        [LinkMsg::Error { code, .. }] if code == "protocol" => {}
        other => panic!(
            "{label}: expected one error \"protocol\" before the close, got {other:?} then {:?}",
            f.end
        ),
    }
    chat_still_arrives(label, &reg, &mut alice);
}
