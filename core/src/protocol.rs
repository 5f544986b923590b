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

/// The version this build speaks. A connection's first frame carries it, and
/// the Noise prologue binds it.
pub const PROTOCOL_VERSION: u32 = 2;

/// Longest peer name, in Unicode scalar values after trimming.
pub const MAX_NAME_CHARS: usize = 32;

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
    },
    Heartbeat {},
    /// Leaving for good (reason `quit` for the others).
    Leave {},
}

/// One online peer as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub name: String,
    /// `IP:PORT`, IPv6 as `[IP]:PORT`.
    pub addr: String,
    /// The static key that owns the name: a link to this peer must prove it.
    pub key: PublicKey,
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
    /// The peer (the same key) reclaimed its name from a new address.
    Moved {
        name: String,
        addr: String,
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
    Chat {
        id: u64,
        text: String,
        direct: bool,
    },
    Ack {
        id: u64,
    },
    Error {
        code: String,
        reason: String,
    },
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

/// Normalises a requested name: trims surrounding whitespace and checks the
/// rules (1–32 scalar values, no whitespace or control characters inside).
pub fn normalize_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    let chars = name.chars().count();
    if chars == 0 {
        return Err("the name is empty".into());
    }
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "the name has {chars} characters; at most {MAX_NAME_CHARS} are allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the name contains {c:?}; whitespace and control characters are not allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(format!(
            "the name contains {c:?}, an invisible character (a name could hide behind it)"
        ));
    }
    if name.chars().all(is_joiner_or_selector) {
        return Err("the name has nothing to see: only joiners or variation selectors".into());
    }
    Ok(name.to_string())
}

/// Characters that show nothing: Unicode's default-ignorable code points
/// (direction overrides, zero-width spaces, fillers, tags and the like),
/// which could make one name pass for another, and the interlinear
/// annotation marks. The joiners and variation selectors that scripts and
/// emoji need stay allowed ([`is_joiner_or_selector`]); [`fold_name`]
/// ignores them instead, so they cannot tell names apart.
fn is_invisible(c: char) -> bool {
    !is_joiner_or_selector(c)
        && matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}'
            | '\u{17B5}' | '\u{180E}' | '\u{200B}' | '\u{200E}' | '\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FEFF}'
            | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Allowed in names, but not what tells one name from another: the
/// joiners U+200C and U+200D, and the variation selectors (emoji, CJK
/// ideograph variants, Mongolian free variation selectors).
fn is_joiner_or_selector(c: char) -> bool {
    matches!(c,
        '\u{200C}' | '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{180B}'..='\u{180D}'
        | '\u{180F}' | '\u{E0100}'..='\u{E01EF}')
}

/// The form two names are compared in: each character lower-cased on its
/// own by Unicode's rules (so `Alice` and `alice` are one name), without
/// the joiners and variation selectors that do not change how a name reads.
pub fn fold_name(name: &str) -> String {
    name.chars()
        .filter(|c| !is_joiner_or_selector(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            },
            LinkMsg::Ack { id: 7 },
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
            more: false,
            peers: vec![PeerEntry {
                name: "b".into(),
                addr: "127.0.0.1:9".into(),
                key: crate::identity::Identity::generate().public(),
            }],
        };
        let body = codec::encode(&welcome).unwrap();
        assert_eq!(codec::decode::<FromRegistry>(&body).unwrap(), welcome);
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
    }

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(normalize_name("  alice \n").unwrap(), "alice");
        assert_eq!(normalize_name("张伟").unwrap(), "张伟");
        assert!(normalize_name("   ").is_err());
        assert!(normalize_name("a b").is_err());
        assert!(normalize_name("a\u{7}b").is_err());
        assert!(normalize_name(&"x".repeat(32)).is_ok());
        assert!(normalize_name(&"x".repeat(33)).is_err());
        assert!(
            normalize_name(&"é".repeat(32)).is_ok(),
            "counts characters, not bytes"
        );
        assert_eq!(fold_name("ALICE"), fold_name("alice"));
    }

    #[test]
    fn names_cannot_hide_behind_invisible_characters() {
        for hidden in [
            "ali\u{202E}ce",
            "\u{200B}alice",
            "al\u{AD}ice",
            "a\u{2066}b\u{2069}",
            "\u{FEFF}x",
            "alice\u{3164}",
            "\u{115F}alice",
            "alice\u{034F}",
            "alice\u{E0020}",
        ] {
            let err = normalize_name(hidden).unwrap_err();
            assert!(err.contains("invisible"), "{hidden:?}: {err}");
        }
        // Joiners and selectors that scripts and emoji need stay allowed,
        // but do not make another name.
        assert!(normalize_name("\u{1F468}\u{200D}\u{1F469}").is_ok());
        assert!(normalize_name("\u{645}\u{200C}\u{6CC}").is_ok());
        assert!(normalize_name("\u{2764}\u{FE0F}").is_ok());
        for lookalike in [
            "alice\u{200D}",
            "\u{200C}alice",
            "alice\u{FE0F}",
            "AL\u{200D}ICE",
        ] {
            assert_eq!(fold_name(lookalike), fold_name("alice"), "{lookalike:?}");
        }
        assert!(
            normalize_name("\u{8FBB}\u{E0100}").is_ok(),
            "an ideograph variant"
        );
        for nothing in ["\u{200D}", "\u{FE0F}", "\u{200C}\u{200D}"] {
            let err = normalize_name(nothing).unwrap_err();
            assert!(err.contains("nothing to see"), "{nothing:?}: {err}");
        }
    }

    #[test]
    fn folding_lower_cases_each_character_on_its_own() {
        assert_eq!(fold_name("ΟΔΟΣ"), "οδοσ", "no final sigma");
        assert_eq!(fold_name("ẞ"), fold_name("ß"));
        assert_ne!(
            fold_name("ﬀ"),
            fold_name("FF"),
            "lower-casing, not case folding"
        );
    }
}
