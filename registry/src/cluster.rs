//! Cluster mode, the sans-IO half: several registries share one directory
//! and one set of names through a replicated key-value bucket (NATS
//! JetStream's, driven by `nats.rs` on a thread of its own).
//!
//! Each name has one record in the bucket, under a key made from how the
//! name reads (its skeleton), so that names that read alike share a record
//! and the look-alike rule holds across the cluster. A record says which
//! key owns the name and whether its peer is online (at which registry and
//! address) or left (kept for its key until a Unix time). Records change
//! only by compare-and-set on the bucket's revisions: two registries that
//! race for a name, or that are cut off from each other, cannot both win.
//!
//! The bucket's ordered change feed is this registry's view of the cluster:
//! records of peers online at other registries are listed in the directory
//! like local peers, and their changes go out in the same updates. The
//! view may lag; every write says which revision it expects, so a stale
//! view costs a retry, never a wrong owner. A registry that stops
//! heartbeating is dead once this registry's own heartbeats have gone
//! round for a timeout without one of its: its peers that did not move
//! to another registry meanwhile are then marked left (`timeout`).
//!
//! Here: the records, claims and writes. `cluster/listing.rs` turns
//! records into the directory; `cluster/health.rs` finds dead
//! registries, resynchronises after failures and removes expired names.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{fold_name, name_skeleton, ErrorCode, LeftReason, PeerEntry};
use serde::{Deserialize, Serialize};

use crate::registration::Newcomer;
use crate::{LinkState, Registry, Timer};

/// How many times a claim is decided again after the bucket moved under
/// it, before the name counts as contested and is refused.
const CLAIM_TRIES: u8 = 4;

/// How often records whose name grace is over are looked for.
const EXPIRY_SCAN: Duration = Duration::from_secs(60);

/// How long a registration waits for the cluster to confirm its name
/// before it is refused as `unavailable`: well within the 5 s a peer gives
/// a registry to answer, so that it hears why.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// A name's record in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    /// As its owner registered it.
    pub name: String,
    pub key: PublicKey,
    pub state: RecordState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// Registered at `registry`, dialed at `addr`.
    Online {
        registry: String,
        addr: String,
        reachable: Option<bool>,
    },
    /// Gone for `reason`; the name is kept for its key until `until`
    /// (Unix seconds).
    Left { reason: String, until: u64 },
}

/// What the cluster thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A record, in the bucket's order; `None` when it was deleted. A
    /// record that cannot be decoded comes as `None` too (the thread logs
    /// it): nobody can hold a name through it.
    Record {
        key: String,
        revision: u64,
        record: Option<NameRecord>,
    },
    /// The feed has delivered the bucket as it was when it (re)started.
    CaughtUp,
    /// A registry's heartbeat came round the feed.
    Alive {
        registry: String,
    },
    /// The connection to the cluster is up, or lost.
    Up,
    Down {
        reason: String,
    },
    /// A write asked for with [`ClusterWrite`] ended.
    Written {
        id: u64,
        result: WriteResult,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    Done {
        revision: u64,
    },
    /// The record was not at the revision expected; this is what it is
    /// now (`None`: absent or deleted).
    Conflict {
        current: Option<(u64, NameRecord)>,
    },
    /// The write could not be made, or its outcome is unknown.
    Failed {
        reason: String,
    },
}

/// A compare-and-set on one record: a new record, or (`None`) the
/// record's removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterWrite {
    pub id: u64,
    pub key: String,
    pub record: Option<NameRecord>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The record must not exist (or be deleted).
    Absent,
    /// The record must be at this revision.
    Revision(u64),
}

/// The bucket key of a name: the hex of its skeleton's UTF-8, so that
/// names that read alike share one record, within the characters a
/// bucket key allows.
pub fn record_key(folded: &str) -> String {
    use std::fmt::Write;
    name_skeleton(folded)
        .bytes()
        .fold(String::new(), |mut key, b| {
            let _ = write!(key, "{b:02x}");
            key
        })
}

