//! Noise sessions, sans-IO: every peerchat connection is one.
//!
//! The pattern is `Noise_XX_25519_AESGCM_BLAKE2s`: both sides prove a
//! static X25519 key, the dialer learns the listener's key before it reveals
//! its own, and neither needs to know the other's key in advance (a peer
//! meets a registry for the first time, and a registry meets everyone for
//! the first time). The prologue binds the protocol version, so two builds
//! that speak different versions cannot complete a handshake. AES-GCM, not
//! ChaChaPoly: most messages are small directory updates and chats, and on
//! CPUs with AES instructions sealing and opening 64 bytes costs 0.15 µs
//! with it against 0.34 µs with ChaChaPoly, both through ring
//! (BENCHMARKS.md).
//!
//! On the wire every Noise message is a `u16` big-endian length and that
//! many bytes: three handshake messages, then transport messages. The
//! transport messages carry the ordinary frame stream of [`crate::wire`] as
//! a byte stream: a frame may span several Noise messages and one Noise
//! message may hold many frames, so a frame larger than one Noise message
//! is split by [`SecureChannel::seal`] and reassembled by the frame decoder
//! under its usual limit.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use snow::HandshakeState;
use zeroize::Zeroize;

use crate::identity::{Identity, PublicKey};
use crate::wire::{FrameDecoder, DEFAULT_MAX_FRAME};

mod cipher;

use cipher::{AesGcm, KEY_LEN};

pub const NOISE_PATTERN: &str = "Noise_XX_25519_AESGCM_BLAKE2s";
/// Bytes of the length before each Noise message.
pub const LEN_PREFIX: usize = 2;
/// Noise's own limit on one message, tag included.
pub const MAX_MESSAGE: usize = 65535;
pub const TAG_LEN: usize = 16;
/// Most plaintext one transport message carries.
pub const MAX_PLAINTEXT: usize = MAX_MESSAGE - TAG_LEN;
/// The XX messages are 32, 96 and 64 bytes with the empty payloads we send;
/// anything much larger before the session is up is not a peerchat peer.
pub const MAX_HANDSHAKE_MESSAGE: usize = 256;

/// What secures every connection of an event loop: our static key, and
/// the prologue both sides must mix in.
#[derive(Debug, Clone)]
pub struct NoiseConfig {
    pub identity: Arc<Identity>,
    pub prologue: Vec<u8>,
}

impl NoiseConfig {
    pub fn new(identity: Identity, prologue: Vec<u8>) -> Self {
        NoiseConfig {
            identity: Arc::new(identity),
            prologue,
        }
    }
}

/// Why a session ended. Any of these closes the connection it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecureError {
    #[error("Noise handshake failed: {0}")]
    Handshake(String),
    #[error("handshake message of {0} bytes (at most {MAX_HANDSHAKE_MESSAGE} are expected)")]
    HandshakeTooLarge(usize),
    #[error("Noise message of {0} bytes is shorter than its authentication tag")]
    TooShort(usize),
    #[error("Noise message of {len} bytes is over this connection's limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("a Noise message failed authentication: tampered, replayed or reordered")]
    Decrypt,
    #[error("the session is not established")]
    NotEstablished,
    #[error("sealing a message failed: {0}")]
    Encrypt(String),
    #[error("the connection ended inside a Noise message ({0} bytes of it had arrived)")]
    Truncated(usize),
}

/// What one [`SecureChannel::receive_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes of the input it took.
    pub consumed: usize,
    /// The handshake completed with the message it took.
    pub completed: bool,
}

enum State {
    Handshake(Box<HandshakeState>),
    Transport(Box<Session>),
    Failed,
}

/// A session after its handshake: a key and a message counter each way,
/// and the key the other side proved. Noise's transport messages are
/// sealed here rather than through snow's transport state, whose API takes
/// the plaintext and an output buffer apart: each message was zeroed, then
/// copied over, then encrypted. Here the plaintext is copied once into the
/// output and encrypted where it lies. The AEAD and its nonces are
/// cipher.rs's, the same that snow uses during the handshake, and the keys
/// are the handshake's split, taken from snow.
struct Session {
    sending: Direction,
    receiving: Direction,
    remote: PublicKey,
}

