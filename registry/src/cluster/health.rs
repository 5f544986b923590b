//! Cluster mode: keeping the bucket true after failures, finding
//! registries that went silent, removing names whose grace is over, and
//! giving up local peers after a long cut.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use peerchat_core::protocol::{ErrorCode, LeftReason};

use super::{held, record_key, Purpose, RecordState, EXPIRY_SCAN};
use crate::{LinkState, Registry, Timer};

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// After the connection to the cluster came back, or a write failed:
    /// every local session's record is made to say so, and records that
    /// say a peer is here when it is not are marked left.
    pub(super) fn resync(&mut self, now: Instant) {
        let sessions: Vec<C> = self
            .conns
            .iter()
            .filter(|(_, state)| matches!(state, LinkState::Registered(_)))
            .map(|(conn, _)| *conn)
            .collect();
        tracing::info!(
            sessions = sessions.len(),
            "comparing local peers with the cluster"
        );
        for conn in sessions {
            self.cluster_assert(conn);
        }
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let stale: Vec<(String, u64)> = cluster
            .records
            .iter()
            .filter(|(key, (_, r))| {
                cluster.is_ours(r) && !cluster.local.contains_key(*key) && !cluster.writing(key)
            })
            .map(|(key, (revision, _))| (key.clone(), *revision))
            .collect();
        for (key, revision) in stale {
            self.release(&key, revision, LeftReason::Disconnected, now);
        }
    }

    /// Removes the records whose name grace is over, so that neither the
    /// bucket nor any registry's view keeps every name ever used. Any
    /// registry may; the compare-and-set keeps one removal.
    fn expire_records(&mut self, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let unix = cluster.unix(now);
        let over: Vec<String> = cluster
            .records
            .iter()
            .filter(|(key, (_, r))| !held(r, unix) && !cluster.flying.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in over {
            cluster.write(key, None, Purpose::Expire);
        }
    }

    /// How long this registry's heartbeats have not come round, once that
    /// is past half the name grace (and well past a timeout, whatever the
    /// grace): past the grace, another key may take a name it serves.
    pub(crate) fn cut_off(&self, now: Instant) -> Option<Duration> {
        let cluster = self.cluster.as_ref()?;
        let ours = *cluster.heard.get(&cluster.id)?;
        let cut_off = now.saturating_duration_since(ours);
        let limit =
            (self.config.name_grace / 2).max(self.config.timeout + 5 * self.config.heartbeat);
        (cut_off > limit).then_some(cut_off)
    }

    /// This registry's heartbeats have not come round for `cut_off`:
    /// its peers are told to register elsewhere, and their records are
    /// marked left once the cluster is back.
    fn leave_cluster_peers(&mut self, cut_off: Duration) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.local.is_empty() {
            return;
        }
        cluster.resync = true;
        let reason = format!(
            "this registry has been cut off from its cluster for {}s; register at another registry of the cluster",
            cut_off.as_secs()
        );
        tracing::warn!(%reason, "closing every local peer");
        let sessions: Vec<C> = self.local_sessions().map(|(c, _)| c).collect();
        for conn in sessions {
            if let Some(LinkState::Registered(s)) = self.conns.remove(&conn) {
                self.names.remove(&s.folded);
                self.unlist(s.order);
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.local.remove(&record_key(&s.folded));
                }
                self.send_error(conn, ErrorCode::Unavailable, reason.clone());
            }
        }
    }

    /// The periodic check: peers of registries that stopped heartbeating
    /// are marked left.
    pub(crate) fn cluster_check(&mut self, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        self.timers
            .arm(now + self.config.heartbeat, Timer::ClusterCheck);
        let timeout = self.config.timeout;
        // Judged only by heartbeats that came round the same feed as ours:
        // while the feed stalls, nobody is found dead.
        let Some(&ours) = cluster.heard.get(&cluster.id) else {
            return;
        };
        if !cluster.caught_up {
            return;
        }
        // Cut off for half a name grace: past the grace, another key may
        // take a name this registry still serves. Its peers go elsewhere.
        if let Some(cut_off) = self.cut_off(now) {
            return self.leave_cluster_peers(cut_off);
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if now.saturating_duration_since(cluster.expired_at) >= EXPIRY_SCAN {
            cluster.expired_at = now;
            self.expire_records(now);
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let dead: HashSet<String> = cluster
            .heard
            .iter()
            .filter(|(_, &heard)| ours.saturating_duration_since(heard) > timeout)
            .map(|(registry, _)| registry.clone())
            .collect();
        if dead.is_empty() {
            return;
        }
        let gone: Vec<(String, u64)> = cluster
            .records
            .iter()
            .filter(|(key, (_, r))| {
                matches!(&r.state, RecordState::Online { registry, .. } if dead.contains(registry))
                    && !cluster.flying.contains(*key)
            })
            .map(|(key, (revision, _))| (key.clone(), *revision))
            .collect();
        if gone.is_empty() {
            // Nothing of theirs is left: forget them.
            cluster.heard.retain(|registry, _| !dead.contains(registry));
            return;
        }
        tracing::info!(registries = ?dead, peers = gone.len(), "registries silent past the timeout; their peers left");
        for (key, revision) in gone {
            self.release(&key, revision, LeftReason::Timeout, now);
        }
    }
}
