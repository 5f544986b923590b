//! A hashed timer wheel: O(1) arm and cancel, deadlines in ticks, and the
//! current time always passed in (it never reads the clock).
//!
//! Deadlines are rounded *up* to a tick, so a timer never fires early; it
//! fires at most one tick late. A deadline further away than one rotation
//! waits in its slot for the rotations to pass. Cancelled entries are freed
//! at once and their slot references skipped lazily through a generation.

use std::time::{Duration, Instant};

use slab::Slab;

/// Handle to an armed timer, for [`TimerWheel::cancel`]. Stale handles (the
/// timer fired or was cancelled) are harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId {
    key: usize,
    generation: u64,
}

#[derive(Debug)]
struct Entry<T> {
    deadline_tick: u64,
    generation: u64,
    payload: T,
}

#[derive(Debug)]
pub struct TimerWheel<T> {
    origin: Instant,
    tick: Duration,
    slots: Vec<Vec<TimerId>>,
    entries: Slab<Entry<T>>,
    /// Every tick up to and including this one has been expired.
    expired_through: u64,
    next_generation: u64,
}

impl<T> TimerWheel<T> {
    /// `slots` is rounded up to a power of two.
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> Self {
        assert!(!tick.is_zero(), "a timer wheel needs a non-zero tick");
        let slots = slots.max(1).next_power_of_two();
        TimerWheel {
            origin,
            tick,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            entries: Slab::new(),
            expired_through: 0,
            next_generation: 0,
        }
    }

    pub fn tick(&self) -> Duration {
        self.tick
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tick a deadline falls in, rounded up.
    fn tick_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let tick = self.tick.as_nanos();
        u64::try_from(nanos.div_ceil(tick)).unwrap_or(u64::MAX)
    }

