//! The registry's logic as a sans-IO state machine: who is online, under
//! which name and address, who must hear of which change, and who has been
//! silent too long.
//!
//! Names are owned by keys: a connection arrives with the static key its
//! Noise handshake proved, and a name belongs to the first key that
//! registers it, while it is online and for a grace period after it leaves.
//!
//! Inputs are connection events with the current time; outputs are
//! [`Action`]s (send these bytes to that connection, close it), and the
//! registry keeps its own timers (`poll_timeout`, `handle_timeout`). It
//! never touches a socket or the clock, so tests drive it with simulated
//! time. Connections are named by any small key type `C`; on the event
//! loop, by the driver's [`peerchat_core::machine::LinkId`]s (see
//! `machine.rs`). A connection's first frame and a newcomer's welcome are
//! in `registration.rs`; name ownership beyond the online peers lives in
//! `owners.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::Output;
use peerchat_core::protocol::{
    self, Change, ErrorCode, FromRegistry, LeftReason, PeerEntry, ToRegistry,
};
use peerchat_core::timer::TimerWheel;
use peerchat_core::wire::FrameError;

use lookalikes::Lookalikes;

pub mod args;
pub mod metrics;
pub mod names_file;
pub mod nats;

pub use cluster::{
    record_key, ClusterEvent, ClusterWrite, Expect, NameRecord, RecordState, WriteResult,
};
pub use owners::Owner;
use owners::Reservation;
use probe::Probes;
use push::{ChangeLog, Sweep};
use relay::Relays;
pub use relay::{RelayConfig, RelayStats, RELAY_WINDOW};
use window::Window;

/// Changes per update frame: keeps every frame under the 64 KiB a peer must
/// accept, even with 32-character names in four-byte scripts and IPv6
/// addresses.
pub const CHUNK: usize = 256;

/// A directory larger than this many peers is sent to newcomers in shared
/// parts: peers `k × PART_ENTRIES` to `(k + 1) × PART_ENTRIES - 1` in
/// registration order, each encoded once and kept until one of its peers
/// changes, so that a wave of newcomers shares one copy of the directory
/// instead of each getting its own. At most about 230 bytes an entry (the
/// longest name and address), a part stays well under a 64 KiB frame.
pub(crate) const PART_ENTRIES: u64 = 200;

/// The registry's timers are only deadlines of seconds: a tick of 10 ms
/// and a rotation of ~10 s keep the wheel small.
const TIMER_TICK: Duration = Duration::from_millis(10);
const TIMER_SLOTS: usize = 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub max_peers: usize,
    /// Largest frame a registered peer may send.
    pub max_frame: usize,
    /// Time a new connection has to register.
    pub register_timeout: Duration,
    /// Largest frame before registration: a register message is small.
    pub unregistered_max_frame: usize,
    /// How long a name stays reserved for its key after its peer left.
    pub name_grace: Duration,
    /// The longest a busy registry takes to send a change to every
    /// session (see [`Registry::set_load`]).
    pub max_update_delay: Duration,
    pub relay: RelayConfig,
    /// Dial each peer back to learn whether others can (4.7).
    pub probe: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            max_peers: 100_000,
            max_frame: peerchat_core::wire::DEFAULT_MAX_FRAME,
            register_timeout: Duration::from_secs(5),
            unregistered_max_frame: 4096,
            name_grace: Duration::from_secs(600),
            max_update_delay: Duration::from_millis(700),
            relay: RelayConfig::default(),
            probe: true,
        }
    }
}

/// What the registry wants done: the machine contract's outputs, with no
/// host outputs (the binary decides on its own when to save names).
pub type Action<C> = Output<C, Infallible>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer<C> {
    /// The connection must have registered by now.
    RegisterDeadline(C),
    /// Check whether the peer on this connection has been silent too long.
    Liveness(C),
    /// The next sessions of a sweep are due: a turn ends, and sends them.
    Flush,
    /// This relay invitation must have been answered by now.
    RelayInvitation(u64),
    /// This relay connection's sends should have been read by now.
    RelayStall(C),
    /// This relay connection's rate debt should be paid by now.
    RelayRate(C),
    /// This probe must be done by now.
    ProbeDeadline(C),
    /// Look for registries of the cluster that went silent.
    ClusterCheck,
}

/// How a connection ended, as far as the registry cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// Closed, reset or broken by the network or the other side.
    Lost,
    /// Its outbound queue overflowed.
    Slow,
    /// It broke the framing rules; the connection still takes one last
    /// frame, so it is told why.
    BadFrame(FrameError),
}

