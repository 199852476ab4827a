//! Latency summaries: percentiles over a list of durations.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

/// Summary of a latency distribution. Percentiles use the nearest-rank method:
/// the p-th percentile is the smallest sample such that at least p % of the
/// samples are less than or equal to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub mean: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted in place). An empty list gives all zeros.
    pub fn of(samples: &mut [Duration]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let count = samples.len();
        Summary {
            count,
            min: samples[0],
            mean: total / u32::try_from(count).unwrap_or(u32::MAX),
            p50: percentile_sorted(samples, 50.0),
            p90: percentile_sorted(samples, 90.0),
            p99: percentile_sorted(samples, 99.0),
            max: samples[count - 1],
        }
    }

    /// The same figures in whole microseconds, for JSON.
    pub fn micros(&self) -> SummaryMicros {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        SummaryMicros {
            count: self.count,
            min_us: us(self.min),
            mean_us: us(self.mean),
            p50_us: us(self.p50),
            p90_us: us(self.p90),
            p99_us: us(self.p99),
            max_us: us(self.max),
        }
    }
}

/// [`Summary`] in microseconds, as written to the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SummaryMicros {
    pub count: usize,
    pub min_us: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Nearest-rank percentile `p` (0–100) of an ascending, non-empty slice.
///
/// # Panics
/// If `sorted` is empty.
pub fn percentile_sorted(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of an empty sample");
    let n = sorted.len();
    // rank = ceil(p/100 * n), clamped to 1..=n; index = rank - 1.
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Milliseconds with two decimals, for the table.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// A latency table: a header and one row per `(name, summary)`, in ms,
/// the names in a column `width` wide.
pub fn write_latency_table(
    t: &mut String,
    width: usize,
    rows: &[(String, &Summary)],
) -> std::fmt::Result {
    writeln!(
        t,
        "  {:<width$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "max", "mean"
    )?;
    for (name, s) in rows {
        writeln!(
            t,
            "  {:<width$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            s.count,
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            ms(s.mean)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Summary::of(&mut []), Summary::default());
    }

    #[test]
    fn single_sample() {
        let s = Summary::of(&mut ms_list(&[7]));
        assert_eq!(s.count, 1);
        for d in [s.min, s.mean, s.p50, s.p90, s.p99, s.max] {
            assert_eq!(d, Duration::from_millis(7));
        }
    }

    #[test]
    fn one_to_hundred_unsorted() {
        // 100, 99, ..., 1 ms: nearest rank gives exactly p ms.
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&mut v);
        assert_eq!(s.count, 100);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.mean, Duration::from_micros(50_500));
    }

    #[test]
    fn nearest_rank_small_samples() {
        let v = ms_list(&[10, 20, 30, 40]);
        assert_eq!(percentile_sorted(&v, 50.0), Duration::from_millis(20));
        assert_eq!(percentile_sorted(&v, 51.0), Duration::from_millis(30));
        assert_eq!(percentile_sorted(&v, 90.0), Duration::from_millis(40));
        assert_eq!(percentile_sorted(&v, 0.0), Duration::from_millis(10));
        assert_eq!(percentile_sorted(&v, 100.0), Duration::from_millis(40));
    }

    #[test]
    fn tail_is_visible() {
        // One slow sample in a thousand shows at p99.9 territory, not p99.
        let mut v = vec![Duration::from_millis(1); 999];
        v.push(Duration::from_secs(1));
        let s = Summary::of(&mut v);
        assert_eq!(s.p99, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_secs(1));
    }

    #[test]
    fn micros_and_ms_format() {
        let s = Summary::of(&mut [Duration::from_micros(1234)]);
        assert_eq!(s.micros().p50_us, 1234);
        assert_eq!(ms(Duration::from_micros(1234)), "1.23");
        assert_eq!(ms(Duration::from_micros(1236)), "1.24");
        assert_eq!(ms(Duration::ZERO), "0.00");
    }
}
