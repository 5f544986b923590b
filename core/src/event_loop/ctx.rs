//! [`Ctx`]: what the application acts through, and the loop's own state
//! behind it (the slab of connections, the timers, the closes and writes
//! waiting for the end of the turn).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token, Waker};
use slab::Slab;

use super::{CloseReason, LoopConfig, LoopStats, FIRST_ENTRY};
use crate::conn::{Conn, ConnId, ConnState};
use crate::identity::PublicKey;
use crate::timer::{TimerId, TimerWheel};
use crate::transport::{Role, Transport, WriteError, Written};

pub(super) enum LoopTimer<T> {
    App(T),
    ConnectTimeout(ConnId),
    /// The Noise handshake of this connection must be done by now.
    SecureTimeout(ConnId),
    Linger(ConnId),
    ResumeAccept(usize),
}

pub(super) struct Listener {
    pub socket: TcpListener,
    pub paused: bool,
}

pub(super) enum Entry {
    Listener(Listener),
    Conn(Box<Conn>),
    /// Closed this turn; the slot is freed at the end of the turn.
    Dead,
}

pub(super) enum CloseMode {
    /// Write what is queued, then close.
    Graceful,
    /// Drop the socket now.
    Abort,
}

/// What the application acts through. Owned by the [`super::EventLoop`].
pub struct Ctx<T> {
    pub(super) poll_registry: mio::Registry,
    pub(super) entries: Slab<Entry>,
    pub(super) timers: TimerWheel<LoopTimer<T>>,
    pub(super) config: LoopConfig,
    pub(super) now: Instant,
    pub(super) next_generation: u32,
    pub(super) conns: usize,
    /// Connections with something to write this turn.
    pub(super) dirty: Vec<usize>,
    pub(super) closes: VecDeque<(ConnId, CloseReason, CloseMode)>,
    pub(super) to_free: Vec<usize>,
    pub(super) read_again: Vec<ConnId>,
    /// Watched connections whose queue emptied, for [`super::App::on_drained`].
    pub(super) drained: Vec<ConnId>,
    /// Closes were handled after the turn's last write: run a turn again
    /// at once, so that what they cause goes out now.
    pub(super) turn_again: bool,
    pub(super) stop_at: Option<Instant>,
    pub(super) stats: LoopStats,
    /// The loop's one read buffer, shared by every connection.
    pub(super) read_buf: Box<[u8]>,
    /// Where Noise messages are decrypted (secured loops only).
    pub(super) open_scratch: Box<[u8]>,
    /// Where frames are gathered to be sealed together.
    pub(super) seal_buf: Vec<u8>,
    pub(super) waker: Arc<Waker>,
    pub(super) last_refusal_log: Option<Instant>,
    /// When the poll that began this turn returned.
    pub(super) turn_started: Instant,
}

impl<T> Ctx<T> {
    /// The time the event being handled was taken up (read again for each
    /// event and each accepted connection, so that a deadline armed late in
    /// a long turn still counts from its connection's arrival).
    /// Applications take time from here only.
    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn stats(&self) -> &LoopStats {
        &self.stats
    }

    /// When the current turn began (its poll returned): how long a turn
    /// takes is measured from here.
    pub fn turn_started(&self) -> Instant {
        self.turn_started
    }

