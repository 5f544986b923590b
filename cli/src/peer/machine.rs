//! The peer on the event loop: core's machine contract, routing each link
//! event to the room that owns the link.

use std::net::SocketAddr;
use std::time::Instant;

use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Machine};
use peerchat_core::protocol::{self, fold_name, LinkMsg, PROTOCOL_VERSION};

use super::dialing::{Dialing, RelayAnswer};
use super::inbox::News;
use super::outbox::Outbox;
use super::transfers::Transfers;
use super::{Action, HostOutput, Peer, Reason};
use crate::disk::FileCode;
use peerchat_core::protocol::ErrorCode;

impl Peer {
    /// What our links say first.
    fn hello(&self) -> LinkMsg {
        LinkMsg::Hello {
            version: PROTOCOL_VERSION,
            name: self.session.name().trim().to_string(),
            instance: self.instance,
        }
    }

    /// Our link (chats or files) is up and proved `key`, directly or
    /// through the relay: its room checks the key, then speaks.
    fn link_up(&mut self, link: LinkId, key: PublicKey, now: Instant) {
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

    /// The registry would not relay our link to `to` (folded): what waits
    /// for `to` ends now if no path is left, instead of waiting for one.
    /// While a dial-back may still work, it waits for the next try.
    fn relay_refused(&mut self, link: LinkId, to: &str, refusal: (&str, &str), dial_back: bool) {
        let (code, reason) = refusal;
        tracing::info!(peer = %to, %code, %reason, "the registry did not relay our link");
        let ends = match code {
            _ if dial_back => None,
            c if c == ErrorCode::RelayFull.as_str() => Some(ErrorCode::RelayFull),
            c if c == ErrorCode::Unreachable.as_str() || c == ErrorCode::RelayRefused.as_str() => {
                Some(ErrorCode::Unreachable)
            }
            // Not online there (yet): the directory says when it is.
            _ => None,
        };
        match ends {
            Some(code) if self.outbox.has(link) => {
                self.outbox
                    .fail_queued(to, &Reason::Code(code), &mut self.actions);
                self.maybe_finish_quit();
            }
            Some(code) if self.transfers.has(link) => {
                let code = match code {
                    ErrorCode::RelayFull => FileCode::RelayFull,
                    _ => FileCode::Unreachable,
                };
                self.transfers.fail_unreachable(to, code, &mut self.actions);
            }
            _ => {}
        }
    }
}

impl Peer {
    /// `link`, accepted, says it is `name` dialing us back (4.8): if it
    /// proved the key the directory lists (and we pinned) for `name`, and
    /// we asked for it, it is our link to `name` (chats first, then
    /// files), going on as if we had dialed it. The key is checked first,
    /// so that nobody else can use up the wait.
    fn dialed_back(&mut self, link: LinkId, name: &str, key: PublicKey, now: Instant) {
        let folded = fold_name(name.trim());
        let listed = self.directory.get(&folded);
        let (code, why) = if listed.is_none() {
            let why = format!("a dial-back as {name:?}, whom the directory does not list");
            (ErrorCode::UnknownPeer, why)
        } else if !listed.is_some_and(|k| k.key == key && !k.mismatch) {
            let why =
                format!("a dial-back as {name:?} proved key {key}, not the one listed for it");
            (ErrorCode::KeyMismatch, why)
        } else if self
            .outbox
            .targets()
            .adopt(link, &folded, &mut self.actions)
            || self
                .transfers
                .targets()
                .adopt(link, &folded, &mut self.actions)
        {
            tracing::debug!(peer = %name, "dialed back");
            self.link_up(link, key, now);
            return;
        } else {
            let why = format!("no link from us to {name:?} waits to be dialed back");
            (ErrorCode::Protocol, why)
        };
        tracing::info!("{why}");
        let refusal = LinkMsg::error(code, why.clone());
        self.actions.send(link, protocol::frame(&refusal));
        self.actions.close(link, why);
    }
}

/// Our link `link` (chats or files): whose it is (folded) and its dialing.
pub(super) fn our_dialing<'a>(
    outbox: &'a mut Outbox,
    transfers: &'a mut Transfers,
    link: LinkId,
) -> Option<(String, &'a mut Dialing)> {
    if outbox.has(link) {
        outbox.dialing_of(link)
    } else {
        transfers.dialing_of(link)
    }
}

