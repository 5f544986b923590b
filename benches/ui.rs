//! What the terminal UI costs the loop: a peer with 1,000 peers online
//! takes a burst of 10,000 messages from 10 senders at once, drawn by the
//! full-screen UI or printed by the line mode (`--plain`), both in a real
//! terminal (tmux). The figure is how long the senders wait for every
//! acknowledgement: the UI must not slow it by more than 10%.
//!
//! `cargo bench --bench ui` (needs tmux). `UI_BENCH_ONLINE`,
//! `UI_BENCH_MESSAGES` and `UI_BENCH_ROUNDS` change the sizes.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerchat_core::codec;
use peerchat_core::protocol::{FromRegistry, LinkMsg, PROTOCOL_VERSION};
use peerchat_testkit::bins::bin;
use peerchat_testkit::client::{handshake, Client, Secure};
use peerchat_testkit::launch::Registry;
use peerchat_testkit::process::DataDir;

const SENDERS: usize = 10;
const WAIT: Duration = Duration::from_secs(60);

fn setting(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The peer under test in a tmux window of its own.
struct Subject {
    name: &'static str,
    socket: String,
    _data: DataDir,
}

impl Subject {
    fn start(name: &'static str, registry: SocketAddr, extra: &[&str]) -> Subject {
        let data = DataDir::fresh();
        let socket = format!("peerchat-ui-bench-{}-{name}", std::process::id());
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "40"])
            .arg("env")
            .arg(format!("XDG_DATA_HOME={}", data.path().display()))
            .arg(bin("peer"))
            .args(["--name", name, "--registry", &registry.to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra);
        let status = cmd.status().expect("tmux runs (this bench needs tmux)");
        assert!(status.success(), "tmux could not start {name}");
        Subject {
            name,
            socket,
            _data: data,
        }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.screen().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{}: never showed {needle:?}:\n{}",
                self.name,
                self.screen()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// A sender: registered (so the subject accepts its links), with a link
/// to each subject.
struct Sender {
    _registry: Client,
    links: Vec<Secure>,
    next_id: u64,
}

/// A link from `client` to the peer at `addr`, hello said.
fn link(client: &Client, name: &str, addr: &str) -> Secure {
    let stream = TcpStream::connect(addr).expect("dial the subject");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut link = handshake(stream, &client.identity).expect("link handshake");
    let hello = LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        instance: 1,
    };
    link.write_plain(&codec::encode_frame(&hello).unwrap())
        .expect("hello");
    link
}

/// Sends `count` chats on `link` as fast as it takes them, then reads
/// their acknowledgements; the time from the first write to the last ack.
fn burst(link: &mut Secure, first_id: u64, count: u64, round: usize) -> Duration {
    let start = Instant::now();
    let sent_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut frames = Vec::new();
    for id in first_id..first_id + count {
        let chat = LinkMsg::Chat {
            id,
            text: format!("round {round} message {id}"),
            direct: false,
            sent_at: Some(sent_at),
        };
        frames.extend(codec::encode_frame(&chat).unwrap());
        // A few frames per sealed write, as a sender's loop writes them.
        if frames.len() > 1024 {
            link.write_plain(&frames).expect("send a chat");
            frames.clear();
        }
    }
    if !frames.is_empty() {
        link.write_plain(&frames).expect("send a chat");
    }
    let last = first_id + count - 1;
    loop {
        let frame = link
            .read_frame()
            .expect("read an ack")
            .expect("an ack, not a close");
        if let Ok(LinkMsg::Ack { id }) = codec::decode(&frame) {
            if id == last {
                return start.elapsed();
            }
        }
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to select here.
    let online = setting("UI_BENCH_ONLINE", 1000);
    let messages = setting("UI_BENCH_MESSAGES", 10_000);
    let rounds = setting("UI_BENCH_ROUNDS", 5);
    let per_sender = (messages / SENDERS) as u64;
    let registry = Registry::start(&["--heartbeat", "5s", "--timeout", "120s"]);
    println!("ui bench: {online} peers online, bursts of {messages} messages from {SENDERS} senders, {rounds} rounds");

    let subjects = [
        Subject::start("plain", registry.addr, &["--plain"]),
        Subject::start("ui", registry.addr, &[]),
    ];
    subjects[0].wait_for("registered as plain");
    subjects[1].wait_for("registry: connected");

    // Idle peers, so that the subjects list `online` peers.
    let fillers: Vec<Client> = (0..online.saturating_sub(SENDERS))
        .map(|n| Client::register(registry.addr, &format!("idle{n}"), 9).0)
        .collect();
    let mut senders: Vec<Sender> = (0..SENDERS)
        .map(|n| {
            let name = format!("sender{n}");
            let (client, welcome) = Client::register(registry.addr, &name, 9);
            let FromRegistry::Welcome { peers, .. } = welcome else {
                panic!("{name}: no welcome: {welcome:?}");
            };
            let links = subjects
                .iter()
                .map(|s| {
                    let listed = peers.iter().find(|p| p.name == s.name);
                    let listed = listed.unwrap_or_else(|| panic!("{} is not listed", s.name));
                    link(&client, &name, &listed.addr)
                })
                .collect();
            Sender {
                _registry: client,
                links,
                next_id: 1,
            }
        })
        .collect();
    // Everyone else: the idle ones, the senders and the other subject.
    subjects[1].wait_for(&format!("{} online", fillers.len() + SENDERS + 1));

    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    // Alternating, so that whatever else the machine does falls on both.
    for round in 0..rounds {
        for (which, subject) in subjects.iter().enumerate() {
            let barrier = Arc::new(Barrier::new(SENDERS));
            let took: Vec<Duration> = thread::scope(|scope| {
                let handles: Vec<_> = senders
                    .iter_mut()
                    .map(|sender| {
                        let barrier = barrier.clone();
                        let first = sender.next_id;
                        sender.next_id += per_sender;
                        let link = &mut sender.links[which];
                        scope.spawn(move || {
                            barrier.wait();
                            burst(link, first, per_sender, round)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let slowest = took.into_iter().max().unwrap_or_default();
            times[which].push(slowest);
            // The last message reached the screen too.
            subject.wait_for(&format!(
                "round {round} message {}",
                senders[SENDERS - 1].next_id - 1
            ));
            println!(
                "  round {round}: {:>5} all acked in {:>7.1} ms ({:.0} msg/s)",
                subject.name,
                slowest.as_secs_f64() * 1e3,
                messages as f64 / slowest.as_secs_f64()
            );
        }
    }
    let plain = median(times[0].clone());
    let ui = median(times[1].clone());
    println!(
        "median: --plain {:.1} ms, UI {:.1} ms: the UI takes {:+.1}% ({:.0} vs {:.0} msg/s)",
        plain.as_secs_f64() * 1e3,
        ui.as_secs_f64() * 1e3,
        (ui.as_secs_f64() / plain.as_secs_f64() - 1.0) * 100.0,
        messages as f64 / plain.as_secs_f64(),
        messages as f64 / ui.as_secs_f64(),
    );
    drop(fillers);
}
