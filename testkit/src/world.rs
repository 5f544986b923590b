//! An in-process simulated world: state machines (a registry, peers) wired
//! through real transports — framing, CBOR and Noise sessions, in memory —
//! on simulated time, with faults a test can inject: a link cut, a frozen
//! process, a crash and restart.
//!
//! The world runs any [`Machine`] through the same contract the event
//! loop's driver uses, and plays the loop's part: it mints accepted link
//! ids, answers dials (or refuses them), carries bytes with a latency,
//! tells each side of a close, and wakes machines at their
//! [`Machine::poll_timeout`]. Nothing here reads the clock, so a scenario
//! of minutes runs in milliseconds and the same steps always give the same
//! result.
//!
//! Closes follow the loop's rules: a machine hears of every link it was
//! given or dialed exactly once; a graceful close (one it asked for, an end
//! of input, bad framing) still lets it send last words; bytes in flight
//! arrive before the end that follows them.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::machine::{LinkId, Machine, Output};
use peerchat_core::protocol;
use peerchat_core::secure::{self, NoiseConfig};
use peerchat_core::transport::{Role, Transport, TransportError, WriteError, Written};
use peerchat_core::wire::DEFAULT_MAX_FRAME;

/// A machine in the world, by the order it was added.
pub type NodeId = usize;

/// Most steps one call may take: a scenario that never settles fails
/// instead of spinning.
const MAX_STEPS: usize = 1_000_000;

/// What a new node is given before its machine is made.
pub struct NewNode {
    /// The node's static key: a peer declares it in its config.
    pub key: PublicKey,
    /// Where it accepts links (port 0 if it does not listen).
    pub addr: SocketAddr,
    pub now: Instant,
    /// The wall clock at `now`.
    pub wall: SystemTime,
}

/// A [`Machine`] with its host outputs kept as they are, for the test to
/// read back by type.
trait Node {
    fn machine(&mut self) -> &mut dyn Any;
    fn accepted(&mut self, link: LinkId, addr: SocketAddr, key: PublicKey, now: Instant);
    fn connected(&mut self, link: LinkId, key: PublicKey, now: Instant);
    fn frame(&mut self, link: LinkId, body: &[u8], now: Instant);
    fn closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant);
    fn tunneled(&mut self, link: LinkId, key: PublicKey, now: Instant);
    fn drained(&mut self, link: LinkId, now: Instant);
    fn timeout(&self) -> Option<Instant>;
    fn wake(&mut self, now: Instant);
    fn end_turn(&mut self, now: Instant);
    fn output(&mut self) -> Option<Output<LinkId, Box<dyn Any>>>;
}

impl<M: Machine + 'static> Node for M
where
    M::HostOutput: 'static,
{
    fn machine(&mut self) -> &mut dyn Any {
        self
    }
    fn accepted(&mut self, link: LinkId, addr: SocketAddr, key: PublicKey, now: Instant) {
        self.handle_accepted(link, addr, key, now);
    }
    fn connected(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.handle_connected(link, key, now);
    }
    fn frame(&mut self, link: LinkId, body: &[u8], now: Instant) {
        self.handle_frame(link, body, now);
    }
    fn closed(&mut self, link: LinkId, reason: &CloseReason, now: Instant) {
        self.handle_closed(link, reason, now);
    }
    fn tunneled(&mut self, link: LinkId, key: PublicKey, now: Instant) {
        self.handle_tunneled(link, key, now);
    }
    fn drained(&mut self, link: LinkId, now: Instant) {
        self.handle_drained(link, now);
    }
    fn timeout(&self) -> Option<Instant> {
        self.poll_timeout()
    }
    fn wake(&mut self, now: Instant) {
        self.handle_timeout(now);
    }
    fn end_turn(&mut self, now: Instant) {
        Machine::end_turn(self, now);
    }
    fn output(&mut self) -> Option<Output<LinkId, Box<dyn Any>>> {
        Some(match self.poll_output()? {
            Output::Dial { link, addr } => Output::Dial { link, addr },
            Output::Send(link, frame) => Output::Send(link, frame),
            Output::Close(link, reason) => Output::Close(link, reason),
            Output::SetMaxFrame(link, max) => Output::SetMaxFrame(link, max),
            Output::Tunnel { link, role } => Output::Tunnel { link, role },
            Output::Reading(link, reading) => Output::Reading(link, reading),
            Output::WatchDrain(link) => Output::WatchDrain(link),
            Output::Host(host) => Output::Host(Box::new(host)),
        })
    }
}