/// Counters for the periodic stats line and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub joins: u64,
    pub leaves: u64,
    pub evictions: u64,
    pub rejections: u64,
    /// Requests to dial a peer back that were passed on, and not (4.8).
    pub reversals: u64,
    pub reversals_failed: u64,
    /// `leaves` by the reason everyone was told.
    pub leaves_by_reason: BTreeMap<&'static str, u64>,
    /// `rejections` by the error code sent.
    pub rejections_by_code: BTreeMap<&'static str, u64>,
}

pub(crate) struct Session {
    name: String,
    folded: String,
    addr: SocketAddr,
    key: PublicKey,
    last_seen: Instant,
    /// Position in registration order (snapshots list peers in it).
    order: u64,
    answers: Answers,
    /// Whether the registry could dial it back; `None` until a probe said.
    reachable: Option<bool>,
    /// Its recent requests to be dialed back.
    reversals: reversal::Budget,
    /// How far into the change log it has been sent (its welcome counts).
    seen: u64,
    /// Its last heartbeat waits for its next update to answer it.
    answer_held: bool,
}

/// What a peer said, in its `register`, that it answers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answers {
    /// `relay` invitations (4.6).
    relay: bool,
    /// `dial_back` requests (4.8).
    dial_back: bool,
}

/// A connection secured, not registered yet.
struct Unregistered {
    /// Where it connected from (its listening port comes with its
    /// register message).
    addr: SocketAddr,
    key: PublicKey,
}

/// Boxed, so that the map of every connection holds a pointer per entry
/// rather than a whole session: a hash map's spare capacity (up to half of
/// it after it doubles) then costs 8 bytes a slot, not 150.
enum LinkState {
    Registering(Box<Unregistered>),
    /// Its name waits for the cluster's word (cluster mode only).
    Claiming(Box<cluster::Claim>),
    Registered(Box<Session>),
}

/// Who a directory entry is: a session of this registry (its entry is
/// made from the session when a snapshot part is encoded), or a peer of
/// another registry of the cluster (held only as its encoded entry).
pub(crate) enum Listed<C> {
    Local(C),
    Remote(Bytes),
}

