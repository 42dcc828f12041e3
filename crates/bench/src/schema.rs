//! JSON Schemas of the result files, generated from the types that write them so the
//! documented schema cannot drift from the files (`loramux bench schema` prints them;
//! `docs/bench-results.schema.json` is the committed copy, checked by a test).

use schemars::schema_for;
use serde_json::{json, Value};

use crate::deployment::DeploymentResult;
use crate::fairness::FairnessResult;
use crate::load::LoadResult;
use crate::quality::QualityResult;
use crate::route::RouteResult;
use crate::swap::SwapResult;
use crate::switch::SwitchResult;

/// One schema per scenario, keyed by scenario name.
pub fn all() -> Value {
    json!({
        "switch": schema_for!(SwitchResult),
        "deployment": schema_for!(DeploymentResult),
        "swap": schema_for!(SwapResult),
        "load": schema_for!(LoadResult),
        "quality": schema_for!(QualityResult),
        "route": schema_for!(RouteResult),
        "fairness": schema_for!(FairnessResult),
    })
}
