//! How changes reach the sessions: every change goes into a log, and each
//! session remembers how far into it it has been sent. A sweep visits the
//! sessions in registration order and writes each one update with every
//! change it has not seen. An idle registry (no window) sweeps everyone at
//! the end of the turn that made a change; a busy one spreads the sweep
//! evenly over its update window (see `window.rs`), so that each session
//! gets at most one update per window.
//!
//! Why spread rather than hold the changes and write them all at the
//! window's end: at 19,000 sessions that write takes the loop a third of a
//! second, and a handshake or a change that comes meanwhile waits for it to
//! end and then for a whole window, and the last sessions of the next
//! write see it after yet another third of a second. Spread, a change
//! reaches every session within about one window of being made, for the
//! same number of writes, and the loop turns between slices take the
//! handshakes and heartbeats as they come.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::protocol::{self, Change, FromRegistry};

use crate::{is_probe_news, Action, LinkState, Listed, Registry, Timer, CHUNK, TIMER_TICK};

/// The changes some session may not have been sent yet.
#[derive(Default)]
pub(crate) struct ChangeLog {
    changes: VecDeque<Logged>,
    /// The position of `changes[0]`, counted from the registry's start.
    first: u64,
    /// Update frames carrying the changes from a position to the end, by
    /// position and by whether probe news is left out. The sessions of one
    /// slice were mostly sent their last update together, so they share
    /// these. Emptied whenever the log changes.
    frames: HashMap<(u64, bool), Vec<Bytes>>,
}

impl ChangeLog {
    /// Where the next change will be: a session sent everything has seen
    /// this far.
    pub(crate) fn end(&self) -> u64 {
        self.first + self.changes.len() as u64
    }

    fn push(&mut self, change: Logged) {
        self.changes.push_back(change);
        self.frames.clear();
    }

    /// Forgets the changes before `position`: every session has seen them.
    fn forget_before(&mut self, position: u64) {
        let gone = position.saturating_sub(self.first) as usize;
        self.changes.drain(..gone.min(self.changes.len()));
        self.first = self.first.max(position);
        self.frames.clear();
    }

    /// The update frames of every change from `position` on; none if there
    /// is nothing to tell.
    fn frames_from(&mut self, position: u64, without_probes: bool) -> &[Bytes] {
        let changes = &self.changes;
        let skip = position.saturating_sub(self.first) as usize;
        self.frames
            .entry((position, without_probes))
            .or_insert_with(|| {
                let changes: Vec<&Bytes> = changes
                    .iter()
                    .skip(skip)
                    .filter(|change| !(without_probes && change.probe_news))
                    .map(|change| &change.encoded)
                    .collect();
                let head = FromRegistry::Update {
                    changes: Vec::new(),
                };
                changes
                    .chunks(CHUNK)
                    .map(|changes| protocol::frame_with_items(&head, changes))
                    .collect()
            })
    }

    fn clear(&mut self) {
        let end = self.end();
        self.forget_before(end);
    }
}

/// A change as updates carry it, encoded once when it is made: under churn
/// every change empties the frame cache, so nearly every slice of a sweep
/// builds its frame again, and copying encoded changes costs a fraction
/// of encoding them anew.
struct Logged {
    encoded: Bytes,
    probe_news: bool,
}

/// A pass over the sessions in progress.
pub(crate) struct Sweep {
    started: Instant,
    /// The log's end when it sent its first session anything: once it is
    /// over, every session has seen at least this far. Changes made
    /// before that reach every session in this sweep.
    floor: Option<u64>,
    /// The registration order of the last entry passed.
    passed: Option<u64>,
    /// Sessions visited so far: the pace is every session per window.
    visited: usize,
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// A change to the directory, for everyone.
    pub(crate) fn announce(&mut self, change: Change) {
        let probe_news = is_probe_news(&change);
        if !probe_news {
            self.window.changed();
        }
        self.log.push(Logged {
            encoded: protocol::item(&change),
            probe_news,
        });
    }

    /// End of a loop turn: sends the sessions whose turn has come what
    /// they have not seen, and starts a sweep if a change is new to
    /// someone. With no window every session's turn comes at once.
    pub fn send_batched(&mut self, now: Instant) {
        self.expire_reservations(now);
        // A sweep that ends with changes made during it is followed at
        // once by the next, for the sessions it passed before them.
        for _ in 0..2 {
            let sweep = match self.sweep.take() {
                Some(sweep) => sweep,
                None if self.log.end() == self.swept => return,
                None => Sweep {
                    started: now,
                    floor: None,
                    passed: None,
                    visited: 0,
                },
            };
            if let Some(unfinished) = self.continue_sweep(sweep, now) {
                self.sweep = Some(unfinished);
                return;
            }
        }
    }

