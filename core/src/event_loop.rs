//! The one event loop: a single thread that owns the mio `Poll`, the slab of
//! connections, the waker, the signal source and the timer wheel.
//!
//! Every turn does the same steps: compute the timeout from the next timer,
//! poll, dispatch readiness (accept and read until `WouldBlock`), fire due
//! timers, let the application finish the turn, then write every connection
//! that has something queued. Applications plug in through [`App`]: they get
//! frames, timers and closes, and act through [`Ctx`]; they never see a socket.
//!
//! Connection ids carry a generation, and slab slots are freed only at the
//! end of a turn, so neither a late event nor a stale id can reach a
//! connection that reused a slot.
//!
//! Given a [`NoiseConfig`], the loop secures every connection with a Noise
//! session ([`crate::secure`]) before the application hears of it: an
//! accepted connection reaches [`App::on_accept`], a dialed one
//! [`App::on_connected`], only once the handshake is done, and
//! [`Ctx::remote_key`] then names the key the other side proved. Frames are
//! plaintext to the application and sealed per connection when written.
//!
//! Each connection's Noise session, framing and queues live in its
//! [`crate::transport::Transport`]; the loop only moves bytes, readiness
//! and time. Connection states are documented at [`crate::conn`].

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

pub use crate::conn::ConnId;
use crate::conn::ConnState;
use crate::secure::{self, NoiseConfig, SecureError};
use crate::timer::TimerWheel;
use crate::transport::{Role, TransportError};
use crate::wire::{FrameError, DEFAULT_MAX_FRAME};

mod ctx;

pub use ctx::Ctx;
use ctx::{CloseMode, Entry, Listener, LoopTimer};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Slab key `k` is registered as `Token(k + FIRST_ENTRY)`.
pub(crate) const FIRST_ENTRY: usize = 2;

