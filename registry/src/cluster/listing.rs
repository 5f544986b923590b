//! Cluster mode: the directory follows the bucket's records, listing
//! the peers of the other registries and telling local peers of their
//! changes, and local sessions whose records moved on end.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

use peerchat_core::codec;
use peerchat_core::protocol::{self, fold_name, Change, ErrorCode, LeftReason, PeerEntry};

use super::{entry_of_record, record_key, NameRecord, RecordState};
use crate::registration::Newcomer;
use crate::{LinkState, Listed, Registry, PART_ENTRIES};

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// A record changed in the bucket (or a write told us it had): the
    /// directory follows it.
    pub(super) fn apply_record(
        &mut self,
        key: String,
        revision: u64,
        record: Option<NameRecord>,
        now: Instant,
    ) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster
            .records
            .get(&key)
            .is_some_and(|(known, _)| *known >= revision)
        {
            return;
        }
        match &record {
            Some(record) => {
                if let RecordState::Online { registry, .. } = &record.state {
                    if !cluster.heard.contains_key(registry) {
                        cluster.heard.insert(registry.clone(), now);
                    }
                }
                cluster
                    .records
                    .insert(key.clone(), (revision, record.clone()));
            }
            None => {
                cluster.records.remove(&key);
            }
        }
        let remote = record
            .as_ref()
            .is_some_and(|r| !cluster.is_ours(r) && entry_of_record(r).is_some());
        let ours = record.as_ref().is_some_and(|r| cluster.is_ours(r));
        let local = cluster.local.get(&key).copied();
        // Our claim's record, before the claim's answer: the claim moves
        // the listing when it is admitted.
        if ours && local.is_none() && cluster.claiming.contains_key(&key) {
            return;
        }
        let mut moved_away = None;
        if let Some(conn) = local {
            if let Some(LinkState::Registered(s)) = self.conns.get(&conn) {
                let same_key = record.as_ref().is_some_and(|r| r.key == s.key);
                match &record {
                    _ if ours => {}
                    // Our peer registered at another registry: this session
                    // is a stale one.
                    Some(_) if same_key && remote => moved_away = self.drop_replaced(conn),
                    // Marked left while this registry was cut off, or
                    // deleted: the session is alive, its record says so again.
                    _ if same_key || record.is_none() => {
                        self.cluster_assert(conn);
                        return;
                    }
                    // Another key has the name now (its grace ran out while
                    // this registry was cut off): the session loses it.
                    _ => {
                        tracing::warn!(name = %s.name, "another key took this name while the registry was cut off from its cluster");
                        self.cluster_lost_name(conn, now);
                    }
                }
            }
        }
        self.list_remote(key.clone(), record, moved_away);
        if ours && local.is_none() {
            // Says a peer is here that is not (a session that ended while
            // a write was in flight).
            self.reconcile(&key, now);
        }
    }

    /// The entry of the peer of another registry listed at `order`.
    fn remote_entry(&self, order: u64) -> Option<PeerEntry> {
        match self.order.get(&order) {
            Some(Listed::Remote(encoded)) => codec::decode(encoded).ok(),
            _ => None,
        }
    }

    /// Puts a peer of another registry in the directory, changes its
    /// listing, or takes it out, and tells everyone, as its record now
    /// says.
    ///
    /// `moved_away` is the entry of a local session whose peer registered
    /// at another registry: what the others knew of it, with nothing
    /// listed.
    pub(super) fn list_remote(
        &mut self,
        key: String,
        record: Option<NameRecord>,
        moved_away: Option<PeerEntry>,
    ) {
        let Some(listed) = self.cluster.as_ref().map(|c| c.listed.get(&key).copied()) else {
            return;
        };
        let before = listed
            .and_then(|order| self.remote_entry(order))
            .or(moved_away);
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let after = record
            .as_ref()
            .filter(|r| !cluster.is_ours(r))
            .and_then(entry_of_record);
        match (before, after) {
            (None, None) => {}
            (Some(before), None) => {
                if let Some(order) = listed {
                    self.unlist(order);
                }
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.listed.remove(&key);
                }
                let reason = match record.map(|r| r.state) {
                    Some(RecordState::Left { reason, .. }) => reason,
                    _ => LeftReason::Disconnected.as_str().into(),
                };
                self.announce(Change::Left {
                    name: before.name,
                    reason,
                });
            }
            // The same peer: its listing changes, or it comes from a
            // local session; a new spelling that folds otherwise is a new
            // name to peers, so it leaves and joins instead.
            (Some(before), Some(after))
                if before.key == after.key && fold_name(&before.name) == fold_name(&after.name) =>
            {
                if before == after && listed.is_some() {
                    return;
                }
                let order = listed.unwrap_or_else(|| {
                    let order = self.next_order;
                    self.next_order += 1;
                    order
                });
                let entry = protocol::item(&after);
                self.order.insert(order, Listed::Remote(entry));
                self.parts.remove(&(order / PART_ENTRIES));
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.listed.insert(key, order);
                }
                if before == after {
                    return;
                }
                let probe_news = before.addr == after.addr
                    && before.name == after.name
                    && after.reachable.is_some();
                self.announce(Change::Moved {
                    name: after.name,
                    addr: after.addr,
                    reachable: if probe_news { after.reachable } else { None },
                });
            }
            (before, Some(after)) => {
                if let Some(before) = before {
                    if let Some(order) = listed {
                        self.unlist(order);
                    }
                    self.announce(Change::Left {
                        name: before.name,
                        reason: LeftReason::Disconnected.as_str().into(),
                    });
                }
                let order = self.next_order;
                self.next_order += 1;
                let entry = protocol::item(&after);
                self.announce(Change::Joined {
                    name: after.name.clone(),
                    addr: after.addr.clone(),
                    key: after.key,
                });
                if let Some(reachable) = after.reachable {
                    self.announce(Change::Moved {
                        name: after.name.clone(),
                        addr: after.addr.clone(),
                        reachable: Some(reachable),
                    });
                }
                self.order.insert(order, Listed::Remote(entry));
                self.parts.remove(&(order / PART_ENTRIES));
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.listed.insert(key, order);
                }
            }
        }
    }

    /// A claimed registration becomes a session. A peer that was listed
    /// from another registry moves here rather than joining again.
    pub(super) fn admit_claimed(&mut self, conn: C, who: Newcomer, now: Instant) {
        let (name, addr, key) = (&who.name, who.addr, who.key);
        let record_key = record_key(&who.folded);
        let listed = self
            .cluster
            .as_mut()
            .and_then(|c| c.listed.remove(&record_key));
        let before = listed.and_then(|order| {
            let entry = self.remote_entry(order);
            self.unlist(order);
            entry
        });
        match before {
            Some(before) if before.key == key && fold_name(&before.name) == who.folded => {
                if before.addr != addr.to_string() || before.name != *name {
                    self.announce(Change::Moved {
                        name: name.clone(),
                        addr: addr.to_string(),
                        reachable: None,
                    });
                }
                tracing::info!(%name, %addr, "moved here from another registry");
            }
            before => {
                if let Some(before) = before {
                    self.announce(Change::Left {
                        name: before.name,
                        reason: LeftReason::Disconnected.as_str().into(),
                    });
                }
                self.announce_join(name, addr, key);
            }
        }
        self.admit(conn, who, now);
    }

    /// The peer of a local session registered at another registry: the
    /// session here is stale. Nobody hears `left`: the peer is online.
    /// Returns what the directory listed for it.
    fn drop_replaced(&mut self, conn: C) -> Option<PeerEntry> {
        let Some(LinkState::Registered(s)) = self.conns.remove(&conn) else {
            return None;
        };
        self.names.remove(&s.folded);
        self.unlist(s.order);
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.local.remove(&record_key(&s.folded));
        }
        tracing::info!(name = %s.name, "moved to another registry of the cluster");
        let notice = peerchat_core::protocol::FromRegistry::error(
            ErrorCode::Replaced,
            "a newer session of this key registered at another registry of the cluster",
        );
        self.actions.push_back(crate::Action::Send(
            conn,
            peerchat_core::protocol::frame(&notice),
        ));
        self.actions.push_back(crate::Action::Close(
            conn,
            "replaced by a new session".into(),
        ));
        Some(crate::entry_of(&s))
    }

    /// A local session's name went to another key: it ends.
    fn cluster_lost_name(&mut self, conn: C, now: Instant) {
        let Some(LinkState::Registered(s)) = self.conns.get(&conn) else {
            return;
        };
        let folded = s.folded.clone();
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.local.remove(&record_key(&folded));
        }
        // Out of `local` first: `remove` then leaves the record alone, as
        // it is not ours any more.
        self.remove(conn, LeftReason::Disconnected, now);
        self.send_error(
            conn,
            ErrorCode::NameTaken,
            "another key took this name while the registry was cut off from its cluster".into(),
        );
    }
}
