//! peerchat's core: what the registry and the peer share.
//!
//! - [`wire`]: the length-prefixed frame format (sans-IO).
//! - [`codec`]: CBOR encoding behind one small interface.
//! - [`protocol`]: the message types and their version.
//! - [`names`]: the rules for peer names, and when two names look alike.
//! - [`identity`]: static key pairs and their key files.
//! - [`secure`]: Noise sessions (sans-IO) that every connection runs in.
//! - [`timer`]: a hashed timer wheel driven by a `now` passed in.
//! - [`transport`]: one connection's Noise session, framing and queues (sans-IO).
//! - [`event_loop`]: the single-threaded mio loop that moves bytes and time.
//! - [`machine`]: the contract of the registry's and the peer's state
//!   machines, and the driver that runs one on the loop.
//! - `args` (feature `cli`): command-line parsing shared by the binaries.
//! - [`limits`]: raising the process limits that many connections need.
//! - [`trusted_file`]: files that decide whom we trust, read and replaced safely.

#[cfg(feature = "cli")]
pub mod args;
pub mod codec;
mod conn;
pub mod event_loop;
pub mod file_name;
pub mod identity;
pub mod limits;
pub mod machine;
pub mod names;
pub mod protocol;
pub mod secure;
pub mod timer;
pub mod transport;
pub mod trusted_file;
pub mod wire;

pub use event_loop::{App, CloseReason, ConnId, Ctx, EventLoop, LoopConfig, LoopStats};

/// A directory of this test process's own under the system's temporary
/// directory, empty (removed if a run before left it).
#[cfg(test)]
pub(crate) fn fresh_test_dir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("peerchat-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
