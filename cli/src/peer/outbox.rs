//! The outbox: our links to other peers, and every message waiting on them
//! until its target acknowledges it or it is given up.
//!
//! Separate because it keeps the promise the user relies on, exactly one
//! `delivered` or `undelivered` per target of every `sent`, and owns all
//! that can break it: dialing and redialing with backoff, resending what
//! is unacknowledged over a new link, keeping messages for targets who are
//! away until they return (or the time to live runs out), and what is left
//! when the peer exits. Dials and the state of our links live here alone.
//!
//! With a store, every message is recorded before it goes out: it waits
//! for its record to be written (its [`Held::Release`](super::Held)), and
//! a queue holds messages in id order, so the released ones are always its
//! front, and the next one released is the first of the others. Outcomes
//! are recorded in the turn they are reported in.

use std::collections::{vec_deque, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{self, fold_name, ErrorCode, LinkMsg};
use peerchat_core::wire::{DEFAULT_MAX_FRAME, PREFIX_LEN};

use super::dialing::{Dialing, Path, Route, Targets};
use super::directory::Directory;
use super::{
    Actions, ByName, Code, Config, Event, Held, Latest, OutboxLimits, Party, Reason, Record, Rng,
    Timer, TimerKey, Waiting,
};
use crate::journal;

/// A chat as the user typed it, before it has an id.
pub(super) struct Draft {
    pub(super) text: String,
    pub(super) direct: bool,
    /// The wall-clock time it was typed (Unix milliseconds).
    pub(super) sent_at: u64,
}

/// Whom a message is for: the name (folded) and the key it must reach,
/// and whether the directory lists it now (with a key other than the one
/// pinned for it: `mismatch`).
pub(super) struct Target {
    pub(super) folded: String,
    pub(super) party: Party,
    pub(super) listed: bool,
    pub(super) mismatch: bool,
}

impl Target {
    pub(super) fn as_to(&self) -> To<'_> {
        To {
            folded: &self.folded,
            key: self.party.key,
            name: &self.party.name,
            listed: self.listed,
            mismatch: self.mismatch,
        }
    }
}

/// A [`Target`] borrowed, from it or from the directory: a message to
/// everyone copies no name it need not keep.
pub(super) struct To<'a> {
    pub(super) folded: &'a str,
    pub(super) key: PublicKey,
    pub(super) name: &'a str,
    pub(super) listed: bool,
    pub(super) mismatch: bool,
}

impl To<'_> {
    fn party(&self) -> Party {
        Party {
            key: self.key,
            name: self.name.to_string(),
        }
    }
}

struct Outgoing {
    id: u64,
    frame: Bytes,
    /// Bytes of text, counted against the limits.
    text_len: usize,
    sent_at: u64,
    /// Given up as `expired` if not acknowledged by then.
    deadline: Instant,
}

pub(super) struct OutLink {
    /// The key the queued messages are for, and the name they were sent to.
    party: Party,
    /// Our link to the target, and its redials.
    dialing: Dialing,
    /// In id order.
    queue: VecDeque<Outgoing>,
    /// The first this many of the queue have their record written: they
    /// may be sent.
    released: usize,
    /// Listed in [`Outbox::unreleased`].
    awaits_release: bool,
    /// Text bytes in the queue.
    bytes: usize,
    /// The deadline of the front of the queue.
    deadline: Option<TimerKey>,
}

impl AsRef<Dialing> for OutLink {
    fn as_ref(&self) -> &Dialing {
        &self.dialing
    }
}

impl AsMut<Dialing> for OutLink {
    fn as_mut(&mut self) -> &mut Dialing {
        &mut self.dialing
    }
}

impl OutLink {
    fn new(party: Party) -> Self {
        OutLink {
            party,
            dialing: Dialing::default(),
            queue: VecDeque::new(),
            released: 0,
            awaits_release: false,
            bytes: 0,
            deadline: None,
        }
    }

    /// Cancels the link's timers: it is done with.
    fn disarm(&mut self, actions: &mut Actions) {
        self.dialing.stop(actions);
        actions.cancel(self.deadline.take());
    }

    /// Dials the target if messages wait for it, it is listed and nothing
    /// is under way: returns the link dialed.
    fn ensure_dialed(
        &mut self,
        folded: &str,
        dir: &Directory,
        actions: &mut Actions,
    ) -> Option<LinkId> {
        if self.queue.is_empty() || self.dialing.under_way() {
            return None;
        }
        let known = dir.get(folded).filter(|k| !k.mismatch)?;
        let route = Route {
            name: &known.name,
            addr: known.addr,
            unreachable: known.reachable == Some(false),
        };
        let timer = Timer::LinkRetry(folded.to_string());
        self.dialing.dial(&route, timer, actions)
    }

