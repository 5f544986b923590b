//! Wire helpers: non-blocking reads and writes, Noise sessions driven by
//! hand over mio sockets, and byte patterns that classify frames without
//! decoding them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Poll};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::SecureChannel;
use peerchat_core::wire::FrameDecoder;

use crate::{TEXT, WAIT};

pub fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) {
    loop {
        match poll.poll(events, Some(timeout)) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("poll failed: {e}"),
        }
    }
}

/// Reads what a readable socket holds, handing each chunk to `sink`.
/// Returns false at end of stream. A short read ends the drain: with
/// edge-triggered epoll on Linux every later arrival raises a new event, so
/// the extra read that would only return `WouldBlock` is skipped. The floor
/// reads the same way.
pub fn read_into(stream: &mut TcpStream, scratch: &mut [u8], mut sink: impl FnMut(&[u8])) -> bool {
    loop {
        match stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => {
                sink(&scratch[..n]);
                if n < scratch.len() {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return false,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Writes a few bytes to a non-blocking socket whose send buffer is empty.
pub fn write_small(stream: &mut TcpStream, bytes: &[u8]) {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => {}
        other => panic!(
            "a {}-byte write did not go out whole: {other:?}",
            bytes.len()
        ),
    }
}

/// Seals frame-stream bytes into what goes on the wire.
pub fn sealed(channel: &mut SecureChannel, plain: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    channel
        .seal(plain, &mut wire)
        .expect("an open session seals");
    wire
}

/// Feeds bytes read off a secured connection to its session: plaintext
/// into `dec`, handshake replies (if any) onto `replies`. A failed session
/// fails the bench.
pub fn open_into(
    channel: &mut SecureChannel,
    bytes: &[u8],
    open: &mut [u8],
    replies: &mut Vec<u8>,
    dec: &mut FrameDecoder,
) {
    if let Err(e) = channel.receive(bytes, open, replies, &mut |p| dec.push(p)) {
        panic!("a Noise session failed: {e}");
    }
}

/// Reads what a readable secured socket holds, like [`read_into`], through
/// its session. Returns false at end of stream.
pub fn read_secure(
    stream: &mut TcpStream,
    scratch: &mut [u8],
    open: &mut [u8],
    channel: &mut SecureChannel,
    replies: &mut Vec<u8>,
    dec: &mut FrameDecoder,
) -> bool {
    read_into(stream, scratch, |b| {
        open_into(channel, b, open, replies, dec)
    })
}

/// A blocking connection to the registry with its Noise handshake done, all
/// three messages: nothing but frames is left to send.
pub struct Dialed {
    pub stream: StdStream,
    pub channel: SecureChannel,
    pub dec: FrameDecoder,
}

pub fn dial(registry: SocketAddr, key: PublicKey, identity: &Identity, open: &mut [u8]) -> Dialed {
    let mut stream = StdStream::connect(registry).expect("connect to the registry");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let mut channel = SecureChannel::initiator(
        identity,
        &peerchat_core::protocol::noise_prologue(),
        &mut out,
    );
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 1024];
    while !channel.is_established() {
        stream.write_all(&out).expect("handshake write");
        out.clear();
        let n = match stream.read(&mut buf) {
            Ok(0) => panic!("the registry closed a connection during its handshake"),
            Ok(n) => n,
            Err(e) => panic!("handshake read: {e}"),
        };
        open_into(&mut channel, &buf[..n], open, &mut out, &mut dec);
    }
    stream.write_all(&out).expect("handshake write");
    assert_eq!(channel.remote_key(), Some(key), "the registry's key");
    Dialed {
        stream,
        channel,
        dec,
    }
}

/// Byte patterns that let the readers classify frames without decoding
/// them; each is checked against the codec once, at start.
pub struct Shapes {
    pub heartbeat: Vec<u8>,
    /// A `welcome` body's first bytes: `{"welcome": …`.
    pub welcome_prefix: Vec<u8>,
    /// An `error` body's first bytes.
    pub error_prefix: Vec<u8>,
    /// A `chat` body up to its fields: `{"chat": {` (three of them, or four
    /// with `sent_at`), which `id` leads.
    pub chat_prefix: Vec<u8>,
}

impl Shapes {
    pub fn new() -> Shapes {
        let heartbeat = codec::encode(&FromRegistry::Heartbeat {}).unwrap();
        let welcome = codec::encode(&FromRegistry::Welcome {
            version: PROTOCOL_VERSION,
            name: "x".into(),
            addr: "127.0.0.1:9".into(),
            heartbeat_ms: 1,
            timeout_ms: 2,
            probes: false,
            more: false,
            peers: vec![],
        })
        .unwrap();
        let error = codec::encode(&FromRegistry::Error {
            code: "c".into(),
            reason: "r".into(),
        })
        .unwrap();
        let shapes = Shapes {
            heartbeat,
            welcome_prefix: welcome[..9].to_vec(),
            error_prefix: error[..7].to_vec(),
            chat_prefix: b"\xa1\x64chat".to_vec(),
        };
        assert_eq!(&shapes.welcome_prefix[2..], b"welcome");
        assert_eq!(&shapes.error_prefix[2..], b"error");
        shapes.check();
        shapes
    }

    /// The fast paths must agree with the codec, or the figures are wrong.
    pub fn check(&self) {
        let key = Identity::from_private(&[7; 32]).public();
        for id in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
        ] {
            let body = codec::encode(&LinkMsg::Chat {
                id,
                text: TEXT.into(),
                direct: false,
                sent_at: Some(1_796_000_000_000),
            })
            .unwrap();
            assert_eq!(self.chat_id(&body), Some(id), "chat id {id}");
            let unstamped = codec::encode(&LinkMsg::Chat {
                id,
                text: TEXT.into(),
                direct: false,
                sent_at: None,
            })
            .unwrap();
            assert_eq!(self.chat_id(&unstamped), Some(id), "unstamped chat id {id}");
        }
        let hb = codec::encode(&ToRegistry::Heartbeat {}).unwrap();
        assert_eq!(hb, self.heartbeat);
        let welcome = FromRegistry::Welcome {
            version: PROTOCOL_VERSION,
            name: "somebody".into(),
            addr: "127.0.0.1:9".into(),
            heartbeat_ms: 5000,
            timeout_ms: 60000,
            probes: false,
            more: true,
            peers: vec![PeerEntry {
                name: "a".into(),
                addr: "127.0.0.1:9".into(),
                key,
                reachable: None,
            }],
        };
        assert!(codec::encode(&welcome)
            .unwrap()
            .starts_with(&self.welcome_prefix));
    }

    /// The id of a `chat` body; `None` for any other message.
    pub fn chat_id(&self, body: &[u8]) -> Option<u64> {
        let rest = body.strip_prefix(self.chat_prefix.as_slice())?;
        let rest = rest
            .strip_prefix(b"\xa3\x62id")
            .or_else(|| rest.strip_prefix(b"\xa4\x62id"))?;
        let (&head, rest) = rest.split_first()?;
        let be = |n: usize| {
            rest.get(..n)
                .map(|b| b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
        };
        match head {
            0x00..=0x17 => Some(u64::from(head)),
            0x18 => be(1),
            0x19 => be(2),
            0x1a => be(4),
            0x1b => be(8),
            _ => None,
        }
    }
}
