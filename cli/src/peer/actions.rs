//! What the rooms ask for, in order, and when: the output queue, the
//! timers, the records and what waits for them to be written, and the one
//! random stream.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use peerchat_core::machine::{LinkId, Output};

use super::{unix_ms, Action, Code, Event, HostOutput, Reason, Record, Timer};

/// An armed timer, to cancel it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TimerKey {
    pub(super) at: Instant,
    /// Arming order: timers due at the same instant fire in it.
    pub(super) seq: u64,
}

/// The outputs the rooms ask for, in the order they ask, and the timers
/// they arm: the one queue [`Peer::poll_output`] hands out, and the one
/// clock [`Peer::poll_timeout`] reads.
///
/// Timers are an ordered map, not core's `TimerWheel`: the peer has only a
/// few at a time, and the wheel rounds deadlines up to its tick, while the
/// peer's (retries from 50 ms, register and send deadlines) must fire
/// exactly when due.
pub(super) struct Actions {
    pub(super) queue: VecDeque<Action>,
    pub(super) timers: BTreeMap<TimerKey, Timer>,
    pub(super) timer_seq: u64,
    /// The number of the next link we dial: minted here, for every room.
    pub(super) next_dial: u64,
    /// Whether records are kept (see [`Config::persistent`]).
    pub(super) persistent: bool,
    /// The wall clock at an instant: records carry the time, and the
    /// machine reads no clock.
    pub(super) clock: (Instant, SystemTime),
    /// The instant of the input being handled.
    pub(super) now: Instant,
    /// Something was recorded this turn.
    pub(super) recorded: bool,
    /// The number the batch being made will have.
    pub(super) batch: u64,
    /// The highest batch the host said is written.
    pub(super) durable: u64,
    /// What must not happen before a batch is written, in order, each with
    /// the batch it waits for.
    pub(super) held: VecDeque<(u64, Held)>,
    /// Items ever taken off the front of `held`: a position in it plus
    /// this is where an item stays while it waits.
    held_taken: u64,
    /// Where this turn's item of each [`Latest`] waits in `held`, by that
    /// count.
    turn_latest: HashMap<Latest, u64>,
    /// The registry, whose relay carries links that cannot go direct.
    registry: SocketAddr,
    /// Whether we may ask a peer we cannot dial to dial us back (4.8).
    pub(super) reversal: Reversal,
}

/// Whether, and where, we may ask a peer to dial us back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reversal {
    /// Not registered, or the registry does not probe, or it found that
    /// others cannot dial us.
    Off,
    /// The registry probes, and has not said yet whether others can dial us.
    Pending,
    /// Others can dial us: ask on this registry session.
    Via(LinkId),
}

/// What waits for the store: no peer may see a message or an
/// acknowledgement that a crash could take back (the host holds events
/// back likewise, see [`HostOutput::Show`]).
pub(super) enum Held {
    Output(Action),
    /// `ack` on the link, for this id and every chat before it.
    Ack(LinkId, u64),
    /// The messages up to this id are recorded: they may go out.
    Release(u64),
}

/// Held items of which a turn needs only its latest, since it covers the
/// ones before it: a turn's chats on one link are acknowledged by one
/// `ack`, a turn's messages released by one [`Held::Release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Latest {
    Ack(LinkId),
    Release,
}

impl Actions {
    /// `now` and `wall` are the same moment on both clocks.
    /// `registry` relays links that cannot go direct.
    pub(super) fn new(
        persistent: bool,
        now: Instant,
        wall: SystemTime,
        registry: SocketAddr,
    ) -> Self {
        Actions {
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            next_dial: 0,
            persistent,
            clock: (now, wall),
            now,
            recorded: false,
            batch: 1,
            durable: 0,
            held: VecDeque::new(),
            held_taken: 0,
            turn_latest: HashMap::new(),
            registry,
            reversal: Reversal::Off,
        }
    }

    /// Where to dial for a relayed link.
    pub(super) fn relay_via(&self) -> SocketAddr {
        self.registry
    }

    /// Relays go through the registry we are registered with.
    pub(super) fn set_relay_via(&mut self, registry: SocketAddr) {
        self.registry = registry;
    }

    pub(super) fn push(&mut self, action: Action) {
        self.queue.push_back(action);
    }

    pub(super) fn emit(&mut self, event: Event) {
        self.push(Output::Host(HostOutput::Show(event)));
    }

    pub(super) fn host(&mut self, output: HostOutput) {
        self.push(Output::Host(output));
    }

    pub(super) fn error(&mut self, code: impl Into<Code>, message: String) {
        self.emit(Event::Error {
            code: code.into().as_str().into(),
            message,
        });
    }

