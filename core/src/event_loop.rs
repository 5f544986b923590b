//! The one event loop: a single thread that owns the mio `Poll`, the slab of
//! connections, the waker, the signal source and the timer wheel.
//!
//! Every turn does the same steps: compute the timeout from the next timer,
//! poll, dispatch readiness (accept and read until `WouldBlock`), fire due
//! timers, let the application finish the turn, then flush every connection
//! that has something queued. Applications plug in through [`App`]: they get
//! frames, timers and closes, and act through [`Ctx`]; they never see a socket.
//!
//! Connection ids carry a generation, and slab slots are freed only at the
//! end of a turn, so neither a late event nor a stale id can reach a
//! connection that reused a slot.
//!
//! Given an [`Identity`], the loop secures every connection with a Noise
//! session ([`crate::secure`]) before the application hears of it: an
//! accepted connection reaches [`App::on_accept`], a dialed one
//! [`App::on_connected`], only once the handshake is done, and
//! [`Ctx::remote_key`] then names the key the other side proved. Frames are
//! plaintext to the application and sealed per connection at flush time.
//!
//! Longer than the project's 800-line aim, for now: the Noise and framing
//! work it still does per connection moves into a sans-IO transport type,
//! after which the loop only moves bytes and readiness. That split is one
//! step of the planned architecture work (transport, machine contract, peer
//! rooms, testkit); done here alone, it would be done twice.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::conn::{Conn, ConnState, Flushed};
use crate::identity::PublicKey;
use crate::secure::{self, NoiseConfig, SecureChannel, SecureError};
use crate::timer::{TimerId, TimerWheel};
use crate::wire::{FrameError, DEFAULT_MAX_FRAME};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Slab key `k` is registered as `Token(k + FIRST_ENTRY)`.
const FIRST_ENTRY: usize = 2;

/// Bytes read from one connection per turn before the others get a go.
const READ_BUDGET: usize = 1024 * 1024;
/// Size of the loop's one read buffer, shared by every connection.
const SCRATCH: usize = 64 * 1024;
/// How long a listener rests after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Listen backlog: a thousand peers connecting at once must not lose SYNs.
const LISTEN_BACKLOG: i32 = 4096;

/// A connection as the application knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    key: usize,
    generation: u64,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn {}.{}", self.key, self.generation)
    }
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The other side closed it.
    Eof,
    /// Reading or writing failed (reset, broken pipe, …).
    Io(String),
    /// The byte stream broke the framing rules.
    Frame(FrameError),
    /// More than the cap was queued for it: a slow consumer.
    Slow {
        queued: usize,
    },
    ConnectFailed(String),
    ConnectTimeout,
    /// The Noise session failed: handshake, authentication or its framing.
    Secure(SecureError),
    /// No Noise handshake completed in time.
    HandshakeTimeout,
    /// The application closed it, for this reason.
    Local(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("closed by the other side"),
            CloseReason::Io(e) => write!(f, "connection error: {e}"),
            CloseReason::Frame(e) => write!(f, "bad framing: {e}"),
            CloseReason::Slow { queued } => {
                write!(f, "slow consumer: {queued} bytes were waiting to be sent")
            }
            CloseReason::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            CloseReason::ConnectTimeout => f.write_str("connect timed out"),
            CloseReason::Secure(e) => write!(f, "secure session: {e}"),
            CloseReason::HandshakeTimeout => f.write_str("no Noise handshake in time"),
            CloseReason::Local(reason) => f.write_str(reason),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Largest frame body accepted on a new connection.
    pub max_frame: usize,
    /// Bytes that may wait in one connection's queue before it is closed as
    /// a slow consumer.
    pub max_queued: usize,
    /// Open connections beyond this are closed as soon as they are accepted.
    pub max_connections: usize,
    pub tick: Duration,
    pub wheel_slots: usize,
    pub connect_timeout: Duration,
    /// How long a closing connection may take to flush and be closed by the
    /// other side before it is dropped.
    pub close_linger: Duration,
    /// Deliver SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH
    /// session) to [`App::on_signal`].
    pub handle_signals: bool,
    /// Secure every connection with a Noise session.
    pub noise: Option<NoiseConfig>,
    /// How long a connection may take to complete its Noise handshake.
    pub handshake_timeout: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_queued: 4 * 1024 * 1024,
            max_connections: 100_000,
            tick: Duration::from_millis(10),
            wheel_slots: 1024,
            connect_timeout: Duration::from_secs(5),
            close_linger: Duration::from_secs(1),
            handle_signals: false,
            noise: None,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters since the loop started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub accepted: u64,
    /// Accepted and closed at once because of `max_connections`.
    pub refused: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub slow_closed: u64,
    /// Noise sessions that failed (a bad handshake or message) or whose
    /// handshake did not finish in time.
    pub secure_failed: u64,
}

