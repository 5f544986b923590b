//! The messages peerchat speaks, version [`PROTOCOL_VERSION`].
//!
//! Every connection is a Noise session ([`crate::secure`]); inside it, three
//! conversations share the framing of [`crate::wire`]:
//! peer → registry ([`ToRegistry`]), registry → peer ([`FromRegistry`]), and
//! peer ↔ peer over a direct link ([`LinkMsg`]). Every message is a CBOR map
//! with exactly one key, the message type, whose value is a map of fields:
//! `{"register": {"version": 2, "name": "alice", "port": 4000}}`.
//! Receivers ignore fields they do not know, so later versions can add some.
//! `PROTOCOL.md` is the normative description; this module must match it.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::identity::PublicKey;
pub use crate::names::{fold_name, name_skeleton, normalize_name, NameError, MAX_NAME_CHARS};

/// The version this build speaks. A connection's first frame carries it, and
/// the Noise prologue binds it.
pub const PROTOCOL_VERSION: u32 = 2;

/// What every connection's Noise handshake mixes in: two builds that speak
/// different versions cannot complete one.
pub fn noise_prologue() -> Vec<u8> {
    format!("peerchat protocol {PROTOCOL_VERSION}").into_bytes()
}

/// Peer → registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToRegistry {
    /// First frame on a registry connection.
    Register {
        version: u32,
        name: String,
        /// The TCP port the peer listens on for links. Signed and wide on
        /// the wire so that a bad value earns `bad_port`, not a decode error.
        port: i64,
        /// We answer `relay` invitations: the registry may carry links to
        /// us when nobody can dial us. Absent (false) from older peers.
        #[serde(default)]
        relay: bool,
        /// We answer `dial_back` requests (a reversed link, 4.8). Absent
        /// (false) from older peers.
        #[serde(default)]
        dial_back: bool,
    },
    /// First frame of a relay connection: carry a link from us (registered
    /// as `from`, under this connection's key) to `to`.
    RelayOpen {
        version: u32,
        from: String,
        to: String,
    },
    /// First frame of a relay connection: the answer to invitation `id`.
    RelayJoin {
        version: u32,
        id: u64,
    },
    Heartbeat {},
    /// Leaving for good (reason `quit` for the others).
    Leave {},
    /// On a registered connection: we cannot dial `to`, who can dial us;
    /// ask it to dial us back (a reversed link, PROTOCOL.md 4.8).
    Reverse {
        to: String,
    },
}

impl ToRegistry {
    /// The version a first frame carries (other messages carry none).
    pub fn version(&self) -> u32 {
        match self {
            ToRegistry::Register { version, .. }
            | ToRegistry::RelayOpen { version, .. }
            | ToRegistry::RelayJoin { version, .. } => *version,
            ToRegistry::Heartbeat {} | ToRegistry::Leave {} | ToRegistry::Reverse { .. } => {
                PROTOCOL_VERSION
            }
        }
    }
}

/// The most relayed bytes one frame carries on a relay connection (4.6),
/// the registry's frame limit there: with its length prefix, one frame
/// fills one Noise message.
pub const RELAY_CHUNK: usize = crate::secure::MAX_PLAINTEXT - crate::wire::PREFIX_LEN;

/// One online peer as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub name: String,
    /// `IP:PORT`, IPv6 as `[IP]:PORT`.
    pub addr: String,
    /// The static key that owns the name: a link to this peer must prove it.
    pub key: PublicKey,
    /// Whether the registry could dial `addr` back and reach this key
    /// there; absent until it tried (and from registries that do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
}

/// One change to the directory, pushed after the welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Joined {
        name: String,
        addr: String,
        key: PublicKey,
    },
    Left {
        name: String,
        reason: String,
    },
    /// The peer (the same key) reclaimed its name from a new address, or
    /// under another spelling, or the registry found whether it can be
    /// dialed there.
    Moved {
        name: String,
        addr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reachable: Option<bool>,
    },
}

