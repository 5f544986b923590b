//! Reversed links (PROTOCOL.md 4.8): a peer that cannot dial another, but
//! can be dialed itself, asks the registry to have the other dial it back.
//! The registry only passes the request on; the link that follows goes
//! straight between the two peers, with every check a link has.
//!
//! Separate from relays because nothing is carried here: a reversal costs
//! the registry one small frame each way, and works with `--no-relay`.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use peerchat_core::protocol::{self, fold_name, ErrorCode, FromRegistry};

use crate::{Action, LinkState, Registry};

/// Requests one session may make per [`BUDGET_WINDOW`]: enough for a peer
/// that messages everyone behind a NAT at once, not enough to make the
/// registry a megaphone that has peers dial on command.
pub(crate) const BUDGET: u16 = 64;
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// What a session has asked lately.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    since: Instant,
    used: u16,
}

impl Budget {
    pub(crate) fn new(now: Instant) -> Self {
        Budget {
            since: now,
            used: 0,
        }
    }

    /// Takes one request, if the window has room for it.
    fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) >= BUDGET_WINDOW {
            *self = Budget::new(now);
        }
        if self.used >= BUDGET {
            return false;
        }
        self.used += 1;
        true
    }
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// `conn`'s peer asks `to` to dial it back: passed on as `dial_back`,
    /// or answered with `reverse_failed`.
    pub(crate) fn reverse(&mut self, conn: C, to: &str, now: Instant) {
        let Some(LinkState::Registered(asker)) = self.conns.get_mut(&conn) else {
            return;
        };
        let budget_left = asker.reversals.take(now);
        let (asker_name, asker_reachable) = (asker.name.clone(), asker.reachable);
        let target = self.names.get(&fold_name(to.trim())).and_then(|&c| {
            self.session(c)
                .map(|s| (c, s.answers.dial_back, s.name.clone()))
        });
        let passed = match target {
            _ if !budget_left => Err((
                ErrorCode::RelayFull,
                format!(
                    "more than {BUDGET} reversals asked within {}s",
                    BUDGET_WINDOW.as_secs()
                ),
            )),
            None => Err((ErrorCode::UnknownPeer, "no such peer is online".into())),
            Some((target, ..)) if target == conn => Err((
                ErrorCode::UnknownPeer,
                "a peer cannot ask itself to dial back".into(),
            )),
            Some((_, false, name)) => Err((
                ErrorCode::Unreachable,
                format!("{name}'s client does not dial back on request"),
            )),
            // The target's dial would fail: say so now rather than after
            // the asker's wait.
            Some(_) if asker_reachable == Some(false) => Err((
                ErrorCode::Unreachable,
                "this registry could not dial you either".into(),
            )),
            Some((target, _, target_name)) => Ok((target, target_name)),
        };
        match passed {
            Ok((target, target_name)) => {
                tracing::debug!(from = %asker_name, to = %target_name, "passing on a reversal");
                self.stats.reversals += 1;
                let dial_back = FromRegistry::DialBack { from: asker_name };
                self.actions
                    .push_back(Action::Send(target, protocol::frame(&dial_back)));
            }
            Err((code, reason)) => {
                tracing::debug!(from = %asker_name, %to, %code, %reason, "reversal not passed on");
                self.stats.reversals_failed += 1;
                let failed = FromRegistry::ReverseFailed {
                    to: to.to_string(),
                    code: code.as_str().into(),
                    reason,
                };
                self.actions
                    .push_back(Action::Send(conn, protocol::frame(&failed)));
            }
        }
    }
}
