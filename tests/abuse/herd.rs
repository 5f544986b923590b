//! Many connections at once, driven from one thread.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::protocol::FromRegistry;
use peerchat_testkit::client::{secure, Secure};

use crate::ending::End;

pub enum HerdStream {
    /// Plain TCP: whatever it sends goes where the Noise handshake belongs.
    Raw(TcpStream),
    /// A Noise session, handshake done: it sends frame-stream bytes.
    Secure(Box<Secure>),
}

pub struct HerdConn {
    pub stream: Option<HerdStream>,
    /// When the registry's clock for it started: the TCP connect for a raw
    /// connection, the end of the handshake for a secured one.
    pub opened: Instant,
    /// Raw bytes received (raw connections).
    pub got: Vec<u8>,
    /// Frames received (secured connections).
    pub frames: Vec<Bytes>,
    /// Opened with a Noise session (known after the stream is gone).
    pub secured: bool,
    pub sent: usize,
    pub closed: Option<(Instant, End)>,
}

/// Hundreds of non-blocking connections, pumped by hand.
pub struct Herd {
    pub conns: Vec<HerdConn>,
}

impl Herd {
    pub fn new() -> Herd {
        Herd { conns: Vec::new() }
    }

    /// `n` plain TCP connections.
    pub fn open(addr: SocketAddr, n: usize, deadline: Instant) -> Herd {
        let mut herd = Herd::new();
        herd.add(addr, n, deadline, false);
        herd
    }

    /// Adds `n` connections, each with its Noise handshake done first when
    /// `secured`.
    pub fn add(&mut self, addr: SocketAddr, n: usize, deadline: Instant, secured: bool) {
        for i in 0..n {
            assert!(
                Instant::now() < deadline,
                "opened only {i} of {n} connections in time"
            );
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_nodelay(true).unwrap();
            let stream = if secured {
                let s = secure(stream);
                s.get_ref().set_nonblocking(true).unwrap();
                HerdStream::Secure(Box::new(s))
            } else {
                stream.set_nonblocking(true).unwrap();
                HerdStream::Raw(stream)
            };
            self.conns.push(HerdConn {
                stream: Some(stream),
                opened: Instant::now(),
                got: Vec::new(),
                frames: Vec::new(),
                secured,
                sent: 0,
                closed: None,
            });
        }
    }

    /// Reads whatever has arrived; notes closes and drops those sockets.
    pub fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        for c in &mut self.conns {
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            for _ in 0..16 {
                let read = match stream {
                    HerdStream::Raw(s) => match s.read(&mut buf) {
                        Ok(0) => Ok(false),
                        Ok(n) => {
                            c.got.extend_from_slice(&buf[..n]);
                            Ok(true)
                        }
                        Err(e) => Err(e),
                    },
                    HerdStream::Secure(s) => match s.read_frame() {
                        Ok(None) => Ok(false),
                        Ok(Some(f)) => {
                            c.frames.push(f);
                            Ok(true)
                        }
                        Err(e) => Err(e),
                    },
                };
                match read {
                    Ok(true) => {}
                    Ok(false) => {
                        c.closed = Some((Instant::now(), End::Eof));
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.closed = Some((Instant::now(), End::Reset));
                        break;
                    }
                }
            }
            if c.closed.is_some() {
                c.stream = None;
            }
        }
    }

    /// Sends the next byte of each connection's script, while the registry
    /// has said nothing to it: on the wire for a raw connection, as one
    /// Noise message for a secured one.
    pub fn write_next(&mut self, scripts: &[Vec<u8>]) {
        for (c, script) in self.conns.iter_mut().zip(scripts) {
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            if !c.got.is_empty() || !c.frames.is_empty() || c.sent >= script.len() {
                continue;
            }
            let byte = &script[c.sent..c.sent + 1];
            let sent = match stream {
                HerdStream::Raw(s) => matches!(s.write(byte), Ok(1)),
                // Nineteen bytes on the wire: a socket with room for a
                // handful of bytes takes them whole.
                HerdStream::Secure(s) => s.write_plain(byte).is_ok(),
            };
            if sent {
                c.sent += 1;
            }
        }
    }

    pub fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.closed.is_none()).count()
    }

    /// Pumps until every connection is closed or the deadline passes.
    pub fn pump_until_closed(&mut self, deadline: Instant, scripts: Option<&[Vec<u8>]>) {
        let mut last_write = Instant::now();
        for _ in 0..100_000 {
            self.pump();
            if self.open_count() == 0 || Instant::now() >= deadline {
                return;
            }
            if let Some(scripts) = scripts {
                if last_write.elapsed() >= Duration::from_millis(500) {
                    self.write_next(scripts);
                    last_write = Instant::now();
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every connection in `range` was closed `min..=max` after it was
    /// opened, secured ones after exactly one `error` `code`, raw ones
    /// without a byte (they never had a session to carry one). Returns the
    /// range of close times.
    pub fn assert_all_refused(
        &self,
        label: &str,
        range: std::ops::Range<usize>,
        code: &str,
        min: Duration,
        max: Duration,
    ) -> (Duration, Duration) {
        let mut problems: Vec<String> = Vec::new();
        let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
        let conns = &self.conns[range.clone()];
        for (i, c) in range.clone().zip(conns) {
            let Some((at, _end)) = c.closed else {
                problems.push(format!("#{i}: still open"));
                continue;
            };
            let after = at.duration_since(c.opened);
            first = first.min(after);
            last = last.max(after);
            if after < min || after > max {
                problems.push(format!("#{i}: closed after {after:?}"));
            }
            if !c.got.is_empty() {
                problems.push(format!("#{i}: got {} bytes outside a session", c.got.len()));
                continue;
            }
            let msgs: Vec<_> = c
                .frames
                .iter()
                .map(|body| codec::decode::<FromRegistry>(body))
                .collect();
            let secured = c.secured;
            match msgs.as_slice() {
                [Ok(FromRegistry::Error { code: got, .. })] if secured && got == code => {}
                [] if !secured => {}
                other => problems.push(format!("#{i}: got {other:?}")),
            }
        }
        eprintln!(
            "[{label}] {} connections closed between {first:?} and {last:?} after opening",
            conns.len()
        );
        assert!(
            problems.is_empty(),
            "{label}: {} of {} connections were not refused ({code:?} if secured) in {min:?}..{max:?}; first: {:?}",
            problems.len(),
            conns.len(),
            &problems[..problems.len().min(5)]
        );
        (first, last)
    }
}
