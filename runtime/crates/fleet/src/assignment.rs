//! Module assignments: which module versions a PC should run, stored in the
//! `collector_config` KV under kanade's scope keys. A value names modules, each with a
//! version and/or `enabled`:
//! `{"modules":{"process-perf":{"version":7},"top-memory":{"enabled":false}}}`.
//! Layers merge per module and per field, global → groups → pc, so a narrower scope
//! overrides a wider one; `enabled:false` removes a module; a group is a ring (a canary
//! is a group assignment, then a global one).
//!
//! A staged rollout (`collector rollout`) adds `rollout` to the entry of the scope it
//! targets: `{"version":1,"rollout":{"id":"...","to":2,"groups":["canary"],"ppm":100000}}`.
//! `version` stays the version the rollout started from; an agent of that scope runs
//! `to` when it belongs to one of `groups` or when its place in the rollout's order
//! ([`position`], a hash of the rollout id and its PC id) is below `ppm` (parts per
//! million), so 1% of a fleet is inside 10% of it. Agents place themselves: the controller
//! writes this one value per wave, never a key per agent. A narrower scope that sets a
//! version overrides the rollout, as it overrides a wider version. An agent that does not
//! know `rollout` ignores it and runs `version`.

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleAssignment {
    /// The version to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `false` removes the module; `true` restores one a wider scope removed (it runs
    /// only if some scope gives it a version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A staged rollout from `version` in progress at this scope; it is in force only
    /// together with this scope's `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Placement>,
}

/// Which agents of a scope run a rollout's new version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The rollout's id: with the PC id, it places the agent ([`position`]).
    pub id: String,
    /// The version agents in the waves so far run.
    pub to: u64,
    /// Groups whose members are in (group waves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Share of the scope's agents in, in parts per million of the rollout's order.
    #[serde(default)]
    pub ppm: u32,
}

/// Parts per million: the whole of a scope.
pub const PPM_ALL: u32 = 1_000_000;

/// An agent's place in a rollout's order, in `0..PPM_ALL`: stable for a PC and a
/// rollout, independent between rollouts, and spread evenly (the first bytes of a
/// SHA-256), so the agents below 1% are among those below 10%.
pub fn position(rollout_id: &str, pc_id: &str) -> u32 {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"collector rollout\0");
    h.update(rollout_id.as_bytes());
    h.update(b"\0");
    h.update(pc_id.as_bytes());
    let digest = h.finalize();
    let head = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    u32::try_from(head % u64::from(PPM_ALL)).expect("below a million")
}

impl Placement {
    /// Whether the agent `pc_id`, member of `groups`, runs [`Placement::to`].
    pub fn places(&self, pc_id: &str, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.contains(g))
            || (self.ppm > 0 && position(&self.id, pc_id) < self.ppm)
    }
}

/// The agent a merge is for: where it stands in a rollout.
#[derive(Debug, Clone, Copy)]
pub struct Agent<'a> {
    /// Its PC id.
    pub pc_id: &'a str,
    /// The groups it belongs to.
    pub groups: &'a [String],
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
    /// The staged rollout in force for each module (module → rollout id), whether or
    /// not it places this agent: none where a narrower scope sets the version.
    pub rollouts: BTreeMap<String, String>,
}

