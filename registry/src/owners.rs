//! Who owns which name: the names of peers online, and those kept for the
//! key of a peer that left until a grace ends. They outlive the process
//! (the binary saves and restores them), so that neither a leave nor a
//! restart opens a window for another key to take a name.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{fold_name, name_skeleton};

use crate::Registry;

/// A name whose peer left, kept for its key until the grace ends.
pub(crate) struct Reservation {
    /// As the peer registered it.
    pub name: String,
    pub key: PublicKey,
    pub until: Instant,
}

/// Who owns a name, in the form that outlives the process: the registry
/// saves these and restores them at start, so that a restart opens no
/// window for another key to take a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub key: PublicKey,
    /// `None` while the owner is online; else how long its name stays
    /// reserved.
    pub reserved_for: Option<Duration>,
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// Every name with an owner: the peers online and the reservations
    /// still running, in no particular order.
    pub fn owners(&self, now: Instant) -> Vec<Owner> {
        let online = self.local_sessions().map(|(_, s)| Owner {
            name: s.name.clone(),
            key: s.key,
            reserved_for: None,
        });
        let reserved = self.reserved.values().filter(|r| r.until > now);
        let reserved = reserved.map(|r| Owner {
            name: r.name.clone(),
            key: r.key,
            reserved_for: Some(r.until - now),
        });
        online.chain(reserved).collect()
    }

    /// Whether [`Registry::owners`] has changed since the last call.
    pub fn take_owners_changed(&mut self) -> bool {
        std::mem::take(&mut self.owners_changed)
    }

    /// Takes back the owners saved by an earlier run, before any peer
    /// registers. Names that were online are reserved for a full grace
    /// (their peers are probably coming back); no reservation runs longer
    /// than the grace.
    pub fn restore(&mut self, owners: Vec<Owner>, now: Instant) {
        debug_assert!(
            self.names.is_empty() && self.reserved_order.is_empty(),
            "restored into a registry already in use"
        );
        let grace = self.config.name_grace;
        let mut restored: Vec<(Instant, String, Reservation)> = owners
            .into_iter()
            .filter_map(|o| {
                let left = o.reserved_for.unwrap_or(grace).min(grace);
                let until = now + left;
                (!left.is_zero()).then(|| {
                    let folded = fold_name(&o.name);
                    let reservation = Reservation {
                        name: o.name,
                        key: o.key,
                        until,
                    };
                    (until, folded, reservation)
                })
            })
            .collect();
        // A record from before the look-alike rule may hold two names that
        // read alike: the one kept longest (online ones first) stays, so
        // that its owner is not refused its own name meanwhile.
        restored.sort_by_key(|(until, _, _)| std::cmp::Reverse(*until));
        let mut looks: HashMap<String, String> = HashMap::new();
        restored.retain(|(_, folded, reservation)| {
            let look = name_skeleton(folded);
            match looks.get(&look) {
                Some(kept) if kept != folded => {
                    tracing::warn!(name = %reservation.name, "not restored: it reads like another restored name");
                    false
                }
                _ => {
                    looks.insert(look, folded.clone());
                    true
                }
            }
        });
        // The queue stays in deadline order: every later reservation gets a
        // full grace from a later time.
        restored.sort_by_key(|(until, _, _)| *until);
        for (until, folded, reservation) in restored {
            self.reserved_order.push_back((until, folded.clone()));
            if self.reserved.insert(folded.clone(), reservation).is_none() {
                self.lookalikes.hold(self.lookalikes.look(&folded));
            }
        }
        self.limit_reservations();
        // Saved again at once: the `online` lines are reservations now, and
        // another crash must not start their grace over.
        self.owners_changed = true;
    }

    /// Names kept for the key of a peer that left.
    pub fn reserved_count(&self) -> usize {
        self.reserved.len()
    }

    /// Keeps at most `max_peers` reservations, dropping the oldest first:
    /// a key that registers and leaves name after name cannot grow the
    /// table past the size of the directory.
    pub(crate) fn limit_reservations(&mut self) {
        while self.reserved.len() > self.config.max_peers {
            let Some((until, folded)) = self.reserved_order.pop_front() else {
                break;
            };
            if self.reserved.get(&folded).is_some_and(|r| r.until == until) {
                self.reserved.remove(&folded);
                self.lookalikes.release(&folded);
                self.owners_changed = true;
            }
        }
    }

    /// Drops the reservations whose grace has ended.
    pub(crate) fn expire_reservations(&mut self, now: Instant) {
        while let Some((until, _)) = self.reserved_order.front() {
            if *until > now {
                break;
            }
            let Some((_, folded)) = self.reserved_order.pop_front() else {
                break;
            };
            // A name reserved again later has a later end; keep that one.
            if self.reserved.get(&folded).is_some_and(|r| r.until <= now) {
                self.reserved.remove(&folded);
                self.lookalikes.release(&folded);
                self.owners_changed = true;
            }
        }
    }
}
