// Each fuzz target uses one of these checks; the replay test uses all.
#![allow(dead_code)]

//! The properties the fuzz targets check. Shared, through `#[path]`, by the
//! cargo-fuzz targets and by the corpus replay in `tests/fuzz_corpus.rs`, so
//! that an ordinary `cargo test` exercises the same code on stable.

use std::fmt::Debug;

use peerchat_core::codec;
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
