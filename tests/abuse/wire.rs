//! Bytes on the wire, built by hand: CBOR heads and messages the codec
//! would never write, frames with lying prefixes, and the changes a control
//! client expects.

use std::io::Write;
use std::thread;
use std::time::Duration;

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{Change, ToRegistry, PROTOCOL_VERSION};
use peerchat_testkit::client::Secure;

/// A CBOR head: major type and argument, in the shortest form.
pub fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    let mut out = Vec::with_capacity(9);
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes());
        }
    }
    out
}

pub fn cbor_text_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = head(3, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

pub fn cbor_text(s: &str) -> Vec<u8> {
    cbor_text_bytes(s.as_bytes())
}

pub fn cbor_uint(n: u64) -> Vec<u8> {
    head(0, n)
}

pub fn cbor_map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = head(5, entries.len() as u64);
    for (key, value) in entries {
        out.extend(cbor_text(key));
        out.extend_from_slice(value);
    }
    out
}

/// `{kind: {fields…}}`, the shape of every message.
pub fn cbor_msg(kind: &str, fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    cbor_map(&[(kind, cbor_map(fields))])
}

/// Length prefix plus body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A length prefix that claims `len` bytes, followed by `body`.
pub fn claimed(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

pub fn heartbeat_frame() -> Vec<u8> {
    codec::encode_frame(&ToRegistry::Heartbeat {})
        .unwrap()
        .to_vec()
}

pub fn leave_frame() -> Vec<u8> {
    codec::encode_frame(&ToRegistry::Leave {}).unwrap().to_vec()
}

/// A register body with a name given as raw text-string bytes.
pub fn register_raw_name(name: &[u8], port: u64) -> Vec<u8> {
    frame(&cbor_msg(
        "register",
        &[
            ("version", cbor_uint(PROTOCOL_VERSION.into())),
            ("name", cbor_text_bytes(name)),
            ("port", cbor_uint(port)),
        ],
    ))
}

/// 100 bytes: an array that declares 2^60 items.
pub fn huge_array_body() -> Vec<u8> {
    let mut body = head(4, 1 << 60);
    body.resize(100, 0);
    body
}

/// 100 bytes: a register message whose value is a map of 2^60 entries.
pub fn huge_map_in_register_body() -> Vec<u8> {
    let mut body = head(5, 1);
    body.extend(cbor_text("register"));
    body.extend(head(5, 1 << 60));
    body.resize(100, 0);
    body
}

/// `n` bytes of 0x81: an array holding an array holding an array…
pub fn nested_arrays(n: usize) -> Vec<u8> {
    vec![0x81; n]
}

/// Sends frame-stream bytes one per Noise message, and those messages one
/// wire byte per write, each flushed on its own (TCP_NODELAY): both the
/// frame decoder and the Noise reassembly get the smallest pieces there are.
pub fn dribble(s: &mut Secure, bytes: &[u8]) {
    s.get_ref().set_nodelay(true).unwrap();
    s.get_ref()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for b in bytes {
        let wire = s.seal(std::slice::from_ref(b)).unwrap();
        for w in &wire {
            s.get_mut().write_all(std::slice::from_ref(w)).unwrap();
        }
        thread::sleep(Duration::from_millis(1));
    }
}

pub fn joined(name: &str, port: i64, key: PublicKey) -> Change {
    Change::Joined {
        name: name.into(),
        addr: format!("127.0.0.1:{port}"),
        key,
    }
}

pub fn left(name: &str, reason: &str) -> Change {
    Change::Left {
        name: name.into(),
        reason: reason.into(),
    }
}

pub fn change_name(c: &Change) -> &str {
    match c {
        Change::Joined { name, .. } | Change::Left { name, .. } | Change::Moved { name, .. } => {
            name
        }
    }
}
