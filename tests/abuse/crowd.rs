//! Registered clients kept alive in the background.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use peerchat_testkit::client::{register_frame, secure, Secure};

use crate::wire::heartbeat_frame;

/// Clients that register, heartbeat and drain everything sent to them, on
/// one thread, until stopped; stopping closes them all.
pub struct Crowd {
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
}

impl Crowd {
    pub fn start(addr: SocketAddr, names: Vec<String>, first_port: i64) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let hb = heartbeat_frame();
            let mut conns: Vec<Secure> = Vec::new();
            let mut last_hb = Instant::now();
            let cap = Instant::now() + Duration::from_secs(120);
            for _ in 0..1_000_000 {
                if flag.load(Ordering::Relaxed) || Instant::now() >= cap {
                    break;
                }
                // A Noise handshake takes a while in a debug build: a few
                // per turn, so that the others still heartbeat in time.
                for _ in 0..2 {
                    let i = conns.len();
                    if i == names.len() {
                        break;
                    }
                    let mut s = secure(TcpStream::connect(addr).expect("crowd connect"));
                    s.write_plain(&register_frame(&names[i], first_port + i as i64))
                        .unwrap();
                    s.get_ref().set_nonblocking(true).unwrap();
                    conns.push(s);
                }
                if last_hb.elapsed() >= Duration::from_millis(100) {
                    for s in &mut conns {
                        let _ = s.write_plain(&hb);
                    }
                    last_hb = Instant::now();
                }
                for s in &mut conns {
                    for _ in 0..64 {
                        if !matches!(s.read_frame(), Ok(Some(_))) {
                            break;
                        }
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        Crowd {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the crowd thread");
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
