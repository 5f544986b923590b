//! The registry on the event loop: the machine contract of
//! [`peerchat_core::machine`], for links named by the driver.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Instant;

use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Machine};

use crate::{Action, Disconnect, Registry};

/// The registry on the event loop, through the machine contract.
impl Machine for Registry<LinkId> {
    type HostOutput = Infallible;

    fn handle_accepted(&mut self, link: LinkId, addr: SocketAddr, key: PublicKey, now: Instant) {
        self.on_accept(link, addr, key, now);
    }

    /// The registry dials only to probe.
    fn handle_connected(&mut self, link: LinkId, key: PublicKey, _now: Instant) {
        self.probe_connected(link, key);
    }

    fn handle_frame(&mut self, link: LinkId, body: &[u8], now: Instant) {
        self.on_frame(link, body, now);
    }

    fn handle_closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant) {
        let how = match reason {
            CloseReason::Slow { queued } => {
                let (addr, name) = self.who(link);
                tracing::warn!(%addr, %name, queued, "dropping a slow consumer");
                Disconnect::Slow
            }
            CloseReason::Frame(err) => Disconnect::BadFrame(err.clone()),
            _ => Disconnect::Lost,
        };
        self.on_closed(link, how, now);
    }

    fn handle_drained(&mut self, link: LinkId, _now: Instant) {
        self.relay_drained(link);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Registry::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        Registry::handle_timeout(self, now);
    }

    fn end_turn(&mut self, now: Instant) {
        self.start_probes(now, LinkId::Dialed);
        self.send_batched(now);
    }

    fn poll_output(&mut self) -> Option<Action<LinkId>> {
        Registry::poll_output(self)
    }
}
