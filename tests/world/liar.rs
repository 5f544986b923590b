//! A registry that lies: the real machine, with what it tells peers
//! rewritten on the way out.

use std::net::SocketAddr;
use std::time::Instant;

use peerchat_core::codec;
use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Machine, Output};
use peerchat_core::protocol::{self, FromRegistry};

pub struct Liar<M, F> {
    inner: M,
    rewrite: F,
}

impl<M, F: FnMut(&mut FromRegistry)> Liar<M, F> {
    pub fn new(inner: M, rewrite: F) -> Self {
        Liar { inner, rewrite }
    }
}

impl<M: Machine, F: FnMut(&mut FromRegistry)> Machine for Liar<M, F> {
    type HostOutput = M::HostOutput;

    fn handle_accepted(&mut self, link: LinkId, addr: SocketAddr, key: PublicKey, now: Instant) {
        self.inner.handle_accepted(link, addr, key, now);
    }
    fn handle_connected(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.inner.handle_connected(link, key, now);
    }
    fn handle_frame(&mut self, link: LinkId, body: &[u8], now: Instant) {
        self.inner.handle_frame(link, body, now);
    }
    fn handle_closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant) {
        self.inner.handle_closed(link, reason, now);
    }
    fn handle_tunneled(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.inner.handle_tunneled(link, key, now);
    }
    fn handle_drained(&mut self, link: LinkId, now: Instant) {
        self.inner.handle_drained(link, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }
    fn end_turn(&mut self, now: Instant) {
        self.inner.end_turn(now);
    }
    fn poll_output(&mut self) -> Option<Output<LinkId, M::HostOutput>> {
        Some(match self.inner.poll_output()? {
            // Relayed bytes are not messages: they pass as they are.
            Output::Send(link, frame) => match codec::decode::<FromRegistry>(&frame[4..]) {
                Ok(mut msg) => {
                    (self.rewrite)(&mut msg);
                    Output::Send(link, protocol::frame(&msg))
                }
                Err(_) => Output::Send(link, frame),
            },
            other => other,
        })
    }
}