    fn pop_front(&mut self) -> Option<Outgoing> {
        let out = self.queue.pop_front()?;
        self.released = self.released.saturating_sub(1);
        self.bytes -= out.text_len;
        Some(out)
    }

    /// Arms the deadline of the front of the queue, if none is armed.
    fn arm_deadline(&mut self, folded: &str, actions: &mut Actions) {
        if self.deadline.is_none() {
            if let Some(at) = self.queue.front().map(|o| o.deadline) {
                self.deadline = Some(actions.arm(at, Timer::SendDeadline(folded.to_string())));
            }
        }
    }
}

pub(super) struct Outbox {
    /// By target (folded name).
    links: ByName<OutLink>,
    /// Every link we dialed, to whom, until it closes or we let it go.
    conns: HashMap<LinkId, String>,
    /// Per message: how many targets have no outcome yet.
    open: HashMap<u64, usize>,
    /// Targets (folded) with messages whose record is not written yet.
    unreleased: Vec<String>,
    /// Messages and text bytes in all queues.
    total: usize,
    total_bytes: usize,
    next_id: u64,
    limits: OutboxLimits,
    backoff_min: Duration,
    backoff_max: Duration,
    ttl: Duration,
}

impl Outbox {
    /// The outbox as the store left it: `saved` messages wait for their
    /// targets; their deadlines count from when they were sent (`wall`
    /// is now, in Unix milliseconds). Nothing is armed before
    /// [`Outbox::start`].
    pub(super) fn new(
        config: &Config,
        saved: Vec<journal::Outgoing>,
        next_id: u64,
        now: Instant,
        wall: u64,
    ) -> Self {
        let mut outbox = Outbox {
            links: ByName::default(),
            conns: HashMap::new(),
            open: HashMap::new(),
            unreleased: Vec::new(),
            total: 0,
            total_bytes: 0,
            next_id: next_id.max(1),
            limits: config.outbox_limits,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            ttl: config.outbox_ttl,
        };
        for message in saved {
            let frame = chat_frame(
                message.id,
                message.text.clone(),
                message.direct,
                message.sent_at,
            );
            let age = Duration::from_millis(wall.saturating_sub(message.sent_at));
            let deadline = now + outbox.ttl.saturating_sub(age);
            outbox.open.insert(message.id, message.targets.len());
            outbox.next_id = outbox.next_id.max(message.id + 1);
            for party in message.targets {
                let folded = fold_name(&party.name);
                let to = To {
                    folded: &folded,
                    key: party.key,
                    name: &party.name,
                    listed: false,
                    mismatch: false,
                };
                let link = outbox.enqueue(
                    &to,
                    Outgoing {
                        id: message.id,
                        frame: frame.clone(),
                        text_len: message.text.len(),
                        sent_at: message.sent_at,
                        deadline,
                    },
                );
                link.released += 1;
            }
        }
        outbox
    }

    /// Arms the deadlines of what the store left: the first expire at once
    /// if their time ran out while the peer was not running.
    pub(super) fn start(&mut self, actions: &mut Actions) {
        for (folded, link) in &mut self.links {
            link.arm_deadline(folded, actions);
        }
    }

    /// Messages waiting for a target, in all.
    pub(super) fn waiting(&self) -> usize {
        self.total
    }

    /// Queues `out` for `to`, whose link it returns.
    fn enqueue(&mut self, to: &To, out: Outgoing) -> &mut OutLink {
        self.total += 1;
        self.total_bytes += out.text_len;
        if !self.links.contains_key(to.folded) {
            self.links
                .insert(to.folded.to_string(), OutLink::new(to.party()));
        }
        let link = self.links.get_mut(to.folded).expect("inserted above");
        link.bytes += out.text_len;
        debug_assert!(link.queue.back().is_none_or(|last| last.id < out.id));
        link.queue.push_back(out);
        link
    }

    /// The target of our link `conn` and how it is dialed.
    pub(super) fn dialing_of(&mut self, conn: LinkId) -> Option<(String, &mut Dialing)> {
        let target = self.conns.get(&conn)?;
        let link = self.links.get_mut(target)?;
        Some((target.clone(), &mut link.dialing))
    }

