//! Compares the three serde CBOR crates on peerchat's own messages, to back
//! the codec choice recorded in `BENCHMARKS.md`.
//!
//! For a heartbeat, a welcome carrying a 1000-peer snapshot and a chat
//! message, it measures encoding to a fresh `Vec<u8>` and decoding back to
//! the typed message with serde_cbor, ciborium and minicbor-serde, and the
//! same through `peerchat_core::codec`, whose `decode` runs the `validate`
//! pre-scan before minicbor-serde. `validate` alone is measured too, so its
//! share of `codec::decode` can be read off directly.
//!
//! Run with `cargo bench --bench codec`. Encoded sizes, and whether the
//! crates' bytes agree, go to stderr before each message's measurements.

use std::fmt::Debug;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use peerchat_core::codec;
use peerchat_core::identity::{Identity, KEY_LEN};
use peerchat_core::protocol::{FromRegistry, LinkMsg, PeerEntry, ToRegistry, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn heartbeat() -> ToRegistry {
    ToRegistry::Heartbeat {}
}

/// The largest message the registry sends routinely: what a peer gets on
/// joining a busy registry. Each entry carries its peer's public key (a
/// 32-byte byte string); the keys are real X25519 keys made from fixed
/// private keys, so every run encodes the same bytes.
fn welcome_1000() -> FromRegistry {
    let peers = (1..=1000u32)
        .map(|i| {
            let mut private = [0u8; KEY_LEN];
            private[..4].copy_from_slice(&i.to_be_bytes());
            private[KEY_LEN - 1] = 0x5a;
            PeerEntry {
                name: format!("peer-{i:04}"),
                addr: format!("127.0.0.1:{}", 40000 + i),
                key: Identity::from_private(&private).public(),
                reachable: None,
            }
        })
        .collect();
    FromRegistry::Welcome {
        version: PROTOCOL_VERSION,
        name: "alice".into(),
        addr: "127.0.0.1:40000".into(),
        heartbeat_ms: 5000,
        timeout_ms: 15000,
        probes: false,
        more: false,
        peers,
    }
}

fn chat() -> LinkMsg {
    // Non-ASCII on purpose: decoders must check UTF-8, and multi-byte
    // characters are the normal case for many users.
    let text = "Salut Zoë! Still on for 14:00 tomorrow? 张伟 says the café on Rue Oberkampf is shut — plan B 🎉";
    assert!((90..=110).contains(&text.len()), "{} bytes", text.len());
    LinkMsg::Chat {
        id: 123_456,
        text: text.into(),
        direct: true,
        sent_at: Some(1_796_000_000_000),
    }
}

fn serde_cbor_encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_cbor::to_vec(msg).unwrap()
}

fn serde_cbor_decode<T: DeserializeOwned>(body: &[u8]) -> T {
    serde_cbor::from_slice(body).unwrap()
}

fn ciborium_encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).unwrap();
    out
}

fn ciborium_decode<T: DeserializeOwned>(body: &[u8]) -> T {
    ciborium::from_reader(body).unwrap()
}

fn minicbor_encode<T: Serialize>(msg: &T) -> Vec<u8> {
    minicbor_serde::to_vec(msg).unwrap()
}

fn minicbor_decode<T: DeserializeOwned>(body: &[u8]) -> T {
    minicbor_serde::from_slice(body).unwrap()
}

fn peerchat_encode<T: Serialize>(msg: &T) -> Vec<u8> {
    codec::encode(msg).unwrap()
}

fn peerchat_decode<T: DeserializeOwned>(body: &[u8]) -> T {
    codec::decode(body).unwrap()
}

type Encoder<T> = fn(&T) -> Vec<u8>;
type Decoder<T> = fn(&[u8]) -> T;

/// Each contender as (name, encode, decode). Generic functions rather than
/// closures so that every crate is called the same way and nothing but the
/// crate differs between the lines of a group.
fn contenders<T: Serialize + DeserializeOwned>() -> [(&'static str, Encoder<T>, Decoder<T>); 4] {
    [
        ("serde_cbor", serde_cbor_encode, serde_cbor_decode),
        ("ciborium", ciborium_encode, ciborium_decode),
        ("minicbor-serde", minicbor_encode, minicbor_decode),
        ("peerchat codec", peerchat_encode, peerchat_decode),
    ]
}

fn bench_message<T>(c: &mut Criterion, label: &str, msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let contenders = contenders::<T>();

    // Checked once, outside timing: a crate that is fast because it gets
    // our messages wrong must not win.
    let bodies: Vec<Vec<u8>> = contenders
        .iter()
        .map(|(name, encode, decode)| {
            let body = encode(msg);
            assert_eq!(&decode(&body), msg, "{name} does not round-trip {label}");
            eprintln!("{label}: {name} encodes to {} bytes", body.len());
            body
        })
        .collect();
    // All three follow serde's externally tagged layout with string keys, so
    // the timings compare identical work only if the bytes agree too.
    let identical = bodies.windows(2).all(|w| w[0] == w[1]);
    eprintln!("{label}: encodings identical across crates: {identical}");

    let mut group = c.benchmark_group(format!("{label}/encode"));
    for (name, encode, _) in &contenders {
        group.bench_function(*name, |b| b.iter(|| encode(black_box(msg))));
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{label}/decode"));
    for ((name, _, decode), body) in contenders.iter().zip(&bodies) {
        group.bench_function(*name, |b| b.iter(|| decode(black_box(body))));
    }
    // The difference between "peerchat codec" and "minicbor-serde" should
    // be this; measuring it alone shows whether that holds.
    let body = &bodies[3];
    group.bench_function("validate only", |b| {
        b.iter(|| codec::validate(black_box(body)).unwrap())
    });
    group.finish();
}

fn codec_benches(c: &mut Criterion) {
    bench_message(c, "heartbeat", &heartbeat());
    bench_message(c, "welcome_1000", &welcome_1000());
    bench_message(c, "chat", &chat());
}

criterion_group! {
    name = benches;
    // Short runs: the differences that matter here are large, and the whole
    // file has to run in about a minute on a 2-core machine. Plots and the
    // default 100,000 bootstrap resamples would double that for nothing
    // `BENCHMARKS.md` uses; `--plotting-backend` still turns plots back on.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
        .nresamples(10_000)
        .without_plots();
    targets = codec_benches
}
criterion_main!(benches);