/// Registry → peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromRegistry {
    Welcome {
        version: u32,
        /// The name as registered (trimmed).
        name: String,
        /// The address others will dial: observed IP, declared port.
        addr: String,
        heartbeat_ms: u64,
        timeout_ms: u64,
        /// The registry probes every registration (4.7) and passes on
        /// `reverse` (4.8). Absent (false) from older registries.
        #[serde(default)]
        probes: bool,
        /// More of the snapshot follows in `snapshot` messages.
        #[serde(default)]
        more: bool,
        /// Everyone else online, in registration order: the first part
        /// of the snapshot. Last, so that the registry can fill it with
        /// pre-encoded entries (`codec::encode_frame_with_items`).
        peers: Vec<PeerEntry>,
    },
    /// The rest of a snapshot too large for one frame, after the welcome.
    Snapshot {
        #[serde(default)]
        more: bool,
        peers: Vec<PeerEntry>,
    },
    /// Every change of one registry loop turn, in the order they happened.
    Update {
        changes: Vec<Change>,
    },
    /// Answer to a heartbeat: lets the peer notice a silent registry.
    Heartbeat {},
    Error {
        code: String,
        reason: String,
    },
    /// The registry is going away; the connection closes next.
    Shutdown {
        reason: String,
    },
    /// On a registered connection: `from` would reach us through the
    /// registry; answer with a relay connection that sends `relay_join`.
    Relay {
        id: u64,
        from: String,
    },
    /// On a relay connection: both ends are there. Every frame after this
    /// one, both ways, is relayed bytes rather than a message.
    RelayReady {},
    /// On a registered connection: `from` cannot dial us; dial it at the
    /// address the directory lists and open the link with `dialed_back`.
    DialBack {
        from: String,
    },
    /// On a registered connection: our `reverse` to `to` was not passed
    /// on, for `code`. The session goes on.
    ReverseFailed {
        to: String,
        code: String,
        reason: String,
    },
}

/// Peer ↔ peer, over a direct link. The dialer sends `Hello` first, then
/// `Chat`s; the accepting side answers each `Chat` with an `Ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMsg {
    Hello {
        version: u32,
        name: String,
        /// Random per process: lets the receiver tell a restarted sender
        /// (whose ids start again) from a resend.
        instance: u64,
    },
    /// First frame of a connection opened because the registry asked us
    /// to dial `name`'s asker back: on it, the side that accepted the
    /// connection is the link's dialer (it says `hello` and sends).
    DialedBack {
        version: u32,
        name: String,
    },
    Chat {
        id: u64,
        text: String,
        direct: bool,
        /// When the sender sent it: milliseconds since the Unix epoch by
        /// the sender's clock. Optional: absent from older senders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_at: Option<u64>,
    },
    Ack {
        id: u64,
    },
    /// Dialer → acceptor: a file the dialer would send. Said again on every
    /// new link until the transfer ends, which is how it resumes.
    FileOffer {
        /// Random, chosen by the sender: unique among its transfers, also
        /// across its restarts.
        id: u64,
        /// The sender's name for the file; the receiver sanitises it.
        name: String,
        size: u64,
        #[serde(with = "serde_bytes")]
        sha256: [u8; 32],
    },
    /// Acceptor → dialer: send the file from `offset`, the bytes the
    /// receiver already holds (0 for a new transfer).
    FileAccept {
        id: u64,
        offset: u64,
    },
    /// Dialer → acceptor: the file's bytes from `offset`, in order.
    FileChunk {
        id: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Acceptor → dialer: every byte before `offset` is written: the
    /// sender's window moves on.
    FileAck {
        id: u64,
        offset: u64,
    },
    /// Acceptor → dialer: the whole file arrived, matched its SHA-256 and
    /// is saved.
    FileDone {
        id: u64,
    },
    /// Either way: the transfer ends without the file (a refused offer
    /// included), for `code`.
    FileCancel {
        id: u64,
        code: String,
        reason: String,
    },
    Error {
        code: String,
        reason: String,
    },
}

/// Why a peer left, as a registry's `left` change says it. Clients meet
/// other reasons too (the text is open), so this is what a registry sends,
/// not all a peer may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftReason {
    /// It sent `leave`.
    Quit,
    /// It was silent past the timeout.
    Timeout,
    /// Its connection closed or broke.
    Disconnected,
    /// It did not read fast enough.
    Slow,
    /// It broke the framing or message rules.
    Protocol,
}

impl LeftReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeftReason::Quit => "quit",
            LeftReason::Timeout => "timeout",
            LeftReason::Disconnected => "disconnected",
            LeftReason::Slow => "slow",
            LeftReason::Protocol => "protocol",
        }
    }
}

