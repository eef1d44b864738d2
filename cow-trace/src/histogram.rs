//! Latency histograms.
//!
//! [`Histogram`] keeps log-linear buckets (16 per power of two, so any
//! reported percentile is within 1/32 of the true value) and exact min, max
//! and count. It holds only the buckets from the smallest value seen to the
//! largest, so the many short-lived processes of a fork storm cost a few
//! hundred bytes each (not the empty buckets below their microseconds).
//! [`Log2`] is the bcc/libbpf-tools display histogram.

use serde::Serialize;

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Counts of buckets `first..first + buckets.len()`.
    buckets: Vec<u64>,
    /// Index of `buckets[0]`.
    first: usize,
    count: u64,
    min: u64,
    max: u64,
}

/// The summary figures printed and serialised for a latency distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let mantissa = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + mantissa) as usize
}

/// Inclusive value range of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let exp = (i / SUB) as u32 + SUB_BITS - 1;
    let mantissa = i % SUB;
    let width = 1u64 << (exp - SUB_BITS);
    let lo = (SUB + mantissa) << (exp - SUB_BITS);
    (lo, lo + (width - 1))
}

impl PartialEq for Histogram {
    /// The same samples, however the buckets are laid out.
    fn eq(&self, o: &Self) -> bool {
        let used = |h: &Self| h.indexed().filter(|&(_, n)| n > 0).collect::<Vec<_>>();
        (self.count, self.min, self.max) == (o.count, o.min, o.max) && used(self) == used(o)
    }
}

impl Eq for Histogram {}

impl Histogram {
    /// Each bucket held, with its index.
    fn indexed(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(k, &n)| (self.first + k, n))
    }

    /// Makes room for bucket `i`; its position in `buckets`.
    fn slot(&mut self, i: usize) -> usize {
        if self.buckets.is_empty() {
            self.first = i;
        } else if i < self.first {
            // Below every bucket held so far: rare once the smallest
            // values have been seen.
            self.buckets.splice(0..0, std::iter::repeat_n(0, self.first - i));
            self.first = i;
        }
        let k = i - self.first;
        if self.buckets.len() <= k {
            self.buckets.resize(k + 1, 0);
        }
        k
    }

    pub fn record(&mut self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `v` as `n` values: a sampled latency that stands for the
    /// faults not timed around it.
    pub fn record_n(&mut self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        let k = self.slot(index(v));
        self.buckets[k] += n;
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        self.max = self.max.max(v);
        self.count += n;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Gives back the room grown into beyond the highest bucket used: for
    /// a histogram that is done (an exited process's, kept for the
    /// summary).
    pub fn shrink_to_fit(&mut self) {
        self.buckets.shrink_to_fit();
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if let (Some(lo), Some(hi)) = (other.indexed().next(), other.indexed().last()) {
            self.slot(lo.0);
            self.slot(hi.0);
        }
        for (i, n) in other.indexed() {
            self.buckets[i - self.first] += n;
        }
        self.min = if self.count == 0 { other.min } else { self.min.min(other.min) };
        self.max = self.max.max(other.max);
        self.count += other.count;
    }

    /// The value at quantile `q` (0..=1): the midpoint of the bucket holding
    /// the `ceil(q * count)`-th smallest sample, clamped to [min, max].
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.indexed() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = bounds(i);
                return (lo + (hi - lo) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            min: if self.count == 0 { 0 } else { self.min },
            p50: self.quantile(0.50),
            p99: self.quantile(0.99),
            max: self.max,
        }
    }

    /// Folds the samples into power-of-two buckets of `value / divisor`, as
    /// bcc does after converting nanoseconds to the display unit. Exact when
    /// `divisor` is 1; otherwise each log-linear bucket is placed by its
    /// midpoint.
    pub fn to_log2(&self, divisor: u64) -> Log2 {
        let mut out = Log2::default();
        for (i, n) in self.indexed() {
            if n > 0 {
                let (lo, hi) = bounds(i);
                out.add((lo + (hi - lo) / 2) / divisor.max(1), n);
            }
        }
        out
    }
}

/// Power-of-two histogram: slot k counts values in [2^k, 2^(k+1) - 1],
/// slot 0 also counts zero (as bcc's `log2l` does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log2 {
    pub slots: Vec<u64>,
}

/// One printed or serialised row of a [`Log2`] histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Log2Row {
    pub lo: u64,
    pub hi: u64,
    pub count: u64,
}

impl Log2 {
    pub fn add(&mut self, v: u64, n: u64) {
        let slot = if v == 0 { 0 } else { 63 - v.leading_zeros() as usize };
        if self.slots.len() <= slot {
            self.slots.resize(slot + 1, 0);
        }
        self.slots[slot] += n;
    }

    pub fn rows(&self) -> Vec<Log2Row> {
        self.slots
            .iter()
            .enumerate()
            .map(|(k, &count)| {
                let lo = if k == 0 { 0 } else { 1u64 << k };
                let hi = (1u64 << (k + 1)) - 1;
                Log2Row { lo, hi, count }
            })
            .collect()
    }

    /// The rows that hold samples (what JSON output carries).
    pub fn nonzero_rows(&self) -> Vec<Log2Row> {
        self.rows().into_iter().filter(|r| r.count > 0).collect()
    }

