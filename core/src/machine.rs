//! The contract every peerchat state machine keeps (the registry, the
//! peer), and the one [`Driver`] that runs any of them on the event loop.
//!
//! A machine never touches a socket or reads the clock: inputs come in
//! through its `handle_*` methods with the time they happened, and what it
//! wants done comes out of [`Machine::poll_output`] until that says `None`.
//! A machine owns its timers: [`Machine::poll_timeout`] says when it next
//! wants [`Machine::handle_timeout`], so it can cancel what it no longer
//! needs instead of guarding against stale timers. Links are named by
//! [`LinkId`]s. A dial's id is minted by the machine
//! when it asks for the dial, so that it keeps state for the link before
//! any socket exists and hears of a failed dial like of any other close;
//! an accepted link's id is minted by the driver.
//!
//! What the machine cannot do alone (show an event, write a file, end the
//! process) comes out as [`Output::Host`], for the binary's [`Host`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::event_loop::{App, CloseReason, ConnId, Ctx};
use crate::identity::PublicKey;
use crate::secure::{self, SecureError};
use crate::timer::TimerId;
pub use crate::transport::Role;
use crate::transport::{Transport, TransportError};
use crate::wire;

/// A link as a machine names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkId {
    /// Minted by the machine for its [`Output::Dial`].
    Dialed(u64),
    /// Minted by the driver for an accepted connection.
    Accepted(u64),
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkId::Dialed(n) => write!(f, "dialed link {n}"),
            LinkId::Accepted(n) => write!(f, "accepted link {n}"),
        }
    }
}

/// What a machine wants done, for links named `L` (a [`LinkId`] on the
/// loop; tests may name them as they like).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<L, H> {
    /// Connect to `addr`; [`Machine::handle_connected`] or
    /// [`Machine::handle_closed`] for `link` follows.
    Dial { link: L, addr: SocketAddr },
    /// Queue this frame (as made by `codec::encode_frame`) on the link.
    Send(L, Bytes),
    /// Close the link once what is queued for it is written.
    Close(L, String),
    /// Accept frames up to this size on the link from now on.
    SetMaxFrame(L, usize),
    /// From now on the link's frames carry, as opaque chunks, the bytes of
    /// another Noise session inside it (a link relayed through the
    /// registry), with us on `role`'s side of it. The link keeps its id:
    /// its frames, sends and close are the inner session's, and
    /// [`Machine::handle_tunneled`] says when that session is up.
    Tunnel { link: L, role: Role },
    /// Stop (false) or resume (true) reading the link: backpressure.
    Reading(L, bool),
    /// Call [`Machine::handle_drained`] once nothing is queued for the link.
    WatchDrain(L),
    /// For the binary around the machine.
    Host(H),
}

/// A sans-IO state machine the [`Driver`] can run.
pub trait Machine {
    type HostOutput;
    /// An accepted link is secured: the other side proved `key`.
    fn handle_accepted(&mut self, link: LinkId, addr: SocketAddr, key: PublicKey, now: Instant);
    /// A dial is up and secured: the other side proved `key`. Check it
    /// before sending anything only the right peer may read.
    fn handle_connected(&mut self, link: LinkId, key: PublicKey, now: Instant);
    fn handle_frame(&mut self, link: LinkId, body: &[u8], now: Instant);
    /// Exactly once for every link the machine was given or dialed, however
    /// it ended (a dial that never connected included). For a graceful close
    /// ([`CloseReason::Local`], [`CloseReason::Frame`]) the link still takes
    /// frames during this call: the place to tell the other side why.
    fn handle_closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant);
    /// The session inside a tunneled link ([`Output::Tunnel`]) completed
    /// its handshake: the other end proved `key`.
    fn handle_tunneled(&mut self, _link: LinkId, _key: PublicKey, _now: Instant) {}
    /// A link watched with [`Output::WatchDrain`] has nothing queued.
    fn handle_drained(&mut self, _link: LinkId, _now: Instant) {}
    /// When [`Machine::handle_timeout`] is due next, if ever.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Time has reached what [`Machine::poll_timeout`] said (or later).
    fn handle_timeout(&mut self, now: Instant);
    /// Every input of this loop turn is in: the place to send what was
    /// batched during it.
    fn end_turn(&mut self, _now: Instant) {}
    fn poll_output(&mut self) -> Option<Output<LinkId, Self::HostOutput>>;
}