impl fmt::Display for LeftReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes carried by `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NameTaken,
    BadName,
    BadPort,
    RegistryFull,
    UnsupportedVersion,
    Protocol,
    FrameTooLarge,
    HandshakeTimeout,
    UnknownPeer,
    /// A newer session of the same key took the name over.
    Replaced,
    /// A link's key is not the one the directory (or a pin) has for its name.
    KeyMismatch,
    /// The name could pass for another one: it mixes scripts that look
    /// alike, or it reads like a name that is online or reserved.
    NameConfusable,
    /// No path to the peer: it cannot be dialed and no relay reached it.
    Unreachable,
    /// This registry relays nothing (`--no-relay`), or not for this peer.
    RelayRefused,
    /// The registry's relay limits are reached.
    RelayFull,
    /// The registry cannot confirm the name with its cluster now; another
    /// try (or another registry of the cluster) may succeed.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::BadName => "bad_name",
            ErrorCode::BadPort => "bad_port",
            ErrorCode::RegistryFull => "registry_full",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Protocol => "protocol",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::Replaced => "replaced",
            ErrorCode::KeyMismatch => "key_mismatch",
            ErrorCode::NameConfusable => "name_confusable",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::RelayRefused => "relay_refused",
            ErrorCode::RelayFull => "relay_full",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromRegistry {
    pub fn error(code: ErrorCode, reason: impl Into<String>) -> Self {
        FromRegistry::Error {
            code: code.as_str().into(),
            reason: reason.into(),
        }
    }
}

impl LinkMsg {
    pub fn error(code: ErrorCode, reason: impl Into<String>) -> Self {
        LinkMsg::Error {
            code: code.as_str().into(),
            reason: reason.into(),
        }
    }
}

/// Encodes a message as a shareable frame. Our own messages always encode;
/// a failure here is a bug, so it panics with the message that caused it.
pub fn frame<T: Serialize + fmt::Debug>(msg: &T) -> Bytes {
    match codec::encode_frame(msg) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot encode {msg:?}: {e}"),
    }
}

/// Encodes a value that [`frame_with_items`] will carry, once for many
/// frames; like [`frame`], a failure is a bug.
pub fn item<T: Serialize + fmt::Debug>(value: &T) -> Bytes {
    match codec::encode(value) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => panic!("cannot encode {value:?}: {e}"),
    }
}

/// Encodes a message as a shareable frame whose last field, an empty array
/// in `msg`, holds `items` made by [`item`] (see
/// `codec::encode_frame_with_items`); like [`frame`], a failure is a bug.
pub fn frame_with_items<T: Serialize + fmt::Debug, I: AsRef<[u8]>>(msg: &T, items: &[I]) -> Bytes {
    match codec::encode_frame_with_items(msg, items) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot encode {msg:?} with {} items: {e}", items.len()),
    }
}

/// How many changes an encoded `update` body carries, read from its array
/// header without decoding them; `None` for any other message. Written by
/// hand for load tools, which count deliveries at rates where decoding
/// every frame would cost more than what they measure.
pub fn update_change_count(body: &[u8]) -> Option<u64> {
    static PREFIX: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let mut empty = codec::encode(&FromRegistry::Update { changes: vec![] })
            .unwrap_or_else(|e| panic!("cannot encode an empty update: {e}"));
        // The empty `changes` array's header.
        empty.pop();
        empty
    });
    let rest = body.strip_prefix(prefix.as_slice())?;
    let (&head, rest) = rest.split_first()?;
    // A CBOR array header: the length in the header byte, or in the 1, 2
    // or 4 bytes after it.
    match head {
        0x80..=0x97 => Some(u64::from(head - 0x80)),
        0x98 => rest.first().map(|&b| u64::from(b)),
        0x99 => rest
            .get(..2)
            .map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
        0x9a => rest
            .get(..4)
            .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        _ => None,
    }
}

/// Why a first frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstFrameError {
    /// It carried a version we do not speak.
    Version(u32),
    /// It was not a message of the expected kind at all.
    Malformed(CodecError),
}

/// Decodes the first frame of a connection. When it does not decode as the
/// expected type, looks for a `version` field in the single-key map anyway,
/// so that a client of another version is told `unsupported_version` rather
/// than `protocol`.
pub fn decode_first<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    version_of: impl Fn(&T) -> u32,
) -> Result<T, FirstFrameError> {
    match codec::decode::<T>(body) {
        Ok(msg) if version_of(&msg) == PROTOCOL_VERSION => Ok(msg),
        Ok(msg) => Err(FirstFrameError::Version(version_of(&msg))),
        // A map of one entry only: decoded into a map, a repeated message
        // key would fold into one entry.
        Err(err) if codec::map_entries(body) != Some(1) => Err(FirstFrameError::Malformed(err)),
        Err(err) => match codec::decode::<std::collections::BTreeMap<String, VersionOnly>>(body) {
            Ok(map) => match map.values().next() {
                Some(v) if map.len() == 1 && v.version != PROTOCOL_VERSION => {
                    Err(FirstFrameError::Version(v.version))
                }
                _ => Err(FirstFrameError::Malformed(err)),
            },
            Err(_) => Err(FirstFrameError::Malformed(err)),
        },
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_is_counted_from_its_header_as_the_codec_encodes_it() {
        for count in [0usize, 1, 23, 24, 255, 256, 65_535, 65_536] {
            let changes = changes_only(count);
            let body = codec::encode(&FromRegistry::Update { changes }).unwrap();
            assert_eq!(update_change_count(&body), Some(count as u64), "{count}");
            // Cut after the header's first byte: only a count under 24 is
            // whole there.
            let cut = &body[..body.len() - codec::encode(&changes_only(count)).unwrap().len() + 1];
            let whole = (count < 24).then_some(count as u64);
            assert_eq!(update_change_count(cut), whole, "{count}, cut");
        }
        let heartbeat = codec::encode(&FromRegistry::Heartbeat {}).unwrap();
        assert_eq!(update_change_count(&heartbeat), None);
        assert_eq!(update_change_count(&[]), None);
    }

    /// The `changes` array of `count` changes alone, as the codec encodes it.
    fn changes_only(count: usize) -> Vec<Change> {
        (0..count)
            .map(|i| Change::Left {
                name: format!("n{i}"),
                reason: "quit".into(),
            })
            .collect()
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            LinkMsg::Hello {
                version: 2,
                name: "张伟".into(),
                instance: 42,
            },
            LinkMsg::Chat {
                id: 7,
                text: "hi \"there\" \\ 🎉".into(),
                direct: true,
                sent_at: Some(1_796_000_000_000),
            },
            LinkMsg::Ack { id: 7 },
            LinkMsg::DialedBack {
                version: 2,
                name: "bob".into(),
            },
            LinkMsg::FileOffer {
                id: u64::MAX,
                name: "report.pdf".into(),
                size: 1 << 40,
                sha256: [7; 32],
            },
            LinkMsg::FileAccept { id: 1, offset: 5 },
            LinkMsg::FileChunk {
                id: 1,
                offset: 5,
                data: vec![0, 1, 2, 255],
            },
            LinkMsg::FileAck { id: 1, offset: 9 },
            LinkMsg::FileDone { id: 1 },
            LinkMsg::FileCancel {
                id: 1,
                code: "rejected".into(),
                reason: "no thanks".into(),
            },
            LinkMsg::error(ErrorCode::UnknownPeer, "who?"),
        ];
        for msg in msgs {
            let body = codec::encode(&msg).unwrap();
            assert_eq!(codec::decode::<LinkMsg>(&body).unwrap(), msg);
        }
        let welcome = FromRegistry::Welcome {
            version: 2,
            name: "a".into(),
            addr: "[::1]:5".into(),
            heartbeat_ms: 5000,
            timeout_ms: 15000,
            probes: true,
            more: false,
            peers: vec![PeerEntry {
                name: "b".into(),
                addr: "127.0.0.1:9".into(),
                key: crate::identity::Identity::generate().public(),
                reachable: None,
            }],
        };
        let body = codec::encode(&welcome).unwrap();
        assert_eq!(codec::decode::<FromRegistry>(&body).unwrap(), welcome);
        for msg in [
            FromRegistry::DialBack {
                from: "alice".into(),
            },
            FromRegistry::ReverseFailed {
                to: "bob".into(),
                code: "unreachable".into(),
                reason: "no".into(),
            },
        ] {
            let body = codec::encode(&msg).unwrap();
            assert_eq!(codec::decode::<FromRegistry>(&body).unwrap(), msg);
        }
        let reverse = ToRegistry::Reverse { to: "bob".into() };
        let body = codec::encode(&reverse).unwrap();
        assert_eq!(codec::decode::<ToRegistry>(&body).unwrap(), reverse);
    }

    #[test]
    fn file_data_and_digests_are_byte_strings_of_their_length() {
        let chunk = LinkMsg::FileChunk {
            id: 1,
            offset: 0,
            data: vec![0xff; 3],
        };
        let body = codec::encode(&chunk).unwrap();
        // ... "data", then a byte string (major type 2) of 3 bytes.
        assert!(body.ends_with(&[0x64, b'd', b'a', b't', b'a', 0x43, 0xff, 0xff, 0xff]));
        #[derive(Serialize)]
        struct Offer {
            file_offer: Fields,
        }
        #[derive(Serialize)]
        struct Fields {
            id: u64,
            name: &'static str,
            size: u64,
            #[serde(with = "serde_bytes")]
            sha256: Vec<u8>,
        }
        let offer = |len| {
            codec::encode(&Offer {
                file_offer: Fields {
                    id: 1,
                    name: "a",
                    size: 1,
                    sha256: vec![0; len],
                },
            })
            .unwrap()
        };
        assert!(codec::decode::<LinkMsg>(&offer(32)).is_ok());
        assert!(codec::decode::<LinkMsg>(&offer(31)).is_err());
        assert!(codec::decode::<LinkMsg>(&offer(33)).is_err());
    }

    #[test]
    fn wire_shape_is_a_single_key_map() {
        let body = codec::encode(&ToRegistry::Heartbeat {}).unwrap();
        // {"heartbeat": {}}
        assert_eq!(
            body,
            [0xa1, 0x69, b'h', b'e', b'a', b'r', b't', b'b', b'e', b'a', b't', 0xa0]
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_types_rejected() {
        #[derive(Serialize)]
        struct Future {
            heartbeat: std::collections::BTreeMap<&'static str, u8>,
        }
        let body = codec::encode(&Future {
            heartbeat: [("extra", 1)].into(),
        })
        .unwrap();
        assert_eq!(
            codec::decode::<ToRegistry>(&body).unwrap(),
            ToRegistry::Heartbeat {}
        );
        #[derive(Serialize)]
        struct Unknown {
            teleport: std::collections::BTreeMap<&'static str, u8>,
        }
        let body = codec::encode(&Unknown {
            teleport: Default::default(),
        })
        .unwrap();
        assert!(codec::decode::<ToRegistry>(&body).is_err());
    }

    #[test]
    fn first_frame_reports_foreign_versions() {
        let version_of = |m: &ToRegistry| match m {
            ToRegistry::Register { version, .. } => *version,
            _ => PROTOCOL_VERSION,
        };
        let reg = |version| ToRegistry::Register {
            version,
            name: "a".into(),
            port: 1,
            relay: true,
            dial_back: true,
        };
        let body = codec::encode(&reg(2)).unwrap();
        assert!(decode_first(&body, version_of).is_ok());
        let body = codec::encode(&reg(9)).unwrap();
        assert_eq!(
            decode_first(&body, version_of),
            Err(FirstFrameError::Version(9))
        );
        #[derive(Serialize)]
        struct V3 {
            register: std::collections::BTreeMap<&'static str, u32>,
        }
        let body = codec::encode(&V3 {
            register: [("version", 3)].into(),
        })
        .unwrap();
        assert_eq!(
            decode_first(&body, version_of),
            Err(FirstFrameError::Version(3))
        );
        assert!(matches!(
            decode_first(&[0x01], version_of),
            Err(FirstFrameError::Malformed(_))
        ));
        // {"register": {"version": 3}, "register": {"version": 3}}: two
        // entries are `protocol`, even with the same key.
        let mut twice = vec![0xa2];
        for _ in 0..2 {
            twice.extend_from_slice(&body[1..]);
        }
        assert!(matches!(
            decode_first(&twice, version_of),
            Err(FirstFrameError::Malformed(_))
        ));
    }
}
