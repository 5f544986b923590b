//! One connection as the event loop holds it: the socket, its transport
//! (see [`crate::transport`]), and where it is in its life.

use std::fmt;
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::transport::{Role, Transport};

/// A connection as the application knows it. The generation makes an id
/// of a closed connection useless even after its slot is reused (until the
/// 32-bit count of connections comes round again, 4 billion connections
/// later, with an id still held for that very slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Below 2^32: [`ConnId::to_bits`] packs it.
    pub(crate) key: usize,
    pub(crate) generation: u32,
}

impl ConnId {
    /// The id as one number, which [`ConnId::from_bits`] reads back: what
    /// the driver names an accepted link by, so that it needs no map from
    /// links to connections.
    pub(crate) fn to_bits(self) -> u64 {
        u64::from(self.generation) << 32 | self.key as u64
    }

    pub(crate) fn from_bits(bits: u64) -> ConnId {
        ConnId {
            key: (bits & u64::from(u32::MAX)) as usize,
            generation: (bits >> 32) as u32,
        }
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn {}.{}", self.key, self.generation)
    }
}

/// Where a connection is in its life. States only move forward:
///
/// ```text
/// Connecting ─┬─> Securing ─┬─> Open ──> Closing ──> Draining
///  (dialed)   │  (accepted) │  (frames    (flush,     (shut for writing,
///             └─────────────┘   flow)      then shut)   read until EOF)
/// ```
///
/// A plaintext loop skips `Securing`. Any state may end at once (an abort:
/// an error, a timeout, a slow consumer).
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

pub(crate) struct Conn {
    pub id: ConnId,
    pub stream: TcpStream,
    pub peer_addr: SocketAddr,
    pub state: ConnState,
    pub role: Role,
    pub transport: Transport,
    /// WRITABLE is registered (only while something is queued).
    pub wants_write: bool,
    /// In the loop's list of connections to write this turn.
    pub dirty: bool,
    /// The application stopped reading it ([`crate::event_loop::Ctx::set_reading`]):
    /// its bytes wait in the kernel, which pushes back on the sender.
    pub reads_paused: bool,
    /// Tell the application once its queue is empty
    /// ([`crate::event_loop::Ctx::watch_drain`]).
    pub watch_drain: bool,
}

impl Conn {
    /// The application has been given this connection: a dialed one from
    /// the start (it asked for it), an accepted one once it is open.
    pub fn app_knows(&self) -> bool {
        self.role == Role::Dialer || self.state != ConnState::Securing
    }

    /// The application may still use it.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            ConnState::Open | ConnState::Connecting | ConnState::Securing
        )
    }
}