/// A timer of the driven loop: the machine's next timeout, or one of the
/// host's.
pub enum Wake<U> {
    Machine,
    Host(U),
}

/// The context a [`Host`] acts through.
pub type HostCtx<M, H> = Ctx<Wake<<H as Host<M>>::Timer>>;

/// What a binary adds around its machine: acting on its host outputs,
/// signals, wake-ups from other threads, and periodic work of its own.
pub trait Host<M: Machine>: Sized {
    type Timer;
    fn host_output(&mut self, ctx: &mut HostCtx<M, Self>, machine: &mut M, output: M::HostOutput);
    fn on_signal(&mut self, ctx: &mut HostCtx<M, Self>, _machine: &mut M, _signal: i32) {
        ctx.stop(Duration::ZERO);
    }
    fn on_wake(&mut self, _ctx: &mut HostCtx<M, Self>, _machine: &mut M) {}
    /// A timer the host armed with [`Wake::Host`].
    fn on_timer(&mut self, _ctx: &mut HostCtx<M, Self>, _machine: &mut M, _timer: Self::Timer) {}
    /// After the machine's [`Machine::end_turn`].
    fn end_turn(&mut self, _ctx: &mut HostCtx<M, Self>, _machine: &mut M) {}
    /// Every output of the machine so far has been acted on.
    fn settled(&mut self, _ctx: &mut HostCtx<M, Self>, _machine: &mut M) {}
}

/// Runs a machine on the event loop: turns connections into links and
/// back, and outputs into loop calls.
pub struct Driver<M, H> {
    pub machine: M,
    pub host: H,
    /// Dialed links and their connections. An accepted link needs no map:
    /// its id is its connection's ([`ConnId::to_bits`]), which keeps a
    /// registry of many peers two hash maps smaller and a lookup per frame
    /// cheaper.
    links: HashMap<ConnId, LinkId>,
    conns: HashMap<LinkId, ConnId>,
    /// Connections closed unannounced (no proven key): not links at all.
    refused: HashSet<ConnId>,
    /// The loop timer for the machine's timeout, and when it fires.
    armed: Option<(Instant, TimerId)>,
    /// Links carrying another session, by their connection.
    tunnels: HashMap<ConnId, Box<Transport>>,
    /// Tunnels with bytes to pass on to their connection.
    tunnels_dirty: Vec<ConnId>,
    /// Where tunneled Noise messages are opened and sealed (made with the
    /// first tunnel).
    tunnel_scratch: Option<(Box<[u8]>, Vec<u8>)>,
}

impl<M: Machine, H: Host<M>> Driver<M, H> {
    pub fn new(machine: M, host: H) -> Self {
        Driver {
            machine,
            host,
            links: HashMap::new(),
            conns: HashMap::new(),
            refused: HashSet::new(),
            armed: None,
            tunnels: HashMap::new(),
            tunnels_dirty: Vec::new(),
            tunnel_scratch: None,
        }
    }

    /// Arms the loop for the machine's next timeout, if that moved. Done
    /// once a turn, at its end: the loop reads its timers only between
    /// turns.
    fn arm_timeout(&mut self, ctx: &mut HostCtx<M, H>) {
        let wanted = self.machine.poll_timeout();
        if wanted == self.armed.map(|(at, _)| at) {
            return;
        }
        if let Some((_, id)) = self.armed.take() {
            ctx.cancel(id);
        }
        if let Some(at) = wanted {
            self.armed = Some((at, ctx.arm(at, Wake::Machine)));
        }
    }

    /// The connection of `link`, if it has one.
    fn conn(&self, link: LinkId) -> Option<ConnId> {
        match link {
            LinkId::Accepted(bits) => Some(ConnId::from_bits(bits)),
            LinkId::Dialed(_) => self.conns.get(&link).copied(),
        }
    }

