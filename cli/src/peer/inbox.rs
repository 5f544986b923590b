//! The inbox: links other peers opened to us, from their hello to the chats
//! they carry, each shown once and every one acknowledged.
//!
//! Separate because a link to us is trusted only once the directory lists
//! its sender under the key the link proved, which may come after the
//! link: until then the link is held, and what it sends waits (within
//! limits, since anyone can connect) to be shown after the sender's join.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{
    self, decode_first, fold_name, normalize_name, ErrorCode, FirstFrameError, LinkMsg,
    PROTOCOL_VERSION,
};
use peerchat_core::wire::FrameError;

use super::directory::Directory;
use super::{Actions, Config, Event, Party, Record, Timer, TimerKey};
use crate::journal::Incoming;

/// Chats held from a link whose sender the directory does not list yet:
/// per link, in messages and in bytes of text, and in bytes over all such
/// links, so that unregistered senders cannot fill our memory.
const MAX_HELD: usize = 1024;
const MAX_HELD_BYTES: usize = 256 * 1024;
const MAX_HELD_BYTES_TOTAL: usize = 4 * 1024 * 1024;

/// Distinct (name, key) pairs whose refused links are reported.
const MAX_KEY_WARNINGS: usize = 256;

/// What a link to us brings that is another room's business.
pub(super) enum News {
    /// A file message on a verified link, from its sender.
    File(Party, LinkMsg),
    /// The link is one we asked `name` to dial (4.8): ours to send on,
    /// once its key is checked; the inbox has let it go.
    DialedBack { name: String, key: PublicKey },
}

/// A chat message as it arrived on a link.
struct Chat {
    id: u64,
    text: String,
    direct: bool,
    sent_at: Option<u64>,
}

enum InLink {
    /// Proved `key`; its hello is due.
    AwaitHello {
        key: PublicKey,
        /// A connection its sender opened to us directly: it may say
        /// `dialed_back` (a relayed link or one we opened may not).
        direct: bool,
    },
    /// Said hello as a peer the directory does not list (yet).
    Pending {
        folded: String,
        key: PublicKey,
        instance: u64,
        held: Vec<Chat>,
    },
    Verified {
        folded: String,
        key: PublicKey,
        instance: u64,
    },
}

pub(super) struct Inbox {
    links: HashMap<LinkId, InLink>,
    /// The deadline of each link not verified yet.
    hello_deadlines: HashMap<LinkId, TimerKey>,
    /// Per sender key: its instance and the highest id shown. Kept in the
    /// store, so that a resend after either side restarted is shown once.
    seen: HashMap<PublicKey, (u64, u64)>,
    /// The (folded name, key) pairs whose refused links were reported.
    key_warnings: HashSet<(String, PublicKey)>,
    hello_timeout: Duration,
}

impl Inbox {
    pub(super) fn new(config: &Config, seen: HashMap<PublicKey, (u64, u64)>) -> Self {
        Inbox {
            links: HashMap::new(),
            hello_deadlines: HashMap::new(),
            seen,
            key_warnings: HashSet::new(),
            hello_timeout: config.hello_timeout,
        }
    }

    pub(super) fn has(&self, conn: LinkId) -> bool {
        self.links.contains_key(&conn)
    }

    /// A link to us whose session proved `key`: `direct` if its sender
    /// opened it to us (it may then be one we asked to be dialed back).
    pub(super) fn on_accept(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        direct: bool,
        now: Instant,
        actions: &mut Actions,
    ) {
        self.links.insert(conn, InLink::AwaitHello { key, direct });
        let deadline = actions.arm(now + self.hello_timeout, Timer::HelloDeadline(conn));
        self.hello_deadlines.insert(conn, deadline);
    }

    /// Forgets a link, and its hello deadline with it.
    fn unlink(&mut self, conn: LinkId, actions: &mut Actions) -> Option<InLink> {
        actions.cancel(self.hello_deadlines.remove(&conn));
        self.links.remove(&conn)
    }

