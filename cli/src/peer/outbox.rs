//! The outbox: our links to other peers, and every message waiting on them
//! until its target acknowledges it or it is given up.
//!
//! Separate because it keeps the promise the user relies on, exactly one
//! `delivered` or `undelivered` per target of every `sent`, and owns all
//! that can break it: dialing and redialing with backoff, resending what
//! is unacknowledged over a new link, send deadlines, and what is left
//! when the peer exits. Dials and the state of our links live here alone.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{self, ErrorCode, LinkMsg};
use peerchat_core::wire::{DEFAULT_MAX_FRAME, PREFIX_LEN};

use super::directory::Directory;
use super::{Action, Actions, Code, Config, Dial, Event, Reason, Rng, Timer};

/// A chat as the user typed it, before it has an id.
pub(super) struct Draft {
    pub(super) text: String,
    pub(super) direct: bool,
    /// The wall-clock time it was typed (Unix milliseconds).
    pub(super) sent_at: Option<u64>,
}

struct Outgoing {
    id: u64,
    frame: Bytes,
    /// Undelivered (`no_ack`) if not acknowledged by then.
    deadline: Instant,
}

struct OutLink<C> {
    conn: Option<C>,
    /// A dial was asked for and not answered yet.
    dialing: bool,
    backoff: Duration,
    retry_armed: bool,
    queue: VecDeque<Outgoing>,
    /// When the armed send-deadline timer fires, if one is armed.
    deadline_armed: Option<Instant>,
}

impl<C> Default for OutLink<C> {
    fn default() -> Self {
        OutLink {
            conn: None,
            dialing: false,
            backoff: Duration::ZERO,
            retry_armed: false,
            queue: VecDeque::new(),
            deadline_armed: None,
        }
    }
}

pub(super) struct Outbox<C> {
    /// By target (folded name).
    links: HashMap<String, OutLink<C>>,
    /// Every connection we dialed for a link, to whom, until it closes:
    /// also those a link no longer uses.
    conns: HashMap<C, String>,
    next_id: u64,
    backoff_min: Duration,
    backoff_max: Duration,
    send_timeout: Duration,
}

impl<C: Copy + Eq + Hash + Debug> Outbox<C> {
    pub(super) fn new(config: &Config) -> Self {
        Outbox {
            links: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            send_timeout: config.send_timeout,
        }
    }

    pub(super) fn has(&self, conn: C) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Nothing waits for an acknowledgement.
    pub(super) fn is_settled(&self) -> bool {
        self.links.values().all(|l| l.queue.is_empty())
    }

    /// Gives the chat the next id and sends it to each of `targets`, or
    /// queues it until their link is up.
    pub(super) fn send(
        &mut self,
        targets: Vec<String>,
        draft: Draft,
        now: Instant,
        dir: &Directory,
        actions: &mut Actions<C>,
    ) {
        let id = self.next_id;
        let frame = protocol::frame(&LinkMsg::Chat {
            id,
            text: draft.text,
            direct: draft.direct,
            sent_at: draft.sent_at,
        });
        let body_len = frame.len() - PREFIX_LEN;
        if body_len > DEFAULT_MAX_FRAME {
            actions.error(
                Code::TooLong,
                format!("the message is {body_len} bytes encoded; at most {DEFAULT_MAX_FRAME} fit in a frame"),
            );
            return;
        }
        self.next_id += 1;
        let to = targets.iter().map(|t| dir.display_name(t)).collect();
        actions.emit(Event::Sent { id, to });
        for target in targets {
            if dir.get(&target).is_some_and(|k| k.mismatch) {
                let reason = Reason::Code(ErrorCode::KeyMismatch);
                actions.undelivered(id, dir.display_name(&target), &reason);
                continue;
            }
            let deadline = now + self.send_timeout;
            let link = self.links.entry(target.clone()).or_default();
            link.queue.push_back(Outgoing {
                id,
                frame: frame.clone(),
                deadline,
            });
            let arm = link.deadline_armed.is_none();
            if arm {
                link.deadline_armed = Some(deadline);
            }
            match link.conn {
                Some(conn) => actions.send(conn, frame.clone()),
                None => self.ensure_link(&target, dir, actions),
            }
            if arm {
                let timer = Timer::SendDeadline {
                    target,
                    at: deadline,
                };
                actions.arm(deadline, timer);
            }
        }
    }

