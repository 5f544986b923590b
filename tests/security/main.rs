//! What the Noise sessions and the keys buy, end to end, with the real
//! `registry` and `peer --json` binaries on loopback: an eavesdropper on the
//! path learns nothing, a name belongs to its key, a peer's pins catch a
//! registry that lies, broken sessions close alone, and key files are kept
//! private. One module per concern, one test binary.

mod eavesdropper;
mod key_files;
mod names;
mod pins;
mod sessions;
