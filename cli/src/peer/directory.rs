//! The directory: who is online as far as the registry told us, and the key
//! pinned for each name.
//!
//! Separate because both kinds of link check their keys against it, and
//! because it outlives registry sessions: a peer missing from the snapshot
//! of a re-registration is kept for a grace (it is probably re-registering
//! too) before it counts as gone. What a change means for links and
//! messages is left to the rooms that own them; [`Learned`] tells them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{fold_name, ErrorCode, PeerEntry};

use super::outbox::To;
use super::{pin_text, Actions, ByName, Code, Config, HostOutput, Pin, Reason, Timer};

pub(super) struct Known {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) key: PublicKey,
    /// The key differs from the one pinned for this name: no links.
    pub(super) mismatch: bool,
    /// Whether the registry could dial it back; `None` until it said.
    pub(super) reachable: Option<bool>,
    /// Missing from the snapshot of our latest registration.
    stale_since: Option<Instant>,
}

/// What learning a listing changed, for the links and the outbox.
pub(super) struct Learned {
    /// What waits for the name must not be sent, for this reason.
    pub(super) give_up: Option<Reason>,
    /// Another key holds the name: nothing of the old key's links or
    /// message ids carries over.
    pub(super) rekeyed: bool,
    /// Our link to the name, if any, reaches the wrong address or key now.
    pub(super) redial: bool,
    /// A new address or spelling, for the user to hear of.
    pub(super) moved: bool,
    /// The registry found it reachable now, where it was not: a relayed
    /// link to it may go direct.
    pub(super) reachable_now: bool,
    /// What the registry found of it, when that is news.
    pub(super) reachability: Option<bool>,
}

pub(super) struct Directory {
    /// Our own folded name, which is never listed here.
    me: String,
    /// By folded name.
    known: BTreeMap<String, Known>,
    /// Keys pinned per peer (folded name): those of `known_peers`, then
    /// each key a peer first proves.
    pins: ByName<PublicKey>,
    stale_grace: Duration,
    known_peers: String,
}

impl Directory {
    pub(super) fn new(config: &Config, pins: HashMap<String, PublicKey>) -> Self {
        Directory {
            me: fold_name(config.name.trim()),
            known: BTreeMap::new(),
            pins: pins.into_iter().collect(),
            stale_grace: config.stale_grace,
            known_peers: config.known_peers.clone(),
        }
    }

    pub(super) fn is_me(&self, folded: &str) -> bool {
        folded == self.me
    }

    pub(super) fn get(&self, folded: &str) -> Option<&Known> {
        self.known.get(folded)
    }

    pub(super) fn contains(&self, folded: &str) -> bool {
        self.known.contains_key(folded)
    }

    pub(super) fn len(&self) -> usize {
        self.known.len()
    }

    /// Everyone listed, as targets of a message to all, sorted by name.
    pub(super) fn targets(&self) -> Vec<To<'_>> {
        self.known
            .iter()
            .map(|(folded, k)| To {
                folded,
                key: k.key,
                name: &k.name,
                listed: true,
                mismatch: k.mismatch,
            })
            .collect()
    }

    /// The directory, sorted by name.
    pub(super) fn peers(&self) -> Vec<PeerEntry> {
        self.known
            .values()
            .map(|k| PeerEntry {
                name: k.name.clone(),
                addr: k.addr.to_string(),
                key: k.key,
                reachable: k.reachable,
            })
            .collect()
    }

    /// The name as the registry spells it, or the folded one once it is
    /// gone.
    pub(super) fn display_name(&self, folded: &str) -> String {
        self.known
            .get(folded)
            .map_or_else(|| folded.to_string(), |k| k.name.clone())
    }

    pub(super) fn pinned(&self, folded: &str) -> Option<PublicKey> {
        self.pins.get(folded).copied()
    }

    /// Trusts `key` for a peer from now on, if nothing was pinned for it.
    pub(super) fn pin(&mut self, folded: &str, key: PublicKey, actions: &mut Actions) {
        if self.pins.contains_key(folded) {
            return;
        }
        self.pins.insert(folded.to_string(), key);
        let name = self.display_name(folded);
        actions.host(HostOutput::Pin(Pin::Peer { name, key }));
    }

    /// Adds or refreshes an entry. A key other than the pinned one, or
    /// another key than before, is reported here, once.
    pub(super) fn learn(
        &mut self,
        folded: &str,
        name: String,
        addr: SocketAddr,
        key: PublicKey,
        reachable: Option<bool>,
        actions: &mut Actions,
    ) -> Learned {
        let mismatch = self.pins.get(folded).is_some_and(|k| *k != key);
        let mut reachable_now = false;
        let mut reachability = None;
        let (moved, renamed, rekeyed, newly_mismatched) = match self.known.get_mut(folded) {
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
                // What the registry found at the old address says nothing
                // of the new one.
                if reachable.is_some() || moved {
                    reachable_now = reachable == Some(true) && known.reachable != Some(true);
                    if reachable != known.reachable {
                        reachability = reachable;
                    }
                    known.reachable = reachable;
                }
                (moved, renamed, rekeyed, newly)
            }
            None => {
                self.known.insert(
                    folded.to_string(),
                    Known {
                        name: name.clone(),
                        addr,
                        key,
                        mismatch,
                        reachable,
                        stale_since: None,
                    },
                );
                (false, false, false, mismatch)
            }
        };
        let give_up = if newly_mismatched {
            let pinned = self.pins[folded];
            actions.error(
                ErrorCode::KeyMismatch,
                format!(
                    "the registry lists {name} with key {key}, but {pinned} is pinned for that name; links to and from {name} are refused. If {name} really has a new key (check with them: /whois {name}), delete the line \"{}\" (its name in any case) from {} and start again",
                    pin_text("peer", folded, &pinned),
                    self.known_peers
                ),
            );
            Some(Reason::Code(ErrorCode::KeyMismatch))
        } else if rekeyed {
            // Another key holds the name now (not one we had pinned): say
            // so, and hand it nothing that was meant for the old one.
            actions.error(
                Code::KeyChanged,
                format!("{name} is now listed with another key, {key}; messages still waiting for the old one are not sent"),
            );
            Some(Reason::KeyChanged)
        } else {
            None
        };
        Learned {
            give_up,
            rekeyed,
            redial: moved || rekeyed,
            moved: moved || renamed,
            reachable_now,
            reachability,
        }
    }

    /// Marks the peers a new registration did not list, and checks on them
    /// once the grace has passed.
    pub(super) fn mark_missing(
        &mut self,
        listed: &HashSet<String>,
        now: Instant,
        actions: &mut Actions,
    ) {
        let mut any_stale = false;
        for (folded, known) in self.known.iter_mut() {
            if !listed.contains(folded) && known.stale_since.is_none() {
                known.stale_since = Some(now);
                any_stale = true;
            }
        }
        if any_stale {
            actions.arm(now + self.stale_grace, Timer::StaleCheck);
        }
    }

    /// The peers missing for the whole grace, to be forgotten.
    pub(super) fn expired(&self, now: Instant) -> Vec<String> {
        self.known
            .iter()
            .filter(|(_, k)| {
                k.stale_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.stale_grace)
            })
            .map(|(f, _)| f.clone())
            .collect()
    }

    pub(super) fn remove(&mut self, folded: &str) -> Option<Known> {
        self.known.remove(folded)
    }
}
