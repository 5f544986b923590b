//! The event loop over real sockets on 127.0.0.1: an echo application,
//! partial writes, a slow reader hitting the queue cap, bad framing, timers,
//! outbound connects and stopping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerchat_core::identity::{Identity, PublicKey};
use peerchat_core::secure::{NoiseConfig, SecureError, SecureStream};
use peerchat_core::wire::{encode_frame, FrameDecoder};
use peerchat_core::{App, CloseReason, ConnId, Ctx, EventLoop, LoopConfig};

#[derive(Debug)]
enum Seen {
    Accepted(ConnId),
    Connected,
    Closed(ConnId, CloseReason),
    Timer(u32),
    /// The key a secured connection proved, before it is accepted or connected.
    Key(PublicKey),
}

/// Echoes every frame; `flood N` makes it send N frames of 60 KiB to every
/// connection; `stop` stops the loop; `timer` arms a 30 ms timer.
struct Echo {
    conns: Vec<ConnId>,
    seen: mpsc::Sender<Seen>,
    dial: Option<SocketAddr>,
}

fn flood(frames: usize) -> Bytes {
    encode_frame(format!("flood {frames}").as_bytes())
}

impl App for Echo {
    type Timer = u32;

    fn on_accept(&mut self, ctx: &mut Ctx<u32>, conn: ConnId, _peer: SocketAddr) {
        if let Some(key) = ctx.remote_key(conn) {
            let _ = self.seen.send(Seen::Key(key));
        }
        self.conns.push(conn);
        let _ = self.seen.send(Seen::Accepted(conn));
        if let Some(addr) = self.dial.take() {
            let dialed = ctx.connect(addr).expect("connect starts");
            ctx.send(dialed, encode_frame(b"queued before connect"));
        }
    }

    fn on_connected(&mut self, ctx: &mut Ctx<u32>, conn: ConnId) {
        if let Some(key) = ctx.remote_key(conn) {
            let _ = self.seen.send(Seen::Key(key));
            ctx.send(conn, encode_frame(b"secured hello"));
        }
        let _ = self.seen.send(Seen::Connected);
    }

    fn on_frame(&mut self, ctx: &mut Ctx<u32>, conn: ConnId, body: Bytes) {
        if let Some(frames) = body.strip_prefix(b"flood ") {
            let frames: usize = std::str::from_utf8(frames).unwrap().parse().unwrap();
            let chunk = encode_frame(&vec![b'x'; 60 * 1024]);
            for _ in 0..frames {
                for c in self.conns.clone() {
                    ctx.send(c, chunk.clone());
                }
            }
            return;
        }
        match &body[..] {
            b"stop" => ctx.stop(Duration::from_secs(1)),
            b"timer" => {
                let at = ctx.now() + Duration::from_millis(30);
                ctx.arm(at, 7);
            }
            _ => {
                ctx.send(conn, encode_frame(&body));
            }
        }
    }

    fn on_closed(&mut self, _ctx: &mut Ctx<u32>, conn: ConnId, reason: &CloseReason) {
        self.conns.retain(|c| *c != conn);
        let _ = self.seen.send(Seen::Closed(conn, reason.clone()));
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<u32>, timer: u32) {
        let _ = self.seen.send(Seen::Timer(timer));
    }
}

struct Harness {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
    thread: thread::JoinHandle<()>,
}

