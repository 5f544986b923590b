//! The outbox: our links to other peers, and every message waiting on them
//! until its target acknowledges it or it is given up.
//!
//! Separate because it keeps the promise the user relies on, exactly one
//! `delivered` or `undelivered` per target of every `sent`, and owns all
//! that can break it: dialing and redialing with backoff, resending what
//! is unacknowledged over a new link, send deadlines, and what is left
//! when the peer exits. Dials and the state of our links live here alone.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{self, ErrorCode, LinkMsg};
use peerchat_core::wire::{DEFAULT_MAX_FRAME, PREFIX_LEN};

use super::directory::Directory;
use super::{Actions, Code, Config, Event, Reason, Rng, Timer, TimerKey};

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

#[derive(Default)]
struct OutLink {
    /// Our link to the target, from the dial on.
    conn: Option<LinkId>,
    /// The link proved the listed key and said hello: chats go on it.
    up: bool,
    backoff: Duration,
    /// The redial, while we back off.
    retry: Option<TimerKey>,
    queue: VecDeque<Outgoing>,
    /// The deadline of the front of the queue.
    deadline: Option<TimerKey>,
}

impl OutLink {
    /// Cancels the link's timers: it is done with.
    fn disarm(&mut self, actions: &mut Actions) {
        actions.cancel(self.retry.take());
        actions.cancel(self.deadline.take());
    }
}

pub(super) struct Outbox {
    /// By target (folded name).
    links: HashMap<String, OutLink>,
    /// Every link we dialed, to whom, until it closes or we let it go.
    conns: HashMap<LinkId, String>,
    next_id: u64,
    backoff_min: Duration,
    backoff_max: Duration,
    send_timeout: Duration,
}

impl Outbox {
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

    pub(super) fn has(&self, conn: LinkId) -> bool {
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
        actions: &mut Actions,
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
            let arm = link.deadline.is_none();
            match link.conn {
                Some(conn) if link.up => actions.send(conn, frame.clone()),
                // Sent with the rest of the queue once the link is up.
                Some(_) => {}
                None => self.ensure_link(&target, dir, actions),
            }
            if arm {
                let key = actions.arm(deadline, Timer::SendDeadline(target.clone()));
                if let Some(link) = self.links.get_mut(&target) {
                    link.deadline = Some(key);
                }
            }
        }
    }

    /// Dials `folded` if messages wait for it and nothing is under way.
    fn ensure_link(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        let Some(addr) = dir.get(folded).filter(|k| !k.mismatch).map(|k| k.addr) else {
            return;
        };
        let link = self.links.entry(folded.to_string()).or_default();
        if link.conn.is_none() && link.retry.is_none() && !link.queue.is_empty() {
            let conn = actions.dial(addr);
            link.conn = Some(conn);
            self.conns.insert(conn, folded.to_string());
        }
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
        if let Some(link) = self.links.get_mut(&target) {
            link.up = true;
            for out in &link.queue {
                actions.send(conn, out.frame.clone());
            }
        }
    }

    /// Forgets `conn`, which we close, as the link to `target`.
    fn drop_conn(&mut self, conn: LinkId, target: &str) {
        self.conns.remove(&conn);
        if let Some(link) = self.links.get_mut(target) {
            link.conn = None;
            link.up = false;
        }
    }

    pub(super) fn on_frame(
        &mut self,
        conn: LinkId,
        body: &[u8],
        dir: &Directory,
        actions: &mut Actions,
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
                if pos == 0 {
                    // The deadline was the acknowledged message's.
                    actions.cancel(link.deadline.take());
                    if let Some(next) = link.queue.front().map(|o| o.deadline) {
                        let timer = Timer::SendDeadline(target.clone());
                        link.deadline = Some(actions.arm(next, timer));
                    }
                }
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
            if link.conn == Some(conn) {
                link.conn = None;
                link.up = false;
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
        actions: &mut Actions,
    ) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        if link.retry.is_some() || link.queue.is_empty() {
            return;
        }
        let base = link.backoff.max(self.backoff_min);
        link.backoff = (base * 2).min(self.backoff_max);
        let delay = rng.jitter(base);
        link.retry = Some(actions.arm(now + delay, Timer::LinkRetry(folded.to_string())));
    }

    pub(super) fn on_retry(&mut self, target: &str, dir: &Directory, actions: &mut Actions) {
        if let Some(link) = self.links.get_mut(target) {
            link.retry = None;
        }
        self.ensure_link(target, dir, actions);
    }

    /// The front of the queue is due: what is overdue by now is
    /// undelivered, and the timer is armed again for the next in line.
    pub(super) fn on_deadline(
        &mut self,
        target: &str,
        now: Instant,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Some(link) = self.links.get_mut(target) else {
            return;
        };
        link.deadline = None;
        let mut overdue = Vec::new();
        while link.queue.front().is_some_and(|o| o.deadline <= now) {
            overdue.extend(link.queue.pop_front().map(|o| o.id));
        }
        if let Some(next) = link.queue.front().map(|o| o.deadline) {
            let timer = Timer::SendDeadline(target.to_string());
            link.deadline = Some(actions.arm(next, timer));
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
        actions: &mut Actions,
    ) {
        let Some(link) = self.links.get_mut(folded) else {
            return;
        };
        let queue = std::mem::take(&mut link.queue);
        actions.cancel(link.deadline.take());
        let to = dir.display_name(folded);
        for out in queue {
            actions.undelivered(out.id, to.clone(), reason);
        }
    }

    /// The directory has `folded` at another address or key: the link we
    /// have goes, and a new one is dialed if anything waits.
    pub(super) fn redial(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        if let Some(link) = self.links.get_mut(folded) {
            link.up = false;
            if let Some(conn) = link.conn.take() {
                self.conns.remove(&conn);
                actions.close(conn, "the peer moved");
            }
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
        actions: &mut Actions,
    ) {
        let Some(mut link) = self.links.remove(folded) else {
            return;
        };
        link.disarm(actions);
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
    pub(super) fn give_up(&mut self, reason: &Reason, dir: &Directory, actions: &mut Actions) {
        let mut links: Vec<(String, OutLink)> = self.links.drain().collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        for (folded, mut link) in links {
            link.disarm(actions);
            let to = dir.display_name(&folded);
            for out in link.queue {
                actions.undelivered(out.id, to.clone(), reason);
            }
        }
    }
}
