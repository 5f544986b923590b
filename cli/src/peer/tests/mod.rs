//! The peer's rules, driven with simulated time and no sockets, in one
//! file per room of the peer (and one for quitting, which spans the outbox
//! and the session, and one for the invariant over random runs).
//!
//! [`Sim`] plays core's driver: it feeds the peer its inputs through the
//! machine contract, answers each dial by its link id (connects it, fails
//! it, or leaves it connecting), decodes every frame the peer sends,
//! records closes (and, like the real loop, reports the peer's own closes
//! back with `handle_closed`), keeps the host outputs, and calls
//! `handle_timeout` whenever `poll_timeout` comes due as simulated time
//! advances. The tests drive the whole [`Peer`], not a room alone: what the
//! user sees comes from the rooms together.

mod directory;
mod inbox;
mod invariant;
mod outbox;
mod quit;
mod relay;
mod reversal;
mod session;
mod store;
mod transfers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::event_loop::CloseReason;
use peerchat_core::machine::{Machine, Role};
use peerchat_core::protocol::{
    Change, ErrorCode, FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION,
};
use peerchat_core::wire::{FrameDecoder, DEFAULT_MAX_FRAME, PREFIX_LEN};

use super::*;
use crate::command::Command;

type Conn = LinkId;

/// The interval and timeout every test registry hands out.
const HEARTBEAT: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(1);
/// Where the test registry says others reach us.
const MY_ADDR: &str = "10.0.0.100:4000";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn registry_addr() -> SocketAddr {
    "10.0.0.1:7000".parse().unwrap()
}

fn config() -> Config {
    Config::new("alice".into(), registry_addr(), 4000, key_of("alice"))
}

/// The key each test peer (and the registry) proves: the peer only compares
/// keys, so any 32 bytes will do.
fn key_of(name: &str) -> PublicKey {
    let mut bytes = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        bytes[i % 32] ^= b;
    }
    bytes[31] = name.len() as u8;
    PublicKey::from_slice(&bytes).unwrap()
}

/// Trust in nothing but `key` for `name`, as if `known_peers` said so.
fn pinning(name: &str, key: PublicKey) -> Trust {
    Trust {
        peers: HashMap::from([(name.into(), key)]),
        ..Trust::default()
    }
}

fn registry_key() -> PublicKey {
    key_of("the registry")
}

/// Each test peer's listening address.
fn addr(name: &str) -> String {
    match name {
        "bob" => "10.0.0.2:4002",
        "carol" => "10.0.0.3:4003",
        "dave" => "10.0.0.4:4004",
        "erin" => "10.0.0.5:4005",
        "alice" => MY_ADDR,
        other => panic!("no address for {other}"),
    }
    .into()
}

fn entries(names: &[&str]) -> Vec<PeerEntry> {
    names
        .iter()
        .map(|n| PeerEntry {
            name: (*n).into(),
            addr: addr(n),
            key: key_of(n),
            reachable: None,
        })
        .collect()
}

fn welcome(peers: &[&str], more: bool) -> FromRegistry {
    welcome_listing(entries(peers), more)
}

fn welcome_listing(peers: Vec<PeerEntry>, more: bool) -> FromRegistry {
    FromRegistry::Welcome {
        version: PROTOCOL_VERSION,
        name: "alice".into(),
        addr: MY_ADDR.into(),
        heartbeat_ms: HEARTBEAT.as_millis() as u64,
        timeout_ms: TIMEOUT.as_millis() as u64,
        probes: false,
        peers,
        more,
    }
}

/// An entry listing `name` at its usual address with another key.
fn entry_keyed(name: &str, key: PublicKey) -> PeerEntry {
    PeerEntry {
        name: name.into(),
        addr: addr(name),
        key,
        reachable: None,
    }
}

fn register() -> ToRegistry {
    ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: "alice".into(),
        port: 4000,
        relay: true,
        dial_back: true,
    }
}

fn joined(name: &str) -> Change {
    Change::Joined {
        name: name.into(),
        addr: addr(name),
        key: key_of(name),
    }
}

fn left(name: &str, reason: &str) -> Change {
    Change::Left {
        name: name.into(),
        reason: reason.into(),
    }
}

/// What every chat made by [`chat`] says it was sent at: the wall-clock
/// time of every command in these tests ([`wall`]).
const WALL_MS: u64 = 1_796_000_000_123;

fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(WALL_MS)
}

fn chat(id: u64, text: &str, direct: bool) -> LinkMsg {
    LinkMsg::Chat {
        id,
        text: text.into(),
        direct,
        sent_at: Some(WALL_MS),
    }
}

