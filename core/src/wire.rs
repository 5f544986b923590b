//! Framing: every message on a peerchat TCP stream is a `u32` big-endian
//! length followed by that many bytes of CBOR body.
//!
//! [`FrameDecoder`] is sans-IO: bytes go in as they arrive, in any split or
//! coalesced, and whole frame bodies come out. The length prefix is checked
//! against the maximum before a single byte of the body is buffered, so a
//! hostile prefix (0xFFFFFFFF) costs nothing. A decoder holds no buffer while
//! it sits between frames, which keeps idle connections small.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Default maximum body size of one frame.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Why a byte stream stopped being a valid frame stream. Once returned, the
/// decoder is poisoned: the stream has no recoverable frame boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame (length 0): every frame carries a CBOR message")]
    Empty,
}

/// Incremental frame decoder. Feed it with [`FrameDecoder::push`], then take
/// frames with [`FrameDecoder::next_frame`] until it yields `Ok(None)`.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    /// Unconsumed bytes: a partial prefix, a partial body, or several
    /// frames pushed at once. Empty (and unallocated) between frames.
    buf: BytesMut,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            buf: BytesMut::new(),
            failed: None,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit for frames not yet started; a registry raises it
    /// once a connection has registered.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes held for frames not yet complete.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame body, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if self.buf.len() < PREFIX_LEN {
            self.release_if_empty();
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let verdict = if len == 0 {
            Err(FrameError::Empty)
        } else if len > self.max_frame {
            Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            })
        } else {
            Ok(())
        };
        if let Err(err) = verdict {
            self.failed = Some(err.clone());
            self.buf = BytesMut::new();
            return Err(err);
        }
        if self.buf.len() < PREFIX_LEN + len {
            // Reserve the whole frame once so a body arriving in many reads
            // does not reallocate each time; `len` is already bounded.
            self.buf.reserve(PREFIX_LEN + len - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(PREFIX_LEN + len);
        let body = frame.split_off(PREFIX_LEN).freeze();
        self.release_if_empty();
        Ok(Some(body))
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

/// Prefixes `body` with its length. The result is what goes on the wire and
/// can be shared, unchanged, by every connection it is sent to.
pub fn encode_frame(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream_of(bodies: &[Vec<u8>]) -> Vec<u8> {
        bodies
            .iter()
            .flat_map(|b| encode_frame(b).to_vec())
            .collect()
    }

    fn decode_all(dec: &mut FrameDecoder) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(frame) = dec.next_frame().expect("valid stream") {
            out.push(frame.to_vec());
        }
        out
    }

    #[test]
    fn one_byte_at_a_time() {
        let bodies = vec![b"hello".to_vec(), vec![7; 300], b"x".to_vec()];
        let stream = stream_of(&bodies);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for byte in stream {
            dec.push(&[byte]);
            got.extend(decode_all(&mut dec));
        }
        assert_eq!(got, bodies);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn hundred_frames_in_one_push() {
        let bodies: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; i as usize + 1]).collect();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&stream_of(&bodies));
        assert_eq!(decode_all(&mut dec), bodies);
    }

    #[test]
    fn huge_prefix_is_rejected_without_buffering() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3]);
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        assert_eq!(dec.buf.capacity(), 0, "nothing may be reserved for it");
        dec.push(&[0; 16]);
        assert!(dec.next_frame().is_err(), "a failed stream stays failed");
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn limit_is_inclusive_and_adjustable() {
        let mut dec = FrameDecoder::new(8);
        dec.push(&encode_frame(&[1; 8]));
        assert_eq!(dec.next_frame().unwrap().unwrap().len(), 8);
        dec.set_max_frame(4);
        dec.push(&encode_frame(&[1; 5]));
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::TooLarge { len: 5, max: 4 })
        ));
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&[0, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Err(FrameError::Empty));
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_frames(
            bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 0..40),
            cuts in prop::collection::vec(0usize..10_000, 0..60),
        ) {
            let stream = stream_of(&bodies);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for pair in cuts.windows(2) {
                dec.push(&stream[pair[0]..pair[1]]);
                got.extend(decode_all(&mut dec));
            }
            prop_assert_eq!(got, bodies);
            prop_assert_eq!(dec.buffered(), 0);
        }
    }
}