/// The application side of the loop.
pub trait App {
    type Timer;
    /// A new inbound connection (on a secured loop: with its handshake done).
    fn on_accept(&mut self, _ctx: &mut Ctx<Self::Timer>, _conn: ConnId, _peer: SocketAddr) {}
    /// An outbound connection from [`Ctx::connect`] is established (on a
    /// secured loop: with its handshake done). Check [`Ctx::remote_key`]
    /// here before sending anything that only the right peer may read.
    fn on_connected(&mut self, _ctx: &mut Ctx<Self::Timer>, _conn: ConnId) {}
    fn on_frame(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId, body: Bytes);
    /// Called exactly once for every connection the application was given,
    /// however it ended, including closes it asked for. For a graceful close
    /// ([`CloseReason::Local`], [`CloseReason::Frame`]) the connection still
    /// takes frames during this call, and they are flushed before it closes:
    /// the place to tell the other side why.
    fn on_closed(&mut self, ctx: &mut Ctx<Self::Timer>, conn: ConnId, reason: &CloseReason);
    fn on_timer(&mut self, _ctx: &mut Ctx<Self::Timer>, _timer: Self::Timer) {}
    fn on_signal(&mut self, ctx: &mut Ctx<Self::Timer>, _signal: i32) {
        ctx.stop(Duration::ZERO);
    }
    /// The loop's [`Waker`] was woken (by another thread).
    fn on_wake(&mut self, _ctx: &mut Ctx<Self::Timer>) {}
    /// Everything of this turn has been dispatched; queued output is flushed
    /// right after. The place to send what was batched during the turn.
    fn on_turn_end(&mut self, _ctx: &mut Ctx<Self::Timer>) {}
}

enum LoopTimer<T> {
    App(T),
    ConnectTimeout(ConnId),
    HandshakeTimeout(ConnId),
    Linger(ConnId),
    ResumeAccept(usize),
}

struct Listener {
    socket: TcpListener,
    paused: bool,
}

enum Entry {
    Listener(Listener),
    Conn(Box<Conn>),
    /// Closed this turn; the slot is freed at the end of the turn.
    Dead,
}

enum CloseMode {
    /// Flush what is queued, then close.
    Graceful,
    /// Drop the socket now.
    Abort,
}

/// What the application acts through. Owned by the [`EventLoop`].
pub struct Ctx<T> {
    registry: mio::Registry,
    entries: Slab<Entry>,
    timers: TimerWheel<LoopTimer<T>>,
    config: LoopConfig,
    now: Instant,
    next_generation: u64,
    conns: usize,
    dirty: Vec<usize>,
    closes: VecDeque<(ConnId, CloseReason, CloseMode)>,
    to_free: Vec<usize>,
    read_again: Vec<ConnId>,
    /// Closes were handled after the turn's last flush: run a turn again
    /// at once, so that what they cause goes out now.
    turn_again: bool,
    stop_at: Option<Instant>,
    stats: LoopStats,
    scratch: Box<[u8]>,
    /// Where Noise messages are decrypted (secured loops only).
    open_scratch: Box<[u8]>,
    /// Where frames are gathered to be sealed together.
    seal_buf: Vec<u8>,
    waker: Arc<Waker>,
    last_refusal_log: Option<Instant>,
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

