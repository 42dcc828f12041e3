//! `loramux_bench::stats` against numpy/scipy: every value in
//! `fixtures/stats/scipy_reference.json` (made by `scripts/reference/make_stats_fixtures.py`),
//! plus the error cases.
//!
//! Tolerances (relative, with a 1e-12 absolute floor for values near zero):
//! - 1e-9 for means, standard deviations, percentiles, t statistics, degrees of freedom,
//!   confidence intervals and effect sizes (the formulas are the same; only summation order
//!   and statrs' t quantile differ from numpy/scipy);
//! - 1e-8 for p-values (statrs' regularized incomplete beta against scipy's Boost one).

use std::path::PathBuf;

use loramux_bench::stats::{
    cohens_d, cohens_dz, mean_ci, paired_t_test, percentile, summarize, welch_t_test, StatsError,
    Summary,
};
use serde_json::Value;

/// Relative tolerance for everything but p-values.
const RTOL: f64 = 1e-9;
/// Relative tolerance for p-values.
const RTOL_P: f64 = 1e-8;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/stats/scipy_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

fn cases() -> Vec<Value> {
    fixture()["cases"].as_array().expect("cases").clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(f).collect()
}

#[track_caller]
fn close(what: &str, got: f64, want: f64, rtol: f64) {
    let tol = rtol * want.abs().max(1e-12 / rtol);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, scipy {want:e} (diff {:e}, tol {tol:e})",
        (got - want).abs()
    );
}

#[test]
fn fixture_covers_the_cases_the_tests_rely_on() {
    let fx = fixture();
    assert!(fx["versions"]["scipy"].is_string());
    let cases = cases();
    assert!(cases.len() >= 6);
    assert!(cases
        .iter()
        .any(|c| c["a"].as_array().map(Vec::len) == Some(2)));
    assert!(cases.iter().any(|c| c.get("paired").is_none()));
    assert!(cases
        .iter()
        .any(|c| c.get("paired").is_some_and(|p| f(&p["p_value"]) < 1e-10)));
}

#[test]
fn summaries_match_numpy_and_scipy() {
    for case in cases() {
        let name = case["name"].as_str().unwrap_or("?");
        for side in ["a", "b"] {
            let samples = floats(&case[side]);
            let want = &case[format!("summary_{side}")];
            let what = |field: &str| format!("{name}.{side}.{field}");
            let s: Summary = summarize(&samples).expect("summary");
            assert_eq!(s.n, want["n"].as_u64().expect("n") as usize);
            close(&what("mean"), s.mean, f(&want["mean"]), RTOL);
            close(&what("std_dev"), s.std_dev, f(&want["std_ddof1"]), RTOL);
            assert_eq!(s.min, f(&want["min"]), "{}", what("min"));
            assert_eq!(s.max, f(&want["max"]), "{}", what("max"));

            let pct = |q: f64| {
                want["percentiles"]
                    .as_array()
                    .expect("percentiles")
                    .iter()
                    .find(|p| f(&p[0]) == q)
                    .map(|p| f(&p[1]))
                    .unwrap_or_else(|| panic!("no p{q} in the fixture"))
            };
            close(&what("p50"), s.p50, pct(50.0), RTOL);
            close(&what("p90"), s.p90, pct(90.0), RTOL);
            close(&what("p95"), s.p95, pct(95.0), RTOL);
            close(&what("p99"), s.p99, pct(99.0), RTOL);
            for p in want["percentiles"].as_array().expect("percentiles") {
                let q = f(&p[0]);
                let got = percentile(&samples, q).expect("percentile");
                close(&what(&format!("percentile({q})")), got, f(&p[1]), RTOL);
            }

            for ci in want["mean_ci"].as_array().expect("mean_ci") {
                let c = f(&ci[0]);
                let (low, high) = mean_ci(&samples, c).expect("mean_ci");
                close(&what(&format!("ci{c}.low")), low, f(&ci[1]), RTOL);
                close(&what(&format!("ci{c}.high")), high, f(&ci[2]), RTOL);
                if c == 0.95 {
                    close(&what("ci95_low"), s.ci95_low, f(&ci[1]), RTOL);
                    close(&what("ci95_high"), s.ci95_high, f(&ci[2]), RTOL);
                }
            }
        }
    }
}

