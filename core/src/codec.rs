//! The one place that knows which CBOR crate peerchat uses (minicbor-serde;
//! `BENCHMARKS.md` has the comparison that chose it).
//!
//! Before any body reaches serde it passes [`validate`], an iterative scan that
//! enforces what the protocol allows of CBOR: definite lengths, no tags, a
//! bounded nesting depth, and container lengths that the remaining bytes can
//! actually hold. That makes a 100,000-deep array or a 2^60-element array in a
//! 100-byte frame a cheap, typed error instead of a stack overflow or a huge
//! allocation, whatever the decoder underneath would have done.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::wire::PREFIX_LEN;

/// Deepest nesting of arrays and maps a body may have. Our deepest message
/// (an update holding a change holding its fields) needs 4.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("CBOR nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("CBOR item at byte {0} is truncated or declares more than the frame holds")]
    Truncated(usize),
    #[error("CBOR body has {0} trailing bytes after its item")]
    TrailingBytes(usize),
    #[error("CBOR feature not allowed at byte {at}: {what}")]
    Unsupported { at: usize, what: &'static str },
    #[error("CBOR does not match the message shape: {0}")]
    Shape(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// Decodes one message body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CodecError> {
    validate(body)?;
    minicbor_serde::from_slice(body).map_err(|e| CodecError::Shape(e.to_string()))
}

/// How many entries the map that `body` starts with declares; `None` when
/// it does not start with a definite-length map.
pub fn map_entries(body: &[u8]) -> Option<u64> {
    minicbor::Decoder::new(body).map().ok().flatten()
}

/// Encodes a message body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    minicbor_serde::to_vec(msg).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encodes a message as a complete frame (length prefix included) in one
/// buffer, ready to be shared by every connection it goes to.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Bytes, CodecError> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    let mut ser = minicbor_serde::Serializer::new(&mut buf);
    msg.serialize(&mut ser)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let body_len = u32::try_from(buf.len() - PREFIX_LEN)
        .map_err(|_| CodecError::Encode("body longer than 4 GiB".into()))?;
    buf[..PREFIX_LEN].copy_from_slice(&body_len.to_be_bytes());
    Ok(Bytes::from(buf))
}

/// Encodes `msg` as a frame in which its last field, an empty array when
/// `msg` is serialized, holds `items` instead: CBOR values encoded earlier
/// with [`encode`]. A registry's snapshot lists thousands of peers; copying
/// each peer's entry, encoded once when it registered, costs a fraction of
/// encoding them all again for every newcomer.
pub fn encode_frame_with_items<T: Serialize, I: AsRef<[u8]>>(
    msg: &T,
    items: &[I],
) -> Result<Bytes, CodecError> {
    let mut buf = Vec::with_capacity(128 + items.iter().map(|i| i.as_ref().len()).sum::<usize>());
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    let mut ser = minicbor_serde::Serializer::new(&mut buf);
    msg.serialize(&mut ser)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if buf.pop() != Some(EMPTY_ARRAY) {
        return Err(CodecError::Encode(
            "the message's last field is not an empty array".into(),
        ));
    }
    minicbor::Encoder::new(&mut buf)
        .array(items.len() as u64)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    for item in items {
        buf.extend_from_slice(item.as_ref());
    }
    let body_len = u32::try_from(buf.len() - PREFIX_LEN)
        .map_err(|_| CodecError::Encode("body longer than 4 GiB".into()))?;
    buf[..PREFIX_LEN].copy_from_slice(&body_len.to_be_bytes());
    Ok(Bytes::from(buf))
}

/// CBOR's encoding of `[]`.
const EMPTY_ARRAY: u8 = 0x80;

