//! End-to-end tests of the peer's human mode (no `--json`): the real `peer`
//! binary runs in a pseudo-terminal, as a person runs it, and the tests type
//! into it, read what reaches its screen, and watch what reaches the other
//! peers (a `--json` peer as the observer).
//!
//! The pty harness ([`PtyPeer`]) keeps every byte the program wrote, and
//! feeds them to a terminal emulator (`vt100`) that gives the lines a person
//! would see; it answers the cursor-position query that rustyline sends when
//! it starts a line, as a real terminal does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::protocol::{FromRegistry, LinkMsg, PROTOCOL_VERSION};
use peerchat_testkit::bins::bin;
use peerchat_testkit::client::{handshake, Client, Secure};
use peerchat_testkit::launch::{PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;
use portable_pty::{native_pty_system, CommandBuilder, MasterPty, PtySize};
use serde_json::Value;

const ROWS: u16 = 50;
/// Wide enough that no line of these tests wraps.
const COLS: u16 = 200;
const PROMPT: &str = "PROMPT$ ";

/// Scrollback the terminal keeps: more lines than any test writes.
const SCROLLBACK: usize = 10_000;
/// "Where is the cursor?" (DSR 6), which rustyline sends when it starts a
/// line: `vt100` reads it but does not answer it.
const CURSOR_QUERY: &[u8] = b"\x1b[6n";

// ---------------------------------------------------------------------------
// The terminal
// ---------------------------------------------------------------------------

/// What the programs in the pty wrote, and the terminal they wrote it to.
struct Term {
    /// Every byte the programs in the pty wrote.
    raw: Vec<u8>,
    /// A terminal emulator fed with `raw`.
    screen: vt100::Parser,
}

impl Term {
    fn new() -> Term {
        let rows = NonZeroU16::new(ROWS).expect("rows");
        let cols = NonZeroU16::new(COLS).expect("columns");
        Term {
            raw: Vec::new(),
            screen: vt100::Parser::new(rows, cols, SCROLLBACK),
        }
    }

    /// Takes `bytes` the programs wrote, and returns what a terminal
    /// answers to the cursor-position queries among them: "ESC [ row ; col
    /// R", with the cursor where it is right after each query.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let start = self.raw.len();
        self.raw.extend_from_slice(bytes);
        let mut answers = Vec::new();
        let mut fed = start;
        // A query may have begun in an earlier read.
        let mut from = start.saturating_sub(CURSOR_QUERY.len() - 1);
        while let Some(at) = find(&self.raw[from..], CURSOR_QUERY) {
            let end = from + at + CURSOR_QUERY.len();
            self.screen.process(&self.raw[fed..end]);
            let (row, col) = self.screen.screen().cursor_position();
            answers.push(format!("\x1b[{};{}R", row + 1, col + 1));
            (fed, from) = (end, end);
        }
        self.screen.process(&self.raw[fed..]);
        answers
    }

    /// The lines of the terminal, scrolled off or not, top to bottom,
    /// without the blank rows below the last one written.
    fn lines(&mut self) -> Vec<String> {
        let screen = self.screen.screen_mut();
        let rows = usize::from(ROWS);
        let mut lines = Vec::new();
        // Scrolled back by `offset`, the top row shown is scrollback line
        // `scrollback_len - offset`.
        for offset in (1..=screen.scrollback_len()).rev().step_by(rows) {
            screen.set_scrollback(offset);
            lines.extend(screen.rows(0, COLS).take(offset.min(rows)));
        }
        screen.set_scrollback(0);
        lines.extend(screen.rows(0, COLS));
        let mut lines: Vec<String> = lines.iter().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    }
}

// ---------------------------------------------------------------------------
// The pty harness
// ---------------------------------------------------------------------------

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// A program in a pseudo-terminal: `peer` itself, or an interactive bash
/// that runs peers as jobs.
struct PtyPeer {
    label: String,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    _master: Box<dyn MasterPty + Send>,
    writer: Writer,
    term: Arc<Mutex<Term>>,
    /// Peers started inside bash: killed with it.
    jobs: Vec<i32>,
    _data: DataDir,
}