fn hello(name: &str, instance: u64) -> LinkMsg {
    LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        instance,
    }
}

fn sent(id: u64, to: &[&str]) -> Event {
    Event::Sent {
        id,
        to: to.iter().map(|t| (*t).to_string()).collect(),
    }
}

fn delivered(id: u64, to: &str) -> Event {
    Event::Delivered { id, to: to.into() }
}

fn undelivered(id: u64, to: &str, reason: &str) -> Event {
    Event::Undelivered {
        id,
        to: to.into(),
        reason: reason.into(),
    }
}

fn queued(id: u64, to: &str, reason: &str) -> Event {
    Event::Queued {
        id,
        to: to.into(),
        reason: reason.into(),
    }
}

fn message(from: &str, text: &str, direct: bool, id: u64) -> Event {
    Event::Message {
        from: from.into(),
        text: text.into(),
        direct,
        id,
        sent_at: Some(WALL_MS),
    }
}

/// The whole frames of one send, each with its length prefix: a send
/// may carry several (a link's messages released together). Each is a
/// slice of the send, so that a buffer shared between links stays
/// visibly shared.
fn split_frames(mut frames: Bytes) -> Vec<Bytes> {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
    dec.push(&frames);
    let mut split = Vec::new();
    while let Some(body) = dec.next_frame().expect("the peer sends valid frames") {
        split.push(frames.split_to(PREFIX_LEN + body.len()));
    }
    assert_eq!(dec.buffered(), 0, "a send ends in a whole frame");
    split
}

/// The body of a full frame, checking that it is exactly one frame.
fn body_of(frame: &[u8]) -> Bytes {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
    dec.push(frame);
    let body = dec
        .next_frame()
        .expect("the peer sends valid frames")
        .expect("the peer sends whole frames");
    assert_eq!(dec.buffered(), 0, "one frame");
    body
}

/// Who a dial is for, as the simulated loop tells by its address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dial {
    Registry,
    /// A link to this peer (folded name).
    Link(String),
}

/// How the simulated loop answers a dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialMode {
    /// Connected at once, the handshake done.
    Answer,
    /// Failed at once, as the driver reports a connect that fails.
    Fail,
    /// Still connecting until the test calls [`Sim::connect_pending`].
    Pending,
}

struct Sim {
    peer: Peer,
    /// Where the peer dials the registry, and the others of its cluster.
    registry: SocketAddr,
    fallbacks: Vec<SocketAddr>,
    now: Instant,
    next_accepted: u64,
    registry_dials: DialMode,
    link_dials: DialMode,
    /// The simulated registry answers each heartbeat at once.
    registry_answers: bool,
    /// Every dial the peer asked for, in order.
    dials: Vec<(Instant, SocketAddr, Dial)>,
    pending: Vec<(Conn, Dial)>,
    /// The dialed links that connected, in order.
    dialed: Vec<(Conn, Dial)>,
    /// Every frame sent, per link, with its time.
    frames: HashMap<Conn, Vec<(Instant, Bytes)>>,
    /// How many of each link's frames the test has taken.
    read: HashMap<Conn, usize>,
    /// Closes the peer asked for, with the reason.
    closes: HashMap<Conn, String>,
    /// Links closed by either side.
    gone: HashSet<Conn>,
    events: Vec<Event>,
    events_read: usize,
    exits: Vec<i32>,
    /// Keys proved instead of the right ones, per dialed peer (folded
    /// name; "" for the registry).
    imposters: HashMap<String, PublicKey>,
    pins: Vec<Pin>,
    /// Every record the peer asked to write, in order, and the batches
    /// not committed yet.
    records: Vec<Record>,
    uncommitted: Vec<u64>,
    /// Batches are committed as soon as they come, unless this is set.
    hold_commits: bool,
    queries: Vec<Query>,
    /// What the peer asked of the disk, not taken by the test yet.
    disk: Vec<DiskOp>,
    /// Links the peer turned into tunnels, in order.
    tunnels: Vec<(Conn, Role)>,
}

impl Sim {
    fn with(config: Config, trust: Trust) -> Self {
        Sim::resuming(config, trust, Saved::default())
    }