    /// `conn` broke the framing rules: if it is a link to us, it is told why
    /// before it closes.
    pub(super) fn on_bad_frame(&mut self, conn: LinkId, error: &FrameError, actions: &mut Actions) {
        if self.has(conn) {
            let code = match error {
                FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                FrameError::Empty => ErrorCode::Protocol,
            };
            let frame = protocol::frame(&LinkMsg::error(code, error.to_string()));
            actions.send(conn, frame);
        }
    }

    pub(super) fn on_closed(&mut self, conn: LinkId, actions: &mut Actions) {
        self.unlink(conn, actions);
    }

    pub(super) fn on_hello_deadline(&mut self, conn: LinkId, actions: &mut Actions) {
        self.hello_deadlines.remove(&conn);
        match self.links.get(&conn) {
            Some(InLink::AwaitHello { .. }) => {
                let reason = "no hello in time".into();
                self.refuse(conn, ErrorCode::HandshakeTimeout, reason, actions);
            }
            Some(InLink::Pending { folded, .. }) => {
                let reason = format!("{folded:?} is not in the directory");
                self.refuse(conn, ErrorCode::UnknownPeer, reason, actions);
            }
            _ => {}
        }
    }

    fn refuse(&mut self, conn: LinkId, code: ErrorCode, reason: String, actions: &mut Actions) {
        tracing::warn!(%conn, %code, %reason, "refusing a link");
        self.unlink(conn, actions);
        let frame = protocol::frame(&LinkMsg::error(code, reason.clone()));
        actions.send(conn, frame);
        actions.close(conn, reason);
    }

    /// A `key_mismatch` about a link from `folded` proving `key`: said
    /// once per name and key, however often that peer retries. Someone
    /// making key after key for a pinned name is told of up to
    /// [`MAX_KEY_WARNINGS`] times, then only logged.
    fn warn_key(&mut self, folded: &str, key: PublicKey, message: String, actions: &mut Actions) {
        let room = self.key_warnings.len() < MAX_KEY_WARNINGS;
        if room && self.key_warnings.insert((folded.to_string(), key)) {
            actions.error(ErrorCode::KeyMismatch, message);
        } else {
            tracing::debug!("{message}");
        }
    }

