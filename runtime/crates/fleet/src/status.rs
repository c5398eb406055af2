//! What an agent tells operators: its record in the `collector_status` KV (key
//! `<pc_id>`), and the module transitions it also reports as kanade `ObsEvent`s on
//! `obs.<pc_id>`, so that kanade's event timeline shows them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `ObsEvent.source` of every event the collector publishes.
pub const OBS_SOURCE: &str = "collector:modules";
/// A module started running, or replaced another version.
pub const KIND_UPDATE: &str = "collector_module_update";
/// A module was refused (signature, anti-rollback, size, compile...).
pub const KIND_REFUSED: &str = "collector_module_refused";
/// A module failed its probation and was rolled back.
pub const KIND_ROLLED_BACK: &str = "collector_module_rolled_back";
/// Event kind: a value in a fleet bucket was refused (the last good one stays).
pub const KIND_VALUE_REFUSED: &str = "collector_fleet_value_refused";
/// Event kind: the agent took a newer trust root (`from`, `to`).
pub const KIND_TRUST_ROOT: &str = "collector_trust_root";
/// Event kind: a trust root was refused (`version` when readable, `reason`).
pub const KIND_TRUST_ROOT_REFUSED: &str = "collector_trust_root_refused";
/// Event kind: the trust root held is close to its expiry, or past it (`state`:
/// "expiring" or "expired", `expires_at`).
pub const KIND_TRUST_EXPIRY: &str = "collector_trust_expiry";
/// Event kind: a running module's bundle is no longer vouched for by the trust root
/// (a signer revoked or removed); `to` is the earlier good version that replaced it, or
/// null when none could.
pub const KIND_REVOKED: &str = "collector_module_revoked";

/// One agent's status record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's PC id, also the record's key.
    pub pc_id: String,
    /// When the agent last wrote this record.
    pub last_seen: DateTime<Utc>,
    /// The collector's own version.
    pub agent_version: String,
    /// Modules running now, by name.
    #[serde(default)]
    pub modules: Vec<ModuleStatus>,
    /// Versions rolled back (or quarantined) on this agent: never run again here.
    #[serde(default)]
    pub rolled_back: Vec<RolledBack>,
    /// The last module refused, if any.
    #[serde(default)]
    pub last_refusal: Option<Refusal>,
    /// Modules assigned but not running, with why (downloading, refused...).
    #[serde(default)]
    pub pending: Vec<Pending>,
    /// Values of the fleet's buckets this agent refused, by `<bucket>/<key>`: the last
    /// good value of each is still in force.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused_values: std::collections::BTreeMap<String, crate::watch::RefusedValue>,
    /// The staged rollout in force for each module on this agent (module → rollout id):
    /// an agent that a narrower scope keeps out of a rollout does not list it, so a
    /// controller does not wait for it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rollouts: std::collections::BTreeMap<String, String>,
    /// Assigned modules past the most an agent runs (64), not started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub over_limit: u64,
    /// The trust root this agent holds, when it checks bundles against one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustStatus>,
    /// Modules stopped because the trust root no longer vouches for their bundle, the
    /// latest last, at most a few.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RolledBack>,
    /// Highest `agent_config` revision in force (0: built-in defaults or offline copy).
    pub config_revision: u64,
    /// Highest `collector_config` revision in force.
    pub assignment_revision: u64,
}

/// The trust root an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustStatus {
    /// Its version: 0 for `--trust` key files.
    pub version: u64,
    /// When it expires (none for `--trust` key files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// "ok", "expiring" (within the warning period: renew it) or "expired" (no new
    /// bundle is accepted; running modules go on).
    pub state: String,
    /// The last root refused, while no newer one was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RootRefused>,
}

/// A trust root that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRefused {
    /// Its version, when it could be read.
    pub version: Option<u64>,
    /// Why, including where it came from.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// A running module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module name, from its manifest.
    pub name: String,
    /// Version from its manifest; 0 for an unsigned local component.
    pub version: u64,
    /// SHA-256 of the component bytes, in lowercase hex.
    pub sha256: String,
    /// When this version took over: when it was deployed, or restored by a rollback.
    pub since: DateTime<Utc>,
    /// Still in its first health ticks: a trap rolls it back.
    pub probation: bool,
    /// Calls that trapped (or ran out of time) since the agent started this module.
    pub traps: u64,
    /// What this version did on this agent: since it completed its probation, or, while
    /// on probation, since it took over (`since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ModuleHealth>,
    /// What the version it replaced on this agent did over its last stretch, to compare
    /// with (none after a restart of the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ModuleHealth>,
}