    /// How our chat link to `folded` goes, while there is one.
    pub(super) fn path_to(&self, folded: &str) -> Option<Path> {
        self.links.get(folded)?.dialing.path()
    }

    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Nothing waits for an acknowledgement from a peer online: what waits
    /// for peers away is kept, not waited for.
    pub(super) fn is_settled(&self, dir: &Directory) -> bool {
        self.links
            .iter()
            .all(|(folded, l)| l.queue.is_empty() || !dir.contains(folded))
    }

    /// Why a message of `text_len` bytes cannot be queued for `targets`, if
    /// it cannot.
    fn over_limits(&self, targets: &[To], text_len: usize) -> Option<String> {
        let limits = &self.limits;
        if self.total + targets.len() > limits.total
            || self.total_bytes + targets.len() * text_len > limits.total_bytes
        {
            return Some(format!(
                "the outbox holds {} messages ({} bytes) waiting; at most {} ({} bytes) fit; wait for deliveries or /outbox to see what waits",
                self.total, self.total_bytes, limits.total, limits.total_bytes
            ));
        }
        targets.iter().find_map(|t| {
            let link = self.links.get(t.folded)?;
            let full = link.queue.len() + 1 > limits.per_target
                || link.bytes + text_len > limits.per_target_bytes;
            full.then(|| {
                format!(
                    "{} messages ({} bytes) already wait for {}; at most {} ({} bytes) fit",
                    link.queue.len(),
                    link.bytes,
                    t.name,
                    limits.per_target,
                    limits.per_target_bytes
                )
            })
        })
    }

    /// Gives the chat the next id, records it, and sends it to each of
    /// `targets` once the record is written (at once if their link is up,
    /// else when it is). Returns the id, or `None` if it was refused.
    pub(super) fn send(
        &mut self,
        targets: Vec<To>,
        draft: Draft,
        now: Instant,
        dir: &Directory,
        actions: &mut Actions,
    ) -> Option<u64> {
        let id = self.next_id;
        let text_len = draft.text.len();
        let frame = chat_frame(id, draft.text.clone(), draft.direct, draft.sent_at);
        let body_len = frame.len() - PREFIX_LEN;
        if body_len > DEFAULT_MAX_FRAME {
            actions.error(
                Code::TooLong,
                format!("the message is {body_len} bytes encoded; at most {DEFAULT_MAX_FRAME} fit in a frame"),
            );
            return None;
        }
        if let Some(why) = self.over_limits(&targets, text_len) {
            actions.error(Code::OutboxFull, why);
            return None;
        }
        self.next_id += 1;
        if actions.keeps_records() {
            actions.record(Record::Sent(journal::Outgoing {
                id,
                text: draft.text,
                direct: draft.direct,
                sent_at: draft.sent_at,
                targets: targets.iter().map(To::party).collect(),
            }));
        }
        let to = targets.iter().map(|t| t.name.to_string()).collect();
        actions.emit(Event::Sent { id, to });
        let mut open = 0;
        for to in targets {
            let folded = to.folded;
            let refused = to.mismatch || dir.pinned(folded).is_some_and(|k| k != to.key);
            if refused {
                let reason = Reason::Code(ErrorCode::KeyMismatch);
                self.record_failure(id, to.key, &reason, actions);
                actions.undelivered(id, to.name.to_string(), &reason);
                continue;
            }
            if self
                .links
                .get(folded)
                .is_some_and(|l| l.party.key != to.key)
            {
                // What still waits was for a key the name no longer has.
                self.fail_queued(folded, &Reason::KeyChanged, actions);
                if let Some(link) = self.links.get_mut(folded) {
                    link.party = to.party();
                }
            }
            let deadline = now + self.ttl;
            let link = self.enqueue(
                &to,
                Outgoing {
                    id,
                    frame: frame.clone(),
                    text_len,
                    sent_at: draft.sent_at,
                    deadline,
                },
            );
            link.arm_deadline(folded, actions);
            let dialed = link.ensure_dialed(folded, dir, actions);
            let first_unreleased = !std::mem::replace(&mut link.awaits_release, true);
            if let Some(conn) = dialed {
                self.conns.insert(conn, folded.to_string());
            }
            if !to.listed {
                actions.emit(Event::Queued {
                    id,
                    to: to.name.to_string(),
                    reason: Reason::Offline.to_string(),
                });
            }
            open += 1;
            if first_unreleased {
                self.unreleased.push(folded.to_string());
            }
        }
        if open == 0 {
            actions.record(Record::Settled { id });
        } else {
            self.open.insert(id, open);
            actions.hold_latest(Latest::Release, Held::Release(id));
        }
        Some(id)
    }