    /// The link `conn` is: a dialed one is mapped, any other was accepted.
    fn link(&self, conn: ConnId) -> LinkId {
        match self.links.get(&conn) {
            Some(&link) => link,
            None => LinkId::Accepted(conn.to_bits()),
        }
    }

    /// Acts on every output the machine has, including those its answers
    /// to failed dials cause.
    fn apply(&mut self, ctx: &mut HostCtx<M, H>) {
        while let Some(output) = self.machine.poll_output() {
            match output {
                Output::Dial { link, addr } => match ctx.connect(addr) {
                    Ok(conn) => {
                        self.links.insert(conn, link);
                        self.conns.insert(link, conn);
                    }
                    Err(e) => {
                        let reason = CloseReason::ConnectFailed(e.to_string());
                        self.machine.handle_closed(link, &reason, ctx.now());
                    }
                },
                Output::Send(link, frame) => {
                    if let Some(conn) = self.conn(link) {
                        match self.tunnels.get_mut(&conn) {
                            Some(inner) => {
                                inner.send(frame);
                                self.tunnels_dirty.push(conn);
                            }
                            None => {
                                ctx.send(conn, frame);
                            }
                        }
                    }
                }
                Output::Close(link, reason) => {
                    if let Some(conn) = self.conn(link) {
                        self.flush_tunnel(ctx, conn);
                        ctx.close(conn, reason);
                    }
                }
                Output::Tunnel { link, role } => {
                    if let Some(conn) = self.conn(link) {
                        self.open_tunnel(ctx, conn, role);
                    }
                }
                Output::Reading(link, reading) => {
                    if let Some(conn) = self.conn(link) {
                        ctx.set_reading(conn, reading);
                    }
                }
                Output::WatchDrain(link) => {
                    if let Some(conn) = self.conn(link) {
                        ctx.watch_drain(conn);
                    }
                }
                Output::SetMaxFrame(link, max) => {
                    if let Some(conn) = self.conn(link) {
                        ctx.set_max_frame(conn, max);
                    }
                }
                Output::Host(output) => self.host.host_output(ctx, &mut self.machine, output),
            }
        }
        for conn in std::mem::take(&mut self.tunnels_dirty) {
            self.flush_tunnel(ctx, conn);
        }
        self.host.settled(ctx, &mut self.machine);
    }

    /// Starts the session inside `conn`: a dialer's first handshake message
    /// goes out at once.
    fn open_tunnel(&mut self, ctx: &mut HostCtx<M, H>, conn: ConnId, role: Role) {
        let Some(inner) = ctx.inner_transport(role) else {
            ctx.close(conn, "a tunnel needs a secured loop");
            return;
        };
        self.tunnels.insert(conn, Box::new(inner));
        self.tunnels_dirty.push(conn);
    }

    /// Passes what the session inside `conn` has sealed on, in frames of at
    /// most [`crate::protocol::RELAY_CHUNK`] bytes.
    fn flush_tunnel(&mut self, ctx: &mut HostCtx<M, H>, conn: ConnId) {
        let Some(inner) = self.tunnels.get_mut(&conn) else {
            return;
        };
        let (_, seal_buf) = self
            .tunnel_scratch
            .get_or_insert_with(|| (secure::scratch(), Vec::new()));
        match inner.take_wire(seal_buf) {
            Ok(wire) => {
                for bytes in wire {
                    for chunk in bytes.chunks(crate::protocol::RELAY_CHUNK) {
                        ctx.send(conn, wire::encode_frame(chunk));
                    }
                }
            }
            Err(e) => ctx.close(conn, format!("relayed session: {e}")),
        }
    }

