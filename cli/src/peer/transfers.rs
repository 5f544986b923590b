//! Transfers: the files we offer to peers and the files they offer us.
//!
//! Separate because a transfer lives longer than any one link (it resumes
//! over the next one) and owns what chat never needs: the disk, a flow
//! window, and an offer a person answers. Files travel on a link of their
//! own to each target, dialed here, so that a chat never queues behind
//! file data (PROTOCOL.md 5.4); the files offered to us arrive on whatever
//! link the inbox verified, and are answered on it.
//!
//! A transfer is numbered for the user (`/accept 3`), one count for both
//! directions; on the wire it is the sender's random `id`. The disk is
//! the host's ([`DiskOp`]): replies come back through [`Transfers::disk`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::file_name::safe_file_name;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{self, fold_name, LinkMsg};

use super::dialing::Dialing;
use super::directory::Directory;
use super::event::{Direction, Event};
use super::outbox::Target;
use super::{Actions, HostOutput, Party, Record, Rng, Timer, TimerKey};
use crate::disk::{DiskOp, DiskReply, FileCode};
use crate::journal;

/// File data in one `file_chunk`: its frame stays well under the 64 KiB
/// frame limit.
pub(super) const CHUNK: usize = 32 * 1024;

/// File data a sender has out beyond what the receiver has written: what
/// either side holds of one transfer in memory, and what a receiver takes
/// before it calls the sender's pace a protocol error.
pub(super) const WINDOW: u64 = 1024 * 1024;

/// `file_progress` events come at most this often per transfer.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Offers a receiver holds unanswered or unfinished: per sender, and in all.
const MAX_OFFERS_PER_SENDER: usize = 16;
const MAX_INCOMING: usize = 64;

/// Ended transfers remembered, so that a re-offer (which crossed our
/// answer) is answered the same way.
const ENDED_REMEMBERED: usize = 1024;

/// What the user chose for transfers.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Where received files are saved unless `/accept` names a directory.
    pub downloads: PathBuf,
    /// Offers of larger files are refused (`too_large`).
    pub max_file_size: u64,
    /// Offers from these peers (folded names) are accepted at once.
    pub accept_from: HashSet<String>,
    /// An offer not accepted within this, or a transfer that makes no
    /// progress for this long, ends as `expired`.
    pub offer_ttl: Duration,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            downloads: PathBuf::from("Downloads/peerchat"),
            max_file_size: 4 << 30,
            accept_from: HashSet::new(),
            offer_ttl: Duration::from_secs(600),
        }
    }
}

/// How often rate and time left are told, and from what.
#[derive(Default)]
struct Progress {
    /// When bytes began to move on the current link, and how many were
    /// held then.
    since: Option<(Instant, u64)>,
    last: Option<Instant>,
}

impl Progress {
    fn restart(&mut self, now: Instant, bytes: u64) {
        self.since = Some((now, bytes));
    }

    /// An event's worth of progress, if one is due.
    fn tick(&mut self, now: Instant, bytes: u64, size: u64) -> Option<(u64, Option<u64>)> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < PROGRESS_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        let (start, from) = self.since?;
        let secs = now.duration_since(start).as_secs_f64();
        let rate = if secs > 0.0 {
            (bytes.saturating_sub(from) as f64 / secs) as u64
        } else {
            0
        };
        let eta_ms = (rate > 0).then(|| (size - bytes).saturating_mul(1000) / rate);
        Some((rate, eta_ms))
    }
}

/// What the transfer is, for the user.
struct Shown {
    number: u64,
    direction: Direction,
    peer: String,
    name: String,
    size: u64,
}

enum OutPhase {
    /// The disk is hashing the file.
    Preparing,
    /// Offered (or to be offered once linked); waits for `file_accept`.
    Offered,
    Sending {
        /// Reads asked over an earlier link come back with an older epoch.
        epoch: u32,
        acked: u64,
        sent: u64,
        /// Asked of the disk: `sent` once it answers.
        requested: u64,
    },
}

struct Outgoing {
    id: u64,
    /// Offered in an earlier run as this size and SHA-256: the file must
    /// still be that.
    offered: Option<(u64, [u8; 32])>,
    folded: String,
    party: Party,
    path: PathBuf,
    name: String,
    size: u64,
    sha256: [u8; 32],
    phase: OutPhase,
    epoch: u32,
    deadline: Option<TimerKey>,
    progress: Progress,
}

enum InPhase {
    /// Shown to the user, who has not answered.
    Offered,
    /// Accepted in an earlier run: it resumes when the sender offers it.
    Resuming,
    /// Accepted: the disk opens the partial file.
    Opening,
    Receiving {
        /// Taken from the link and handed to the disk.
        received: u64,
        /// Written by the disk.
        written: u64,
    },
}