pub struct Registry<C> {
    config: Config,
    conns: HashMap<C, LinkState>,
    /// Folded name → the connection holding it.
    names: HashMap<String, C>,
    /// Folded name → the key it is kept for, after its peer left.
    reserved: HashMap<String, Reservation>,
    /// Reservations in the order they end (the grace is one length for
    /// all), so that expired ones are found without a scan.
    reserved_order: VecDeque<(Instant, String)>,
    /// The looks of every name in `names` or `reserved`.
    lookalikes: Lookalikes,
    /// Registration order → who is listed there.
    order: BTreeMap<u64, Listed<C>>,
    /// The snapshot frames of the directory's parts (see [`PART_ENTRIES`])
    /// that have not changed since they were encoded, by part: a welcome
    /// copies these instead of encoding every peer. Dropped when no
    /// welcome used them for a while ([`Registry::release_caches`]).
    parts: BTreeMap<u64, Bytes>,
    /// A welcome used `parts` since the last [`Registry::release_caches`].
    parts_used: bool,
    next_order: u64,
    /// The changes some session has not been sent yet.
    log: ChangeLog,
    /// The pass over the sessions that sends them, while one is under way.
    sweep: Option<Sweep>,
    /// Every session has seen the log this far (its end at the last
    /// sweep's first visit).
    swept: u64,
    /// How long a sweep takes under load, and what it is chosen from.
    window: Window,
    /// When the flush timer was armed for.
    flush_at: Option<Instant>,
    actions: VecDeque<Action<C>>,
    /// Register deadlines and liveness checks. A timer of a connection that
    /// is gone, or has moved on, finds its state changed and does nothing.
    timers: TimerWheel<Timer<C>>,
    heartbeat_reply: Bytes,
    /// Sessions whose heartbeat waits for their next update to answer it
    /// (or for the end of the sweep, if none comes); at most once each,
    /// and some may have been answered since.
    unanswered: Vec<C>,
    stats: Stats,
    /// Some name changed owner or state since [`Registry::take_owners_changed`].
    owners_changed: bool,
    /// Set by [`Registry::shutdown`], with its reason.
    stopping: Option<String>,
    relays: Relays<C>,
    probes: Probes<C>,
    /// Cluster mode: the directory and the names are shared.
    cluster: Option<cluster::Cluster<C>>,
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// `now` is where the registry's timers start counting.
    pub fn new(config: Config, now: Instant) -> Self {
        Registry {
            timers: TimerWheel::new(now, TIMER_TICK, TIMER_SLOTS),
            relays: Relays::new(config.relay.clone()),
            probes: Probes::new(config.probe),
            config,
            conns: HashMap::new(),
            names: HashMap::new(),
            reserved: HashMap::new(),
            reserved_order: VecDeque::new(),
            lookalikes: Lookalikes::default(),
            order: BTreeMap::new(),
            parts: BTreeMap::new(),
            parts_used: false,
            next_order: 0,
            log: ChangeLog::default(),
            sweep: None,
            swept: 0,
            window: Window::new(),
            flush_at: None,
            actions: VecDeque::new(),
            heartbeat_reply: protocol::frame(&FromRegistry::Heartbeat {}),
            unanswered: Vec::new(),
            stats: Stats::default(),
            owners_changed: false,
            stopping: None,
            cluster: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn relay_stats(&self) -> RelayStats {
        self.relays.stats()
    }

    /// Registered peers.
    pub fn peer_count(&self) -> usize {
        self.names.len()
    }

    /// The directory as the registry holds it, in registration order
    /// (with the peers of other registries, in cluster mode).
    pub fn directory(&self) -> Vec<PeerEntry> {
        self.order
            .values()
            .filter_map(|listed| match listed {
                Listed::Local(c) => self.session(*c).map(entry_of),
                Listed::Remote(encoded) => codec::decode(encoded).ok(),
            })
            .collect()
    }

    /// The sessions of this registry, in registration order.
    fn local_sessions(&self) -> impl Iterator<Item = (C, &Session)> {
        self.order.values().filter_map(|listed| match listed {
            Listed::Local(c) => self.session(*c).map(|s| (*c, s)),
            Listed::Remote(_) => None,
        })
    }

    /// The next thing to do, oldest first.
    pub fn poll_output(&mut self) -> Option<Action<C>> {
        self.actions.pop_front()
    }

    fn session(&self, conn: C) -> Option<&Session> {
        match self.conns.get(&conn) {
            Some(LinkState::Registered(s)) => Some(s),
            _ => None,
        }
    }

    /// A connection whose handshake proved `key`.
    pub fn on_accept(&mut self, conn: C, peer: SocketAddr, key: PublicKey, now: Instant) {
        if let Some(reason) = &self.stopping {
            // The directory is gone: nobody may register now, least of all
            // under a name that was online a moment ago.
            let notice = FromRegistry::Shutdown {
                reason: reason.clone(),
            };
            self.actions
                .push_back(Action::Send(conn, protocol::frame(&notice)));
            self.actions
                .push_back(Action::Close(conn, "registry shutting down".into()));
            return;
        }
        self.conns.insert(
            conn,
            LinkState::Registering(Box::new(Unregistered { addr: peer, key })),
        );
        self.actions.push_back(Action::SetMaxFrame(
            conn,
            self.config.unregistered_max_frame,
        ));
        self.timers.arm(
            now + self.config.register_timeout,
            Timer::RegisterDeadline(conn),
        );
    }

    pub fn on_frame(&mut self, conn: C, body: &[u8], now: Instant) {
        match self.conns.get_mut(&conn) {
            None => self.relay_frame(conn, body, now),
            Some(LinkState::Registering(pending)) => {
                let (ip, key) = (pending.addr.ip(), pending.key);
                self.on_register_frame(conn, ip, key, body, now);
            }
            Some(LinkState::Claiming(_)) => self.reject(
                conn,
                ErrorCode::Protocol,
                "a message before the welcome".into(),
            ),
            Some(LinkState::Registered(session)) => {
                session.last_seen = now;
                match codec::decode::<ToRegistry>(body) {
                    Ok(ToRegistry::Heartbeat {}) => self.on_heartbeat(conn),
                    Ok(ToRegistry::Leave {}) => {
                        self.remove(conn, LeftReason::Quit, now);
                        self.actions.push_back(Action::Close(conn, "left".into()));
                    }
                    Ok(ToRegistry::Register { .. }) => {
                        self.fail(conn, "already registered on this connection".into(), now);
                    }
                    Ok(ToRegistry::Reverse { to }) => self.reverse(conn, &to, now),
                    Ok(ToRegistry::RelayOpen { .. } | ToRegistry::RelayJoin { .. }) => {
                        self.fail(
                            conn,
                            "a relay starts on a connection of its own".into(),
                            now,
                        );
                    }
                    Err(e) => self.fail(conn, format!("undecodable message: {e}"), now),
                }
            }
        }
    }

    /// Who is at the other end of `conn`, for a log line: its address, and
    /// its name once registered.
    fn who(&self, conn: C) -> (String, &str) {
        match self.conns.get(&conn) {
            Some(LinkState::Registering(pending)) => (pending.addr.to_string(), ""),
            Some(LinkState::Claiming(claim)) => (claim.who.addr.to_string(), &claim.who.name),
            Some(LinkState::Registered(s)) => (s.addr.to_string(), &s.name),
            None if self.relays.has(conn) => ("relay connection".into(), ""),
            None => ("unknown".into(), ""),
        }
    }

    /// A registered peer broke the protocol: tell it why, drop it.
    fn fail(&mut self, conn: C, reason: String, now: Instant) {
        let (addr, name) = self.who(conn);
        tracing::warn!(%addr, %name, %reason, "closing a peer that broke the protocol");
        self.remove(conn, LeftReason::Protocol, now);
        self.send_error(conn, ErrorCode::Protocol, reason);
    }

    /// Takes a peer out of the registration order; its part changes.
    fn unlist(&mut self, order: u64) {
        self.order.remove(&order);
        self.parts.remove(&(order / PART_ENTRIES));
    }

    /// The directory as snapshot frames (each with `more`), one per part
    /// that has peers, encoded anew only where a peer joined, left or
    /// changed.
    fn snapshot_parts(&mut self) -> Vec<Bytes> {
        self.parts_used = true;
        let mut frames = Vec::new();
        let mut from = 0;
        while let Some(&first) = self.order.range(from..).next().map(|(k, _)| k) {
            let part = first / PART_ENTRIES;
            from = (part + 1) * PART_ENTRIES;
            if !self.parts.contains_key(&part) {
                let head = FromRegistry::Snapshot {
                    more: true,
                    peers: Vec::new(),
                };
                let entries = self.encoded_entries(part * PART_ENTRIES..from);
                let frame = protocol::frame_with_items(&head, &entries);
                self.parts.insert(part, frame);
            }
            frames.push(self.parts[&part].clone());
        }
        frames
    }

    /// The encoded entries of the peers listed in `orders`, in order.
    fn encoded_entries(&self, orders: impl std::ops::RangeBounds<u64>) -> Vec<Bytes> {
        self.order
            .range(orders)
            .filter_map(|(_, listed)| match listed {
                Listed::Local(c) => self.session(*c).map(|s| protocol::item(&entry_of(s))),
                Listed::Remote(encoded) => Some(encoded.clone()),
            })
            .collect()
    }

    /// Drops the snapshot parts if no welcome used them since the last
    /// call: an idle directory keeps no second copy of itself. The host
    /// calls this now and then (with its stats line).
    pub fn release_caches(&mut self) {
        if !std::mem::take(&mut self.parts_used) {
            self.parts.clear();
        }
    }

    fn reject(&mut self, conn: C, code: ErrorCode, reason: String) {
        self.count_rejection(code);
        let (addr, _) = self.who(conn);
        tracing::info!(%addr, %code, %reason, "rejected");
        self.conns.remove(&conn);
        self.send_error(conn, code, reason);
    }

    fn count_rejection(&mut self, code: ErrorCode) {
        self.stats.rejections += 1;
        *self
            .stats
            .rejections_by_code
            .entry(code.as_str())
            .or_default() += 1;
    }

    fn send_error(&mut self, conn: C, code: ErrorCode, reason: String) {
        let frame = protocol::frame(&FromRegistry::error(code, reason.clone()));
        self.actions.push_back(Action::Send(conn, frame));
        self.actions
            .push_back(Action::Close(conn, format!("{code}: {reason}")));
    }

    /// Forgets a connection; if it held a name, everyone hears `left`, and
    /// the name is kept for its key for the grace period.
    fn remove(&mut self, conn: C, reason: LeftReason, now: Instant) {
        if let Some(LinkState::Registered(s)) = self.conns.remove(&conn) {
            self.names.remove(&s.folded);
            self.unlist(s.order);
            self.stats.leaves += 1;
            *self
                .stats
                .leaves_by_reason
                .entry(reason.as_str())
                .or_default() += 1;
            tracing::info!(name = %s.name, addr = %s.addr, reason = reason.as_str(), "left");
            self.announce(Change::Left {
                name: s.name.clone(),
                reason: reason.as_str().into(),
            });
            // In a cluster the name's record keeps it for its key.
            if self.cluster.is_some() {
                return self.cluster_left(conn, &s.folded, reason, now);
            }
            let until = now + self.config.name_grace;
            self.reserved_order.push_back((until, s.folded.clone()));
            let reservation = Reservation {
                name: s.name.clone(),
                key: s.key,
                until,
            };
            self.reserved.insert(s.folded, reservation);
            self.owners_changed = true;
            self.limit_reservations();
        }
    }

    /// The connection is gone (the loop says so). A close the registry asked
    /// for itself finds nothing left to do.
    pub fn on_closed(&mut self, conn: C, how: Disconnect, now: Instant) {
        if self.probe_closed(conn) {
            return;
        }
        let reason = match how {
            Disconnect::Lost => LeftReason::Disconnected,
            Disconnect::Slow => LeftReason::Slow,
            Disconnect::BadFrame(err) => {
                let code = match err {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    FrameError::Empty => ErrorCode::Protocol,
                };
                let (addr, name) = self.who(conn);
                tracing::info!(%addr, %name, %err, "closing a connection that broke the framing");
                if matches!(self.conns.get(&conn), Some(LinkState::Registering(_))) {
                    self.count_rejection(code);
                }
                // After relay_ready a relay connection's frames are the
                // peers' bytes: a message there would only garble them.
                if !self.relays.is_paired(conn) {
                    let frame = protocol::frame(&FromRegistry::error(code, err.to_string()));
                    self.actions.push_back(Action::Send(conn, frame));
                }
                LeftReason::Protocol
            }
        };
        self.remove(conn, reason, now);
        self.conns.remove(&conn);
        self.relay_closed(conn);
    }

    /// When [`Registry::handle_timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_wake()
    }

    /// Fires every timer due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.timers.expire(now, |timer| due.push(timer));
        for timer in due {
            self.fire(timer, now);
        }
    }

