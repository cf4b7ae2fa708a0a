//! Statistics used by the report: percentiles of samples, quantiles of Prometheus histograms,
//! counter rates from timed samples.

use serde::Serialize;

/// Percentile `q` (0..=1) of `values` by linear interpolation between closest ranks
/// (the "type 7" definition of R and NumPy's default). `None` for no values.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN left"));
    let q = q.clamp(0.0, 1.0);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    Some(v[lo] + (v[hi] - v[lo]) * frac)
}

/// Median (the 0.5 percentile).
pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 0.5)
}

/// Min, median and max of a set of measurements, with the raw samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        Some(Spread {
            min: percentile(values, 0.0)?,
            median: percentile(values, 0.5)?,
            max: percentile(values, 1.0)?,
            samples: values.to_vec(),
        })
    }
}

/// Coefficient of variation (standard deviation / mean) of `values`; `None` for fewer than two.
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean == 0.0 {
        return None;
    }
    let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some(var.sqrt() / mean)
}

/// Geometric mean of positive values.
pub fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| *v <= 0.0 || v.is_nan()) {
        return None;
    }
    Some((values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp())
}

/// One cumulative histogram bucket: the count of observations `<= le`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub le: f64,
    pub count: f64,
}

/// Bucket-wise difference `after - before` of two scrapes of the same cumulative histogram
/// (the observations made between them). Buckets are matched by `le`.
pub fn bucket_delta(after: &[Bucket], before: &[Bucket]) -> Vec<Bucket> {
    after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.le == a.le || (b.le.is_infinite() && a.le.is_infinite()))
                .map(|b| b.count)
                .unwrap_or(0.0);
            Bucket { le: a.le, count: (a.count - b).max(0.0) }
        })
        .collect()
}

/// Quantile `q` of a cumulative histogram, computed exactly as PromQL's `histogram_quantile`:
/// find the bucket holding rank `q * total`, interpolate linearly inside it (the lowest bucket
/// starts at 0), and answer the upper bound of the highest finite bucket if the rank falls into
/// `+Inf`. `None` when the histogram has no observations or no `+Inf` bucket.
pub fn histogram_quantile(q: f64, buckets: &[Bucket]) -> Option<f64> {
    let mut b: Vec<Bucket> = buckets.to_vec();
    b.sort_by(|x, y| x.le.partial_cmp(&y.le).expect("bucket bounds are not NaN"));
    if !b.last()?.le.is_infinite() {
        return None;
    }
    // Counts must be monotonic; a scrape racing an observation can break that (Prometheus fixes
    // it up the same way).
    for i in 1..b.len() {
        if b[i].count < b[i - 1].count {
            b[i].count = b[i - 1].count;
        }
    }
    let total = b[b.len() - 1].count;
    if total <= 0.0 || b.len() < 2 {
        return None;
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    let rank = q * total;
    let idx = b.iter().position(|x| x.count >= rank).unwrap_or(b.len() - 1);
    if idx == b.len() - 1 {
        return Some(b[b.len() - 2].le);
    }
    if idx == 0 && b[0].le <= 0.0 {
        return Some(b[0].le);
    }
    let (start, prev_count) = if idx == 0 { (0.0, 0.0) } else { (b[idx - 1].le, b[idx - 1].count) };
    let end = b[idx].le;
    let in_bucket = b[idx].count - prev_count;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * (rank - prev_count) / in_bucket)
}

/// Value of a counter at time `t`, linearly interpolated between timed samples `(t, value)`
/// sorted by time. `None` outside the sampled range.
pub fn value_at(samples: &[(f64, f64)], t: f64) -> Option<f64> {
    let first = samples.first()?;
    let last = samples.last()?;
    if t < first.0 || t > last.0 {
        return None;
    }
    let i = samples.partition_point(|s| s.0 < t);
    if i == 0 {
        return Some(first.1);
    }
    let (a, b) = (samples[i - 1], samples[i]);
    if b.0 == a.0 {
        return Some(b.1);
    }
    Some(a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0))
}

/// Average per-second increase of a counter over `[t0, t1]` from timed samples.
pub fn rate_between(samples: &[(f64, f64)], t0: f64, t1: f64) -> Option<f64> {
    if t1 <= t0 {
        return None;
    }
    Some((value_at(samples, t1)? - value_at(samples, t0)?) / (t1 - t0))
}

