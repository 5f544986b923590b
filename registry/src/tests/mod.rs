//! The registry's rules, driven with simulated time and no sockets: the
//! harness ([`Sim`]) here, the rules by concern in the modules below.

mod cluster;
mod directory;
mod liveness;
mod names;
mod probe;
mod registration;
mod relay;
mod reversal;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{Change, FromRegistry, PeerEntry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::wire::{FrameDecoder, FrameError};
use proptest::prelude::*;

use super::*;

type Conn = u32;

/// A registry plus everything its actions did: the frames each connection
/// received (decoded), the closes and the frame limits it set.
struct Sim {
    reg: Registry<Conn>,
    now: Instant,
    inbox: HashMap<Conn, Vec<FromRegistry>>,
    closed: HashMap<Conn, String>,
    max_frame: HashMap<Conn, usize>,
    /// Frames passed through relays, per receiving end.
    relayed: HashMap<Conn, Vec<Vec<u8>>>,
    /// Whether each throttled connection is read, as last set.
    reading: HashMap<Conn, bool>,
    /// Drains asked for, in order.
    watching: Vec<Conn>,
    /// The registry's dials (its probes), in order.
    dials: Vec<(Conn, SocketAddr)>,
}

fn config() -> Config {
    Config {
        heartbeat: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        max_peers: 100,
        ..Config::default()
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

impl Sim {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        Sim {
            reg: Registry::new(config, now),
            now,
            inbox: HashMap::new(),
            closed: HashMap::new(),
            max_frame: HashMap::new(),
            relayed: HashMap::new(),
            reading: HashMap::new(),
            watching: Vec::new(),
            dials: Vec::new(),
        }
    }

    fn apply(&mut self) {
        while let Some(action) = self.reg.poll_output() {
            match action {
                Action::Send(c, frame) => {
                    assert!(!self.closed.contains_key(&c), "send to closed {c}");
                    let mut dec = FrameDecoder::new(peerchat_core::wire::DEFAULT_MAX_FRAME);
                    dec.push(&frame);
                    let body = dec.next_frame().unwrap().unwrap();
                    assert_eq!(dec.buffered(), 0, "one frame per send");
                    match codec::decode::<FromRegistry>(&body) {
                        Ok(msg) => self.inbox.entry(c).or_default().push(msg),
                        // Relayed bytes, not a message.
                        Err(_) => self.relayed.entry(c).or_default().push(body.to_vec()),
                    }
                }
                Action::Close(c, reason) => {
                    self.closed.entry(c).or_insert(reason);
                }
                Action::SetMaxFrame(c, n) => {
                    self.max_frame.insert(c, n);
                }
                Action::Reading(c, reading) => {
                    self.reading.insert(c, reading);
                }
                Action::WatchDrain(c) => self.watching.push(c),
                Action::Dial { link, addr } => self.dials.push((link, addr)),
                Action::Tunnel { .. } | Action::Host(_) => {
                    unreachable!("the registry never tunnels")
                }
            }
        }
    }

    /// One loop turn's end.
    fn flush(&mut self) {
        self.reg.send_batched(self.now);
        self.apply();
    }

    /// A connection whose handshake proved a key of its own.
    fn accept(&mut self, c: Conn, ip: IpAddr) {
        self.accept_as(c, ip, key(&format!("conn {c}")));
    }

    fn accept_as(&mut self, c: Conn, ip: IpAddr, key: PublicKey) {
        self.reg
            .on_accept(c, SocketAddr::new(ip, 50_000), key, self.now);
        self.apply();
    }

    fn send(&mut self, c: Conn, msg: &ToRegistry) {
        let body = codec::encode(msg).unwrap();
        self.send_raw(c, &body);
    }

    fn send_raw(&mut self, c: Conn, body: &[u8]) {
        self.reg.on_frame(c, body, self.now);
        self.apply();
    }

    /// Registers with the key of the name's owner ([`owner`]).
    fn register(&mut self, c: Conn, name: &str, port: i64) {
        self.register_as(c, name, port, owner(name));
    }

    fn register_as(&mut self, c: Conn, name: &str, port: i64, key: PublicKey) {
        self.accept_as(c, ip(c as u8), key);
        self.send(c, &register(name, port));
        self.flush();
    }

    /// Registers as a peer that takes relay invitations (and so hears the
    /// probes' results), with the key of the name's owner.
    fn register_relaying(&mut self, c: Conn, name: &str, port: i64) {
        self.accept_as(c, ip(c as u8), owner(name));
        self.send(
            c,
            &ToRegistry::Register {
                version: PROTOCOL_VERSION,
                name: name.into(),
                port,
                relay: true,
                dial_back: true,
            },
        );
        self.flush();
    }

    /// Advances simulated time, firing timers in order.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.reg.poll_timeout() {
            if at > until {
                break;
            }
            self.now = self.now.max(at);
            self.reg.handle_timeout(self.now);
            self.apply();
            self.flush();
        }
        self.now = until;
    }

    fn take(&mut self, c: Conn) -> Vec<FromRegistry> {
        self.inbox.remove(&c).unwrap_or_default()
    }

    fn error_code(&mut self, c: Conn) -> String {
        let msgs = self.take(c);
        match msgs.as_slice() {
            [FromRegistry::Error { code, .. }] => {
                assert!(
                    self.closed.contains_key(&c),
                    "an error is followed by a close"
                );
                code.clone()
            }
            other => panic!("expected one error, got {other:?}"),
        }
    }
}

fn welcome_peers(msg: &FromRegistry) -> Vec<PeerEntry> {
    match msg {
        FromRegistry::Welcome { peers, .. } => peers.clone(),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn entry(name: &str, addr: &str) -> PeerEntry {
    PeerEntry {
        name: name.into(),
        addr: addr.into(),
        key: owner(name),
        reachable: None,
    }
}

fn register(name: &str, port: i64) -> ToRegistry {
    ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: name.into(),
        port,
        relay: false,
        dial_back: false,
    }
}

/// A key made from a label: the registry only compares keys, so any 32
/// bytes will do.
fn key(label: &str) -> PublicKey {
    let mut bytes = [0u8; 32];
    for (i, b) in label.bytes().enumerate() {
        bytes[i % 32] ^= b.rotate_left(i as u32 / 32);
    }
    bytes[31] ^= label.len() as u8;
    PublicKey::from_slice(&bytes).unwrap()
}

/// The key that owns a name (as registered, trimmed) in these tests.
fn owner(name: &str) -> PublicKey {
    key(&format!("owner of {}", name.trim()))
}