/// Our link `link`, if it waits for the registry's relay to open.
fn opening_relay<'a>(
    outbox: &'a mut Outbox,
    transfers: &'a mut Transfers,
    link: LinkId,
) -> Option<(String, &'a mut Dialing)> {
    our_dialing(outbox, transfers, link).filter(|(_, dialing)| dialing.opening_relay(link))
}

impl Machine for Peer {
    type HostOutput = HostOutput;

    /// An inbound link whose handshake proved `key`.
    fn handle_accepted(&mut self, link: LinkId, _addr: SocketAddr, key: PublicKey, now: Instant) {
        self.actions.now = now;
        self.inbox
            .on_accept(link, key, true, now, &mut self.actions);
    }

    /// A link we dialed is up and proved `key`: check it, then speak.
    fn handle_connected(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.actions.now = now;
        let registry = self.session.registry_key();
        if self.session.conn() == Some(link) {
            let heard = self.session.on_connected(link, key, &mut self.actions);
            self.on_heard(heard, now);
        } else if self.relays.has(link) {
            self.relays
                .on_connected(link, key, registry, &mut self.actions);
        } else if self.dial_backs.has(link) {
            let (name, dir) = (self.session.name(), &self.directory);
            if self
                .dial_backs
                .on_connected(link, key, name, dir, &mut self.actions)
            {
                self.inbox
                    .on_accept(link, key, false, now, &mut self.actions);
            }
        } else if let Some((to, dialing)) =
            opening_relay(&mut self.outbox, &mut self.transfers, link)
        {
            let from = self.session.name().trim();
            if let Err(why) =
                dialing.relay_connected(link, key, registry, (from, &to), &mut self.actions)
            {
                tracing::warn!(peer = %to, "{why}");
                self.actions.close(link, why);
            }
        } else {
            self.link_up(link, key, now);
        }
    }

    /// A relayed link's own session is up: ours goes on like a direct
    /// link; one to us is the inbox's now.
    fn handle_tunneled(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.actions.now = now;
        if self.relays.tunneled(link, &mut self.actions) {
            self.inbox
                .on_accept(link, key, false, now, &mut self.actions);
        } else {
            self.link_up(link, key, now);
        }
    }

    fn handle_frame(&mut self, link: LinkId, body: &[u8], now: Instant) {
        self.actions.now = now;
        if self.session.conn() == Some(link) {
            let heard = self
                .session
                .on_frame(link, body, now, &mut self.rng, &mut self.actions);
            self.on_heard(heard, now);
        } else if self.relays.has(link) {
            self.relays.on_frame(link, body, &mut self.actions);
        } else if let Some((to, dialing)) =
            opening_relay(&mut self.outbox, &mut self.transfers, link)
        {
            let dial_back = dialing.dial_back_may_work();
            match dialing.relay_frame(link, body, &mut self.actions) {
                Ok(RelayAnswer::Ready) => {}
                Ok(RelayAnswer::Refused(code, reason)) => {
                    self.actions.close(link, format!("relay refused: {code}"));
                    self.relay_refused(link, &to, (&code, &reason), dial_back);
                }
                Err(why) => {
                    tracing::warn!(peer = %to, "{why}");
                    self.actions.close(link, why);
                }
            }
        } else if self.outbox.has(link) {
            self.outbox.on_frame(link, body, &mut self.actions);
            self.maybe_finish_quit();
        } else if self.transfers.has(link) {
            self.transfers.on_frame(link, body, &mut self.actions);
        } else if self.inbox.has(link) {
            let news = self
                .inbox
                .on_frame(link, body, &mut self.directory, &mut self.actions);
            match news {
                Some(News::File(party, msg)) => {
                    if let Err(why) =
                        self.transfers
                            .on_incoming(link, party, msg, &mut self.actions)
                    {
                        self.inbox.refuse_protocol(link, why, &mut self.actions);
                    }
                }
                Some(News::DialedBack { name, key }) => self.dialed_back(link, &name, key, now),
                None => {}
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
            self.relays.on_closed(link, &mut self.actions);
            self.dial_backs.on_closed(link, &mut self.actions);
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