struct Direction {
    cipher: AesGcm,
    /// The counter of the next message: Noise's nonce.
    next: u64,
}

impl Direction {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        Direction {
            cipher: AesGcm::new(key),
            next: 0,
        }
    }

    /// The nonce of the next message. Noise reserves 2^64 - 1, and a
    /// counter that wrapped would reuse nonces: the session ends before.
    fn take_nonce(&mut self) -> Option<u64> {
        if self.next == u64::MAX {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }
}

/// One side of one Noise session.
pub struct SecureChannel {
    state: State,
    /// A Noise message not yet complete. Empty (and unallocated) between
    /// messages, which keeps idle connections small.
    partial: Vec<u8>,
    /// Largest transport message accepted: what is buffered for an
    /// incomplete one follows the frame limit of its connection.
    max_message: usize,
}

fn builder() -> snow::Builder<'static> {
    snow::Builder::with_resolver(
        NOISE_PATTERN.parse().expect("the pattern is valid"),
        Box::new(cipher::Resolver),
    )
}

impl SecureChannel {
    /// The dialing side. Its first handshake message is appended to `out`.
    /// Both sides must mix in the same `prologue` (the application's
    /// protocol version) or the handshake fails.
    pub fn initiator(identity: &Identity, prologue: &[u8], out: &mut Vec<u8>) -> Self {
        let mut hs = builder()
            .local_private_key(identity.private())
            .and_then(|b| b.prologue(prologue))
            .and_then(|b| b.build_initiator())
            .expect("a 32-byte key and a prologue always build");
        write_handshake(&mut hs, out).expect("the first XX message always writes");
        SecureChannel {
            state: State::Handshake(Box::new(hs)),
            partial: Vec::new(),
            max_message: MAX_MESSAGE,
        }
    }

    /// The accepting side; it speaks once the dialer's first message is in.
    pub fn responder(identity: &Identity, prologue: &[u8]) -> Self {
        let hs = builder()
            .local_private_key(identity.private())
            .and_then(|b| b.prologue(prologue))
            .and_then(|b| b.build_responder())
            .expect("a 32-byte key and a prologue always build");
        SecureChannel {
            state: State::Handshake(Box::new(hs)),
            partial: Vec::new(),
            max_message: MAX_MESSAGE,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Transport(_))
    }

    /// The other side's static key, proven by the completed handshake.
    pub fn remote_key(&self) -> Option<PublicKey> {
        match &self.state {
            State::Transport(session) => Some(session.remote),
            _ => None,
        }
    }

