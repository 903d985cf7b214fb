//! Small statistics for the benchmarks that reuse this support.

/// The `p`th percentile (0-100) of `sorted` (ascending), nearest rank; 0
/// for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
