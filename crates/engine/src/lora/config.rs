//! PEFT's `adapter_config.json`, and which modules of the base it targets with which
//! rank and alpha, following PEFT's own matching rules.

use std::collections::HashMap;

use regex::Regex;
use serde::Deserialize;

use super::LoraModule;

/// A string or a list of strings, as PEFT accepts for several fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// An integer or a list of integers (`layers_to_transform`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum IntOrList {
    One(usize),
    Many(Vec<usize>),
}

/// The fields of PEFT's LoRA config that change what the adapter computes.
#[derive(Clone, Debug, Deserialize)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Option<StringOrList>,
    pub exclude_modules: Option<StringOrList>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    pub layers_to_transform: Option<IntOrList>,
    pub layers_pattern: Option<StringOrList>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    pub bias: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub target_parameters: Option<Vec<String>>,
    pub base_model_name_or_path: Option<String>,
}

/// A config field that cannot be served, with the reason.
#[derive(Debug)]
pub struct Unsupported {
    pub field: &'static str,
    pub message: String,
}

/// The compiled matching rules of one config.
pub struct TargetMatcher {
    targets: Targets,
    exclude: Option<Targets>,
    layers: Option<Vec<usize>>,
    layer_patterns: Vec<Regex>,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
}

enum Targets {
    Regex(Regex),
    Names(Vec<String>),
    AllLinear,
}

fn full_match(pattern: &str, field: &'static str) -> Result<Regex, Unsupported> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| Unsupported {
        field,
        message: format!("regex '{pattern}' is not supported: {e}"),
    })
}

impl Targets {
    fn parse(v: &StringOrList, field: &'static str) -> Result<Self, Unsupported> {
        Ok(match v {
            StringOrList::One(s) if s == "all-linear" => Targets::AllLinear,
            StringOrList::One(s) => Targets::Regex(full_match(s, field)?),
            StringOrList::Many(list) => Targets::Names(list.clone()),
        })
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Targets::Regex(re) => re.is_match(key),
            Targets::Names(names) => names
                .iter()
                .any(|n| key == n || key.ends_with(&format!(".{n}"))),
            Targets::AllLinear => true,
        }
    }
}

