//! Reading a connection to its end, and what it must have said by then.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::codec;
use peerchat_core::protocol::{Change, FromRegistry};
use peerchat_core::secure::MAX_HANDSHAKE_MESSAGE;
use peerchat_testkit::client::{is_reset, is_timeout, Client, Secure};

use crate::system::AT_ONCE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Eof,
    Reset,
    /// Still open when the time ran out.
    Open,
}

#[derive(Debug)]
pub struct Finish {
    pub frames: Vec<Bytes>,
    pub end: End,
    pub elapsed: Duration,
}

/// Reads a Noise session until EOF, reset or `timeout`, collecting whole
/// frames (those it had buffered already included).
pub fn read_to_close(s: &mut Secure, timeout: Duration) -> Finish {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut frames = Vec::new();
    let mut end = End::Open;
    for _ in 0..1_000_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.get_ref()
            .set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match s.read_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {
                end = End::Eof;
                break;
            }
            Err(e) if is_reset(&e) => {
                end = End::Reset;
                break;
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading to the close: {e}"),
        }
    }
    Finish {
        frames,
        end,
        elapsed: start.elapsed(),
    }
}

/// Reads a plain TCP stream until EOF, reset or `timeout`: what a
/// connection that never got a Noise session is told (nothing, it should be).
pub fn read_raw_to_close(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, End, Duration) {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = End::Open;
    for _ in 0..1_000_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => {
                end = End::Eof;
                break;
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_reset(&e) => {
                end = End::Reset;
                break;
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading to the close: {e}"),
        }
    }
    (got, end, start.elapsed())
}

/// [`read_to_close`] for a [`Client`].
pub fn finish_client(c: &mut Client, timeout: Duration) -> Finish {
    read_to_close(&mut c.conn, timeout)
}

/// Registry messages of a finished connection, heartbeat replies left out.
pub fn registry_msgs(label: &str, f: &Finish) -> Vec<FromRegistry> {
    f.frames
        .iter()
        .map(|b| {
            codec::decode::<FromRegistry>(b)
                .unwrap_or_else(|e| panic!("{label}: the registry sent an undecodable frame: {e}"))
        })
        .filter(|m| *m != FromRegistry::Heartbeat {})
        .collect()
}

/// Exactly one `error` with `code`, then the connection closed.
pub fn assert_refused(label: &str, f: &Finish, code: &str) {
    let msgs = registry_msgs(label, f);
    assert!(
        f.end != End::Open,
        "{label}: still open after {:?}; got {msgs:?}",
        f.elapsed
    );
    match msgs.as_slice() {
        [FromRegistry::Error { code: got, .. }] if got == code => {}
        other => panic!("{label}: expected one error {code:?} before the close, got {other:?}"),
    }
}

/// Compares the control client's view with what happened, and says where
/// they first differ (the lists can be thousands long).
pub fn assert_same_changes(label: &str, got: &[Change], want: &[Change]) {
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    if first_diff == got.len() && got.len() == want.len() {
        return;
    }
    let from = first_diff.saturating_sub(2);
    panic!(
        "{label}: the control client's updates differ from what happened at index {first_diff} \
         (got {} changes, want {}):\n  got  {:?}\n  want {:?}",
        got.len(),
        want.len(),
        &got[from..got.len().min(first_diff + 3)],
        &want[from..want.len().min(first_diff + 3)],
    );
}

/// Bytes where a registry or a peer expects a Noise handshake: it must
/// close at once, saying at most its own handshake message (there is no
/// session, so nothing of the protocol).
pub fn plain_attack(label: &str, addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect to the peer");
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let (got, end, elapsed) = read_raw_to_close(&mut s, Duration::from_secs(3));
    assert!(
        end != End::Open && got.len() <= 2 + MAX_HANDSHAKE_MESSAGE,
        "{label}: expected a close without a word, got {} bytes then {end:?}",
        got.len()
    );
    assert!(elapsed < AT_ONCE, "{label}: closed only after {elapsed:?}");
}