impl PtyPeer {
    /// `peer --name NAME --registry ADDR --plain` (the line mode), listening
    /// on loopback, with a fresh data directory.
    fn peer(name: &str, registry: &str) -> PtyPeer {
        let data = DataDir::fresh();
        let mut cmd = CommandBuilder::new(bin("peer"));
        cmd.args(["--name", name, "--registry", registry, "--plain"]);
        cmd.args(["--listen", "127.0.0.1:0"]);
        Self::spawn(cmd, name, data)
    }

    /// `bash --norc -i` with the prompt [`PROMPT`]: job control, and a
    /// shell to look at the terminal with after a peer ends.
    fn bash(label: &str) -> PtyPeer {
        let mut cmd = CommandBuilder::new("bash");
        cmd.args(["--norc", "--noprofile", "-i"]);
        cmd.env("PS1", PROMPT);
        cmd.env("HISTFILE", "/dev/null");
        let sh = Self::spawn(cmd, label, DataDir::fresh());
        sh.wait_for(PROMPT, LONG);
        sh
    }

    fn spawn(mut cmd: CommandBuilder, label: &str, data: DataDir) -> PtyPeer {
        cmd.env_remove("RUST_LOG");
        cmd.env("TERM", "xterm-256color");
        cmd.env("XDG_DATA_HOME", data.path());
        cmd.cwd(data.path());
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("a pseudo-terminal");
        let child = pair.slave.spawn_command(cmd).expect("spawn in the pty");
        // Only the child holds the slave side now: its end is our EOF.
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        let writer: Writer = Arc::new(Mutex::new(pair.master.take_writer().expect("pty writer")));
        let term = Arc::new(Mutex::new(Term::new()));
        {
            let term = term.clone();
            let writer = writer.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // A terminal answers "where is the cursor?" at once;
                    // rustyline waits 100 ms for it, reading what comes.
                    let answers = term.lock().unwrap().feed(&buf[..n]);
                    for answer in answers {
                        let mut w = writer.lock().unwrap();
                        let _ = w.write_all(answer.as_bytes()).and_then(|()| w.flush());
                    }
                }
            });
        }
        PtyPeer {
            label: label.to_string(),
            child,
            _master: pair.master,
            writer,
            term,
            jobs: Vec::new(),
            _data: data,
        }
    }

    fn pid(&self) -> i32 {
        self.child.process_id().expect("a pid") as i32
    }

    /// Types (or pastes) `bytes`, in one write.
    fn write(&self, bytes: impl AsRef<[u8]>) {
        let mut w = self.writer.lock().unwrap();
        w.write_all(bytes.as_ref()).expect("writing to the pty");
        w.flush().expect("flushing the pty");
    }

    /// How much output there is so far: a place to search from.
    fn mark(&self) -> usize {
        self.term.lock().unwrap().raw.len()
    }

    fn raw(&self) -> Vec<u8> {
        self.term.lock().unwrap().raw.clone()
    }

    /// The output from `from` on, as text.
    fn text_from(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.term.lock().unwrap().raw[from..]).into_owned()
    }

    /// The lines on the screen (scrolled off or not), top to bottom.
    fn screen(&self) -> Vec<String> {
        self.term.lock().unwrap().lines()
    }

    /// Where `needle` ends in the output after `from`, waiting for it at
    /// most `timeout`.
    fn find_from(&self, from: usize, needle: &str, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let t = self.term.lock().unwrap();
                if let Some(at) = find(&t.raw[from.min(t.raw.len())..], needle.as_bytes()) {
                    return Some(from + at + needle.len());
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like [`PtyPeer::find_from`], but a test failure (with what the
    /// screen shows) when it does not come.
    fn expect_from(&self, from: usize, needle: &str, timeout: Duration) -> usize {
        self.find_from(from, needle, timeout).unwrap_or_else(|| {
            panic!(
                "{}: no {needle:?} on the terminal within {timeout:?}\n{}",
                self.label,
                self.dump()
            )
        })
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> usize {
        self.expect_from(0, needle, timeout)
    }

    /// What to show when a test fails: the screen's last lines and the raw
    /// tail, escaped.
    fn dump(&self) -> String {
        let screen = self.screen();
        let raw = self.raw();
        let tail = &raw[raw.len().saturating_sub(1500)..];
        format!(
            "--- screen (last 40 lines) ---\n{}\n--- raw tail ---\n{}",
            screen[screen.len().saturating_sub(40)..].join("\n"),
            tail.escape_ascii()
        )
    }

    fn signal(&self, signal: i32) {
        // SAFETY: sends a signal to our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// The exit status, waiting for it at most `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<portable_pty::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// In the bash of [`PtyPeer::bash`]: runs a line-mode peer as a
    /// foreground job, waits for its registration and returns its pid.
    fn run_peer(&mut self, name: &str, registry: SocketAddr) -> i32 {
        let from = self.mark();
        self.write(format!(
            "'{}' --name {name} --registry {registry} --plain --listen 127.0.0.1:0\r",
            bin("peer").display()
        ));
        self.expect_from(from, &format!("registered as {name} "), LONG);
        let shell = self.pid();
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(pid) = child_named(shell, name) {
                self.jobs.push(pid);
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no child of bash runs --name {name}",
                self.label
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PtyPeer {
    fn drop(&mut self) {
        let shell = self.pid();
        for &job in &self.jobs {
            if parent_of(job) == Some(shell) {
                // SAFETY: a process we started (through bash), still bash's.
                unsafe {
                    libc::kill(job, libc::SIGKILL);
                }
            }
        }
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our own child, not reaped yet.
            unsafe {
                libc::kill(shell, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The parent pid in /proc/PID/stat.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The child of `parent` whose command line has `--name NAME`.
fn child_named(parent: i32, name: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            if parent_of(pid) != Some(parent) {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
                .then_some(pid)
        })
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A `--json` peer, registered: the one that watches.
fn observer(name: &str, registry: SocketAddr) -> PeerProc {
    let mut obs = PeerProc::start(name, registry);
    obs.registered();
    obs
}

/// The next message the observer gets from `from`.
fn message_from(obs: &mut PeerProc, from: &str) -> Value {
    obs.expect(&format!("message from {from}"), LONG, |v| {
        v["event"] == "message" && v["from"] == from
    })
}

/// The text of the next message from `from`, checked to be `text`, with
/// its `direct` flag.
fn expect_text(obs: &mut PeerProc, from: &str, text: &str) -> bool {
    let msg = message_from(obs, from);
    assert_eq!(
        msg["text"], text,
        "{}: message out of place: {msg}",
        obs.name
    );
    msg["direct"].as_bool().expect("direct is a bool")
}

/// A registry, a `--json` observer `obsN` and a pty peer `ttyN`, both
/// registered and the observer told of the pty peer. Keep the registry.
fn watched_pty_peer(n: u8) -> (Registry, PeerProc, PtyPeer) {
    let registry = Registry::start(&[]);
    let mut obs = observer(&format!("obs{n}"), registry.addr);
    let name = format!("tty{n}");
    let tty = PtyPeer::peer(&name, &registry.addr.to_string());
    tty.wait_for(&format!("registered as {name} "), LONG);
    obs.expect("the pty peer joined", LONG, |v| {
        v["event"] == "joined" && v["name"] == name.as_str()
    });
    (registry, obs, tty)
}

/// A registry port where nothing listens.
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.local_addr().unwrap().port()
}

/// Sends one chat straight over a link, as any client of the protocol can:
/// registers `me` with the registry, dials `to` at the address the registry
/// lists, says hello and sends `text` (which may hold newlines, which a
/// `--json` peer's line-based input cannot). Returns the registry session
/// and the link, to keep them open.
fn link_chat(registry: SocketAddr, me: &str, to: &str, text: &str) -> (Client, Secure) {
    let (client, welcome) = Client::register(registry, me, 1);
    let FromRegistry::Welcome { peers, .. } = welcome else {
        panic!("{me}: no welcome: {welcome:?}");
    };
    let target = peers
        .iter()
        .find(|p| p.name == to)
        .unwrap_or_else(|| panic!("{to} is not listed: {peers:?}"));
    let stream = TcpStream::connect(target.addr.as_str()).expect("dial the peer");
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream.set_write_timeout(Some(LONG)).unwrap();
    let mut link = handshake(stream, &client.identity).expect("link handshake");
    assert_eq!(
        link.remote_key(),
        target.key,
        "the link proves the listed key"
    );
    let hello = LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: me.into(),
        instance: 1,
    };
    let chat = LinkMsg::Chat {
        id: 1,
        text: text.into(),
        direct: false,
        sent_at: None,
    };
    for msg in [hello, chat] {
        link.write_plain(&codec::encode_frame(&msg).unwrap())
            .expect("send on the link");
    }
    let ack = link
        .read_frame()
        .expect("read the ack")
        .expect("an ack, not a close");
    let ack: LinkMsg = codec::decode(&ack).expect("a link message");
    assert_eq!(ack, LinkMsg::Ack { id: 1 });
    (client, link)
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// 1. Lines typed before the peer is even registered, and 200 lines pasted
///    in one write without bracketed paste, each reach the other peers
///    exactly once and in order.
#[test]
fn typed_ahead_and_pasted_lines_each_arrive_once_in_order() {
    let registry = Registry::start(&[]);
    let mut obs = observer("obs1", registry.addr);
    let tty = PtyPeer::peer("tty1", &registry.addr.to_string());
    tty.write("early one\rearly two\r");
    tty.wait_for("registered as tty1 ", LONG);
    assert!(!expect_text(&mut obs, "tty1", "early one"));
    assert!(!expect_text(&mut obs, "tty1", "early two"));

    let paste: String = (1..=200).map(|i| format!("line {i:03}\r")).collect();
    tty.write(paste);
    for i in 1..=200 {
        assert!(!expect_text(&mut obs, "tty1", &format!("line {i:03}")));
    }
    // Nothing repeated or left over comes between the paste and this.
    tty.write("after the paste\r");
    assert!(!expect_text(&mut obs, "tty1", "after the paste"));
    let from_tty = obs.count(|v| v["event"] == "message" && v["from"] == "tty1");
    assert_eq!(from_tty, 203, "every line once: {:?}", obs.seen);
}

/// 2. A bracketed paste is taken line by line as if typed: text, a /msg
///    command in the middle, more text; no message holds a newline.
#[test]
fn a_bracketed_paste_is_taken_line_by_line_commands_included() {
    let registry = Registry::start(&[]);
    let mut obs = observer("obs2", registry.addr);
    let tty = PtyPeer::peer("tty2", &registry.addr.to_string());
    tty.wait_for("registered as tty2 ", LONG);
    tty.write("\x1b[200~para one\r/msg obs2 secret\rpara three\x1b[201~\r");
    assert!(!expect_text(&mut obs, "tty2", "para one"));
    assert!(expect_text(&mut obs, "tty2", "secret"), "/msg is direct");
    assert!(!expect_text(&mut obs, "tty2", "para three"));
    for msg in obs.seen.iter().filter(|v| v["event"] == "message") {
        let text = msg["text"].as_str().unwrap();
        assert!(!text.contains(['\n', '\r']), "a line break sent: {msg}");
    }
}

/// 3. Escape sequences, control characters and line breaks in messages
///    from the network never reach the terminal raw: they show as visible
///    placeholders, and a message's further lines are marked as its
///    sender's, so that none can pass for a message of its own.
#[test]
fn control_characters_and_forged_lines_from_the_network_are_shown_harmless() {
    let (registry, mut obs, tty) = watched_pty_peer(3);
    obs.say("\u{1b}]2;PWNED\u{1b}\\ \u{1b}[31mRED\u{1b}[0m \u{7} bell\rFAKE");
    tty.wait_for("bell", LONG);

    // A --json peer's input is one line per message: a message with
    // newlines comes from a client of the protocol.
    let _forger = link_chat(
        registry.addr,
        "forger3",
        "tty3",
        "first\n[12:00:00] <mallory> forged\nthird",
    );
    tty.wait_for("third", LONG);

    let raw = tty.raw();
    for bad in [&b"\x1b]2;PWNED"[..], b"\x1b[31mRED", b"\x07"] {
        assert!(
            find(&raw, bad).is_none(),
            "{:?} reached the terminal\n{}",
            bad.escape_ascii().to_string(),
            tty.dump()
        );
    }
    let text = String::from_utf8_lossy(&raw);
    for shown in [
        "\u{241b}]2;PWNED",
        "\u{241b}[31mRED",
        "\u{2407} bell\u{240d}FAKE",
    ] {
        assert!(text.contains(shown), "no {shown:?}\n{}", tty.dump());
    }
    let continuation = "<forger3> \u{2502} [12:00:00] <mallory> forged";
    assert!(text.contains(continuation), "{}", tty.dump());
    assert_eq!(
        text.matches("[12:00:00] <mallory>").count(),
        text.matches(continuation).count(),
        "the forged line appears outside its continuation\n{}",
        tty.dump()
    );
    let screen = tty.screen();
    let forged: Vec<&String> = screen.iter().filter(|l| l.contains("forged")).collect();
    assert!(!forged.is_empty(), "{}", tty.dump());
    for line in forged {
        assert!(
            line.starts_with("           <forger3> \u{2502} "),
            "not shown as a continuation: {line:?}"
        );
    }
    assert!(
        screen
            .iter()
            .any(|l| l.starts_with("           <forger3> \u{2502} third")),
        "{}",
        tty.dump()
    );
    assert!(
        !screen.iter().any(|l| l.starts_with("[12:00:00] <mallory>")),
        "{}",
        tty.dump()
    );
}

/// 4. Stopped by Ctrl-Z, or by SIGTSTP from outside, and brought back with
///    `fg`, the peer edits in raw mode again with the line being typed
///    kept.
#[test]
fn after_ctrl_z_or_an_outside_stop_fg_brings_back_raw_mode_and_the_draft() {
    let registry = Registry::start(&[]);
    let mut obs = observer("obs4", registry.addr);
    let mut sh = PtyPeer::bash("bash4");
    let pid = sh.run_peer("tty4", registry.addr);

    // Ctrl-Z, as typed.
    let from = sh.mark();
    sh.write("draft");
    sh.expect_from(from, "draft", LONG);
    sh.write(b"\x1a");
    sh.expect_from(from, "Stopped", LONG);
    let from = sh.mark();
    sh.write("fg\r");
    sh.expect_from(from, "draft", LONG);
    sh.write("\x1b[DX\r");
    assert!(!expect_text(&mut obs, "tty4", "drafXt"));
    let after = sh.text_from(from);
    assert!(
        !after.contains("^["),
        "keys echoed by a cooked terminal\n{}",
        sh.dump()
    );

    // SIGTSTP from outside, while the editor is in raw mode.
    let from = sh.mark();
    sh.write("draft2");
    sh.expect_from(from, "draft2", LONG);
    // SAFETY: the peer we started in bash.
    unsafe {
        libc::kill(pid, libc::SIGTSTP);
    }
    sh.expect_from(from, "Stopped", LONG);
    let from = sh.mark();
    sh.write("fg\r");
    sh.expect_from(from, "draft2", LONG);
    sh.write("\x1b[DY\r");
    assert!(!expect_text(&mut obs, "tty4", "draftY2"));
    let after = sh.text_from(from);
    assert!(
        !after.contains("^["),
        "keys echoed by a cooked terminal\n{}",
        sh.dump()
    );
}

/// 5. After /quit the terminal is as the shell left it (canonical, echoing)
///    and the peer's prompt is gone from the line the shell prompts on.
#[test]
fn quitting_restores_the_terminal_and_leaves_no_prompt_behind() {
    let registry = Registry::start(&[]);
    let mut sh = PtyPeer::bash("bash5");
    sh.run_peer("tty5", registry.addr);
    let from = sh.mark();
    sh.write("/quit\r");
    sh.expect_from(from, PROMPT, LONG);
    let from = sh.mark();
    sh.write("echo status=$?\r");
    sh.expect_from(from, "status=0", LONG);
    sh.expect_from(from, PROMPT, LONG);

    let from = sh.mark();
    sh.write("stty -a\r");
    let end = sh.expect_from(from, PROMPT, LONG);
    let stty = String::from_utf8_lossy(&sh.raw()[from..end]).into_owned();
    let flags: Vec<&str> = stty.split([' ', ';', '\r', '\n']).collect();
    for on in ["icanon", "echo", "isig", "icrnl"] {
        assert!(
            flags.contains(&on) && !flags.contains(&format!("-{on}").as_str()),
            "{on} is not set after the peer exits: {stty:?}"
        );
    }

    let raw = sh.raw();
    assert!(
        find(&raw, b"> PROMPT$").is_none(),
        "the peer's prompt is left before the shell's\n{}",
        sh.dump()
    );
    let screen = sh.screen();
    assert!(
        !screen.iter().any(|l| l.contains("> PROMPT$")),
        "{}",
        sh.dump()
    );
    assert!(
        screen.iter().any(|l| l == PROMPT.trim_end() || l == PROMPT),
        "no clean shell prompt line\n{}",
        sh.dump()
    );
}

/// 6. A registry that is not there is reported once, not once per retry,
///    and /status says it is unreachable.
#[test]
fn an_unreachable_registry_is_reported_once_and_status_says_so() {
    let tty = PtyPeer::peer("tty6", &format!("127.0.0.1:{}", dead_port()));
    tty.wait_for("not reachable", LONG);
    // Time for several retries (100 ms doubling: 100, 200, 400, 800, 1600).
    thread::sleep(Duration::from_secs(4));
    let from = tty.mark();
    tty.write("/status\r");
    tty.expect_from(from, "registry: unreachable", LONG);

    let raw = tty.raw();
    assert_eq!(count(&raw, b"not reachable"), 1, "{}", tty.dump());
    assert_eq!(count(&raw, b"retrying in"), 0, "{}", tty.dump());
    let screen = tty.screen();
    let lines = screen
        .iter()
        .filter(|l| l.contains("not reachable"))
        .count();
    assert_eq!(lines, 1, "{}", tty.dump());
}

/// 7. SIGHUP (the terminal closed) leaves as /quit does: the others see a
///    quit, and the peer exits 0.
#[test]
fn sighup_leaves_as_a_quit_and_exits_zero() {
    let (_registry, mut obs, mut tty) = watched_pty_peer(7);
    tty.signal(libc::SIGHUP);
    let left = obs.expect("tty7 left", LONG, |v| {
        v["event"] == "left" && v["name"] == "tty7"
    });
    assert_eq!(left["reason"], "quit", "{left}");
    let status = tty
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("tty7 still running after SIGHUP\n{}", tty.dump()));
    assert!(
        status.success() && status.exit_code() == 0,
        "tty7 exited with {status}\n{}",
        tty.dump()
    );
}

/// 8. A user in the middle of a history search (Ctrl-R), when the line
///    editor takes no printed lines, still gets out: SIGTERM exits within
///    a few seconds although messages wait to be shown, and the terminal
///    is handed back with bracketed paste off.
#[test]
fn exit_is_not_held_by_a_history_search_and_leaves_bracketed_paste_off() {
    let (_registry, mut obs, mut tty) = watched_pty_peer(8);
    tty.write("searched for\r");
    expect_text(&mut obs, "tty8", "searched for");
    // Marked before the keys go in: the search may be drawn at once.
    let searching = tty.mark();
    tty.write("\x12sea");
    tty.expect_from(searching, "reverse-i-search", LONG);
    for n in 0..3 {
        obs.say(&format!("while searching {n}"));
    }
    // Let the messages reach tty8's output thread before the signal.
    std::thread::sleep(Duration::from_millis(500));
    tty.signal(libc::SIGTERM);
    let status = tty
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("tty8 still running after SIGTERM\n{}", tty.dump()));
    assert_eq!(status.exit_code(), 0, "{}", tty.dump());
    let raw = tty.raw();
    let on = raw
        .windows(8)
        .rposition(|w| w == b"\x1b[?2004h")
        .unwrap_or(0);
    let off = raw.windows(8).rposition(|w| w == b"\x1b[?2004l");
    assert!(
        off.is_some_and(|off| off > on),
        "bracketed paste is left on at exit\n{}",
        tty.dump()
    );
}

/// 9. Text that terminals draw wider than it counts (emoji sequences,
///    emoji presentation selectors) cannot push a forged line to the start
///    of a screen line: our wrapping ends rows early instead.
#[test]
fn wide_text_cannot_wrap_a_forged_line_to_column_zero() {
    let (_registry, mut obs, tty) = watched_pty_peer(9);
    let family = "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}";
    let smile = "\u{263A}\u{FE0F}";
    // "[HH:MM:SS] <obs9> " is 18 cells; drawn a code point at a time each
    // family is 6 cells and each smile 2, so both forged texts would begin
    // at cell 200: the first cell of the next screen line.
    obs.say(&format!(
        "{}  [20:59:59] <carol> forged one",
        family.repeat(30)
    ));
    obs.say(&format!(
        "  {}[20:59:59] <carol> forged two",
        smile.repeat(90)
    ));
    tty.wait_for("forged two", LONG);
    let screen = tty.screen();
    assert!(
        !screen.iter().any(|l| l.starts_with("[20:59:59] <carol>")),
        "a forged line starts a screen line\n{}",
        tty.dump()
    );
    drop(obs);
}