fn start(config: LoopConfig, dial: Option<SocketAddr>) -> Harness {
    let (tx, rx) = mpsc::channel();
    let (addr_tx, addr_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let mut event_loop = EventLoop::new(config).unwrap();
        let addr = event_loop.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        addr_tx.send(addr).unwrap();
        let mut app = Echo {
            conns: Vec::new(),
            seen: tx,
            dial,
        };
        event_loop.run(&mut app).unwrap();
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    Harness {
        addr,
        seen: rx,
        thread,
    }
}

impl Harness {
    fn client(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(Duration::from_secs(10))
            .expect("an event within 10s")
    }

    fn stop(self) {
        let mut c = self.client();
        c.write_all(&encode_frame(b"stop")).unwrap();
        self.thread.join().unwrap();
    }
}

fn read_frame(stream: &mut TcpStream, dec: &mut FrameDecoder) -> Option<Bytes> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(frame) = dec.next_frame().unwrap() {
            return Some(frame);
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

#[test]
fn echoes_frames_split_and_coalesced() {
    let h = start(LoopConfig::default(), None);
    let mut c = h.client();
    let mut dec = FrameDecoder::new(1 << 20);
    // A hundred frames in one write.
    let many: Vec<u8> = (0..100u32)
        .flat_map(|i| encode_frame(format!("m{i}").as_bytes()).to_vec())
        .collect();
    c.write_all(&many).unwrap();
    for i in 0..100u32 {
        assert_eq!(
            read_frame(&mut c, &mut dec).unwrap(),
            format!("m{i}").as_bytes()
        );
    }
    // One frame a byte at a time.
    for b in encode_frame(b"slow and steady").iter() {
        c.write_all(&[*b]).unwrap();
        c.flush().unwrap();
    }
    assert_eq!(
        read_frame(&mut c, &mut dec).unwrap(),
        &b"slow and steady"[..]
    );
    h.stop();
}

#[test]
fn partial_writes_deliver_everything_in_order() {
    let h = start(LoopConfig::default(), None);
    let mut c = h.client();
    // Ask for ~3.8 MiB while not reading: the loop must queue, want
    // WRITABLE, and resume as we drain.
    c.write_all(&flood(64)).unwrap();
    thread::sleep(Duration::from_millis(200));
    let mut dec = FrameDecoder::new(1 << 20);
    for _ in 0..64 {
        let frame = read_frame(&mut c, &mut dec).expect("flood frame");
        assert_eq!(frame.len(), 60 * 1024);
        assert!(frame.iter().all(|b| *b == b'x'));
    }
    c.write_all(&encode_frame(b"after")).unwrap();
    assert_eq!(read_frame(&mut c, &mut dec).unwrap(), &b"after"[..]);
    h.stop();
}

#[test]
fn slow_reader_is_closed_and_does_not_stall_others() {
    let config = LoopConfig {
        max_queued: 2 * 1024 * 1024,
        ..LoopConfig::default()
    };
    let h = start(config, None);
    let mut sleeper = h.client(); // never reads
    let Seen::Accepted(sleeper_id) = h.next() else {
        panic!()
    };
    let mut reader = h.client();
    let Seen::Accepted(_) = h.next() else {
        panic!()
    };
    sleeper.write_all(&encode_frame(b"ping")).unwrap();
    let mut reader_dec = FrameDecoder::new(1 << 20);
    // The reader asks for floods until the sleeper's queue overflows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut closed = None;
    let mut rounds = 0;
    while closed.is_none() && Instant::now() < deadline && rounds < 50 {
        rounds += 1;
        // 16 frames (~1 MiB) a round stay under the cap for a reader that
        // keeps up, and pile up for one that does not.
        reader.write_all(&flood(16)).unwrap();
        for _ in 0..16 {
            read_frame(&mut reader, &mut reader_dec).expect("the reader keeps getting data");
        }
        while let Ok(seen) = h.seen.try_recv() {
            if let Seen::Closed(id, reason) = seen {
                closed = Some((id, reason));
            }
        }
    }
    let (id, reason) = closed.expect("the sleeper was closed");
    assert_eq!(id, sleeper_id);
    assert!(matches!(reason, CloseReason::Slow { .. }), "{reason:?}");
    h.stop();
}

#[test]
fn bad_frame_closes_only_that_connection() {
    let h = start(LoopConfig::default(), None);
    let mut bad = h.client();
    let Seen::Accepted(bad_id) = h.next() else {
        panic!()
    };
    let mut good = h.client();
    bad.write_all(&[0xff, 0xff, 0xff, 0xff, 0]).unwrap();
    match h.next() {
        Seen::Accepted(_) => {}
        other => panic!("{other:?}"),
    }
    match h.next() {
        Seen::Closed(id, CloseReason::Frame(_)) => assert_eq!(id, bad_id),
        other => panic!("{other:?}"),
    }
    let mut buf = [0u8; 16];
    assert!(
        matches!(bad.read(&mut buf), Ok(0) | Err(_)),
        "the bad client sees a close"
    );
    let mut dec = FrameDecoder::new(1024);
    good.write_all(&encode_frame(b"still here")).unwrap();
    assert_eq!(read_frame(&mut good, &mut dec).unwrap(), &b"still here"[..]);
    h.stop();
}

#[test]
fn timers_and_outbound_connects() {
    // A plain listener the loop dials out to.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let h = start(LoopConfig::default(), Some(target.local_addr().unwrap()));
    let mut c = h.client();
    let Seen::Accepted(_) = h.next() else {
        panic!()
    };
    let (mut dialed, _) = target.accept().unwrap();
    dialed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Seen::Connected = h.next() else { panic!() };
    let mut dec = FrameDecoder::new(1024);
    assert_eq!(
        read_frame(&mut dialed, &mut dec).unwrap(),
        &b"queued before connect"[..]
    );
    // Taken before the write that arms the 30 ms timer: it never fires early.
    let started = Instant::now();
    c.write_all(&encode_frame(b"timer")).unwrap();
    let Seen::Timer(7) = h.next() else { panic!() };
    assert!(started.elapsed() >= Duration::from_millis(30));
    h.stop();
}

#[test]
fn failed_connect_is_reported_as_closed() {
    // Bind then drop: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = start(LoopConfig::default(), Some(port));
    let _c = h.client();
    let Seen::Accepted(_) = h.next() else {
        panic!()
    };
    match h.next() {
        Seen::Closed(_, CloseReason::ConnectFailed(_)) => {}
        other => panic!("{other:?}"),
    }
    h.stop();
}

/// Broadcasts, at the end of each turn, a notice for every connection that
/// closed: the shape of a registry pushing `left`.
struct NoticeBoard {
    conns: Vec<ConnId>,
    notices: Vec<Bytes>,
    floods: usize,
    seen: mpsc::Sender<Seen>,
}

impl App for NoticeBoard {
    type Timer = u32;

    fn on_accept(&mut self, _ctx: &mut Ctx<u32>, conn: ConnId, _peer: SocketAddr) {
        self.conns.push(conn);
        let _ = self.seen.send(Seen::Accepted(conn));
    }

    fn on_frame(&mut self, ctx: &mut Ctx<u32>, _conn: ConnId, body: Bytes) {
        if &body[..] == b"stop" {
            ctx.stop(Duration::from_secs(1));
        } else {
            self.floods += 1;
        }
    }

    fn on_closed(&mut self, _ctx: &mut Ctx<u32>, conn: ConnId, reason: &CloseReason) {
        self.conns.retain(|c| *c != conn);
        self.notices.push(encode_frame(b"gone"));
        let _ = self.seen.send(Seen::Closed(conn, reason.clone()));
    }

    fn on_turn_end(&mut self, ctx: &mut Ctx<u32>) {
        let chunk = encode_frame(&vec![b'x'; 60 * 1024]);
        let mut out: Vec<Bytes> = std::mem::take(&mut self.notices);
        for _ in 0..std::mem::take(&mut self.floods) {
            out.extend(std::iter::repeat_n(chunk.clone(), 16));
            out.push(encode_frame(b"end"));
        }
        for conn in self.conns.clone() {
            for frame in &out {
                ctx.send(conn, frame.clone());
            }
        }
    }
}

#[test]
fn what_a_late_close_makes_the_app_send_goes_out_in_the_same_turn() {
    let (tx, rx) = mpsc::channel();
    let (addr_tx, addr_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let config = LoopConfig {
            max_queued: 2 * 1024 * 1024,
            ..LoopConfig::default()
        };
        let mut event_loop = EventLoop::new(config).unwrap();
        addr_tx
            .send(event_loop.listen("127.0.0.1:0".parse().unwrap()).unwrap())
            .unwrap();
        let mut app = NoticeBoard {
            conns: Vec::new(),
            notices: Vec::new(),
            floods: 0,
            seen: tx,
        };
        event_loop.run(&mut app).unwrap();
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let next = || rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let _sleeper = TcpStream::connect(addr).unwrap(); // never reads
    let Seen::Accepted(sleeper) = next() else {
        panic!()
    };
    let mut reader = TcpStream::connect(addr).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let Seen::Accepted(_) = next() else { panic!() };
    let mut dec = FrameDecoder::new(1 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut gone = false;
    for _ in 0..100 {
        assert!(
            Instant::now() < deadline,
            "the sleeper was never closed as slow"
        );
        // One flood a round (about 1 MiB, under the cap for a reader that
        // keeps up); the sleeper's queue grows until it passes the cap,
        // which is found while the turn's broadcast is queued.
        reader.write_all(&encode_frame(b"flood")).unwrap();
        loop {
            let frame = read_frame(&mut reader, &mut dec).expect("the reader keeps getting data");
            if &frame[..] == b"gone" {
                gone = true;
            }
            if &frame[..] == b"end" {
                break;
            }
        }
        if let Ok(Seen::Closed(id, reason)) = rx.try_recv() {
            assert_eq!(id, sleeper);
            assert!(matches!(reason, CloseReason::Slow { .. }), "{reason:?}");
            break;
        }
    }
    // Nothing else happens now: no frames, no timers. The notice the close
    // produced must still arrive.
    while !gone {
        let frame = read_frame(&mut reader, &mut dec).expect("the notice arrives by itself");
        gone = &frame[..] == b"gone";
    }
    reader.write_all(&encode_frame(b"stop")).unwrap();
    thread.join().unwrap();
}

#[test]
fn secured_connections_prove_keys_echo_and_fail_alone() {
    let server = Identity::generate();
    let config = LoopConfig {
        noise: Some(NoiseConfig::new(
            server.clone(),
            peerchat_core::protocol::noise_prologue(),
        )),
        handshake_timeout: Duration::from_millis(300),
        ..LoopConfig::default()
    };
    // A secured listener the loop dials out to.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let h = start(config, Some(target.local_addr().unwrap()));

    let me = Identity::generate();
    let mut c =
        SecureStream::connect(h.client(), &me, &peerchat_core::protocol::noise_prologue()).unwrap();
    assert_eq!(c.remote_key(), server.public());
    assert!(matches!(h.next(), Seen::Key(k) if k == me.public()));
    let Seen::Accepted(_) = h.next() else {
        panic!()
    };

    // The loop dials out once it accepted; frames sent before the handshake
    // was done are refused, not leaked.
    let (dialed, _) = target.accept().unwrap();
    dialed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let other = Identity::generate();
    let mut dialed =
        SecureStream::accept(dialed, &other, &peerchat_core::protocol::noise_prologue()).unwrap();
    assert_eq!(dialed.remote_key(), server.public());
    assert!(matches!(h.next(), Seen::Key(k) if k == other.public()));
    let Seen::Connected = h.next() else { panic!() };
    assert_eq!(dialed.read_frame().unwrap().unwrap(), &b"secured hello"[..]);

    // Two frames larger than half a Noise message each, in one write: the
    // frame stream is split across Noise messages and put together again.
    let big: Vec<u8> = (0..65_000u32).map(|i| i as u8).collect();
    let mut two = encode_frame(&big).to_vec();
    two.extend_from_slice(&encode_frame(b"small"));
    two.extend_from_slice(&encode_frame(&big));
    c.write_plain(&two).unwrap();
    assert_eq!(c.read_frame().unwrap().unwrap(), &big[..]);
    assert_eq!(c.read_frame().unwrap().unwrap(), &b"small"[..]);
    assert_eq!(c.read_frame().unwrap().unwrap(), &big[..]);

    // Plaintext is not a handshake; the loop never tells the app of it.
    let mut plain = h.client();
    plain.write_all(&encode_frame(b"hello")).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(plain.read(&mut buf), Ok(0) | Err(_)));

    // A tampered message closes that connection alone.
    let mut tamper = SecureStream::connect(
        h.client(),
        &Identity::generate(),
        &peerchat_core::protocol::noise_prologue(),
    )
    .unwrap();
    let Seen::Key(_) = h.next() else { panic!() };
    let Seen::Accepted(tampered_id) = h.next() else {
        panic!()
    };
    let mut wire = tamper.seal(&encode_frame(b"x")).unwrap();
    wire[3] ^= 0x40;
    tamper.get_mut().write_all(&wire).unwrap();
    match h.next() {
        Seen::Closed(id, CloseReason::Secure(SecureError::Decrypt)) => {
            assert_eq!(id, tampered_id)
        }
        other => panic!("{other:?}"),
    }

    // So does a connection that ends inside a message.
    let mut cut = SecureStream::connect(
        h.client(),
        &Identity::generate(),
        &peerchat_core::protocol::noise_prologue(),
    )
    .unwrap();
    let Seen::Key(_) = h.next() else { panic!() };
    let Seen::Accepted(cut_id) = h.next() else {
        panic!()
    };
    let wire = cut.seal(&encode_frame(b"never whole")).unwrap();
    cut.get_mut().write_all(&wire[..wire.len() - 5]).unwrap();
    cut.get_mut().shutdown(std::net::Shutdown::Write).unwrap();
    match h.next() {
        Seen::Closed(id, CloseReason::Secure(SecureError::Truncated(n))) => {
            assert_eq!((id, n), (cut_id, wire.len() - 5))
        }
        other => panic!("{other:?}"),
    }

    // A connection that never starts its handshake is dropped at the deadline.
    let started = Instant::now();
    let mut silent = h.client();
    assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(300));

    c.write_plain(&encode_frame(b"still here")).unwrap();
    assert_eq!(c.read_frame().unwrap().unwrap(), &b"still here"[..]);
    c.write_plain(&encode_frame(b"stop")).unwrap();
    h.thread.join().unwrap();
}
