//! One of our links to a peer, from its dial to its close, and the backoff
//! between attempts: what the outbox (for chats) and the transfers room
//! (for files) each keep per target.
//!
//! A link goes direct, to the address the directory lists, unless the last
//! direct attempt failed: then the next one goes through the registry's
//! relay (PROTOCOL.md 4.6), and the one after a relayed link tries direct
//! again, so a link moves back to a direct path once there is one. The
//! relay's own opening (`relay_open`, `relay_ready`) happens here; once
//! the tunnel's session is up, the link is like any other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Output, Role};
use peerchat_core::protocol::{self, FromRegistry, ToRegistry, PROTOCOL_VERSION};

use super::{Actions, Rng, Timer, TimerKey};

/// How a link reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Direct,
    /// Through the registry; `tunneled` once it said `relay_ready`.
    Relayed {
        tunneled: bool,
    },
}

impl Path {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed { .. } => "relayed",
        }
    }
}

/// What the registry answered a relay connection.
pub(super) enum RelayAnswer {
    /// The tunnel is open; the peer's handshake follows.
    Ready,
    /// It refused, with this code and reason.
    Refused(String, String),
}

#[derive(Default)]
pub(super) struct Dialing {
    /// Our link to the target, from the dial on.
    conn: Option<LinkId>,
    path: Option<Path>,
    /// The last direct attempt failed: the next goes through the relay.
    relay_next: bool,
    /// The link proved the listed key and said hello: what waits may go.
    up: bool,
    backoff: Duration,
    /// The redial, while we back off.
    retry: Option<TimerKey>,
}

impl Dialing {
    /// The link, once it is up.
    pub(super) fn up(&self) -> Option<LinkId> {
        self.conn.filter(|_| self.up)
    }

    /// How the link goes (or is being opened), while there is one.
    pub(super) fn path(&self) -> Option<Path> {
        self.conn.and(self.path)
    }

    /// Dials `addr` (or the relay, see the module's doc; at once for a
    /// peer the registry could not dial, `unreachable`) unless a link is
    /// under way or a redial waits; returns the link dialed.
    pub(super) fn dial(
        &mut self,
        addr: SocketAddr,
        unreachable: bool,
        actions: &mut Actions,
    ) -> Option<LinkId> {
        if self.conn.is_some() || self.retry.is_some() {
            return None;
        }
        let (conn, path) = if self.relay_next || unreachable {
            let registry = actions.relay_via();
            (actions.dial(registry), Path::Relayed { tunneled: false })
        } else {
            (actions.dial(addr), Path::Direct)
        };
        self.conn = Some(conn);
        self.path = Some(path);
        Some(conn)
    }

    /// The link goes (or is being opened) through the relay.
    pub(super) fn is_relayed(&self) -> bool {
        matches!(self.path(), Some(Path::Relayed { .. }))
    }

    /// `conn` is ours and waits for the relay to open.
    pub(super) fn opening_relay(&self, conn: LinkId) -> bool {
        self.conn == Some(conn) && self.path == Some(Path::Relayed { tunneled: false })
    }

    /// The relay connection is up and proved `key`: ask for `to`, if the
    /// key is the registry's (`registry`, the key our session pinned).
    pub(super) fn relay_connected(
        &self,
        conn: LinkId,
        key: PublicKey,
        registry: Option<PublicKey>,
        (from, to): (&str, &str),
        actions: &mut Actions,
    ) -> Result<(), String> {
        if registry != Some(key) {
            return Err(format!(
                "the relay proved key {key}, not the registry's we registered with"
            ));
        }
        let open = ToRegistry::RelayOpen {
            version: PROTOCOL_VERSION,
            from: from.into(),
            to: to.into(),
        };
        actions.send(conn, protocol::frame(&open));
        Ok(())
    }

    /// The registry's answer on our relay connection.
    pub(super) fn relay_frame(
        &mut self,
        conn: LinkId,
        body: &[u8],
        actions: &mut Actions,
    ) -> Result<RelayAnswer, String> {
        match codec::decode::<FromRegistry>(body) {
            Ok(FromRegistry::RelayReady {}) => {
                self.path = Some(Path::Relayed { tunneled: true });
                actions.push(Output::Tunnel {
                    link: conn,
                    role: Role::Dialer,
                });
                Ok(RelayAnswer::Ready)
            }
            Ok(FromRegistry::Error { code, reason }) => Ok(RelayAnswer::Refused(code, reason)),
            Ok(other) => Err(format!("unexpected answer from the relay: {other:?}")),
            Err(e) => Err(format!("undecodable answer from the relay: {e}")),
        }
    }

    pub(super) fn set_up(&mut self) {
        self.up = true;
    }

    /// `conn` is gone; true if it was this link.
    pub(super) fn lost(&mut self, conn: LinkId) -> bool {
        if self.conn != Some(conn) {
            return false;
        }
        // A direct link that never came up sends the next attempt through
        // the relay; after a relayed one, direct is tried again.
        self.relay_next = self.path == Some(Path::Direct) && !self.up;
        self.conn = None;
        self.up = false;
        true
    }

    /// Something got through: the next redial waits the least again.
    pub(super) fn progressed(&mut self) {
        self.backoff = Duration::ZERO;
    }

    /// Arms `timer` for a redial, after a backoff that starts at `min` and
    /// doubles up to `max` (with jitter), unless a link or a redial is
    /// under way.
    pub(super) fn retry_later(
        &mut self,
        (min, max): (Duration, Duration),
        timer: Timer,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        if self.retry.is_some() || self.conn.is_some() {
            return;
        }
        let base = self.backoff.max(min);
        self.backoff = (base * 2).min(max);
        self.retry = Some(actions.arm(now + rng.jitter(base), timer));
    }

    /// The redial timer fired.
    pub(super) fn retried(&mut self) {
        self.retry = None;
    }

    /// Lets the link go (a redial may follow at once); returns it, for the
    /// caller to close and forget.
    pub(super) fn close(&mut self) -> Option<LinkId> {
        self.up = false;
        self.relay_next = false;
        self.conn.take()
    }

    /// Ends the link and any redial: the target left, and its return
    /// starts afresh. Returns the link, for the caller to close and forget.
    pub(super) fn stop(&mut self, actions: &mut Actions) -> Option<LinkId> {
        actions.cancel(self.retry.take());
        self.backoff = Duration::ZERO;
        self.close()
    }
}
