use super::*;
use crate::identity::Identity;
use crate::wire::{encode_frame, DEFAULT_MAX_FRAME};

fn noise() -> NoiseConfig {
    NoiseConfig::new(Identity::generate(), b"peerchat protocol test".to_vec())
}

/// Everything `from` has queued, as the wire would carry it.
fn wire(from: &mut Transport) -> Vec<u8> {
    let mut bytes = Vec::new();
    let (written, _) = from.write_to(&mut bytes, &mut Vec::new()).unwrap();
    assert_eq!(written, Written::All);
    bytes
}

/// Feeds all of `bytes`, a Noise message at a time, leaving their frames
/// queued: whether the handshake completed on the way.
fn take_all(t: &mut Transport, mut bytes: &[u8], scratch: &mut [u8]) -> bool {
    let mut completed = false;
    while !bytes.is_empty() {
        let step = t.receive(bytes, scratch).unwrap();
        completed |= step.completed;
        bytes = &bytes[step.consumed..];
    }
    completed
}

/// Moves bytes both ways until neither side has anything queued.
fn settle(a: &mut Transport, b: &mut Transport) {
    let mut scratch = secure::scratch();
    for _ in 0..8 {
        let to_b = wire(a);
        take_all(b, &to_b, &mut scratch);
        let to_a = wire(b);
        take_all(a, &to_a, &mut scratch);
        if a.queued() == 0 && b.queued() == 0 {
            return;
        }
    }
    panic!("the transports never settled");
}

fn frames(t: &mut Transport) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(frame) = t.next_frame().unwrap() {
        out.push(frame);
    }
    out
}

fn secured_pair(max_frame: usize) -> (Transport, Transport, NoiseConfig, NoiseConfig) {
    let (a_keys, b_keys) = (noise(), noise());
    let b_keys = NoiseConfig {
        prologue: a_keys.prologue.clone(),
        ..b_keys
    };
    let mut dialer = Transport::secured(Role::Dialer, &a_keys, max_frame);
    let mut acceptor = Transport::secured(Role::Acceptor, &b_keys, max_frame);
    assert!(!dialer.is_established() && !acceptor.is_established());
    settle(&mut dialer, &mut acceptor);
    (dialer, acceptor, a_keys, b_keys)
}

#[test]
fn a_handshake_through_memory_proves_both_keys_and_carries_frames() {
    let (mut dialer, mut acceptor, a_keys, b_keys) = secured_pair(DEFAULT_MAX_FRAME);
    assert!(dialer.is_established() && acceptor.is_established());
    assert_eq!(dialer.remote_key(), Some(b_keys.identity.public()));
    assert_eq!(acceptor.remote_key(), Some(a_keys.identity.public()));

    dialer.send(encode_frame(b"one"));
    dialer.send(encode_frame(b"two"));
    let bytes = wire(&mut dialer);
    // Split anyhow: one byte at a time.
    let mut scratch = secure::scratch();
    for byte in bytes.chunks(1) {
        assert!(!take_all(&mut acceptor, byte, &mut scratch));
    }
    assert_eq!(frames(&mut acceptor), vec![&b"one"[..], &b"two"[..]]);
}

#[test]
fn another_prologue_fails_the_handshake_at_once() {
    let a_keys = noise();
    let b_keys = NoiseConfig::new(Identity::generate(), b"another version".to_vec());
    let mut dialer = Transport::secured(Role::Dialer, &a_keys, DEFAULT_MAX_FRAME);
    let mut acceptor = Transport::secured(Role::Acceptor, &b_keys, DEFAULT_MAX_FRAME);
    let mut scratch = secure::scratch();
    acceptor.receive(&wire(&mut dialer), &mut scratch).unwrap();
    let result = dialer.receive(&wire(&mut acceptor), &mut scratch);
    assert!(
        matches!(result, Err(SecureError::Handshake(_))),
        "{result:?}"
    );
}

#[test]
fn a_frame_over_the_limit_is_bad_framing_after_the_frames_before_it() {
    let (mut dialer, mut acceptor, ..) = secured_pair(DEFAULT_MAX_FRAME);
    acceptor.set_max_frame(100);
    dialer.send(encode_frame(b"fine"));
    let mut bytes = wire(&mut dialer);
    dialer.send(encode_frame(&[7; 200]));
    bytes.extend(wire(&mut dialer));

    let mut scratch = secure::scratch();
    assert!(!take_all(&mut acceptor, &bytes, &mut scratch));
    assert_eq!(
        acceptor.next_frame().unwrap().as_deref(),
        Some(&b"fine"[..])
    );
    assert_eq!(
        acceptor.next_frame(),
        Err(TransportError::Frame(FrameError::TooLarge {
            len: 200,
            max: 100
        }))
    );
    // The session still seals, so the other side can be told why.
    acceptor.send(encode_frame(b"too large"));
    assert!(!wire(&mut acceptor).is_empty());
}

#[test]
fn a_limit_raised_by_a_frame_applies_to_the_next_message_of_the_same_read() {
    let (mut dialer, mut acceptor, ..) = secured_pair(DEFAULT_MAX_FRAME);
    acceptor.set_max_frame(100);
    dialer.send(encode_frame(b"register"));
    let mut bytes = wire(&mut dialer);
    let first_message = bytes.len();
    dialer.send(encode_frame(&[7; 200]));
    bytes.extend(wire(&mut dialer));

    let mut scratch = secure::scratch();
    let step = acceptor.receive(&bytes, &mut scratch).unwrap();
    assert_eq!(step.consumed, first_message, "one Noise message at a time");
    assert_eq!(
        acceptor.next_frame().unwrap().as_deref(),
        Some(&b"register"[..])
    );
    acceptor.set_max_frame(1000);
    assert!(!take_all(
        &mut acceptor,
        &bytes[first_message..],
        &mut scratch
    ));
    assert_eq!(frames(&mut acceptor), vec![&[7u8; 200][..]]);
}

