//! Statistics for benchmark results: descriptive summaries, confidence intervals, t-tests and
//! effect sizes.
//!
//! Every formula mirrors numpy/scipy so that a number in a loramux report can be checked with
//! the usual Python tools: `numpy.percentile` (default `linear` method), `numpy.std(ddof=1)`,
//! `scipy.stats.t.interval`, `scipy.stats.ttest_rel` and `scipy.stats.ttest_ind(equal_var=False)`.
//! `tests/stats.rs` compares each function with values computed by scipy
//! (`scripts/reference/make_stats_fixtures.py` → `fixtures/stats/scipy_reference.json`).
//! The Student-t distribution comes from `statrs`.
//!
//! Bad input (empty, too short, NaN or infinite values, mismatched pairs) never panics: the
//! descriptive functions return `None`, the tests return a [`StatsError`].

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Descriptive statistics of one sample set, as a report prints them (latency of one
/// configuration, say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (ddof = 1); 0 when `n == 1`.
    pub std_dev: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Median (numpy `linear` percentile).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Lower end of the Student-t 95% confidence interval of the mean; the mean when `n == 1`.
    pub ci95_low: f64,
    /// Upper end of the Student-t 95% confidence interval of the mean; the mean when `n == 1`.
    pub ci95_high: f64,
}

/// Summarizes `samples`, so that every report shows the same statistics computed the same way.
///
/// `None` when `samples` is empty or holds a NaN or infinite value.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let sorted = finite_sorted(samples)?;
    let n = sorted.len();
    let mean = mean(samples);
    let std_dev = if n > 1 {
        var(samples, mean, 1).sqrt()
    } else {
        0.0
    };
    let (ci95_low, ci95_high) = if n > 1 {
        mean_ci(samples, 0.95)?
    } else {
        (mean, mean)
    };
    let pct = |q| percentile_sorted(&sorted, q);
    Some(Summary {
        n,
        mean,
        std_dev,
        min: sorted[0],
        max: sorted[n - 1],
        p50: pct(50.0),
        p90: pct(90.0),
        p95: pct(95.0),
        p99: pct(99.0),
        ci95_low,
        ci95_high,
    })
}

/// The `q`-th percentile (`q` in `[0, 100]`) with numpy's default `linear` interpolation, so
/// that tail latencies match `numpy.percentile`.
///
/// `None` when `samples` is empty, holds a non-finite value, or `q` is outside `[0, 100]`.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if !(0.0..=100.0).contains(&q) {
        return None;
    }
    let sorted = finite_sorted(samples)?;
    Some(percentile_sorted(&sorted, q))
}

/// Student-t confidence interval of the mean at level `confidence` (0.95 for 95%), the same as
/// `scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)`; it says how far the
/// measured mean may be from the true one.
///
/// `None` with fewer than 2 samples, a non-finite sample, or `confidence` outside `(0, 1)`.
/// Identical samples give the zero-width interval `(mean, mean)`.
pub fn mean_ci(samples: &[f64], confidence: f64) -> Option<(f64, f64)> {
    if !(confidence > 0.0 && confidence < 1.0) || samples.len() < 2 {
        return None;
    }
    if samples.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let n = samples.len();
    let m = mean(samples);
    let sem = (var(samples, m, 1) / n as f64).sqrt();
    let half = t_quantile((1.0 + confidence) / 2.0, (n - 1) as f64).ok()? * sem;
    Some((m - half, m + half))
}

/// A paired t-test (scipy's `ttest_rel`, two-sided): the right test when both configurations
/// ran the same prompts, so that per-prompt differences cancel prompt-to-prompt variation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PairedTTest {
    /// Number of pairs.
    pub n: usize,
    /// t statistic of the differences `a - b`.
    pub t: f64,
    /// Degrees of freedom, `n - 1`.
    pub df: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Mean of the differences `a - b`.
    pub mean_diff: f64,
    /// Lower end of the Student-t 95% confidence interval of the mean difference.
    pub diff_ci95_low: f64,
    /// Upper end of the Student-t 95% confidence interval of the mean difference.
    pub diff_ci95_high: f64,
}

/// Paired t-test of `a` against `b` (pair `i` is `a[i]`, `b[i]`), as `scipy.stats.ttest_rel(a, b)`.
///
/// Errors when the lengths differ, there are fewer than 2 pairs, a value is not finite, or every
/// difference is the same (zero variance: the t statistic is undefined).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Result<PairedTTest, StatsError> {
    if a.len() != b.len() {
        return Err(StatsError::LengthMismatch {
            a: a.len(),
            b: b.len(),
        });
    }
    check_samples(a, "a", 2)?;
    check_samples(b, "b", 2)?;
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = diffs.len();
    let mean_diff = mean(&diffs);
    let var_diff = var(&diffs, mean_diff, 1);
    if var_diff == 0.0 {
        return Err(StatsError::ConstantDifferences { n, diff: mean_diff });
    }
    let df = (n - 1) as f64;
    let sem = (var_diff / n as f64).sqrt();
    let t = mean_diff / sem;
    let half = t_quantile(0.975, df)? * sem;
    Ok(PairedTTest {
        n,
        t,
        df,
        p_value: two_sided_p(t, df)?,
        mean_diff,
        diff_ci95_low: mean_diff - half,
        diff_ci95_high: mean_diff + half,
    })
}