    /// Relayed bytes arrived on `conn`: the session inside it takes them,
    /// and the machine hears of its handshake and frames.
    fn tunnel_input(&mut self, ctx: &mut HostCtx<M, H>, conn: ConnId, mut input: &[u8]) {
        let link = self.link(conn);
        let now = ctx.now();
        let Driver {
            machine,
            tunnels,
            tunnels_dirty,
            tunnel_scratch,
            ..
        } = self;
        let Some(inner) = tunnels.get_mut(&conn) else {
            return;
        };
        let (scratch, _) = tunnel_scratch.get_or_insert_with(|| (secure::scratch(), Vec::new()));
        let failed = |e: SecureError| format!("relayed session: {e}");
        while !input.is_empty() {
            let step = match inner.receive(input, scratch) {
                Ok(step) => step,
                Err(e) => return ctx.close(conn, failed(e)),
            };
            input = &input[step.consumed..];
            if inner.queued() > 0 {
                tunnels_dirty.push(conn);
            }
            if step.completed {
                match inner.remote_key() {
                    Some(key) => machine.handle_tunneled(link, key, now),
                    None => return ctx.close(conn, "relayed session without a key"),
                }
            }
            loop {
                match inner.next_frame() {
                    Ok(Some(body)) => machine.handle_frame(link, &body, now),
                    Ok(None) => break,
                    Err(TransportError::Frame(e)) => {
                        return ctx.close(conn, format!("bad framing in the relayed session: {e}"))
                    }
                    Err(TransportError::Secure(e)) => return ctx.close(conn, failed(e)),
                }
            }
        }
    }
}

impl<M: Machine, H: Host<M>> App for Driver<M, H> {
    type Timer = Wake<H::Timer>;

    fn on_accept(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId, addr: SocketAddr) {
        let Some(key) = ctx.remote_key(conn) else {
            // Only a plaintext loop has connections without a proven key,
            // and machines speak to proven keys only.
            self.refused.insert(conn);
            ctx.close(conn, "no proven key");
            return;
        };
        let link = LinkId::Accepted(conn.to_bits());
        self.machine.handle_accepted(link, addr, key, ctx.now());
        self.apply(ctx);
    }

    fn on_connected(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId) {
        let Some(&link) = self.links.get(&conn) else {
            return;
        };
        match ctx.remote_key(conn) {
            Some(key) => self.machine.handle_connected(link, key, ctx.now()),
            None => ctx.close(conn, "no proven key"),
        }
        self.apply(ctx);
    }

    fn on_frame(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId, body: Bytes) {
        if self.refused.contains(&conn) {
            return;
        }
        if self.tunnels.contains_key(&conn) {
            self.tunnel_input(ctx, conn, &body);
        } else {
            let link = self.link(conn);
            self.machine.handle_frame(link, &body, ctx.now());
        }
        self.apply(ctx);
    }

    fn on_drained(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId) {
        let link = self.link(conn);
        self.machine.handle_drained(link, ctx.now());
        self.apply(ctx);
    }

    fn on_closed(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId, reason: &CloseReason) {
        if self.refused.remove(&conn) {
            return;
        }
        let link = self.link(conn);
        self.machine.handle_closed(link, reason, ctx.now());
        // Still mapped while the machine's last words go out.
        self.apply(ctx);
        self.links.remove(&conn);
        self.conns.remove(&link);
        self.tunnels.remove(&conn);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<Self::Timer>, timer: Self::Timer) {
        match timer {
            Wake::Machine => {
                self.armed = None;
                self.machine.handle_timeout(ctx.now());
            }
            Wake::Host(timer) => self.host.on_timer(ctx, &mut self.machine, timer),
        }
        self.apply(ctx);
    }

    fn on_signal(&mut self, ctx: &mut Ctx<Self::Timer>, signal: i32) {
        self.host.on_signal(ctx, &mut self.machine, signal);
        self.apply(ctx);
    }

    fn on_wake(&mut self, ctx: &mut Ctx<Self::Timer>) {
        self.host.on_wake(ctx, &mut self.machine);
        self.apply(ctx);
    }

    fn on_turn_end(&mut self, ctx: &mut Ctx<Self::Timer>) {
        self.machine.end_turn(ctx.now());
        self.host.end_turn(ctx, &mut self.machine);
        self.apply(ctx);
        self.arm_timeout(ctx);
    }
}
