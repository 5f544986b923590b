//! Servers a test runs on its own threads: a recording relay on the path
//! to a real process, on an accept loop of its own. (A registry that lies
//! is a scenario of the simulated world now: `tests/world/liar.rs`.)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::client::is_timeout;

/// One accept loop on its own thread: hands every connection to a handler,
/// which returns the threads it started for it; stopping (or dropping, or
/// two minutes passing) ends the loop and joins them all.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(
        listener: TcpListener,
        mut serve: impl FnMut(TcpStream, &Arc<AtomicBool>) -> Vec<JoinHandle<()>> + Send + 'static,
    ) -> Server {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let cap = Instant::now() + Duration::from_secs(120);
                let mut workers = Vec::new();
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= cap {
                        break;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => workers.extend(serve(stream, &stop)),
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
                stop.store(true, Ordering::Relaxed);
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// A recording TCP relay
// ---------------------------------------------------------------------------

/// Everything one relay saw: each direction of each connection on its own.
type Recording = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay on the path between a client and `target`: forwards every
/// byte both ways and keeps a copy, as an eavesdropper (or anyone who can
/// read the wire) would.
pub struct Relay {
    /// Where clients connect instead of to the target.
    pub addr: SocketAddr,
    streams: Recording,
    /// Connections relayed so far.
    pub connections: Arc<AtomicUsize>,
    _server: Server,
}

impl Relay {
    /// Relays what `listener` accepts to `target`.
    pub fn start(listener: TcpListener, target: SocketAddr) -> Relay {
        let addr = listener.local_addr().unwrap();
        let streams: Recording = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let server = {
            let (streams, connections) = (streams.clone(), connections.clone());
            Server::start(listener, move |client, stop| {
                let Ok(server) = TcpStream::connect(target) else {
                    return Vec::new();
                };
                connections.fetch_add(1, Ordering::Relaxed);
                client.set_nonblocking(false).unwrap();
                let mut pumps = Vec::new();
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let index = {
                        let mut s = streams.lock().unwrap();
                        s.push(Vec::new());
                        s.len() - 1
                    };
                    let (streams, stop) = (streams.clone(), stop.clone());
                    pumps.push(thread::spawn(move || {
                        pump(from, to, &streams, index, &stop)
                    }));
                }
                pumps
            })
        };
        Relay {
            addr,
            streams,
            connections,
            _server: server,
        }
    }

    /// A relay on a new port of 127.0.0.1 in front of `target`.
    pub fn to(target: SocketAddr) -> Relay {
        Relay::start(TcpListener::bind("127.0.0.1:0").unwrap(), target)
    }

    /// Each direction of each connection so far, as it went over the wire.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.streams.lock().unwrap().clone()
    }

    /// How many bytes it relayed so far, both ways.
    pub fn bytes(&self) -> usize {
        self.recorded().iter().map(Vec::len).sum()
    }
}

/// Copies one direction until EOF, an error or the stop flag.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    streams: &Recording,
    index: usize,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                streams.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------
// A scripted registry
// ---------------------------------------------------------------------------