/// Welch's t-test (unequal variances, two-sided), the right test for two independent sample
/// sets such as latencies from two separate runs; as
/// `scipy.stats.ttest_ind(a, b, equal_var=False)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WelchTTest {
    /// t statistic of `mean(a) - mean(b)`.
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// Welch's t-test of `a` against `b`.
///
/// Errors when either set has fewer than 2 samples, a value is not finite, or both sets have
/// zero variance (the t statistic is undefined).
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Result<WelchTTest, StatsError> {
    check_samples(a, "a", 2)?;
    check_samples(b, "b", 2)?;
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (m1, m2) = (mean(a), mean(b));
    let vn1 = var(a, m1, 1) / n1;
    let vn2 = var(b, m2, 1) / n2;
    if vn1 + vn2 == 0.0 {
        return Err(StatsError::ZeroVariance);
    }
    let df = (vn1 + vn2).powi(2) / (vn1.powi(2) / (n1 - 1.0) + vn2.powi(2) / (n2 - 1.0));
    let t = (m1 - m2) / (vn1 + vn2).sqrt();
    Ok(WelchTTest {
        t,
        df,
        p_value: two_sided_p(t, df)?,
    })
}

/// Cohen's d as the LoRA-vs-merged study computed it, so that its effect sizes can be compared
/// with ours: `(mean(a) - mean(b)) / sqrt((var0(a) + var0(b)) / 2)` with population variances
/// (numpy `.std()`, ddof = 0).
///
/// `None` when either set is empty, a value is not finite, or both variances are zero.
pub fn cohens_d(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || b.is_empty() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return None;
    }
    let (m1, m2) = (mean(a), mean(b));
    let pooled = ((var(a, m1, 0) + var(b, m2, 0)) / 2.0).sqrt();
    (pooled > 0.0).then(|| (m1 - m2) / pooled)
}

/// Paired effect size `d_z = mean(a - b) / sd(a - b)` (ddof = 1): the effect size that goes with
/// [`paired_t_test`] (`t = d_z * sqrt(n)`).
///
/// `None` when the lengths differ, there are fewer than 2 pairs, a value is not finite, or every
/// difference is the same.
pub fn cohens_dz(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|x| !x.is_finite()) {
        return None;
    }
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let m = mean(&diffs);
    let sd = var(&diffs, m, 1).sqrt();
    (sd > 0.0).then(|| m / sd)
}

/// Why a t-test could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// A paired test needs one `b` for every `a`.
    #[error("paired samples differ in length: a has {a} values, b has {b}")]
    LengthMismatch {
        /// Length of `a`.
        a: usize,
        /// Length of `b`.
        b: usize,
    },
    /// A variance needs at least two samples.
    #[error("sample {which} has {got} values; at least {needed} are needed")]
    TooFewSamples {
        /// Which argument: `"a"` or `"b"`.
        which: &'static str,
        /// How many values it has.
        got: usize,
        /// How many the test needs.
        needed: usize,
    },
    /// NaN or infinity (a failed measurement, usually) would poison every statistic.
    #[error("sample {which}[{index}] is {value}, not a finite number")]
    NonFinite {
        /// Which argument: `"a"` or `"b"`.
        which: &'static str,
        /// Position of the bad value.
        index: usize,
        /// The bad value.
        value: f64,
    },
    /// All paired differences are equal, so their variance is zero and t is undefined.
    #[error(
        "all {n} paired differences equal {diff}: zero variance, the t statistic is undefined"
    )]
    ConstantDifferences {
        /// Number of pairs.
        n: usize,
        /// The common difference `a[i] - b[i]`.
        diff: f64,
    },
    /// Both independent samples are constant, so the standard error is zero and t is undefined.
    #[error("both samples have zero variance: the t statistic is undefined")]
    ZeroVariance,
    /// statrs refused the t distribution's parameters (degrees of freedom not positive).
    #[error("Student's t distribution with {df} degrees of freedom: {message}")]
    Distribution {
        /// The degrees of freedom asked for.
        df: f64,
        /// statrs' message.
        message: String,
    },
}

/// Errors unless `samples` has at least `needed` values, all finite.
fn check_samples(samples: &[f64], which: &'static str, needed: usize) -> Result<(), StatsError> {
    if let Some((index, &value)) = samples.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(StatsError::NonFinite {
            which,
            index,
            value,
        });
    }
    if samples.len() < needed {
        return Err(StatsError::TooFewSamples {
            which,
            got: samples.len(),
            needed,
        });
    }
    Ok(())
}

/// A sorted copy of `samples`; `None` when empty or any value is not finite.
fn finite_sorted(samples: &[f64]) -> Option<Vec<f64>> {
    if samples.is_empty() || samples.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(sorted)
}

/// numpy's `linear` percentile of non-empty sorted data, `q` in `[0, 100]`, including numpy's
/// `_lerp` (which interpolates from the upper neighbour when the fraction is ≥ 0.5).
fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let h = (q / 100.0) * (sorted.len() - 1) as f64;
    let lo = h.floor();
    let i = lo as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let (a, b, t) = (sorted[i], sorted[j], h - lo);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// Mean of non-empty data.
fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Variance around `mean` with `ddof` delta degrees of freedom (numpy's two-pass formula).
fn var(x: &[f64], mean: f64, ddof: usize) -> f64 {
    x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (x.len() - ddof) as f64
}

/// Standard Student-t distribution with `df` degrees of freedom.
fn students_t(df: f64) -> Result<StudentsT, StatsError> {
    StudentsT::new(0.0, 1.0, df).map_err(|e| StatsError::Distribution {
        df,
        message: e.to_string(),
    })
}

/// Quantile of the standard Student-t distribution at probability `p` (in `(0, 1)`).
fn t_quantile(p: f64, df: f64) -> Result<f64, StatsError> {
    Ok(students_t(df)?.inverse_cdf(p))
}

/// Two-sided p-value of statistic `t`: `2 * sf(|t|)` (survival function, accurate for tiny p).
fn two_sided_p(t: f64, df: f64) -> Result<f64, StatsError> {
    Ok((2.0 * students_t(df)?.sf(t.abs())).min(1.0))
}
