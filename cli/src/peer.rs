//! The peer's logic as a sans-IO state machine: the registry session (with
//! reconnects), the directory of who is online, the direct links, and the
//! outbox that turns every sent message into exactly one `delivered` or
//! `undelivered` per target.
//!
//! Every connection arrives with the static key its Noise handshake proved.
//! The registry's key must match the one pinned for it; a link's key must
//! match the key the directory lists for the peer's name, and the key
//! pinned for that name in `known_peers` (trust on first use), or the link
//! is refused.
//!
//! Inputs are commands, connection events and timers, each with `now`;
//! outputs are [`Action`]s. Nothing here touches a socket, a terminal or the
//! clock, so tests run it with simulated time.
//!
//! Longer than the project's 800-line aim, for now: the session, directory,
//! outbox and inbox it holds become modules of their own behind a thin
//! facade, with the machine contract shared with the registry. That split is
//! one step of the planned architecture work (transport, machine contract,
//! peer rooms, testkit); done here alone, it would be done twice.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{
    self, decode_first, fold_name, normalize_name, Change, ErrorCode, FirstFrameError,
    FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION,
};
use peerchat_core::wire::{FrameError, DEFAULT_MAX_FRAME, PREFIX_LEN};
use serde::Serialize;

use crate::command::Command;
use crate::trust;

/// Chats held from a link whose sender the directory does not list yet:
/// per link, in messages and in bytes of text, and in bytes over all such
/// links, so that unregistered senders cannot fill our memory.
const MAX_HELD: usize = 1024;
const MAX_HELD_BYTES: usize = 256 * 1024;
const MAX_HELD_BYTES_TOTAL: usize = 4 * 1024 * 1024;

/// The error event (and undelivered reason) when the directory lists a name
/// we had not pinned with another key than before.
const KEY_CHANGED: &str = "key_changed";

/// Distinct (name, key) pairs whose refused links are reported.
const MAX_KEY_WARNINGS: usize = 256;

/// The heartbeat and timeout a registry may set, in milliseconds; values
/// outside are clamped.
const HEARTBEAT_MS: (u64, u64) = (10, 3_600_000);
const TIMEOUT_MS_MAX: u64 = 86_400_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub registry: SocketAddr,
    /// The port this peer accepts links on, declared to the registry.
    pub listen_port: u16,
    /// Reconnect delays start here and double up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long `/quit` waits for outstanding acks.
    pub quit_grace: Duration,
    /// Time a registry connection has to produce a welcome.
    pub register_timeout: Duration,
    /// Time an accepted link has to say hello and be found in the directory.
    pub hello_timeout: Duration,
    /// After re-registering, how long a peer the new snapshot lacks is kept
    /// (it is probably re-registering too) before it counts as gone.
    pub stale_grace: Duration,
    /// A message not acknowledged by then is reported undelivered.
    pub send_timeout: Duration,
    /// Our own static key (the public half).
    pub key: PublicKey,
    /// What the registry's key is checked against.
    pub registry_trust: RegistryTrust,
    /// Keys pinned per peer (folded name), from `known_peers`.
    pub pins: HashMap<String, PublicKey>,
    /// The registry as named on the command line: the subject of its pin.
    pub registry_name: String,
    /// Where pins are kept, as shown in hints on what to change.
    pub known_peers: String,
}

