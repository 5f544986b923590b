//! The peer on the event loop: core's machine contract, routing each link
//! event to the room that owns the link.

use std::net::SocketAddr;
use std::time::Instant;

use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Machine};
use peerchat_core::protocol::{LinkMsg, PROTOCOL_VERSION};

use super::{Action, HostOutput, Peer};

impl Peer {
    /// What our links say first.
    fn hello(&self) -> LinkMsg {
        LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: self.session.name().trim().to_string(),
            instance: self.instance,
        }
    }
}

impl Machine for Peer {
    type HostOutput = HostOutput;

    /// An inbound link whose handshake proved `key`.
    fn handle_accepted(&mut self, link: LinkId, _addr: SocketAddr, key: PublicKey, now: Instant) {
        self.actions.now = now;
        self.inbox.on_accept(link, key, now, &mut self.actions);
    }

    /// A link we dialed is up and proved `key`: check it, then speak.
    fn handle_connected(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.actions.now = now;
        if self.session.conn() == Some(link) {
            let heard = self.session.on_connected(link, key, &mut self.actions);
            self.on_heard(heard, now);
        } else {
            let hello = self.hello();
            let (dir, rng, actions) = (&mut self.directory, &mut self.rng, &mut self.actions);
            if self.outbox.has(link) {
                self.outbox
                    .on_connected(link, key, &hello, now, dir, rng, actions);
            } else if self.transfers.has(link) {
                self.transfers
                    .on_connected(link, key, &hello, now, dir, rng, actions);
            }
        }
    }

    fn handle_frame(&mut self, link: LinkId, body: &[u8], now: Instant) {
        self.actions.now = now;
        if self.session.conn() == Some(link) {
            let heard = self
                .session
                .on_frame(link, body, now, &mut self.rng, &mut self.actions);
            self.on_heard(heard, now);
        } else if self.outbox.has(link) {
            self.outbox.on_frame(link, body, &mut self.actions);
            self.maybe_finish_quit();
        } else if self.transfers.has(link) {
            self.transfers.on_frame(link, body, &mut self.actions);
        } else if self.inbox.has(link) {
            let file = self
                .inbox
                .on_frame(link, body, &mut self.directory, &mut self.actions);
            if let Some((party, msg)) = file {
                if let Err(why) = self
                    .transfers
                    .on_incoming(link, party, msg, &mut self.actions)
                {
                    self.inbox.refuse_protocol(link, why, &mut self.actions);
                }
            }
        }
    }

    /// The link is gone, whoever closed it, a dial that never connected
    /// included.
    fn handle_closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant) {
        self.actions.now = now;
        let reason = match reason {
            // The link still takes one frame, so that a linked peer is told
            // why (as the protocol asks).
            CloseReason::Frame(error) => {
                tracing::warn!(%link, %error, "closing a link that broke the framing");
                self.inbox.on_bad_frame(link, error, &mut self.actions);
                error.to_string()
            }
            // One text for a connect refused at once and one refused
            // later: the driver reports both alike.
            CloseReason::ConnectFailed(error) => format!("cannot connect: {error}"),
            other => other.to_string(),
        };
        if self.session.conn() == Some(link) {
            self.session
                .on_closed(reason, now, &mut self.rng, &mut self.actions);
        } else if self.outbox.has(link) {
            self.outbox
                .on_closed(link, &reason, now, &mut self.rng, &mut self.actions);
        } else if self.transfers.has(link) {
            self.transfers
                .on_closed(link, now, &mut self.rng, &mut self.actions);
        } else {
            self.inbox.on_closed(link, &mut self.actions);
            self.transfers.on_link_closed(link);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.actions.next_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.actions.now = now;
        while let Some(timer) = self.actions.due(now) {
            self.fire(timer, now);
        }
    }

    fn end_turn(&mut self, now: Instant) {
        self.actions.now = now;
        self.finish_turn();
    }

    fn poll_output(&mut self) -> Option<Action> {
        self.actions.queue.pop_front()
    }
}