    /// A peer that starts from what a store kept.
    fn resuming(config: Config, trust: Trust, saved: Saved) -> Self {
        let now = Instant::now();
        Sim {
            registry: config.registry,
            fallbacks: config.fallbacks.clone(),
            peer: Peer::new(config, trust, saved, 7, now, wall()),
            now,
            next_accepted: 0,
            registry_dials: DialMode::Answer,
            link_dials: DialMode::Answer,
            registry_answers: true,
            dials: Vec::new(),
            pending: Vec::new(),
            dialed: Vec::new(),
            frames: HashMap::new(),
            read: HashMap::new(),
            closes: HashMap::new(),
            gone: HashSet::new(),
            events: Vec::new(),
            events_read: 0,
            exits: Vec::new(),
            imposters: HashMap::new(),
            pins: Vec::new(),
            records: Vec::new(),
            uncommitted: Vec::new(),
            hold_commits: false,
            queries: Vec::new(),
            disk: Vec::new(),
            tunnels: Vec::new(),
        }
    }

    /// Commits every batch written so far, as a store thread would.
    fn commit(&mut self) {
        if let Some(batch) = self.uncommitted.drain(..).max() {
            self.peer.committed(batch, self.now);
        }
        self.apply();
    }

    fn new() -> Self {
        Sim::trusting(Trust::default())
    }

    fn trusting(trust: Trust) -> Self {
        Sim::with(config(), trust)
    }

    /// Registered with `peers` online, everything so far taken.
    fn online(peers: &[&str]) -> Self {
        let mut sim = Sim::new();
        sim.start();
        sim.registry_says(&welcome(peers, false));
        assert!(sim.peer.is_online());
        sim.take_all();
        sim
    }

    /// Who a dial to `addr` is for: the registry, or whoever the directory
    /// lists there.
    fn dial_for(&self, addr: SocketAddr) -> Dial {
        if addr == self.registry || self.fallbacks.contains(&addr) {
            return Dial::Registry;
        }
        let listed = self
            .peer
            .peers()
            .into_iter()
            .find(|p| p.addr == addr.to_string());
        match listed {
            Some(entry) => Dial::Link(fold_name(&entry.name)),
            None => panic!("a dial to {addr}, where nobody is listed"),
        }
    }

    /// Connects, and completes the handshake with the key the other side
    /// proves: the right one unless `imposters` names another.
    fn answer(&mut self, link: Conn, dial: Dial) {
        self.dialed.push((link, dial.clone()));
        let key = match &dial {
            Dial::Registry => self.imposters.get("").copied().unwrap_or_else(registry_key),
            Dial::Link(folded) => self
                .imposters
                .get(folded)
                .copied()
                .unwrap_or_else(|| key_of(folded)),
        };
        self.peer.handle_connected(link, key, self.now);
    }

    /// Moves the peer's outputs into the record until it has none left.
    fn apply(&mut self) {
        loop {
            self.peer.end_turn(self.now);
            let outputs: Vec<_> = std::iter::from_fn(|| self.peer.poll_output()).collect();
            if outputs.is_empty() {
                break;
            }
            let mut closed_now = Vec::new();
            let mut answer_heartbeat = None;
            for output in outputs {
                match output {
                    Output::Dial { link, addr } => {
                        let dial = self.dial_for(addr);
                        self.dials.push((self.now, addr, dial.clone()));
                        let mode = match dial {
                            Dial::Registry => self.registry_dials,
                            Dial::Link(_) => self.link_dials,
                        };
                        match mode {
                            DialMode::Answer => self.answer(link, dial),
                            DialMode::Fail => {
                                let refused =
                                    CloseReason::ConnectFailed("connection refused".into());
                                self.peer.handle_closed(link, &refused, self.now);
                            }
                            DialMode::Pending => self.pending.push((link, dial)),
                        }
                    }
                    Output::Send(c, frames) => {
                        for frame in split_frames(frames) {
                            let body = body_of(&frame);
                            if self.registry_answers
                                && self.dialed.contains(&(c, Dial::Registry))
                                && codec::decode::<ToRegistry>(&body)
                                    == Ok(ToRegistry::Heartbeat {})
                            {
                                answer_heartbeat = Some(c);
                            }
                            self.frames.entry(c).or_default().push((self.now, frame));
                        }
                    }
                    Output::Close(c, reason) => {
                        if self.gone.insert(c) {
                            self.closes.insert(c, reason.clone());
                            closed_now.push((c, reason));
                        }
                    }
                    Output::SetMaxFrame(c, max) => panic!("the peer set {max} on {c}"),
                    Output::Tunnel { link, role } => self.tunnels.push((link, role)),
                    Output::Reading(c, _) | Output::WatchDrain(c) => {
                        panic!("the peer throttled {c}")
                    }
                    Output::Host(HostOutput::Show(event)) => self.events.push(event),
                    Output::Host(HostOutput::Pin(pin)) => self.pins.push(pin),
                    Output::Host(HostOutput::Exit(code)) => self.exits.push(code),
                    Output::Host(HostOutput::Record(record)) => self.records.push(record),
                    Output::Host(HostOutput::Batch(batch)) => {
                        if self.hold_commits {
                            self.uncommitted.push(batch);
                        } else {
                            self.peer.committed(batch, self.now);
                        }
                    }
                    Output::Host(HostOutput::Query(query)) => self.queries.push(query),
                    Output::Host(HostOutput::Disk(op)) => self.disk.push(op),
                }
            }
            if let Some(c) = answer_heartbeat.filter(|c| !self.gone.contains(c)) {
                let body = codec::encode(&FromRegistry::Heartbeat {}).unwrap();
                self.peer.handle_frame(c, &body, self.now);
            }
            // The event loop tells the machine of every close, its own too.
            for (c, reason) in closed_now {
                self.peer
                    .handle_closed(c, &CloseReason::Local(reason), self.now);
            }
        }
        if let Some(at) = self.peer.poll_timeout() {
            assert!(at >= self.now, "a timer armed in the past, for {at:?}");
        }
    }

