//! One of our links to a peer, from its dial to its close, and the backoff
//! between attempts: what the outbox (for chats) and the transfers room
//! (for files) each keep per target.
//!
//! A link goes direct, to the address the directory lists, unless the
//! registry found the peer cannot be dialed or the last direct attempt
//! failed. Then, if the registry found that we can be dialed, we ask the
//! peer through it to dial us back (a reversed link, PROTOCOL.md 4.8); when
//! that cannot be asked, is refused or brings no link in time, the next
//! attempt goes through the registry's relay (4.6). The attempt after a
//! relayed link tries direct again, so a link moves back to a direct path
//! once there is one. The relay's own opening (`relay_open`,
//! `relay_ready`) happens here; once the tunnel's session is up, the link
//! is like any other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Output, Role};
use peerchat_core::protocol::{self, ErrorCode, FromRegistry, ToRegistry, PROTOCOL_VERSION};

use super::actions::Reversal;
use super::{Actions, ByName, Rng, Timer, TimerKey};

/// How long the peer's own session inside a relay has to come up, from
/// `relay_ready`: a direct dial's handshake has the loop's deadline, a
/// relayed one only this.
pub(super) const TUNNEL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a peer asked to dial us back has to bring its link up (the
/// registry passing the request, the peer's dial and handshake) before
/// the relay is tried instead.
pub(super) const REVERSAL_WAIT: Duration = Duration::from_secs(3);

/// How a link reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Direct,
    /// The peer dialed us, on our request (4.8).
    Reversed,
    /// Through the registry; `tunneled` once it said `relay_ready`.
    Relayed {
        tunneled: bool,
    },
}

impl Path {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Reversed => "reversed",
            Path::Relayed { .. } => "relayed",
        }
    }
}

/// What the next attempt tries, after a direct one or a reversal failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    Reverse,
    Relay,
}

/// The peer a link is for, as the directory lists it.
pub(super) struct Route<'a> {
    pub(super) name: &'a str,
    pub(super) addr: SocketAddr,
    /// The registry's probe could not dial it.
    pub(super) unreachable: bool,
}

/// What a link without a connection waits for, until `retry` fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The registry's word on whether others can dial us, before asking
    /// for a dial-back.
    OurProbe,
    /// The peer, asked to dial us back.
    DialBack,
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
    /// The last attempt failed: what the next one tries.
    fallback: Option<Fallback>,
    waiting: Option<Waiting>,
    /// A dial-back was asked for and did not come, for a reason that may
    /// pass (it took too long, or the registry's budget was spent): a
    /// relay refused after it does not mean there is no path.
    dial_back_may_work: bool,
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

    /// A link is up or being opened, or a redial waits.
    pub(super) fn under_way(&self) -> bool {
        self.conn.is_some() || self.retry.is_some()
    }

    /// How the link goes (or is being opened), while there is one.
    pub(super) fn path(&self) -> Option<Path> {
        self.conn.and(self.path)
    }

    /// Opens a link to `to` (see the module's doc for the path) unless one
    /// is under way or a redial waits: returns the link dialed, or nothing
    /// when it waits (for the peer to dial us back, or for the registry to
    /// say whether it could) until `timer` fires.
    pub(super) fn dial(
        &mut self,
        to: &Route,
        timer: Timer,
        actions: &mut Actions,
    ) -> Option<LinkId> {
        if self.under_way() {
            return None;
        }
        let mut path = match self.fallback {
            Some(Fallback::Relay) => Path::Relayed { tunneled: false },
            Some(Fallback::Reverse) => Path::Reversed,
            None if to.unreachable => Path::Reversed,
            None => Path::Direct,
        };
        if path == Path::Reversed {
            let waiting = match actions.reversal {
                Reversal::Via(session) => {
                    let reverse = ToRegistry::Reverse { to: to.name.into() };
                    actions.send(session, protocol::frame(&reverse));
                    Some(Waiting::DialBack)
                }
                // Our own probe's result is moments away: a relay now
                // could be refused for good when a dial-back would work.
                Reversal::Pending => Some(Waiting::OurProbe),
                Reversal::Off => None,
            };
            match waiting {
                Some(waiting) => {
                    self.waiting = Some(waiting);
                    self.retry = Some(actions.arm(actions.now + REVERSAL_WAIT, timer));
                    return None;
                }
                None => path = Path::Relayed { tunneled: false },
            }
        }
        let conn = match path {
            Path::Direct => actions.dial(to.addr),
            _ => actions.dial(actions.relay_via()),
        };
        self.conn = Some(conn);
        self.path = Some(path);
        Some(conn)
    }

    /// We wait for the peer to dial us back.
    pub(super) fn awaits_dial_back(&self) -> bool {
        self.waiting == Some(Waiting::DialBack)
    }

    /// `conn`, a link the peer dialed on our request and that proved its
    /// listed key, is ours: true if we were waiting for it.
    pub(super) fn adopt(&mut self, conn: LinkId, actions: &mut Actions) -> bool {
        if !self.awaits_dial_back() {
            return false;
        }
        self.waiting = None;
        actions.cancel(self.retry.take());
        self.conn = Some(conn);
        self.path = Some(Path::Reversed);
        true
    }

    /// The registry did not pass our request on (`code`): the relay is
    /// next, at once. True if we were waiting for it.
    pub(super) fn reversal_failed(&mut self, code: &str, actions: &mut Actions) -> bool {
        if !self.awaits_dial_back() {
            return false;
        }
        self.waiting = None;
        actions.cancel(self.retry.take());
        self.fallback = Some(Fallback::Relay);
        self.dial_back_may_work = code == ErrorCode::RelayFull.as_str();
        true
    }

    /// Whether a dial-back may still bring a link when the relay refuses
    /// one: then what waits keeps waiting for another try.
    pub(super) fn dial_back_may_work(&self) -> bool {
        self.dial_back_may_work
    }

    /// We wait for the registry to say whether others can dial us.
    pub(super) fn awaits_our_probe(&self) -> bool {
        self.waiting == Some(Waiting::OurProbe)
    }

    /// Stops waiting (for our probe, or a dial-back), for a redial at once.
    pub(super) fn stop_waiting(&mut self, actions: &mut Actions) {
        if self.waiting.take().is_some() {
            actions.cancel(self.retry.take());
        }
    }

    /// The link goes (or is being opened) through the relay.
    pub(super) fn is_relayed(&self) -> bool {
        matches!(self.path(), Some(Path::Relayed { .. }))
    }

    /// The link goes through the relay, or waits (for a dial-back, or to
    /// learn whether one can be asked): a direct dial, once the peer can
    /// be dialed, beats them all.
    pub(super) fn is_indirect(&self) -> bool {
        self.is_relayed() || self.waiting.is_some()
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
                actions.arm(actions.now + TUNNEL_TIMEOUT, Timer::TunnelDeadline(conn));
                Ok(RelayAnswer::Ready)
            }
            Ok(FromRegistry::Error { code, reason }) => Ok(RelayAnswer::Refused(code, reason)),
            Ok(other) => Err(format!("unexpected answer from the relay: {other:?}")),
            Err(e) => Err(format!("undecodable answer from the relay: {e}")),
        }
    }

    pub(super) fn set_up(&mut self) {
        self.up = true;
        self.dial_back_may_work = false;
    }

    /// `conn` is gone; true if it was this link.
    pub(super) fn lost(&mut self, conn: LinkId) -> bool {
        if self.conn != Some(conn) {
            return false;
        }
        // A direct link that never came up sends the next attempt the
        // other way round, a reversed one through the relay; after a
        // link that was up, or a relayed one, direct is tried again.
        self.fallback = match (self.path, self.up) {
            (Some(Path::Direct), false) => Some(Fallback::Reverse),
            (Some(Path::Reversed), false) => Some(Fallback::Relay),
            _ => None,
        };
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

    /// The redial timer fired: a wait it ended leaves the relay next.
    pub(super) fn retried(&mut self) {
        self.retry = None;
        // Either wait may have been too short: a relay refused next is
        // not the end of the road.
        if let Some(waited) = self.waiting.take() {
            tracing::info!(?waited, "no dial-back in time; the relay is next");
            self.fallback = Some(Fallback::Relay);
            self.dial_back_may_work = true;
        }
    }

    /// Lets the link go, or the wait for one dialed back (a redial may
    /// follow at once); returns it, for the caller to close and forget.
    pub(super) fn close(&mut self, actions: &mut Actions) -> Option<LinkId> {
        self.stop_waiting(actions);
        self.up = false;
        self.fallback = None;
        self.dial_back_may_work = false;
        self.conn.take()
    }

    /// Ends the link and any redial: the target left, and its return
    /// starts afresh. Returns the link, for the caller to close and forget.
    pub(super) fn stop(&mut self, actions: &mut Actions) -> Option<LinkId> {
        actions.cancel(self.retry.take());
        self.backoff = Duration::ZERO;
        self.close(actions)
    }
}

