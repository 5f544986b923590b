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
use ring::aead;

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

/// The two AEADs Noise offers, through ring, one message sealed and opened
/// per iteration: with the key expanded once, and (AES-GCM) expanded for
/// each message, as peerchat's cipher does to keep idle sessions small.
fn bench_ciphers(c: &mut Criterion) {
    let mut group = c.benchmark_group("noise_cipher_seal_and_open");
    let ciphers: [(&str, &'static aead::Algorithm, bool); 3] = [
        ("ChaChaPoly", &aead::CHACHA20_POLY1305, false),
        ("AESGCM", &aead::AES_256_GCM, false),
        ("AESGCM_key_per_message", &aead::AES_256_GCM, true),
    ];
    for (name, algorithm, expand_each_time) in ciphers {
        let key_bytes = [0x42; 32];
        let expand =
            || aead::LessSafeKey::new(aead::UnboundKey::new(algorithm, &key_bytes).unwrap());
        let kept = expand();
        for size in SIZES {
            let plain = vec![0x5a; size];
            let mut buffer = vec![0; size];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(name, size), |bench| {
                let mut counter = 0u64;
                bench.iter(|| {
                    counter += 1;
                    let mut nonce = [0u8; 12];
                    nonce[4..].copy_from_slice(&counter.to_be_bytes());
                    let fresh;
                    let key = if expand_each_time {
                        fresh = expand();
                        &fresh
                    } else {
                        &kept
                    };
                    buffer.copy_from_slice(&plain);
                    let nonce_for = || aead::Nonce::assume_unique_for_key(nonce);
                    let tag = key
                        .seal_in_place_separate_tag(nonce_for(), aead::Aad::empty(), &mut buffer)
                        .unwrap();
                    let opening = if expand_each_time { &expand() } else { &kept };
                    opening
                        .open_in_place_separate_tag(
                            nonce_for(),
                            aead::Aad::empty(),
                            tag,
                            &mut buffer,
                            0..,
                        )
                        .unwrap()
                        .len()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_handshake, bench_channel, bench_ciphers);
criterion_main!(benches);