struct Incoming {
    id: u64,
    key: PublicKey,
    from: String,
    /// Safe to save under.
    name: String,
    /// Where it is saved, once accepted.
    dir: Option<PathBuf>,
    size: u64,
    sha256: [u8; 32],
    /// The link the latest offer came on, while it is open.
    conn: Option<LinkId>,
    phase: InPhase,
    deadline: Option<TimerKey>,
    progress: Progress,
}

impl Outgoing {
    /// The store forgets it.
    fn ended(&self, actions: &mut Actions) {
        actions.record(Record::TransferEnded {
            peer: self.party.key,
            id: self.id,
            outgoing: true,
        });
    }
}

impl Incoming {
    /// The store forgets it, if it was accepted (and so kept).
    fn ended(&self, actions: &mut Actions) {
        if self.dir.is_some() {
            actions.record(Record::TransferEnded {
                peer: self.key,
                id: self.id,
                outgoing: false,
            });
        }
    }
}

pub(super) struct Transfers {
    next_number: u64,
    outgoing: BTreeMap<u64, Outgoing>,
    incoming: BTreeMap<u64, Incoming>,
    /// Incoming by the sender's key and id.
    by_id: HashMap<(PublicKey, u64), u64>,
    /// How ended incoming transfers ended (`None`: saved), oldest first.
    ended: HashMap<(PublicKey, u64), Option<FileCode>>,
    ended_order: VecDeque<(PublicKey, u64)>,
    /// Our file links, by target (folded name).
    links: HashMap<String, Dialing>,
    conns: HashMap<LinkId, String>,
    config: FilesConfig,
    backoff_min: Duration,
    backoff_max: Duration,
}

fn cancel_frame(id: u64, code: FileCode, reason: impl Into<String>) -> bytes::Bytes {
    protocol::frame(&LinkMsg::FileCancel {
        id,
        code: code.as_str().into(),
        reason: reason.into(),
    })
}

impl Transfers {
    /// The transfers a store kept (`saved`) go on: ours are hashed again
    /// at [`Transfers::start`] and offered, theirs resume when offered.
    pub(super) fn new(
        config: FilesConfig,
        saved: Vec<journal::Transfer>,
        backoff_min: Duration,
        backoff_max: Duration,
    ) -> Self {
        let mut transfers = Transfers {
            next_number: 1,
            outgoing: BTreeMap::new(),
            incoming: BTreeMap::new(),
            by_id: HashMap::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            links: HashMap::new(),
            conns: HashMap::new(),
            config,
            backoff_min,
            backoff_max,
        };
        for kept in saved {
            let number = transfers.number();
            if kept.outgoing {
                let outgoing = Outgoing {
                    id: kept.id,
                    offered: Some((kept.size, kept.sha256)),
                    folded: fold_name(&kept.peer.name),
                    party: kept.peer,
                    path: PathBuf::from(kept.path),
                    name: kept.name,
                    size: kept.size,
                    sha256: kept.sha256,
                    phase: OutPhase::Preparing,
                    epoch: 0,
                    deadline: None,
                    progress: Progress::default(),
                };
                transfers.outgoing.insert(number, outgoing);
            } else {
                transfers.by_id.insert((kept.peer.key, kept.id), number);
                let incoming = Incoming {
                    id: kept.id,
                    key: kept.peer.key,
                    from: kept.peer.name,
                    name: kept.name,
                    dir: Some(PathBuf::from(kept.path)),
                    size: kept.size,
                    sha256: kept.sha256,
                    conn: None,
                    phase: InPhase::Resuming,
                    deadline: None,
                    progress: Progress::default(),
                };
                transfers.incoming.insert(number, incoming);
            }
        }
        transfers
    }

