//! How long a busy registry holds joins and leaves so that one update
//! frame per listener carries many of them (see [`Registry::set_load`]).
//!
//! Each push costs a write to every listener, and one frame carries a whole
//! window's changes, so a busy registry holds them, but only while that
//! bundles the changes of several turns: changes that come one turn at a
//! time (a client that waits for each to arrive before the next) gain
//! nothing from a window and would only wait. So a busy registry with no
//! window tries one sized to bundle a few turns' changes at their recent
//! rate; while a push carries two or more turns' changes it doubles the
//! window, up to `max_update_delay`; when not, it drops the window and
//! tries again only after a backoff that doubles. An idle registry halves
//! the window, to none.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use crate::Registry;

/// Above this share of one core, the update window grows; below
/// [`LOAD_LOW`], it shrinks. In between it stays, so that the window
/// settles instead of swinging.
const LOAD_HIGH: f64 = 0.45;
const LOAD_LOW: f64 = 0.2;
/// The smallest window worth having; below it, changes go out at once.
const MIN_UPDATE_DELAY: Duration = Duration::from_millis(5);
/// A first window is sized to bundle the changes of about this many turns.
const PROBE_BUNDLE: f64 = 4.0;
/// Load reports to wait, after a window that bundled nothing, before
/// trying one again: at first, and at most (it doubles with each window
/// that fails in a row).
const PROBE_BACKOFF: u32 = 8;
const PROBE_BACKOFF_MAX: u32 = 128;
/// Pushes in a row that each carry one turn's changes: the window is
/// dropped at once, without waiting for the next load report.
const LONE_PUSHES: u32 = 3;

#[derive(Debug)]
pub(crate) struct Window {
    /// How long changes are held now: zero when the registry is not busy.
    pub(crate) delay: Duration,
    /// This turn made a change.
    changed: bool,
    /// Turns that made changes, and pushes of changes, since the start;
    /// and both at the last load report.
    turns: u64,
    pushes: u64,
    mark: (u64, u64),
    /// Pushes in a row, under a window, that carried one turn's changes;
    /// and the turns counted at the last push.
    lone_pushes: u32,
    turns_at_push: u64,
    /// Load reports left before a window is tried again, and how many to
    /// wait after the next failed one.
    backoff: u32,
    next_backoff: u32,
}

impl Window {
    pub(crate) fn new() -> Window {
        Window {
            delay: Duration::ZERO,
            changed: false,
            turns: 0,
            pushes: 0,
            mark: (0, 0),
            lone_pushes: 0,
            turns_at_push: 0,
            backoff: 0,
            next_backoff: PROBE_BACKOFF,
        }
    }

    /// A change was made this turn.
    pub(crate) fn changed(&mut self) {
        self.changed = true;
    }

    /// The turn ends.
    pub(crate) fn end_turn(&mut self) {
        if std::mem::take(&mut self.changed) {
            self.turns += 1;
        }
    }

    /// The held changes went out.
    pub(crate) fn pushed(&mut self) {
        self.pushes += 1;
        let turns = self.turns - std::mem::replace(&mut self.turns_at_push, self.turns);
        if self.delay.is_zero() || turns > 1 {
            self.lone_pushes = 0;
        } else {
            self.lone_pushes += 1;
            if self.lone_pushes >= LONE_PUSHES {
                self.drop();
            }
        }
    }

    fn set_load(&mut self, busy: f64, elapsed: Duration, max: Duration) {
        let turns = self.turns - self.mark.0;
        let pushes = self.pushes - self.mark.1;
        self.mark = (self.turns, self.pushes);
        self.backoff = self.backoff.saturating_sub(1);
        // Whatever the load: a window whose pushes carry one turn's changes
        // each only delays them.
        if !self.delay.is_zero() && pushes > 0 && turns < 2 * pushes {
            self.drop();
            return;
        }
        if busy > LOAD_HIGH {
            if self.delay.is_zero() {
                let rate = turns as f64 / elapsed.as_secs_f64().max(1e-3);
                if self.backoff == 0 && rate > 0.0 {
                    let bundle = Duration::from_secs_f64(PROBE_BUNDLE / rate);
                    self.delay = bundle.max(MIN_UPDATE_DELAY).min(max);
                }
            } else if pushes > 0 {
                self.delay = (self.delay * 2).min(max);
                self.next_backoff = PROBE_BACKOFF;
            }
        } else if busy < LOAD_LOW {
            self.delay /= 2;
            if self.delay < MIN_UPDATE_DELAY {
                self.delay = Duration::ZERO;
            }
        }
    }

    /// A window that does not bundle changes goes, and the next try waits
    /// longer than the last.
    fn drop(&mut self) {
        self.delay = Duration::ZERO;
        self.lone_pushes = 0;
        self.backoff = self.next_backoff;
        self.next_backoff = (self.next_backoff * 2).min(PROBE_BACKOFF_MAX);
    }
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    /// How busy the loop was (the share of one core it used) over the
    /// `elapsed` since the last call: the window changes are held for
    /// follows it (see the module documentation).
    pub fn set_load(&mut self, busy: f64, elapsed: Duration) {
        let max = self.config.max_update_delay;
        self.window.set_load(busy, elapsed, max);
    }

    /// How long changes are held now.
    pub fn update_delay(&self) -> Duration {
        self.window.delay
    }
}
