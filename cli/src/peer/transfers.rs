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
//!
//! Here: the transfers' state, and what concerns both directions (the
//! disk's replies, deadlines, `/cancel`, exit). Sending (our file links,
//! offers, the window) is in `sending`, receiving (offers to us, chunks
//! to the disk) in `receiving`: each an `impl Transfers` of its own.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::file_name::safe_file_name;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{self, fold_name, LinkMsg};

use super::dialing::{Dialing, Route, Targets};
use super::directory::Directory;
use super::event::{Direction, Event};
use super::outbox::Target;
use super::{Actions, ByName, HostOutput, Party, Record, Rng, Timer, TimerKey};
use crate::disk::{DiskOp, DiskReply, FileCode};
use crate::journal;

mod receiving;
mod sending;

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
        acked: u64,
        sent: u64,
        /// Asked of the disk: `sent` once it answers.
        requested: u64,
    },
}

struct Outgoing {
    id: u64,
    /// Offered in an earlier run (as `size` and `sha256`): the file must
    /// still be that.
    kept: bool,
    folded: String,
    party: Party,
    path: PathBuf,
    name: String,
    size: u64,
    sha256: [u8; 32],
    phase: OutPhase,
    /// Counts the accepts: reads asked under an earlier one (over a link
    /// that has broken since) come back with an older epoch.
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
    /// A file to send to `party`, to be hashed before it is offered.
    fn new(id: u64, party: Party, path: PathBuf) -> Outgoing {
        Outgoing {
            id,
            kept: false,
            folded: fold_name(&party.name),
            party,
            name: path.display().to_string(),
            path,
            size: 0,
            sha256: [0; 32],
            phase: OutPhase::Preparing,
            epoch: 0,
            deadline: None,
            progress: Progress::default(),
        }
    }

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
    links: ByName<Dialing>,
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
            links: ByName::default(),
            conns: HashMap::new(),
            config,
            backoff_min,
            backoff_max,
        };
        for kept in saved {
            let number = transfers.number();
            if kept.outgoing {
                let mut outgoing = Outgoing::new(kept.id, kept.peer, PathBuf::from(kept.path));
                outgoing.kept = true;
                outgoing.name = kept.name;
                outgoing.size = kept.size;
                outgoing.sha256 = kept.sha256;
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

    /// The target of our file link `conn` and how it is dialed.
    pub(super) fn dialing_of(&mut self, conn: LinkId) -> Option<(String, &mut Dialing)> {
        let target = self.conns.get(&conn)?;
        let link = self.links.get_mut(target)?;
        Some((target.clone(), link))
    }

    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.conns.contains_key(&conn)
    }

    fn number(&mut self) -> u64 {
        let n = self.next_number;
        self.next_number += 1;
        n
    }

    /// `/cancel N`, either way.
    pub(in crate::peer) fn cancel(&mut self, number: u64, actions: &mut Actions) {
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
            DiskReply::Opened { transfer, have } => self.on_opened(transfer, have, actions),
            DiskReply::Written { transfer, through } => {
                self.on_written(transfer, through, actions);
            }
            DiskReply::Saved { transfer, path } => self.on_saved(transfer, &path, actions),
            DiskReply::Failed {
                transfer,
                code,
                message,
            } => {
                if self.outgoing.contains_key(&transfer) {
                    self.on_disk_failed(transfer, code, message, actions);
                } else {
                    self.end_in(transfer, code, message, true, actions);
                }
            }
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
        self.exit_sending(kept, actions);
        self.exit_receiving(kept, actions);
    }
}

/// The disk is done with transfer `number`; its partial file goes if
/// `discard`.
fn close_file(number: u64, discard: bool, actions: &mut Actions) {
    actions.host(HostOutput::Disk(DiskOp::Close {
        transfer: number,
        discard,
    }));
}

/// Arms `number`'s deadline again, `ttl` from now: the transfer moved.
fn rearm(deadline: &mut Option<TimerKey>, number: u64, ttl: Duration, actions: &mut Actions) {
    actions.cancel(deadline.take());
    *deadline = Some(actions.arm(actions.now + ttl, Timer::FileDeadline(number)));
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
