//! Links relayed through the registry (PROTOCOL.md 4.6), for peers that
//! cannot dial each other: the opener's relay connection and the invited
//! peer's are paired, and each frame one sends is passed to the other as
//! it is. The bytes are a Noise session between the two peers, so the
//! registry carries ciphertext it cannot read or forge.
//!
//! What it costs is bounded: a pair holds at most [`RELAY_WINDOW`] bytes
//! a direction unwritten (then the registry stops reading the sender until
//! the other end drains, and TCP pushes back), and every peer and the
//! registry as a whole relay at most their byte rates (token buckets; a
//! sender over its rate is not read until it is under again).

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{self, fold_name, ErrorCode, FromRegistry, RELAY_CHUNK};
use peerchat_core::wire;

use crate::{Action, Registry, Timer};

/// Bytes a direction of a pair may hold unwritten. The registry stops
/// reading the sender two frames short of it: what one read already took
/// in still goes through.
pub const RELAY_WINDOW: usize = 256 * 1024;
pub(crate) const PAUSE_AT: usize = RELAY_WINDOW - 2 * RELAY_CHUNK;
/// How long an invited peer has to join.
pub const INVITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a direction may stay full (its receiver not reading) before
/// the pair is closed: a stalled pair holds its window and two relay
/// connections' worth of the registry's limits.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys whose relays all closed are kept, with their rate's debt, for at
/// least this many beyond the keys with relays open: closing and reopening
/// must not refill a bucket.
const IDLE_BUCKETS: usize = 64;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Off: every `relay_open` gets `relay_refused`.
    pub enabled: bool,
    /// Bytes a second one peer's relay connections may send, together.
    pub peer_rate: u64,
    /// Bytes a second all relay connections may send, together.
    pub total_rate: u64,
    /// Relay connections one key may hold (each pair is one at each end).
    pub per_peer: usize,
    /// Relay connections in all.
    pub max: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            enabled: true,
            peer_rate: 2 * 1024 * 1024,
            total_rate: 64 * 1024 * 1024,
            per_peer: 64,
            max: 4096,
        }
    }
}

/// Counters for the stats line and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes passed from one end of a pair to the other.
    pub bytes: u64,
    /// Pairs that became ready.
    pub opened: u64,
    /// `relay_open`s refused or not answered.
    pub refused: u64,
    /// Relay connections open now (both ends of a pair count).
    pub ends: usize,
}