    /// The dials left connecting connect now.
    fn connect_pending(&mut self) {
        for (link, dial) in std::mem::take(&mut self.pending) {
            self.answer(link, dial);
        }
        self.apply();
    }

    /// `start`, with the registry dial answered; returns its link.
    fn start(&mut self) -> Conn {
        self.peer.start(self.now);
        self.apply();
        self.reg_conn()
    }

    /// The latest registry connection of the session (not a relay's).
    fn reg_conn(&self) -> Conn {
        self.dialed
            .iter()
            .rev()
            .find(|(c, d)| *d == Dial::Registry && !self.is_relay_conn(*c))
            .map(|(c, _)| *c)
            .expect("a registry connection")
    }

    /// A connection to the registry whose first frame opens or joins a relay.
    fn is_relay_conn(&self, c: Conn) -> bool {
        let first = self.frames.get(&c).and_then(|f| f.first());
        first.is_some_and(|(_, frame)| {
            matches!(
                codec::decode::<ToRegistry>(&body_of(frame)),
                Ok(ToRegistry::RelayOpen { .. } | ToRegistry::RelayJoin { .. })
            )
        })
    }

    /// The latest relay connection that connected.
    fn relay_conn(&self) -> Conn {
        self.dialed
            .iter()
            .rev()
            .find(|(c, _)| self.is_relay_conn(*c))
            .map(|(c, _)| *c)
            .expect("a relay connection")
    }

    fn registry_dial_count(&self) -> usize {
        self.dials
            .iter()
            .filter(|(_, _, d)| *d == Dial::Registry)
            .count()
    }

    fn link_dials_to(&self, folded: &str) -> Vec<SocketAddr> {
        self.dials
            .iter()
            .filter(|(_, _, d)| *d == Dial::Link(folded.into()))
            .map(|(_, a, _)| *a)
            .collect()
    }

    /// The latest link dialed to `folded` that connected.
    fn link_conn(&self, folded: &str) -> Conn {
        self.dialed
            .iter()
            .rev()
            .find(|(_, d)| *d == Dial::Link(folded.into()))
            .map(|(c, _)| *c)
            .unwrap_or_else(|| panic!("no link to {folded}"))
    }

    fn registry_says(&mut self, msg: &FromRegistry) {
        let c = self.reg_conn();
        assert!(!self.gone.contains(&c), "registry connection {c} is closed");
        let body = codec::encode(msg).unwrap();
        self.peer.handle_frame(c, &body, self.now);
        self.apply();
    }

    fn update(&mut self, changes: Vec<Change>) {
        self.registry_says(&FromRegistry::Update { changes });
    }

    fn command(&mut self, command: Command) {
        self.peer.command(command, self.now, wall());
        self.apply();
    }

    fn say(&mut self, text: &str) {
        self.command(Command::Broadcast(text.into()));
    }

    fn msg(&mut self, to: &str, text: &str) {
        self.command(Command::Direct {
            to: to.into(),
            text: text.into(),
        });
    }

    /// An accepted link from someone whose key no test peer has.
    fn accept(&mut self) -> Conn {
        self.accept_as(key_of("a stranger"))
    }

    fn accept_as(&mut self, key: PublicKey) -> Conn {
        let c = LinkId::Accepted(self.next_accepted);
        self.next_accepted += 1;
        let from = "10.0.0.9:5000".parse().unwrap();
        self.peer.handle_accepted(c, from, key, self.now);
        self.apply();
        c
    }

    fn link_in(&mut self, c: Conn, msg: &LinkMsg) {
        let body = codec::encode(msg).unwrap();
        self.raw_in(c, &body);
    }