/// What one version of a module did on one agent over a stretch of time: the figures a
/// rollout's health gates read (`collector rollout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleHealth {
    /// The version these figures are about.
    pub version: u64,
    /// Length of the stretch, in milliseconds.
    pub window_ms: u64,
    /// Ticks run to completion.
    pub ticks: u64,
    /// Calls that trapped, ran out of time, or failed to start.
    pub traps: u64,
    /// Messages published.
    pub published: u64,
    /// Publishes refused (outside the grant, too large, over a limit) or failed.
    pub refused: u64,
    /// Bytes of the messages published.
    pub bytes: u64,
    /// CPU time spent running the module's own code, in microseconds: what a rollout's
    /// CPU gate compares between versions.
    pub cpu_us: u64,
    /// CPU time spent in host functions on the module's behalf (enumerations, name
    /// look-ups, publishes), in microseconds. With several modules sharing one process
    /// enumeration, it falls on the module whose call made it, so it is shown, not
    /// gated on; the host's per-call limits bound it.
    #[serde(default)]
    pub host_cpu_us: u64,
}

impl ModuleHealth {
    /// Messages per tick (0 before the first tick).
    pub fn published_per_tick(&self) -> f64 {
        per(self.published, self.ticks)
    }

    /// Microseconds of CPU per tick (0 before the first tick).
    pub fn cpu_us_per_tick(&self) -> f64 {
        per(self.cpu_us, self.ticks)
    }
}

fn per(n: u64, ticks: u64) -> f64 {
    if ticks == 0 {
        0.0
    } else {
        n as f64 / ticks as f64
    }
}

/// A version that failed on this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// Module name.
    pub name: String,
    /// The version that failed.
    pub version: u64,
    /// Why, such as the trap that ended its probation.
    pub reason: String,
    /// When it was rolled back.
    pub at: DateTime<Utc>,
}

/// A module that was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Module name.
    pub name: String,
    /// The version refused.
    pub version: u64,
    /// Where it came from, e.g. `collector_modules/process-perf/7`.
    pub source: String,
    /// Why it was refused (signature, anti-rollback, size, compile...).
    pub reason: String,
    /// When it was refused.
    pub at: DateTime<Utc>,
}

/// A module assigned to this PC that does not run (yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Module name.
    pub name: String,
    /// The version assigned.
    pub version: u64,
    /// Why it does not run, such as `waiting to download` or `refused: ...`.
    pub why: String,
}

impl AgentStatus {
    /// The health an operator reads first: `ok`, `probation`, `degraded` (an assigned
    /// module does not run: it was refused, rolled back, or is still downloading) or
    /// `stale` (not seen for `stale_after`).
    pub fn health(&self, now: DateTime<Utc>, stale_after: chrono::Duration) -> &'static str {
        if now - self.last_seen > stale_after {
            "stale"
        } else if !self.pending.is_empty() || !self.refused_values.is_empty() || self.over_limit > 0
        {
            "degraded"
        } else if self.modules.iter().any(|m| m.probation) {
            "probation"
        } else {
            "ok"
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A kanade `ObsEvent` (`kanade_shared::wire::ObsEvent`), as published on `obs.<pc_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObsEvent {
    /// The PC the event happened on.
    pub pc_id: String,
    /// When it happened on the agent (not when it was published).
    pub at: DateTime<Utc>,
    /// What happened; the collector's kinds are [`KIND_UPDATE`], [`KIND_REFUSED`] and
    /// [`KIND_ROLLED_BACK`].
    pub kind: String,
    /// Who reports it; [`OBS_SOURCE`] for the collector.
    pub source: String,
    /// With `pc_id` and `source`, kanade's dedupe key.
    pub event_record_id: Option<String>,
    /// Details, as a JSON object; the collector's hold `module` and `version`, and
    /// fields that depend on the kind (`from`, `to`, `reason`, `source`).
    pub payload: serde_json::Value,
}

impl ObsEvent {
    /// An event about the agent's trust root.
    pub fn trust(pc_id: &str, at: DateTime<Utc>, kind: &str, payload: serde_json::Value) -> Self {
        Self {
            pc_id: pc_id.to_string(),
            at,
            kind: kind.to_string(),
            source: OBS_SOURCE.to_string(),
            event_record_id: Some(format!(
                "{kind}:{}",
                at.timestamp_nanos_opt().unwrap_or_default()
            )),
            payload,
        }
    }

    /// An event about module `name` at `version`; `payload` gets `module` and `version`
    /// added. The record id makes re-sends of the same transition harmless.
    pub fn module(
        pc_id: &str,
        at: DateTime<Utc>,
        kind: &str,
        name: &str,
        version: u64,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        payload.insert("module".into(), name.into());
        payload.insert("version".into(), version.into());
        Self {
            pc_id: pc_id.to_string(),
            at,
            kind: kind.to_string(),
            source: OBS_SOURCE.to_string(),
            event_record_id: Some(format!(
                "{kind}:{name}:{version}:{}",
                at.timestamp_nanos_opt().unwrap_or_default()
            )),
            payload: payload.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reads_staleness_first_then_problems() {
        let now = Utc::now();
        let mut s = AgentStatus {
            last_seen: now,
            ..Default::default()
        };
        let minute = chrono::Duration::seconds(60);
        assert_eq!(s.health(now, minute), "ok");
        s.pending.push(Pending {
            name: "m".into(),
            version: 2,
            why: "refused".into(),
        });
        assert_eq!(s.health(now, minute), "degraded");
        assert_eq!(
            s.health(now + chrono::Duration::seconds(61), minute),
            "stale"
        );
    }
}