/// A byte rate: the bucket holds up to one second of it.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        let rate = rate as f64;
        Bucket {
            tokens: rate,
            rate,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity());
        self.at = now;
    }

    /// At least two full frames, so that a low rate still lets one through.
    fn capacity(&self) -> f64 {
        self.rate.max(2.0 * RELAY_CHUNK as f64)
    }

    /// Takes `n` bytes (going into debt if need be); how long until the
    /// debt is paid, if there is one.
    fn take(&mut self, n: usize, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= n as f64;
        self.debt()
    }

    fn debt(&self) -> Option<Duration> {
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// One relay connection.
struct End<C> {
    key: PublicKey,
    /// The other end, once the pair is ready.
    other: Option<C>,
    /// Bytes passed to `other` since it last had nothing queued.
    unwritten: usize,
    /// Not read until `other` drains; since when.
    held_by_window: Option<Instant>,
    /// Not read until the rates allow.
    held_by_rate: bool,
}

struct Invitation<C> {
    opener: C,
    /// The key that must join.
    key: PublicKey,
    name: String,
}

/// A key's relay connections and their shared rate.
struct PeerRelays {
    ends: usize,
    bucket: Bucket,
}

pub(crate) struct Relays<C> {
    config: RelayConfig,
    next_id: u64,
    invitations: HashMap<u64, Invitation<C>>,
    ends: HashMap<C, End<C>>,
    peers: HashMap<PublicKey, PeerRelays>,
    total: Option<Bucket>,
    stats: RelayStats,
}

impl<C: Copy + Eq + Hash + Debug> Relays<C> {
    pub(crate) fn new(config: RelayConfig) -> Self {
        Relays {
            config,
            next_id: 1,
            invitations: HashMap::new(),
            ends: HashMap::new(),
            peers: HashMap::new(),
            total: None,
            stats: RelayStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> RelayStats {
        RelayStats {
            ends: self.ends.len(),
            ..self.stats.clone()
        }
    }

    pub(crate) fn has(&self, conn: C) -> bool {
        self.ends.contains_key(&conn)
    }

    /// A paired relay connection: its frames are the peers' bytes.
    pub(crate) fn is_paired(&self, conn: C) -> bool {
        self.ends.get(&conn).is_some_and(|e| e.other.is_some())
    }

    fn add_end(&mut self, conn: C, key: PublicKey, other: Option<C>, now: Instant) {
        if self.peers.len() > self.ends.len() + IDLE_BUCKETS {
            // Keys without relays whose buckets are full again owe nothing.
            self.peers.retain(|_, p| {
                p.bucket.refill(now);
                p.ends > 0 || p.bucket.tokens < p.bucket.capacity()
            });
        }
        let rate = self.config.peer_rate;
        self.peers
            .entry(key)
            .or_insert_with(|| PeerRelays {
                ends: 0,
                bucket: Bucket::new(rate, now),
            })
            .ends += 1;
        self.ends.insert(
            conn,
            End {
                key,
                other,
                unwritten: 0,
                held_by_window: None,
                held_by_rate: false,
            },
        );
    }

    /// Forgets `conn`; returns the other end of its pair, if it had one.
    fn remove_end(&mut self, conn: C) -> Option<C> {
        let end = self.ends.remove(&conn)?;
        // The key's entry stays (see `IDLE_BUCKETS`): its bucket's debt
        // outlives its connections.
        if let Some(peer) = self.peers.get_mut(&end.key) {
            peer.ends -= 1;
        }
        self.invitations.retain(|_, i| i.opener != conn);
        end.other
    }

    /// Why `key` may not open another relay connection, if it may not.
    fn over_limit(&self, key: &PublicKey) -> Option<String> {
        if self.ends.len() >= self.config.max {
            return Some(format!(
                "the registry relays its maximum of {} connections",
                self.config.max
            ));
        }
        let held = self.peers.get(key).map_or(0, |p| p.ends);
        (held >= self.config.per_peer).then(|| {
            format!(
                "this key holds its maximum of {} relay connections",
                self.config.per_peer
            )
        })
    }
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// A secured connection's first frame asks to carry a link from the
    /// peer registered as `from` (under this session's key) to `to`.
    pub(crate) fn relay_open(
        &mut self,
        conn: C,
        key: PublicKey,
        from: &str,
        to: &str,
        now: Instant,
    ) {
        if !self.relays.config.enabled {
            return self.relay_refuse(
                conn,
                ErrorCode::RelayRefused,
                "this registry relays nothing (--no-relay)".into(),
            );
        }
        let opener = self
            .names
            .get(&fold_name(from.trim()))
            .and_then(|&c| self.session(c))
            .filter(|s| s.key == key)
            .map(|s| s.name.clone());
        let Some(opener) = opener else {
            return self.relay_refuse(
                conn,
                ErrorCode::UnknownPeer,
                format!("no peer {from:?} is registered under this connection's key"),
            );
        };
        let target = self.names.get(&fold_name(to.trim())).and_then(|&c| {
            self.session(c)
                .map(|s| (c, s.key, s.answers.relay, s.name.clone()))
        });
        let Some((target, target_key, takes_relays, target_name)) = target else {
            return self.relay_refuse(
                conn,
                ErrorCode::UnknownPeer,
                format!("no peer {to:?} is online"),
            );
        };
        if !takes_relays {
            return self.relay_refuse(
                conn,
                ErrorCode::Unreachable,
                format!("{target_name}'s client does not take relayed links"),
            );
        }
        if let Some(why) = self.relays.over_limit(&key) {
            return self.relay_refuse(conn, ErrorCode::RelayFull, why);
        }
        let id = self.relays.next_id;
        self.relays.next_id += 1;
        self.relays.invitations.insert(
            id,
            Invitation {
                opener: conn,
                key: target_key,
                name: target_name.clone(),
            },
        );
        self.relays.add_end(conn, key, None, now);
        let invite = FromRegistry::Relay { id, from: opener };
        self.actions
            .push_back(Action::Send(target, protocol::frame(&invite)));
        self.timers
            .arm(now + INVITE_TIMEOUT, Timer::RelayInvitation(id));
        tracing::debug!(from, to = %target_name, id, "relay invitation sent");
    }

    /// A secured connection's first frame answers invitation `id`.
    pub(crate) fn relay_join(&mut self, conn: C, key: PublicKey, id: u64, now: Instant) {
        let Some(invitation) = self.relays.invitations.remove(&id) else {
            return self.relay_refuse(
                conn,
                ErrorCode::Unreachable,
                format!("no relay invitation {id}: it expired, or its opener left"),
            );
        };
        if invitation.key != key {
            // Not the invited key: the invitation stays for the one it is.
            self.relays.invitations.insert(id, invitation);
            return self.relay_refuse(
                conn,
                ErrorCode::KeyMismatch,
                format!("relay invitation {id} is for another key"),
            );
        }
        let opener = invitation.opener;
        if let Some(why) = self.relays.over_limit(&key) {
            // The joiner's end counts like the opener's: neither waits.
            self.relays.remove_end(opener);
            self.send_error(opener, ErrorCode::RelayFull, why.clone());
            return self.relay_refuse(conn, ErrorCode::RelayFull, why);
        }
        self.relays.add_end(conn, key, Some(opener), now);
        if let Some(end) = self.relays.ends.get_mut(&opener) {
            end.other = Some(conn);
        }
        self.relays.stats.opened += 1;
        let ready = protocol::frame(&FromRegistry::RelayReady {});
        for end in [opener, conn] {
            self.actions
                .push_back(Action::SetMaxFrame(end, RELAY_CHUNK));
            self.actions.push_back(Action::Send(end, ready.clone()));
        }
        tracing::debug!(id, to = %invitation.name, "relay ready");
    }

    fn relay_refuse(&mut self, conn: C, code: ErrorCode, reason: String) {
        self.relays.stats.refused += 1;
        self.reject(conn, code, reason);
    }

    /// A frame on a relay connection: passed on as it is, once paired.
    pub(crate) fn relay_frame(&mut self, conn: C, body: &[u8], now: Instant) {
        let relays = &mut self.relays;
        let Some(end) = relays.ends.get_mut(&conn) else {
            return;
        };
        let Some(other) = end.other else {
            // The opener speaks only after relay_ready.
            let other = relays.remove_end(conn);
            debug_assert!(other.is_none());
            self.send_error(
                conn,
                ErrorCode::Protocol,
                "a frame on a relay connection before relay_ready".into(),
            );
            return;
        };
        relays.stats.bytes += body.len() as u64;
        self.actions
            .push_back(Action::Send(other, wire::encode_frame(body)));
        end.unwritten += body.len();
        if end.unwritten > PAUSE_AT && end.held_by_window.is_none() {
            end.held_by_window = Some(now);
            self.actions.push_back(Action::Reading(conn, false));
            self.actions.push_back(Action::WatchDrain(other));
            self.timers
                .arm(now + STALL_TIMEOUT, Timer::RelayStall(conn));
        }
        let peer_debt = relays
            .peers
            .get_mut(&end.key)
            .and_then(|p| p.bucket.take(body.len(), now));
        let total_rate = relays.config.total_rate;
        let total_debt = relays
            .total
            .get_or_insert_with(|| Bucket::new(total_rate, now))
            .take(body.len(), now);
        if let Some(wait) = peer_debt.max(total_debt) {
            if !end.held_by_rate {
                end.held_by_rate = true;
                if end.held_by_window.is_none() {
                    self.actions.push_back(Action::Reading(conn, false));
                }
                self.timers.arm(now + wait, Timer::RelayRate(conn));
            }
        }
    }

    /// `conn` wrote everything it was given: the end sending to it may be
    /// read again.
    pub(crate) fn relay_drained(&mut self, conn: C) {
        let Some(sender) = self.relays.ends.get(&conn).and_then(|e| e.other) else {
            return;
        };
        let Some(end) = self.relays.ends.get_mut(&sender) else {
            return;
        };
        end.unwritten = 0;
        if end.held_by_window.take().is_some() && !end.held_by_rate {
            self.actions.push_back(Action::Reading(sender, true));
        }
    }

    /// `conn`'s stall timer: if what it sent has waited unread for the
    /// whole timeout, the pair is closed.
    pub(crate) fn relay_stall_due(&mut self, conn: C, now: Instant) {
        let stalled = self
            .relays
            .ends
            .get(&conn)
            .and_then(|e| e.held_by_window)
            .is_some_and(|since| now.saturating_duration_since(since) >= STALL_TIMEOUT);
        if stalled {
            tracing::info!(
                ?conn,
                "a relayed link's receiver stopped reading; closing the pair"
            );
            self.actions.push_back(Action::Close(
                conn,
                "the other end of the relay stopped reading".into(),
            ));
            self.relay_closed(conn);
        }
    }

    /// The rate timer of `conn`: read it again once its debts are paid.
    pub(crate) fn relay_rate_due(&mut self, conn: C, now: Instant) {
        let relays = &mut self.relays;
        let Some(end) = relays.ends.get_mut(&conn) else {
            return;
        };
        let peer_debt = relays.peers.get_mut(&end.key).and_then(|p| {
            p.bucket.refill(now);
            p.bucket.debt()
        });
        let total_debt = relays.total.as_mut().and_then(|t| {
            t.refill(now);
            t.debt()
        });
        if let Some(wait) = peer_debt.max(total_debt) {
            self.timers.arm(now + wait, Timer::RelayRate(conn));
            return;
        }
        end.held_by_rate = false;
        if end.held_by_window.is_none() {
            self.actions.push_back(Action::Reading(conn, true));
        }
    }

    /// Invitation `id` was not answered in time.
    pub(crate) fn relay_invitation_due(&mut self, id: u64) {
        let Some(invitation) = self.relays.invitations.remove(&id) else {
            return;
        };
        self.relays.remove_end(invitation.opener);
        self.relays.stats.refused += 1;
        let secs = INVITE_TIMEOUT.as_secs();
        self.send_error(
            invitation.opener,
            ErrorCode::Unreachable,
            format!(
                "{} did not answer the relay invitation within {secs}s",
                invitation.name
            ),
        );
    }

    /// A relay connection closed: so does the other end of its pair.
    pub(crate) fn relay_closed(&mut self, conn: C) {
        if let Some(other) = self.relays.remove_end(conn) {
            self.relays.remove_end(other);
            self.actions.push_back(Action::Close(
                other,
                "the other end of the relay closed".into(),
            ));
        }
    }

    /// Every relay connection closes (the registry is stopping).
    pub(crate) fn relay_shutdown(&mut self) {
        for (conn, _) in self.relays.ends.drain() {
            self.actions
                .push_back(Action::Close(conn, "registry shutting down".into()));
        }
        self.relays.invitations.clear();
        self.relays.peers.clear();
    }
}