    /// Several frames on `c` read in one turn.
    fn links_in(&mut self, c: Conn, msgs: &[LinkMsg]) {
        for msg in msgs {
            assert!(!self.gone.contains(&c), "{c} is closed");
            let body = codec::encode(msg).unwrap();
            self.peer.handle_frame(c, &body, self.now);
        }
        self.apply();
    }

    fn raw_in(&mut self, c: Conn, body: &[u8]) {
        assert!(!self.gone.contains(&c), "{c} is closed");
        self.peer.handle_frame(c, body, self.now);
        self.apply();
    }

    /// The network broke `c`, with this error.
    fn remote_close(&mut self, c: Conn, error: &str) {
        assert!(self.gone.insert(c), "{c} was already closed");
        let reason = CloseReason::Io(error.into());
        self.peer.handle_closed(c, &reason, self.now);
        self.apply();
    }

    /// Advances simulated time, firing due timers in order.
    fn advance(&mut self, by: Duration) {
        self.advance_to(self.now + by);
    }

    fn advance_to(&mut self, until: Instant) {
        while let Some(at) = self.peer.poll_timeout().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.peer.handle_timeout(self.now);
            self.apply();
        }
        self.now = self.now.max(until);
    }

    /// When the armed timer `wanted` picks fires, if one is armed.
    fn armed(&self, wanted: impl Fn(&Timer) -> bool) -> Option<Instant> {
        let mut armed = self.peer.actions.timers.iter();
        armed.find(|(_, t)| wanted(t)).map(|(key, _)| key.at)
    }

    /// When the registry retry is armed for.
    fn retry_at(&self) -> Option<Instant> {
        self.armed(|t| *t == Timer::RegistryRetry)
    }

    /// When the retry of a link to `folded` is armed for.
    fn link_retry_at(&self, folded: &str) -> Option<Instant> {
        self.armed(|t| matches!(t, Timer::LinkRetry(f) if f == folded))
    }

    fn take_events(&mut self) -> Vec<Event> {
        let out = self.events[self.events_read..].to_vec();
        self.events_read = self.events.len();
        out
    }

    fn take_timed(&mut self, c: Conn) -> Vec<(Instant, Bytes)> {
        let all = self.frames.get(&c).map(Vec::as_slice).unwrap_or_default();
        let read = self.read.entry(c).or_default();
        let out = all[*read..].to_vec();
        *read = all.len();
        out
    }

    /// The full frames sent on `c` since last taken.
    fn take_frames(&mut self, c: Conn) -> Vec<Bytes> {
        self.take_timed(c).into_iter().map(|(_, f)| f).collect()
    }

    fn take_reg_timed(&mut self, c: Conn) -> Vec<(Instant, ToRegistry)> {
        self.take_timed(c)
            .into_iter()
            .map(|(t, f)| (t, codec::decode(&body_of(&f)).unwrap()))
            .collect()
    }

    fn take_reg(&mut self, c: Conn) -> Vec<ToRegistry> {
        self.take_reg_timed(c).into_iter().map(|(_, m)| m).collect()
    }

    fn take_link(&mut self, c: Conn) -> Vec<LinkMsg> {
        self.take_frames(c)
            .iter()
            .map(|f| codec::decode(&body_of(f)).unwrap())
            .collect()
    }

    fn take_all(&mut self) {
        self.take_events();
        let conns: Vec<Conn> = self.frames.keys().copied().collect();
        for c in conns {
            self.take_frames(c);
        }
    }

    fn my_hello(&self) -> LinkMsg {
        hello("alice", self.peer.instance)
    }

    /// An accepted link that said hello as `name`.
    fn inbound(&mut self, name: &str, instance: u64) -> Conn {
        let c = self.accept_as(key_of(name));
        self.link_in(c, &hello(name, instance));
        c
    }

    fn error_code_on(&mut self, c: Conn) -> String {
        match self.take_link(c).as_slice() {
            [LinkMsg::Error { code, .. }] => {
                assert!(
                    self.closes.contains_key(&c),
                    "an error frame is followed by a close"
                );
                code.clone()
            }
            other => panic!("expected one error frame, got {other:?}"),
        }
    }
}

fn is_registry_lost(e: &Event) -> bool {
    matches!(e, Event::RegistryLost { .. })
}

fn errors_with_code(events: &[Event], wanted: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Error { code, .. } if code == wanted))
        .count()
}

/// The one error event among `events`, with its code.
fn the_error(events: &[Event], wanted: &str) -> String {
    let messages: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Error { code, message } if code == wanted => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 1, "{events:?}");
    messages[0].clone()
}
