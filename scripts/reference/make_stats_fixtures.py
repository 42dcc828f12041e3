"""Reference values for loramux's statistics (crates/bench/src/stats.rs), computed by numpy/scipy.

Writes fixtures/stats/scipy_reference.json: for every case its input samples and what numpy and
scipy return for them, so that `cargo test -p loramux-bench --test stats` checks the Rust code
against the tools a reader would use to re-check a report. Run through make_stats_fixtures.sh
(which creates a small venv with pinned numpy and scipy). Deterministic: re-running with the same
versions reproduces the file byte for byte.
"""

import json
import platform
import sys
from pathlib import Path

import numpy as np
import scipy
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "stats" / "scipy_reference.json"

PERCENTILES = [0, 10, 25, 33.3, 50, 66.6, 75, 90, 95, 99, 99.9, 100]
CONFIDENCES = [0.8, 0.9, 0.95, 0.99]


def rounded(rng_values, decimals=4):
    """Plain Python floats, rounded so that the inputs read well in the JSON."""
    return [round(float(v), decimals) for v in rng_values]


def cases():
    """Fixed sample sets: (name, what it exercises, a, b)."""
    rng = np.random.default_rng(20240611)
    # Per-prompt latency (ms) of one adapter served unmerged (a) and merged into the base (b):
    # the same 30 prompts, so the runs are paired; unmerged is ~3% slower with prompt-length noise.
    base = rng.lognormal(mean=np.log(180.0), sigma=0.35, size=30)
    unmerged = base * 1.03 + rng.normal(0.0, 4.0, size=30)
    merged = base + rng.normal(0.0, 4.0, size=30)
    # Heavy right tail (time to first token under load): percentiles away from the median.
    tail_a = rng.lognormal(mean=np.log(40.0), sigma=0.8, size=200)
    tail_b = rng.lognormal(mean=np.log(45.0), sigma=0.6, size=200)
    # Independent runs with very different spread and size (Welch's df far from n1 + n2 - 2).
    uneq_a = rng.normal(50.0, 1.0, size=12)
    uneq_b = rng.normal(53.0, 9.0, size=25)
    # A large effect: p-value far below 1e-10.
    big_a = rng.normal(100.0, 2.0, size=15)
    big_b = big_a - 20.0 + rng.normal(0.0, 1.5, size=15)
    return [
        ("small_n", "n=5 hand-written tokens/s, paired",
         [12.1, 11.8, 12.6, 12.0, 11.9], [12.4, 12.2, 12.9, 12.3, 12.5]),
        ("n2_edge", "n=2, the smallest sample a t-test accepts (df=1)",
         [1.0, 2.0], [1.5, 3.5]),
        ("paired_latencies", "30 prompts, LoRA unmerged (a) vs merged (b), ms",
         rounded(unmerged), rounded(merged)),
        ("heavy_tail", "200 lognormal latencies each, ms, paired by index",
         rounded(tail_a), rounded(tail_b)),
        ("unequal_variance", "independent: n=12 sd~1 vs n=25 sd~9 (Welch only)",
         rounded(uneq_a), rounded(uneq_b)),
        ("large_effect", "paired, difference ~20 with sd ~1.5: tiny p-value",
         rounded(big_a), rounded(big_b)),
    ]


def summary(x):
    """Descriptive statistics of one sample set."""
    a = np.asarray(x, dtype=np.float64)
    n = len(a)
    mean = float(np.mean(a))
    sem = float(np.std(a, ddof=1)) / np.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "std_ddof1": float(np.std(a, ddof=1)),
        "std_ddof0": float(np.std(a)),
        "min": float(np.min(a)),
        "max": float(np.max(a)),
        "percentiles": [[q, float(np.percentile(a, q))] for q in PERCENTILES],
        "mean_ci": [
            [c, *map(float, stats.t.interval(c, n - 1, loc=mean, scale=sem))] for c in CONFIDENCES
        ],
    }


def compare(a, b):
    """Tests and effect sizes between two sample sets (paired ones only for equal lengths)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    welch = stats.ttest_ind(x, y, equal_var=False)
    out = {
        "welch": {"t": float(welch.statistic), "df": float(welch.df), "p_value": float(welch.pvalue)},
        # The LoRA-vs-merged study's pooled d: population standard deviations (numpy .std()).
        "cohens_d": float((x.mean() - y.mean()) / np.sqrt((x.std() ** 2 + y.std() ** 2) / 2)),
    }
    if len(x) == len(y):
        rel = stats.ttest_rel(x, y)
        ci = rel.confidence_interval(confidence_level=0.95)
        d = x - y
        out["paired"] = {
            "n": len(x),
            "t": float(rel.statistic),
            "df": float(rel.df),
            "p_value": float(rel.pvalue),
            "mean_diff": float(d.mean()),
            "diff_ci95_low": float(ci.low),
            "diff_ci95_high": float(ci.high),
        }
        out["cohens_dz"] = float(d.mean() / d.std(ddof=1))
    return out


def main():
    doc = {
        "notes": (
            "Inputs and numpy/scipy outputs for crates/bench/tests/stats.rs. percentiles: "
            "numpy.percentile default (linear) as [q, value]; mean_ci: scipy.stats.t.interval("
            "c, n-1, loc=mean, scale=std(ddof=1)/sqrt(n)) as [c, low, high]; welch: "
            "ttest_ind(equal_var=False); paired: ttest_rel with confidence_interval(0.95); "
            "cohens_d: (mean(a)-mean(b))/sqrt((a.std()**2+b.std()**2)/2) (ddof=0); "
            "cohens_dz: mean(a-b)/std(a-b, ddof=1)."
        ),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "cases": [
            {
                "name": name,
                "description": description,
                "a": a,
                "b": b,
                "summary_a": summary(a),
                "summary_b": summary(b),
                **compare(a, b),
            }
            for name, description, a, b in cases()
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(doc['cases'])} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