/// Per-interval rates of a counter: `((t_mid, rate))` for each pair of consecutive samples,
/// averaged over `window` seconds (at least one interval) so a plot is not all quantisation noise.
pub fn windowed_rates(samples: &[(f64, f64)], window: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for i in 1..samples.len() {
        while j + 1 < i && samples[i].0 - samples[j + 1].0 >= window {
            j += 1;
        }
        let (a, b) = (samples[j], samples[i]);
        if b.0 > a.0 {
            // A counter that went down was restarted (a different process): skip the interval.
            if b.1 >= a.1 {
                out.push((b.0, (b.1 - a.1) / (b.0 - a.0)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert_eq!(percentile(&v, 1.0), Some(5.0));
        assert!(close(percentile(&v, 0.99).unwrap(), 4.96));
        assert!(close(percentile(&[1.0, 2.0], 0.5).unwrap(), 1.5));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[f64::NAN, 2.0], 0.5), Some(2.0));
    }

    #[test]
    fn spread_and_helpers() {
        let s = Spread::of(&[0.6, 0.55, 0.7, 0.58]).unwrap();
        assert_eq!((s.min, s.max), (0.55, 0.7));
        assert!(close(s.median, 0.59));
        assert!(Spread::of(&[]).is_none());
        assert!(close(geometric_mean(&[1.0, 4.0]).unwrap(), 2.0));
        assert!(geometric_mean(&[1.0, 0.0]).is_none());
        assert!(close(coefficient_of_variation(&[9.0, 11.0]).unwrap(), 2f64.sqrt() / 10.0));
        assert!(coefficient_of_variation(&[1.0]).is_none());
    }

    fn h(pairs: &[(f64, f64)]) -> Vec<Bucket> {
        pairs.iter().map(|&(le, count)| Bucket { le, count }).collect()
    }

    #[test]
    fn histogram_quantile_matches_promql() {
        // 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.2], 2 in (0.2, 0.4].
        let b = h(&[(0.1, 4.0), (0.2, 8.0), (0.4, 10.0), (f64::INFINITY, 10.0)]);
        // rank 5 lies in (0.1, 0.2]: 0.1 + 0.1 * (5 - 4) / 4
        assert!(close(histogram_quantile(0.5, &b).unwrap(), 0.125));
        // rank 2 in the first bucket, which starts at 0.
        assert!(close(histogram_quantile(0.2, &b).unwrap(), 0.05));
        // rank 9.9 in (0.2, 0.4]: 0.2 + 0.2 * (9.9 - 8) / 2
        assert!(close(histogram_quantile(0.99, &b).unwrap(), 0.39));
        // Rank in +Inf: the highest finite bound.
        let inf = h(&[(0.1, 1.0), (0.2, 1.0), (f64::INFINITY, 3.0)]);
        assert_eq!(histogram_quantile(0.9, &inf), Some(0.2));
        // Order of the input does not matter; empty and +Inf-less histograms have no quantile.
        let mut rev = b.clone();
        rev.reverse();
        assert!(close(histogram_quantile(0.5, &rev).unwrap(), 0.125));
        assert_eq!(histogram_quantile(0.5, &h(&[(0.1, 0.0), (f64::INFINITY, 0.0)])), None);
        assert_eq!(histogram_quantile(0.5, &h(&[(0.1, 3.0)])), None);
    }

    #[test]
    fn bucket_delta_counts_only_new_observations() {
        let before = h(&[(0.1, 4.0), (0.2, 8.0), (f64::INFINITY, 10.0)]);
        let after = h(&[(0.1, 4.0), (0.2, 18.0), (f64::INFINITY, 20.0)]);
        let d = bucket_delta(&after, &before);
        assert_eq!(d, h(&[(0.1, 0.0), (0.2, 10.0), (f64::INFINITY, 10.0)]));
        assert!(close(histogram_quantile(0.5, &d).unwrap(), 0.15));
    }

    #[test]
    fn counter_rates_from_timed_samples() {
        let s = [(0.0, 0.0), (1.0, 100.0), (2.0, 300.0), (4.0, 700.0)];
        assert_eq!(value_at(&s, 1.5), Some(200.0));
        assert_eq!(value_at(&s, 5.0), None);
        assert_eq!(value_at(&s, 0.0), Some(0.0));
        assert_eq!(rate_between(&s, 1.0, 4.0), Some(200.0));
        assert_eq!(rate_between(&s, 0.5, 1.5), Some(150.0));
        let r = windowed_rates(&s, 1.0);
        assert_eq!(r, vec![(1.0, 100.0), (2.0, 200.0), (4.0, 200.0)]);
        // A restarted counter (drops to zero) does not produce a negative rate.
        let restart = [(0.0, 50.0), (1.0, 60.0), (2.0, 5.0), (3.0, 15.0)];
        assert_eq!(windowed_rates(&restart, 0.5), vec![(1.0, 10.0), (3.0, 10.0)]);
    }
}