/// What the outbox and the transfers room each keep: per target (folded
/// name) something with a [`Dialing`], and which link is whose. The
/// registry's answers about reversals and probes reach both the same way.
pub(super) struct Targets<'a, L> {
    pub links: &'a mut ByName<L>,
    pub conns: &'a mut HashMap<LinkId, String>,
}

impl<L: AsRef<Dialing> + AsMut<Dialing>> Targets<'_, L> {
    /// `conn` is a link `folded` dialed because we asked it to: ours, if
    /// we wait for it.
    pub(super) fn adopt(&mut self, conn: LinkId, folded: &str, actions: &mut Actions) -> bool {
        let adopted = self
            .links
            .get_mut(folded)
            .is_some_and(|l| l.as_mut().adopt(conn, actions));
        if adopted {
            self.conns.insert(conn, folded.to_string());
        }
        adopted
    }

    /// The registry would not ask `folded` to dial us back (`code`): true
    /// if its link waited for that, and should be dialed on at once.
    pub(super) fn reversal_failed(
        &mut self,
        folded: &str,
        code: &str,
        actions: &mut Actions,
    ) -> bool {
        self.links
            .get_mut(folded)
            .is_some_and(|l| l.as_mut().reversal_failed(code, actions))
    }

    /// The registry said whether others can dial us: the targets whose
    /// links waited for it, no longer waiting, to be dialed on.
    pub(super) fn probe_answered(&mut self, actions: &mut Actions) -> Vec<String> {
        let mut waited = Vec::new();
        for (folded, link) in self.links.iter_mut() {
            let dialing = link.as_mut();
            if dialing.awaits_our_probe() {
                dialing.stop_waiting(actions);
                waited.push(folded.clone());
            }
        }
        waited
    }

    /// Whom our relayed links go to.
    pub(super) fn relayed(&self) -> Vec<String> {
        let relayed = self.links.iter().filter(|(_, l)| l.as_ref().is_relayed());
        relayed.map(|(folded, _)| folded.clone()).collect()
    }
}

impl AsRef<Dialing> for Dialing {
    fn as_ref(&self) -> &Dialing {
        self
    }
}

impl AsMut<Dialing> for Dialing {
    fn as_mut(&mut self) -> &mut Dialing {
        self
    }
}
