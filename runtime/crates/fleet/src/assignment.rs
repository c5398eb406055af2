//! Module assignments: which module versions a PC should run, stored in the
//! `collector_config` KV under kanade's scope keys. A value names modules, each with a
//! version and/or `enabled`:
//! `{"modules":{"process-perf":{"version":7},"top-memory":{"enabled":false}}}`.
//! Layers merge per module and per field, global → groups → pc, so a narrower scope
//! overrides a wider one; `enabled:false` removes a module; a group is a ring (a canary
//! is a group assignment, then a global one).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One scope's assignments (one value of `collector_config`). A top-level field other
/// than `modules` is refused: a value of another shape (a JetStream API answer steered
/// onto the key, say) must never read as "assign nothing".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentScope {
    /// What this scope says about each module, by module name.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleAssignment>,
}

/// What one scope says about one module; absent fields leave wider scopes in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleAssignment {
    /// The version to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `false` removes the module; `true` restores one a wider scope removed (it runs
    /// only if some scope gives it a version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl AssignmentScope {
    /// Parses a `collector_config` value. Unknown top-level fields are refused; unknown
    /// fields of a module's entry are ignored, so that values written by a newer
    /// operator tool still assign what this agent understands. Module names are checked
    /// ([`crate::names::module`]): one invalid name refuses the value.
    ///
    /// # Errors
    ///
    /// When the value is not such an object; the message names the failing field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let scope: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            format!("field `{path}`: {}", e.into_inner())
        })?;
        for name in scope.modules.keys() {
            crate::names::module(name).map_err(|e| format!("field `modules`: {e}"))?;
        }
        Ok(scope)
    }

    /// Compact JSON, as stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("assignments serialize")
    }
}

/// The modules one PC should run: name → version.
pub type Desired = BTreeMap<String, u64>;

/// The outcome of merging assignment layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedAssignment {
    /// The modules the PC should run, with their versions.
    pub modules: Desired,
    /// Modules whose version two of the PC's groups set differently (the
    /// alphabetically last group wins), as `module: group, group`.
    pub conflicts: Vec<String>,
}

/// Merges `global`, then `groups` in alphabetical order, then `pc`: per module, each
/// field comes from the narrowest scope that sets it. A module runs when some scope
/// gives it a version and the narrowest scope that says `enabled` does not say false.
pub fn resolve<'a>(
    global: Option<&AssignmentScope>,
    groups: impl IntoIterator<Item = (&'a str, &'a AssignmentScope)>,
    pc: Option<&AssignmentScope>,
) -> ResolvedAssignment {
    let mut merged: BTreeMap<String, ModuleAssignment> = BTreeMap::new();
    let mut overlay = |scope: &AssignmentScope| {
        for (name, a) in &scope.modules {
            let m = merged.entry(name.clone()).or_default();
            if a.version.is_some() {
                m.version = a.version;
            }
            if a.enabled.is_some() {
                m.enabled = a.enabled;
            }
        }
    };
    if let Some(g) = global {
        overlay(g);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    let mut setters: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    for (group, scope) in &groups {
        overlay(scope);
        for (name, a) in &scope.modules {
            if let Some(v) = a.version {
                setters.entry(name).or_default().push((group, v));
            }
        }
    }
    if let Some(p) = pc {
        overlay(p);
    }
    let conflicts = setters
        .into_iter()
        .filter(|(_, s)| s.iter().any(|(_, v)| *v != s[0].1))
        .map(|(name, s)| {
            let groups: Vec<String> = s.iter().map(|(g, v)| format!("{g} (v{v})")).collect();
            format!("{name}: {}", groups.join(", "))
        })
        .collect();
    let modules = merged
        .into_iter()
        .filter(|(_, m)| m.enabled != Some(false))
        .filter_map(|(name, m)| m.version.map(|v| (name, v)))
        .collect();
    ResolvedAssignment { modules, conflicts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(json: &str) -> AssignmentScope {
        AssignmentScope::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn narrower_scopes_override_per_module_and_field() {
        let global =
            scope(r#"{"modules":{"process-perf":{"version":5},"top-memory":{"version":2}}}"#);
        let canary = scope(r#"{"modules":{"process-perf":{"version":7}}}"#);
        let pc = scope(r#"{"modules":{"top-memory":{"enabled":false}}}"#);
        let r = resolve(Some(&global), [("canary", &canary)], Some(&pc));
        assert_eq!(r.modules, Desired::from([("process-perf".into(), 7)]));
        assert!(r.conflicts.is_empty());
        let r = resolve(Some(&global), [], None);
        assert_eq!(r.modules.len(), 2);
    }

    #[test]
    fn enabled_without_a_version_runs_nothing_and_reenabling_keeps_the_wider_version() {
        let global = scope(r#"{"modules":{"m":{"version":3,"enabled":false}}}"#);
        let pc = scope(r#"{"modules":{"m":{"enabled":true}}}"#);
        assert!(resolve(Some(&global), [], None).modules.is_empty());
        assert_eq!(resolve(Some(&global), [], Some(&pc)).modules["m"], 3);
        let only_enabled = scope(r#"{"modules":{"n":{"enabled":true}}}"#);
        assert!(resolve(Some(&only_enabled), [], None).modules.is_empty());
    }

    #[test]
    fn group_conflicts_are_reported_and_the_last_group_wins() {
        let a = scope(r#"{"modules":{"m":{"version":1}}}"#);
        let z = scope(r#"{"modules":{"m":{"version":2}}}"#);
        let r = resolve(None, [("zeta", &z), ("alpha", &a)], None);
        assert_eq!(r.modules["m"], 2);
        assert_eq!(r.conflicts, ["m: alpha (v1), zeta (v2)"]);
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = AssignmentScope::from_json(br#"{"modules":{"m":{"version":"7"}}}"#).unwrap_err();
        assert!(err.contains("modules.m.version"), "{err}");
        // Another shape at the top (a JetStream answer, say) never reads as "assign
        // nothing"; a field a newer tool adds to a module's entry is ignored.
        let err = AssignmentScope::from_json(
            br#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response"}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        assert!(AssignmentScope::from_json(br#"{"modules":{},"future":1}"#).is_err());
        assert_eq!(
            scope(r#"{"modules":{"m":{"version":1,"future":true}}}"#).modules["m"].version,
            Some(1)
        );
        let err = AssignmentScope::from_json(br#"{"modules":{"../x":{"version":1}}}"#).unwrap_err();
        assert!(err.contains("module name"), "{err}");
    }
}
