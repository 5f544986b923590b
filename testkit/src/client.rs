//! A raw-protocol client of the registry, and the pieces of one for tests
//! that break the rules: Noise sessions opened by hand, frames built by hand,
//! replies read with deadlines.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::protocol::{self, FromRegistry, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::{SecureChannel, SecureStream};

/// What a bounded read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Msg(FromRegistry),
    /// The other side closed (EOF or reset).
    Closed,
    /// Nothing within the time given.
    Timeout,
}

/// The register message this version sends.
pub fn register_msg(name: &str, port: i64) -> ToRegistry {
    ToRegistry::Register {
        version: PROTOCOL_VERSION,
        name: name.into(),
        port,
        relay: false,
        dial_back: false,
    }
}

/// [`register_msg`] as frame-stream bytes, for clients that write by hand.
pub fn register_frame(name: &str, port: i64) -> Vec<u8> {
    codec::encode_frame(&register_msg(name, port))
        .expect("encode register")
        .to_vec()
}

/// The code of the `error` a registry answered with; panics on anything else.
pub fn code_of(msg: Option<FromRegistry>) -> String {
    match msg {
        Some(FromRegistry::Error { code, .. }) => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A Noise session over TCP, as the tests open them by hand.
pub type Secure = SecureStream<TcpStream>;

/// The dialer's Noise handshake on `stream` under `identity`, with the
/// protocol's prologue: what a registry or a peer accepts.
pub fn handshake(stream: TcpStream, identity: &Identity) -> std::io::Result<Secure> {
    SecureStream::connect(stream, identity, &protocol::noise_prologue())
}

/// Runs the dialer's Noise handshake on `stream` under a new key.
pub fn secure(stream: TcpStream) -> Secure {
    secure_as(stream, &Identity::generate())
}

/// Runs the dialer's Noise handshake on `stream` under `identity`, with
/// 10 s timeouts both ways and no Nagle delay.
pub fn secure_as(stream: TcpStream, identity: &Identity) -> Secure {
    try_secure_as(stream, identity).expect("a Noise handshake")
}

fn try_secure_as(stream: TcpStream, identity: &Identity) -> std::io::Result<Secure> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    handshake(stream, identity)
}

/// The dialer's first Noise message under a new key: bytes a test sends
/// where they do not belong.
pub fn first_noise_message() -> Vec<u8> {
    let mut first = Vec::new();
    SecureChannel::initiator(
        &Identity::generate(),
        &protocol::noise_prologue(),
        &mut first,
    );
    first
}

/// A raw-protocol client of the registry: a Noise session under its own
/// static key, carrying frames written and read by hand.
pub struct Client {
    /// The session, for reads and writes the methods do not cover.
    pub conn: Secure,
    /// The key it proved; connect again with it to be the same peer.
    pub identity: Identity,
}

impl Client {
    /// Connects under a new key.
    pub fn connect(addr: SocketAddr) -> Client {
        Self::connect_as(addr, &Identity::generate())
    }

    /// Connects under `identity`: the same key as an earlier client.
    pub fn connect_as(addr: SocketAddr, identity: &Identity) -> Client {
        let conn = TcpStream::connect(addr)
            .and_then(|stream| try_secure_as(stream, identity))
            .unwrap_or_else(|e| panic!("Noise handshake with {addr}: {e}"));
        Client {
            conn,
            identity: identity.clone(),
        }
    }

    /// The key it proved.
    pub fn key(&self) -> PublicKey {
        self.identity.public()
    }

    /// The TCP stream under the session (timeouts, shutdown).
    pub fn stream(&self) -> &TcpStream {
        self.conn.get_ref()
    }

    /// The TCP stream under the session, to write past it.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.conn.get_mut()
    }

    /// Sends one message, sealed.
    pub fn send(&mut self, msg: &ToRegistry) {
        let frame = codec::encode_frame(msg).unwrap();
        self.conn.write_plain(&frame).unwrap();
    }

    /// Bytes of the frame stream, sealed: whole frames or deliberately
    /// broken ones, still inside the Noise session.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_plain(bytes)
    }

    /// Bytes straight onto the wire, past the Noise session.
    pub fn send_wire(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.get_mut().write_all(bytes)
    }

    /// Registers `name` under a new key; returns the client and the reply.
    pub fn register(addr: SocketAddr, name: &str, port: i64) -> (Client, FromRegistry) {
        Self::register_as(addr, &Identity::generate(), name, port)
    }

    /// Registers under `identity` (to reclaim a name that key holds).
    pub fn register_as(
        addr: SocketAddr,
        identity: &Identity,
        name: &str,
        port: i64,
    ) -> (Client, FromRegistry) {
        let mut c = Client::connect_as(addr, identity);
        c.send(&register_msg(name, port));
        let welcome = c.recv().expect("a reply to register");
        (c, welcome)
    }

    /// The next message, skipping heartbeat replies; `None` on close.
    pub fn recv(&mut self) -> Option<FromRegistry> {
        loop {
            let msg = self.recv_any()?;
            if msg != (FromRegistry::Heartbeat {}) {
                return Some(msg);
            }
        }
    }

    /// The next message; `None` on close. Panics on a read timeout (the
    /// stream's, 10 s unless a test set another) or on bad data.
    pub fn recv_any(&mut self) -> Option<FromRegistry> {
        match self.conn.read_frame() {
            Ok(Some(body)) => Some(codec::decode(&body).expect("a known message")),
            Ok(None) => None,
            Err(e) if is_reset(&e) => None,
            Err(e) => panic!("reading from the registry: {e}"),
        }
    }

    /// The next message within `timeout` (heartbeat replies included).
    pub fn next(&mut self, timeout: Duration) -> Next {
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream().set_read_timeout(Some(timeout)).unwrap();
        let next = match self.conn.read_frame() {
            Ok(Some(body)) => Next::Msg(codec::decode(&body).expect("a known message")),
            Ok(None) => Next::Closed,
            Err(e) if is_reset(&e) => Next::Closed,
            Err(e) if is_timeout(&e) => Next::Timeout,
            Err(e) => panic!("reading from the registry: {e}"),
        };
        self.stream()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        next
    }

    /// True once the registry has closed the connection (within the
    /// stream's read timeout).
    pub fn closed(&mut self) -> bool {
        for _ in 0..100_000 {
            if self.recv_any().is_none() {
                return true;
            }
        }
        false
    }

    /// Whether the registry closes the connection within `timeout`, skipping
    /// whatever it still says (it may say nothing at all: a broken Noise
    /// session has no way to carry an error).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream().set_read_timeout(Some(left)).unwrap();
            match self.conn.read_frame() {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(e) if is_timeout(&e) => return false,
                // Reset, or bytes that no longer decrypt: gone either way.
                Err(_) => return true,
            }
        }
        false
    }
}

/// Whether a read or write failed because the other side went away.
pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Whether a read or write failed only because its timeout passed.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}