struct Slot {
    machine: Box<dyn Node>,
    noise: NoiseConfig,
    addr: SocketAddr,
    listening: bool,
    /// Crashed or stopped: takes nothing, accepts nothing.
    down: bool,
    /// Frozen: takes nothing until thawed; what arrives waits.
    frozen: bool,
    held: Vec<Arrival>,
    next_accepted: u64,
    next_port: u16,
    links: HashMap<LinkId, (usize, usize)>,
    host: Vec<Box<dyn Any>>,
}

/// One side of a connection.
struct End {
    node: NodeId,
    link: LinkId,
    addr: SocketAddr,
    transport: Transport,
    /// The session carried inside this end's frames, once the machine
    /// tunneled the link ([`Output::Tunnel`]).
    inner: Option<Transport>,
    /// The machine has been given the link (a dialer from the start).
    known: bool,
    /// Open for frames both ways.
    open: bool,
    /// This side is finished: nothing more reaches its machine.
    done: bool,
}

struct Conn {
    /// The dialer, then the acceptor.
    ends: [End; 2],
}

enum Arrival {
    Bytes {
        conn: usize,
        side: usize,
        bytes: Vec<u8>,
    },
    /// The other side shut its half (graceful) or the connection broke.
    End {
        conn: usize,
        side: usize,
        reason: CloseReason,
    },
    DialFailed {
        node: NodeId,
        link: LinkId,
        reason: String,
    },
}

impl Arrival {
    fn node(&self, conns: &[Conn]) -> NodeId {
        match self {
            Arrival::Bytes { conn, side, .. } | Arrival::End { conn, side, .. } => {
                conns[*conn].ends[*side].node
            }
            Arrival::DialFailed { node, .. } => *node,
        }
    }
}

