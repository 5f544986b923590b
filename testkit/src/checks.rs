//! The properties the fuzz targets check. Shared by the cargo-fuzz targets
//! and by the corpus replay in `tests/fuzz_corpus.rs`, so that an ordinary
//! `cargo test` exercises the same code on stable.

use std::fmt::Debug;
use std::sync::OnceLock;

use peerchat_core::codec;
use peerchat_core::file_name::{safe_file_name, MAX_NAME_BYTES};
use peerchat_core::identity::Identity;
use peerchat_core::secure::{self, SecureChannel, LEN_PREFIX, MAX_HANDSHAKE_MESSAGE};
use peerchat_core::wire::{FrameDecoder, FrameError, PREFIX_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Frame limit used while fuzzing: small, so oversize paths are reached.
const MAX_FRAME: usize = 1024;

fn frames(dec: &mut FrameDecoder, out: &mut Vec<Vec<u8>>) -> Option<FrameError> {
    loop {
        match dec.next_frame() {
            Ok(Some(frame)) => out.push(frame.to_vec()),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// The first byte picks a chunk size; the rest is a byte stream. Fed whole
/// or in chunks, the decoder must yield the same frames and the same error,
/// never panic, and never hold more than one frame's worth of bytes plus
/// the chunk it was just given.
pub fn frame_decoder(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 32) + 1;
    let mut whole = FrameDecoder::new(MAX_FRAME);
    whole.push(stream);
    let mut expected = Vec::new();
    let expected_err = frames(&mut whole, &mut expected);

    let mut pieces = FrameDecoder::new(MAX_FRAME);
    let mut got = Vec::new();
    let mut got_err = None;
    for piece in stream.chunks(chunk) {
        pieces.push(piece);
        assert!(pieces.buffered() <= PREFIX_LEN + MAX_FRAME + chunk);
        if let Some(err) = frames(&mut pieces, &mut got) {
            got_err = Some(err);
            break;
        }
    }
    assert_eq!(got, expected);
    assert_eq!(got_err, expected_err);
    for frame in &got {
        assert!(!frame.is_empty() && frame.len() <= MAX_FRAME);
    }
}

/// Decoding arbitrary bytes never panics. Whatever decodes re-encodes, and
/// our own encoding is canonical: it decodes to the same message and
/// encodes to the same bytes again.
pub fn message<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) {
    let Ok(msg) = codec::decode::<T>(data) else {
        return;
    };
    let encoded = codec::encode(&msg).expect("a decoded message encodes");
    let back: T = codec::decode(&encoded).expect("our own encoding decodes");
    assert_eq!(back, msg);
    assert_eq!(codec::encode(&back).expect("encodes"), encoded);
}

/// The XX reply a responder sends to a dialer's first message: its length
/// prefix, an ephemeral key, its encrypted static key and an empty payload.
const SECOND_MESSAGE: usize = LEN_PREFIX + 32 + (32 + 16) + 16;

/// Fixed keys, so that a failing input replays the same way (the ephemeral
/// keys still differ from run to run; no check depends on them).
fn keys() -> &'static (Identity, Identity) {
    static KEYS: OnceLock<(Identity, Identity)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            Identity::from_private(&[1; 32]),
            Identity::from_private(&[2; 32]),
        )
    })
}

/// The Noise responder every accepting side runs (registry, peer links),
/// fed hostile bytes. The first byte picks how the wire is split (its low
/// six bits: pieces of 1-64 bytes) and a mode (its top two bits):
///
/// - 0: the rest arrives as it is, from a stranger.
/// - 1: a real dialer's first message arrives, then the rest as it is.
///
///   Errors are fine, panics are not. Arbitrary bytes cannot complete the
///   handshake (that takes the responder's ephemeral secret), so no
///   plaintext comes out, nothing but one XX reply goes back, at most one
///   handshake message is held, and after an error nothing more happens.
///
/// - 2: a real dialer completes the handshake and seals the rest (after a
///   byte that sets how much goes in each Noise message) as frame-stream
///   bytes: exactly those bytes come out, however the wire is split.
/// - 3: as 2, with one byte of the sealed wire flipped (the two bytes after
///   the size byte pick which): what comes out is exactly the plaintext of
///   the messages before the damaged one, and then the session fails or
///   waits for bytes that never come.
pub fn noise_responder(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(pick & 0x3f) + 1;
    match pick >> 6 {
        0 => stranger(&[], rest, piece),
        1 => {
            let mut first = Vec::new();
            SecureChannel::initiator(
                &keys().0,
                &peerchat_core::protocol::noise_prologue(),
                &mut first,
            );
            stranger(&first, rest, piece);
        }
        mode => sealed(rest, piece, mode == 3),
    }
}