    /// Bytes waiting to be written, over every connection: what slow
    /// readers hold in memory.
    pub fn queued_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, e)| match e {
                Entry::Conn(c) => c.transport.queued(),
                _ => 0,
            })
            .sum()
    }

    /// Open connections (accepted or dialed, not yet closed).
    pub fn connections(&self) -> usize {
        self.conns
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    pub(super) fn conn(&self, id: ConnId) -> Option<&Conn> {
        match self.entries.get(id.key) {
            Some(Entry::Conn(c)) if c.id == id => Some(c),
            _ => None,
        }
    }

    pub(super) fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        match self.entries.get_mut(id.key) {
            Some(Entry::Conn(c)) if c.id == id => Some(c),
            _ => None,
        }
    }

    /// A connection with the loop's read buffer and Noise scratch space,
    /// borrowed apart.
    pub(super) fn conn_with_buffers(
        &mut self,
        id: ConnId,
    ) -> Option<(&mut Conn, &mut [u8], &mut [u8])> {
        match self.entries.get_mut(id.key) {
            Some(Entry::Conn(c)) if c.id == id => {
                Some((c, &mut self.read_buf, &mut self.open_scratch))
            }
            _ => None,
        }
    }

    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.conn(id).map(|c| c.peer_addr)
    }

    /// The static key the other side proved in its Noise handshake.
    pub fn remote_key(&self, id: ConnId) -> Option<PublicKey> {
        self.conn(id).and_then(|c| c.transport.remote_key())
    }

    /// Queues a frame (as made by `codec::encode_frame`). Returns false when
    /// the connection is gone, was just closed as a slow consumer, or, on a
    /// secured loop, is not up yet: a frame must never go to a key the
    /// application has not seen.
    pub fn send(&mut self, id: ConnId, frame: Bytes) -> bool {
        let max_queued = self.config.max_queued;
        let early_ok = self.config.noise.is_none();
        let Some(conn) = self.conn_mut(id).filter(|c| match c.state {
            ConnState::Open => true,
            ConnState::Connecting => early_ok,
            _ => false,
        }) else {
            return false;
        };
        conn.transport.send(frame);
        let queued = conn.transport.queued();
        let newly_dirty = !conn.dirty && conn.state == ConnState::Open;
        if newly_dirty {
            conn.dirty = true;
        }
        self.stats.frames_out += 1;
        if queued > max_queued {
            self.stats.slow_closed += 1;
            self.closes
                .push_back((id, CloseReason::Slow { queued }, CloseMode::Abort));
            return false;
        }
        if newly_dirty {
            self.dirty.push(id.key);
        }
        true
    }

    /// Closes a connection after writing what is queued for it. The
    /// application hears of it through [`super::App::on_closed`] with
    /// [`CloseReason::Local`].
    pub fn close(&mut self, id: ConnId, reason: impl Into<String>) {
        if self.conn(id).is_some_and(Conn::is_live) {
            self.closes
                .push_back((id, CloseReason::Local(reason.into()), CloseMode::Graceful));
        }
    }

    /// Sets the largest frame accepted from now on for this connection (new
    /// connections start at [`LoopConfig::max_frame`]).
    pub fn set_max_frame(&mut self, id: ConnId, max_frame: usize) {
        if let Some(conn) = self.conn_mut(id) {
            conn.transport.set_max_frame(max_frame);
        }
    }

    /// A Noise session of this loop's identity that is not on a socket of
    /// its own, with this loop's frame limit: for a link carried inside
    /// another connection. `None` on a plaintext loop.
    pub(crate) fn inner_transport(&self, role: Role) -> Option<Transport> {
        let noise = self.config.noise.as_ref()?;
        Some(Transport::secured(role, noise, self.config.max_frame))
    }

    /// Stops or resumes reading a connection. While it is stopped, what it
    /// sends waits in the kernel's buffers, and TCP's flow control slows
    /// the sender: backpressure instead of memory. A read in progress ends
    /// its current chunk first.
    pub fn set_reading(&mut self, id: ConnId, reading: bool) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let was_paused = conn.reads_paused;
        conn.reads_paused = !reading;
        if reading && was_paused {
            // Readiness is edge-triggered: what arrived while paused
            // raised no event we can still see.
            self.read_again.push(id);
        }
    }

    /// Asks for one [`super::App::on_drained`] once everything queued for
    /// the connection is written (at once, next turn, if nothing is).
    pub fn watch_drain(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if conn.transport.queued() == 0 {
            self.drained.push(id);
        } else {
            conn.watch_drain = true;
        }
    }

    /// Starts a non-blocking connect. [`super::App::on_connected`] or
    /// [`super::App::on_closed`] follows.
    pub fn connect(&mut self, addr: SocketAddr) -> io::Result<ConnId> {
        self.start_connect(TcpStream::connect(addr)?, addr)
    }

    /// Like [`Ctx::connect`], from a chosen local address. A load generator
    /// spreads its connections over 127.0.0.2, 127.0.0.3, … this way, so
    /// that one source address's ephemeral ports never run out.
    pub fn connect_from(&mut self, local: IpAddr, addr: SocketAddr) -> io::Result<ConnId> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        self.start_connect(TcpStream::from_std(socket.into()), addr)
    }

    fn start_connect(&mut self, stream: TcpStream, addr: SocketAddr) -> io::Result<ConnId> {
        let id = self.insert_conn(stream, addr, Role::Dialer)?;
        let deadline = self.now + self.config.connect_timeout;
        self.timers.arm(deadline, LoopTimer::ConnectTimeout(id));
        Ok(id)
    }

    pub fn arm(&mut self, at: Instant, timer: T) -> TimerId {
        self.timers.arm(at, LoopTimer::App(timer))
    }

    pub fn cancel(&mut self, id: TimerId) {
        self.timers.cancel(id);
    }

    /// Ends the loop once everything queued is written, or after `grace`,
    /// whichever comes first. Listeners stop accepting at once.
    pub fn stop(&mut self, grace: Duration) {
        let at = self.now + grace;
        self.stop_at = Some(self.stop_at.map_or(at, |prev| prev.min(at)));
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_at.is_some()
    }

    /// Registers a new connection: a dialed one starts `Connecting`, an
    /// accepted one `Securing` (or `Open` on a plaintext loop).
    pub(super) fn insert_conn(
        &mut self,
        stream: TcpStream,
        peer_addr: SocketAddr,
        role: Role,
    ) -> io::Result<ConnId> {
        // Small frames must not wait for Nagle; failure here only costs latency.
        let _ = stream.set_nodelay(true);
        let entry = self.entries.vacant_entry();
        let key = entry.key();
        if u32::try_from(key).is_err() {
            return Err(io::Error::other("more than 2^32 connections"));
        }
        let id = ConnId {
            key,
            generation: self.next_generation,
        };
        let mut stream = stream;
        let (state, interest) = match (role, &self.config.noise) {
            (Role::Dialer, _) => (
                ConnState::Connecting,
                Interest::READABLE | Interest::WRITABLE,
            ),
            (Role::Acceptor, Some(_)) => (ConnState::Securing, Interest::READABLE),
            (Role::Acceptor, None) => (ConnState::Open, Interest::READABLE),
        };
        self.poll_registry
            .register(&mut stream, Token(key + FIRST_ENTRY), interest)?;
        let transport = match &self.config.noise {
            Some(noise) => Transport::secured(role, noise, self.config.max_frame),
            None => Transport::plain(self.config.max_frame),
        };
        entry.insert(Entry::Conn(Box::new(Conn {
            id,
            stream,
            peer_addr,
            state,
            role,
            transport,
            wants_write: state == ConnState::Connecting,
            dirty: false,
            reads_paused: false,
            watch_drain: false,
        })));
        self.next_generation = self.next_generation.wrapping_add(1);
        self.conns += 1;
        if state == ConnState::Securing {
            self.arm_secure_timeout(id);
        }
        Ok(id)
    }

    /// The TCP connection is up: its Noise handshake (the dialer speaks
    /// first) or, on a plaintext loop, its frames may flow.
    pub(super) fn connected(&mut self, id: ConnId) {
        let secured = self.config.noise.is_some();
        if let Some(conn) = self.conn_mut(id) {
            conn.state = if secured {
                ConnState::Securing
            } else {
                ConnState::Open
            };
            self.mark_dirty(id.key);
            if secured {
                self.arm_secure_timeout(id);
            }
        }
    }

    fn arm_secure_timeout(&mut self, id: ConnId) {
        let deadline = self.now + self.config.handshake_timeout;
        self.timers.arm(deadline, LoopTimer::SecureTimeout(id));
    }

    /// Drops the socket now; the slot is freed at the end of the turn.
    pub(super) fn kill(&mut self, key: usize) {
        if let Some(entry) = self.entries.get_mut(key) {
            if let Entry::Conn(conn) = std::mem::replace(entry, Entry::Dead) {
                let mut conn = conn;
                // Dropping the socket deregisters it too; an error here would
                // only mean it is gone already.
                let _ = self.poll_registry.deregister(&mut conn.stream);
                self.conns -= 1;
                self.to_free.push(key);
            }
        }
    }

    pub(super) fn abort(&mut self, id: ConnId, reason: CloseReason) {
        self.closes.push_back((id, reason, CloseMode::Abort));
    }

    pub(super) fn close_gracefully(&mut self, id: ConnId, reason: CloseReason) {
        self.closes.push_back((id, reason, CloseMode::Graceful));
    }

    fn set_write_interest(&mut self, key: usize, want: bool) {
        if let Some(Entry::Conn(conn)) = self.entries.get_mut(key) {
            if conn.wants_write == want {
                return;
            }
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let token = Token(key + FIRST_ENTRY);
            match self
                .poll_registry
                .reregister(&mut conn.stream, token, interest)
            {
                Ok(()) => conn.wants_write = want,
                Err(e) => {
                    let id = conn.id;
                    self.abort(id, CloseReason::Io(e.to_string()));
                }
            }
        }
    }

    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(Entry::Conn(conn)) = self.entries.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Writes every dirty connection's queue as far as the kernel takes it.
    pub(super) fn write_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(Entry::Conn(conn)) = self.entries.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.state == ConnState::Connecting {
                continue;
            }
            let result = conn
                .transport
                .write_to(&mut conn.stream, &mut self.seal_buf);
            let (id, state) = (conn.id, conn.state);
            match result {
                Ok((written, bytes)) => {
                    self.stats.bytes_out += bytes as u64;
                    self.after_write(key, state, written);
                }
                Err(WriteError::Seal(e)) => {
                    self.stats.secure_failed += 1;
                    self.abort(id, CloseReason::Secure(e));
                }
                Err(WriteError::Io(e)) => self.abort(id, CloseReason::Io(e.to_string())),
            }
        }
    }

    fn after_write(&mut self, key: usize, state: ConnState, written: Written) {
        match written {
            Written::All => {
                if let Some(Entry::Conn(conn)) = self.entries.get_mut(key) {
                    if std::mem::take(&mut conn.watch_drain) {
                        self.drained.push(conn.id);
                    }
                }
                self.set_write_interest(key, false);
                if state == ConnState::Closing {
                    self.start_draining(key);
                }
            }
            Written::Blocked => self.set_write_interest(key, true),
        }
    }

    fn start_draining(&mut self, key: usize) {
        if let Some(Entry::Conn(conn)) = self.entries.get_mut(key) {
            conn.state = ConnState::Draining;
            if conn.stream.shutdown(Shutdown::Write).is_err() {
                self.kill(key);
                return;
            }
            // The other side's FIN may have arrived already, and no new
            // readiness event would tell us so.
            let id = conn.id;
            self.read_again.push(id);
        }
    }

    pub(super) fn any_queued(&self) -> bool {
        self.entries.iter().any(|(_, e)| match e {
            Entry::Conn(c) => c.transport.queued() > 0 && c.state != ConnState::Connecting,
            _ => false,
        })
    }
}