impl Config {
    pub fn new(name: String, registry: SocketAddr, listen_port: u16, key: PublicKey) -> Self {
        Config {
            key,
            registry_trust: RegistryTrust::FirstUse,
            pins: HashMap::new(),
            registry_name: registry.to_string(),
            known_peers: "known_peers".into(),
            name,
            registry,
            listen_port,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            quit_grace: Duration::from_secs(2),
            register_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            stale_grace: Duration::from_secs(15),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the registry's expected key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryTrust {
    /// Nothing known: the first key proved is pinned.
    FirstUse,
    /// Given on the command line but not in `known_peers` yet: required, and
    /// pinned once the registry proves it.
    Given(PublicKey),
    /// Already in `known_peers`: required.
    Pinned(PublicKey),
}

/// What the user sees. The `--json` front end prints these as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Registered {
        name: String,
        addr: String,
        /// Our own key: its fingerprint.
        key: PublicKey,
        peers: Vec<PeerEntry>,
    },
    Joined {
        name: String,
        addr: String,
        key: PublicKey,
    },
    Left {
        name: String,
        reason: String,
    },
    /// A peer re-registered from another address.
    Moved {
        name: String,
        addr: String,
    },
    Peers {
        peers: Vec<PeerEntry>,
    },
    Sent {
        id: u64,
        to: Vec<String>,
    },
    Message {
        from: String,
        text: String,
        direct: bool,
        id: u64,
        /// The sender's clock when it sent the message (Unix milliseconds),
        /// if it said.
        #[serde(skip_serializing_if = "Option::is_none")]
        sent_at: Option<u64>,
    },
    Delivered {
        id: u64,
        to: String,
    },
    Undelivered {
        id: u64,
        to: String,
        reason: String,
    },
    RegistryLost {
        error: String,
        retry_in_ms: u64,
    },
    /// Answer to `/whois`: the key the directory lists for a peer, and
    /// whether it is the one pinned in `known_peers`.
    Whois {
        name: String,
        key: PublicKey,
        /// True when `known_peers` holds this key for the name, and for
        /// our own name.
        pinned: bool,
        /// The name is ours.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        you: bool,
        /// The key `known_peers` pins for the name, when it is another one.
        #[serde(skip_serializing_if = "Option::is_none")]
        pinned_key: Option<PublicKey>,
    },
    /// Answer to `/status`: the registry session as it stands.
    Status {
        /// `registered`, `connecting`, `lost` (it was reached, then lost)
        /// or `unreachable` (never reached since start).
        registry: String,
        /// Why it is lost or unreachable.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// When the next attempt starts.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
        /// Peers online (as far as we know).
        peers: usize,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Who a dial is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    Registry,
    /// A link to this peer (folded name).
    Link(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer<C> {
    RegistryRetry(u64),
    RegisterDeadline(u64),
    Heartbeat(u64),
    LinkRetry(String),
    HelloDeadline(C),
    /// The oldest unacknowledged message to `target` may be overdue. One
    /// such timer per link at a time, for the front of its queue.
    SendDeadline {
        target: String,
        at: Instant,
    },
    StaleCheck,
    QuitDeadline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<C> {
    /// Start a connection; answer with [`Peer::dial_started`] or
    /// [`Peer::dial_failed`].
    Dial(SocketAddr, Dial),
    Send(C, Bytes),
    Close(C, String),
    Arm(Instant, Timer<C>),
    Emit(Event),
    /// Remember this key for good (append it to `known_peers`).
    Pin(Pin),
    /// Flush and end the process with this status.
    Exit(i32),
}

/// A key seen for the first time, to be trusted from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Peer { name: String, key: PublicKey },
    Registry(PublicKey),
}

enum Session<C> {
    /// Not connected: at start, or waiting for the retry timer after the
    /// registry was lost (why, and when the next attempt starts).
    Idle {
        lost: Option<(String, Instant)>,
    },
    /// Connecting or registered-and-waiting for the (whole) welcome.
    Registering {
        conn: C,
        snapshot: Vec<PeerEntry>,
    },
    Online {
        conn: C,
        last_heard: Instant,
    },
    /// Quitting: never reconnect.
    Closed,
}

/// A chat message as it arrived on a link.
struct Chat {
    id: u64,
    text: String,
    direct: bool,
    sent_at: Option<u64>,
}

struct Known {
    name: String,
    addr: SocketAddr,
    key: PublicKey,
    /// The key differs from the one pinned for this name: no links.
    mismatch: bool,
    /// Missing from the snapshot of our latest registration.
    stale_since: Option<Instant>,
}

struct Outgoing {
    id: u64,
    frame: Bytes,
    /// Undelivered (`no_ack`) if not acknowledged by then.
    deadline: Instant,
}

struct OutLink<C> {
    conn: Option<C>,
    /// A dial was asked for and not answered yet.
    dialing: bool,
    backoff: Duration,
    retry_armed: bool,
    queue: VecDeque<Outgoing>,
    /// When the armed send-deadline timer fires, if one is armed.
    deadline_armed: Option<Instant>,
}

impl<C> Default for OutLink<C> {
    fn default() -> Self {
        OutLink {
            conn: None,
            dialing: false,
            backoff: Duration::ZERO,
            retry_armed: false,
            queue: VecDeque::new(),
            deadline_armed: None,
        }
    }
}

enum Role {
    Registry,
    /// Our link to this peer (folded name).
    Out(String),
    In(InLink),
}

enum InLink {
    /// Proved `key`; its hello is due.
    AwaitHello {
        key: PublicKey,
    },
    /// Said hello as a peer the directory does not list (yet).
    Pending {
        folded: String,
        key: PublicKey,
        instance: u64,
        held: Vec<Chat>,
    },
    Verified {
        folded: String,
        instance: u64,
    },
}

pub struct Peer<C> {
    config: Config,
    my_folded: String,
    rng: u64,
    instance: u64,
    actions: Vec<Action<C>>,
    session: Session<C>,
    /// Bumped per registry connection, so timers of an old one do nothing.
    epoch: u64,
    /// Our address as the registry observed it.
    my_addr: String,
    backoff: Duration,
    heartbeat: Duration,
    timeout: Duration,
    dir: BTreeMap<String, Known>,
    links: HashMap<String, OutLink<C>>,
    conns: HashMap<C, Role>,
    next_id: u64,
    /// Per sender (folded): its instance and the highest id delivered.
    seen: HashMap<String, (u64, u64)>,
    quitting: bool,
    exited: bool,
    /// The first registration attempt has ended, one way or the other.
    first_attempt_over: bool,
    /// A welcome has come at least once: the registry is "lost", not
    /// "unreachable", when it goes.
    ever_registered: bool,
    /// The (folded name, key) pairs whose refused links were reported.
    key_warnings: HashSet<(String, PublicKey)>,
}

impl<C: Copy + Eq + Hash + Debug> Peer<C> {
    /// `seed` drives the reconnect jitter and the instance id.
    pub fn new(config: Config, seed: u64) -> Self {
        let my_folded = fold_name(config.name.trim());
        let mut rng = seed | 1;
        let instance = xorshift(&mut rng);
        Peer {
            backoff: config.backoff_min,
            config,
            my_folded,
            rng,
            instance,
            actions: Vec::new(),
            session: Session::Idle { lost: None },
            epoch: 0,
            my_addr: String::new(),
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            dir: BTreeMap::new(),
            links: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            seen: HashMap::new(),
            quitting: false,
            first_attempt_over: false,
            ever_registered: false,
            key_warnings: HashSet::new(),
            exited: false,
        }
    }

    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action<C>> {
        self.actions.drain(..)
    }

    fn emit(&mut self, event: Event) {
        self.actions.push(Action::Emit(event));
    }

    /// A `key_mismatch` about a link from `folded` proving `key`: said
    /// once per name and key, however often that peer retries. Someone
    /// making key after key for a pinned name is told of up to
    /// [`MAX_KEY_WARNINGS`] times, then only logged.
    fn warn_key(&mut self, folded: &str, key: PublicKey, message: String) {
        let room = self.key_warnings.len() < MAX_KEY_WARNINGS;
        if room && self.key_warnings.insert((folded.to_string(), key)) {
            self.error(ErrorCode::KeyMismatch.as_str(), message);
        } else {
            tracing::debug!("{message}");
        }
    }

    fn error(&mut self, code: &str, message: String) {
        self.emit(Event::Error {
            code: code.into(),
            message,
        });
    }

    /// The directory, sorted by name.
    pub fn peers(&self) -> Vec<PeerEntry> {
        self.dir
            .values()
            .map(|k| PeerEntry {
                name: k.name.clone(),
                addr: k.addr.to_string(),
                key: k.key,
            })
            .collect()
    }

    /// Our name as the registry accepted it (trimmed).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn is_online(&self) -> bool {
        matches!(self.session, Session::Online { .. })
    }

    /// Whether the user's lines should be taken now. Lines wait for the
    /// first registration attempt to end (a welcome, or the registry found
    /// missing), so that a script's first line reaches the peers already
    /// online instead of an empty directory.
    pub fn takes_input(&self) -> bool {
        self.first_attempt_over || self.quitting
    }

    /// Begins: connect to the registry.
    pub fn start(&mut self) {
        self.dial_registry();
    }

    fn dial_registry(&mut self) {
        self.actions
            .push(Action::Dial(self.config.registry, Dial::Registry));
    }

    pub fn dial_started(&mut self, dial: Dial, conn: C, now: Instant) {
        match dial {
            Dial::Registry => {
                if self.quitting {
                    self.actions.push(Action::Close(conn, "quitting".into()));
                    return;
                }
                self.epoch += 1;
                self.conns.insert(conn, Role::Registry);
                self.session = Session::Registering {
                    conn,
                    snapshot: Vec::new(),
                };
                // The deadline covers the connect and the handshake too.
                self.actions.push(Action::Arm(
                    now + self.config.register_timeout,
                    Timer::RegisterDeadline(self.epoch),
                ));
            }
            Dial::Link(target) => {
                let Some(link) = self.links.get_mut(&target).filter(|l| l.conn.is_none()) else {
                    self.actions
                        .push(Action::Close(conn, "no longer needed".into()));
                    return;
                };
                link.dialing = false;
                link.conn = Some(conn);
                self.conns.insert(conn, Role::Out(target));
            }
        }
    }

    /// A dialed connection is up and proved `key`: check it, then speak.
    pub fn on_connected(&mut self, conn: C, key: PublicKey, now: Instant) {
        match self.conns.get(&conn) {
            Some(Role::Registry) => self.registry_connected(conn, key),
            Some(Role::Out(target)) => {
                let target = target.clone();
                self.link_connected(conn, target, key, now);
            }
            Some(Role::In(_)) | None => {}
        }
    }

    fn registry_connected(&mut self, conn: C, key: PublicKey) {
        match self.config.registry_trust {
            RegistryTrust::Given(expected) | RegistryTrust::Pinned(expected) if expected != key => {
                let fix = match self.config.registry_trust {
                    RegistryTrust::Given(_) => format!(
                        "--registry-key gave {expected}; if the registry's key really changed (ask its operator), start again with --registry-key {key}"
                    ),
                    _ => format!(
                        "{expected} is pinned for it; if the registry's key really changed (ask its operator), delete the line \"{}\" from {} and start again",
                        pin_text("registry", &self.config.registry_name, &expected),
                        self.config.known_peers
                    ),
                };
                let message = format!(
                    "the registry at {} proved key {key}: not the registry you trust, so this peer stops. {fix}",
                    self.config.registry
                );
                self.error(ErrorCode::KeyMismatch.as_str(), message.clone());
                self.conns.remove(&conn);
                self.actions.push(Action::Close(conn, message));
                self.session = Session::Closed;
                self.quitting = true;
                self.first_attempt_over = true;
                return self.exit(2, ErrorCode::KeyMismatch.as_str());
            }
            RegistryTrust::Pinned(_) => {}
            RegistryTrust::FirstUse | RegistryTrust::Given(_) => {
                self.config.registry_trust = RegistryTrust::Pinned(key);
                self.actions.push(Action::Pin(Pin::Registry(key)));
            }
        }
        let register = ToRegistry::Register {
            version: PROTOCOL_VERSION,
            name: self.config.name.clone(),
            port: i64::from(self.config.listen_port),
        };
        self.actions
            .push(Action::Send(conn, protocol::frame(&register)));
    }

    fn link_connected(&mut self, conn: C, target: String, key: PublicKey, now: Instant) {
        let Some(known) = self.dir.get(&target) else {
            self.conns.remove(&conn);
            if let Some(link) = self.links.get_mut(&target) {
                link.conn = None;
            }
            self.actions
                .push(Action::Close(conn, "no longer listed".into()));
            return;
        };
        if known.key != key || known.mismatch {
            // Whoever is at that address now is not the peer the directory
            // lists (or not the one we pinned): never hand it the chats.
            let message = if known.mismatch {
                format!(
                    "{}'s listed key is not the one pinned in known_peers; link refused",
                    known.name
                )
            } else {
                format!(
                    "{} at {} proved key {key}, not the key {} the registry lists; link refused",
                    known.name, known.addr, known.key
                )
            };
            tracing::warn!("{message}");
            self.conns.remove(&conn);
            if let Some(link) = self.links.get_mut(&target) {
                link.conn = None;
            }
            self.actions.push(Action::Close(conn, message));
            self.schedule_redial(&target, now);
            return;
        }
        self.pin(&target, key);
        let hello = protocol::frame(&LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: self.config.name.trim().to_string(),
            instance: self.instance,
        });
        self.actions.push(Action::Send(conn, hello));
        if let Some(link) = self.links.get(&target) {
            for out in &link.queue {
                self.actions.push(Action::Send(conn, out.frame.clone()));
            }
        }
    }

    /// Trusts `key` for a peer from now on, if nothing was pinned for it.
    fn pin(&mut self, folded: &str, key: PublicKey) {
        if self.config.pins.contains_key(folded) {
            return;
        }
        self.config.pins.insert(folded.to_string(), key);
        let name = self.display_name(folded);
        self.actions.push(Action::Pin(Pin::Peer { name, key }));
    }

    pub fn dial_failed(&mut self, dial: Dial, error: String, now: Instant) {
        match dial {
            Dial::Registry => self.registry_lost(format!("cannot connect: {error}"), now),
            Dial::Link(target) => {
                tracing::debug!(%target, %error, "link dial failed");
                if let Some(link) = self.links.get_mut(&target) {
                    link.dialing = false;
                }
                self.schedule_redial(&target, now);
            }
        }
    }

    /// An inbound link whose handshake proved `key`.
    pub fn on_accept(&mut self, conn: C, key: PublicKey, now: Instant) {
        self.conns
            .insert(conn, Role::In(InLink::AwaitHello { key }));
        self.actions.push(Action::Arm(
            now + self.config.hello_timeout,
            Timer::HelloDeadline(conn),
        ));
    }

    pub fn on_frame(&mut self, conn: C, body: &[u8], now: Instant) {
        match self.conns.get(&conn) {
            None => {}
            Some(Role::Registry) => self.on_registry_frame(conn, body, now),
            Some(Role::Out(target)) => {
                let target = target.clone();
                self.on_out_frame(conn, target, body, now);
            }
            Some(Role::In(_)) => self.on_in_frame(conn, body, now),
        }
    }

    /// The connection broke the framing rules and is closing; it still
    /// takes one frame, so a linked peer is told why (as the protocol asks).
    pub fn on_bad_frame(&mut self, conn: C, error: &FrameError, now: Instant) {
        tracing::warn!(?conn, %error, "closing a connection that broke the framing");
        if let Some(Role::In(_)) = self.conns.get(&conn) {
            let code = match error {
                FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                FrameError::Empty => ErrorCode::Protocol,
            };
            let frame = protocol::frame(&LinkMsg::error(code, error.to_string()));
            self.actions.push(Action::Send(conn, frame));
        }
        self.on_closed(conn, error.to_string(), now);
    }

    /// The connection is gone, whoever closed it.
    pub fn on_closed(&mut self, conn: C, reason: String, now: Instant) {
        match self.conns.remove(&conn) {
            Some(Role::Registry) => {
                if self.session_conn() == Some(conn) {
                    self.registry_lost(reason, now);
                }
            }
            Some(Role::Out(target)) => {
                tracing::debug!(%target, %reason, "link closed");
                if let Some(link) = self.links.get_mut(&target) {
                    if link.conn == Some(conn) {
                        link.conn = None;
                        if !link.queue.is_empty() {
                            self.schedule_redial(&target, now);
                        }
                    }
                }
            }
            Some(Role::In(_)) | None => {}
        }
    }

    fn session_conn(&self) -> Option<C> {
        match &self.session {
            Session::Registering { conn, .. } | Session::Online { conn, .. } => Some(*conn),
            Session::Idle { .. } | Session::Closed => None,
        }
    }

    // ---- registry session ----

    fn on_registry_frame(&mut self, conn: C, body: &[u8], now: Instant) {
        let msg = match codec::decode::<FromRegistry>(body) {
            Ok(msg) => msg,
            Err(e) => {
                self.drop_registry(
                    conn,
                    format!("undecodable message from the registry: {e}"),
                    now,
                );
                return;
            }
        };
        if let Session::Online { last_heard, .. } = &mut self.session {
            *last_heard = now;
        }
        match msg {
            FromRegistry::Welcome {
                version,
                name,
                addr,
                heartbeat_ms,
                timeout_ms,
                peers,
                more,
            } => {
                let Session::Registering { snapshot, .. } = &mut self.session else {
                    return self.drop_registry(conn, "unexpected welcome".into(), now);
                };
                if version != PROTOCOL_VERSION {
                    return self.drop_registry(
                        conn,
                        format!("registry speaks version {version}"),
                        now,
                    );
                }
                snapshot.extend(peers);
                let heartbeat_ms = heartbeat_ms.clamp(HEARTBEAT_MS.0, HEARTBEAT_MS.1);
                self.heartbeat = Duration::from_millis(heartbeat_ms);
                self.timeout =
                    Duration::from_millis(timeout_ms.clamp(heartbeat_ms + 10, TIMEOUT_MS_MAX));
                self.config.name = name;
                self.my_addr = addr;
                if !more {
                    self.finish_registration(conn, now);
                }
            }
            FromRegistry::Snapshot { peers, more } => {
                let Session::Registering { snapshot, .. } = &mut self.session else {
                    return self.drop_registry(conn, "unexpected snapshot".into(), now);
                };
                snapshot.extend(peers);
                if !more {
                    self.finish_registration(conn, now);
                }
            }
            FromRegistry::Update { changes } => {
                for change in changes {
                    self.apply_change(change);
                }
            }
            FromRegistry::Heartbeat {} => {}
            FromRegistry::Error { code, reason } if code == ErrorCode::Replaced.as_str() => {
                // Another process holding our key took our name over; two
                // of us would only keep replacing each other.
                self.error(&code, format!("this session was replaced: {reason}"));
                self.session = Session::Closed;
                self.quitting = true;
                self.conns.remove(&conn);
                self.actions.push(Action::Close(conn, "replaced".into()));
                self.exit(2, &code);
            }
            FromRegistry::Error { code, reason } => {
                let fatal = matches!(
                    code.as_str(),
                    "name_taken"
                        | "name_confusable"
                        | "bad_name"
                        | "bad_port"
                        | "unsupported_version"
                );
                if fatal && matches!(self.session, Session::Registering { .. }) {
                    self.error(&code, format!("the registry refused us: {reason}"));
                    self.session = Session::Closed;
                    self.quitting = true;
                    self.actions.push(Action::Close(conn, "refused".into()));
                    self.exit(2, &code);
                } else {
                    self.drop_registry(conn, format!("registry error {code}: {reason}"), now);
                }
            }
            FromRegistry::Shutdown { reason } => {
                self.drop_registry(conn, format!("the registry shut down: {reason}"), now)
            }
        }
    }

    fn finish_registration(&mut self, conn: C, now: Instant) {
        let snapshot = match std::mem::replace(
            &mut self.session,
            Session::Online {
                conn,
                last_heard: now,
            },
        ) {
            Session::Registering { snapshot, .. } => snapshot,
            _ => Vec::new(),
        };
        self.backoff = self.config.backoff_min;
        let mut listed = std::collections::HashSet::new();
        for entry in &snapshot {
            if !is_valid_name(&entry.name) {
                tracing::warn!(name = ?entry.name, "the registry listed an invalid name; ignored");
                continue;
            }
            let folded = fold_name(&entry.name);
            if folded == self.my_folded {
                continue;
            }
            if let Ok(addr) = entry.addr.parse() {
                self.learn(folded.clone(), entry.name.clone(), addr, entry.key);
                listed.insert(folded);
            }
        }
        let mut any_stale = false;
        for (folded, known) in self.dir.iter_mut() {
            if !listed.contains(folded) && known.stale_since.is_none() {
                known.stale_since = Some(now);
                any_stale = true;
            }
        }
        if any_stale {
            self.actions.push(Action::Arm(
                now + self.config.stale_grace,
                Timer::StaleCheck,
            ));
        }
        tracing::info!(name = %self.config.name, addr = %self.my_addr, peers = snapshot.len(), "registered");
        // The directory, not just the snapshot: peers kept through a
        // registry restart are still reachable and still listed by /peers.
        let peers = self.peers();
        self.first_attempt_over = true;
        self.ever_registered = true;
        self.emit(Event::Registered {
            name: self.config.name.clone(),
            addr: self.my_addr.clone(),
            key: self.config.key,
            peers,
        });
        let waiting: std::collections::HashSet<String> = self
            .conns
            .values()
            .filter_map(|role| match role {
                Role::In(InLink::Pending { folded, .. }) => Some(folded.clone()),
                _ => None,
            })
            .collect();
        for folded in listed.intersection(&waiting) {
            self.admit_pending(folded);
        }
        self.actions.push(Action::Arm(
            now + self.heartbeat,
            Timer::Heartbeat(self.epoch),
        ));
    }

    /// Adds or refreshes a directory entry; a new address or key drops the
    /// old link. A key other than the pinned one is reported, once. True
    /// when the user should hear of a move: a new address or spelling.
    fn learn(&mut self, folded: String, name: String, addr: SocketAddr, key: PublicKey) -> bool {
        let mismatch = self.config.pins.get(&folded).is_some_and(|k| *k != key);
        let (moved, renamed, rekeyed, newly_mismatched) = match self.dir.get_mut(&folded) {
            Some(known) => {
                known.stale_since = None;
                let moved = known.addr != addr;
                let renamed = known.name != name;
                let rekeyed = known.key != key;
                let newly = mismatch && (rekeyed || !known.mismatch);
                known.name = name.clone();
                known.addr = addr;
                known.key = key;
                known.mismatch = mismatch;
                (moved, renamed, rekeyed, newly)
            }
            None => {
                self.dir.insert(
                    folded.clone(),
                    Known {
                        name: name.clone(),
                        addr,
                        key,
                        mismatch,
                        stale_since: None,
                    },
                );
                (false, false, false, mismatch)
            }
        };
        if newly_mismatched {
            let pinned = self.config.pins[&folded];
            self.error(
                ErrorCode::KeyMismatch.as_str(),
                format!(
                    "the registry lists {name} with key {key}, but {pinned} is pinned for that name; links to and from {name} are refused. If {name} really has a new key (check with them: /whois {name}), delete the line \"{}\" (its name in any case) from {} and start again",
                    pin_text("peer", &folded, &pinned),
                    self.config.known_peers
                ),
            );
            self.fail_queued(&folded, ErrorCode::KeyMismatch.as_str());
        } else if rekeyed {
            // Another key holds the name now (not one we had pinned): say
            // so, and hand it nothing that was meant for the old one.
            self.error(
                KEY_CHANGED,
                format!("{name} is now listed with another key, {key}; messages still waiting for the old one are not sent"),
            );
            self.fail_queued(&folded, KEY_CHANGED);
        }
        if rekeyed {
            // Nothing of the old key's links or message ids carries over.
            self.seen.remove(&folded);
            self.close_inbound(&folded, "the peer's key changed");
        }
        if moved || rekeyed {
            if let Some(conn) = self.links.get_mut(&folded).and_then(|l| l.conn.take()) {
                self.conns.remove(&conn);
                self.actions
                    .push(Action::Close(conn, "the peer moved".into()));
            }
            self.ensure_link(&folded);
        }
        moved || renamed
    }

    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Joined { name, addr, key } => self.listed(name, addr, Some(key)),
            // A move keeps the key.
            Change::Moved { name, addr } => self.listed(name, addr, None),
            Change::Left { name, reason } => {
                let folded = fold_name(&name);
                if self.dir.contains_key(&folded) {
                    self.emit(Event::Left {
                        name,
                        reason: reason.clone(),
                    });
                    self.forget(&folded, &reason);
                }
            }
        }
    }

    /// The registry lists `name` at `addr`, under `key` (or the key we
    /// already have for it, for a move).
    fn listed(&mut self, name: String, addr: String, key: Option<PublicKey>) {
        if !is_valid_name(&name) {
            tracing::warn!(?name, "the registry sent an invalid name; ignored");
            return;
        }
        let folded = fold_name(&name);
        if folded == self.my_folded {
            return;
        }
        let Ok(parsed) = addr.parse() else {
            tracing::warn!(%name, %addr, "the registry sent an unusable address");
            return;
        };
        // A move of a peer we do not list tells us nothing we could check a
        // link against.
        let Some(key) = key.or_else(|| self.dir.get(&folded).map(|k| k.key)) else {
            tracing::warn!(%name, "the registry moved a peer it never listed");
            return;
        };
        // A peer we still list (kept across a registry restart) never left
        // as far as the user knows: say nothing unless its address or the
        // spelling of its name changed.
        let known = self.dir.contains_key(&folded);
        let moved = self.learn(folded.clone(), name.clone(), parsed, key);
        if !known {
            self.emit(Event::Joined { name, addr, key });
        } else if moved {
            self.emit(Event::Moved { name, addr });
        }
        // After the event: chats held from this peer follow its join.
        self.admit_pending(&folded);
    }

    /// A peer is gone: everything still queued for it is undelivered, and
    /// its links close.
    fn forget(&mut self, folded: &str, reason: &str) {
        let Some(known) = self.dir.remove(folded) else {
            return;
        };
        if let Some(link) = self.links.remove(folded) {
            for out in link.queue {
                self.emit(Event::Undelivered {
                    id: out.id,
                    to: known.name.clone(),
                    reason: reason.into(),
                });
            }
            if let Some(conn) = link.conn {
                self.conns.remove(&conn);
                self.actions
                    .push(Action::Close(conn, format!("{} left", known.name)));
            }
        }
        self.close_inbound(folded, &format!("{} left", known.name));
        self.maybe_finish_quit();
    }

    /// Reports every message waiting for `folded` as undelivered.
    fn fail_queued(&mut self, folded: &str, reason: &str) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        let queue = std::mem::take(&mut link.queue);
        link.deadline_armed = None;
        let to = self.display_name(folded);
        for out in queue {
            self.emit(Event::Undelivered {
                id: out.id,
                to: to.clone(),
                reason: reason.into(),
            });
        }
        self.maybe_finish_quit();
    }

    /// Closes every link that said hello as `folded`.
    fn close_inbound(&mut self, folded: &str, reason: &str) {
        let inbound: Vec<C> = self
            .conns
            .iter()
            .filter(|(_, role)| match role {
                Role::In(
                    InLink::Verified { folded: f, .. } | InLink::Pending { folded: f, .. },
                ) => f == folded,
                _ => false,
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in inbound {
            self.conns.remove(&conn);
            self.actions.push(Action::Close(conn, reason.into()));
        }
    }

    fn drop_registry(&mut self, conn: C, reason: String, now: Instant) {
        self.conns.remove(&conn);
        self.actions.push(Action::Close(conn, reason.clone()));
        self.registry_lost(reason, now);
    }

    /// The registry connection failed or went quiet: say so and retry after
    /// a capped, jittered, doubling delay. Links and the directory stay.
    fn registry_lost(&mut self, error: String, now: Instant) {
        if self.quitting {
            self.session = Session::Closed;
            return;
        }
        if let Some(conn) = self.session_conn() {
            if self.conns.remove(&conn).is_some() {
                self.actions.push(Action::Close(conn, error.clone()));
            }
        }
        let delay = self.jitter(self.backoff);
        self.session = Session::Idle {
            lost: Some((error.clone(), now + delay)),
        };
        self.epoch += 1;
        self.backoff = (self.backoff * 2).min(self.config.backoff_max);
        tracing::info!(%error, retry_in = ?delay, "registry lost");
        self.first_attempt_over = true;
        self.emit(Event::RegistryLost {
            error,
            retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
        self.actions
            .push(Action::Arm(now + delay, Timer::RegistryRetry(self.epoch)));
    }

    /// Half to all of `base`, so that peers that lost the registry together
    /// do not come back together.
    fn jitter(&mut self, base: Duration) -> Duration {
        let fraction = (xorshift(&mut self.rng) % 1001) as f64 / 1000.0;
        base.mul_f64(0.5 + fraction / 2.0)
    }

    // ---- links ----

    fn ensure_link(&mut self, folded: &str) {
        let Some(addr) = self.dir.get(folded).filter(|k| !k.mismatch).map(|k| k.addr) else {
            return;
        };
        let link = self.links.entry(folded.to_string()).or_default();
        if link.conn.is_none() && !link.dialing && !link.retry_armed && !link.queue.is_empty() {
            link.dialing = true;
            self.actions
                .push(Action::Dial(addr, Dial::Link(folded.to_string())));
        }
    }

    fn schedule_redial(&mut self, folded: &str, now: Instant) {
        let backoff_min = self.config.backoff_min;
        let backoff_max = self.config.backoff_max;
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if link.retry_armed || link.queue.is_empty() {
            return;
        }
        link.retry_armed = true;
        let base = link.backoff.max(backoff_min);
        link.backoff = (base * 2).min(backoff_max);
        let delay = self.jitter(base);
        self.actions.push(Action::Arm(
            now + delay,
            Timer::LinkRetry(folded.to_string()),
        ));
    }

    fn on_out_frame(&mut self, conn: C, target: String, body: &[u8], _now: Instant) {
        match codec::decode::<LinkMsg>(body) {
            Ok(LinkMsg::Ack { id }) => {
                let backoff_min = self.config.backoff_min;
                let Some(link) = self.links.get_mut(&target) else {
                    return;
                };
                let Some(pos) = link.queue.iter().position(|o| o.id == id) else {
                    return; // A second ack for a resent message.
                };
                link.queue.remove(pos);
                link.backoff = backoff_min;
                let name = self.display_name(&target);
                self.emit(Event::Delivered { id, to: name });
                self.maybe_finish_quit();
            }
            Ok(LinkMsg::Error { code, reason }) => {
                tracing::warn!(peer = %target, %code, %reason, "the peer refused our link");
            }
            Ok(other) => {
                tracing::warn!(peer = %target, ?other, "unexpected message on our link; closing it");
                self.actions
                    .push(Action::Close(conn, "unexpected message".into()));
            }
            Err(e) => {
                tracing::warn!(peer = %target, error = %e, "undecodable frame on our link; closing it");
                self.actions
                    .push(Action::Close(conn, format!("undecodable frame: {e}")));
            }
        }
    }

    fn display_name(&self, folded: &str) -> String {
        self.dir
            .get(folded)
            .map_or_else(|| folded.to_string(), |k| k.name.clone())
    }

    fn refuse_link(&mut self, conn: C, code: ErrorCode, reason: String) {
        tracing::warn!(?conn, %code, %reason, "refusing a link");
        self.conns.remove(&conn);
        let frame = protocol::frame(&LinkMsg::error(code, reason.clone()));
        self.actions.push(Action::Send(conn, frame));
        self.actions.push(Action::Close(conn, reason));
    }

    fn on_in_frame(&mut self, conn: C, body: &[u8], _now: Instant) {
        let Some(Role::In(link)) = self.conns.get_mut(&conn) else {
            return;
        };
        if let InLink::AwaitHello { key } = *link {
            let version_of = |m: &LinkMsg| match m {
                LinkMsg::Hello { version, .. } => *version,
                _ => PROTOCOL_VERSION,
            };
            return match decode_first(body, version_of) {
                Ok(LinkMsg::Hello { name, instance, .. }) => {
                    self.on_hello(conn, key, name, instance)
                }
                Ok(_) => self.refuse_link(conn, ErrorCode::Protocol, "a link starts with hello".into()),
                Err(FirstFrameError::Version(v)) => self.refuse_link(
                    conn,
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {v} is not supported; this peer speaks {PROTOCOL_VERSION}"),
                ),
                Err(FirstFrameError::Malformed(e)) => {
                    self.refuse_link(conn, ErrorCode::Protocol, format!("undecodable hello: {e}"))
                }
            };
        }
        match codec::decode::<LinkMsg>(body) {
            Ok(LinkMsg::Chat {
                id,
                text,
                direct,
                sent_at,
            }) => match link {
                InLink::Pending { held, .. } => {
                    let link_bytes: usize =
                        held.iter().map(|h| h.text.len()).sum::<usize>() + text.len();
                    let over = held.len() >= MAX_HELD
                        || link_bytes > MAX_HELD_BYTES
                        || self.held_bytes() + text.len() > MAX_HELD_BYTES_TOTAL;
                    if over {
                        self.refuse_link(
                            conn,
                            ErrorCode::UnknownPeer,
                            "too much held from a peer the directory does not list".into(),
                        );
                    } else if let Some(Role::In(InLink::Pending { held, .. })) =
                        self.conns.get_mut(&conn)
                    {
                        held.push(Chat {
                            id,
                            text,
                            direct,
                            sent_at,
                        });
                    }
                }
                InLink::Verified { folded, instance } => {
                    let (folded, instance) = (folded.clone(), *instance);
                    let chat = Chat {
                        id,
                        text,
                        direct,
                        sent_at,
                    };
                    self.deliver(conn, &folded, instance, chat);
                }
                InLink::AwaitHello { .. } => {}
            },
            Ok(LinkMsg::Error { code, reason }) => {
                tracing::warn!(?conn, %code, %reason, "error from a linked peer");
                self.conns.remove(&conn);
                self.actions
                    .push(Action::Close(conn, format!("{code}: {reason}")));
            }
            Ok(_) => self.refuse_link(
                conn,
                ErrorCode::Protocol,
                "only chat is expected after hello".into(),
            ),
            Err(e) => self.refuse_link(
                conn,
                ErrorCode::Protocol,
                format!("undecodable message: {e}"),
            ),
        }
    }

    fn on_hello(&mut self, conn: C, key: PublicKey, name: String, instance: u64) {
        let name = match normalize_name(&name) {
            Ok(name) => name,
            Err(why) => return self.refuse_link(conn, why.code(), why.to_string()),
        };
        let folded = fold_name(&name);
        if folded == self.my_folded {
            return self.refuse_link(
                conn,
                ErrorCode::Protocol,
                format!("{name:?} is this peer's own name"),
            );
        }
        if let Some(pinned) = self.config.pins.get(&folded).filter(|k| **k != key) {
            let reason =
                format!("{name} is pinned to key {pinned} in known_peers; this link proved {key}");
            self.warn_key(&folded, key, reason.clone());
            return self.refuse_link(conn, ErrorCode::KeyMismatch, reason);
        }
        self.conns.insert(
            conn,
            Role::In(InLink::Pending {
                folded: folded.clone(),
                key,
                instance,
                held: Vec::new(),
            }),
        );
        if self.dir.contains_key(&folded) {
            self.admit_pending(&folded);
        } else {
            tracing::debug!(%name, "hello from a peer not in the directory yet; holding the link");
        }
    }

    /// Text held, over all links waiting for their sender to be listed.
    fn held_bytes(&self) -> usize {
        self.conns
            .values()
            .map(|role| match role {
                Role::In(InLink::Pending { held, .. }) => held.iter().map(|h| h.text.len()).sum(),
                _ => 0,
            })
            .sum()
    }

    /// The directory now lists `folded`: links that said hello under that
    /// name and proved its key are verified, and what they sent meanwhile is
    /// delivered. Links with another key are refused, unread.
    fn admit_pending(&mut self, folded: &str) {
        let Some(known) = self.dir.get(folded) else {
            return;
        };
        let (listed_key, mismatch, name) = (known.key, known.mismatch, known.name.clone());
        let waiting: Vec<C> = self
            .conns
            .iter()
            .filter(|(_, role)| matches!(role, Role::In(InLink::Pending { folded: f, .. }) if f == folded))
            .map(|(c, _)| *c)
            .collect();
        for conn in waiting {
            let Some(Role::In(InLink::Pending {
                instance,
                held,
                key,
                ..
            })) = self.conns.remove(&conn)
            else {
                continue;
            };
            if key != listed_key || mismatch {
                let reason = if mismatch {
                    format!("{name}'s listed key is not the one pinned in known_peers")
                } else {
                    format!("the registry lists {name} with key {listed_key}, not {key}")
                };
                self.warn_key(folded, key, reason.clone());
                self.refuse_link(conn, ErrorCode::KeyMismatch, reason);
                continue;
            }
            self.pin(folded, key);
            self.conns.insert(
                conn,
                Role::In(InLink::Verified {
                    folded: folded.to_string(),
                    instance,
                }),
            );
            for chat in held {
                self.deliver(conn, folded, instance, chat);
            }
        }
    }

    /// Shows a chat unless it is a resend, and acknowledges it either way.
    fn deliver(&mut self, conn: C, folded: &str, instance: u64, chat: Chat) {
        let Chat {
            id,
            text,
            direct,
            sent_at,
        } = chat;
        let seen = self.seen.entry(folded.to_string()).or_insert((instance, 0));
        if seen.0 != instance {
            // The sender restarted: its ids begin again.
            *seen = (instance, 0);
        }
        if id > seen.1 {
            seen.1 = id;
            let from = self.display_name(folded);
            self.emit(Event::Message {
                from,
                text,
                direct,
                id,
                sent_at,
            });
        }
        let ack = protocol::frame(&LinkMsg::Ack { id });
        self.actions.push(Action::Send(conn, ack));
    }

    // ---- commands ----

    /// Runs a user command; `wall` is the wall-clock time, which chat
    /// messages carry for their readers.
    pub fn command(&mut self, command: Command, now: Instant, wall: SystemTime) {
        if self.quitting {
            return;
        }
        let sent_at = wall
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        match command {
            Command::Broadcast(text) => {
                let targets: Vec<String> = self.dir.keys().cloned().collect();
                self.send_chat(targets, text, false, sent_at, now);
            }
            Command::Direct { to, .. } if fold_name(&to) == self.my_folded => {
                self.error(
                    "bad_command",
                    "you cannot message yourself; /msg is for another peer".into(),
                );
            }
            Command::Direct { to, text } => {
                let folded = fold_name(&to);
                if self.dir.contains_key(&folded) {
                    self.send_chat(vec![folded], text, true, sent_at, now);
                } else {
                    self.error(
                        ErrorCode::UnknownPeer.as_str(),
                        format!("no peer named {to:?} is online (see /peers)"),
                    );
                }
            }
            Command::Peers => {
                let peers = self.peers();
                self.emit(Event::Peers { peers });
            }
            Command::Whois(name) => self.whois(&name),
            Command::Status => self.status(now),
            Command::Quit => self.quit(now),
        }
    }

    fn whois(&mut self, name: &str) {
        let folded = fold_name(name.trim());
        let found = if folded == self.my_folded {
            Some(Event::Whois {
                name: self.config.name.clone(),
                key: self.config.key,
                pinned: true,
                you: true,
                pinned_key: None,
            })
        } else {
            self.dir.get(&folded).map(|known| {
                let pin = self.config.pins.get(&folded).copied();
                Event::Whois {
                    name: known.name.clone(),
                    key: known.key,
                    pinned: pin == Some(known.key),
                    you: false,
                    pinned_key: pin.filter(|p| *p != known.key),
                }
            })
        };
        match found {
            Some(event) => self.emit(event),
            None => self.error(
                ErrorCode::UnknownPeer.as_str(),
                format!("no peer named {name:?} is online (see /peers)"),
            ),
        }
    }

    fn status(&mut self, now: Instant) {
        let (registry, lost) = match &self.session {
            Session::Online { .. } => ("registered", None),
            Session::Idle { lost } if self.ever_registered => ("lost", lost.clone()),
            Session::Idle { lost } => ("unreachable", lost.clone()),
            _ => ("connecting", None),
        };
        let (error, retry_at) = lost.unzip();
        let retry_in_ms = retry_at.map(|at| {
            u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
        });
        self.emit(Event::Status {
            registry: registry.into(),
            error,
            retry_in_ms,
            peers: self.dir.len(),
        });
    }

    fn send_chat(
        &mut self,
        targets: Vec<String>,
        text: String,
        direct: bool,
        sent_at: Option<u64>,
        now: Instant,
    ) {
        let id = self.next_id;
        let frame = protocol::frame(&LinkMsg::Chat {
            id,
            text,
            direct,
            sent_at,
        });
        let body_len = frame.len() - PREFIX_LEN;
        if body_len > DEFAULT_MAX_FRAME {
            self.error(
                "too_long",
                format!("the message is {body_len} bytes encoded; at most {DEFAULT_MAX_FRAME} fit in a frame"),
            );
            return;
        }
        self.next_id += 1;
        let to = targets.iter().map(|t| self.display_name(t)).collect();
        self.emit(Event::Sent { id, to });
        for target in targets {
            if self.dir.get(&target).is_some_and(|k| k.mismatch) {
                let to = self.display_name(&target);
                self.emit(Event::Undelivered {
                    id,
                    to,
                    reason: ErrorCode::KeyMismatch.as_str().into(),
                });
                continue;
            }
            let deadline = now + self.config.send_timeout;
            let link = self.links.entry(target.clone()).or_default();
            link.queue.push_back(Outgoing {
                id,
                frame: frame.clone(),
                deadline,
            });
            let arm = link.deadline_armed.is_none();
            if arm {
                link.deadline_armed = Some(deadline);
            }
            match link.conn {
                Some(conn) => self.actions.push(Action::Send(conn, frame.clone())),
                None => self.ensure_link(&target),
            }
            if arm {
                self.actions.push(Action::Arm(
                    deadline,
                    Timer::SendDeadline {
                        target,
                        at: deadline,
                    },
                ));
            }
        }
    }

    /// Waits (at most `quit_grace`) for outstanding acks, still listed,
    /// reports the rest undelivered, then leaves the registry and exits.
    pub fn quit(&mut self, now: Instant) {
        if self.quitting {
            return;
        }
        self.quitting = true;
        // Online, we stay listed until the end: a peer checks our hello
        // against its directory, so leaving first would cost the messages
        // still on their way. A registration not yet done is dropped.
        if !matches!(self.session, Session::Online { .. }) {
            self.close_session("quit");
        }
        self.actions.push(Action::Arm(
            now + self.config.quit_grace,
            Timer::QuitDeadline,
        ));
        self.maybe_finish_quit();
    }

    fn maybe_finish_quit(&mut self) {
        if self.quitting && self.links.values().all(|l| l.queue.is_empty()) {
            self.finish_quit();
        }
    }

    fn finish_quit(&mut self) {
        if let Session::Online { conn, .. } = self.session {
            self.actions
                .push(Action::Send(conn, protocol::frame(&ToRegistry::Leave {})));
        }
        self.close_session("quit");
        self.exit(0, "quit");
    }

    fn close_session(&mut self, reason: &str) {
        if let Some(conn) = self.session_conn() {
            self.conns.remove(&conn);
            self.actions.push(Action::Close(conn, reason.into()));
        }
        self.session = Session::Closed;
    }

    /// Reports what is still unacknowledged as undelivered for `reason`,
    /// then exits with `status`; only the first call does anything.
    fn exit(&mut self, status: i32, reason: &str) {
        if std::mem::replace(&mut self.exited, true) {
            return;
        }
        let mut links: Vec<(String, OutLink<C>)> = self.links.drain().collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        for (folded, link) in links {
            let to = self.display_name(&folded);
            for out in link.queue {
                self.emit(Event::Undelivered {
                    id: out.id,
                    to: to.clone(),
                    reason: reason.into(),
                });
            }
        }
        self.actions.push(Action::Exit(status));
    }

    // ---- timers ----

    pub fn on_timer(&mut self, timer: Timer<C>, now: Instant) {
        match timer {
            Timer::RegistryRetry(epoch) => {
                if epoch == self.epoch
                    && matches!(self.session, Session::Idle { .. })
                    && !self.quitting
                {
                    self.dial_registry();
                }
            }
            Timer::RegisterDeadline(epoch) => {
                if epoch == self.epoch {
                    if let Session::Registering { conn, .. } = self.session {
                        let secs = self.config.register_timeout.as_secs_f64();
                        self.drop_registry(conn, format!("no welcome within {secs}s"), now);
                    }
                }
            }
            Timer::Heartbeat(epoch) => {
                let Session::Online { conn, last_heard } = self.session else {
                    return;
                };
                if epoch != self.epoch {
                    return;
                }
                let silent = now.saturating_duration_since(last_heard);
                if silent >= self.timeout {
                    let msg = format!("the registry was silent for {} ms", silent.as_millis());
                    self.drop_registry(conn, msg, now);
                    return;
                }
                self.actions.push(Action::Send(
                    conn,
                    protocol::frame(&ToRegistry::Heartbeat {}),
                ));
                self.actions
                    .push(Action::Arm(now + self.heartbeat, Timer::Heartbeat(epoch)));
            }
            Timer::LinkRetry(target) => {
                if let Some(link) = self.links.get_mut(&target) {
                    link.retry_armed = false;
                }
                self.ensure_link(&target);
            }
            Timer::HelloDeadline(conn) => match self.conns.get(&conn) {
                Some(Role::In(InLink::AwaitHello { .. })) => {
                    self.refuse_link(conn, ErrorCode::HandshakeTimeout, "no hello in time".into())
                }
                Some(Role::In(InLink::Pending { folded, .. })) => {
                    let reason = format!("{folded:?} is not in the directory");
                    self.refuse_link(conn, ErrorCode::UnknownPeer, reason);
                }
                _ => {}
            },
            Timer::SendDeadline { target, at } => {
                let Some(link) = self.links.get_mut(&target) else {
                    return;
                };
                if link.deadline_armed != Some(at) {
                    return; // A timer of an earlier link to the same peer.
                }
                link.deadline_armed = None;
                let mut overdue = Vec::new();
                while link.queue.front().is_some_and(|o| o.deadline <= now) {
                    overdue.extend(link.queue.pop_front().map(|o| o.id));
                }
                let next = link.queue.front().map(|o| o.deadline);
                if let Some(next) = next {
                    link.deadline_armed = Some(next);
                    self.actions.push(Action::Arm(
                        next,
                        Timer::SendDeadline {
                            target: target.clone(),
                            at: next,
                        },
                    ));
                }
                let to = self.display_name(&target);
                for id in overdue {
                    tracing::info!(id, %to, "no acknowledgement in time");
                    self.emit(Event::Undelivered {
                        id,
                        to: to.clone(),
                        reason: "no_ack".into(),
                    });
                }
                self.maybe_finish_quit();
            }
            Timer::StaleCheck => {
                let grace = self.config.stale_grace;
                let expired: Vec<String> = self
                    .dir
                    .iter()
                    .filter(|(_, k)| {
                        k.stale_since
                            .is_some_and(|t| now.saturating_duration_since(t) >= grace)
                    })
                    .map(|(f, _)| f.clone())
                    .collect();
                for folded in expired {
                    let name = self.display_name(&folded);
                    self.emit(Event::Left {
                        name,
                        reason: "gone".into(),
                    });
                    self.forget(&folded, "gone");
                }
            }
            Timer::QuitDeadline => self.finish_quit(),
        }
    }
}

/// A name as the registry must send it: already trimmed and within the
/// rules. Anything else (spaces, control characters) never reaches the
/// user's screen or `known_peers`.
fn is_valid_name(name: &str) -> bool {
    normalize_name(name).is_ok_and(|n| n == name)
}

/// A pin as its line in `known_peers` reads, for hints on what to delete.
fn pin_text(kind: &str, subject: &str, key: &PublicKey) -> String {
    trust::pin_line(kind, subject, key)
        .map(|line| line.trim_end().to_string())
        .unwrap_or_else(|| format!("{kind} {subject} {key}"))
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[cfg(test)]
mod tests;
