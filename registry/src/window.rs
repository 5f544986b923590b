//! How long a busy registry's update window is: the time it takes to
//! sweep its sessions with the changes they have not seen (`push.rs`), so
//! that one update frame per session carries many of them (see
//! [`Registry::set_load`]).
//!
//! Each sweep costs a write to every session, and one frame carries all a
//! session missed since its last, so a busy registry spreads a sweep over
//! a window, but only while that bundles several changes: changes that
//! come one at a time (a client that waits for each to arrive before the
//! next) gain nothing from a window and would only wait. So a busy
//! registry with no window tries one sized to bundle a few changes at
//! their recent rate; while a sweep carries two or more changes (those
//! made since the last one began) it doubles the window, up to
//! `max_update_delay`; when not, it drops the window and tries again only
//! after a backoff that doubles. An idle registry halves the window, to
//! none.
//!
//! Changes are counted, not the loop turns that made them: a saturated
//! loop makes many changes in each of its long turns, and sweeping every
//! turn then costs a write per session per turn, which keeps it
//! saturated. Reachability news (4.7) is not counted: it follows each
//! join, so a client joining one at a time would look like two changes.
//!
//! The load is judged over at least one window, so that a report that
//! falls on a quiet stretch of it does not swing the window.

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
/// A first window is sized to bundle about this many changes.
const PROBE_BUNDLE: f64 = 4.0;
/// Load reports to wait, after a window that bundled nothing, before
/// trying one again: at first, and at most (it doubles with each window
/// that fails in a row).
const PROBE_BACKOFF: u32 = 8;
const PROBE_BACKOFF_MAX: u32 = 128;
/// Pushes in a row that each carry one change or none: the window is
/// dropped at once, without waiting for the next load report.
const LONE_PUSHES: u32 = 3;

#[derive(Debug)]
pub(crate) struct Window {
    /// How long a sweep takes now: zero when the registry is not busy.
    pub(crate) delay: Duration,
    /// Changes made and pushes (sweeps begun) since the start, and the
    /// changes pushes carried (those made up to the last push,
    /// `changes_at_push`): all three when the load was last judged.
    changes: u64,
    pushes: u64,
    mark: (u64, u64, u64),
    /// Load reported since it was last judged: busy time and time.
    busy_for: Duration,
    reported_for: Duration,
    /// Pushes in a row, under a window, that carried one change or none;
    /// and the changes counted at the last push.
    lone_pushes: u32,
    changes_at_push: u64,
    /// Load reports left before a window is tried again, and how many to
    /// wait after the next failed one.
    backoff: u32,
    next_backoff: u32,
}

impl Window {
    pub(crate) fn new() -> Window {
        Window {
            delay: Duration::ZERO,
            changes: 0,
            pushes: 0,
            mark: (0, 0, 0),
            busy_for: Duration::ZERO,
            reported_for: Duration::ZERO,
            lone_pushes: 0,
            changes_at_push: 0,
            backoff: 0,
            next_backoff: PROBE_BACKOFF,
        }
    }

    /// A change was made.
    pub(crate) fn changed(&mut self) {
        self.changes += 1;
    }

    /// A sweep began, carrying the changes made since the last began.
    pub(crate) fn pushed(&mut self) {
        self.pushes += 1;
        let changes = self.changes - std::mem::replace(&mut self.changes_at_push, self.changes);
        if self.delay.is_zero() || changes > 1 {
            self.lone_pushes = 0;
        } else {
            self.lone_pushes += 1;
            if self.lone_pushes >= LONE_PUSHES {
                self.drop();
            }
        }
    }

    fn set_load(&mut self, busy: f64, elapsed: Duration, max: Duration) {
        self.busy_for += elapsed.mul_f64(busy.max(0.0));
        self.reported_for += elapsed;
        if self.reported_for < self.delay {
            return;
        }
        let elapsed = std::mem::take(&mut self.reported_for);
        let busy =
            std::mem::take(&mut self.busy_for).as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
        let changes = self.changes - self.mark.0;
        let pushes = self.pushes - self.mark.1;
        let carried = self.changes_at_push - self.mark.2;
        self.mark = (self.changes, self.pushes, self.changes_at_push);
        self.backoff = self.backoff.saturating_sub(1);
        // Whatever the load: a window whose pushes carry one change each
        // only delays it.
        if !self.delay.is_zero() && pushes > 0 && carried < 2 * pushes {
            self.drop();
            return;
        }
        if busy > LOAD_HIGH {
            if self.delay.is_zero() {
                let rate = changes as f64 / elapsed.as_secs_f64().max(1e-3);
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
    /// `elapsed` since the last call: the update window follows it (see
    /// the module documentation).
    pub fn set_load(&mut self, busy: f64, elapsed: Duration) {
        let max = self.config.max_update_delay;
        self.window.set_load(busy, elapsed, max);
    }

    /// The update window now: how long a sweep of the sessions takes (see
    /// `push.rs`), and so the longest a change takes to reach everyone.
    pub fn update_delay(&self) -> Duration {
        self.window.delay
    }
}