    /// Begins what the store kept: our files are hashed again, and every
    /// transfer has its lifetime from now.
    pub(super) fn start(&mut self, actions: &mut Actions) {
        let at = actions.now + self.config.offer_ttl;
        for (number, out) in &self.outgoing {
            actions.host(HostOutput::Disk(DiskOp::Prepare {
                transfer: *number,
                path: out.path.clone(),
            }));
        }
        for (number, inc) in &mut self.incoming {
            inc.deadline = Some(actions.arm(at, Timer::FileDeadline(*number)));
        }
    }

    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.conns.contains_key(&conn)
    }

    fn number(&mut self) -> u64 {
        let n = self.next_number;
        self.next_number += 1;
        n
    }

    // ---- sending ----

    /// `/send`: the disk hashes the file; it is offered once that is done.
    pub(super) fn send(
        &mut self,
        target: Target,
        path: PathBuf,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let number = self.number();
        actions.host(HostOutput::Disk(DiskOp::Prepare {
            transfer: number,
            path: path.clone(),
        }));
        self.outgoing.insert(
            number,
            Outgoing {
                // Never 0, and random: unique across our restarts.
                id: rng.next() | 1,
                offered: None,
                folded: target.folded,
                party: target.party,
                name: path.display().to_string(),
                path,
                size: 0,
                sha256: [0; 32],
                phase: OutPhase::Preparing,
                epoch: 0,
                deadline: None,
                progress: Progress::default(),
            },
        );
    }

    fn shown_out(number: u64, out: &Outgoing) -> Shown {
        Shown {
            number,
            direction: Direction::Out,
            peer: out.party.name.clone(),
            name: out.name.clone(),
            size: out.size,
        }
    }

    fn offer_frame(out: &Outgoing) -> bytes::Bytes {
        protocol::frame(&LinkMsg::FileOffer {
            id: out.id,
            name: out.name.clone(),
            size: out.size,
            sha256: out.sha256,
        })
    }

    fn on_prepared(
        &mut self,
        number: u64,
        name: String,
        size: u64,
        sha256: [u8; 32],
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        if out.offered.is_some_and(|offered| offered != (size, sha256)) {
            let why = format!("{} changed since it was offered", out.path.display());
            self.fail_out(number, FileCode::Changed, why, actions);
            return;
        }
        out.name = name;
        out.size = size;
        out.sha256 = sha256;
        actions.record(Record::Transfer(journal::Transfer {
            id: out.id,
            outgoing: true,
            peer: out.party.clone(),
            path: out.path.display().to_string(),
            name: out.name.clone(),
            size,
            sha256,
        }));
        out.phase = OutPhase::Offered;
        out.deadline = Some(actions.arm(
            actions.now + self.config.offer_ttl,
            Timer::FileDeadline(number),
        ));
        actions.emit(Event::FileOffer {
            transfer: number,
            direction: Direction::Out,
            peer: out.party.name.clone(),
            name: out.name.clone(),
            size,
            sha256: hex(&sha256),
        });
        let folded = out.folded.clone();
        match self.links.get(&folded).and_then(Dialing::up) {
            Some(conn) => actions.send(conn, Self::offer_frame(out)),
            None => self.ensure_link(&folded, dir, actions),
        }
    }

    /// Whether something waits to go to `folded` over a link.
    fn waits_for_link(&self, folded: &str) -> bool {
        self.outgoing
            .values()
            .any(|o| o.folded == folded && !matches!(o.phase, OutPhase::Preparing))
    }

    /// Dials `folded` if a transfer waits for it and nothing is under way.
    fn ensure_link(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        let Some(addr) = dir.get(folded).filter(|k| !k.mismatch).map(|k| k.addr) else {
            return;
        };
        if !self.waits_for_link(folded) {
            return;
        }
        let link = self.links.entry(folded.to_string()).or_default();
        if let Some(conn) = link.dial(addr, actions) {
            self.conns.insert(conn, folded.to_string());
        }
    }

    /// Our file link is up and proved `key`: if that is the listed key,
    /// say hello and offer (again) every transfer for the target.
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
        let Some(folded) = self.conns.get(&conn).cloned() else {
            return;
        };
        let listed = dir.get(&folded).filter(|k| k.key == key && !k.mismatch);
        if listed.is_none() {
            tracing::warn!(peer = %folded, %key, "a file link proved another key than the listed one; refused");
            self.drop_conn(conn, &folded);
            actions.close(conn, "the key is not the listed one");
            self.schedule_redial(&folded, now, rng, actions);
            return;
        }
        dir.pin(&folded, key, actions);
        actions.send(conn, protocol::frame(hello));
        if let Some(link) = self.links.get_mut(&folded) {
            link.set_up();
        }
        for out in self.outgoing.values_mut() {
            if out.folded == folded && !matches!(out.phase, OutPhase::Preparing) {
                out.phase = OutPhase::Offered;
                actions.send(conn, Self::offer_frame(out));
            }
        }
    }

    fn drop_conn(&mut self, conn: LinkId, folded: &str) {
        self.conns.remove(&conn);
        if let Some(link) = self.links.get_mut(folded) {
            link.lost(conn);
        }
    }

    /// A frame on our file link: the receiver's answers.
    pub(super) fn on_frame(&mut self, conn: LinkId, body: &[u8], actions: &mut Actions) {
        let Some(folded) = self.conns.get(&conn).cloned() else {
            return;
        };
        let msg = match codec::decode::<LinkMsg>(body) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(peer = %folded, error = %e, "undecodable frame on a file link; closing it");
                actions.close(conn, format!("undecodable frame: {e}"));
                return;
            }
        };
        let id = match &msg {
            LinkMsg::FileAccept { id, .. }
            | LinkMsg::FileAck { id, .. }
            | LinkMsg::FileDone { id }
            | LinkMsg::FileCancel { id, .. } => *id,
            LinkMsg::Error { code, reason } => {
                tracing::warn!(peer = %folded, %code, %reason, "the peer refused our file link");
                return;
            }
            other => {
                tracing::warn!(peer = %folded, ?other, "unexpected message on a file link; closing it");
                actions.close(conn, "unexpected message");
                return;
            }
        };
        let found = self
            .outgoing
            .iter()
            .find(|(_, o)| o.id == id && o.folded == folded)
            .map(|(n, _)| *n);
        let Some(number) = found else {
            if !matches!(msg, LinkMsg::FileCancel { .. } | LinkMsg::FileDone { .. }) {
                actions.send(
                    conn,
                    cancel_frame(id, FileCode::Unknown, "no such transfer"),
                );
            }
            return;
        };
        match msg {
            LinkMsg::FileAccept { offset, .. } => self.on_accept(number, offset, actions),
            LinkMsg::FileAck { offset, .. } => self.on_ack(number, offset, actions),
            LinkMsg::FileDone { .. } => self.on_done(number, actions),
            LinkMsg::FileCancel { code, reason, .. } => {
                if let Some(out) = self.outgoing.remove(&number) {
                    self.end_out(
                        number,
                        out,
                        FileCode::parse(&code),
                        format!("{}: {reason}", folded),
                        false,
                        actions,
                    );
                }
            }
            _ => {}
        }
    }

    fn on_accept(&mut self, number: u64, offset: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        if offset > out.size || matches!(out.phase, OutPhase::Preparing) {
            let why = format!("accepted from byte {offset} of {}", out.size);
            self.fail_out(number, FileCode::Protocol, why, actions);
            return;
        }
        if let Some(link) = self.links.get_mut(&out.folded) {
            link.progressed();
        }
        out.epoch += 1;
        out.phase = OutPhase::Sending {
            epoch: out.epoch,
            acked: offset,
            sent: offset,
            requested: offset,
        };
        out.progress.restart(actions.now, offset);
        self.rearm_out(number, actions);
        self.pump(number, actions);
    }

    fn on_ack(&mut self, number: u64, offset: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending { acked, sent, .. } = &mut out.phase else {
            return;
        };
        if offset > *sent {
            let why = format!("acknowledged byte {offset} of the {sent} sent");
            self.fail_out(number, FileCode::Protocol, why, actions);
            return;
        }
        *acked = (*acked).max(offset);
        let bytes = *acked;
        if let Some((rate, eta_ms)) = out.progress.tick(actions.now, bytes, out.size) {
            let shown = Self::shown_out(number, out);
            actions.emit(progress_event(shown, bytes, rate, eta_ms));
        }
        self.rearm_out(number, actions);
        self.pump(number, actions);
    }

    fn on_done(&mut self, number: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.remove(&number) else {
            return;
        };
        actions.cancel(out.deadline);
        out.ended(actions);
        actions.host(HostOutput::Disk(DiskOp::Close {
            transfer: number,
            discard: false,
        }));
        let shown = Self::shown_out(number, &out);
        actions.emit(Event::FileDone {
            transfer: number,
            direction: shown.direction,
            peer: shown.peer,
            name: shown.name,
            size: shown.size,
            path: out.path.display().to_string(),
        });
        self.release_link(&out.folded, actions);
    }

    /// Closes our file link to `folded` once nothing more goes on it.
    fn release_link(&mut self, folded: &str, actions: &mut Actions) {
        if self.outgoing.values().any(|o| o.folded == folded) {
            return;
        }
        if let Some(conn) = self.links.remove(folded).and_then(|mut l| l.stop(actions)) {
            self.conns.remove(&conn);
            actions.close(conn, "no more files to send");
        }
    }

    /// Asks the disk for what the window lets out.
    fn pump(&mut self, number: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending {
            epoch,
            acked,
            requested,
            ..
        } = &mut out.phase
        else {
            return;
        };
        while *requested < out.size && *requested - *acked < WINDOW {
            let len = (out.size - *requested).min(CHUNK as u64);
            actions.host(HostOutput::Disk(DiskOp::Read {
                transfer: number,
                epoch: *epoch,
                offset: *requested,
                len: len as usize,
            }));
            *requested += len;
        }
    }

    fn on_read(
        &mut self,
        number: u64,
        epoch: u32,
        offset: u64,
        data: Vec<u8>,
        actions: &mut Actions,
    ) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending {
            epoch: current,
            sent,
            ..
        } = &mut out.phase
        else {
            return;
        };
        let conn = self.links.get(&out.folded).and_then(Dialing::up);
        let (Some(conn), true) = (conn, *current == epoch && offset == *sent) else {
            return;
        };
        *sent += data.len() as u64;
        actions.send(
            conn,
            protocol::frame(&LinkMsg::FileChunk {
                id: out.id,
                offset,
                data,
            }),
        );
    }

    /// The deadline counts again from now: the transfer moved.
    fn rearm_out(&mut self, number: u64, actions: &mut Actions) {
        if let Some(out) = self.outgoing.get_mut(&number) {
            actions.cancel(out.deadline.take());
            out.deadline = Some(actions.arm(
                actions.now + self.config.offer_ttl,
                Timer::FileDeadline(number),
            ));
        }
    }

    /// Ends an outgoing transfer for `code`, telling the receiver.
    fn fail_out(&mut self, number: u64, code: FileCode, reason: String, actions: &mut Actions) {
        if let Some(out) = self.outgoing.remove(&number) {
            self.end_out(number, out, code, reason, true, actions);
        }
    }

    fn end_out(
        &mut self,
        number: u64,
        out: Outgoing,
        code: FileCode,
        reason: String,
        tell: bool,
        actions: &mut Actions,
    ) {
        actions.cancel(out.deadline);
        out.ended(actions);
        actions.host(HostOutput::Disk(DiskOp::Close {
            transfer: number,
            discard: false,
        }));
        let conn = self.links.get(&out.folded).and_then(Dialing::up);
        if let (true, Some(conn), false) = (tell, conn, matches!(out.phase, OutPhase::Preparing)) {
            actions.send(conn, cancel_frame(out.id, code, reason.clone()));
        }
        actions.emit(failed_event(Self::shown_out(number, &out), code, reason));
        self.release_link(&out.folded, actions);
    }

    pub(super) fn on_closed(
        &mut self,
        conn: LinkId,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(folded) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(link) = self.links.get_mut(&folded) {
            link.lost(conn);
        }
        self.pause(&folded);
        self.schedule_redial(&folded, now, rng, actions);
    }

    /// What was being sent to `folded` waits to be accepted again, over
    /// the next link.
    fn pause(&mut self, folded: &str) {
        for out in self.outgoing.values_mut() {
            if out.folded == folded && matches!(out.phase, OutPhase::Sending { .. }) {
                out.phase = OutPhase::Offered;
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
        if !self.waits_for_link(folded) {
            return;
        }
        let timer = Timer::FileRetry(folded.to_string());
        let backoff = (self.backoff_min, self.backoff_max);
        let link = self.links.entry(folded.to_string()).or_default();
        link.retry_later(backoff, timer, now, rng, actions);
    }

    pub(super) fn on_retry(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        if let Some(link) = self.links.get_mut(folded) {
            link.retried();
        }
        self.ensure_link(folded, dir, actions);
    }

    /// The directory lists `folded` under `key`: transfers offered to
    /// another key end; the others go on (a link is dialed).
    pub(super) fn on_listed(
        &mut self,
        folded: &str,
        key: PublicKey,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let stale: Vec<u64> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.folded == folded && o.party.key != key)
            .map(|(n, _)| *n)
            .collect();
        for number in stale {
            let reason = format!("{folded} is listed with another key now");
            self.fail_out(number, FileCode::KeyChanged, reason, actions);
        }
        self.ensure_link(folded, dir, actions);
    }

    /// The directory has `folded` at another address: the link goes, and
    /// a new one is dialed.
    pub(super) fn redial(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        self.away(folded, actions);
        self.ensure_link(folded, dir, actions);
    }

    /// `folded` left: our link to it closes; transfers wait for it to be
    /// back (within their deadline).
    pub(super) fn away(&mut self, folded: &str, actions: &mut Actions) {
        if let Some(conn) = self.links.get_mut(folded).and_then(|l| l.stop(actions)) {
            self.conns.remove(&conn);
            actions.close(conn, "the peer left");
        }
        self.pause(folded);
    }

    // ---- receiving ----

    fn shown_in(number: u64, inc: &Incoming) -> Shown {
        Shown {
            number,
            direction: Direction::In,
            peer: inc.from.clone(),
            name: inc.name.clone(),
            size: inc.size,
        }
    }

    /// A file message from `from` (listed under `key`) on link `conn`, which
    /// the inbox verified.
    pub(super) fn on_incoming(
        &mut self,
        conn: LinkId,
        party: Party,
        msg: LinkMsg,
        actions: &mut Actions,
    ) -> Result<(), String> {
        match msg {
            LinkMsg::FileOffer {
                id,
                name,
                size,
                sha256,
            } => {
                self.on_offer(conn, party, id, name, size, sha256, actions);
                Ok(())
            }
            LinkMsg::FileChunk { id, offset, data } => {
                self.on_chunk(conn, party.key, id, offset, data, actions)
            }
            LinkMsg::FileCancel { id, code, reason } => {
                if let Some(number) = self.by_id.get(&(party.key, id)).copied() {
                    let reason = format!("{}: {reason}", party.name);
                    self.end_in(number, FileCode::parse(&code), reason, false, actions);
                }
                Ok(())
            }
            _ => Err("the acceptor's file messages come only from it".into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_offer(
        &mut self,
        conn: LinkId,
        party: Party,
        id: u64,
        offered: String,
        size: u64,
        sha256: [u8; 32],
        actions: &mut Actions,
    ) {
        let key = (party.key, id);
        if let Some(outcome) = self.ended.get(&key) {
            let frame = match outcome {
                None => protocol::frame(&LinkMsg::FileDone { id }),
                Some(code) => cancel_frame(id, *code, "the transfer has ended"),
            };
            actions.send(conn, frame);
            return;
        }
        if let Some(number) = self.by_id.get(&key).copied() {
            let Some(inc) = self.incoming.get_mut(&number) else {
                return;
            };
            inc.conn = Some(conn);
            if inc.size != size || inc.sha256 != sha256 {
                let why = "offered again as another file".to_string();
                self.end_in(number, FileCode::Protocol, why, true, actions);
            } else if matches!(inc.phase, InPhase::Resuming) {
                inc.phase = InPhase::Offered;
                let dir = inc.dir.clone();
                self.accept(number, dir, actions);
            } else if let InPhase::Receiving { received, .. } = inc.phase {
                // The sender resumes over a new link.
                inc.progress.restart(actions.now, received);
                let frame = protocol::frame(&LinkMsg::FileAccept {
                    id,
                    offset: received,
                });
                actions.send(conn, frame);
            }
            return;
        }
        let name = safe_file_name(&offered);
        let refuse = if size > self.config.max_file_size {
            Some((
                FileCode::TooLarge,
                format!(
                    "{} is {size} bytes; this peer takes files of at most {} (--max-file-size)",
                    name, self.config.max_file_size
                ),
            ))
        } else if self.incoming.len() >= MAX_INCOMING
            || self
                .incoming
                .values()
                .filter(|i| i.key == party.key)
                .count()
                >= MAX_OFFERS_PER_SENDER
        {
            Some((
                FileCode::Busy,
                "too many transfers at once; try later".into(),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refuse {
            tracing::info!(from = %party.name, %name, %reason, "refusing a file offer");
            actions.send(conn, cancel_frame(id, code, reason.clone()));
            let number = self.number();
            let shown = Shown {
                number,
                direction: Direction::In,
                peer: party.name,
                name,
                size,
            };
            actions.emit(failed_event(shown, code, reason));
            self.remember(key, Some(code));
            return;
        }
        let number = self.number();
        let deadline = actions.arm(
            actions.now + self.config.offer_ttl,
            Timer::FileDeadline(number),
        );
        actions.emit(Event::FileOffer {
            transfer: number,
            direction: Direction::In,
            peer: party.name.clone(),
            name: name.clone(),
            size,
            sha256: hex(&sha256),
        });
        let auto = self.config.accept_from.contains(&fold_name(&party.name));
        self.by_id.insert(key, number);
        self.incoming.insert(
            number,
            Incoming {
                id,
                key: party.key,
                from: party.name,
                name,
                dir: None,
                size,
                sha256,
                conn: Some(conn),
                phase: InPhase::Offered,
                deadline: Some(deadline),
                progress: Progress::default(),
            },
        );
        if auto {
            self.accept(number, None, actions);
        }
    }

    fn on_chunk(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        id: u64,
        offset: u64,
        data: Vec<u8>,
        actions: &mut Actions,
    ) -> Result<(), String> {
        let Some(number) = self.by_id.get(&(key, id)).copied() else {
            if !self.ended.contains_key(&(key, id)) {
                actions.send(
                    conn,
                    cancel_frame(id, FileCode::Unknown, "no such transfer"),
                );
            }
            // Else it was in flight when the transfer ended.
            return Ok(());
        };
        let Some(inc) = self.incoming.get_mut(&number) else {
            return Ok(());
        };
        let InPhase::Receiving { received, written } = &mut inc.phase else {
            return Err(format!(
                "file data for transfer {id:x}, which is not accepted"
            ));
        };
        let len = data.len() as u64;
        if offset != *received || len == 0 || len > inc.size - *received {
            return Err(format!(
                "file data at byte {offset} ({len} bytes) where byte {received} of {} was due",
                inc.size
            ));
        }
        if *received + len - *written > WINDOW + CHUNK as u64 {
            return Err(format!(
                "more than {WINDOW} bytes of file data unacknowledged"
            ));
        }
        *received += len;
        actions.host(HostOutput::Disk(DiskOp::Write {
            transfer: number,
            offset,
            data,
        }));
        Ok(())
    }

    /// `/accept N [DIR]`.
    pub(super) fn accept(&mut self, number: u64, dir: Option<PathBuf>, actions: &mut Actions) {
        let Some(inc) = self.incoming.get_mut(&number) else {
            return self.not_found(number, "/accept", actions);
        };
        if !matches!(inc.phase, InPhase::Offered) {
            actions.error(
                super::Code::BadCommand,
                format!("transfer {number} is already accepted"),
            );
            return;
        }
        inc.phase = InPhase::Opening;
        let dir = dir.unwrap_or_else(|| self.config.downloads.clone());
        inc.dir = Some(dir.clone());
        actions.record(Record::Transfer(journal::Transfer {
            id: inc.id,
            outgoing: false,
            peer: Party {
                key: inc.key,
                name: inc.from.clone(),
            },
            path: dir.display().to_string(),
            name: inc.name.clone(),
            size: inc.size,
            sha256: inc.sha256,
        }));
        actions.host(HostOutput::Disk(DiskOp::Receive {
            transfer: number,
            dir,
            name: inc.name.clone(),
            id: inc.id,
            size: inc.size,
            sha256: inc.sha256,
        }));
    }

    fn not_found(&self, number: u64, command: &str, actions: &mut Actions) {
        actions.error(
            super::Code::BadCommand,
            format!("{command}: no transfer {number} is under way"),
        );
    }

    /// `/reject N`.
    pub(super) fn reject(&mut self, number: u64, actions: &mut Actions) {
        match self.incoming.get(&number) {
            Some(inc) if matches!(inc.phase, InPhase::Offered) => {
                self.end_in(number, FileCode::Rejected, "rejected".into(), true, actions);
            }
            Some(_) => actions.error(
                super::Code::BadCommand,
                format!("transfer {number} is accepted; /cancel {number} stops it"),
            ),
            None => self.not_found(number, "/reject", actions),
        }
    }

    /// `/cancel N`, either way.
    pub(super) fn cancel(&mut self, number: u64, actions: &mut Actions) {
        if self.outgoing.contains_key(&number) {
            self.fail_out(
                number,
                FileCode::Cancelled,
                "cancelled by the sender".into(),
                actions,
            );
        } else if self.incoming.contains_key(&number) {
            self.end_in(
                number,
                FileCode::Cancelled,
                "cancelled by the receiver".into(),
                true,
                actions,
            );
        } else {
            self.not_found(number, "/cancel", actions);
        }
    }

    /// Ends an incoming transfer: its partial file goes, and the sender is
    /// told if `tell`.
    fn end_in(
        &mut self,
        number: u64,
        code: FileCode,
        reason: String,
        tell: bool,
        actions: &mut Actions,
    ) {
        let Some(inc) = self.incoming.remove(&number) else {
            return;
        };
        self.by_id.remove(&(inc.key, inc.id));
        actions.cancel(inc.deadline);
        inc.ended(actions);
        match (&inc.phase, &inc.dir) {
            (InPhase::Offered, _) => {}
            (InPhase::Resuming, Some(dir)) => actions.host(HostOutput::Disk(DiskOp::Discard {
                dir: dir.clone(),
                name: inc.name.clone(),
                id: inc.id,
            })),
            _ => actions.host(HostOutput::Disk(DiskOp::Close {
                transfer: number,
                discard: true,
            })),
        }
        if let (true, Some(conn)) = (tell, inc.conn) {
            actions.send(conn, cancel_frame(inc.id, code, reason.clone()));
        }
        self.remember((inc.key, inc.id), Some(code));
        actions.emit(failed_event(Self::shown_in(number, &inc), code, reason));
    }

    fn remember(&mut self, key: (PublicKey, u64), outcome: Option<FileCode>) {
        if self.ended.insert(key, outcome).is_none() {
            self.ended_order.push_back(key);
        }
        while self.ended_order.len() > ENDED_REMEMBERED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }

    /// A link to us closed: what came on it is answered on the next one.
    pub(super) fn on_link_closed(&mut self, conn: LinkId) {
        for inc in self.incoming.values_mut() {
            if inc.conn == Some(conn) {
                inc.conn = None;
            }
        }
    }

    // ---- both ----

    /// What the disk answered.
    pub(super) fn disk(&mut self, reply: DiskReply, dir: &Directory, actions: &mut Actions) {
        match reply {
            DiskReply::Prepared {
                transfer,
                name,
                size,
                sha256,
            } => self.on_prepared(transfer, name, size, sha256, dir, actions),
            DiskReply::Read {
                transfer,
                epoch,
                offset,
                data,
            } => self.on_read(transfer, epoch, offset, data, actions),
            DiskReply::Opened { transfer, have } => {
                let Some(inc) = self.incoming.get_mut(&transfer) else {
                    return;
                };
                inc.phase = InPhase::Receiving {
                    received: have,
                    written: have,
                };
                inc.progress.restart(actions.now, have);
                if let Some(conn) = inc.conn {
                    let frame = protocol::frame(&LinkMsg::FileAccept {
                        id: inc.id,
                        offset: have,
                    });
                    actions.send(conn, frame);
                }
                self.rearm_in(transfer, actions);
            }
            DiskReply::Written { transfer, through } => {
                let Some(inc) = self.incoming.get_mut(&transfer) else {
                    return;
                };
                if let InPhase::Receiving { written, .. } = &mut inc.phase {
                    *written = through;
                }
                if let Some(conn) = inc.conn {
                    let frame = protocol::frame(&LinkMsg::FileAck {
                        id: inc.id,
                        offset: through,
                    });
                    actions.send(conn, frame);
                }
                if let Some((rate, eta_ms)) = inc.progress.tick(actions.now, through, inc.size) {
                    let shown = Self::shown_in(transfer, inc);
                    actions.emit(progress_event(shown, through, rate, eta_ms));
                }
                self.rearm_in(transfer, actions);
            }
            DiskReply::Saved { transfer, path } => {
                let Some(inc) = self.incoming.remove(&transfer) else {
                    return;
                };
                self.by_id.remove(&(inc.key, inc.id));
                actions.cancel(inc.deadline);
                inc.ended(actions);
                if let Some(conn) = inc.conn {
                    actions.send(conn, protocol::frame(&LinkMsg::FileDone { id: inc.id }));
                }
                self.remember((inc.key, inc.id), None);
                let shown = Self::shown_in(transfer, &inc);
                actions.emit(Event::FileDone {
                    transfer,
                    direction: shown.direction,
                    peer: shown.peer,
                    name: shown.name,
                    size: shown.size,
                    path: path.display().to_string(),
                });
            }
            DiskReply::Failed {
                transfer,
                code,
                message,
            } => {
                if let Some(out) = self.outgoing.get(&transfer) {
                    // A file offered before a restart and unreadable now is
                    // not the file offered, whatever the disk said.
                    let again = out.offered.is_some() && matches!(out.phase, OutPhase::Preparing);
                    let code = if again { FileCode::Changed } else { code };
                    self.fail_out(transfer, code, message, actions);
                } else {
                    self.end_in(transfer, code, message, true, actions);
                }
            }
        }
    }

    fn rearm_in(&mut self, number: u64, actions: &mut Actions) {
        if let Some(inc) = self.incoming.get_mut(&number) {
            actions.cancel(inc.deadline.take());
            inc.deadline = Some(actions.arm(
                actions.now + self.config.offer_ttl,
                Timer::FileDeadline(number),
            ));
        }
    }

    /// A transfer made no progress within the offer's lifetime.
    pub(super) fn on_deadline(&mut self, number: u64, actions: &mut Actions) {
        let why = "no progress within the offer's lifetime".to_string();
        if let Some(out) = self.outgoing.get_mut(&number) {
            out.deadline = None;
            self.fail_out(number, FileCode::Expired, why, actions);
        } else if let Some(inc) = self.incoming.get_mut(&number) {
            inc.deadline = None;
            self.end_in(number, FileCode::Expired, why, true, actions);
        }
    }

    /// The peer exits. With a store, what is under way pauses: kept on
    /// disk and in the store, it goes on at the next start (ours offered
    /// again, theirs taken again when offered). Without one, what we send
    /// ends (the receivers are told), and what we receive keeps its
    /// partial file, unannounced: the sender offers it again when we are
    /// back, and accepting it again resumes.
    pub(super) fn exit(&mut self, actions: &mut Actions) {
        let kept = actions.keeps_records();
        for (number, out) in std::mem::take(&mut self.outgoing) {
            // Not offered yet, so not in the store: nothing to resume.
            let unkept = matches!(out.phase, OutPhase::Preparing) && out.offered.is_none();
            if kept && !unkept {
                actions.cancel(out.deadline);
                actions.host(HostOutput::Disk(DiskOp::Close {
                    transfer: number,
                    discard: false,
                }));
            } else {
                let why = match unkept {
                    true => "the sender quit before the file was hashed",
                    false => "the sender quit",
                };
                self.end_out(number, out, FileCode::Cancelled, why.into(), true, actions);
            }
        }
        for (number, inc) in std::mem::take(&mut self.incoming) {
            actions.cancel(inc.deadline);
            let reason = match inc.phase {
                InPhase::Offered => {
                    "not accepted before quitting; offered again when you are both online"
                }
                InPhase::Resuming | InPhase::Opening | InPhase::Receiving { .. } => {
                    actions.host(HostOutput::Disk(DiskOp::Close {
                        transfer: number,
                        discard: false,
                    }));
                    if kept {
                        continue;
                    }
                    "paused by quitting: what arrived is kept, and it resumes when the sender offers it again (/accept it then)"
                }
            };
            let shown = Self::shown_in(number, &inc);
            actions.emit(failed_event(shown, FileCode::Cancelled, reason.into()));
        }
        self.by_id.clear();
    }
}

fn progress_event(shown: Shown, bytes: u64, rate: u64, eta_ms: Option<u64>) -> Event {
    Event::FileProgress {
        transfer: shown.number,
        direction: shown.direction,
        peer: shown.peer,
        name: shown.name,
        bytes,
        size: shown.size,
        rate,
        eta_ms,
    }
}

fn failed_event(shown: Shown, code: FileCode, reason: String) -> Event {
    Event::FileFailed {
        transfer: shown.number,
        direction: shown.direction,
        peer: shown.peer,
        name: shown.name,
        code: code.as_str().into(),
        reason,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
