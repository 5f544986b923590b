//! Links we open because a peer asked us to (PROTOCOL.md 4.8): it cannot
//! dial us, the registry says it can be dialed, so we dial it and say
//! `dialed_back`; on that connection the peer is the link's dialer and we
//! its acceptor, so once it proved the key the directory lists, the link
//! is the inbox's like any link to us.
//!
//! Separate because these connections belong to nobody until then, and
//! because a request must not make us dial without bound.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{self, fold_name, LinkMsg, PROTOCOL_VERSION};

use super::directory::Directory;
use super::{Actions, Timer, TimerKey};

/// From the request to the connection's handshake, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Dials under way at once, at most, in all and to one asker: requests
/// beyond them are dropped, and the asker turns to the relay.
const MAX_DIALING: usize = 64;
const MAX_DIALING_ONE: usize = 4;

struct DialingBack {
    /// The asker, folded.
    folded: String,
    deadline: TimerKey,
}

#[derive(Default)]
pub(super) struct DialBacks {
    dialing: HashMap<LinkId, DialingBack>,
}

impl DialBacks {
    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.dialing.contains_key(&conn)
    }

    /// `from` asks us to dial it: we do, at the address the directory
    /// lists, if we list it under a key we trust.
    pub(super) fn asked(
        &mut self,
        from: &str,
        dir: &Directory,
        now: Instant,
        actions: &mut Actions,
    ) {
        let folded = fold_name(from.trim());
        let Some(known) = dir.get(&folded).filter(|k| !k.mismatch) else {
            tracing::info!(%from, "asked to dial back a peer we do not list (or do not trust); ignored");
            return;
        };
        let to_asker = self.dialing.values().filter(|d| d.folded == folded).count();
        if self.dialing.len() >= MAX_DIALING || to_asker >= MAX_DIALING_ONE {
            tracing::warn!(%from, "too many dial-backs under way; this request is ignored");
            return;
        }
        tracing::debug!(%from, addr = %known.addr, "dialing back");
        let conn = actions.dial(known.addr);
        let deadline = actions.arm(now + CONNECT_TIMEOUT, Timer::DialBackDeadline(conn));
        self.dialing.insert(conn, DialingBack { folded, deadline });
    }

    /// Our connection is up and proved `key`: if the directory lists the
    /// asker under it, say who we are (`name`) and return true: the link
    /// is the inbox's from now on. Otherwise it closes.
    pub(super) fn on_connected(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        name: &str,
        dir: &Directory,
        actions: &mut Actions,
    ) -> bool {
        let Some(dialing) = self.dialing.remove(&conn) else {
            return false;
        };
        actions.cancel(Some(dialing.deadline));
        let listed = dir.get(&dialing.folded);
        if !listed.is_some_and(|k| k.key == key && !k.mismatch) {
            let why = format!(
                "dialing {} back, another key answered: {key}",
                dialing.folded
            );
            tracing::warn!("{why}");
            actions.close(conn, why);
            return false;
        }
        let dialed_back = LinkMsg::DialedBack {
            version: PROTOCOL_VERSION,
            name: name.trim().to_string(),
        };
        actions.send(conn, protocol::frame(&dialed_back));
        true
    }

    pub(super) fn on_deadline(&mut self, conn: LinkId, actions: &mut Actions) {
        if let Some(dialing) = self.dialing.remove(&conn) {
            tracing::info!(peer = %dialing.folded, "could not dial back in time");
            actions.close(conn, "could not dial back in time");
        }
    }

    pub(super) fn on_closed(&mut self, conn: LinkId, actions: &mut Actions) {
        if let Some(dialing) = self.dialing.remove(&conn) {
            tracing::info!(peer = %dialing.folded, "could not dial back");
            actions.cancel(Some(dialing.deadline));
        }
    }
}