    /// Open connections (accepted or dialed, not yet closed).
    pub fn connections(&self) -> usize {
        self.conns
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        match self.entries.get(id.key) {
            Some(Entry::Conn(c)) if c.id == id => Some(c),
            _ => None,
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        match self.entries.get_mut(id.key) {
            Some(Entry::Conn(c)) if c.id == id => Some(c),
            _ => None,
        }
    }

    /// A connection the application may still use.
    fn live_conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conn_mut(id).filter(|c| {
            matches!(
                c.state,
                ConnState::Open | ConnState::Connecting | ConnState::Securing
            )
        })
    }

    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.conn(id).map(|c| c.peer_addr)
    }

    /// The static key the other side proved in its Noise handshake.
    pub fn remote_key(&self, id: ConnId) -> Option<PublicKey> {
        self.conn(id)
            .and_then(|c| c.secure.as_ref())
            .and_then(SecureChannel::remote_key)
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
        conn.enqueue(frame);
        let queued = conn.queued();
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

    /// Closes a connection after flushing what is queued for it. The
    /// application hears of it through [`App::on_closed`] with
    /// [`CloseReason::Local`].
    pub fn close(&mut self, id: ConnId, reason: impl Into<String>) {
        if self.live_conn_mut(id).is_some() {
            self.closes
                .push_back((id, CloseReason::Local(reason.into()), CloseMode::Graceful));
        }
    }

    /// Sets the largest frame accepted from now on for this connection.
    pub fn set_max_frame(&mut self, id: ConnId, max_frame: usize) {
        if let Some(conn) = self.conn_mut(id) {
            conn.decoder.set_max_frame(max_frame);
            if let Some(channel) = conn.secure.as_mut() {
                channel.set_max_frame(max_frame);
            }
        }
    }

    /// Starts a non-blocking connect. [`App::on_connected`] or
    /// [`App::on_closed`] follows.
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
        let id = self.insert_conn(stream, addr, ConnState::Connecting, true)?;
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

    /// Ends the loop once everything queued is flushed, or after `grace`,
    /// whichever comes first. Listeners stop accepting at once.
    pub fn stop(&mut self, grace: Duration) {
        let at = self.now + grace;
        self.stop_at = Some(self.stop_at.map_or(at, |prev| prev.min(at)));
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_at.is_some()
    }

    fn insert_conn(
        &mut self,
        stream: TcpStream,
        peer_addr: SocketAddr,
        state: ConnState,
        announced: bool,
    ) -> io::Result<ConnId> {
        // Small frames must not wait for Nagle; failure here only costs latency.
        let _ = stream.set_nodelay(true);
        let entry = self.entries.vacant_entry();
        let key = entry.key();
        let id = ConnId {
            key,
            generation: self.next_generation,
        };
        let mut stream = stream;
        let interest = match state {
            ConnState::Connecting => Interest::READABLE | Interest::WRITABLE,
            _ => Interest::READABLE,
        };
        self.registry
            .register(&mut stream, Token(key + FIRST_ENTRY), interest)?;
        let mut conn = Conn::new(
            id,
            stream,
            peer_addr,
            state,
            self.config.max_frame,
            announced,
        );
        conn.wants_write = state == ConnState::Connecting;
        entry.insert(Entry::Conn(Box::new(conn)));
        self.next_generation += 1;
        self.conns += 1;
        if state == ConnState::Securing {
            self.start_securing(id);
        }
        Ok(id)
    }

    /// The TCP connection is up: start its Noise handshake (the dialer
    /// speaks first) under a deadline.
    fn start_securing(&mut self, id: ConnId) {
        let Some(noise) = self.config.noise.clone() else {
            return;
        };
        let deadline = self.now + self.config.handshake_timeout;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.state = ConnState::Securing;
        let mut channel = if conn.announced {
            let mut first = Vec::new();
            let channel = SecureChannel::initiator(&noise.identity, &noise.prologue, &mut first);
            conn.enqueue_wire(Bytes::from(first));
            channel
        } else {
            SecureChannel::responder(&noise.identity, &noise.prologue)
        };
        channel.set_max_frame(conn.decoder.max_frame());
        conn.secure = Some(channel);
        self.mark_dirty(id.key);
        self.timers.arm(deadline, LoopTimer::HandshakeTimeout(id));
    }

    /// Drops the socket now; the slot is freed at the end of the turn.
    fn kill(&mut self, key: usize) {
        if let Some(entry) = self.entries.get_mut(key) {
            if let Entry::Conn(conn) = std::mem::replace(entry, Entry::Dead) {
                let mut conn = conn;
                // Dropping the socket deregisters it too; an error here would
                // only mean it is gone already.
                let _ = self.registry.deregister(&mut conn.stream);
                self.conns -= 1;
                self.to_free.push(key);
            }
        }
    }

    fn abort(&mut self, id: ConnId, reason: CloseReason) {
        self.closes.push_back((id, reason, CloseMode::Abort));
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
            match self.registry.reregister(&mut conn.stream, token, interest) {
                Ok(()) => conn.wants_write = want,
                Err(e) => {
                    let id = conn.id;
                    self.abort(id, CloseReason::Io(e.to_string()));
                }
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(Entry::Conn(conn)) = self.entries.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Writes every dirty connection's queue as far as the kernel takes it.
    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(Entry::Conn(conn)) = self.entries.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.state == ConnState::Connecting {
                continue;
            }
            if let Err(e) = conn.seal_pending(&mut self.seal_buf) {
                let id = conn.id;
                self.stats.secure_failed += 1;
                self.abort(id, CloseReason::Secure(e));
                continue;
            }
            let before = conn.queued();
            let result = conn.flush();
            self.stats.bytes_out += (before - conn.queued()) as u64;
            let (id, state) = (conn.id, conn.state);
            match result {
                Ok(Flushed::All) => {
                    self.set_write_interest(key, false);
                    if state == ConnState::Closing {
                        self.start_draining(key);
                    }
                }
                Ok(Flushed::Blocked) => self.set_write_interest(key, true),
                Err(e) => self.abort(id, CloseReason::Io(e.to_string())),
            }
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

    fn any_queued(&self) -> bool {
        self.entries.iter().any(|(_, e)| match e {
            Entry::Conn(c) => c.queued() > 0 && c.state != ConnState::Connecting,
            _ => false,
        })
    }
}

/// The loop itself. Create it, add listeners, then [`EventLoop::run`] an app.
pub struct EventLoop<T> {
    poll: Poll,
    events: Events,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    ctx: Ctx<T>,
}

impl<T> EventLoop<T> {
    pub fn new(config: LoopConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let signals = if config.handle_signals {
            let mut signals = signal_hook_mio::v1_0::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ])?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)?;
            Some(signals)
        } else {
            None
        };
        let now = Instant::now();
        let config_secured = config.noise.is_some();
        let ctx = Ctx {
            registry: poll.registry().try_clone()?,
            entries: Slab::new(),
            timers: TimerWheel::new(now, config.tick, config.wheel_slots),
            config,
            now,
            next_generation: 0,
            conns: 0,
            dirty: Vec::new(),
            closes: VecDeque::new(),
            to_free: Vec::new(),
            read_again: Vec::new(),
            turn_again: false,
            stop_at: None,
            stats: LoopStats::default(),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            open_scratch: if config_secured {
                secure::scratch()
            } else {
                Box::default()
            },
            seal_buf: Vec::new(),
            waker,
            last_refusal_log: None,
        };
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(1024),
            signals,
            ctx,
        })
    }

    /// Binds a listener (with a deep backlog) and returns its real address.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let mut listener = TcpListener::from_std(socket.into());
        let local = listener.local_addr()?;
        let entry = self.ctx.entries.vacant_entry();
        self.poll.registry().register(
            &mut listener,
            Token(entry.key() + FIRST_ENTRY),
            Interest::READABLE,
        )?;
        entry.insert(Entry::Listener(Listener {
            socket: listener,
            paused: false,
        }));
        Ok(local)
    }

    pub fn ctx(&mut self) -> &mut Ctx<T> {
        &mut self.ctx
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.ctx.waker()
    }

    /// Runs until the application calls [`Ctx::stop`] and the queues drain
    /// (or the grace period ends).
    pub fn run<A: App<Timer = T>>(&mut self, app: &mut A) -> io::Result<()> {
        let mut due: Vec<LoopTimer<T>> = Vec::new();
        loop {
            let ctx = &mut self.ctx;
            if let Some(stop_at) = ctx.stop_at {
                if ctx.now >= stop_at || !ctx.any_queued() {
                    return Ok(());
                }
            }
            let again = std::mem::take(&mut ctx.turn_again);
            let timeout = if ctx.read_again.is_empty() && ctx.dirty.is_empty() && !again {
                let wake = [ctx.timers.next_wake(), ctx.stop_at]
                    .into_iter()
                    .flatten()
                    .min();
                wake.map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            ctx.now = Instant::now();

            for id in std::mem::take(&mut ctx.read_again) {
                read_ready(ctx, app, id);
            }
            for event in self.events.iter() {
                ctx.now = Instant::now();
                match event.token() {
                    WAKER => app.on_wake(ctx),
                    SIGNALS => {
                        if let Some(signals) = &mut self.signals {
                            for signal in signals.pending() {
                                app.on_signal(ctx, signal);
                            }
                        }
                    }
                    Token(t) => {
                        let key = t - FIRST_ENTRY;
                        match ctx.entries.get(key) {
                            Some(Entry::Listener(_)) => accept_ready(ctx, app, key),
                            Some(Entry::Conn(conn)) => {
                                let id = conn.id;
                                conn_ready(ctx, app, id, event);
                            }
                            Some(Entry::Dead) | None => {}
                        }
                    }
                }
                process_closes(ctx, app);
            }

            ctx.now = Instant::now();
            ctx.timers.expire(ctx.now, |t| due.push(t));
            for timer in due.drain(..) {
                fire(ctx, app, timer);
                process_closes(ctx, app);
            }

            // Closes handled while ending the turn (a slow consumer found
            // while a broadcast is queued, a write error found by the flush)
            // can batch more output, such as a registry's `left`: end the
            // turn again for them, a bounded number of times.
            for round in 1..=4 {
                app.on_turn_end(ctx);
                let mut closed = process_closes(ctx, app);
                ctx.flush_dirty();
                closed |= process_closes(ctx, app);
                if !closed {
                    break;
                }
                ctx.turn_again = round == 4;
            }
            for key in ctx.to_free.drain(..) {
                ctx.entries.remove(key);
            }
        }
    }
}