    /// The last tick that has fully passed at `now`.
    fn ticks_passed(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / self.tick.as_nanos()).unwrap_or(u64::MAX)
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick & (self.slots.len() as u64 - 1)) as usize
    }

    /// Arms a timer that fires at the first tick at or after `at`. A
    /// deadline already past fires at the next expiry.
    pub fn arm(&mut self, at: Instant, payload: T) -> TimerId {
        let deadline_tick = self.tick_of(at).max(self.expired_through + 1);
        let generation = self.next_generation;
        self.next_generation += 1;
        let key = self.entries.insert(Entry {
            deadline_tick,
            generation,
            payload,
        });
        let id = TimerId { key, generation };
        let slot = self.slot_of(deadline_tick);
        self.slots[slot].push(id);
        id
    }

    /// Cancels a timer; returns its payload if it was still armed.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        match self.entries.get(id.key) {
            Some(e) if e.generation == id.generation => Some(self.entries.remove(id.key).payload),
            _ => None,
        }
    }

    /// When the loop should wake next: the start of the first tick with a
    /// slot that holds anything. It may be early (the slot's timers can be
    /// rotations away, or cancelled), never late.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            return None;
        }
        let first = self.expired_through + 1;
        let ahead = (0..self.slots.len() as u64)
            .find(|k| !self.slots[self.slot_of(first + k)].is_empty())?;
        let tick = first + ahead;
        let nanos = u64::try_from(self.tick.as_nanos()).unwrap_or(u64::MAX);
        Some(self.origin + Duration::from_nanos(nanos.saturating_mul(tick)))
    }

    /// Moves time to `now` and hands every due timer to `fire`, in deadline
    /// order within the passed ticks.
    pub fn expire(&mut self, now: Instant, mut fire: impl FnMut(T)) {
        let target = self.ticks_passed(now);
        if target <= self.expired_through {
            return;
        }
        // After a gap of a full rotation or more, every slot is visited once.
        let span = (target - self.expired_through).min(self.slots.len() as u64);
        let first = target - span + 1;
        let mut due: Vec<(u64, TimerId)> = Vec::new();
        for tick in first..=target {
            let slot = self.slot_of(tick);
            let entries = &self.entries;
            self.slots[slot].retain(|id| match entries.get(id.key) {
                Some(e) if e.generation == id.generation => {
                    if e.deadline_tick <= target {
                        due.push((e.deadline_tick, *id));
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            });
        }
        due.sort_unstable_by_key(|(tick, id)| (*tick, id.generation));
        for (_, id) in due {
            if let Some(payload) = self.cancel(id) {
                fire(payload);
            }
        }
        self.expired_through = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    fn wheel(slots: usize) -> (TimerWheel<u32>, Instant) {
        let t0 = Instant::now();
        (TimerWheel::new(t0, TICK, slots), t0)
    }

    fn fired(w: &mut TimerWheel<u32>, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        w.expire(now, |p| out.push(p));
        out
    }

    #[test]
    fn fires_in_deadline_order_never_early() {
        let (mut w, t0) = wheel(64);
        w.arm(t0 + Duration::from_millis(35), 3);
        w.arm(t0 + Duration::from_millis(15), 1);
        w.arm(t0 + Duration::from_millis(20), 2);
        assert_eq!(
            fired(&mut w, t0 + Duration::from_millis(14)),
            Vec::<u32>::new()
        );
        assert_eq!(
            fired(&mut w, t0 + Duration::from_millis(19)),
            Vec::<u32>::new(),
            "15ms rounds up to 20"
        );
        assert_eq!(fired(&mut w, t0 + Duration::from_millis(40)), vec![1, 2, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_and_rearm() {
        let (mut w, t0) = wheel(8);
        let a = w.arm(t0 + Duration::from_millis(30), 1);
        let b = w.arm(t0 + Duration::from_millis(30), 2);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None, "second cancel is a no-op");
        w.arm(t0 + Duration::from_millis(50), 1);
        assert_eq!(fired(&mut w, t0 + Duration::from_millis(30)), vec![2]);
        assert_eq!(w.cancel(b), None, "fired timers cannot be cancelled");
        assert_eq!(fired(&mut w, t0 + Duration::from_millis(60)), vec![1]);
    }

    #[test]
    fn stale_handle_does_not_cancel_a_reused_slot() {
        let (mut w, t0) = wheel(8);
        let a = w.arm(t0 + TICK, 1);
        assert_eq!(fired(&mut w, t0 + TICK), vec![1]);
        let _b = w.arm(t0 + TICK * 3, 2); // likely reuses a's slab key
        assert_eq!(w.cancel(a), None);
        assert_eq!(fired(&mut w, t0 + TICK * 3), vec![2]);
    }

    #[test]
    fn far_deadlines_wait_for_their_rotation() {
        let (mut w, t0) = wheel(8); // one rotation = 80ms
        w.arm(t0 + Duration::from_millis(250), 9);
        w.arm(t0 + Duration::from_millis(20), 1);
        let mut now = t0;
        let mut log = Vec::new();
        for _ in 0..30 {
            now += TICK;
            for p in fired(&mut w, now) {
                log.push((p, now.duration_since(t0).as_millis()));
            }
        }
        assert_eq!(log, vec![(1, 20), (9, 250)]);
    }

    #[test]
    fn a_long_gap_fires_everything_once() {
        let (mut w, t0) = wheel(8);
        for i in 0..20u32 {
            w.arm(t0 + TICK * (i * 7 + 1), i);
        }
        let got = fired(&mut w, t0 + Duration::from_secs(10));
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_at_next_expiry() {
        let (mut w, t0) = wheel(8);
        assert_eq!(fired(&mut w, t0 + TICK * 5), Vec::<u32>::new());
        w.arm(t0, 1);
        assert_eq!(fired(&mut w, t0 + TICK * 6), vec![1]);
    }

    #[test]
    fn next_wake_is_never_late() {
        let (mut w, t0) = wheel(16);
        assert_eq!(w.next_wake(), None);
        w.arm(t0 + Duration::from_millis(45), 1);
        assert_eq!(w.next_wake(), Some(t0 + Duration::from_millis(50)));
        // A deadline rotations away shows up no later than its slot.
        let (mut w, t0) = wheel(4);
        w.arm(t0 + Duration::from_millis(1000), 1);
        let wake = w.next_wake().unwrap();
        assert!(wake <= t0 + Duration::from_millis(1000));
    }

    #[test]
    fn rearming_into_the_slot_just_fired() {
        let (mut w, t0) = wheel(8);
        w.arm(t0 + TICK, 1);
        assert_eq!(fired(&mut w, t0 + TICK), vec![1]);
        // Same slot one rotation later, as a heartbeat check re-arms.
        w.arm(t0 + TICK * 9, 2);
        assert_eq!(fired(&mut w, t0 + TICK * 8), Vec::<u32>::new());
        assert_eq!(fired(&mut w, t0 + TICK * 9), vec![2]);
    }
}