    /// A frame on a link to us. File messages on a verified link are for
    /// the transfers room, and a link dialed back on our request is the
    /// outbox's: they come back as [`News`].
    pub(super) fn on_frame(
        &mut self,
        conn: LinkId,
        body: &[u8],
        dir: &mut Directory,
        actions: &mut Actions,
    ) -> Option<News> {
        let link = self.links.get_mut(&conn)?;
        if let InLink::AwaitHello { key, direct } = *link {
            let version_of = |m: &LinkMsg| match m {
                LinkMsg::Hello { version, .. } | LinkMsg::DialedBack { version, .. } => *version,
                _ => PROTOCOL_VERSION,
            };
            match decode_first(body, version_of) {
                Ok(LinkMsg::Hello { name, instance, .. }) => {
                    self.on_hello(conn, key, name, instance, dir, actions)
                }
                Ok(LinkMsg::DialedBack { name, .. }) if direct => {
                    self.unlink(conn, actions);
                    return Some(News::DialedBack { name, key });
                }
                Ok(_) => self.refuse(
                    conn,
                    ErrorCode::Protocol,
                    "a link starts with hello or dialed_back".into(),
                    actions,
                ),
                Err(FirstFrameError::Version(v)) => self.refuse(
                    conn,
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {v} is not supported; this peer speaks {PROTOCOL_VERSION}"),
                    actions,
                ),
                Err(FirstFrameError::Malformed(e)) => self.refuse(
                    conn,
                    ErrorCode::Protocol,
                    format!("undecodable hello: {e}"),
                    actions,
                ),
            }
            return None;
        }
        match codec::decode::<LinkMsg>(body) {
            Ok(LinkMsg::Chat {
                id,
                text,
                direct,
                sent_at,
            }) => {
                let chat = Chat {
                    id,
                    text,
                    direct,
                    sent_at,
                };
                match link {
                    InLink::Pending { held, .. } => {
                        let link_bytes: usize =
                            held.iter().map(|h| h.text.len()).sum::<usize>() + chat.text.len();
                        let over = held.len() >= MAX_HELD
                            || link_bytes > MAX_HELD_BYTES
                            || self.held_bytes() + chat.text.len() > MAX_HELD_BYTES_TOTAL;
                        if over {
                            self.refuse(
                                conn,
                                ErrorCode::UnknownPeer,
                                "too much held from a peer the directory does not list".into(),
                                actions,
                            );
                        } else if let Some(InLink::Pending { held, .. }) = self.links.get_mut(&conn)
                        {
                            held.push(chat);
                        }
                    }
                    InLink::Verified {
                        folded,
                        key,
                        instance,
                    } => {
                        let (folded, key, instance) = (folded.clone(), *key, *instance);
                        self.deliver(conn, &folded, key, instance, chat, dir, actions);
                    }
                    InLink::AwaitHello { .. } => {}
                }
            }
            Ok(
                msg @ (LinkMsg::FileOffer { .. }
                | LinkMsg::FileChunk { .. }
                | LinkMsg::FileCancel { .. }),
            ) => match link {
                InLink::Verified { folded, key, .. } => {
                    let party = Party {
                        key: *key,
                        name: dir.display_name(folded),
                    };
                    return Some(News::File(party, msg));
                }
                _ => self.refuse(
                    conn,
                    ErrorCode::UnknownPeer,
                    "files are taken only from peers the directory lists".into(),
                    actions,
                ),
            },
            Ok(LinkMsg::Error { code, reason }) => {
                tracing::warn!(%conn, %code, %reason, "error from a linked peer");
                self.unlink(conn, actions);
                actions.close(conn, format!("{code}: {reason}"));
            }
            Ok(_) => self.refuse(
                conn,
                ErrorCode::Protocol,
                "only chat and file messages are expected after hello".into(),
                actions,
            ),
            Err(e) => self.refuse(
                conn,
                ErrorCode::Protocol,
                format!("undecodable message: {e}"),
                actions,
            ),
        }
        None
    }

    /// A file message on `conn` broke the transfer rules.
    pub(super) fn refuse_protocol(&mut self, conn: LinkId, reason: String, actions: &mut Actions) {
        self.refuse(conn, ErrorCode::Protocol, reason, actions);
    }

    fn on_hello(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        name: String,
        instance: u64,
        dir: &mut Directory,
        actions: &mut Actions,
    ) {
        let name = match normalize_name(&name) {
            Ok(name) => name,
            Err(why) => return self.refuse(conn, why.code(), why.to_string(), actions),
        };
        let folded = fold_name(&name);
        if dir.is_me(&folded) {
            let reason = format!("{name:?} is this peer's own name");
            return self.refuse(conn, ErrorCode::Protocol, reason, actions);
        }
        if let Some(pinned) = dir.pinned(&folded).filter(|k| *k != key) {
            let reason =
                format!("{name} is pinned to key {pinned} in known_peers; this link proved {key}");
            self.warn_key(&folded, key, reason.clone(), actions);
            return self.refuse(conn, ErrorCode::KeyMismatch, reason, actions);
        }
        self.links.insert(
            conn,
            InLink::Pending {
                folded: folded.clone(),
                key,
                instance,
                held: Vec::new(),
            },
        );
        if dir.contains(&folded) {
            self.admit(&folded, dir, actions);
        } else {
            tracing::debug!(%name, "hello from a peer not in the directory yet; holding the link");
        }
    }

