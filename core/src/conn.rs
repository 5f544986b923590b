//! One connection as the event loop holds it: the socket, the frame decoder
//! for what comes in, and the queue of what goes out.
//!
//! The outbound queue holds shared [`Bytes`], so a frame broadcast to a
//! thousand connections is encoded once and referenced a thousand times.
//! Writes are vectored and go until the kernel says `WouldBlock`; whatever is
//! left waits for WRITABLE. Nothing here blocks or spins.
//!
//! On a secured connection frames first wait as plaintext; just before a
//! flush they are sealed into Noise messages for this connection alone, as
//! few as their size allows, so a broadcast is still encoded once and only
//! the encryption is per connection.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;

use bytes::{Buf, Bytes};
use mio::net::TcpStream;

use crate::event_loop::ConnId;
use crate::secure::{SecureChannel, SecureError};
use crate::wire::FrameDecoder;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// What sealing adds to each Noise message: its length and its tag.
const SEAL_OVERHEAD: usize = crate::secure::LEN_PREFIX + crate::secure::TAG_LEN;
/// The gathering buffer shrinks back after a burst larger than this.
const SEAL_BUF_KEEP: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Outbound connect in progress.
    Connecting,
    /// Connected; the Noise handshake is in progress.
    Securing,
    Open,
    /// The app is done with it: flush what is queued, then close.
    Closing,
    /// Flushed and shut for writing; reading until the other side closes so
    /// that unread input cannot turn our close into a reset that destroys
    /// the last frames we sent.
    Draining,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// The queue is empty.
    All,
    /// The kernel buffer is full; wait for WRITABLE.
    Blocked,
}

pub(crate) struct Conn {
    pub id: ConnId,
    pub stream: TcpStream,
    pub peer_addr: SocketAddr,
    pub state: ConnState,
    pub decoder: FrameDecoder,
    /// The Noise session, on a secured loop.
    pub secure: Option<SecureChannel>,
    /// The application has been given this connection (an accepted one is
    /// given once its handshake is done).
    pub announced: bool,
    /// Frames waiting to be sealed (secured connections only).
    plain: VecDeque<Bytes>,
    /// Bytes ready for the socket.
    out: VecDeque<Bytes>,
    /// Bytes in `plain` and `out` together.
    queued: usize,
    /// WRITABLE is registered (only while something is queued).
    pub wants_write: bool,
    /// In the loop's list of connections to flush this turn.
    pub dirty: bool,
}

impl Conn {
    pub fn new(
        id: ConnId,
        stream: TcpStream,
        peer_addr: SocketAddr,
        state: ConnState,
        max_frame: usize,
        announced: bool,
    ) -> Self {
        Conn {
            id,
            stream,
            peer_addr,
            state,
            decoder: FrameDecoder::new(max_frame),
            secure: None,
            announced,
            plain: VecDeque::new(),
            out: VecDeque::new(),
            queued: 0,
            wants_write: false,
            dirty: false,
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a frame: as it is, or for sealing on a secured connection.
    pub fn enqueue(&mut self, frame: Bytes) {
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

    /// Queues bytes for the socket as they are (handshake messages).
    pub fn enqueue_wire(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued += bytes.len();
            self.out.push_back(bytes);
        }
    }

    /// Seals every waiting frame into Noise messages. `buf` is scratch
    /// space for gathering several frames into one message.
    pub fn seal_pending(&mut self, buf: &mut Vec<u8>) -> Result<(), SecureError> {
        let Some(channel) = self.secure.as_mut().filter(|c| c.is_established()) else {
            return Ok(());
        };
        if self.plain.is_empty() {
            return Ok(());
        }
        let plain_len: usize = self.plain.iter().map(Bytes::len).sum();
        let mut sealed = Vec::with_capacity(
            plain_len + (plain_len / crate::secure::MAX_PLAINTEXT + 1) * SEAL_OVERHEAD,
        );
        if self.plain.len() == 1 {
            channel.seal(&self.plain[0], &mut sealed)?;
        } else {
            buf.clear();
            for frame in &self.plain {
                buf.extend_from_slice(frame);
            }
            channel.seal(buf, &mut sealed)?;
            if buf.capacity() > SEAL_BUF_KEEP {
                *buf = Vec::new();
            }
        }
        self.plain.clear();
        self.queued = self.queued - plain_len + sealed.len();
        self.out.push_back(Bytes::from(sealed));
        Ok(())
    }

    /// Writes as much of the queue as the kernel takes.
    pub fn flush(&mut self) -> io::Result<Flushed> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (slice, bytes) in slices.iter_mut().zip(&self.out) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            match self.stream.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
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
        Ok(Flushed::All)
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