    /// Dials `folded` if messages wait for it and nothing is under way.
    fn ensure_link(&mut self, folded: &str, dir: &Directory, actions: &mut Actions<C>) {
        let Some(addr) = dir.get(folded).filter(|k| !k.mismatch).map(|k| k.addr) else {
            return;
        };
        let link = self.links.entry(folded.to_string()).or_default();
        if link.conn.is_none() && !link.dialing && !link.retry_armed && !link.queue.is_empty() {
            link.dialing = true;
            actions.push(Action::Dial(addr, Dial::Link(folded.to_string())));
        }
    }

    pub(super) fn dial_started(&mut self, target: String, conn: C, actions: &mut Actions<C>) {
        let Some(link) = self.links.get_mut(&target).filter(|l| l.conn.is_none()) else {
            actions.close(conn, "no longer needed");
            return;
        };
        link.dialing = false;
        link.conn = Some(conn);
        self.conns.insert(conn, target);
    }

    pub(super) fn dial_failed(
        &mut self,
        target: &str,
        error: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions<C>,
    ) {
        tracing::debug!(%target, %error, "link dial failed");
        if let Some(link) = self.links.get_mut(target) {
            link.dialing = false;
        }
        self.schedule_redial(target, now, rng, actions);
    }

    /// Our link is up and proved `key`: if that is the key the directory
    /// lists, say `hello` and send what waits, in order.
    // The hello comes from the session, the key check from the directory.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_connected(
        &mut self,
        conn: C,
        key: PublicKey,
        hello: &LinkMsg,
        now: Instant,
        dir: &mut Directory,
        rng: &mut Rng,
        actions: &mut Actions<C>,
    ) {
        let Some(target) = self.conns.get(&conn).cloned() else {
            return;
        };
        let Some(known) = dir.get(&target) else {
            self.drop_conn(conn, &target);
            actions.close(conn, "no longer listed");
            return;
        };
        if known.key != key || known.mismatch {
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
        if let Some(link) = self.links.get(&target) {
            for out in &link.queue {
                actions.send(conn, out.frame.clone());
            }
        }
    }

    /// Forgets `conn`, which we close, as the link to `target`.
    fn drop_conn(&mut self, conn: C, target: &str) {
        self.conns.remove(&conn);
        if let Some(link) = self.links.get_mut(target) {
            link.conn = None;
        }
    }

    pub(super) fn on_frame(
        &mut self,
        conn: C,
        body: &[u8],
        dir: &Directory,
        actions: &mut Actions<C>,
    ) {
        let Some(target) = self.conns.get(&conn) else {
            return;
        };
        match codec::decode::<LinkMsg>(body) {
            Ok(LinkMsg::Ack { id }) => {
                let Some(link) = self.links.get_mut(target) else {
                    return;
                };
                let Some(pos) = link.queue.iter().position(|o| o.id == id) else {
                    return; // A second ack for a resent message.
                };
                link.queue.remove(pos);
                link.backoff = self.backoff_min;
                let to = dir.display_name(target);
                actions.emit(Event::Delivered { id, to });
            }
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

    pub(super) fn on_closed(
        &mut self,
        conn: C,
        reason: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions<C>,
    ) {
        let Some(target) = self.conns.remove(&conn) else {
            return;
        };
        tracing::debug!(%target, %reason, "link closed");
        if let Some(link) = self.links.get_mut(&target) {
            if link.conn == Some(conn) {
                link.conn = None;
                if !link.queue.is_empty() {
                    self.schedule_redial(&target, now, rng, actions);
                }
            }
        }
    }

    fn schedule_redial(
        &mut self,
        folded: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions<C>,
    ) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if link.retry_armed || link.queue.is_empty() {
            return;
        }
        link.retry_armed = true;
        let base = link.backoff.max(self.backoff_min);
        link.backoff = (base * 2).min(self.backoff_max);
        let delay = rng.jitter(base);
        actions.arm(now + delay, Timer::LinkRetry(folded.to_string()));
    }

    pub(super) fn on_retry(&mut self, target: &str, dir: &Directory, actions: &mut Actions<C>) {
        if let Some(link) = self.links.get_mut(target) {
            link.retry_armed = false;
        }
        self.ensure_link(target, dir, actions);
    }

    /// The send-deadline timer armed for `at`: what is overdue by now is
    /// undelivered, and the timer is armed again for the next in line.
    pub(super) fn on_deadline(
        &mut self,
        target: &str,
        at: Instant,
        now: Instant,
        dir: &Directory,
        actions: &mut Actions<C>,
    ) {
        let Some(link) = self.links.get_mut(target) else {
            return;
        };
        if link.deadline_armed != Some(at) {
            return; // A timer of an earlier link to the same peer.
        }
        link.deadline_armed = None;
        let mut overdue = Vec::new();
        while link.queue.front().is_some_and(|o| o.deadline <= now) {
            overdue.extend(link.queue.pop_front().map(|o| o.id));
        }
        if let Some(next) = link.queue.front().map(|o| o.deadline) {
            link.deadline_armed = Some(next);
            let timer = Timer::SendDeadline {
                target: target.to_string(),
                at: next,
            };
            actions.arm(next, timer);
        }
        let to = dir.display_name(target);
        for id in overdue {
            tracing::info!(id, %to, "no acknowledgement in time");
            actions.undelivered(id, to.clone(), &Reason::NoAck);
        }
    }

    /// Reports every message waiting for `folded` as undelivered.
    pub(super) fn fail_queued(
        &mut self,
        folded: &str,
        reason: &Reason,
        dir: &Directory,
        actions: &mut Actions<C>,
    ) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        let queue = std::mem::take(&mut link.queue);
        link.deadline_armed = None;
        let to = dir.display_name(folded);
        for out in queue {
            actions.undelivered(out.id, to.clone(), reason);
        }
    }

    /// The directory has `folded` at another address or key: the link we
    /// have goes, and a new one is dialed if anything waits.
    pub(super) fn redial(&mut self, folded: &str, dir: &Directory, actions: &mut Actions<C>) {
        if let Some(conn) = self.links.get_mut(folded).and_then(|l| l.conn.take()) {
            self.conns.remove(&conn);
            actions.close(conn, "the peer moved");
        }
        self.ensure_link(folded, dir, actions);
    }

    /// `folded`, shown as `name`, is gone: what waits for it is undelivered
    /// for `reason`, and our link to it closes.
    pub(super) fn forget(
        &mut self,
        folded: &str,
        name: &str,
        reason: &Reason,
        actions: &mut Actions<C>,
    ) {
        let Some(link) = self.links.remove(folded) else {
            return;
        };
        for out in link.queue {
            actions.undelivered(out.id, name.to_string(), reason);
        }
        if let Some(conn) = link.conn {
            self.conns.remove(&conn);
            actions.close(conn, format!("{name} left"));
        }
    }

    /// The peer exits: everything unacknowledged is undelivered for
    /// `reason`, by target in name order.
    pub(super) fn give_up(&mut self, reason: &Reason, dir: &Directory, actions: &mut Actions<C>) {
        let mut links: Vec<(String, OutLink<C>)> = self.links.drain().collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        for (folded, link) in links {
            let to = dir.display_name(&folded);
            for out in link.queue {
                actions.undelivered(out.id, to.clone(), reason);
            }
        }
    }
}
