//! One connection as the event loop holds it: the socket, the frame decoder
//! for what comes in, and the queue of what goes out.
//!
//! The outbound queue holds shared [`Bytes`], so a frame broadcast to a
//! thousand connections is encoded once and referenced a thousand times.
//! Writes are vectored and go until the kernel says `WouldBlock`; whatever is
//! left waits for WRITABLE. Nothing here blocks or spins.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;

use bytes::{Buf, Bytes};
use mio::net::TcpStream;

use crate::event_loop::ConnId;
use crate::wire::FrameDecoder;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Outbound connect in progress.
    Connecting,
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
    out: VecDeque<Bytes>,
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
    ) -> Self {
        Conn {
            id,
            stream,
            peer_addr,
            state,
            decoder: FrameDecoder::new(max_frame),
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

    pub fn enqueue(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.queued += bytes.len();
        self.out.push_back(bytes);
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
