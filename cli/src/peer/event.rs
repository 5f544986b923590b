//! What the peer tells the user, and the closed sets of words it tells it
//! with.
//!
//! [`Event`] is the peer's whole output to a person or a script; its serde
//! form is the `--json` line format. Reasons and error codes are enums
//! inside the peer, so that the rooms cannot misspell them, and become the
//! same text as always once they reach an event.

use std::fmt;

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{ErrorCode, PeerEntry};
use serde::Serialize;

use crate::journal::Entry;

/// What the user sees. The `--json` front end prints these as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Registered {
        name: String,
        addr: String,
        /// Our own key: its fingerprint.
        key: PublicKey,
        peers: Vec<PeerEntry>,
    },
    Joined {
        name: String,
        addr: String,
        key: PublicKey,
    },
    Left {
        name: String,
        reason: String,
    },
    /// A peer re-registered from another address.
    Moved {
        name: String,
        addr: String,
    },
    /// The registry found whether a peer can be dialed at its address
    /// (`you`: whether others can dial us). Links to a peer that cannot be
    /// are reversed (it dials us, if we can be dialed) or relayed.
    Reachable {
        name: String,
        reachable: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        you: bool,
    },
    Peers {
        peers: Vec<PeerEntry>,
    },
    Sent {
        id: u64,
        to: Vec<String>,
    },
    Message {
        from: String,
        text: String,
        direct: bool,
        id: u64,
        /// The sender's clock when it sent the message (Unix milliseconds),
        /// if it said.
        #[serde(skip_serializing_if = "Option::is_none")]
        sent_at: Option<u64>,
    },
    Delivered {
        id: u64,
        to: String,
    },
    Undelivered {
        id: u64,
        to: String,
        reason: String,
    },
    /// The message waits for `to`, who is away (`reason`: `offline` when it
    /// was sent, the `left` reason, or `exit` when we exit first); it is
    /// kept, across restarts, until `delivered` or `undelivered`.
    Queued {
        id: u64,
        to: String,
        reason: String,
    },
    /// Answer to `/history`: a conversation's last messages, oldest first.
    History {
        /// The peer of a direct conversation; absent for everyone's.
        #[serde(skip_serializing_if = "Option::is_none")]
        with: Option<String>,
        messages: Vec<Entry>,
    },
    /// Answer to `/search`: the last messages that match, oldest first.
    Search {
        text: String,
        messages: Vec<Entry>,
    },
    /// Answer to `/outbox`: what waits for an acknowledgement, by target.
    Outbox {
        messages: Vec<Waiting>,
    },
    RegistryLost {
        error: String,
        retry_in_ms: u64,
    },
    /// Answer to `/whois`: the key the directory lists for a peer, and
    /// whether it is the one pinned in `known_peers`.
    Whois {
        name: String,
        key: PublicKey,
        /// True when `known_peers` holds this key for the name, and for
        /// our own name.
        pinned: bool,
        /// The name is ours.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        you: bool,
        /// The key `known_peers` pins for the name, when it is another one.
        #[serde(skip_serializing_if = "Option::is_none")]
        pinned_key: Option<PublicKey>,
        /// How our chat link to the peer goes, while we have one: `direct`,
        /// or `relayed` (through the registry, still end to end encrypted).
        #[serde(skip_serializing_if = "Option::is_none")]
        link: Option<String>,
    },
    /// Answer to `/status`: the registry session as it stands.
    Status {
        /// `registered`, `connecting`, `lost` (it was reached, then lost)
        /// or `unreachable` (never reached since start).
        registry: String,
        /// Why it is lost or unreachable.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// When the next attempt starts.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
        /// Peers online (as far as we know).
        peers: usize,
    },
    /// A file offered: by us (`out`, once it is hashed) or to us (`in`:
    /// `/accept TRANSFER [DIR]` or `/reject TRANSFER`).
    FileOffer {
        /// This peer's number for the transfer, for the commands.
        transfer: u64,
        direction: Direction,
        /// Whom it goes to, or comes from.
        peer: String,
        /// The file's name: as offered (`out`), or as it will be saved
        /// (`in`, made safe).
        name: String,
        size: u64,
        /// Hex.
        sha256: String,
    },
    /// At most four a second per transfer.
    FileProgress {
        transfer: u64,
        direction: Direction,
        peer: String,
        name: String,
        /// Bytes the receiver holds.
        bytes: u64,
        size: u64,
        /// Bytes per second since the transfer (re)started.
        rate: u64,
        /// Time left at that rate.
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_ms: Option<u64>,
    },
    /// The receiver has the whole file, checked against its SHA-256.
    FileDone {
        transfer: u64,
        direction: Direction,
        peer: String,
        name: String,
        size: u64,
        /// Where it was saved (`in`) or sent from (`out`).
        path: String,
    },
    /// The transfer ended without the file: `code` says why (`rejected`,
    /// `expired`, `cancelled`, `too_large`, `busy`, `corrupt`, `io`,
    /// `changed`, `unknown`, `protocol`, `key_changed`).
    FileFailed {
        transfer: u64,
        direction: Direction,
        peer: String,
        name: String,
        code: String,
        reason: String,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Which way a file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// One message waiting for one target, as `/outbox` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiting {
    pub id: u64,
    pub to: String,
    pub text: String,
    /// When it was sent (Unix milliseconds).
    pub sent_at: u64,
    /// The target is online and linked: it is on its way.
    pub online: bool,
}

/// Why a peer left the directory, or why messages were given up: the
/// `reason` of `left` and `undelivered` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reason {
    /// The registry's reason for a `left`, passed on as it said it: the
    /// protocol lets registries add reasons.
    Left(String),
    /// Missing from the registry's list after we re-registered, past the
    /// grace.
    Gone,
    /// Still unacknowledged when the outbox's time to live ran out.
    Expired,
    /// Sent to a target who is not online now.
    Offline,
    /// We exit before the target acknowledged it.
    Exit,
    /// We quit before it was acknowledged.
    Quit,
    /// The name is listed with another key than the one it was sent to.
    KeyChanged,
    /// A protocol error ended it: a key that disagrees with a pin, or the
    /// registry refusing or replacing us.
    Code(ErrorCode),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Left(reason) => reason,
            Reason::Gone => "gone",
            Reason::Expired => "expired",
            Reason::Offline => "offline",
            Reason::Exit => "exit",
            Reason::Quit => "quit",
            Reason::KeyChanged => Code::KeyChanged.as_str(),
            Reason::Code(code) => code.as_str(),
        })
    }
}

/// The code of an `error` event: one of the protocol's, or one that only
/// this peer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Code {
    Protocol(ErrorCode),
    /// The directory lists a name we had not pinned with another key than
    /// before.
    KeyChanged,
    /// A command that cannot be carried out as typed.
    BadCommand,
    /// A message too long for one frame.
    TooLong,
    /// The outbox holds as much as it may for a target, or in all.
    OutboxFull,
}

impl Code {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Code::Protocol(code) => code.as_str(),
            Code::KeyChanged => "key_changed",
            Code::BadCommand => "bad_command",
            Code::TooLong => "too_long",
            Code::OutboxFull => "outbox_full",
        }
    }
}

impl From<ErrorCode> for Code {
    fn from(code: ErrorCode) -> Self {
        Code::Protocol(code)
    }
}
