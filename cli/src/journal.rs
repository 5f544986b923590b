//! What the peer keeps across runs, as plain values: the [`Record`]s it
//! asks to be written, the [`Saved`] state it starts from, and the
//! [`Query`]s it asks of its history. The peer machine only makes and reads
//! these; the SQLite store (`store`) writes and answers them on its own
//! thread.
//!
//! Outcomes are kept compactly, because a message to everyone has one
//! outcome per target: a link delivers in order, so an acknowledgement
//! covers every earlier message to that target, and each target keeps only
//! the highest id it acknowledged ([`Record::Acked`]). A message to a
//! target is delivered if its id is at most that mark and it did not fail
//! ([`Record::Failed`]); otherwise it is still queued.

use std::collections::HashMap;

use peerchat_core::identity::PublicKey;
use serde::Serialize;

/// Someone we send to or hear from: known by key, shown by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub key: PublicKey,
    /// The name it was listed under (the directory's spelling).
    pub name: String,
}

/// One write, in the order the peer made it, in one stream with the events
/// it shows: an event is about the records before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// We sent a message. Its targets are what it waits on.
    Sent(Outgoing),
    /// `target` acknowledged every message of ours up to `through`.
    Acked { target: PublicKey, through: u64 },
    /// The message will not reach `target`, for `reason` (an `undelivered`
    /// reason: `expired`, `key_changed`, ...).
    Failed {
        id: u64,
        target: PublicKey,
        reason: String,
        /// Unix milliseconds.
        at: u64,
    },
    /// Every target of the message has its outcome: it leaves the outbox
    /// (and, without history, the store).
    Settled { id: u64 },
    /// A message we showed. Recorded even without history, so that its
    /// resend is recognised as one after a restart: the store keeps the
    /// highest id shown per sender key and instance.
    Received(Incoming),
    /// A file we offered (once hashed), or one we accepted: kept until it
    /// ends, so that it resumes after a restart.
    Transfer(Transfer),
    /// The transfer of `id` with `peer` ended, either way.
    TransferEnded {
        peer: PublicKey,
        id: u64,
        outgoing: bool,
    },
}

/// A file transfer under way, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The sender's id for it.
    pub id: u64,
    /// Ours to send (else offered to us, and accepted).
    pub outgoing: bool,
    /// The receiver, or the sender.
    pub peer: Party,
    /// Ours: the file sent. Theirs: the directory it is saved in.
    pub path: String,
    /// Ours: as offered. Theirs: as it will be saved.
    pub name: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// A message of ours, with what it waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub id: u64,
    pub text: String,
    pub direct: bool,
    /// The sender's time (Unix milliseconds), as the chat carries it.
    pub sent_at: u64,
    /// The targets still waiting for it, in name order.
    pub targets: Vec<Party>,
}

/// A message shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub from: Party,
    /// The sender's instance (see the protocol's `hello`).
    pub instance: u64,
    pub id: u64,
    pub text: String,
    pub direct: bool,
    /// The sender's claim, if it made one.
    pub sent_at: Option<u64>,
    /// Our time when it arrived (Unix milliseconds).
    pub received_at: u64,
}

/// What a peer starts from: the store as the last run left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// Said in every `hello`: chosen when the store was made, so that ids
    /// keep counting across restarts and receivers keep their place.
    pub instance: u64,
    /// The id the next message gets: above every id ever sent.
    pub next_id: u64,
    /// Messages still waiting on some target, by id, with only the targets
    /// they still wait on.
    pub outbox: Vec<Outgoing>,
    /// Per sender key: its instance and the highest id shown from it.
    pub seen: HashMap<PublicKey, (u64, u64)>,
    /// File transfers not ended yet.
    pub transfers: Vec<Transfer>,
}

/// A question for the history; the answer is a list of [`Entry`]s, oldest
/// first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// The last `limit` messages of a conversation: everyone's (`None`) or
    /// the direct one with the peer of that key.
    History { with: Option<Party>, limit: usize },
    /// The last `limit` messages whose text matches (SQLite FTS5 syntax,
    /// words quoted so that any text is a valid query).
    Search { text: String, limit: usize },
}

/// One message of the history, as `--json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The sender's id for it.
    pub id: u64,
    /// Who sent it: our own name for ours.
    pub from: String,
    /// We sent it.
    pub outgoing: bool,
    /// The peer of a direct conversation; absent for everyone's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
    pub text: String,
    /// The sender's time (Unix milliseconds), if it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    /// Our time: when we sent it, or when it arrived.
    pub received_at: u64,
    /// For ours: each target's outcome so far.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetState>,
}

/// Where one message of ours stands with one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetState {
    pub to: String,
    /// `queued`, `delivered` or `undelivered`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
