//! Summaries of measured samples, for the benches and the load generator
//! alike: the figures in BENCHMARKS.md must mean the same wherever they come
//! from.

use std::time::Duration;

/// The `p`-th percentile (`p` in 0..=100) of `sorted`, by nearest rank: the
/// smallest sample with at least `p` percent of all samples at or below it,
/// so that it is always a measured value (zero for no samples).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