    /// The records of the messages up to `through` are written: they go
    /// out on the links that are up, and on the others once they are.
    pub(super) fn release(&mut self, through: u64, actions: &mut Actions) {
        let mut last_run = None;
        for folded in std::mem::take(&mut self.unreleased) {
            let Some(link) = self.links.get_mut(&folded) else {
                continue;
            };
            let first = link.released;
            while link
                .queue
                .get(link.released)
                .is_some_and(|o| o.id <= through)
            {
                link.released += 1;
            }
            if let Some(conn) = link.dialing.up().filter(|_| link.released > first) {
                let run = link.queue.range(first..link.released);
                actions.send(conn, joined(run, &mut last_run));
            }
            link.awaits_release = link.released < link.queue.len();
            if link.awaits_release {
                self.unreleased.push(folded);
            }
        }
    }

    /// Dials `folded` if messages wait for it and nothing is under way.
    pub(super) fn ensure_link(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if let Some(conn) = link.ensure_dialed(folded, dir, actions) {
            self.conns.insert(conn, folded.to_string());
        }
    }

    /// Our links, for what the registry says of reversals and probes.
    pub(super) fn targets(&mut self) -> Targets<'_, OutLink> {
        Targets {
            links: &mut self.links,
            conns: &mut self.conns,
        }
    }

    /// `folded` can be dialed now: a relayed link to it (or a wait for it
    /// to dial us back) gives way to a direct one (what it has not
    /// acknowledged goes again, and its ids keep it from being shown
    /// twice).
    pub(super) fn go_direct(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        if self
            .links
            .get(folded)
            .is_some_and(|l| l.dialing.is_indirect())
        {
            self.redial(folded, dir, actions);
        }
    }

    /// The directory lists `folded` under `key`: what waits for that key
    /// goes (a link is dialed); what waits for another key never will.
    pub(super) fn on_listed(
        &mut self,
        folded: &str,
        key: PublicKey,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Some(link) = self.links.get(folded) else {
            return;
        };
        if !link.queue.is_empty() && link.party.key != key {
            actions.error(
                Code::KeyChanged,
                format!(
                    "{} is back with another key, {key}; the messages waiting for the old one are not sent",
                    link.party.name
                ),
            );
            self.fail_queued(folded, &Reason::KeyChanged, actions);
        }
        self.ensure_link(folded, dir, actions);
    }

    /// Our link is up and proved `key`: if that is the key the directory
    /// lists, say `hello` and send what waits, in order.
    // The hello comes from the session, the key check from the directory.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_connected(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        hello: &LinkMsg,
        now: Instant,
        dir: &mut Directory,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(target) = self.conns.get(&conn).cloned() else {
            return;
        };
        let Some(known) = dir.get(&target) else {
            self.drop_conn(conn, &target);
            actions.close(conn, "no longer listed");
            return;
        };
        let queued_for = self.links.get(&target).map(|l| l.party.key);
        if known.key != key || known.mismatch || queued_for.is_some_and(|k| k != key) {
            // Whoever is at that address now is not the peer the directory
            // lists (or not the one we pinned): never hand it the chats.
            let message = if known.mismatch {
                format!(
                    "{}'s listed key is not the one pinned in known_peers; link refused",
                    known.name
                )
            } else {
                format!(
                    "{} at {} proved key {key}, not the key {} the registry lists; link refused",
                    known.name, known.addr, known.key
                )
            };
            tracing::warn!("{message}");
            self.drop_conn(conn, &target);
            actions.close(conn, message);
            self.schedule_redial(&target, now, rng, actions);
            return;
        }
        dir.pin(&target, key, actions);
        actions.send(conn, protocol::frame(hello));
        if let Some(link) = self.links.get_mut(&target) {
            link.dialing.set_up();
            if link.released > 0 {
                let waiting = link.queue.range(..link.released);
                actions.send(conn, joined(waiting, &mut None));
            }
        }
    }

    /// Forgets `conn`, which we close, as the link to `target`.
    fn drop_conn(&mut self, conn: LinkId, target: &str) {
        self.conns.remove(&conn);
        if let Some(link) = self.links.get_mut(target) {
            link.dialing.lost(conn);
        }
    }

    pub(super) fn on_frame(&mut self, conn: LinkId, body: &[u8], actions: &mut Actions) {
        let Some(target) = self.conns.get(&conn).cloned() else {
            return;
        };
        match codec::decode::<LinkMsg>(body) {
            Ok(LinkMsg::Ack { id }) => self.on_ack(&target, id, actions),
            Ok(LinkMsg::Error { code, reason }) => {
                tracing::warn!(peer = %target, %code, %reason, "the peer refused our link");
            }
            Ok(other) => {
                tracing::warn!(peer = %target, ?other, "unexpected message on our link; closing it");
                actions.close(conn, "unexpected message");
            }
            Err(e) => {
                tracing::warn!(peer = %target, error = %e, "undecodable frame on our link; closing it");
                actions.close(conn, format!("undecodable frame: {e}"));
            }
        }
    }

    /// A link delivers in order, so an ack covers every message sent before
    /// it on the link: the queue's front, up to `id`. Only released
    /// messages were sent; an ack for anything else covers nothing.
    fn on_ack(&mut self, target: &str, id: u64, actions: &mut Actions) {
        let Some(link) = self.links.get_mut(target) else {
            return;
        };
        let mut delivered = Vec::new();
        while link.released > 0 && link.queue.front().is_some_and(|o| o.id <= id) {
            delivered.extend(link.pop_front());
        }
        let Some(last) = delivered.last().map(|o| o.id) else {
            return; // A second ack for a resent message.
        };
        // The deadline armed, that of a message now delivered, stays while
        // others wait: when it fires, it is armed again for the next in
        // line (see `on_deadline`), which saves a timer per ack.
        if link.queue.is_empty() {
            actions.cancel(link.deadline.take());
        }
        link.dialing.progressed();
        let party = link.party.clone();
        actions.record(Record::Acked {
            target: party.key,
            through: last,
        });
        for out in delivered {
            self.total -= 1;
            self.total_bytes -= out.text_len;
            actions.emit(Event::Delivered {
                id: out.id,
                to: party.name.clone(),
            });
            self.settle_one(out.id, actions);
        }
    }

    /// One more target of message `id` has its outcome.
    fn settle_one(&mut self, id: u64, actions: &mut Actions) {
        if let Some(open) = self.open.get_mut(&id) {
            *open -= 1;
            if *open == 0 {
                self.open.remove(&id);
                actions.record(Record::Settled { id });
            }
        }
    }

    fn record_failure(&self, id: u64, target: PublicKey, reason: &Reason, actions: &mut Actions) {
        actions.record(Record::Failed {
            id,
            target,
            reason: reason.to_string(),
            at: actions.wall_ms(),
        });
    }

    pub(super) fn on_closed(
        &mut self,
        conn: LinkId,
        reason: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(target) = self.conns.remove(&conn) else {
            return;
        };
        tracing::debug!(%target, %reason, "link closed");
        if let Some(link) = self.links.get_mut(&target) {
            if link.dialing.lost(conn) && !link.queue.is_empty() {
                self.schedule_redial(&target, now, rng, actions);
            }
        }
    }

    fn schedule_redial(
        &mut self,
        folded: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if link.queue.is_empty() {
            return;
        }
        let timer = Timer::LinkRetry(folded.to_string());
        let backoff = (self.backoff_min, self.backoff_max);
        link.dialing.retry_later(backoff, timer, now, rng, actions);
    }

    pub(super) fn on_retry(&mut self, target: &str, dir: &Directory, actions: &mut Actions) {
        if let Some(link) = self.links.get_mut(target) {
            link.dialing.retried();
        }
        self.ensure_link(target, dir, actions);
    }

    /// The front of the queue is due: what is overdue by now expired, and
    /// the timer is armed again for the next in line.
    pub(super) fn on_deadline(&mut self, target: &str, now: Instant, actions: &mut Actions) {
        let Some(link) = self.links.get_mut(target) else {
            return;
        };
        link.deadline = None;
        let mut overdue = Vec::new();
        while link.queue.front().is_some_and(|o| o.deadline <= now) {
            overdue.extend(link.pop_front());
        }
        link.arm_deadline(target, actions);
        let party = link.party.clone();
        for out in overdue {
            tracing::info!(id = out.id, to = %party.name, "no acknowledgement within the outbox's time to live");
            self.drop_failed(out, &party, &Reason::Expired, actions);
        }
    }

    /// Reports a message taken off a queue as undelivered to `party`.
    fn drop_failed(
        &mut self,
        out: Outgoing,
        party: &Party,
        reason: &Reason,
        actions: &mut Actions,
    ) {
        self.total -= 1;
        self.total_bytes -= out.text_len;
        self.record_failure(out.id, party.key, reason, actions);
        actions.undelivered(out.id, party.name.clone(), reason);
        self.settle_one(out.id, actions);
    }

    /// Reports every message waiting for `folded` as undelivered.
    pub(super) fn fail_queued(&mut self, folded: &str, reason: &Reason, actions: &mut Actions) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        let queue = std::mem::take(&mut link.queue);
        link.released = 0;
        link.bytes = 0;
        actions.cancel(link.deadline.take());
        let party = link.party.clone();
        for out in queue {
            self.drop_failed(out, &party, reason, actions);
        }
    }

    /// The directory has `folded` at another address or key: the link we
    /// have goes, and a new one is dialed if anything waits.
    pub(super) fn redial(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        if let Some(link) = self.links.get_mut(folded) {
            if let Some(conn) = link.dialing.close(actions) {
                self.conns.remove(&conn);
                actions.close(conn, "the peer moved");
            }
        }
        self.ensure_link(folded, dir, actions);
    }

    /// `folded` is away (it left for `reason`): our link to it closes, and
    /// what waits for it is kept until it is back.
    pub(super) fn away(&mut self, folded: &str, reason: &Reason, actions: &mut Actions) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if let Some(conn) = link.dialing.stop(actions) {
            self.conns.remove(&conn);
            actions.close(conn, format!("{} left", link.party.name));
        }
        for out in &link.queue {
            actions.emit(Event::Queued {
                id: out.id,
                to: link.party.name.clone(),
                reason: reason.to_string(),
            });
        }
    }

    /// What waits, target by target in name order, at most `limit` entries.
    pub(super) fn list(&self, dir: &Directory, limit: usize) -> Vec<Waiting> {
        let mut links: Vec<(&String, &OutLink)> = self.links.iter().collect();
        links.sort_by(|a, b| a.0.cmp(b.0));
        links
            .into_iter()
            .flat_map(|(folded, link)| {
                let online = link.dialing.up().is_some() && dir.contains(folded);
                link.queue.iter().map(move |out| Waiting {
                    id: out.id,
                    to: link.party.name.clone(),
                    text: chat_text(&out.frame),
                    sent_at: out.sent_at,
                    online,
                })
            })
            .take(limit)
            .collect()
    }

    /// The peer exits. With a store, what is unacknowledged is kept for
    /// the next run: said (`queued`, reason `exit`) for the targets online;
    /// those away were told of already. Without one, it is undelivered for
    /// `reason`. By target in name order.
    pub(super) fn exit(&mut self, reason: &Reason, dir: &Directory, actions: &mut Actions) {
        let mut links: Vec<(String, OutLink)> = self.links.drain().collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        for (folded, mut link) in links {
            link.disarm(actions);
            let online = dir.contains(&folded);
            for out in link.queue {
                if !actions.keeps_records() {
                    actions.undelivered(out.id, link.party.name.clone(), reason);
                } else if online {
                    actions.emit(Event::Queued {
                        id: out.id,
                        to: link.party.name.clone(),
                        reason: Reason::Exit.to_string(),
                    });
                }
            }
        }
    }
}

