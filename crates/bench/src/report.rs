//! `loramux bench report FILE.json`: re-renders a saved result's Markdown and plots, so the
//! analysis can be redone (or restyled) without measuring again; `loramux bench compare`
//! overlays several load results (before and after a change, two machines) in one plot.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::deployment::{self, DeploymentResult};
use crate::fairness::FairnessResult;
use crate::load::LoadResult;
use crate::quality::QualityResult;
use crate::route::RouteResult;
use crate::run::{render_outputs, Report};
use crate::swap::SwapResult;
use crate::switch::SwitchResult;
use crate::BenchError;

/// A result file of any scenario.
pub enum AnyResult {
    Switch(SwitchResult),
    Deployment(Box<DeploymentResult>),
    Swap(SwapResult),
    Load(LoadResult),
    Quality(Box<QualityResult>),
    Route(Box<RouteResult>),
    Fairness(Box<FairnessResult>),
}

impl AnyResult {
    /// Reads a result file, picking the scenario from `metadata.scenario`.
    pub fn read(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::Io { path: path.to_path_buf(), source: e })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::Invalid(format!("{}: not JSON: {e}", path.display())))?;
        let scenario = value["metadata"]["scenario"].as_str().unwrap_or_default().to_string();
        let bad = |e: serde_json::Error| BenchError::Invalid(format!("{}: not a {scenario} result: {e}", path.display()));
        Ok(match scenario.as_str() {
            "switch" => Self::Switch(serde_json::from_value(value).map_err(bad)?),
            "deployment" => {
                let mut r: DeploymentResult = serde_json::from_value(value).map_err(bad)?;
                // The analysis is a function of the rows: recompute it from the raw data.
                r.analysis = deployment::analyse(&r.results)?;
                Self::Deployment(Box::new(r))
            }
            "swap" => Self::Swap(serde_json::from_value(value).map_err(bad)?),
            "load" => Self::Load(serde_json::from_value(value).map_err(bad)?),
            "quality" => Self::Quality(Box::new(serde_json::from_value(value).map_err(bad)?)),
            "route" => Self::Route(Box::new(serde_json::from_value(value).map_err(bad)?)),
            "fairness" => Self::Fairness(Box::new(serde_json::from_value(value).map_err(bad)?)),
            other => {
                return Err(BenchError::Invalid(format!(
                    "{}: metadata.scenario is '{other}', not one of switch, deployment, swap, load, quality, route, fairness",
                    path.display()
                )))
            }
        })
    }

    fn report(&self) -> &dyn Report {
        match self {
            Self::Switch(r) => r,
            Self::Deployment(r) => r.as_ref(),
            Self::Swap(r) => r,
            Self::Load(r) => r,
            Self::Quality(r) => r.as_ref(),
            Self::Route(r) => r.as_ref(),
            Self::Fairness(r) => r.as_ref(),
        }
    }
}

/// Re-renders `path`'s Markdown and plots next to it; returns what was written.
pub fn rerender(path: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let result = AnyResult::read(path)?;
    render_outputs(result.report(), path)
}

/// Plots the goodput and the TPOT p99 of several `load` results against the arrival rate,
/// one line per result named by its label (`LABEL=FILE`, or the file's folder name), in
/// `<out>_goodput` and `<out>_tpot`; returns what was written.
pub fn compare_load(inputs: &[String], out: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let mut runs = Vec::new();
    for input in inputs {
        let (label, file) = match input.split_once('=') {
            Some((l, f)) => (l.to_string(), PathBuf::from(f)),
            None => {
                let f = PathBuf::from(input);
                let label = f.parent().and_then(|d| d.file_name()).map_or_else(|| input.clone(), |n| n.to_string_lossy().into_owned());
                (label, f)
            }
        };
        match AnyResult::read(&file)? {
            AnyResult::Load(r) => runs.push((label, r)),
            _ => return Err(BenchError::Invalid(format!("{}: not a load result (bench compare overlays load results)", file.display()))),
        }
    }
    let lines = |f: &dyn Fn(&crate::load::LoadPoint) -> Option<f64>| -> Vec<crate::plot::Series> {
        runs.iter()
            .map(|(label, r)| crate::plot::Series { name: label.clone(), points: r.points.iter().filter_map(|p| Some((p.rate_req_per_sec, f(p)?))).collect() })
            .collect()
    };
    let stem = |suffix: &str| PathBuf::from(format!("{}_{suffix}", out.display()));
    let mut written =
        crate::plot::line_chart(&stem("goodput"), "Goodput by arrival rate", "arrival rate (req/s)", "requests/s meeting the SLO", &lines(&|p| Some(p.goodput_req_per_sec)), false)?;
    written.extend(crate::plot::line_chart(&stem("tpot"), "TPOT p99 by arrival rate", "arrival rate (req/s)", "ms", &lines(&|p| p.tpot.as_ref().map(|s| s.p99)), false)?);
    Ok(written)
}