fn fire<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, timer: LoopTimer<A::Timer>) {
    match timer {
        LoopTimer::App(t) => app.on_timer(ctx, t),
        LoopTimer::ConnectTimeout(id) => {
            if ctx
                .conn(id)
                .is_some_and(|c| c.state == ConnState::Connecting)
            {
                ctx.abort(id, CloseReason::ConnectTimeout);
            }
        }
        LoopTimer::HandshakeTimeout(id) => {
            if ctx.conn(id).is_some_and(|c| c.state == ConnState::Securing) {
                ctx.stats.secure_failed += 1;
                ctx.abort(id, CloseReason::HandshakeTimeout);
            }
        }
        LoopTimer::Linger(id) => {
            if ctx.conn(id).is_some() {
                ctx.kill(id.key);
            }
        }
        LoopTimer::ResumeAccept(key) => {
            if let Some(Entry::Listener(l)) = ctx.entries.get_mut(key) {
                l.paused = false;
                accept_ready(ctx, app, key);
            }
        }
    }
}

/// Applies the closes requested so far, telling the application of each.
/// True if there were any.
fn process_closes<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A) -> bool {
    let any = !ctx.closes.is_empty();
    while let Some((id, reason, mode)) = ctx.closes.pop_front() {
        let Some(conn) = ctx.conn_mut(id) else {
            continue;
        };
        match (conn.state, mode) {
            (ConnState::Open, CloseMode::Graceful) => {
                tracing::debug!(%id, %reason, "connection closing");
                // Still open while the app hears of it, so that a last frame
                // (an error telling the other side why) goes out first.
                app.on_closed(ctx, id, &reason);
                if let Some(conn) = ctx.conn_mut(id) {
                    conn.state = ConnState::Closing;
                    let linger = ctx.now + ctx.config.close_linger;
                    ctx.timers.arm(linger, LoopTimer::Linger(id));
                    ctx.mark_dirty(id.key);
                }
            }
            (ConnState::Open | ConnState::Connecting | ConnState::Securing, _) => {
                tracing::debug!(%id, %reason, "connection closed");
                let announced = conn.announced;
                ctx.kill(id.key);
                if announced {
                    app.on_closed(ctx, id, &reason);
                }
            }
            (ConnState::Closing | ConnState::Draining, CloseMode::Abort) => ctx.kill(id.key),
            (ConnState::Closing | ConnState::Draining, CloseMode::Graceful) => {}
        }
    }
    any
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn accept_ready<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, key: usize) {
    loop {
        if ctx.stop_at.is_some() {
            return;
        }
        let Some(Entry::Listener(listener)) = ctx.entries.get_mut(key) else {
            return;
        };
        if listener.paused {
            return;
        }
        match listener.socket.accept() {
            Ok((stream, addr)) => {
                ctx.now = Instant::now();
                ctx.stats.accepted += 1;
                if ctx.conns >= ctx.config.max_connections {
                    drop(stream);
                    ctx.stats.refused += 1;
                    let now = ctx.now;
                    if ctx
                        .last_refusal_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        ctx.last_refusal_log = Some(now);
                        tracing::warn!(
                            limit = ctx.config.max_connections,
                            refused = ctx.stats.refused,
                            "connection limit reached; closing new connections at once"
                        );
                    }
                    continue;
                }
                let secured = ctx.config.noise.is_some();
                let state = if secured {
                    ConnState::Securing
                } else {
                    ConnState::Open
                };
                match ctx.insert_conn(stream, addr, state, !secured) {
                    Ok(id) if secured => tracing::trace!(%id, %addr, "accepted; securing"),
                    Ok(id) => {
                        app.on_accept(ctx, id, addr);
                        process_closes(ctx, app);
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "could not register an accepted connection")
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // Out of descriptors (or another listener fault): rest instead
                // of spinning on a listener that stays readable.
                listener.paused = true;
                let level_warn = is_out_of_descriptors(&e);
                if level_warn {
                    tracing::warn!(error = %e, "cannot accept: out of file descriptors; pausing accepts");
                } else {
                    tracing::error!(error = %e, "accept failed; pausing accepts");
                }
                let at = ctx.now + ACCEPT_BACKOFF;
                ctx.timers.arm(at, LoopTimer::ResumeAccept(key));
                return;
            }
        }
    }
}