    /// bcc's `print_log2_hist` layout, e.g.
    /// `       256 -> 511        : 12       |****                |`.
    pub fn render(&self, unit: &str) -> String {
        let rows = self.rows();
        let Some(max) = rows.iter().map(|r| r.count).max().filter(|&m| m > 0) else {
            return String::new();
        };
        // Leading empty rows are dropped, as bcc does.
        let first = rows.iter().position(|r| r.count > 0).unwrap_or(0);
        let mut out = format!("{:>22} : count    distribution\n", unit);
        for r in &rows[first..] {
            let stars = ((r.count as f64 / max as f64) * 40.0).round() as usize;
            out.push_str(&format!(
                "{:>10} -> {:<10} : {:<8} |{:<40}|\n",
                r.lo,
                r.hi,
                r.count,
                "*".repeat(stars)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_buckets_from_the_smallest_value_to_the_largest_are_held() {
        let mut one = Histogram::default();
        one.record(1_000_000);
        assert_eq!(one.buckets.len(), 1);
        // Values below those seen, and a merge on either side.
        let mut h = Histogram::default();
        h.record(5000);
        h.record(4000);
        h.record(3);
        let mut o = Histogram::default();
        o.record(1 << 20);
        o.record(1);
        h.merge(&o);
        let mut all = Histogram::default();
        for v in [1, 3, 4000, 5000, 1 << 20] {
            all.record(v);
        }
        assert_eq!(h, all);
        assert_eq!(h.summary(), all.summary());
        assert_eq!((h.first, h.buckets.len()), (index(1), index(1 << 20) - index(1) + 1));
        let mut e = Histogram::default();
        e.merge(&h);
        assert_eq!(e.summary(), h.summary());
    }

    #[test]
    fn a_weighted_value_counts_as_that_many() {
        let mut w = Histogram::default();
        w.record(1_000);
        w.record_n(3_000, 16);
        w.record_n(9_000, 0); // stands for nothing: not recorded at all
        let mut plain = Histogram::default();
        plain.record(1_000);
        for _ in 0..16 {
            plain.record(3_000);
        }
        assert_eq!(w, plain);
        assert_eq!((w.count(), w.summary().max, w.quantile(0.5)), (17, 3_000, plain.quantile(0.5)));
    }

    #[test]
    fn buckets_tile_the_number_line() {
        // Consecutive buckets are adjacent and each value lands in the bucket
        // whose bounds contain it.
        let mut expected_lo = 0;
        for i in 0..index(u64::MAX) {
            let (lo, hi) = bounds(i);
            assert_eq!(lo, expected_lo, "bucket {i}");
            assert!(hi >= lo);
            assert_eq!(index(lo), i);
            assert_eq!(index(hi), i);
            expected_lo = hi + 1;
        }
        assert_eq!(bounds(index(u64::MAX)).1, u64::MAX);
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [17u64, 100, 999, 4096, 123_456, 9_999_999, 1 << 40] {
            let mut h = Histogram::default();
            h.record(1);
            h.record(v);
            h.record(u64::MAX / 2);
            let p50 = h.quantile(0.5);
            let err = (p50 as f64 - v as f64).abs() / v as f64;
            assert!(err <= 1.0 / 32.0, "v={v} p50={p50} err={err}");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        assert_eq!((s.count, s.min, s.max), (1000, 1000, 1_000_000));
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() / (want as f64) < 0.035;
        assert!(close(s.p50, 500_000), "p50 {}", s.p50);
        assert!(close(s.p99, 990_000), "p99 {}", s.p99);
    }

    #[test]
    fn small_values_are_exact_and_empty_is_zero() {
        let mut h = Histogram::default();
        assert_eq!(h.summary(), Summary::default());
        for v in [3, 3, 7, 15] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 3);
        assert_eq!(h.quantile(1.0), 15);
        assert_eq!(h.quantile(0.0), 3);
    }

    #[test]
    fn merge_equals_recording_everything_once() {
        let (mut a, mut b, mut all) = (Histogram::default(), Histogram::default(), Histogram::default());
        for v in 0..500u64 {
            let x = v * v * 37 + 5;
            if v % 3 == 0 {
                a.record(x)
            } else {
                b.record(x)
            }
            all.record(x);
        }
        a.merge(&b);
        assert_eq!(a, all);
        let mut empty = Histogram::default();
        empty.merge(&all);
        assert_eq!(empty, all);
    }

    #[test]
    fn log2_slots_and_rendering() {
        let mut l = Log2::default();
        for v in [0, 1, 2, 3, 4, 7, 8, 1000] {
            l.add(v, 1);
        }
        let rows = l.rows();
        assert_eq!(rows[0], Log2Row { lo: 0, hi: 1, count: 2 });
        assert_eq!(rows[1], Log2Row { lo: 2, hi: 3, count: 2 });
        assert_eq!(rows[2], Log2Row { lo: 4, hi: 7, count: 2 });
        assert_eq!(rows[3], Log2Row { lo: 8, hi: 15, count: 1 });
        assert_eq!(rows[9], Log2Row { lo: 512, hi: 1023, count: 1 });
        assert_eq!(l.nonzero_rows().len(), 5);
        assert_eq!(l.nonzero_rows()[4], rows[9]);
        let text = l.render("usecs");
        assert!(text.starts_with("                 usecs : count    distribution\n"));
        assert!(
            text.contains("         0 -> 1          : 2        |****************************************|")
        );
        assert!(
            text.contains("       512 -> 1023       : 1        |********************                    |")
        );
        assert_eq!(Log2::default().render("usecs"), "");
    }

    #[test]
    fn log2_from_histogram_in_display_units() {
        let mut h = Histogram::default();
        for _ in 0..10 {
            h.record(1_500); // 1.5 us
        }
        h.record(40_000); // 40 us
        let l = h.to_log2(1000);
        let rows = l.rows();
        assert_eq!(rows[0].count, 10); // 1 us -> slot [0,1]
        assert_eq!(rows[5], Log2Row { lo: 32, hi: 63, count: 1 });
    }
}