/// A registration waiting for the cluster to confirm its name.
pub(crate) struct Claim {
    pub who: Newcomer,
    record_key: String,
    tries: u8,
}

impl Claim {
    pub(crate) fn new(who: Newcomer) -> Self {
        Claim {
            record_key: record_key(&who.folded),
            who,
            tries: 0,
        }
    }
}

/// Why a write was made: what its result means.
enum Purpose<C> {
    Claim(C),
    /// Keeps the record of a local session up to date (its address, its
    /// probe result, or after the cluster lost it).
    Assert,
    /// Marks a peer gone.
    Release,
    /// Removes a record whose name grace is over.
    Expire,
}

pub(crate) struct Cluster<C> {
    id: String,
    /// A wall-clock reading and the instant it was taken: reservations in
    /// the bucket end at Unix times.
    anchor: (Instant, SystemTime),
    up: bool,
    caught_up: bool,
    /// A write failed or the connection was lost: local sessions and the
    /// bucket are compared once the feed is up again.
    resync: bool,
    /// The bucket as the feed has shown it: key → revision and record.
    records: HashMap<String, (u64, NameRecord)>,
    /// Peers of other registries in the directory: record key → order.
    listed: HashMap<String, u64>,
    /// Local sessions by record key.
    local: HashMap<String, C>,
    /// Writes in flight: their record key, what they write, and why.
    writes: HashMap<u64, (String, Option<NameRecord>, Purpose<C>)>,
    /// Record keys with a write other than a claim in flight: one at a
    /// time, as each expects the revision the last one made. What a key
    /// should hold is worked out again when its write ends.
    flying: HashSet<String>,
    /// Record keys with claims in flight, and how many.
    claiming: HashMap<String, usize>,
    /// Why local peers whose release had to wait left.
    left_reasons: HashMap<String, LeftReason>,
    /// When the records whose grace is over were last looked for.
    expired_at: Instant,
    out: VecDeque<ClusterWrite>,
    next_write: u64,
    /// When each registry's heartbeat (ours included) last came round.
    heard: HashMap<String, Instant>,
}

impl<C: Copy + Eq + Hash + Debug> Cluster<C> {
    pub(crate) fn new(id: String, now: Instant, wall: SystemTime) -> Self {
        Cluster {
            id,
            anchor: (now, wall),
            up: false,
            caught_up: false,
            resync: false,
            records: HashMap::new(),
            listed: HashMap::new(),
            local: HashMap::new(),
            writes: HashMap::new(),
            flying: HashSet::new(),
            claiming: HashMap::new(),
            left_reasons: HashMap::new(),
            expired_at: now,
            out: VecDeque::new(),
            next_write: 0,
            heard: HashMap::new(),
        }
    }

    fn unix(&self, now: Instant) -> u64 {
        let wall = self.anchor.1 + now.saturating_duration_since(self.anchor.0);
        wall.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Asks for a write against the revision in our view. A write other
    /// than a claim waits while another is in flight for its key (and is
    /// worked out again when that one ends): `false` then.
    fn write(&mut self, key: String, record: Option<NameRecord>, purpose: Purpose<C>) -> bool {
        match purpose {
            Purpose::Claim(_) => *self.claiming.entry(key.clone()).or_default() += 1,
            _ if !self.flying.insert(key.clone()) => return false,
            _ => {}
        }
        let expect = match self.records.get(&key) {
            Some((revision, _)) => Expect::Revision(*revision),
            None => Expect::Absent,
        };
        let id = self.next_write;
        self.next_write += 1;
        self.out.push_back(ClusterWrite {
            id,
            key: key.clone(),
            record: record.clone(),
            expect,
        });
        self.writes.insert(id, (key, record, purpose));
        true
    }

    /// Whether any write, a claim or another, is in flight for `key`.
    fn writing(&self, key: &str) -> bool {
        self.flying.contains(key) || self.claiming.contains_key(key)
    }

    /// A write ended: its key is free for the next.
    fn landed(&mut self, key: &str, purpose: &Purpose<C>) {
        match purpose {
            Purpose::Claim(_) => {
                if let Some(n) = self.claiming.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        self.claiming.remove(key);
                    }
                }
            }
            _ => {
                self.flying.remove(key);
            }
        }
    }

    /// Whether the record says its peer is registered here.
    fn is_ours(&self, record: &NameRecord) -> bool {
        matches!(&record.state, RecordState::Online { registry, .. } if *registry == self.id)
    }

    fn online(
        &self,
        name: &str,
        key: PublicKey,
        addr: SocketAddr,
        reachable: Option<bool>,
    ) -> NameRecord {
        NameRecord {
            name: name.to_string(),
            key,
            state: RecordState::Online {
                registry: self.id.clone(),
                addr: addr.to_string(),
                reachable,
            },
        }
    }
}

