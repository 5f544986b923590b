//! Replays the fuzzers' seed corpus (`fuzz/corpus/<target>/`) through the
//! same checks the cargo-fuzz targets run, so every `cargo test` on stable
//! exercises them. New crashes found by fuzzing go into the corpus as files.

use std::path::Path;

use peerchat_core::protocol::{FromRegistry, LinkMsg, ToRegistry};
use peerchat_testkit::checks;

/// Runs `check` on every file of one target's corpus; returns how many.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its check", path.display());
        count += 1;
    }
    count
}

#[test]
fn frame_decoder_corpus() {
    assert!(replay("frame_decoder", checks::frame_decoder) >= 5);
}

#[test]
fn to_registry_corpus() {
    assert!(replay("to_registry", checks::message::<ToRegistry>) >= 10);
}

#[test]
fn from_registry_corpus() {
    assert!(replay("from_registry", checks::message::<FromRegistry>) >= 10);
}

#[test]
fn link_msg_corpus() {
    assert!(replay("link_msg", checks::message::<LinkMsg>) >= 10);
}

#[test]
fn noise_responder_corpus() {
    assert!(replay("noise_responder", checks::noise_responder) >= 10);
}

#[test]
fn file_name_corpus() {
    assert!(replay("file_name", checks::file_name) >= 10);
}