    /// Bytes held for a message not yet complete.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Limits transport messages to what carries at most one frame of
    /// `max_frame` bytes, so that an incomplete message cannot make us
    /// hold more than the frame limit allows (a registry accepts 4 KiB
    /// before registration).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        let max = max_frame + crate::wire::PREFIX_LEN + TAG_LEN;
        self.max_message = max.clamp(TAG_LEN + 1, MAX_MESSAGE);
    }

    /// Takes bytes as they came off the wire, split or coalesced anyhow.
    /// Handshake replies are appended to `out`, ready to send; the plaintext
    /// of transport messages goes to `plain`, in order. `scratch` must hold
    /// [`MAX_MESSAGE`] bytes. Returns whether the handshake completed during
    /// this call. After an error the session is dead for good, except that
    /// after [`SecureError::TooLarge`] it can still seal (the caller closes
    /// the connection and feeds it nothing more).
    pub fn receive(
        &mut self,
        mut input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, SecureError> {
        let mut completed = false;
        while !input.is_empty() {
            let step = self.receive_one(input, scratch, out, plain)?;
            completed |= step.completed;
            input = &input[step.consumed..];
        }
        Ok(completed)
    }

    /// Like [`SecureChannel::receive`], but stops after the first Noise
    /// message it completes, so that the caller can act on what that
    /// message carried before the next one is checked: a registry raises
    /// its frame limit when a `register` arrives, and a message after it in
    /// the same read must be measured against the raised limit. Returns
    /// how much of `input` it took (all of it when no message completed).
    pub fn receive_one(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut dyn FnMut(&[u8]),
    ) -> Result<Received, SecureError> {
        if let State::Failed = self.state {
            return Err(SecureError::NotEstablished);
        }
        if self.partial.is_empty() && input.len() >= LEN_PREFIX {
            let len = u16::from_be_bytes([input[0], input[1]]) as usize;
            self.check_len(len)?;
            if input.len() >= LEN_PREFIX + len {
                let message = &input[LEN_PREFIX..LEN_PREFIX + len];
                return Ok(Received {
                    consumed: LEN_PREFIX + len,
                    completed: self.process(message, scratch, out, plain)?,
                });
            }
        }
        let mut rest = input;
        while !rest.is_empty() {
            let wanted = if self.partial.len() < LEN_PREFIX {
                LEN_PREFIX - self.partial.len()
            } else {
                LEN_PREFIX + self.declared_len() - self.partial.len()
            };
            let take = wanted.min(rest.len());
            if self.partial.len() == LEN_PREFIX {
                // The length is known and checked: one allocation of its size.
                self.partial.reserve_exact(wanted);
            }
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() < LEN_PREFIX {
                continue;
            }
            let len = self.declared_len();
            self.check_len(len)?;
            if self.partial.len() == LEN_PREFIX + len {
                let whole = std::mem::take(&mut self.partial);
                return Ok(Received {
                    consumed: input.len() - rest.len(),
                    completed: self.process(&whole[LEN_PREFIX..], scratch, out, plain)?,
                });
            }
        }
        Ok(Received {
            consumed: input.len(),
            completed: false,
        })
    }

    /// Encrypts `plain` (of any length) into as many transport messages as
    /// it needs, appended to `out` with their length prefixes.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        let State::Transport(session) = &mut self.state else {
            return Err(SecureError::NotEstablished);
        };
        let sending = &mut session.sending;
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            let nonce = sending
                .take_nonce()
                .ok_or_else(|| SecureError::Encrypt("the session's nonces are used up".into()))?;
            out.extend_from_slice(&((chunk.len() + TAG_LEN) as u16).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(chunk);
            let tag = sending.cipher.seal_in_place(nonce, &[], &mut out[start..]);
            out.extend_from_slice(tag.as_ref());
        }
        Ok(())
    }

    fn declared_len(&self) -> usize {
        u16::from_be_bytes([self.partial[0], self.partial[1]]) as usize
    }

    fn check_len(&mut self, len: usize) -> Result<(), SecureError> {
        if matches!(self.state, State::Transport(_)) && len > self.max_message {
            // Nothing is wrong with the session, only with the size: it can
            // still seal the error that tells the other side why it closes.
            return Err(SecureError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        let result = match self.state {
            State::Handshake(_) if len > MAX_HANDSHAKE_MESSAGE => {
                Err(SecureError::HandshakeTooLarge(len))
            }
            State::Transport(_) if len < TAG_LEN => Err(SecureError::TooShort(len)),
            _ => Ok(()),
        };
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn process(
        &mut self,
        message: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, SecureError> {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Handshake(mut hs) => {
                hs.read_message(message, scratch)
                    .map_err(|e| SecureError::Handshake(e.to_string()))?;
                if !hs.is_handshake_finished() {
                    write_handshake(&mut hs, out)?;
                }
                if !hs.is_handshake_finished() {
                    self.state = State::Handshake(hs);
                    return Ok(false);
                }
                let Some(remote) = hs.get_remote_static().and_then(PublicKey::from_slice) else {
                    return Err(SecureError::Handshake("no remote static key".into()));
                };
                // The dialer sends with the split's first key (Noise's
                // Split(): the initiator's), the listener with the second.
                let (mut first, mut second) = hs.dangerously_get_raw_split();
                let (sending, receiving) = if hs.is_initiator() {
                    (&first, &second)
                } else {
                    (&second, &first)
                };
                self.state = State::Transport(Box::new(Session {
                    sending: Direction::new(sending),
                    receiving: Direction::new(receiving),
                    remote,
                }));
                first.zeroize();
                second.zeroize();
                Ok(true)
            }
            State::Transport(mut session) => {
                let Some(body_len) = message.len().checked_sub(TAG_LEN) else {
                    return Err(SecureError::TooShort(message.len()));
                };
                let (body, tag) = message.split_at(body_len);
                let opened = &mut scratch[..body_len];
                opened.copy_from_slice(body);
                let receiving = &mut session.receiving;
                let nonce = receiving.take_nonce().ok_or(SecureError::Decrypt)?;
                receiving
                    .cipher
                    .open_in_place(nonce, &[], opened, tag)
                    .map_err(|_| SecureError::Decrypt)?;
                self.state = State::Transport(session);
                plain(opened);
                Ok(false)
            }
            State::Failed => Err(SecureError::NotEstablished),
        }
    }
}

/// Splits sealed bytes into the Noise messages they hold: for tests that
/// look at how frames were sealed.
#[cfg(test)]
pub(crate) fn messages(mut wire: &[u8]) -> Vec<&[u8]> {
    let mut messages = Vec::new();
    while let [high, low, rest @ ..] = wire {
        let (message, after) = rest.split_at(usize::from(u16::from_be_bytes([*high, *low])));
        messages.push(message);
        wire = after;
    }
    messages
}

fn write_handshake(hs: &mut HandshakeState, out: &mut Vec<u8>) -> Result<(), SecureError> {
    let mut message = [0u8; MAX_HANDSHAKE_MESSAGE];
    let len = hs
        .write_message(&[], &mut message)
        .map_err(|e| SecureError::Handshake(e.to_string()))?;
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&message[..len]);
    Ok(())
}

/// A blocking Noise session over a stream: for tools and tests that talk to
/// peerchat one exchange at a time, outside the event loop.
pub struct SecureStream<S> {
    stream: S,
    channel: SecureChannel,
    decoder: FrameDecoder,
    scratch: Box<[u8]>,
}

impl<S: Read + Write> SecureStream<S> {
    /// Runs the handshake as the dialer.
    pub fn connect(mut stream: S, identity: &Identity, prologue: &[u8]) -> io::Result<Self> {
        let mut first = Vec::new();
        let channel = SecureChannel::initiator(identity, prologue, &mut first);
        stream.write_all(&first)?;
        SecureStream::finish(stream, channel)
    }

    /// Runs the handshake as the listener.
    pub fn accept(stream: S, identity: &Identity, prologue: &[u8]) -> io::Result<Self> {
        SecureStream::finish(stream, SecureChannel::responder(identity, prologue))
    }

    fn finish(stream: S, channel: SecureChannel) -> io::Result<Self> {
        let mut this = SecureStream {
            stream,
            channel,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
            scratch: scratch(),
        };
        while !this.channel.is_established() {
            if !this.read_some()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(this)
    }

    pub fn remote_key(&self) -> PublicKey {
        self.channel
            .remote_key()
            .expect("a SecureStream exists only after its handshake")
    }

    /// Seals bytes of the frame stream (whole frames, or deliberately not)
    /// and writes them.
    pub fn write_plain(&mut self, plain: &[u8]) -> io::Result<()> {
        let wire = self.seal(plain)?;
        self.stream.write_all(&wire)
    }

    /// Seals without writing: what would go on the wire.
    pub fn seal(&mut self, plain: &[u8]) -> io::Result<Vec<u8>> {
        let mut wire = Vec::new();
        self.channel
            .seal(plain, &mut wire)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(wire)
    }

    /// The next frame body; `None` once the other side has closed.
    pub fn read_frame(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(body)) => return Ok(Some(body)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if !self.read_some()? {
                return Ok(None);
            }
        }
    }

    /// Largest frame [`SecureStream::read_frame`] accepts.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.decoder.set_max_frame(max_frame);
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream itself, for writing raw bytes past the session.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads once; false at end of stream.
    fn read_some(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        let n = match self.stream.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        let mut replies = Vec::new();
        let decoder = &mut self.decoder;
        self.channel
            .receive(&buf[..n], &mut self.scratch, &mut replies, &mut |plain| {
                decoder.push(plain)
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if !replies.is_empty() {
            self.stream.write_all(&replies)?;
        }
        Ok(true)
    }
}

/// A scratch buffer of the size [`SecureChannel::receive`] needs.
pub fn scratch() -> Box<[u8]> {
    vec![0; MAX_MESSAGE].into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROLOGUE: &[u8] = b"peerchat protocol 2";

    /// Runs a handshake through memory; returns (dialer, listener).
    fn pair(a: &Identity, b: &Identity) -> (SecureChannel, SecureChannel) {
        let mut scratch = scratch();
        let mut to_b = Vec::new();
        let mut dialer = SecureChannel::initiator(a, PROLOGUE, &mut to_b);
        let mut listener = SecureChannel::responder(b, PROLOGUE);
        let mut nothing = |_: &[u8]| panic!("no plaintext during a handshake");
        let mut to_a = Vec::new();
        assert!(!listener
            .receive(&to_b, &mut scratch, &mut to_a, &mut nothing)
            .unwrap());
        to_b.clear();
        assert!(dialer
            .receive(&to_a, &mut scratch, &mut to_b, &mut nothing)
            .unwrap());
        let mut none = Vec::new();
        assert!(listener
            .receive(&to_b, &mut scratch, &mut none, &mut nothing)
            .unwrap());
        assert!(none.is_empty());
        (dialer, listener)
    }

    fn open(channel: &mut SecureChannel, wire: &[u8]) -> Result<Vec<u8>, SecureError> {
        let mut scratch = scratch();
        let mut plain = Vec::new();
        let mut out = Vec::new();
        channel.receive(wire, &mut scratch, &mut out, &mut |p| {
            plain.extend_from_slice(p)
        })?;
        assert!(out.is_empty());
        Ok(plain)
    }

    #[test]
    fn handshake_proves_both_static_keys() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (dialer, listener) = pair(&a, &b);
        assert_eq!(dialer.remote_key(), Some(b.public()));
        assert_eq!(listener.remote_key(), Some(a.public()));
    }

    #[test]
    fn plaintext_round_trips_in_any_split_and_never_shows_on_the_wire() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (mut dialer, mut listener) = pair(&a, &b);
        let secret: Vec<u8> = b"attack at dawn "
            .iter()
            .copied()
            .cycle()
            .take(200_000)
            .collect();
        let mut wire = Vec::new();
        dialer.seal(&secret, &mut wire).unwrap();
        assert_eq!(wire.len(), secret.len() + 4 * (LEN_PREFIX + TAG_LEN));
        assert!(!wire.windows(15).any(|w| w == b"attack at dawn "));
        let mut got = Vec::new();
        for piece in wire.chunks(7777) {
            got.extend(open(&mut listener, piece).unwrap());
        }
        assert_eq!(got, secret);
        assert_eq!(listener.buffered(), 0);
        // One byte at a time, the other way.
        let mut wire = Vec::new();
        listener.seal(b"hello", &mut wire).unwrap();
        let mut got = Vec::new();
        for byte in &wire {
            got.extend(open(&mut dialer, std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(got, b"hello");
    }

    #[test]
    fn tampered_replayed_or_short_messages_kill_the_session() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (mut dialer, mut listener) = pair(&a, &b);
        let mut wire = Vec::new();
        dialer.seal(b"one", &mut wire).unwrap();
        let mut tampered = wire.clone();
        tampered[LEN_PREFIX] ^= 1;
        assert_eq!(open(&mut listener, &tampered), Err(SecureError::Decrypt));
        assert_eq!(
            open(&mut listener, &wire),
            Err(SecureError::NotEstablished),
            "dead for good"
        );

        let (mut dialer, mut listener) = pair(&a, &b);
        let mut wire = Vec::new();
        dialer.seal(b"one", &mut wire).unwrap();
        assert_eq!(open(&mut listener, &wire).unwrap(), b"one");
        assert_eq!(open(&mut listener, &wire), Err(SecureError::Decrypt));

        let (_, mut listener) = pair(&a, &b);
        assert_eq!(
            open(&mut listener, &[0, 3, 1, 2, 3]),
            Err(SecureError::TooShort(3))
        );
        assert_eq!(
            open(&mut listener, &[0, 40, 1]),
            Err(SecureError::NotEstablished),
            "nothing is buffered after an error"
        );
        assert_eq!(listener.buffered(), 0);
    }

    #[test]
    fn a_message_over_the_frame_limit_is_refused_before_it_is_buffered() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (mut dialer, mut listener) = pair(&a, &b);
        listener.set_max_frame(4096);
        let mut wire = Vec::new();
        dialer.seal(&[7; 4096 + 4], &mut wire).unwrap();
        assert_eq!(
            open(&mut listener, &wire).unwrap().len(),
            4100,
            "one frame fits"
        );
        let mut wire = Vec::new();
        dialer.seal(&[7; 5000], &mut wire).unwrap();
        assert_eq!(
            open(&mut listener, &wire[..3]),
            Err(SecureError::TooLarge {
                len: 5016,
                max: 4116
            })
        );
        assert_eq!(listener.buffered(), 0);
        let mut reply = Vec::new();
        listener.seal(b"frame_too_large", &mut reply).unwrap();
        assert_eq!(open(&mut dialer, &reply).unwrap(), b"frame_too_large");
    }

    #[test]
    fn handshakes_fail_on_garbage_size_or_another_prologue() {
        let a = Identity::generate();
        let mut scratch = scratch();
        let mut out = Vec::new();
        let mut responder = SecureChannel::responder(&a, PROLOGUE);
        assert_eq!(
            responder.receive(&[0xff, 0xff], &mut scratch, &mut out, &mut |_| {}),
            Err(SecureError::HandshakeTooLarge(0xffff))
        );
        let mut responder = SecureChannel::responder(&a, PROLOGUE);
        assert!(matches!(
            responder.receive(&[0, 3, 1, 2, 3], &mut scratch, &mut out, &mut |_| {}),
            Err(SecureError::Handshake(_))
        ));

        // A dialer whose prologue names another version.
        let mut first = Vec::new();
        let mut hs = builder()
            .local_private_key(a.private())
            .and_then(|b| b.prologue(b"peerchat protocol 99"))
            .and_then(|b| b.build_initiator())
            .unwrap();
        write_handshake(&mut hs, &mut first).unwrap();
        let mut responder = SecureChannel::responder(&Identity::generate(), PROLOGUE);
        let mut reply = Vec::new();
        responder
            .receive(&first, &mut scratch, &mut reply, &mut |_| {})
            .unwrap();
        let mut buf = [0u8; 1024];
        assert!(
            hs.read_message(&reply[LEN_PREFIX..], &mut buf).is_err(),
            "the transcripts differ, so the responder's proof fails"
        );
    }

    /// Our session against snow's own transport state on the other end,
    /// in both roles: the same keys, each in the right direction, and the
    /// same nonces, message after message.
    #[test]
    fn transport_messages_are_those_of_snows_own_transport_state() {
        let (ours, theirs) = (Identity::generate(), Identity::generate());
        for we_dial in [true, false] {
            let snow_side = builder()
                .local_private_key(theirs.private())
                .and_then(|b| b.prologue(PROLOGUE));
            let mut scratch = scratch();
            let mut nothing = |_: &[u8]| panic!("no plaintext during a handshake");
            let mut buf = [0u8; 1024];
            let (mut channel, mut hs) = if we_dial {
                let mut first = Vec::new();
                let channel = SecureChannel::initiator(&ours, PROLOGUE, &mut first);
                let mut hs = snow_side.and_then(|b| b.build_responder()).unwrap();
                hs.read_message(&first[LEN_PREFIX..], &mut buf).unwrap();
                (channel, hs)
            } else {
                let mut hs = snow_side.and_then(|b| b.build_initiator()).unwrap();
                let mut first = Vec::new();
                write_handshake(&mut hs, &mut first).unwrap();
                let mut channel = SecureChannel::responder(&ours, PROLOGUE);
                let mut reply = Vec::new();
                channel
                    .receive(&first, &mut scratch, &mut reply, &mut nothing)
                    .unwrap();
                hs.read_message(&reply[LEN_PREFIX..], &mut buf).unwrap();
                (channel, hs)
            };
            while !hs.is_handshake_finished() {
                let mut to_us = Vec::new();
                write_handshake(&mut hs, &mut to_us).unwrap();
                let mut reply = Vec::new();
                channel
                    .receive(&to_us, &mut scratch, &mut reply, &mut nothing)
                    .unwrap();
                if !reply.is_empty() {
                    hs.read_message(&reply[LEN_PREFIX..], &mut buf).unwrap();
                }
            }
            assert!(channel.is_established(), "we dial: {we_dial}");
            assert_eq!(channel.remote_key(), Some(theirs.public()));
            let mut snow = hs.into_transport_mode().unwrap();
            let mut plain = vec![0u8; MAX_MESSAGE];
            for len in [0, 1, 1000, MAX_PLAINTEXT, 2 * MAX_PLAINTEXT + 7] {
                let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let mut wire = Vec::new();
                channel.seal(&sent, &mut wire).unwrap();
                let mut received = Vec::new();
                for message in messages(&wire) {
                    let n = snow.read_message(message, &mut plain).unwrap();
                    received.extend_from_slice(&plain[..n]);
                }
                assert_eq!(received, sent, "{len} bytes to snow, we dial: {we_dial}");

                let mut wire = Vec::new();
                for chunk in sent
                    .chunks(MAX_PLAINTEXT)
                    .chain((len == 0).then_some(&[][..]))
                {
                    let mut message = vec![0u8; chunk.len() + TAG_LEN];
                    snow.write_message(chunk, &mut message).unwrap();
                    wire.extend_from_slice(&(message.len() as u16).to_be_bytes());
                    wire.extend_from_slice(&message);
                }
                assert_eq!(
                    open(&mut channel, &wire).unwrap(),
                    sent,
                    "{len} bytes from snow"
                );
            }
        }
    }

    #[test]
    fn a_session_ends_before_its_nonces_wrap() {
        let mut direction = Direction::new(&[9; 32]);
        direction.next = u64::MAX - 2;
        assert_eq!(direction.take_nonce(), Some(u64::MAX - 2));
        assert_eq!(direction.take_nonce(), Some(u64::MAX - 1));
        assert_eq!(
            direction.take_nonce(),
            None,
            "2^64 - 1 is Noise's, never a message's"
        );
        assert_eq!(direction.take_nonce(), None);
    }

    #[test]
    fn an_established_session_stays_small() {
        // Every idle connection of a registry holds one.
        let session = std::mem::size_of::<Session>();
        assert!(session <= 128, "a session is {session} bytes");
    }

    #[test]
    fn sealing_before_the_handshake_is_refused() {
        let mut out = Vec::new();
        let mut dialer = SecureChannel::initiator(&Identity::generate(), PROLOGUE, &mut out);
        assert_eq!(
            dialer.seal(b"x", &mut Vec::new()),
            Err(SecureError::NotEstablished)
        );
    }
}
