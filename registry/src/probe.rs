//! Reachability probes (PROTOCOL.md 4.7): after a peer registers, the
//! registry dials the address it lists for it and checks that the peer's
//! own key answers there. The directory then says whether others can dial
//! it (`reachable`), so that they go through the relay at once instead of
//! waiting for a dial to fail.
//!
//! Bounded: at most [`MAX_PROBING`] probes at a time (the rest wait their
//! turn, one entry per peer), each given [`PROBE_TIMEOUT`]; a probe does the
//! Noise handshake and nothing more.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::Change;

use crate::{Action, LinkState, Registry, Timer, PART_ENTRIES};

/// How long a probe may take, connect and handshake included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Probes under way at once, at most.
pub const MAX_PROBING: usize = 32;
/// Registrations waiting for their probe, at most. Peers whose ports drop
/// packets hold a probe for its whole timeout; past this many waiting,
/// a registration is not probed (its entry says nothing of it) rather
/// than queued for ever longer.
pub const MAX_WAITING: usize = 4096;

/// A probe under way.
struct Running<C> {
    /// The registered connection of the peer probed.
    session: C,
    key: PublicKey,
    addr: SocketAddr,
}

pub(crate) struct Probes<C> {
    enabled: bool,
    next: u64,
    /// Sessions to probe, in registration order.
    waiting: VecDeque<C>,
    /// By the probe's own link.
    running: HashMap<C, Running<C>>,
}

impl<C: Copy + Eq + Hash + Debug> Probes<C> {
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn new(enabled: bool) -> Self {
        Probes {
            enabled,
            next: 0,
            waiting: VecDeque::new(),
            running: HashMap::new(),
        }
    }
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// `session` registered (or moved): it is probed in its turn.
    pub(crate) fn want_probe(&mut self, session: C) {
        if !self.probes.enabled {
            return;
        }
        if self.probes.waiting.len() >= MAX_WAITING {
            tracing::debug!(
                ?session,
                "too many probes waiting; this registration is not probed"
            );
            return;
        }
        self.probes.waiting.push_back(session);
    }

    /// Starts the probes that may run now; `mint` names a probe's link
    /// (the `n`th dial of this registry), as the driver will know it.
    pub fn start_probes(&mut self, now: Instant, mint: impl Fn(u64) -> C) {
        while self.probes.running.len() < MAX_PROBING {
            let Some(session) = self.probes.waiting.pop_front() else {
                // A ramp of thousands leaves a queue as long: an idle
                // registry keeps no memory for it.
                if self.probes.waiting.capacity() > 64 {
                    self.probes.waiting = VecDeque::new();
                }
                return;
            };
            let Some(LinkState::Registered(s)) = self.conns.get(&session) else {
                continue;
            };
            let link = mint(self.probes.next);
            self.probes.next += 1;
            self.actions.push_back(Action::Dial { link, addr: s.addr });
            self.timers
                .arm(now + PROBE_TIMEOUT, Timer::ProbeDeadline(link));
            let running = Running {
                session,
                key: s.key,
                addr: s.addr,
            };
            self.probes.running.insert(link, running);
        }
    }

    /// A probe's handshake is done: the peer is reachable if `key` is its.
    pub(crate) fn probe_connected(&mut self, link: C, key: PublicKey) {
        let answered_by_peer = self.probes.running.get(&link).map(|r| r.key == key);
        if let Some(reachable) = answered_by_peer {
            self.actions
                .push_back(Action::Close(link, "probe done".into()));
            self.probe_result(link, reachable);
        } else {
            self.actions.push_back(Action::Close(
                link,
                "the registry dials only to probe".into(),
            ));
        }
    }

    /// A connection closed: if it was a probe still under way, its peer
    /// could not be reached. True if it was a probe.
    pub(crate) fn probe_closed(&mut self, link: C) -> bool {
        let running = self.probes.running.contains_key(&link);
        if running {
            self.probe_result(link, false);
        }
        running
    }

    pub(crate) fn probe_due(&mut self, link: C) {
        if self.probes.running.contains_key(&link) {
            self.actions
                .push_back(Action::Close(link, "probe timed out".into()));
            self.probe_result(link, false);
        }
    }

    /// Every probe ends (the registry is stopping).
    pub(crate) fn probe_shutdown(&mut self) {
        self.probes.waiting.clear();
        for (link, _) in self.probes.running.drain() {
            self.actions
                .push_back(Action::Close(link, "registry shutting down".into()));
        }
    }

    /// What a probe found, for the peer it probed if it is still the one
    /// registered there: a change is news for everyone.
    fn probe_result(&mut self, link: C, reachable: bool) {
        let Some(run) = self.probes.running.remove(&link) else {
            return;
        };
        let Some(LinkState::Registered(s)) = self.conns.get_mut(&run.session) else {
            return;
        };
        if s.key != run.key || s.addr != run.addr || s.reachable == Some(reachable) {
            return;
        }
        s.reachable = Some(reachable);
        tracing::info!(name = %s.name, addr = %s.addr, reachable, "probed");
        let (order, change) = (
            s.order,
            Change::Moved {
                name: s.name.clone(),
                addr: s.addr.to_string(),
                reachable: Some(reachable),
            },
        );
        self.parts.remove(&(order / PART_ENTRIES));
        self.announce(change);
        self.cluster_assert(run.session);
    }
}
