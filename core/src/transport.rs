//! One connection's protocol stack without its socket: the Noise session,
//! the frame decoder for what comes in, and the queue of what goes out.
//!
//! Sans-IO: bytes read from the socket go in through
//! [`Transport::receive`], frames come out of [`Transport::next_frame`], and
//! [`Transport::write_to`] hands queued bytes to any writer. The event loop
//! only moves bytes and readiness; tests drive two transports through
//! memory.
//!
//! The outbound queue holds shared [`Bytes`], so a frame broadcast to a
//! thousand connections is encoded once and referenced a thousand times. On
//! a secured connection frames first wait as plaintext; just before a write
//! they are sealed into Noise messages for this connection alone, as few as
//! their size allows, so only the encryption is per connection.
//!
//! The frame limit has one owner, this type: it bounds the frame decoder
//! and, through the Noise session, what an incomplete Noise message may make
//! us buffer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{Buf, Bytes};

use crate::identity::PublicKey;
use crate::secure::{self, NoiseConfig, Received, SecureChannel, SecureError};
use crate::wire::{FrameDecoder, FrameError, PREFIX_LEN};

/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// What sealing adds to each Noise message: its length and its tag.
const SEAL_OVERHEAD: usize = secure::LEN_PREFIX + secure::TAG_LEN;
/// Frames this large are sealed on their own rather than gathered.
const GATHER_BELOW: usize = 4096;
/// The gathering buffer shrinks back after a burst larger than this.
const SEAL_BUF_KEEP: usize = 256 * 1024;

/// Which side of the connection we are: fixed when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We connected; on a secured connection we speak first.
    Dialer,
    /// We accepted it.
    Acceptor,
}

/// Why the byte stream of a connection can carry no more frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The frames broke the framing rules (or a Noise message was too large
    /// for the frame limit): the session still works, so the other side can
    /// be told why before the close.
    Frame(FrameError),
    /// The Noise session failed: nothing more can be sealed or opened.
    Secure(SecureError),
}

/// Why queued output could not be written.
#[derive(Debug)]
pub enum WriteError {
    /// Sealing failed: the session is broken.
    Seal(SecureError),
    /// The writer failed (reset, broken pipe, …).
    Io(io::Error),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// The queue is empty.
    All,
    /// The writer would block; wait for it to take more.
    Blocked,
}

pub struct Transport {
    /// The Noise session; `None` on a plaintext loop.
    secure: Option<SecureChannel>,
    decoder: FrameDecoder,
    /// Reported by [`Transport::next_frame`] once the frames that arrived
    /// before it are taken: they were authentic.
    failed: Option<TransportError>,
    /// Frames waiting to be sealed (secured connections only).
    plain: VecDeque<Bytes>,
    /// Bytes ready for the writer.
    out: VecDeque<Bytes>,
    /// Bytes in `plain` and `out` together.
    queued: usize,
}

impl Transport {
    /// A connection whose bytes are frames as they are.
    pub fn plain(max_frame: usize) -> Self {
        Transport {
            secure: None,
            decoder: FrameDecoder::new(max_frame),
            failed: None,
            plain: VecDeque::new(),
            out: VecDeque::new(),
            queued: 0,
        }
    }

    /// A connection secured by a Noise session. A dialer's first handshake
    /// message is queued at once; it goes out when the connection is up.
    pub fn secured(role: Role, noise: &NoiseConfig, max_frame: usize) -> Self {
        let mut transport = Transport::plain(max_frame);
        let mut channel = match role {
            Role::Dialer => {
                let mut first = Vec::new();
                let channel =
                    SecureChannel::initiator(&noise.identity, &noise.prologue, &mut first);
                transport.enqueue_wire(Bytes::from(first));
                channel
            }
            Role::Acceptor => SecureChannel::responder(&noise.identity, &noise.prologue),
        };
        channel.set_max_frame(max_frame);
        transport.secure = Some(channel);
        transport
    }

    /// Frames may flow: always on a plaintext connection, once the
    /// handshake is done on a secured one.
    pub fn is_established(&self) -> bool {
        self.secure
            .as_ref()
            .is_none_or(SecureChannel::is_established)
    }

    /// The static key the other side proved in its handshake.
    pub fn remote_key(&self) -> Option<PublicKey> {
        self.secure.as_ref().and_then(SecureChannel::remote_key)
    }