/// Checks that `body` is exactly one well-formed CBOR item of the subset the
/// protocol uses. Runs in one pass with no recursion and no allocation
/// beyond a stack of at most [`MAX_DEPTH`] counters.
pub fn validate(body: &[u8]) -> Result<(), CodecError> {
    // Items still expected in each open container (a map counts keys and
    // values separately). The top level expects exactly one item.
    let mut open: Vec<u64> = Vec::with_capacity(4);
    let mut pos = 0usize;
    let mut expected_top = 1u64;
    loop {
        match open.last_mut() {
            Some(0) => {
                open.pop();
                continue;
            }
            Some(n) => *n -= 1,
            None if expected_top == 0 => break,
            None => expected_top -= 1,
        }
        let start = pos;
        let initial = *body.get(pos).ok_or(CodecError::Truncated(start))?;
        pos += 1;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg: u64 = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let width = 1usize << (info - 24);
                let bytes = body
                    .get(pos..pos + width)
                    .ok_or(CodecError::Truncated(start))?;
                pos += width;
                bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            }
            31 => {
                return Err(CodecError::Unsupported {
                    at: start,
                    what: "indefinite-length item",
                })
            }
            _ => {
                return Err(CodecError::Unsupported {
                    at: start,
                    what: "reserved additional information",
                })
            }
        };
        let remaining = (body.len() - pos) as u64;
        match major {
            0 | 1 => {}
            2 | 3 => {
                if arg > remaining {
                    return Err(CodecError::Truncated(start));
                }
                pos += arg as usize;
            }
            4 | 5 => {
                // Every item takes at least one byte, so a container can
                // never hold more items than bytes remain.
                let items = if major == 5 {
                    arg.checked_mul(2).ok_or(CodecError::Truncated(start))?
                } else {
                    arg
                };
                if items > remaining {
                    return Err(CodecError::Truncated(start));
                }
                if open.len() == MAX_DEPTH {
                    return Err(CodecError::TooDeep);
                }
                open.push(items);
            }
            6 => {
                return Err(CodecError::Unsupported {
                    at: start,
                    what: "tag",
                })
            }
            _ => {
                // false, true, null, and f16/f32/f64 floats (their bytes
                // were consumed as the argument); no other simple value.
                if info < 24 && !(20..=22).contains(&info) || info == 24 {
                    return Err(CodecError::Unsupported {
                        at: start,
                        what: "simple value other than false, true, null",
                    });
                }
            }
        }
    }
    if pos != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - pos));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        n: u64,
        list: Vec<BTreeMap<String, i64>>,
        f: f64,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            name: "名前 ✓".into(),
            n: u64::MAX,
            list: vec![BTreeMap::from([("a".into(), -5), ("b".into(), 1 << 40)])],
            f: 1.5,
            flag: None,
        }
    }

    #[test]
    fn round_trip() {
        let body = encode(&sample()).unwrap();
        assert_eq!(validate(&body), Ok(()));
        assert_eq!(decode::<Sample>(&body).unwrap(), sample());
    }

    #[test]
    fn encode_frame_prefixes_the_body() {
        let frame = encode_frame(&sample()).unwrap();
        let body = encode(&sample()).unwrap();
        assert_eq!(&frame[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&frame[4..], &body[..]);
    }

    #[test]
    fn items_fill_the_trailing_array() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Listing {
            more: bool,
            items: Vec<String>,
        }
        let items: Vec<Bytes> = (0..30)
            .map(|i| Bytes::from(encode(&format!("item {i}")).unwrap()))
            .collect();
        let head = Listing {
            more: true,
            items: Vec::new(),
        };
        let frame = encode_frame_with_items(&head, &items).unwrap();
        let expected = Listing {
            more: true,
            items: (0..30).map(|i| format!("item {i}")).collect(),
        };
        assert_eq!(frame, encode_frame(&expected).unwrap());
        let not_last = (Vec::<u8>::new(), 1u8);
        assert!(encode_frame_with_items(&not_last, &items).is_err());
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let body = vec![0x81; 100_000]; // [[[[...
        assert_eq!(validate(&body), Err(CodecError::TooDeep));
        let ok_depth: Vec<u8> = std::iter::repeat_n(0x81, MAX_DEPTH).chain([0x00]).collect();
        assert_eq!(validate(&ok_depth), Ok(()));
    }

    #[test]
    fn huge_declared_lengths_are_rejected() {
        // An array declaring 2^60 elements, then padding to 100 bytes.
        let mut body = vec![0x9b];
        body.extend_from_slice(&(1u64 << 60).to_be_bytes());
        body.resize(100, 0);
        assert_eq!(validate(&body), Err(CodecError::Truncated(0)));
        // A map whose pair count overflows when doubled.
        let mut body = vec![0xbb];
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(validate(&body), Err(CodecError::Truncated(0)));
        // A text string longer than the body.
        assert_eq!(validate(&[0x65, b'a']), Err(CodecError::Truncated(0)));
    }

    #[test]
    fn trailing_and_unsupported_items_are_rejected() {
        assert_eq!(validate(&[0x01, 0x02]), Err(CodecError::TrailingBytes(1)));
        assert!(matches!(
            validate(&[0x9f, 0xff]),
            Err(CodecError::Unsupported { .. })
        ));
        assert!(matches!(
            validate(&[0xc1, 0x00]),
            Err(CodecError::Unsupported { .. })
        ));
        assert!(matches!(
            validate(&[0x1c]),
            Err(CodecError::Unsupported { .. })
        ));
        assert_eq!(validate(&[]), Err(CodecError::Truncated(0)));
        assert_eq!(validate(&[0xf6]), Ok(()), "null is allowed");
        assert!(
            matches!(validate(&[0xf7]), Err(CodecError::Unsupported { .. })),
            "undefined is not"
        );
    }

    #[test]
    fn wrong_shape_is_a_typed_error() {
        let body = encode(&vec![1, 2, 3]).unwrap();
        assert!(matches!(decode::<Sample>(&body), Err(CodecError::Shape(_))));
    }
}