/// Mode 0 and 1 of [`noise_responder`]: `prefix`, then `rest`, in pieces.
fn stranger(prefix: &[u8], rest: &[u8], piece: usize) {
    let mut responder =
        SecureChannel::responder(&keys().1, &peerchat_core::protocol::noise_prologue());
    let mut scratch = secure::scratch();
    let mut replies = Vec::new();
    let mut failed = false;
    let wire: Vec<u8> = prefix.iter().chain(rest).copied().collect();
    for chunk in wire.chunks(piece) {
        let before = replies.len();
        let result = responder.receive(chunk, &mut scratch, &mut replies, &mut |plain| {
            panic!("{} bytes of plaintext from a stranger", plain.len())
        });
        assert!(
            !responder.is_established(),
            "a stranger completed a handshake"
        );
        assert_eq!(responder.remote_key(), None);
        match result {
            Ok(completed) => assert!(!completed, "a stranger completed a handshake"),
            Err(_) => failed = true,
        }
        if failed {
            // Dead for good: nothing goes out once a session has failed.
            assert!(
                result.is_err() || replies.len() == before,
                "a failed session answered"
            );
        } else {
            assert!(responder.buffered() <= LEN_PREFIX + MAX_HANDSHAKE_MESSAGE);
        }
        assert!(
            replies.len() <= SECOND_MESSAGE,
            "{} bytes of replies",
            replies.len()
        );
    }
    if !prefix.is_empty() {
        // A real dialer's first message always draws the reply, whatever
        // follows it.
        assert_eq!(replies.len(), SECOND_MESSAGE);
    }
}

/// A handshake through memory: (dialer, listener), both established.
fn handshake(scratch: &mut [u8]) -> (SecureChannel, SecureChannel) {
    let (a, b) = keys();
    let mut to_b = Vec::new();
    let mut dialer =
        SecureChannel::initiator(a, &peerchat_core::protocol::noise_prologue(), &mut to_b);
    let mut listener = SecureChannel::responder(b, &peerchat_core::protocol::noise_prologue());
    let mut to_a = Vec::new();
    let mut no_plain = |_: &[u8]| panic!("plaintext during a handshake");
    assert!(!listener
        .receive(&to_b, scratch, &mut to_a, &mut no_plain)
        .unwrap());
    to_b.clear();
    assert!(dialer
        .receive(&to_a, scratch, &mut to_b, &mut no_plain)
        .unwrap());
    let mut none = Vec::new();
    assert!(listener
        .receive(&to_b, scratch, &mut none, &mut no_plain)
        .unwrap());
    assert!(none.is_empty());
    assert_eq!(listener.remote_key(), Some(a.public()));
    assert_eq!(dialer.remote_key(), Some(b.public()));
    (dialer, listener)
}

/// Modes 2 and 3 of [`noise_responder`].
fn sealed(data: &[u8], piece: usize, flip: bool) {
    let (size, data) = match data.split_first() {
        Some((&size, data)) => (usize::from(size) * 3 + 1, data),
        None => return,
    };
    let (at, plain) = match (flip, data) {
        (true, [hi, lo, plain @ ..]) => (Some(usize::from(u16::from_be_bytes([*hi, *lo]))), plain),
        (true, _) => return,
        (false, plain) => (None, plain),
    };
    let mut scratch = secure::scratch();
    let (mut dialer, mut listener) = handshake(&mut scratch);
    // One Noise message per `size` bytes; `ends[k]` is where message k
    // ends on the wire.
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    for chunk in plain.chunks(size) {
        dialer.seal(chunk, &mut wire).unwrap();
        ends.push(wire.len());
    }
    let expected = match at {
        None => plain.len(),
        Some(_) if wire.is_empty() => return,
        Some(at) => {
            let at = at % wire.len();
            wire[at] ^= 0x5a;
            // The damaged message and all after it are lost.
            let damaged = ends.iter().position(|&end| at < end).unwrap();
            (damaged * size).min(plain.len())
        }
    };
    let mut got = Vec::new();
    let mut replies = Vec::new();
    let mut failed = false;
    for chunk in wire.chunks(piece) {
        let result = listener.receive(chunk, &mut scratch, &mut replies, &mut |p| {
            got.extend_from_slice(p)
        });
        assert!(replies.is_empty(), "replies in an established session");
        match result {
            Ok(completed) => assert!(!completed),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert_eq!(got.len(), expected, "plaintext out of a damaged stream");
    assert_eq!(got, plain[..expected]);
    if at.is_some() {
        assert!(
            failed || listener.buffered() > 0,
            "a damaged stream went through unnoticed"
        );
    } else {
        assert!(!failed && listener.buffered() == 0);
    }
}

/// Whatever name a sender offers (any bytes, read as UTF-8 with
/// replacement), the name a file is saved under stays one harmless name in
/// the directory the receiver chose: no separator, not hidden (so neither
/// `.` nor `..`), no control or invisible character, within the length,
/// not empty, and safe already (making it safe again changes nothing).
pub fn file_name(data: &[u8]) {
    let offered = String::from_utf8_lossy(data);
    let safe = safe_file_name(&offered);
    assert!(!safe.is_empty() && safe.len() <= MAX_NAME_BYTES, "{safe:?}");
    assert!(!safe.contains(['/', '\\']), "{safe:?}");
    assert!(!safe.starts_with('.') && safe != "..", "{safe:?}");
    assert!(!safe.chars().any(char::is_control), "{safe:?}");
    // Also: an invisible character left would be replaced again.
    assert_eq!(safe_file_name(&safe), safe, "safe names stay as they are");
}