    /// Sets the largest frame accepted from now on (a registry raises it
    /// once a connection has registered).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.decoder.set_max_frame(max_frame);
        if let Some(channel) = self.secure.as_mut() {
            channel.set_max_frame(max_frame);
        }
    }

    /// Takes bytes as they came off the wire, split or coalesced anyhow,
    /// up to and including the first Noise message they complete: the
    /// caller takes the frames that message carried (which may change the
    /// frame limit) and then hands over the rest of its input. `scratch`
    /// must hold [`secure::MAX_MESSAGE`] bytes (see [`secure::scratch`]).
    /// Says how much it took and whether the handshake completed; its
    /// replies are queued. A failure before the session was up is an error
    /// at once; a later one is kept for [`Transport::next_frame`], after
    /// the frames that came before it.
    pub fn receive(&mut self, input: &[u8], scratch: &mut [u8]) -> Result<Received, SecureError> {
        let everything = Received {
            consumed: input.len(),
            completed: false,
        };
        if self.failed.is_some() {
            return Ok(everything);
        }
        let Some(channel) = self.secure.as_mut() else {
            self.decoder.push(input);
            return Ok(everything);
        };
        let was_established = channel.is_established();
        let mut replies = Vec::new();
        let decoder = &mut self.decoder;
        let result = channel.receive_one(input, scratch, &mut replies, &mut |plain| {
            decoder.push(plain)
        });
        self.enqueue_wire(Bytes::from(replies));
        match result {
            Ok(step) => Ok(step),
            // It failed before the other side was ever heard as a peer.
            Err(e) if !was_established => Err(e),
            Err(SecureError::TooLarge { len, max }) => {
                // A frame over the limit, seen from its Noise message: bad
                // framing, and the session can still say why.
                let overhead = secure::TAG_LEN + PREFIX_LEN;
                self.failed = Some(TransportError::Frame(FrameError::TooLarge {
                    len: len.saturating_sub(overhead),
                    max: max.saturating_sub(overhead),
                }));
                Ok(everything)
            }
            Err(e) => {
                self.failed = Some(TransportError::Secure(e));
                Ok(everything)
            }
        }
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.decoder.next_frame() {
            Ok(Some(body)) => Ok(Some(body)),
            Ok(None) => match &self.failed {
                Some(e) => Err(e.clone()),
                None => Ok(None),
            },
            Err(e) => Err(TransportError::Frame(e)),
        }
    }

    /// The other side closed its half: an error if that cut a Noise message
    /// short.
    pub fn end_of_input(&self) -> Result<(), SecureError> {
        match self.secure.as_ref().map_or(0, SecureChannel::buffered) {
            0 => Ok(()),
            partial => Err(SecureError::Truncated(partial)),
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a frame (as made by `codec::encode_frame`): as it is, or for
    /// sealing on a secured connection.
    pub fn send(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.queued += frame.len();
        if self.secure.is_some() {
            self.plain.push_back(frame);
        } else {
            self.out.push_back(frame);
        }
    }

    /// Seals every waiting frame into Noise messages, then writes as much of
    /// the queue as `writer` takes, and says how many bytes it took.
    /// `seal_buf` is scratch space, shared by every connection, for
    /// gathering several frames into one message.
    pub fn write_to(
        &mut self,
        writer: &mut impl Write,
        seal_buf: &mut Vec<u8>,
    ) -> Result<(Written, usize), WriteError> {
        self.seal_pending(seal_buf).map_err(WriteError::Seal)?;
        let before = self.queued;
        let written = self.write_out(writer).map_err(WriteError::Io)?;
        Ok((written, before - self.queued))
    }

    /// Seals every waiting frame and hands over everything queued for the
    /// wire: for a transport whose bytes travel inside another connection's
    /// frames (a relayed link) rather than on a socket.
    pub fn take_wire(&mut self, seal_buf: &mut Vec<u8>) -> Result<Vec<Bytes>, SecureError> {
        self.seal_pending(seal_buf)?;
        self.queued -= self.out.iter().map(Bytes::len).sum::<usize>();
        Ok(std::mem::take(&mut self.out).into())
    }

    /// Queues bytes for the wire as they are (handshake messages).
    fn enqueue_wire(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued += bytes.len();
            self.out.push_back(bytes);
        }
    }

    fn seal_pending(&mut self, buf: &mut Vec<u8>) -> Result<(), SecureError> {
        let Some(channel) = self.secure.as_mut().filter(|c| c.is_established()) else {
            return Ok(());
        };
        if self.plain.is_empty() {
            return Ok(());
        }
        let plain_len: usize = self.plain.iter().map(Bytes::len).sum();
        // A run of frames sealed together is at most one message more than
        // its bytes fill, and there are no more runs than frames.
        let messages = self.plain.len() + plain_len / secure::MAX_PLAINTEXT;
        let mut sealed = Vec::with_capacity(plain_len + messages * SEAL_OVERHEAD);
        // Small frames share a Noise message, gathered first: a message costs
        // a tag and a key expansion. A large frame is sealed where it lies
        // (a welcome's parts are about 18 KB each): copying it into the
        // gathering buffer would cost more than the message it saves.
        let frames = self.plain.make_contiguous();
        let small = |a: &Bytes, b: &Bytes| a.len() < GATHER_BELOW && b.len() < GATHER_BELOW;
        for run in frames.chunk_by(small) {
            if let [frame] = run {
                channel.seal(frame, &mut sealed)?;
                continue;
            }
            buf.clear();
            for frame in run {
                buf.extend_from_slice(frame);
            }
            channel.seal(buf, &mut sealed)?;
        }
        if buf.capacity() > SEAL_BUF_KEEP {
            *buf = Vec::new();
        }
        self.plain.clear();
        self.queued = self.queued - plain_len + sealed.len();
        self.out.push_back(Bytes::from(sealed));
        Ok(())
    }

    fn write_out(&mut self, writer: &mut impl Write) -> io::Result<Written> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (slice, bytes) in slices.iter_mut().zip(&self.out) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            match writer.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Written::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out.capacity() > 4 {
            // A burst is over; an idle connection keeps no queue memory.
            self.out = VecDeque::new();
        }
        if self.plain.is_empty() && self.plain.capacity() > 4 {
            self.plain = VecDeque::new();
        }
        Ok(Written::All)
    }

    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.out.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests;
