//! Policy files shared by the trigger and the gate: TOML with a `[default]`
//! table and `[overrides."<tenant>/<base model>"]` tables, each a full
//! policy whose unset fields take the built-in defaults.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A policy that can say what is wrong with its values.
pub trait CheckPolicy {
    /// `Err(what is wrong)` for values no deployment should run with.
    fn check(&self) -> std::result::Result<(), String>;
}

/// Policies per (tenant, base model).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, bound = "P: DeserializeOwned + Default")]
pub struct PairPolicies<P> {
    /// The policy of every pair without an override.
    #[serde(default)]
    pub default: P,
    /// Overrides by `"<tenant>/<base model>"`.
    #[serde(default)]
    pub overrides: BTreeMap<String, P>,
}

impl<P: DeserializeOwned + Default + CheckPolicy> PairPolicies<P> {
    /// Parses and checks policy TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PairPolicies<P>> {
        let p: PairPolicies<P> = toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        p.default.check().map_err(|e| Error::Config(format!("{origin}: [default]: {e}")))?;
        for (key, policy) in &p.overrides {
            policy.check().map_err(|e| Error::Config(format!("{origin}: override {key}: {e}")))?;
        }
        Ok(p)
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<PairPolicies<P>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        PairPolicies::parse(&text, &path.display().to_string())
    }

    /// A policy file if one is given, else the defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<PairPolicies<P>> {
        path.map_or_else(|| Ok(PairPolicies::default()), PairPolicies::load)
    }

    /// The policy of a pair.
    pub fn of(&self, tenant: &str, base_model: &str) -> &P {
        self.overrides.get(&format!("{tenant}/{base_model}")).unwrap_or(&self.default)
    }
}