    fn fire(&mut self, timer: Timer<C>, now: Instant) {
        match timer {
            Timer::RegisterDeadline(conn) => match self.conns.get(&conn) {
                Some(LinkState::Registering(_)) => {
                    let secs = self.config.register_timeout.as_secs_f64();
                    self.reject(
                        conn,
                        ErrorCode::HandshakeTimeout,
                        format!("no register message within {secs}s"),
                    );
                }
                Some(LinkState::Claiming(_)) => self.reject(
                    conn,
                    ErrorCode::Unavailable,
                    "the cluster did not confirm the name in time; try again".into(),
                ),
                _ => {}
            },
            // Nothing to do here: the turn it ends sends what is due.
            Timer::Flush => {}
            Timer::RelayInvitation(id) => self.relay_invitation_due(id),
            Timer::RelayRate(conn) => self.relay_rate_due(conn, now),
            Timer::RelayStall(conn) => self.relay_stall_due(conn, now),
            Timer::ProbeDeadline(link) => self.probe_due(link),
            Timer::ClusterCheck => self.cluster_check(now),
            Timer::Liveness(conn) => {
                let Some(session) = self.session(conn) else {
                    return;
                };
                let deadline = session.last_seen + self.config.timeout;
                if now >= deadline {
                    self.stats.evictions += 1;
                    self.remove(conn, LeftReason::Timeout, now);
                    self.actions.push_back(Action::Close(
                        conn,
                        "evicted: silent past the timeout".into(),
                    ));
                } else {
                    // Heartbeats only move `last_seen`; the check re-arms
                    // itself here instead of on every heartbeat.
                    self.timers.arm(deadline, Timer::Liveness(conn));
                }
            }
        }
    }