/// The frames of `run` in one buffer, for one write to the link: the
/// buffer made for the `last` run if that run had the same messages, as
/// every link has for a turn's messages to everyone.
fn joined(run: vec_deque::Iter<Outgoing>, last: &mut Option<(Vec<u64>, Bytes)>) -> Bytes {
    if let (1, Some(only)) = (run.len(), run.clone().next()) {
        return only.frame.clone();
    }
    if let Some((ids, frames)) = last {
        if ids.iter().eq(run.clone().map(|o| &o.id)) {
            return frames.clone();
        }
    }
    let mut frames = BytesMut::with_capacity(run.clone().map(|o| o.frame.len()).sum());
    for out in run.clone() {
        frames.extend_from_slice(&out.frame);
    }
    let frames = frames.freeze();
    *last = Some((run.map(|o| o.id).collect(), frames.clone()));
    frames
}

fn chat_frame(id: u64, text: String, direct: bool, sent_at: u64) -> Bytes {
    protocol::frame(&LinkMsg::Chat {
        id,
        text,
        direct,
        sent_at: Some(sent_at),
    })
}

/// The text of a chat frame we made.
fn chat_text(frame: &Bytes) -> String {
    match codec::decode::<LinkMsg>(&frame[PREFIX_LEN..]) {
        Ok(LinkMsg::Chat { text, .. }) => text,
        _ => String::new(),
    }
}
