//! One of our links to a peer, from its dial to its close, and the backoff
//! between attempts: what the outbox (for chats) and the transfers room
//! (for files) each keep per target.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::machine::LinkId;

use super::{Actions, Rng, Timer, TimerKey};

#[derive(Default)]
pub(super) struct Dialing {
    /// Our link to the target, from the dial on.
    conn: Option<LinkId>,
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

    /// Dials `addr` unless a link is under way or a redial waits; returns
    /// the link dialed.
    pub(super) fn dial(&mut self, addr: SocketAddr, actions: &mut Actions) -> Option<LinkId> {
        if self.conn.is_some() || self.retry.is_some() {
            return None;
        }
        let conn = actions.dial(addr);
        self.conn = Some(conn);
        Some(conn)
    }

    pub(super) fn set_up(&mut self) {
        self.up = true;
    }

    /// `conn` is gone; true if it was this link.
    pub(super) fn lost(&mut self, conn: LinkId) -> bool {
        if self.conn != Some(conn) {
            return false;
        }
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
