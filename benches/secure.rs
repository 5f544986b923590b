//! What a Noise session costs, in memory, without sockets: a whole XX
//! handshake (both sides), sealing and opening through `SecureChannel`, and
//! the two ciphers Noise offers side by side, to show why peerchat uses
//! AES-GCM (see BENCHMARKS.md, "Encryption").
//!
//! Run with `cargo bench --bench secure`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use peerchat_core::identity::Identity;
use peerchat_core::secure::{self, SecureChannel};

/// Message sizes: a one-change update or a chat, a larger chat, and a
/// snapshot frame.
const SIZES: [usize; 3] = [64, 1000, 60_000];

/// Both sides of a completed handshake, in memory.
fn handshake(a: &Identity, b: &Identity) -> (SecureChannel, SecureChannel) {
    let mut scratch = secure::scratch();
    let mut to_b = Vec::new();
    let mut dialer =
        SecureChannel::initiator(a, &peerchat_core::protocol::noise_prologue(), &mut to_b);
    let mut listener = SecureChannel::responder(b, &peerchat_core::protocol::noise_prologue());
    let mut to_a = Vec::new();
    let mut none = |_: &[u8]| {};
    listener
        .receive(&to_b, &mut scratch, &mut to_a, &mut none)
        .unwrap();
    to_b.clear();
    dialer
        .receive(&to_a, &mut scratch, &mut to_b, &mut none)
        .unwrap();
    to_a.clear();
    listener
        .receive(&to_b, &mut scratch, &mut to_a, &mut none)
        .unwrap();
    assert!(dialer.is_established() && listener.is_established());
    (dialer, listener)
}

fn bench_handshake(c: &mut Criterion) {
    let (a, b) = (Identity::generate(), Identity::generate());
    c.bench_function("noise_xx_handshake_both_sides", |bench| {
        bench.iter(|| black_box(handshake(&a, &b)))
    });
}

fn bench_channel(c: &mut Criterion) {
    let (a, b) = (Identity::generate(), Identity::generate());
    let (mut dialer, mut listener) = handshake(&a, &b);
    let mut scratch = secure::scratch();
    let mut group = c.benchmark_group("secure_channel_seal_and_open");
    for size in SIZES {
        let plain = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &plain, |bench, plain| {
            let mut wire = Vec::with_capacity(size + 64);
            let mut opened = 0;
            bench.iter(|| {
                wire.clear();
                dialer.seal(plain, &mut wire).unwrap();
                listener
                    .receive(&wire, &mut scratch, &mut Vec::new(), &mut |p| {
                        opened += p.len()
                    })
                    .unwrap();
            });
            black_box(opened);
        });
    }
    group.finish();
}

/// The two transport ciphers through snow itself, one message sealed and
/// opened per iteration.
fn bench_ciphers(c: &mut Criterion) {
    let mut group = c.benchmark_group("noise_cipher_seal_and_open");
    for cipher in ["ChaChaPoly", "AESGCM"] {
        let pattern = format!("Noise_XX_25519_{cipher}_BLAKE2s");
        let (mut sender, mut receiver) = snow_pair(&pattern);
        for size in SIZES {
            let plain = vec![0x5a; size];
            let mut wire = vec![0; size + 16];
            let mut out = vec![0; size + 16];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(cipher, size), |bench| {
                bench.iter(|| {
                    let n = sender.write_message(&plain, &mut wire).unwrap();
                    receiver.read_message(&wire[..n], &mut out).unwrap()
                })
            });
        }
    }
    group.finish();
}

fn snow_pair(pattern: &str) -> (snow::TransportState, snow::TransportState) {
    let params: snow::params::NoiseParams = pattern.parse().unwrap();
    let keypair = || {
        snow::Builder::new(params.clone())
            .generate_keypair()
            .unwrap()
    };
    let (ka, kb) = (keypair(), keypair());
    let mut a = snow::Builder::new(params.clone())
        .local_private_key(&ka.private)
        .and_then(|b| b.build_initiator())
        .unwrap();
    let mut b = snow::Builder::new(params.clone())
        .local_private_key(&kb.private)
        .and_then(|b| b.build_responder())
        .unwrap();
    let (mut msg, mut payload) = ([0u8; 256], [0u8; 256]);
    let n = a.write_message(&[], &mut msg).unwrap();
    b.read_message(&msg[..n], &mut payload).unwrap();
    let n = b.write_message(&[], &mut msg).unwrap();
    a.read_message(&msg[..n], &mut payload).unwrap();
    let n = a.write_message(&[], &mut msg).unwrap();
    b.read_message(&msg[..n], &mut payload).unwrap();
    (
        a.into_transport_mode().unwrap(),
        b.into_transport_mode().unwrap(),
    )
}

criterion_group!(benches, bench_handshake, bench_channel, bench_ciphers);
criterion_main!(benches);