    /// Tells every registered peer the registry is going away and closes
    /// every connection.
    pub fn shutdown(&mut self, reason: &str) {
        self.stopping = Some(reason.into());
        let notice = protocol::frame(&FromRegistry::Shutdown {
            reason: reason.into(),
        });
        for (conn, state) in self.conns.drain() {
            if let LinkState::Registered(_) = state {
                self.actions.push_back(Action::Send(conn, notice.clone()));
            }
            self.actions
                .push_back(Action::Close(conn, "registry shutting down".into()));
        }
        self.relay_shutdown();
        self.probe_shutdown();
        self.names.clear();
        self.order.clear();
        self.parts.clear();
        self.forget_changes();
    }
}

pub(crate) fn entry_of(s: &Session) -> PeerEntry {
    PeerEntry {
        name: s.name.clone(),
        addr: s.addr.to_string(),
        key: s.key,
        reachable: s.reachable,
    }
}

/// Only a probe's result carries `reachable` in a `moved`: a move to a
/// new address makes it unknown again.
fn is_probe_news(change: &Change) -> bool {
    matches!(
        change,
        Change::Moved {
            reachable: Some(_),
            ..
        }
    )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

mod cluster;
mod lookalikes;
mod machine;
mod owners;
mod probe;
mod push;
mod registration;
mod relay;
mod reversal;
mod window;

#[cfg(test)]
mod tests;