    /// Visits the sessions due by `now`; the sweep back unless it is over.
    fn continue_sweep(&mut self, mut sweep: Sweep, now: Instant) -> Option<Sweep> {
        let delay = self.window.delay;
        // A sweep finishes early once the changes made since its first
        // visit (or, before it, since the last sweep's) fill a frame, so
        // that a session is never sent more than about two frames at once:
        // those it missed of the last sweep, and those of this one. Each
        // sweep then carries a frame's worth, which counts as bundling.
        let full = self.log.end() - sweep.floor.unwrap_or(self.swept) >= CHUNK as u64;
        // Sessions come and go during a sweep (newcomers are visited too,
        // at the end of the order): the pace follows how many there are
        // now, and the sweep ends when its window has passed.
        let sessions = self.names.len();
        let share = if delay.is_zero() {
            1.0
        } else {
            now.saturating_duration_since(sweep.started).as_secs_f64() / delay.as_secs_f64()
        };
        let due = if share >= 1.0 || full {
            usize::MAX
        } else {
            ((sessions as f64 * share).ceil() as usize).saturating_sub(sweep.visited)
        };
        let from = sweep.passed.map_or(0, |order| order + 1);
        let mut visit = Vec::new();
        let mut passed = sweep.passed;
        let mut over = true;
        for (&order, listed) in self.order.range(from..) {
            if let Listed::Local(conn) = listed {
                if visit.len() == due {
                    over = false;
                    break;
                }
                visit.push(*conn);
            }
            passed = Some(order);
        }
        if !visit.is_empty() && sweep.floor.is_none() {
            sweep.floor = Some(self.log.end());
            self.window.pushed();
        }
        sweep.visited += visit.len();
        for conn in visit {
            self.visit(conn);
        }
        if over {
            self.swept = sweep.floor.unwrap_or(self.log.end());
            self.log.forget_before(self.swept);
            self.settle_held_answers();
            return None;
        }
        sweep.passed = passed;
        // Visited by `visited / sessions` of the window: the next one is
        // due just after.
        let done = (sweep.visited as f64 / sessions.max(1) as f64).min(1.0);
        let next = (sweep.started + delay.mul_f64(done)).max(now + TIMER_TICK);
        if self.flush_at.is_none_or(|at| at <= now || at > next) {
            self.timers.arm(next, Timer::Flush);
            self.flush_at = Some(next);
        }
        Some(sweep)
    }

    /// Sends a session every change it has not seen; answers its held
    /// heartbeat with that update, or with a heartbeat if there is none.
    fn visit(&mut self, conn: C) {
        let end = self.log.end();
        let Some(LinkState::Registered(session)) = self.conns.get_mut(&conn) else {
            return;
        };
        let answer_held = std::mem::take(&mut session.answer_held);
        let from = std::mem::replace(&mut session.seen, end);
        // Probe results go only to peers that take part in relays (4.7):
        // the others would get an update that changes nothing for them
        // after every join.
        let without_probes = !session.answers.relay;
        let frames = if from < end {
            self.log.frames_from(from, without_probes)
        } else {
            &[]
        };
        if frames.is_empty() && answer_held {
            self.actions
                .push_back(Action::Send(conn, self.heartbeat_reply.clone()));
        }
        self.actions
            .extend(frames.iter().map(|frame| Action::Send(conn, frame.clone())));
    }

    /// How long a heartbeat's answer may wait for an update (4.5). Under
    /// load every session gets an update per window anyway, and a
    /// heartbeat answered on its own is one more write per peer per
    /// heartbeat. Answered within `heartbeat`, a peer hears from the
    /// registry before its next heartbeat; and within half the margin to
    /// `timeout`, so that a late answer never looks like a lost registry.
    fn answer_allowance(&self) -> Duration {
        let margin = self.config.timeout.saturating_sub(self.config.heartbeat);
        (margin / 2).min(self.config.heartbeat)
    }

    /// A heartbeat is answered now, or by the update its session is due to
    /// get. A session with changes it has not seen is visited in this
    /// sweep or at its place in the next: within a window, or two if the
    /// window doubles meanwhile (it doubles at most once a window). One
    /// answer is held per session: more heartbeats than one per window are
    /// not a peer's, and are answered at once rather than piled up.
    pub(crate) fn on_heartbeat(&mut self, conn: C) {
        let may_wait = self.window.delay * 2 + TIMER_TICK <= self.answer_allowance();
        let (end, sweeping) = (self.log.end(), self.sweep.is_some());
        if let Some(LinkState::Registered(session)) = self.conns.get_mut(&conn) {
            if may_wait && !session.answer_held && (session.seen < end || sweeping) {
                session.answer_held = true;
                self.unanswered.push(conn);
                return;
            }
        }
        self.actions
            .push_back(Action::Send(conn, self.heartbeat_reply.clone()));
    }

    /// A sweep is over. The answers held by sessions it visited before
    /// the changes made during it wait for the next sweep; if there is
    /// none, nothing more is coming, and a heartbeat answers them.
    fn settle_held_answers(&mut self) {
        let next_sweep = self.log.end() > self.swept;
        let mut unanswered = std::mem::take(&mut self.unanswered);
        unanswered.retain(|&conn| {
            let Some(LinkState::Registered(session)) = self.conns.get_mut(&conn) else {
                return false;
            };
            if !session.answer_held {
                return false;
            }
            if next_sweep {
                return true;
            }
            session.answer_held = false;
            self.actions
                .push_back(Action::Send(conn, self.heartbeat_reply.clone()));
            false
        });
        self.unanswered = unanswered;
    }

    /// Nothing is left to send: for shutdown.
    pub(crate) fn forget_changes(&mut self) {
        self.log.clear();
        self.swept = self.log.end();
        self.sweep = None;
        self.flush_at = None;
        self.unanswered.clear();
    }
}