#[test]
fn paired_t_tests_match_ttest_rel() {
    let mut checked = 0;
    for case in cases() {
        let Some(want) = case.get("paired") else {
            continue;
        };
        let name = case["name"].as_str().unwrap_or("?");
        let (a, b) = (floats(&case["a"]), floats(&case["b"]));
        let got = paired_t_test(&a, &b).expect("paired t-test");
        assert_eq!(got.n, want["n"].as_u64().expect("n") as usize);
        close(&format!("{name}.t"), got.t, f(&want["t"]), RTOL);
        close(&format!("{name}.df"), got.df, f(&want["df"]), RTOL);
        close(
            &format!("{name}.p"),
            got.p_value,
            f(&want["p_value"]),
            RTOL_P,
        );
        close(
            &format!("{name}.mean_diff"),
            got.mean_diff,
            f(&want["mean_diff"]),
            RTOL,
        );
        close(
            &format!("{name}.ci_low"),
            got.diff_ci95_low,
            f(&want["diff_ci95_low"]),
            RTOL,
        );
        close(
            &format!("{name}.ci_high"),
            got.diff_ci95_high,
            f(&want["diff_ci95_high"]),
            RTOL,
        );
        let dz = cohens_dz(&a, &b).expect("d_z");
        close(
            &format!("{name}.cohens_dz"),
            dz,
            f(&case["cohens_dz"]),
            RTOL,
        );
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn welch_t_tests_match_ttest_ind() {
    for case in cases() {
        let name = case["name"].as_str().unwrap_or("?");
        let (a, b) = (floats(&case["a"]), floats(&case["b"]));
        let want = &case["welch"];
        let got = welch_t_test(&a, &b).expect("welch");
        close(&format!("{name}.t"), got.t, f(&want["t"]), RTOL);
        close(&format!("{name}.df"), got.df, f(&want["df"]), RTOL);
        close(
            &format!("{name}.p"),
            got.p_value,
            f(&want["p_value"]),
            RTOL_P,
        );
    }
}

#[test]
fn cohens_d_matches_the_study_formula() {
    for case in cases() {
        let name = case["name"].as_str().unwrap_or("?");
        let got = cohens_d(&floats(&case["a"]), &floats(&case["b"])).expect("d");
        close(&format!("{name}.cohens_d"), got, f(&case["cohens_d"]), RTOL);
    }
}

#[test]
fn single_sample_summary_has_zero_spread_and_a_point_interval() {
    let s = summarize(&[42.5]).expect("summary");
    assert_eq!(
        (s.n, s.mean, s.std_dev, s.min, s.max),
        (1, 42.5, 0.0, 42.5, 42.5)
    );
    assert_eq!(
        (s.p50, s.p99, s.ci95_low, s.ci95_high),
        (42.5, 42.5, 42.5, 42.5)
    );
    let round_trip: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(round_trip, s);
}

#[test]
fn bad_input_gives_none_not_a_panic() {
    assert_eq!(summarize(&[]), None);
    assert_eq!(summarize(&[1.0, f64::NAN]), None);
    assert_eq!(summarize(&[1.0, f64::INFINITY]), None);
    assert_eq!(percentile(&[], 50.0), None);
    assert_eq!(percentile(&[1.0, f64::NAN], 50.0), None);
    assert_eq!(percentile(&[1.0, 2.0], -0.1), None);
    assert_eq!(percentile(&[1.0, 2.0], 100.1), None);
    assert_eq!(percentile(&[1.0, 2.0], f64::NAN), None);
    assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
    assert_eq!(mean_ci(&[1.0], 0.95), None);
    assert_eq!(mean_ci(&[1.0, 2.0], 0.0), None);
    assert_eq!(mean_ci(&[1.0, 2.0], 1.0), None);
    assert_eq!(mean_ci(&[1.0, 2.0], f64::NAN), None);
    assert_eq!(mean_ci(&[1.0, f64::NAN], 0.95), None);
    assert_eq!(mean_ci(&[2.0, 2.0, 2.0], 0.95), Some((2.0, 2.0)));
    assert_eq!(cohens_d(&[], &[1.0]), None);
    assert_eq!(cohens_d(&[1.0, 1.0], &[1.0, 1.0]), None);
    assert_eq!(cohens_d(&[1.0, f64::NAN], &[1.0, 2.0]), None);
    assert_eq!(cohens_dz(&[1.0, 2.0], &[1.0]), None);
    assert_eq!(cohens_dz(&[1.0], &[2.0]), None);
    assert_eq!(cohens_dz(&[1.0, 2.0], &[0.0, 1.0]), None);
    assert_eq!(cohens_dz(&[1.0, f64::NAN], &[0.0, 1.0]), None);
}

#[test]
fn t_test_errors_say_what_is_wrong() {
    let err = paired_t_test(&[1.0, 2.0, 3.0], &[1.0, 2.0]).unwrap_err();
    assert!(
        matches!(err, StatsError::LengthMismatch { a: 3, b: 2 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("a has 3 values, b has 2"), "{err}");

    let err = paired_t_test(&[1.0], &[2.0]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::TooFewSamples {
                got: 1,
                needed: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let err = paired_t_test(&[], &[]).unwrap_err();
    assert!(
        matches!(err, StatsError::TooFewSamples { got: 0, .. }),
        "{err:?}"
    );

    let err = paired_t_test(&[1.0, 2.0, 3.0], &[0.5, 1.5, 2.5]).unwrap_err();
    assert!(
        matches!(err, StatsError::ConstantDifferences { n: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("zero variance"), "{err}");

    let err = paired_t_test(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::NonFinite {
                which: "a",
                index: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("a[1] is NaN"), "{err}");
    let err = paired_t_test(&[1.0, 2.0], &[f64::NEG_INFINITY, 2.0]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::NonFinite {
                which: "b",
                index: 0,
                ..
            }
        ),
        "{err:?}"
    );

    let err = welch_t_test(&[1.0], &[1.0, 2.0]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::TooFewSamples {
                which: "a",
                got: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let err = welch_t_test(&[1.0, 2.0], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::TooFewSamples {
                which: "b",
                got: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let err = welch_t_test(&[1.0, 1.0], &[2.0, 2.0, 2.0]).unwrap_err();
    assert!(matches!(err, StatsError::ZeroVariance), "{err:?}");
    let err = welch_t_test(&[1.0, 2.0], &[2.0, f64::NAN]).unwrap_err();
    assert!(
        matches!(
            err,
            StatsError::NonFinite {
                which: "b",
                index: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn one_constant_side_still_gives_a_welch_test() {
    // scipy: ttest_ind([1, 1, 1], [1, 2, 3], equal_var=False) -> t = -1.7320508075688774,
    // df = 2.0, p = 0.22540333075851665.
    let got = welch_t_test(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).expect("welch");
    close("t", got.t, -1.7320508075688774, RTOL);
    close("df", got.df, 2.0, RTOL);
    close("p", got.p_value, 0.22540333075851665, RTOL_P);
}