pub struct World {
    start: Instant,
    now: Instant,
    /// How long bytes take from one node to another.
    pub latency: Duration,
    nodes: Vec<Slot>,
    conns: Vec<Conn>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    arrivals: HashMap<u64, Arrival>,
    seq: u64,
    /// Pairs of nodes that cannot reach each other.
    cut: BTreeSet<(NodeId, NodeId)>,
    scratch: Box<[u8]>,
    seal_buf: Vec<u8>,
    prologue: Vec<u8>,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    pub fn new() -> Self {
        let start = Instant::now();
        World {
            start,
            now: start,
            latency: Duration::from_millis(1),
            nodes: Vec::new(),
            conns: Vec::new(),
            queue: BinaryHeap::new(),
            arrivals: HashMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            scratch: secure::scratch(),
            seal_buf: Vec::new(),
            prologue: protocol::noise_prologue(),
        }
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    /// Simulated time since the world began.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A wall clock that moves with simulated time.
    pub fn wall(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + self.elapsed()
    }

    /// Adds a node at its own address (10.0.0.n); with `listen_port` it
    /// accepts links there.
    pub fn add<M: Machine + 'static>(
        &mut self,
        listen_port: Option<u16>,
        make: impl FnOnce(&NewNode) -> M,
    ) -> NodeId
    where
        M::HostOutput: 'static,
    {
        let id = self.nodes.len();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, (id / 250) as u8, (id % 250 + 1) as u8));
        let identity = Identity::generate();
        let new = NewNode {
            key: identity.public(),
            addr: SocketAddr::new(ip, listen_port.unwrap_or(0)),
            now: self.now,
            wall: self.wall(),
        };
        let machine = make(&new);
        self.nodes.push(Slot {
            machine: Box::new(machine),
            noise: NoiseConfig::new(identity, self.prologue.clone()),
            addr: new.addr,
            listening: listen_port.is_some(),
            down: false,
            frozen: false,
            held: Vec::new(),
            next_accepted: 0,
            next_port: 40_000,
            links: HashMap::new(),
            host: Vec::new(),
        });
        self.settle(id);
        id
    }

    pub fn addr(&self, node: NodeId) -> SocketAddr {
        self.nodes[node].addr
    }

    pub fn key(&self, node: NodeId) -> PublicKey {
        self.nodes[node].noise.identity.public()
    }

    /// The node's machine, to read or to give input to; outputs it makes
    /// meanwhile are acted on by the next step (or [`World::settle`]).
    pub fn machine<M: 'static>(&mut self, node: NodeId) -> &mut M {
        self.nodes[node]
            .machine
            .machine()
            .downcast_mut()
            .expect("the node runs another kind of machine")
    }

    /// Gives input to a node's machine and acts on what it says.
    pub fn with<M: 'static, R>(&mut self, node: NodeId, f: impl FnOnce(&mut M, Instant) -> R) -> R {
        let now = self.now;
        let result = f(self.machine(node), now);
        self.settle(node);
        result
    }

    /// The host outputs a node made so far (of its host output type), in
    /// order, kept until [`World::take_host`].
    pub fn host<H: 'static>(&self, node: NodeId) -> impl Iterator<Item = &H> {
        self.nodes[node].host.iter().map(|h| {
            h.downcast_ref()
                .expect("the node makes another kind of host output")
        })
    }

    /// Takes the host outputs a node made so far (of its host output type).
    pub fn take_host<H: 'static>(&mut self, node: NodeId) -> Vec<H> {
        std::mem::take(&mut self.nodes[node].host)
            .into_iter()
            .map(|h| {
                *h.downcast()
                    .expect("the node makes another kind of host output")
            })
            .collect()
    }

    /// Acts on every output of a node's machine, then sends what its links
    /// have queued.
    pub fn settle(&mut self, node: NodeId) {
        self.nodes[node].machine.end_turn(self.now);
        while let Some(output) = self.nodes[node].machine.output() {
            self.act(node, output);
        }
        self.pump();
    }

    /// Runs until nothing is left to happen before `now + span`, then sets
    /// the time there.
    pub fn run_for(&mut self, span: Duration) {
        let until = self.now + span;
        for _ in 0..MAX_STEPS {
            match self.next_event() {
                Some(at) if at <= until => self.step(),
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
        panic!("the world did not settle within {MAX_STEPS} steps");
    }

    /// Runs until `done` holds (checked after every step) or `limit` of
    /// simulated time passes; says whether it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut World) -> bool) -> bool {
        let until = self.now + limit;
        for _ in 0..MAX_STEPS {
            if done(self) {
                return true;
            }
            match self.next_event() {
                Some(at) if at <= until => self.step(),
                _ => {
                    self.now = until;
                    return done(self);
                }
            }
        }
        panic!("the world did not settle within {MAX_STEPS} steps");
    }

    /// Stops a node's process without a word (SIGSTOP): what reaches it
    /// waits, and its timers do not fire, until [`World::thaw`].
    pub fn freeze(&mut self, node: NodeId) {
        self.nodes[node].frozen = true;
    }

    pub fn thaw(&mut self, node: NodeId) {
        self.nodes[node].frozen = false;
        let held = std::mem::take(&mut self.nodes[node].held);
        for arrival in held {
            self.schedule(self.now, arrival);
        }
    }

    /// Cuts every link between two nodes (each side sees a reset) and
    /// refuses new ones until [`World::heal`].
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a.min(b), a.max(b)));
        for conn in 0..self.conns.len() {
            let ends = [self.conns[conn].ends[0].node, self.conns[conn].ends[1].node];
            if ends == [a, b] || ends == [b, a] {
                for side in 0..2 {
                    self.break_end(conn, side, "connection reset by a cut link");
                }
            }
        }
        self.pump();
    }

    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.cut.remove(&(a.min(b), a.max(b)));
    }

    /// The node's process dies: its machine hears nothing more, and every
    /// other side of its links sees a reset.
    pub fn crash(&mut self, node: NodeId) {
        self.nodes[node].down = true;
        self.nodes[node].held.clear();
        for conn in 0..self.conns.len() {
            for side in 0..2 {
                if self.conns[conn].ends[side].node == node {
                    self.conns[conn].ends[side].done = true;
                    self.conns[conn].ends[side].open = false;
                    self.nodes[node]
                        .links
                        .remove(&self.conns[conn].ends[side].link);
                    self.reset_other(conn, side, "connection reset by a crash");
                }
            }
        }
    }

    /// A crashed node starts again, with a new machine and the same key
    /// and address.
    pub fn restart<M: Machine + 'static>(&mut self, node: NodeId, make: impl FnOnce(&NewNode) -> M)
    where
        M::HostOutput: 'static,
    {
        assert!(self.nodes[node].down, "restart a crashed node");
        let new = NewNode {
            key: self.key(node),
            addr: self.nodes[node].addr,
            now: self.now,
            wall: self.wall(),
        };
        let slot = &mut self.nodes[node];
        slot.machine = Box::new(make(&new));
        slot.down = false;
        slot.frozen = false;
        slot.host.clear();
        self.settle(node);
    }

    fn next_event(&self) -> Option<Instant> {
        let arrival = self.queue.peek().map(|Reverse((at, _))| *at);
        let timer = self
            .nodes
            .iter()
            .filter(|n| !n.down && !n.frozen)
            .filter_map(|n| n.machine.timeout())
            .min();
        [arrival, timer].into_iter().flatten().min()
    }

    /// Does the next thing that happens: an arrival, or a machine's
    /// timeout (arrivals first at the same instant).
    pub fn step(&mut self) {
        let arrival = self.queue.peek().map(|Reverse((at, _))| *at);
        let timer = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.down && !n.frozen)
            .filter_map(|(id, n)| n.machine.timeout().map(|at| (at, id)))
            .min();
        match (arrival, timer) {
            (Some(at), None) => self.take_arrival(at),
            (Some(at), Some((t, _))) if at <= t => self.take_arrival(at),
            (_, Some((at, node))) => {
                self.now = self.now.max(at);
                let now = self.now;
                self.nodes[node].machine.wake(now);
                self.settle(node);
            }
            (None, None) => {}
        }
    }

    fn take_arrival(&mut self, at: Instant) {
        if let Some(Reverse((_, seq))) = self.queue.pop() {
            self.now = self.now.max(at);
            let arrival = self
                .arrivals
                .remove(&seq)
                .expect("queued arrivals are kept");
            self.arrive(arrival);
        }
    }

    fn schedule(&mut self, at: Instant, arrival: Arrival) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.arrivals.insert(self.seq, arrival);
    }

    fn arrive(&mut self, arrival: Arrival) {
        let node = arrival.node(&self.conns);
        if self.nodes[node].down {
            return;
        }
        if self.nodes[node].frozen {
            self.nodes[node].held.push(arrival);
            return;
        }
        match arrival {
            Arrival::Bytes { conn, side, bytes } => self.take_bytes(conn, side, &bytes),
            Arrival::End { conn, side, reason } => {
                let end = &mut self.conns[conn].ends[side];
                if !end.done {
                    let reason = match end.transport.end_of_input() {
                        Err(e) if reason == CloseReason::Eof => CloseReason::Secure(e),
                        _ => reason,
                    };
                    self.finish(conn, side, &reason);
                }
            }
            Arrival::DialFailed { node, link, reason } => {
                let now = self.now;
                self.nodes[node]
                    .machine
                    .closed(link, &CloseReason::ConnectFailed(reason), now);
            }
        }
        self.settle(node);
    }

    fn take_bytes(&mut self, conn: usize, side: usize, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.take_message(conn, side, bytes) {
                Some(taken) => bytes = &bytes[taken..],
                None => return,
            }
        }
    }

    /// Takes bytes up to the first Noise message they complete and hands
    /// its frames over, as the event loop does. How much it took, or
    /// `None` once the end takes no more.
    fn take_message(&mut self, conn: usize, side: usize, bytes: &[u8]) -> Option<usize> {
        let now = self.now;
        let end = &mut self.conns[conn].ends[side];
        if end.done {
            return None;
        }
        let was_open = end.open;
        let step = match end.transport.receive(bytes, &mut self.scratch) {
            Err(e) => {
                self.abort(conn, side, CloseReason::Secure(e));
                return None;
            }
            Ok(step) => step,
        };
        if step.completed {
            let key = end
                .transport
                .remote_key()
                .expect("a secured link proves a key");
            end.open = true;
            end.known = true;
            let (node, link) = (end.node, end.link);
            let other_addr = self.conns[conn].ends[1 - side].addr;
            let machine = &mut self.nodes[node].machine;
            if side == 0 {
                machine.connected(link, key, now);
            } else {
                machine.accepted(link, other_addr, key, now);
            }
            self.settle(node);
        } else if !was_open {
            return Some(step.consumed);
        }
        loop {
            let end = &mut self.conns[conn].ends[side];
            if !end.open {
                return None;
            }
            let (node, link) = (end.node, end.link);
            match end.transport.next_frame() {
                Ok(Some(body)) if end.inner.is_some() => {
                    if !self.take_tunneled(conn, side, &body) {
                        return None;
                    }
                }
                Ok(Some(body)) => {
                    self.nodes[node].machine.frame(link, &body, now);
                    self.settle(node);
                }
                Ok(None) => return Some(step.consumed),
                Err(TransportError::Frame(e)) => {
                    self.close_gracefully(conn, side, CloseReason::Frame(e));
                    return None;
                }
                Err(TransportError::Secure(e)) => {
                    self.abort(conn, side, CloseReason::Secure(e));
                    return None;
                }
            }
        }
    }

    /// Relayed bytes for the session inside a tunneled end, as the
    /// driver takes them. False once the end takes no more.
    fn take_tunneled(&mut self, conn: usize, side: usize, mut bytes: &[u8]) -> bool {
        let now = self.now;
        while !bytes.is_empty() {
            let end = &mut self.conns[conn].ends[side];
            let (node, link) = (end.node, end.link);
            let Some(inner) = end.inner.as_mut() else {
                return false;
            };
            let step = match inner.receive(bytes, &mut self.scratch) {
                Ok(step) => step,
                Err(e) => {
                    self.close_gracefully(
                        conn,
                        side,
                        CloseReason::Local(format!("relayed session: {e}")),
                    );
                    return false;
                }
            };
            bytes = &bytes[step.consumed..];
            if step.completed {
                let key = inner.remote_key().expect("a secured session proves a key");
                self.nodes[node].machine.tunneled(link, key, now);
                self.settle(node);
            }
            loop {
                let end = &mut self.conns[conn].ends[side];
                let Some(inner) = end.inner.as_mut().filter(|_| end.open) else {
                    return false;
                };
                match inner.next_frame() {
                    Ok(Some(body)) => {
                        self.nodes[node].machine.frame(link, &body, now);
                        self.settle(node);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let why = format!("relayed session: {e:?}");
                        self.close_gracefully(conn, side, CloseReason::Local(why));
                        return false;
                    }
                }
            }
        }
        true
    }

    fn act(&mut self, node: NodeId, output: Output<LinkId, Box<dyn Any>>) {
        match output {
            Output::Dial { link, addr } => self.dial(node, link, addr),
            Output::Send(link, frame) => {
                if let Some(end) = self.end_of(node, link) {
                    if end.open {
                        match end.inner.as_mut() {
                            Some(inner) => inner.send(frame),
                            None => end.transport.send(frame),
                        }
                    }
                }
            }
            Output::Tunnel { link, role } => {
                let noise = self.nodes[node].noise.clone();
                if let Some(end) = self.end_of(node, link) {
                    end.inner = Some(Transport::secured(role, &noise, DEFAULT_MAX_FRAME));
                }
            }
            // Memory takes everything at once: nothing to slow, and every
            // queue is empty as soon as it is written.
            Output::Reading(..) => {}
            Output::WatchDrain(link) => {
                let now = self.now;
                self.nodes[node].machine.drained(link, now);
            }
            Output::Close(link, reason) => {
                if let Some(&(conn, side)) = self.nodes[node].links.get(&link) {
                    self.close_gracefully(conn, side, CloseReason::Local(reason));
                }
            }
            Output::SetMaxFrame(link, max) => {
                if let Some(end) = self.end_of(node, link) {
                    end.transport.set_max_frame(max);
                }
            }
            Output::Host(host) => self.nodes[node].host.push(host),
        }
    }

    fn end_of(&mut self, node: NodeId, link: LinkId) -> Option<&mut End> {
        let &(conn, side) = self.nodes[node].links.get(&link)?;
        Some(&mut self.conns[conn].ends[side])
    }

    fn dial(&mut self, node: NodeId, link: LinkId, addr: SocketAddr) {
        let target = self
            .nodes
            .iter()
            .position(|n| n.listening && n.addr == addr);
        let reachable = target
            .filter(|&t| !self.nodes[t].down && !self.cut.contains(&(node.min(t), node.max(t))));
        let Some(target) = reachable else {
            let at = self.now + self.latency;
            let reason = "connection refused".to_string();
            self.schedule(at, Arrival::DialFailed { node, link, reason });
            return;
        };
        let from = &mut self.nodes[node];
        let from_addr = SocketAddr::new(from.addr.ip(), from.next_port);
        from.next_port = from.next_port.checked_add(1).unwrap_or(40_000);
        let dialer = End {
            node,
            link,
            addr: from_addr,
            transport: Transport::secured(Role::Dialer, &from.noise, DEFAULT_MAX_FRAME),
            inner: None,
            known: true,
            open: false,
            done: false,
        };
        let to = &mut self.nodes[target];
        let accepted = LinkId::Accepted(to.next_accepted);
        to.next_accepted += 1;
        let acceptor = End {
            node: target,
            link: accepted,
            addr,
            transport: Transport::secured(Role::Acceptor, &to.noise, DEFAULT_MAX_FRAME),
            inner: None,
            known: false,
            open: false,
            done: false,
        };
        let conn = self.conns.len();
        self.conns.push(Conn {
            ends: [dialer, acceptor],
        });
        self.nodes[node].links.insert(link, (conn, 0));
        self.nodes[target].links.insert(accepted, (conn, 1));
    }

    /// Sends what every live end has queued, to arrive after the latency.
    fn pump(&mut self) {
        for conn in 0..self.conns.len() {
            for side in 0..2 {
                if !self.conns[conn].ends[side].done {
                    self.pump_end(conn, side);
                }
            }
        }
    }

    /// Sends what one end has queued, a closing end's last words too.
    fn pump_end(&mut self, conn: usize, side: usize) {
        let end = &mut self.conns[conn].ends[side];
        if let Some(inner) = end.inner.as_mut() {
            match inner.take_wire(&mut self.seal_buf) {
                Ok(wire) => {
                    for bytes in wire {
                        for chunk in bytes.chunks(protocol::RELAY_CHUNK) {
                            end.transport.send(peerchat_core::wire::encode_frame(chunk));
                        }
                    }
                }
                Err(e) => return self.abort(conn, side, CloseReason::Secure(e)),
            }
        }
        let end = &mut self.conns[conn].ends[side];
        if end.transport.queued() == 0 {
            return;
        }
        let mut bytes = Vec::new();
        match end.transport.write_to(&mut bytes, &mut self.seal_buf) {
            Ok((Written::All, _)) => {}
            Ok((Written::Blocked, _)) => unreachable!("memory never blocks"),
            Err(WriteError::Seal(e)) => return self.abort(conn, side, CloseReason::Secure(e)),
            Err(WriteError::Io(e)) => unreachable!("memory never fails: {e}"),
        }
        let other = &self.conns[conn].ends[1 - side];
        if !other.done && !bytes.is_empty() {
            let at = self.now + self.latency;
            self.schedule(
                at,
                Arrival::Bytes {
                    conn,
                    side: 1 - side,
                    bytes,
                },
            );
        }
    }

    /// This side closes after its last words: the machine hears why (and
    /// may still send), what is queued goes out, then the other side sees
    /// the end.
    fn close_gracefully(&mut self, conn: usize, side: usize, reason: CloseReason) {
        if !self.conns[conn].ends[side].open {
            // Not open yet: the loop drops such a connection at once.
            self.abort(conn, side, reason);
            return;
        }
        self.finish(conn, side, &reason);
        self.pump_end(conn, side);
        let at = self.now + self.latency;
        self.schedule(
            at,
            Arrival::End {
                conn,
                side: 1 - side,
                reason: CloseReason::Eof,
            },
        );
    }

    /// This side ends now, for `reason`; the other sees a reset.
    fn abort(&mut self, conn: usize, side: usize, reason: CloseReason) {
        let end = &mut self.conns[conn].ends[side];
        if end.done {
            return;
        }
        end.open = false;
        end.done = true;
        let (node, link, known) = (end.node, end.link, end.known);
        end.known = false;
        self.reset_other(conn, side, "connection reset");
        self.nodes[node].links.remove(&link);
        if known {
            let now = self.now;
            self.nodes[node].machine.closed(link, &reason, now);
        }
    }

    fn break_end(&mut self, conn: usize, side: usize, why: &str) {
        self.abort(conn, side, CloseReason::Io(why.into()));
    }

    fn reset_other(&mut self, conn: usize, side: usize, why: &str) {
        if !self.conns[conn].ends[1 - side].done {
            let at = self.now + self.latency;
            let reason = CloseReason::Io(why.into());
            self.schedule(
                at,
                Arrival::End {
                    conn,
                    side: 1 - side,
                    reason,
                },
            );
        }
    }

    /// The machine hears of the end of its side (once), while it can still
    /// send on it.
    fn finish(&mut self, conn: usize, side: usize, reason: &CloseReason) {
        let now = self.now;
        let end = &mut self.conns[conn].ends[side];
        let (node, link, known) = (end.node, end.link, end.known);
        end.known = false;
        if known {
            self.nodes[node].machine.closed(link, reason, now);
            while let Some(output) = self.nodes[node].machine.output() {
                self.act(node, output);
            }
        }
        let end = &mut self.conns[conn].ends[side];
        end.open = false;
        end.done = true;
        self.nodes[node].links.remove(&link);
    }
}