impl PeftConfig {
    /// Rejects what the engine does not compute, naming the field. One flat list of
    /// checks, in the order users meet them; longer than our ~80-line guide to stay flat.
    pub fn check_supported(&self) -> Result<(), Unsupported> {
        if let Some(t) = &self.peft_type {
            if t != "LORA" {
                return Err(Unsupported {
                    field: "peft_type",
                    message: format!("'{t}' is not LoRA"),
                });
            }
        }
        if self.use_dora {
            return Err(Unsupported {
                field: "use_dora",
                message: "DoRA adapters are not supported; merge the adapter or retrain without DoRA".into(),
            });
        }
        if self.lora_bias {
            return Err(Unsupported {
                field: "lora_bias",
                message: "LoRA bias terms are not supported".into(),
            });
        }
        if let Some(b) = &self.bias {
            if b != "none" {
                return Err(Unsupported {
                    field: "bias",
                    message: format!("'{b}' is not supported (only 'none')"),
                });
            }
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(Unsupported {
                field: "modules_to_save",
                message: format!(
                    "{:?}: fully trained extra modules are not supported",
                    self.modules_to_save.as_ref().unwrap()
                ),
            });
        }
        if self.target_parameters.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(Unsupported {
                field: "target_parameters",
                message: "LoRA on raw parameters is not supported".into(),
            });
        }
        if self.r == 0 {
            return Err(Unsupported {
                field: "r",
                message: "rank must be positive".into(),
            });
        }
        // A zero rank leaves a module with empty A/B matrices that no kernel can apply.
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(Unsupported {
                field: "rank_pattern",
                message: format!("'{key}': rank must be positive, got 0"),
            });
        }
        if let Some((key, a)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return Err(Unsupported {
                field: "alpha_pattern",
                message: format!("'{key}': alpha must be a finite number, got {a}"),
            });
        }
        if !self.lora_alpha.is_finite() {
            return Err(Unsupported {
                field: "lora_alpha",
                message: format!("must be a finite number, got {}", self.lora_alpha),
            });
        }
        if let Some(t) = &self.target_modules {
            let names: Vec<&str> = match t {
                StringOrList::One(s) => vec![s.as_str()],
                StringOrList::Many(v) => v.iter().map(String::as_str).collect(),
            };
            for bad in ["embed_tokens", "lm_head"] {
                if names.contains(&bad) {
                    return Err(Unsupported {
                        field: "target_modules",
                        message: format!("LoRA on {bad} is not supported"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Compiles the matching rules.
    pub fn matcher(&self) -> Result<TargetMatcher, Unsupported> {
        let targets = match &self.target_modules {
            Some(t) => Targets::parse(t, "target_modules")?,
            None => {
                return Err(Unsupported {
                    field: "target_modules",
                    message: "missing".into(),
                })
            }
        };
        let exclude = self
            .exclude_modules
            .as_ref()
            .map(|e| Targets::parse(e, "exclude_modules"))
            .transpose()?;
        let layers = match &self.layers_to_transform {
            None => None,
            Some(IntOrList::One(i)) => Some(vec![*i]),
            Some(IntOrList::Many(v)) if v.is_empty() => None,
            Some(IntOrList::Many(v)) => Some(v.clone()),
        };
        let layer_patterns = match &self.layers_pattern {
            None => vec![],
            Some(StringOrList::One(s)) if s.is_empty() => vec![],
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        }
        .iter()
        .map(|p| {
            Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).map_err(|e| Unsupported {
                field: "layers_pattern",
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
        // PEFT tries patterns in insertion order; JSON object order is kept by serde_json
        // only with preserve_order, so sort for determinism (patterns rarely overlap).
        let mut rank_keys: Vec<_> = self.rank_pattern.iter().collect();
        rank_keys.sort();
        let rank_pattern = rank_keys
            .into_iter()
            .map(|(k, v)| Ok((pattern_key(k, "rank_pattern")?, *v)))
            .collect::<Result<Vec<_>, Unsupported>>()?;
        let mut alpha_keys: Vec<_> = self.alpha_pattern.iter().collect();
        alpha_keys.sort_by(|a, b| a.0.cmp(b.0));
        let alpha_pattern = alpha_keys
            .into_iter()
            .map(|(k, v)| Ok((pattern_key(k, "alpha_pattern")?, *v)))
            .collect::<Result<Vec<_>, Unsupported>>()?;
        Ok(TargetMatcher {
            targets,
            exclude,
            layers,
            layer_patterns,
            rank_pattern,
            alpha_pattern,
        })
    }
}

/// PEFT's `get_pattern_key`: a key matches a module name when it is the name's suffix
/// after a dot boundary, read as a regex.
fn pattern_key(key: &str, field: &'static str) -> Result<Regex, Unsupported> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| Unsupported {
        field,
        message: format!("'{key}': {e}"),
    })
}

impl TargetMatcher {
    /// Whether PEFT would wrap this module of this layer.
    pub fn targets(&self, module: LoraModule, layer: usize) -> bool {
        let key = module.module_name(layer);
        if let Some(ex) = &self.exclude {
            if ex.matches(&key) {
                return false;
            }
        }
        if !self.targets.matches(&key) {
            return false;
        }
        // PEFT applies layers_to_transform only to list targets (a regex string
        // selects layers itself).
        match (&self.targets, &self.layers) {
            (Targets::Regex(_), _) | (_, None) => true,
            (_, Some(layers)) => {
                if !self.layer_patterns.is_empty()
                    && !self.layer_patterns.iter().any(|p| p.is_match(&key))
                {
                    return false;
                }
                layers.contains(&layer)
            }
        }
    }

    /// Rank and alpha for one module, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, cfg: &PeftConfig, module: LoraModule, layer: usize) -> (usize, f64) {
        let key = module.module_name(layer);
        let r = self
            .rank_pattern
            .iter()
            .find(|(re, _)| re.is_match(&key))
            .map(|(_, r)| *r)
            .unwrap_or(cfg.r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(&key))
            .map(|(_, a)| *a)
            .unwrap_or(cfg.lora_alpha);
        (r, alpha)
    }
}

/// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> PeftConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn list_targets_match_suffix_and_layers() {
        let c = cfg(r#"{"r":4,"lora_alpha":8,"target_modules":["v_proj","q_proj"],
            "layers_to_transform":[1],"layers_pattern":"layers"}"#);
        let m = c.matcher().unwrap();
        assert!(m.targets(LoraModule::QProj, 1));
        assert!(!m.targets(LoraModule::QProj, 0));
        assert!(!m.targets(LoraModule::KProj, 1));
    }

    #[test]
    fn regex_string_is_full_match() {
        let c = cfg(r#"{"r":4,"lora_alpha":8,"target_modules":".*\\.(k_proj|down_proj)"}"#);
        let m = c.matcher().unwrap();
        assert!(m.targets(LoraModule::KProj, 0));
        assert!(m.targets(LoraModule::DownProj, 5));
        assert!(!m.targets(LoraModule::QProj, 0));
    }

    #[test]
    fn patterns_override_rank_and_alpha() {
        let c = cfg(r#"{"r":8,"lora_alpha":16,"target_modules":"all-linear",
            "rank_pattern":{"o_proj":2},"alpha_pattern":{"layers.1.mlp.down_proj":3}}"#);
        let m = c.matcher().unwrap();
        assert_eq!(m.rank_alpha(&c, LoraModule::OProj, 0), (2, 16.0));
        assert_eq!(m.rank_alpha(&c, LoraModule::DownProj, 1), (8, 3.0));
        assert_eq!(m.rank_alpha(&c, LoraModule::DownProj, 0), (8, 16.0));
        assert!((scaling(16.0, 4, true) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn dora_and_modules_to_save_are_refused_by_field() {
        let c = cfg(r#"{"r":8,"lora_alpha":16,"target_modules":["q_proj"],"use_dora":true}"#);
        assert_eq!(c.check_supported().unwrap_err().field, "use_dora");
        let c = cfg(r#"{"r":8,"lora_alpha":16,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#);
        assert_eq!(c.check_supported().unwrap_err().field, "modules_to_save");
    }
}