/// Bytes read from one connection per turn before the others get a go.
const READ_BUDGET: usize = 1024 * 1024;
/// Size of the loop's one read buffer, shared by every connection.
const READ_BUF: usize = 64 * 1024;
/// How long a listener rests after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Listen backlog: a thousand peers connecting at once must not lose SYNs.
const LISTEN_BACKLOG: i32 = 4096;

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
    /// Largest frame body a new connection accepts, until the application
    /// sets its own ([`Ctx::set_max_frame`]). The connection's transport
    /// holds the limit from then on, for its frames and its Noise messages.
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
    /// Time spent working, from each poll's return to the next poll: how
    /// busy the loop (one thread) is.
    pub busy: Duration,
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
    /// A connection watched with [`Ctx::watch_drain`] has nothing queued.
    fn on_drained(&mut self, _ctx: &mut Ctx<Self::Timer>, _conn: ConnId) {}
    /// The loop's [`Waker`] was woken (by another thread).
    fn on_wake(&mut self, _ctx: &mut Ctx<Self::Timer>) {}
    /// Everything of this turn has been dispatched; queued output is flushed
    /// right after. The place to send what was batched during the turn.
    fn on_turn_end(&mut self, _ctx: &mut Ctx<Self::Timer>) {}
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
            poll_registry: poll.registry().try_clone()?,
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
            drained: Vec::new(),
            turn_again: false,
            stop_at: None,
            stats: LoopStats::default(),
            read_buf: vec![0; READ_BUF].into_boxed_slice(),
            open_scratch: if config_secured {
                secure::scratch()
            } else {
                Box::default()
            },
            seal_buf: Vec::new(),
            waker,
            last_refusal_log: None,
            turn_started: now,
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
            let timeout = if ctx.read_again.is_empty()
                && ctx.dirty.is_empty()
                && ctx.drained.is_empty()
                && !again
            {
                let wake = [ctx.timers.next_wake(), ctx.stop_at]
                    .into_iter()
                    .flatten()
                    .min();
                wake.map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            ctx.stats.busy += ctx.turn_started.elapsed();
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            ctx.now = Instant::now();
            ctx.turn_started = ctx.now;

            for id in std::mem::take(&mut ctx.drained) {
                if ctx.conn(id).is_some_and(|c| c.state == ConnState::Open) {
                    app.on_drained(ctx, id);
                    process_closes(ctx, app);
                }
            }
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
                ctx.write_dirty();
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
        LoopTimer::SecureTimeout(id) => {
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
                let app_knows = conn.app_knows();
                ctx.kill(id.key);
                if app_knows {
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
                match ctx.insert_conn(stream, addr, Role::Acceptor) {
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
        let Some(conn) = ctx.conn_mut(id) else { return };
        let outcome = match conn.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => conn.stream.peer_addr().map(|_| ()),
        };
        match outcome {
            Ok(()) => {
                ctx.connected(id);
                if ctx.conn(id).is_some_and(|c| c.state == ConnState::Open) {
                    app.on_connected(ctx, id);
                    process_closes(ctx, app);
                }
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
        let Some((conn, read_buf, _)) = ctx.conn_with_buffers(id) else {
            return;
        };
        let draining = match conn.state {
            ConnState::Open if conn.reads_paused => return,
            ConnState::Open | ConnState::Securing => false,
            ConnState::Draining | ConnState::Closing => true,
            ConnState::Connecting => return,
        };
        match conn.stream.read(read_buf) {
            Ok(0) => {
                if draining {
                    ctx.kill(id.key);
                } else if let Err(e) = conn.transport.end_of_input() {
                    ctx.abort(id, CloseReason::Secure(e));
                } else {
                    // The other side may only have shut its writing half:
                    // what we queued for it still goes out.
                    ctx.close_gracefully(id, CloseReason::Eof);
                }
                return;
            }
            Ok(n) => {
                ctx.stats.bytes_in += n as u64;
                if !draining && !take_input(ctx, app, id, n) {
                    return;
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

/// Feeds `n` bytes just read to the connection's transport and hands the
/// app what they complete, one Noise message at a time: what the app does
/// with a message's frames (a registry raises the frame limit once a peer
/// registers) applies to the next message of the same read. False once
/// the connection is no longer open for reading.
fn take_input<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId, n: usize) -> bool {
    let mut taken = 0;
    while taken < n {
        let Some((conn, read_buf, open_scratch)) = ctx.conn_with_buffers(id) else {
            return false;
        };
        let was_open = conn.state == ConnState::Open;
        let received = conn.transport.receive(&read_buf[taken..n], open_scratch);
        if conn.transport.queued() > 0 {
            // Handshake replies wait.
            ctx.mark_dirty(id.key);
        }
        let still_open = match received {
            Ok(step) => {
                taken += step.consumed;
                if step.completed {
                    announce_secured(ctx, app, id) && deliver_frames(ctx, app, id)
                } else if was_open {
                    deliver_frames(ctx, app, id)
                } else {
                    // Still securing: nothing to deliver yet; read on.
                    true
                }
            }
            Err(e) => {
                ctx.stats.secure_failed += 1;
                ctx.abort(id, CloseReason::Secure(e));
                false
            }
        };
        if !still_open {
            return false;
        }
    }
    true
}

/// The handshake is done: the connection is open, and the app hears of it.
/// False if it closed it on the spot.
fn announce_secured<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId) -> bool {
    let Some(conn) = ctx.conn_mut(id) else {
        return false;
    };
    conn.state = ConnState::Open;
    let (role, addr) = (conn.role, conn.peer_addr);
    match role {
        Role::Dialer => app.on_connected(ctx, id),
        Role::Acceptor => app.on_accept(ctx, id, addr),
    }
    process_closes(ctx, app);
    ctx.conn(id).is_some_and(|c| c.state == ConnState::Open)
}

/// Hands every complete frame to the app, then the error that ended the
/// stream, if one did. False once the connection is no longer open for
/// reading.
fn deliver_frames<A: App>(ctx: &mut Ctx<A::Timer>, app: &mut A, id: ConnId) -> bool {
    loop {
        let Some(conn) = ctx.conn_mut(id).filter(|c| c.state == ConnState::Open) else {
            return false;
        };
        match conn.transport.next_frame() {
            Ok(Some(body)) => {
                ctx.stats.frames_in += 1;
                app.on_frame(ctx, id, body);
                process_closes(ctx, app);
            }
            Ok(None) => return true,
            // Bad framing: the session still works, so the app can say why.
            Err(TransportError::Frame(e)) => {
                ctx.close_gracefully(id, CloseReason::Frame(e));
                return false;
            }
            Err(TransportError::Secure(e)) => {
                ctx.stats.secure_failed += 1;
                ctx.abort(id, CloseReason::Secure(e));
                return false;
            }
        }
    }
}
