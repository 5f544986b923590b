//! Broken sessions close alone: tampered and truncated Noise messages end
//! only their own connection.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use peerchat_core::identity::Identity;
use peerchat_core::protocol::{self, Change, FromRegistry, LinkMsg, ToRegistry, PROTOCOL_VERSION};
use peerchat_core::secure::SecureStream;
use peerchat_testkit::client::{is_reset, Client, Next};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};

#[test]
fn tampered_and_truncated_noise_messages_close_only_their_connection() {
    // The bystander b hears that `name` is gone and is still answered.
    fn gone_and_still_served(b: &mut Client, name: &str) {
        assert_eq!(
            b.recv(),
            Some(FromRegistry::Update {
                changes: vec![Change::Left {
                    name: name.into(),
                    reason: "disconnected".into()
                }]
            })
        );
        b.send(&ToRegistry::Heartbeat {});
        assert_eq!(
            b.next(Duration::from_secs(2)),
            Next::Msg(FromRegistry::Heartbeat {})
        );
    }
    let reg = Registry::start(&[]);
    let (mut b, _) = Client::register(reg.addr, "b", 4002);
    let (mut a, _) = Client::register(reg.addr, "a", 4001);
    assert!(matches!(b.recv(), Some(FromRegistry::Update { .. })));

    // A flipped byte in a sealed heartbeat: a is closed without a word.
    let mut wire = a
        .conn
        .seal(&protocol::frame(&ToRegistry::Heartbeat {}))
        .unwrap();
    wire[5] ^= 0x20;
    a.send_wire(&wire).unwrap();
    assert!(a.closed_within(Duration::from_secs(2)), "a is closed");
    gone_and_still_served(&mut b, "a");

    // Part of a Noise message, then the end of the stream: c is closed.
    let (mut c, _) = Client::register(reg.addr, "c", 4003);
    assert!(matches!(b.recv(), Some(FromRegistry::Update { .. })));
    let wire = c
        .conn
        .seal(&protocol::frame(&ToRegistry::Heartbeat {}))
        .unwrap();
    c.send_wire(&wire[..wire.len() / 2]).unwrap();
    c.stream().shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_within(Duration::from_secs(2)), "c is closed");
    gone_and_still_served(&mut b, "c");
    // And a newcomer still registers.
    let (_d, welcome) = Client::register(reg.addr, "d", 4004);
    assert!(
        matches!(welcome, FromRegistry::Welcome { .. }),
        "{welcome:?}"
    );

    // The same against a peer's listening socket.
    let mut alice = PeerProc::start("alice", reg.addr);
    let alice_addr: SocketAddr = alice.registered()["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let hello = protocol::frame(&LinkMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "mallory".into(),
        instance: 1,
    });
    for truncated in [false, true] {
        let stream = TcpStream::connect(alice_addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut link = SecureStream::connect(
            stream,
            &Identity::generate(),
            &peerchat_core::protocol::noise_prologue(),
        )
        .unwrap();
        assert_eq!(link.remote_key(), alice.key());
        let mut wire = link.seal(&hello).unwrap();
        if truncated {
            wire.truncate(wire.len() - 4);
            link.get_mut().write_all(&wire).unwrap();
            link.get_ref().shutdown(Shutdown::Write).unwrap();
        } else {
            let last = wire.len() - 1;
            wire[last] ^= 0x01;
            link.get_mut().write_all(&wire).unwrap();
        }
        let started = Instant::now();
        let end = link.read_frame();
        assert!(
            matches!(end, Ok(None)) || end.as_ref().is_err_and(is_reset),
            "the link is closed without a word: {end:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let mut bob = PeerProc::start("bob", reg.addr);
    bob.registered();
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    bob.say("/msg alice still here?");
    alice.expect("bob's message", LONG, is("message", "text", "still here?"));
    bob.expect_event("delivered", LONG);
    assert_eq!(alice.count(|v| v["event"] == "message"), 1);
    assert!(
        alice.proc.child.try_wait().unwrap().is_none(),
        "alice is alive"
    );
}