/// Merges `global`, then `groups` in alphabetical order, then `pc`: per module, each
/// field comes from the narrowest scope that sets it. A module runs when some scope
/// gives it a version and the narrowest scope that says `enabled` does not say false.
/// A rollout comes with the version of its scope: the rollout's new version when it
/// places `agent`, else the version it started from.
pub fn resolve<'a>(
    global: Option<&AssignmentScope>,
    groups: impl IntoIterator<Item = (&'a str, &'a AssignmentScope)>,
    pc: Option<&AssignmentScope>,
    agent: Agent<'_>,
) -> ResolvedAssignment {
    let mut merged: BTreeMap<String, ModuleAssignment> = BTreeMap::new();
    let mut overlay = |scope: &AssignmentScope| {
        for (name, a) in &scope.modules {
            let m = merged.entry(name.clone()).or_default();
            if a.version.is_some() {
                m.version = a.version;
                m.rollout = a.rollout.clone();
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
    let rollouts = merged
        .iter()
        .filter(|(_, m)| m.enabled != Some(false) && m.version.is_some())
        .filter_map(|(name, m)| m.rollout.as_ref().map(|r| (name.clone(), r.id.clone())))
        .collect();
    let modules = merged
        .into_iter()
        .filter(|(_, m)| m.enabled != Some(false))
        .filter_map(|(name, m)| {
            let version = match &m.rollout {
                Some(r) if r.places(agent.pc_id, agent.groups) => Some(r.to),
                _ => m.version,
            };
            version.map(|v| (name, v))
        })
        .collect();
    ResolvedAssignment {
        modules,
        conflicts,
        rollouts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn scope(json: &str) -> AssignmentScope {
        AssignmentScope::from_json(json.as_bytes()).unwrap()
    }

    const A: Agent<'static> = Agent {
        pc_id: "pc-a",
        groups: &[],
    };

    #[test]
    fn rollout_waves_nest_and_spread_evenly() {
        let pcs: Vec<String> = (0..20_000).map(|i| format!("pc-{i}")).collect();
        let inside = |id: &str, ppm: u32| -> BTreeSet<&str> {
            pcs.iter()
                .filter(|pc| position(id, pc) < ppm)
                .map(String::as_str)
                .collect()
        };
        let one = inside("r1", 10_000);
        let ten = inside("r1", 100_000);
        let half = inside("r1", 500_000);
        assert!(one.is_subset(&ten) && ten.is_subset(&half));
        // 1% of 20,000 is 200: a fair hash lands within a few standard deviations.
        assert!((140..=260).contains(&one.len()), "{}", one.len());
        assert!((9_600..=10_400).contains(&half.len()), "{}", half.len());
        // Another rollout draws another 1%.
        let other = inside("r2", 10_000);
        assert!(one.intersection(&other).count() < 20);
        assert_eq!(inside("r1", PPM_ALL).len(), pcs.len());
        assert!(inside("r1", 0).is_empty());
    }

    #[test]
    fn a_rollout_places_agents_and_narrower_versions_override_it() {
        let global = scope(
            r#"{"modules":{"m":{"version":1,"rollout":{"id":"r","to":2,"groups":["canary"],"ppm":0}}}}"#,
        );
        let canary = vec!["canary".to_string()];
        let member = Agent {
            pc_id: "pc-a",
            groups: &canary,
        };
        assert_eq!(resolve(Some(&global), [], None, member).modules["m"], 2);
        assert_eq!(resolve(Some(&global), [], None, A).modules["m"], 1);
        // A pc that pins a version keeps it, rollout or not.
        let pin = scope(r#"{"modules":{"m":{"version":1}}}"#);
        assert_eq!(
            resolve(Some(&global), [], Some(&pin), member).modules["m"],
            1
        );
        assert!(
            resolve(Some(&global), [], Some(&pin), member)
                .rollouts
                .is_empty()
        );
        assert_eq!(resolve(Some(&global), [], None, A).rollouts["m"], "r");
        // A scope that only disables or enables does not lift the rollout.
        let enable = scope(r#"{"modules":{"m":{"enabled":true}}}"#);
        assert_eq!(
            resolve(Some(&global), [], Some(&enable), member).modules["m"],
            2
        );
        // All of the scope.
        let all =
            scope(r#"{"modules":{"m":{"version":1,"rollout":{"id":"r","to":2,"ppm":1000000}}}}"#);
        assert_eq!(resolve(Some(&all), [], None, A).modules["m"], 2);
    }

    #[test]
    fn narrower_scopes_override_per_module_and_field() {
        let global =
            scope(r#"{"modules":{"process-perf":{"version":5},"top-memory":{"version":2}}}"#);
        let canary = scope(r#"{"modules":{"process-perf":{"version":7}}}"#);
        let pc = scope(r#"{"modules":{"top-memory":{"enabled":false}}}"#);
        let r = resolve(Some(&global), [("canary", &canary)], Some(&pc), A);
        assert_eq!(r.modules, Desired::from([("process-perf".into(), 7)]));
        assert!(r.conflicts.is_empty());
        let r = resolve(Some(&global), [], None, A);
        assert_eq!(r.modules.len(), 2);
    }

    #[test]
    fn enabled_without_a_version_runs_nothing_and_reenabling_keeps_the_wider_version() {
        let global = scope(r#"{"modules":{"m":{"version":3,"enabled":false}}}"#);
        let pc = scope(r#"{"modules":{"m":{"enabled":true}}}"#);
        assert!(resolve(Some(&global), [], None, A).modules.is_empty());
        assert_eq!(resolve(Some(&global), [], Some(&pc), A).modules["m"], 3);
        let only_enabled = scope(r#"{"modules":{"n":{"enabled":true}}}"#);
        assert!(resolve(Some(&only_enabled), [], None, A).modules.is_empty());
    }

    #[test]
    fn group_conflicts_are_reported_and_the_last_group_wins() {
        let a = scope(r#"{"modules":{"m":{"version":1}}}"#);
        let z = scope(r#"{"modules":{"m":{"version":2}}}"#);
        let r = resolve(None, [("zeta", &z), ("alpha", &a)], None, A);
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