    /// The wall-clock time of the input being handled, in Unix
    /// milliseconds.
    pub(super) fn wall_ms(&self) -> u64 {
        let (at, wall) = self.clock;
        unix_ms(wall + self.now.saturating_duration_since(at))
    }

    /// Acknowledges chat `id` on `link` once what was recorded so far is
    /// written. A link's chats come in order, and an `ack` covers the
    /// chats before it (PROTOCOL.md 5.2).
    pub(super) fn ack_recorded(&mut self, link: LinkId, id: u64) {
        self.hold_latest(Latest::Ack(link), Held::Ack(link, id));
    }

    /// Holds `held` in the place of this turn's item of `latest`, if one
    /// still waits.
    pub(super) fn hold_latest(&mut self, latest: Latest, held: Held) {
        let waiting = self
            .turn_latest
            .get(&latest)
            .and_then(|at| at.checked_sub(self.held_taken))
            .and_then(|at| self.held.get_mut(usize::try_from(at).ok()?));
        match waiting {
            Some((_, item)) => *item = held,
            // The first of the turn, or the one before has gone out
            // already (a batch written in the middle of the turn).
            None => {
                let at = self.held_taken + self.held.len() as u64;
                self.turn_latest.insert(latest, at);
                self.hold(held);
            }
        }
    }

    pub(super) fn hold(&mut self, held: Held) {
        self.held.push_back((self.batch, held));
    }

    /// Whether records are kept: a room need not build one otherwise.
    pub(super) fn keeps_records(&self) -> bool {
        self.persistent
    }

    /// Records before the event it is about: see [`HostOutput::Show`].
    pub(super) fn record(&mut self, record: Record) {
        if self.persistent {
            self.recorded = true;
            self.host(HostOutput::Record(record));
        }
    }

    /// Ends the turn's batch, if anything was recorded. What was held this
    /// turn with nothing recorded waits on nothing new.
    pub(super) fn seal(&mut self) {
        self.turn_latest.clear();
        if !self.persistent {
            self.durable = self.batch;
        } else if !std::mem::take(&mut self.recorded) {
            let current = self.batch;
            for (waits_for, _) in self.held.iter_mut().rev() {
                if *waits_for != current {
                    break;
                }
                *waits_for = current - 1;
            }
        } else {
            self.host(HostOutput::Batch(self.batch));
            self.batch += 1;
        }
    }

    /// The first held item whose batch is written.
    pub(super) fn ready(&mut self) -> Option<Held> {
        match self.held.front() {
            Some((waits_for, _)) if *waits_for <= self.durable => {
                self.held_taken += 1;
                self.held.pop_front().map(|(_, held)| held)
            }
            _ => None,
        }
    }

    pub(super) fn undelivered(&mut self, id: u64, to: String, reason: &Reason) {
        self.emit(Event::Undelivered {
            id,
            to,
            reason: reason.to_string(),
        });
    }

    pub(super) fn send(&mut self, link: LinkId, frame: Bytes) {
        self.push(Output::Send(link, frame));
    }

    pub(super) fn close(&mut self, link: LinkId, reason: impl Into<String>) {
        self.push(Output::Close(link, reason.into()));
    }

    /// Asks for a connection to `addr`, under a link id of our own, so that
    /// the link has its state before any socket exists.
    pub(super) fn dial(&mut self, addr: SocketAddr) -> LinkId {
        let link = LinkId::Dialed(self.next_dial);
        self.next_dial += 1;
        self.push(Output::Dial { link, addr });
        link
    }

    pub(super) fn arm(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.timer_seq += 1;
        let key = TimerKey {
            at,
            seq: self.timer_seq,
        };
        self.timers.insert(key, timer);
        key
    }

    /// Cancels a timer, if one is given; one that fired already is gone.
    pub(super) fn cancel(&mut self, key: Option<TimerKey>) {
        if let Some(key) = key {
            self.timers.remove(&key);
        }
    }

    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.timers.first_key_value().map(|(key, _)| key.at)
    }

    /// The first timer due by `now`, taken off.
    pub(super) fn due(&mut self, now: Instant) -> Option<Timer> {
        match self.timers.first_entry() {
            Some(entry) if entry.key().at <= now => Some(entry.remove()),
            _ => None,
        }
    }
}

/// The one random stream behind the instance id and every jitter, so that
/// a seed replays a run exactly.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// xorshift64: plenty for spreading retries, and needs no crate.
    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Half to all of `base`, so that peers that lost the registry (or a
    /// link) together do not come back together.
    pub(super) fn jitter(&mut self, base: Duration) -> Duration {
        let fraction = (self.next() % 1001) as f64 / 1000.0;
        base.mul_f64(0.5 + fraction / 2.0)
    }
}
