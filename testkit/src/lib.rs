//! The harness shared by the end-to-end tests in `tests/`, the benches in
//! `benches/`, the fuzz targets in `fuzz/` and the load generator: written
//! once here so that a fix to how a process is started, a frame is built or
//! a percentile is taken reaches every one of them.
//!
//! Only [`stats`] and [`checks`] build without the default `harness`
//! feature: the load generator and the fuzzers need nothing else.

pub mod checks;
pub mod stats;

#[cfg(feature = "harness")]
pub mod bins;
#[cfg(feature = "harness")]
pub mod client;
#[cfg(feature = "harness")]
pub mod fake;
#[cfg(feature = "harness")]
pub mod launch;
#[cfg(feature = "harness")]
pub mod process;
#[cfg(feature = "harness")]
pub mod procfs;
#[cfg(feature = "harness")]
pub mod world;