fn conn_ready<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId, event: &mio::event::Event) {
    if ctx
        .conn(id)
        .is_some_and(|c| c.state == ConnState::Connecting)
    {
        if !(event.is_writable() || event.is_error() || event.is_write_closed()) {
            return;
        }
        let secured = ctx.config.noise.is_some();
        let Some(conn) = ctx.conn_mut(id) else { return };
        let outcome = match conn.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => conn.stream.peer_addr().map(|_| ()),
        };
        match outcome {
            Ok(()) if secured => ctx.start_securing(id),
            Ok(()) => {
                conn.state = ConnState::Open;
                ctx.mark_dirty(id.key);
                app.on_connected(ctx, id);
                process_closes(ctx, app);
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => {
                ctx.abort(id, CloseReason::ConnectFailed(e.to_string()));
                return;
            }
        }
    }
    if event.is_readable() || event.is_read_closed() || event.is_error() {
        read_ready(ctx, app, id);
    }
    if event.is_writable() {
        ctx.mark_dirty(id.key);
    }
}

fn read_ready<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId) {
    let mut budget = READ_BUDGET;
    loop {
        let conn = match ctx.entries.get_mut(id.key) {
            Some(Entry::Conn(c)) if c.id == id => c,
            _ => return,
        };
        let draining = match conn.state {
            ConnState::Open | ConnState::Securing => false,
            ConnState::Draining | ConnState::Closing => true,
            ConnState::Connecting => return,
        };
        let read = conn.stream.read(&mut ctx.scratch);
        match read {
            Ok(0) => {
                let partial = conn.secure.as_ref().map_or(0, SecureChannel::buffered);
                if draining {
                    ctx.kill(id.key);
                } else if partial > 0 {
                    ctx.abort(id, CloseReason::Secure(SecureError::Truncated(partial)));
                } else {
                    // The other side may only have shut its writing half:
                    // what we queued for it still goes out.
                    ctx.closes
                        .push_back((id, CloseReason::Eof, CloseMode::Graceful));
                }
                return;
            }
            Ok(n) => {
                ctx.stats.bytes_in += n as u64;
                if !draining {
                    let was_securing = conn.state == ConnState::Securing;
                    let input = &ctx.scratch[..n];
                    let secured = match conn.secure.as_mut() {
                        None => {
                            conn.decoder.push(input);
                            Ok(false)
                        }
                        Some(channel) => {
                            let mut replies = Vec::new();
                            let decoder = &mut conn.decoder;
                            let result = channel.receive(
                                input,
                                &mut ctx.open_scratch,
                                &mut replies,
                                &mut |plain| decoder.push(plain),
                            );
                            if !replies.is_empty() {
                                conn.enqueue_wire(Bytes::from(replies));
                                ctx.mark_dirty(id.key);
                            }
                            result
                        }
                    };
                    let deliver = match secured {
                        // Still securing: nothing to deliver yet; read on.
                        Ok(false) => !was_securing,
                        Ok(true) => {
                            if !announce_secured(ctx, app, id) {
                                return;
                            }
                            true
                        }
                        // Whatever came before the bad message in this
                        // read was authentic: the app gets it first (a
                        // `leave` then garbage is still a leave).
                        Err(_) if !was_securing && !deliver_frames(ctx, app, id) => return,
                        Err(SecureError::TooLarge { len, max }) => {
                            // A frame over the limit, seen from its Noise
                            // message: closed as bad framing, so the app
                            // can still say why.
                            let overhead = secure::TAG_LEN + crate::wire::PREFIX_LEN;
                            let error = FrameError::TooLarge {
                                len: len.saturating_sub(overhead),
                                max: max.saturating_sub(overhead),
                            };
                            ctx.closes.push_back((
                                id,
                                CloseReason::Frame(error),
                                CloseMode::Graceful,
                            ));
                            return;
                        }
                        Err(e) => {
                            ctx.stats.secure_failed += 1;
                            ctx.abort(id, CloseReason::Secure(e));
                            return;
                        }
                    };
                    if deliver && !deliver_frames(ctx, app, id) {
                        return;
                    }
                }
                budget = budget.saturating_sub(n);
                if budget == 0 {
                    ctx.read_again.push(id);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if draining {
                    ctx.kill(id.key);
                } else {
                    ctx.abort(id, CloseReason::Io(e.to_string()));
                }
                return;
            }
        }
    }
}

/// The handshake is done: the connection is open, and the app hears of it.
/// False if it closed it on the spot.
fn announce_secured<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId) -> bool {
    let Some(conn) = ctx.conn_mut(id) else {
        return false;
    };
    conn.state = ConnState::Open;
    let (dialed, addr) = (conn.announced, conn.peer_addr);
    conn.announced = true;
    // Frames the app sent before the handshake was done were refused, but
    // handshake replies may still wait.
    ctx.mark_dirty(id.key);
    if dialed {
        app.on_connected(ctx, id);
    } else {
        app.on_accept(ctx, id, addr);
    }
    process_closes(ctx, app);
    ctx.conn(id).is_some_and(|c| c.state == ConnState::Open)
}

/// Hands every complete frame to the app. False once the connection is no
/// longer open for reading.
fn deliver_frames<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId) -> bool {
    loop {
        let Some(conn) = ctx.conn_mut(id).filter(|c| c.state == ConnState::Open) else {
            return false;
        };
        match conn.decoder.next_frame() {
            Ok(Some(body)) => {
                ctx.stats.frames_in += 1;
                app.on_frame(ctx, id, body);
                process_closes(ctx, app);
            }
            Ok(None) => return true,
            Err(e) => {
                ctx.closes
                    .push_back((id, CloseReason::Frame(e), CloseMode::Graceful));
                return false;
            }
        }
    }
}
