//! Redis pub/sub beside peerchat, driven like the floors: N subscribers of
//! one channel and one publisher, a round's clock running from the
//! PUBLISH write to the last subscriber's last byte (`redis_latency/N`),
//! and `K` PUBLISH commands pipelined in one write (`redis_coalesced/N`).
//! 64-byte payloads. Skipped, with a message, where `redis-server` is not
//! installed (Debian: `apt-get install redis-server`).

use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::floor::Floor;
use crate::FLOOR_MSG;

/// A `redis-server` of the bench's own on a loopback port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--maxclients", "4096"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                eprintln!("redis: skipped (redis-server: {e}; install it to compare)");
                return None;
            }
        };
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.connect().is_err() {
            if Instant::now() > deadline {
                eprintln!("redis: skipped (redis-server did not answer within 10 s)");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn connect(&self) -> std::io::Result<StdStream> {
        let stream = StdStream::connect(("127.0.0.1", self.port))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bulk strings as RESP writes them.
fn command(words: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        out.extend_from_slice(word);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads exactly `len` bytes (blocking).
fn read_exact_len(stream: &mut StdStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).expect("redis answers");
    buf
}

/// `n` subscribers and a publisher as a [`Floor`]: what a round writes is
/// `k` PUBLISH commands, and what each subscriber counts is the bytes of
/// the `message` pushes it gets.
pub fn floor(server: &RedisServer, n: usize) -> Floor {
    let channel: &[u8] = b"bench";
    let payload: Vec<u8> = (0..FLOOR_MSG as u8).map(|b| b'a' + b % 26).collect();
    // The confirmation is a three-element array: two bulk strings and the
    // count of channels subscribed.
    let confirm =
        command(&[b"subscribe", channel, b"1"]).len() - "$1\r\n1\r\n".len() + ":1\r\n".len();
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut sub = server.connect().expect("a subscriber connects");
        sub.write_all(&command(&[b"SUBSCRIBE", channel]))
            .expect("subscribe");
        // `*3 $9 subscribe $5 bench :1`: the confirmation, read whole.
        let _ = read_exact_len(&mut sub, confirm);
        sub.set_nonblocking(true).unwrap();
        readers.push(TcpStream::from_std(sub));
    }
    let mut publisher = server.connect().expect("the publisher connects");
    let publish = command(&[b"PUBLISH", channel, &payload]);
    let mut replies = vec![0u8; 64 * 1024];
    let write = move |k: usize| {
        publisher.write_all(&publish.repeat(k)).expect("publish");
        // One `:N\r\n` a PUBLISH, read after the timed write went out.
        let mut lines = 0;
        while lines < k {
            let got = publisher.read(&mut replies).expect("publish replies");
            assert!(got > 0, "redis closed the publisher");
            lines += replies[..got].iter().filter(|&&b| b == b'\n').count();
        }
    };
    let delivered = command(&[b"message", channel, &payload]).len() as u64;
    Floor::spawn(readers, Vec::new(), delivered, write)
}
