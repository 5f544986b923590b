//! The pub/sub systems people would otherwise use, beside peerchat and
//! driven like the floors: Redis pub/sub and NATS, each a server of the
//! bench's own on a loopback port, N subscribers of one subject and one
//! publisher. A round's clock runs from the publish write to the last
//! subscriber's last byte (`redis_latency/N`, `nats_latency/N`), and `K`
//! publishes pipelined in one write (`redis_coalesced/N`,
//! `nats_coalesced/N`). 64-byte payloads. A system whose server is not
//! installed is skipped with a message (Debian: `apt-get install
//! redis-server nats-server`).

use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::floor::{Clock, Floor};
use crate::FLOOR_MSG;

const SUBJECT: &[u8] = b"bench";

/// A server of the bench's own on a loopback port, killed on drop.
pub struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts `program` with `args` and the port it is given (`{port}` in
    /// `args`); `None`, said on stderr, if it cannot be run or does not
    /// answer.
    fn start(program: &str, args: &[&str]) -> Option<Server> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let args = args.iter().map(|a| a.replace("{port}", &port.to_string()));
        let spawned = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                eprintln!("{program}: skipped ({e}; install it to compare)");
                return None;
            }
        };
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.connect().is_err() {
            if Instant::now() > deadline {
                eprintln!("{program}: skipped (it did not answer within 10 s)");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn redis() -> Option<Server> {
        Server::start(
            "redis-server",
            &[
                "--port",
                "{port}",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "4096",
            ],
        )
    }

    pub fn nats() -> Option<Server> {
        Server::start("nats-server", &["-a", "127.0.0.1", "-p", "{port}"])
    }

    fn connect(&self) -> std::io::Result<StdStream> {
        let stream = StdStream::connect(("127.0.0.1", self.port))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payload() -> Vec<u8> {
    (0..FLOOR_MSG as u8).map(|b| b'a' + b % 26).collect()
}

/// Reads until `text` has come (blocking), for the answers set-up waits on.
fn read_until(stream: &mut StdStream, text: &[u8]) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(text.len()).any(|w| w == text) {
        let n = stream.read(&mut buf).expect("the server answers");
        assert!(n > 0, "the server closed the connection");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Bulk strings as Redis's protocol (RESP) writes them.
fn resp(words: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        out.extend_from_slice(word);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `n` subscribers as the floor's readers: each subscribed, confirmed, and
/// non-blocking.
fn subscribers(server: &Server, n: usize, subscribe: &[u8], confirmed: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut sub = server.connect().expect("a subscriber connects");
            sub.write_all(subscribe).expect("subscribe");
            read_until(&mut sub, confirmed);
            sub.set_nonblocking(true).unwrap();
            TcpStream::from_std(sub)
        })
        .collect()
}

/// Redis: a round writes `k` PUBLISH commands (and reads their `:N`
/// replies after the timed write); a subscriber counts the bytes of its
/// `message` pushes.
pub fn redis_floor(server: &Server, n: usize) -> Floor {
    let payload = payload();
    // The confirmation ends with the count of channels subscribed.
    let readers = subscribers(server, n, &resp(&[b"SUBSCRIBE", SUBJECT]), b":1\r\n");
    let mut publisher = server.connect().expect("the publisher connects");
    let publish = resp(&[b"PUBLISH", SUBJECT, &payload]);
    let mut replies = vec![0u8; 64 * 1024];
    let write = move |k: usize| {
        publisher.write_all(&publish.repeat(k)).expect("publish");
        let mut lines = 0;
        while lines < k {
            let got = publisher.read(&mut replies).expect("publish replies");
            assert!(got > 0, "redis closed the publisher");
            lines += replies[..got].iter().filter(|&&b| b == b'\n').count();
        }
    };
    let delivered = resp(&[b"message", SUBJECT, &payload]).len() as u64;
    Floor::spawn(readers, Vec::new(), delivered, Clock::AtWrite, write)
}

/// NATS: a round writes `k` PUB commands (no replies: not verbose); a
/// subscriber counts the bytes of its `MSG`s. A PING answered with PONG
/// shows the server has taken each connection's SUB.
pub fn nats_floor(server: &Server, n: usize) -> Floor {
    let payload = payload();
    let hello = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n";
    let mut subscribe = hello.to_vec();
    subscribe.extend_from_slice(b"SUB bench 1\r\nPING\r\n");
    let readers = subscribers(server, n, &subscribe, b"PONG\r\n");
    let mut publisher = server.connect().expect("the publisher connects");
    publisher.write_all(hello).expect("connect");
    let mut publish = format!("PUB bench {}\r\n", payload.len()).into_bytes();
    publish.extend_from_slice(&payload);
    publish.extend_from_slice(b"\r\n");
    let write = move |k: usize| publisher.write_all(&publish.repeat(k)).expect("publish");
    let delivered = (format!("MSG bench 1 {}\r\n", payload.len()).len() + payload.len() + 2) as u64;
    Floor::spawn(readers, Vec::new(), delivered, Clock::AtWrite, write)
}