#[test]
fn a_tampered_message_fails_the_session_after_the_frames_before_it() {
    let (mut dialer, mut acceptor, ..) = secured_pair(DEFAULT_MAX_FRAME);
    dialer.send(encode_frame(b"leave"));
    let mut bytes = wire(&mut dialer);
    dialer.send(encode_frame(b"forged"));
    let mut second = wire(&mut dialer);
    let last = second.len() - 1;
    second[last] ^= 1;
    bytes.extend(second);

    let mut scratch = secure::scratch();
    take_all(&mut acceptor, &bytes, &mut scratch);
    assert_eq!(
        acceptor.next_frame().unwrap().as_deref(),
        Some(&b"leave"[..])
    );
    assert_eq!(
        acceptor.next_frame(),
        Err(TransportError::Secure(SecureError::Decrypt))
    );
}

#[test]
fn an_end_inside_a_noise_message_is_reported() {
    let (mut dialer, mut acceptor, ..) = secured_pair(DEFAULT_MAX_FRAME);
    assert_eq!(acceptor.end_of_input(), Ok(()));
    dialer.send(encode_frame(b"cut short"));
    let bytes = wire(&mut dialer);
    let mut scratch = secure::scratch();
    acceptor.receive(&bytes[..5], &mut scratch).unwrap();
    assert_eq!(acceptor.end_of_input(), Err(SecureError::Truncated(5)));
}

#[test]
fn frames_sent_before_the_handshake_wait_and_are_sealed_together() {
    let a_keys = noise();
    let b_keys = NoiseConfig::new(Identity::generate(), a_keys.prologue.clone());
    let mut dialer = Transport::secured(Role::Dialer, &a_keys, DEFAULT_MAX_FRAME);
    let mut acceptor = Transport::secured(Role::Acceptor, &b_keys, DEFAULT_MAX_FRAME);
    let first = wire(&mut dialer);
    acceptor.send(encode_frame(b"early"));
    acceptor.send(encode_frame(b"also early"));
    let mut scratch = secure::scratch();
    take_all(&mut acceptor, &first, &mut scratch);
    // The acceptor's handshake reply goes out; its frames wait for the
    // session.
    let reply = wire(&mut acceptor);
    assert!(acceptor.queued() > 0);
    take_all(&mut dialer, &reply, &mut scratch);
    settle(&mut dialer, &mut acceptor);
    assert_eq!(frames(&mut dialer), vec![&b"early"[..], &b"also early"[..]]);
}

#[test]
fn a_plain_transport_passes_frames_as_they_are() {
    let mut a = Transport::plain(DEFAULT_MAX_FRAME);
    let mut b = Transport::plain(8);
    assert!(a.is_established() && a.remote_key().is_none());
    a.send(encode_frame(b"hi"));
    a.send(encode_frame(b"a frame too long"));
    let bytes = wire(&mut a);
    assert_eq!(&bytes[..6], &encode_frame(b"hi")[..]);
    b.receive(&bytes, &mut []).unwrap();
    assert_eq!(b.next_frame().unwrap().as_deref(), Some(&b"hi"[..]));
    assert_eq!(
        b.next_frame(),
        Err(TransportError::Frame(FrameError::TooLarge {
            len: 16,
            max: 8
        }))
    );
}

/// A writer that takes a few bytes, then would block.
struct Trickle(Vec<u8>, usize);

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.1 == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.1);
        self.1 -= n;
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_blocked_writer_keeps_the_rest_queued_in_order() {
    let mut t = Transport::plain(DEFAULT_MAX_FRAME);
    t.send(encode_frame(b"abcdef"));
    t.send(encode_frame(b"ghij"));
    let total = t.queued();
    let mut writer = Trickle(Vec::new(), 7);
    let (written, bytes) = t.write_to(&mut writer, &mut Vec::new()).unwrap();
    assert_eq!((written, bytes), (Written::Blocked, 7));
    assert_eq!(t.queued(), total - 7);
    writer.1 = usize::MAX;
    let (written, bytes) = t.write_to(&mut writer, &mut Vec::new()).unwrap();
    assert_eq!((written, bytes), (Written::All, total - 7));
    let mut expected = encode_frame(b"abcdef").to_vec();
    expected.extend_from_slice(&encode_frame(b"ghij"));
    assert_eq!(writer.0, expected);
}

#[test]
fn small_frames_share_a_message_and_large_ones_are_sealed_alone_in_order() {
    let (mut dialer, mut acceptor, _, _) = secured_pair(128 * 1024);
    let sizes = [3, 40, GATHER_BELOW, 5, secure::MAX_PLAINTEXT + 100, 7];
    let sent: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| encode_frame(&vec![i as u8; len]))
        .collect();
    for frame in &sent {
        dialer.send(frame.clone());
    }
    let bytes = wire(&mut dialer);
    // The two first frames together, the large one, the small one after
    // it, the one over a message's limit in two, the last small one.
    let messages = secure::messages(&bytes).len();
    assert_eq!(messages, 6);
    let plain: usize = sent.iter().map(Bytes::len).sum();
    assert_eq!(bytes.len(), plain + messages * SEAL_OVERHEAD);
    take_all(&mut acceptor, &bytes, &mut secure::scratch());
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| vec![i as u8; len])
        .collect();
    assert_eq!(frames(&mut acceptor), bodies);
}
