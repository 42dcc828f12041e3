//! The engine's model of its own step time (issue #22): a step of `d` decode rows and `p`
//! prefill tokens takes about `c0 + c1 d + c2 p` seconds, fitted online from the steps it
//! runs (least squares, older steps forgotten at `FORGET` per step, a small ridge so the fit
//! stays defined while one term does not vary), so it follows the machine it runs on, its
//! thread count and what else shares it. From it the scheduler keeps time per output token
//! under `--target-tpot-ms`: the batch grows only while a decode step stays within the
//! target, and each step's prefill budget is what the target leaves after the decode rows;
//! and the admission gate estimates a newcomer's time to first token ([`super::gate`]).

/// Weight of the previous fit per new step (an effective memory of ~200 steps).
const FORGET: f64 = 0.995;
/// Steps observed before the model is trusted.
const MIN_STEPS: u64 = 16;
/// Ridge on the per-row and per-token terms (seconds², tiny: only breaks ties).
const RIDGE: f64 = 1e-9;
/// Share of the TPOT target a step is planned to: the rest absorbs the fit's error and
/// steps that run long (a sampler with a grammar, another process on the machine).
const TPOT_HEADROOM: f64 = 0.9;

/// Seconds a step is planned to under a TPOT target.
pub fn planned_step(target_tpot: std::time::Duration) -> f64 {
    TPOT_HEADROOM * target_tpot.as_secs_f64()
}

/// Fitted step-time coefficients: seconds per step, per decode row, per prefill token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    pub base: f64,
    pub per_decode_row: f64,
    pub per_prefill_token: f64,
}

impl StepCoefficients {
    /// Predicted seconds of a step.
    pub fn predict(&self, decode_rows: usize, prefill_tokens: usize) -> f64 {
        self.base + self.per_decode_row * decode_rows as f64 + self.per_prefill_token * prefill_tokens as f64
    }

    /// Most decode rows whose step (no prefill) stays within `target` seconds; at least 1.
    pub fn max_decode_rows(&self, target: f64) -> usize {
        if self.per_decode_row <= 0.0 {
            return usize::MAX;
        }
        (((target - self.base) / self.per_decode_row).floor().max(1.0)) as usize
    }

    /// Most rows a steady batch keeps within `target` seconds a step when each decoded
    /// token brings `prefill_per_output` prompt tokens to prefill (typical prompt over
    /// typical output length): the decode rows and the prefill that replaces finished
    /// rows both fit, so neither starves the other. At least 1.
    pub fn balanced_rows(&self, target: f64, prefill_per_output: f64) -> usize {
        let per_row = self.per_decode_row + self.per_prefill_token * prefill_per_output.max(0.0);
        if per_row <= 0.0 {
            return usize::MAX;
        }
        (((target - self.base) / per_row).floor().max(1.0)) as usize
    }

    /// Prefill tokens a step of `decode_rows` can add within `target` seconds.
    pub fn prefill_room(&self, decode_rows: usize, target: f64) -> usize {
        let left = target - self.predict(decode_rows, 0);
        if self.per_prefill_token <= 0.0 {
            return usize::MAX;
        }
        (left / self.per_prefill_token).floor().max(0.0) as usize
    }
}

/// Exponentially weighted normal equations of the fit.
#[derive(Clone, Debug, Default)]
pub struct StepModel {
    xtx: [[f64; 3]; 3],
    xty: [f64; 3],
    steps: u64,
}

impl StepModel {
    /// Takes one step's shape and wall time.
    pub fn observe(&mut self, decode_rows: usize, prefill_tokens: usize, seconds: f64) {
        if !seconds.is_finite() || seconds <= 0.0 || decode_rows + prefill_tokens == 0 {
            return;
        }
        let x = [1.0, decode_rows as f64, prefill_tokens as f64];
        for i in 0..3 {
            for j in 0..3 {
                self.xtx[i][j] = FORGET * self.xtx[i][j] + x[i] * x[j];
            }
            self.xty[i] = FORGET * self.xty[i] + x[i] * seconds;
        }
        self.steps += 1;
    }

    /// The fit, once enough steps were seen (negative terms clamped to zero).
    pub fn coefficients(&self) -> Option<StepCoefficients> {
        if self.steps < MIN_STEPS {
            return None;
        }
        let mut a = self.xtx;
        a[1][1] += RIDGE;
        a[2][2] += RIDGE;
        let c = solve3(a, self.xty)?;
        Some(StepCoefficients { base: c[0].max(0.0), per_decode_row: c[1].max(0.0), per_prefill_token: c[2].max(0.0) })
    }
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..3 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 3];
    for row in (0..3).rev() {
        let s: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_linear_step_time_and_follows_a_change() {
        let mut m = StepModel::default();
        assert!(m.coefficients().is_none());
        let truth = |d: usize, p: usize| 0.004 + 0.0015 * d as f64 + 0.0002 * p as f64;
        for i in 0..400usize {
            let (d, p) = (1 + i % 32, (i * 37) % 300);
            m.observe(d, p, truth(d, p));
        }
        let c = m.coefficients().unwrap();
        assert!((c.base - 0.004).abs() < 1e-6 && (c.per_decode_row - 0.0015).abs() < 1e-7 && (c.per_prefill_token - 0.0002).abs() < 1e-8, "{c:?}");
        assert!((30..=31).contains(&c.max_decode_rows(0.05)), "{c:?}");
        assert!((154..=155).contains(&c.prefill_room(10, 0.05)), "{c:?}");
        // The machine slows down by half: the fit follows within a few hundred steps.
        for i in 0..1500usize {
            let (d, p) = (1 + i % 32, (i * 37) % 300);
            m.observe(d, p, 2.0 * truth(d, p));
        }
        let c = m.coefficients().unwrap();
        assert!((c.per_decode_row - 0.003).abs() < 3e-5, "{c:?}");
        assert!((13..=14).contains(&c.max_decode_rows(0.05)), "{c:?}");
    }
}
