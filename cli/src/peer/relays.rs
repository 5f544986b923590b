//! Links to us through the registry's relay (PROTOCOL.md 4.6): a peer that
//! cannot dial us asked the registry to carry its link, and the registry
//! invited us. We answer with a connection of our own to the registry,
//! which pairs it with the asker's; inside it runs an ordinary link with
//! us as the acceptor, handed to the inbox once its handshake is done.
//!
//! Separate because these links belong to nobody until then: the inbox
//! takes links whose key is proven, and this is how one gets there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Output, Role};
use peerchat_core::protocol::{self, FromRegistry, ToRegistry, PROTOCOL_VERSION};

use super::{Actions, Timer, TimerKey};

/// From the invitation to the relayed session's handshake, at most.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Invitations being answered at once, at most: a registry cannot make us
/// open connections without bound.
const MAX_JOINING: usize = 64;

struct Joining {
    id: u64,
    /// Who asked, as the registry named them (for logs).
    from: String,
    deadline: TimerKey,
}

#[derive(Default)]
pub(super) struct Relays {
    joining: HashMap<LinkId, Joining>,
}

impl Relays {
    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.joining.contains_key(&conn)
    }

    /// The registry invites us to invitation `id`, from `from`: dial it.
    pub(super) fn invited(&mut self, id: u64, from: String, now: Instant, actions: &mut Actions) {
        if self.joining.len() >= MAX_JOINING {
            tracing::warn!(%from, id, "too many relay invitations at once; this one is ignored");
            return;
        }
        let conn = actions.dial(actions.relay_via());
        let deadline = actions.arm(now + JOIN_TIMEOUT, Timer::RelayJoinDeadline(conn));
        tracing::debug!(%from, id, "answering a relay invitation");
        self.joining.insert(conn, Joining { id, from, deadline });
    }

    /// Our answer's connection is up and proved `key`: join, if it is the
    /// registry's (`registry`, the key our session pinned).
    pub(super) fn on_connected(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        registry: Option<PublicKey>,
        actions: &mut Actions,
    ) {
        let Some(joining) = self.joining.get(&conn) else {
            return;
        };
        if registry != Some(key) {
            tracing::warn!(%key, "a relay connection proved another key than the registry's; closed");
            self.end(conn, "not the registry's key", actions);
            return;
        }
        let join = ToRegistry::RelayJoin {
            version: PROTOCOL_VERSION,
            id: joining.id,
        };
        actions.send(conn, protocol::frame(&join));
    }

    /// The registry's answer: the tunnel opens, or the invitation is over.
    pub(super) fn on_frame(&mut self, conn: LinkId, body: &[u8], actions: &mut Actions) {
        let Some(joining) = self.joining.get(&conn) else {
            return;
        };
        match codec::decode::<FromRegistry>(body) {
            Ok(FromRegistry::RelayReady {}) => actions.push(Output::Tunnel {
                link: conn,
                role: Role::Acceptor,
            }),
            Ok(FromRegistry::Error { code, reason }) => {
                tracing::info!(from = %joining.from, %code, %reason, "the registry ended a relay invitation");
                self.end(conn, "relay refused", actions);
            }
            Ok(other) => {
                tracing::warn!(?other, "unexpected message on a relay connection; closed");
                self.end(conn, "unexpected message", actions);
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame on a relay connection; closed");
                self.end(conn, "undecodable frame", actions);
            }
        }
    }

    /// The relayed session's handshake is done: the link is the inbox's
    /// from now on. True if it was one of ours.
    pub(super) fn tunneled(&mut self, conn: LinkId, actions: &mut Actions) -> bool {
        match self.joining.remove(&conn) {
            Some(joining) => {
                actions.cancel(Some(joining.deadline));
                true
            }
            None => false,
        }
    }

    pub(super) fn on_deadline(&mut self, conn: LinkId, actions: &mut Actions) {
        if let Some(joining) = self.joining.get(&conn) {
            tracing::info!(from = %joining.from, "a relayed link did not come up in time");
            self.end(conn, "the relayed link did not come up in time", actions);
        }
    }

    pub(super) fn on_closed(&mut self, conn: LinkId, actions: &mut Actions) {
        if let Some(joining) = self.joining.remove(&conn) {
            actions.cancel(Some(joining.deadline));
        }
    }

    fn end(&mut self, conn: LinkId, reason: &str, actions: &mut Actions) {
        self.on_closed(conn, actions);
        actions.close(conn, reason);
    }
}