/// Whether `record` keeps its name from `key` at `unix` seconds.
fn held_against(record: &NameRecord, key: PublicKey, unix: u64) -> bool {
    record.key != key && held(record, unix)
}

/// Whether `record` still holds its name at `unix` seconds.
fn held(record: &NameRecord, unix: u64) -> bool {
    match record.state {
        RecordState::Online { .. } => true,
        RecordState::Left { until, .. } => until > unix,
    }
}

fn entry_of_record(record: &NameRecord) -> Option<PeerEntry> {
    match &record.state {
        RecordState::Online {
            addr, reachable, ..
        } => Some(PeerEntry {
            name: record.name.clone(),
            addr: addr.clone(),
            key: record.key,
            reachable: *reachable,
        }),
        RecordState::Left { .. } => None,
    }
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// Serves one directory with the registries of a cluster, as `id`.
    pub fn join_cluster(&mut self, id: String, now: Instant, wall: SystemTime) {
        self.cluster = Some(Cluster::new(id, now, wall));
        self.timers
            .arm(now + self.config.heartbeat, Timer::ClusterCheck);
    }

    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// The next write for the cluster thread.
    pub fn poll_cluster_write(&mut self) -> Option<ClusterWrite> {
        self.cluster.as_mut()?.out.pop_front()
    }

    /// Peers of other registries in the directory.
    pub fn remote_count(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.listed.len())
    }

    pub fn cluster_event(&mut self, event: ClusterEvent, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        match event {
            ClusterEvent::Up => {
                tracing::info!("cluster connection up");
                cluster.up = true;
            }
            ClusterEvent::Down { reason } => {
                if cluster.up {
                    tracing::warn!(%reason, "cluster connection lost; names cannot be confirmed until it is back");
                }
                cluster.up = false;
                cluster.resync = true;
            }
            ClusterEvent::CaughtUp => {
                if !cluster.caught_up {
                    tracing::info!(records = cluster.records.len(), "cluster directory loaded");
                }
                cluster.caught_up = true;
                cluster.up = true;
                if std::mem::take(&mut cluster.resync) {
                    self.resync(now);
                }
            }
            ClusterEvent::Alive { registry } => {
                // Our own heartbeat came round: writes and the feed work
                // again, whether or not the connection was seen to drop.
                let ours = registry == cluster.id;
                cluster.heard.insert(registry, now);
                if ours && cluster.caught_up && std::mem::take(&mut cluster.resync) {
                    self.resync(now);
                }
            }
            ClusterEvent::Record {
                key,
                revision,
                record,
            } => self.apply_record(key, revision, record, now),
            ClusterEvent::Written { id, result } => self.written(id, result, now),
        }
    }

    /// A registration whose name must be confirmed by the cluster first.
    pub(crate) fn claim(&mut self, conn: C, claim: Claim, now: Instant) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        if !cluster.up || !cluster.caught_up || self.cut_off(now).is_some() {
            return self.reject(
                conn,
                ErrorCode::Unavailable,
                "this registry cannot reach its cluster to confirm names; try again (or another registry of the cluster)".into(),
            );
        }
        if !self.refused_as_full(conn) {
            self.decide_claim(conn, claim, now);
        }
    }

    /// Writes the claim, or refuses it, as the view of its record says.
    fn decide_claim(&mut self, conn: C, mut claim: Claim, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let unix = cluster.unix(now);
        if let Some((_, record)) = cluster.records.get(&claim.record_key) {
            let same_name = fold_name(&record.name) == claim.who.folded;
            // One key may take its own name back from anywhere, but not a
            // look-alike spelling of it, as with a registry alone.
            let blocks = held_against(record, claim.who.key, unix)
                || (!same_name && record.key == claim.who.key && held(record, unix));
            if blocks {
                let (code, why) = if same_name {
                    let why = match record.state {
                        RecordState::Online { .. } => format!(
                            "the name {:?} is taken by a peer that is online",
                            claim.who.name
                        ),
                        RecordState::Left { until, .. } => format!(
                            "the name {:?} is kept for the key of the peer that had it, for another {}s",
                            claim.who.name,
                            until.saturating_sub(unix)
                        ),
                    };
                    (ErrorCode::NameTaken, why)
                } else {
                    (ErrorCode::NameConfusable, format!(
                        "the name {:?} looks like the name of a peer that is online or left recently; choose one that reads differently",
                        claim.who.name
                    ))
                };
                return self.reject(conn, code, why);
            }
        }
        if claim.tries == 0 {
            self.timers
                .arm(now + CLAIM_TIMEOUT, Timer::RegisterDeadline(conn));
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        claim.tries += 1;
        let record = cluster.online(&claim.who.name, claim.who.key, claim.who.addr, None);
        cluster.write(claim.record_key.clone(), Some(record), Purpose::Claim(conn));
        self.conns
            .insert(conn, LinkState::Claiming(Box::new(claim)));
    }

    fn written(&mut self, id: u64, result: WriteResult, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some((key, written, purpose)) = cluster.writes.remove(&id) else {
            return;
        };
        cluster.landed(&key, &purpose);
        let done = matches!(result, WriteResult::Done { .. });
        match result {
            // A claim is admitted before its record counts as seen: a peer
            // listed from another registry moves here instead of leaving.
            WriteResult::Done { revision } => match (purpose, written) {
                (Purpose::Claim(conn), Some(written)) => {
                    let overtaken = cluster
                        .records
                        .get(&key)
                        .is_some_and(|(known, _)| *known > revision);
                    if !overtaken {
                        cluster.records.insert(key.clone(), (revision, written));
                        self.claimed(conn, &key, revision, now);
                    } else if matches!(self.conns.get(&conn), Some(LinkState::Claiming(_))) {
                        // The feed already showed a later registration (the
                        // peer went on elsewhere): this claim is stale, and
                        // the record not ours to undo.
                        self.reject(
                            conn,
                            ErrorCode::Unavailable,
                            "a later registration of this name overtook this one; try again".into(),
                        );
                    }
                }
                (Purpose::Assert | Purpose::Release, Some(written)) => {
                    self.apply_record(key.clone(), revision, Some(written), now)
                }
                // The feed brings the removal.
                _ => {}
            },
            WriteResult::Conflict { current } => {
                // A record we cannot read is not rewritten over and over:
                // only a record we know is worked out again.
                let known = current.is_some();
                // What the bucket holds now is news like any other.
                match current {
                    Some((revision, record)) => {
                        self.apply_record(key.clone(), revision, Some(record), now)
                    }
                    // Gone, or unreadable: it lists nobody.
                    None => {
                        if let Some(cluster) = self.cluster.as_mut() {
                            cluster.records.remove(&key);
                        }
                        self.list_remote(key.clone(), None, None);
                    }
                }
                if let Purpose::Claim(conn) = purpose {
                    match self.conns.remove(&conn) {
                        Some(LinkState::Claiming(claim)) if claim.tries < CLAIM_TRIES => {
                            self.decide_claim(conn, *claim, now)
                        }
                        // Not a refusal: a peer gives up on a name taken.
                        Some(LinkState::Claiming(claim)) => self.reject(
                            conn,
                            ErrorCode::Unavailable,
                            format!("the name {:?} is contested; try again", claim.who.name),
                        ),
                        Some(other) => {
                            self.conns.insert(conn, other);
                        }
                        None => {}
                    }
                }
                if known {
                    self.reconcile(&key, now);
                }
            }
            WriteResult::Failed { reason } => {
                tracing::warn!(record = %key, %reason, "cluster write failed");
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.resync = true;
                }
                if let Purpose::Claim(conn) = purpose {
                    if matches!(self.conns.get(&conn), Some(LinkState::Claiming(_))) {
                        self.reject(
                            conn,
                            ErrorCode::Unavailable,
                            format!("the cluster could not confirm the name: {reason}; try again"),
                        );
                    }
                }
            }
        }
        if done {
            self.reconcile(&key, now);
        }
    }

    /// The cluster gave the name to a waiting registration: it joins, or,
    /// if it was online at another registry, moves here.
    fn claimed(&mut self, conn: C, record_key: &str, revision: u64, now: Instant) {
        let claim = match self.conns.remove(&conn) {
            Some(LinkState::Claiming(claim)) => claim,
            other => {
                if let Some(other) = other {
                    self.conns.insert(conn, other);
                }
                // It went (closed, or its deadline passed) while the claim
                // was in flight: the name it took is given back.
                self.release(record_key, revision, LeftReason::Disconnected, now);
                return;
            }
        };
        let who = claim.who;
        // Another session of this key took the name here meanwhile (two
        // claims raced): this one replaces it, as on a registry alone.
        if let Some(&old) = self.names.get(&who.folded) {
            return self.reclaim(conn, old, who, now);
        }
        self.admit_claimed(conn, who, now);
    }

    /// Marks the record at `revision` left, unless it has moved on.
    fn release(&mut self, record_key: &str, revision: u64, reason: LeftReason, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some((known, record)) = cluster.records.get(record_key) else {
            return;
        };
        if *known != revision {
            return;
        }
        let record = NameRecord {
            name: record.name.clone(),
            key: record.key,
            state: RecordState::Left {
                reason: reason.as_str().into(),
                until: cluster.unix(now) + self.config.name_grace.as_secs(),
            },
        };
        if !cluster.write(record_key.to_string(), Some(record), Purpose::Release) {
            cluster.left_reasons.insert(record_key.to_string(), reason);
        }
    }

    /// A write on `key` ended (or could not be made): the record is made
    /// to say what this registry knows, if it is this registry's to say.
    /// A local session's record says it is online here; a record that
    /// says a peer is online here when no session has it says it left.
    fn reconcile(&mut self, key: &str, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.writing(key) {
            return;
        }
        if let Some(&conn) = cluster.local.get(key) {
            return self.cluster_assert(conn);
        }
        let stale = cluster
            .records
            .get(key)
            .filter(|(_, r)| cluster.is_ours(r))
            .map(|(revision, _)| *revision);
        if let Some(revision) = stale {
            let reason = cluster
                .left_reasons
                .remove(key)
                .unwrap_or(LeftReason::Disconnected);
            self.release(key, revision, reason, now);
        }
    }

    /// A local session ended: its record says so, its name kept for its
    /// key for the grace.
    pub(crate) fn cluster_left(&mut self, conn: C, folded: &str, reason: LeftReason, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let key = record_key(folded);
        if cluster.local.get(&key) != Some(&conn) {
            return;
        }
        cluster.local.remove(&key);
        if let Some((revision, _)) = cluster.records.get(&key) {
            let revision = *revision;
            self.release(&key, revision, reason, now);
        }
    }

    /// A local session's record must say what the session is now.
    pub(crate) fn cluster_assert(&mut self, conn: C) {
        let Some(LinkState::Registered(s)) = self.conns.get(&conn) else {
            return;
        };
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let key = record_key(&s.folded);
        cluster.local.insert(key.clone(), conn);
        let record = cluster.online(&s.name, s.key, s.addr, s.reachable);
        if cluster.records.get(&key).is_some_and(|(_, r)| *r == record) {
            return;
        }
        // If a write is in flight, its end works this one out again.
        cluster.write(key, Some(record), Purpose::Assert);
    }
}

mod health;
mod listing;