    /// Text held, over all links waiting for their sender to be listed.
    fn held_bytes(&self) -> usize {
        self.links
            .values()
            .map(|link| match link {
                InLink::Pending { held, .. } => held.iter().map(|h| h.text.len()).sum(),
                _ => 0,
            })
            .sum()
    }

    /// The senders that links wait on to be listed (folded names).
    pub(super) fn waiting(&self) -> HashSet<String> {
        self.links
            .values()
            .filter_map(|link| match link {
                InLink::Pending { folded, .. } => Some(folded.clone()),
                _ => None,
            })
            .collect()
    }

    /// The directory now lists `folded`: links that said hello under that
    /// name and proved its key are verified, and what they sent meanwhile is
    /// delivered. Links with another key are refused, unread.
    pub(super) fn admit(&mut self, folded: &str, dir: &mut Directory, actions: &mut Actions) {
        let Some(known) = dir.get(folded) else {
            return;
        };
        let (listed_key, mismatch, name) = (known.key, known.mismatch, known.name.clone());
        let waiting: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, link)| matches!(link, InLink::Pending { folded: f, .. } if f == folded))
            .map(|(c, _)| *c)
            .collect();
        for conn in waiting {
            let Some(InLink::Pending {
                instance,
                held,
                key,
                ..
            }) = self.unlink(conn, actions)
            else {
                continue;
            };
            if key != listed_key || mismatch {
                let reason = if mismatch {
                    format!("{name}'s listed key is not the one pinned in known_peers")
                } else {
                    format!("the registry lists {name} with key {listed_key}, not {key}")
                };
                self.warn_key(folded, key, reason.clone(), actions);
                self.refuse(conn, ErrorCode::KeyMismatch, reason, actions);
                continue;
            }
            dir.pin(folded, key, actions);
            let verified = InLink::Verified {
                folded: folded.to_string(),
                key,
                instance,
            };
            self.links.insert(conn, verified);
            for chat in held {
                self.deliver(conn, folded, key, instance, chat, dir, actions);
            }
        }
    }

    /// Shows a chat unless it is a resend, and acknowledges it either way:
    /// both once its record is written, so that a crash cannot show it
    /// twice or acknowledge it unseen.
    // The chat's sender in three parts, as the link knows it.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        conn: LinkId,
        folded: &str,
        key: PublicKey,
        instance: u64,
        chat: Chat,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Chat {
            id,
            text,
            direct,
            sent_at,
        } = chat;
        let seen = self.seen.entry(key).or_insert((instance, 0));
        if seen.0 != instance {
            // Another store (or, without one, another process) of the
            // sender: its ids begin again.
            *seen = (instance, 0);
        }
        if id > seen.1 {
            seen.1 = id;
            let from = dir.display_name(folded);
            if actions.keeps_records() {
                actions.record(Record::Received(Incoming {
                    from: Party {
                        key,
                        name: from.clone(),
                    },
                    instance,
                    id,
                    text: text.clone(),
                    direct,
                    sent_at,
                    received_at: actions.wall_ms(),
                }));
            }
            actions.emit(Event::Message {
                from,
                text,
                direct,
                id,
                sent_at,
            });
        }
        actions.ack_recorded(conn, id);
    }

    /// Another key holds `folded`'s name now: its links close.
    pub(super) fn forget_sender(&mut self, folded: &str, actions: &mut Actions) {
        self.close_from(folded, "the peer's key changed", actions);
    }

    /// Closes every link that said hello as `folded`.
    pub(super) fn close_from(&mut self, folded: &str, reason: &str, actions: &mut Actions) {
        let from: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, link)| match link {
                InLink::Verified { folded: f, .. } | InLink::Pending { folded: f, .. } => {
                    f == folded
                }
                InLink::AwaitHello { .. } => false,
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in from {
            self.unlink(conn, actions);
            actions.close(conn, reason);
        }
    }
}
