//! Staged rollouts: the durable object an operator starts (`collector rollout start`),
//! kept in the `collector_rollouts` KV under the module's name, and the judgment a
//! controller makes of it from the agents' status records.
//!
//! A rollout moves one module of one scope (`global` or `groups.<g>`) from version
//! `from` to `to` through waves: groups (`canary`) and shares of the scope's agents
//! (`1%`, `10%`, `100%`). The controller writes one value per wave into the scope's
//! assignment ([`Rollout::entry`], a [`Placement`]); each agent places itself from it.
//! A wave advances after its bake time once enough of its agents report the new version
//! healthy; any gate that fails halts the rollout, which then reverts the agents that
//! moved (when the new version's signers allowed it: its rollback floor is at most
//! `from`) or pins everyone where they are.
//!
//! Everything here is a pure function of the rollout and the records read, so that two
//! controllers, or one restarted mid-wave, decide the same; the state changes only by
//! compare-and-swap on the rollout's key (see `collector rollout`).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::assignment::{ModuleAssignment, PPM_ALL, Placement};
use crate::status::{AgentStatus, ModuleHealth};

/// The rollouts, one key per module.
pub const ROLLOUTS_BUCKET: &str = "collector_rollouts";
/// Event kind: a rollout started.
pub const KIND_STARTED: &str = "collector_rollout_started";
/// Event kind: a rollout moved to its next wave.
pub const KIND_WAVE: &str = "collector_rollout_wave_advanced";
/// Event kind: a gate failed and the rollout halted (`payload.reverted` says whether its
/// agents were sent back).
pub const KIND_HALTED: &str = "collector_rollout_halted";
/// Event kind: every wave passed; the new version is assigned to the whole scope.
pub const KIND_COMPLETED: &str = "collector_rollout_completed";
/// Event kind: an operator paused or resumed a rollout (an abort is a halt, with the gate
/// `operator`).
pub const KIND_STEERED: &str = "collector_rollout_steered";
/// The `pc_id` of the events a controller sends (`obs.rollouts`): they are about the
/// fleet, not one PC.
pub const EVENTS_PC_ID: &str = "rollouts";
/// `ObsEvent.source` of rollout events.
pub const EVENTS_SOURCE: &str = "collector:rollouts";
/// Agents whose record is older than this are left out of a wave's judgment (as
/// `collector fleet status` calls them stale).
pub const STALE_AFTER: chrono::Duration = chrono::Duration::minutes(3);
/// Most agents a halt names.
pub const MAX_NAMED: usize = 20;
/// The CPU gate leaves alone a version whose code spends less than this many more
/// microseconds per tick than the previous one, whatever the ratio: on a module that
/// takes tens of microseconds, a cache miss or a preemption is a large ratio.
pub const MIN_CPU_DIFF_US: f64 = 250.0;
/// How long after a rollout's start an agent's record must show it before the agent
/// counts as held back from it.
const HELD_BACK_GRACE: chrono::Duration = chrono::Duration::seconds(2);

/// One wave of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Wave {
    /// The members of a group (within the rollout's scope).
    Group(String),
    /// A share of the scope's agents, in parts per million.
    Share(u32),
}

impl Wave {
    /// Parses `canary` (a group) or `1%`, `0.5%`, `100%` (a share).
    ///
    /// # Errors
    ///
    /// When a share is not a number in (0, 100], or a group is not a valid name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(number) = text.strip_suffix('%') {
            let pct: f64 = number
                .trim()
                .parse()
                .map_err(|_| format!("`{text}`: expected a share such as 10% or 0.5%"))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(format!(
                    "`{text}`: a share must be above 0% and at most 100%"
                ));
            }
            let ppm = (pct * 10_000.0).round() as u32;
            return Ok(Self::Share(ppm.clamp(1, PPM_ALL)));
        }
        crate::names::group(text).map_err(|e| format!("`{text}`: {e}"))?;
        Ok(Self::Group(text.to_string()))
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Group(g) => f.write_str(g),
            Self::Share(ppm) => write!(f, "{}%", f64::from(*ppm) / 10_000.0),
        }
    }
}

impl TryFrom<String> for Wave {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Wave> for String {
    fn from(w: Wave) -> Self {
        w.to_string()
    }
}

/// Parses a plan: waves separated by commas, each wider than the ones before.
///
/// # Errors
///
/// When a wave does not parse, the plan is empty, or a share is not larger than the
/// share before it.
pub fn parse_plan(text: &str) -> Result<Vec<Wave>, String> {
    let mut waves = Vec::new();
    let mut last_share = 0;
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let wave = Wave::parse(part)?;
        match &wave {
            Wave::Share(ppm) if *ppm <= last_share => {
                return Err(format!(
                    "`{}` after {}: each share must be larger than the one before",
                    part.trim(),
                    Wave::Share(last_share)
                ));
            }
            Wave::Share(ppm) => last_share = *ppm,
            Wave::Group(g) if waves.contains(&wave) => {
                return Err(format!("group `{g}` is in the plan twice"));
            }
            Wave::Group(_) => {}
        }
        waves.push(wave);
    }
    if waves.is_empty() {
        return Err("no wave: give waves such as canary,1%,10%,50%,100%".into());
    }
    Ok(waves)
}

/// What a wave must show before the rollout goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Most agents of a wave that may fail, in percent of the wave's agents: 0 halts on
    /// the first failure.
    pub max_failure_pct: f64,
    /// Agents of a wave that must report the new version judged (healthy or failed)
    /// before the wave may pass, in percent of the wave's agents.
    pub min_reporting_pct: f64,
    /// Ticks an agent must run the new version after its probation before it counts as
    /// healthy: the data-plane and CPU gates compare per-tick figures over them.
    pub min_ticks: u64,
    /// Data-plane gate: an agent whose previous version published fails when the new one
    /// publishes fewer than this fraction of its messages per tick.
    pub min_publish_ratio: f64,
    /// CPU gate: an agent fails when the new version's CPU per tick (its own code)
    /// exceeds the previous version's by more than this factor; 0 turns it off.
    pub max_cpu_ratio: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_failure_pct: 0.0,
            min_reporting_pct: 90.0,
            min_ticks: 5,
            min_publish_ratio: 0.5,
            max_cpu_ratio: 3.0,
        }
    }
}

/// What a halt does to the agents that moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnHalt {
    /// Send them back to `from`, when the new version's rollback floor allows it (else
    /// pin).
    Revert,
    /// Keep everyone where they are.
    Pin,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waves advance as their gates pass.
    Running,
    /// Waves do not advance; the gates still halt.
    Paused,
    /// A gate failed (or an operator aborted); [`Rollout::halt`] says why.
    Halted,
    /// Every wave passed: `to` is the scope's version.
    Completed,
}

impl Phase {
    /// Whether a controller still acts on it.
    pub fn active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// Why a rollout stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    /// The gate that failed: `failures`, `data-plane`, `cpu`, `assignment` or
    /// `operator`.
    pub gate: String,
    /// What it saw, for a person.
    pub reason: String,
    /// The agents that tripped it (at most [`MAX_NAMED`]), with what each showed.
    pub agents: Vec<String>,
    /// When.
    pub at: DateTime<Utc>,
    /// Whether the agents that moved were sent back to `from`.
    pub reverted: bool,
}

/// How a wave's agents stand, as last judged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Fresh agents in the rollout's scope.
    pub target: u64,
    /// Of them, those the waves so far place on the new version.
    pub placed: u64,
    /// Agents the waves place that do not follow the rollout: a narrower scope assigns
    /// them the module, or they predate staged rollouts. Not waited for.
    #[serde(default)]
    pub held_back: u64,
    /// Of those, how many run it now.
    pub on_new: u64,
    /// Judged healthy on it.
    pub healthy: u64,
    /// Judged failed.
    pub failed: u64,
}

/// A wave that was entered, kept for the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveRecord {
    /// The wave, as planned.
    pub wave: Wave,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it passed (or the rollout halted in it).
    #[serde(default)]
    pub ended_at: Option<DateTime<Utc>>,
    /// Agents placed on the new version when it ended.
    #[serde(default)]
    pub placed: u64,
}

/// A staged rollout: the value of `collector_rollouts` `<module>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Unique id; with each PC id, it places the agents.
    pub id: String,
    /// The module rolled out.
    pub module: String,
    /// The version the scope ran before.
    pub from: u64,
    /// The version rolled out.
    pub to: u64,
    /// The scope's key in `collector_config`: `global` or `groups.<g>`.
    pub scope: String,
    /// The plan.
    pub waves: Vec<Wave>,
    /// How long each wave runs, its gates passing, before the next starts, in ms.
    pub bake_ms: u64,
    /// The gates.
    pub gates: Gates,
    /// What a halt does.
    pub on_halt: OnHalt,
    /// Whether `to`'s signers allow a return to `from` (its rollback floor is at most
    /// `from`); without it a halt pins.
    pub revert_allowed: bool,
    /// Where it is.
    pub phase: Phase,
    /// Index of the current wave in `waves`.
    pub wave: usize,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When the current wave started.
    pub wave_started_at: DateTime<Utc>,
    /// When a controller or an operator last changed it.
    pub updated_at: DateTime<Utc>,
    /// Who started it (user and host).
    #[serde(default)]
    pub started_by: String,
    /// Why it stopped, once halted.
    #[serde(default)]
    pub halt: Option<Halt>,
    /// The last judgment's counts.
    #[serde(default)]
    pub counts: Counts,
    /// Agents waiting on the new version and why, a few of them, as last judged.
    #[serde(default)]
    pub waiting: Vec<String>,
    /// The waves entered so far.
    #[serde(default)]
    pub history: Vec<WaveRecord>,
}

impl Rollout {
    /// Parses a value of the bucket.
    ///
    /// # Errors
    ///
    /// When it is not a rollout; the message names the field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let r: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            format!("field `{path}`: {}", e.into_inner())
        })?;
        crate::names::module(&r.module).map_err(|e| format!("field `module`: {e}"))?;
        if r.waves.is_empty() || r.wave >= r.waves.len() {
            return Err(format!(
                "field `wave`: {} is not a wave of the plan ({} waves)",
                r.wave,
                r.waves.len()
            ));
        }
        Ok(r)
    }

    /// Compact JSON, as stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rollouts serialize")
    }

    /// The placement of waves `0..=wave`: their groups, and the largest share.
    pub fn placement(&self) -> Placement {
        let upto = &self.waves[..=self.wave.min(self.waves.len() - 1)];
        Placement {
            id: self.id.clone(),
            to: self.to,
            groups: upto
                .iter()
                .filter_map(|w| match w {
                    Wave::Group(g) => Some(g.clone()),
                    Wave::Share(_) => None,
                })
                .collect(),
            ppm: upto
                .iter()
                .filter_map(|w| match w {
                    Wave::Share(p) => Some(*p),
                    Wave::Group(_) => None,
                })
                .max()
                .unwrap_or(0),
        }
    }

    /// What the scope's assignment of the module must say in this state.
    pub fn entry(&self) -> ModuleAssignment {
        let at = |version: u64, rollout: Option<Placement>| ModuleAssignment {
            version: Some(version),
            enabled: None,
            rollout,
        };
        match (self.phase, &self.halt) {
            (Phase::Completed, _) => at(self.to, None),
            (Phase::Halted, Some(h)) if h.reverted => at(self.from, None),
            _ => at(self.from, Some(self.placement())),
        }
    }

    /// Whether the scope's entry `current` carries this rollout's placement: the only
    /// entry a controller rewrites. An entry without it was set by hand (or by another
    /// rollout) since, or is the end state a controller already wrote.
    pub fn owns(&self, current: Option<&ModuleAssignment>) -> bool {
        current
            .and_then(|c| c.rollout.as_ref())
            .is_some_and(|p| p.id == self.id)
    }

    /// Whether `pc_id`, member of `groups`, is in the rollout's scope.
    pub fn targets(&self, groups: &[String]) -> bool {
        match self.scope.strip_prefix("groups.") {
            Some(g) => groups.iter().any(|m| m == g),
            None => true,
        }
    }

    /// The bake time.
    pub fn bake(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.bake_ms)
    }
}

/// How one agent stands on a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not judged yet, with why (downloading, on probation, too few ticks...).
    Waiting(String),
    /// Runs the new version and passes every gate.
    Healthy,
    /// Failed the named gate.
    Failed {
        /// `failures`, `data-plane` or `cpu`.
        gate: &'static str,
        /// What it showed.
        why: String,
    },
}

/// Judges one agent placed on the new version from its status record.
pub fn judge_agent(r: &Rollout, status: &AgentStatus) -> Verdict {
    let fail = |gate, why: String| Verdict::Failed { gate, why };
    if let Some(rb) = status
        .rolled_back
        .iter()
        .find(|rb| rb.name == r.module && rb.version == r.to)
    {
        return fail("failures", format!("rolled back v{}: {}", r.to, rb.reason));
    }
    if let Some(p) = status
        .pending
        .iter()
        .find(|p| p.name == r.module && p.version == r.to && p.why.starts_with("refused"))
    {
        return fail("failures", p.why.clone());
    }
    let Some(m) = status.modules.iter().find(|m| m.name == r.module) else {
        let why = status
            .pending
            .iter()
            .find(|p| p.name == r.module)
            .map_or_else(|| "does not run it".to_string(), |p| p.why.clone());
        return Verdict::Waiting(why);
    };
    if m.version != r.to {
        return Verdict::Waiting(format!("runs v{}", m.version));
    }
    let Some(h) = m.health.filter(|h| h.version == r.to) else {
        return Verdict::Waiting("reports no health figures (an older agent?)".into());
    };
    if h.traps > 0 {
        return fail(
            "failures",
            format!("{} trap(s) in {} ticks on v{}", h.traps, h.ticks, r.to),
        );
    }
    if m.probation {
        return Verdict::Waiting("on probation".into());
    }
    if h.ticks < r.gates.min_ticks {
        return Verdict::Waiting(format!("{} of {} ticks", h.ticks, r.gates.min_ticks));
    }
    if let Some(p) = m.previous.filter(|p| p.ticks > 0) {
        if let Some(why) = data_plane(&r.gates, &h, &p) {
            return fail("data-plane", why);
        }
        if let Some(why) = cpu(&r.gates, &h, &p) {
            return fail("cpu", why);
        }
    }
    Verdict::Healthy
}

fn data_plane(g: &Gates, now: &ModuleHealth, before: &ModuleHealth) -> Option<String> {
    let (n, b) = (now.published_per_tick(), before.published_per_tick());
    (b > 0.0 && n < b * g.min_publish_ratio).then(|| {
        format!(
            "publishes {n:.2} messages per tick; v{} published {b:.2}",
            before.version
        )
    })
}

fn cpu(g: &Gates, now: &ModuleHealth, before: &ModuleHealth) -> Option<String> {
    let (n, b) = (now.cpu_us_per_tick(), before.cpu_us_per_tick());
    (g.max_cpu_ratio > 0.0 && b > 0.0 && n > b * g.max_cpu_ratio && n - b > MIN_CPU_DIFF_US).then(
        || {
            format!(
                "{n:.0} µs of CPU per tick, {:.1}x v{}'s {b:.0} µs",
                n / b,
                before.version
            )
        },
    )
}

/// What a controller should do with a rollout now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing yet, with why.
    Wait(String),
    /// Start the next wave.
    Advance,
    /// The last wave passed.
    Complete,
    /// A gate failed.
    Halt {
        /// The gate.
        gate: String,
        /// What it saw.
        reason: String,
        /// The agents that tripped it, with what each showed.
        agents: Vec<String>,
    },
}

/// A rollout judged against the fleet's records.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    /// The counts for the record.
    pub counts: Counts,
    /// A few agents still waiting, with why.
    pub waiting: Vec<String>,
    /// What to do.
    pub decision: Decision,
}

/// Judges the current wave of `r` at `now` from every agent's status record and group
/// membership (PC id → groups).
pub fn judge(
    r: &Rollout,
    statuses: &BTreeMap<String, AgentStatus>,
    groups: &BTreeMap<String, Vec<String>>,
    now: DateTime<Utc>,
) -> Judgment {
    let none = Vec::new();
    let placement = r.placement();
    let previous = (r.wave > 0).then(|| {
        let mut before = r.clone();
        before.wave -= 1;
        before.placement()
    });
    let mut counts = Counts::default();
    let mut failed: Vec<(String, &'static str, String)> = Vec::new();
    let mut waiting = Vec::new();
    let mut new_in_wave = 0u64;
    for (pc, status) in statuses {
        if now - status.last_seen > STALE_AFTER {
            continue;
        }
        let member_of = groups.get(pc).unwrap_or(&none);
        if !r.targets(member_of) {
            continue;
        }
        counts.target += 1;
        if !placement.places(pc, member_of) {
            continue;
        }
        // A record written since the rollout began that does not list it: the agent
        // does not follow it, and will not move.
        if status.rollouts.get(&r.module) != Some(&r.id)
            && status.last_seen > r.started_at + HELD_BACK_GRACE
        {
            counts.held_back += 1;
            if waiting.len() < MAX_NAMED {
                waiting.push(format!(
                    "{pc}: held back (a narrower scope assigns {}, or the agent predates staged rollouts)",
                    r.module
                ));
            }
            continue;
        }
        counts.placed += 1;
        if previous.as_ref().is_none_or(|p| !p.places(pc, member_of)) {
            new_in_wave += 1;
        }
        if status
            .modules
            .iter()
            .any(|m| m.name == r.module && m.version == r.to)
        {
            counts.on_new += 1;
        }
        match judge_agent(r, status) {
            Verdict::Healthy => counts.healthy += 1,
            Verdict::Failed { gate, why } => failed.push((pc.clone(), gate, why)),
            Verdict::Waiting(why) => {
                if waiting.len() < MAX_NAMED {
                    waiting.push(format!("{pc}: {why}"));
                }
            }
        }
    }
    counts.failed = failed.len() as u64;
    let decision = decide(r, &counts, &failed, new_in_wave, now);
    Judgment {
        counts,
        waiting,
        decision,
    }
}

fn decide(
    r: &Rollout,
    counts: &Counts,
    failed: &[(String, &'static str, String)],
    new_in_wave: u64,
    now: DateTime<Utc>,
) -> Decision {
    let pct = |n: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            n as f64 * 100.0 / of as f64
        }
    };
    let judged = counts.healthy + counts.failed;
    let min_judged = ((counts.placed as f64 * r.gates.min_reporting_pct / 100.0).ceil() as u64)
        .min(counts.placed);
    if !failed.is_empty() {
        let over_wave = pct(counts.failed, counts.placed) > r.gates.max_failure_pct;
        let over_judged =
            judged >= min_judged && pct(counts.failed, judged) > r.gates.max_failure_pct;
        if over_wave || over_judged {
            let gate = failed[0].1;
            let of_gate: Vec<_> = failed.iter().filter(|f| f.1 == gate).collect();
            let reason = format!(
                "{} of {} agents of wave {} ({}) failed (at most {}% may): {}",
                counts.failed,
                counts.placed,
                r.wave + 1,
                r.waves[r.wave],
                r.gates.max_failure_pct,
                of_gate[0].2
            );
            return Decision::Halt {
                gate: gate.to_string(),
                reason,
                agents: failed
                    .iter()
                    .take(MAX_NAMED)
                    .map(|(pc, g, why)| format!("{pc}: {g}: {why}"))
                    .collect(),
            };
        }
    }
    if r.phase != Phase::Running {
        return Decision::Wait("paused".into());
    }
    let last = r.wave + 1 == r.waves.len();
    // A wave that places nobody new (1% of a small scope) has nothing to bake.
    if new_in_wave == 0 && !last && counts.failed == 0 && judged >= min_judged {
        return Decision::Advance;
    }
    let baked = now - r.wave_started_at
        >= chrono::Duration::from_std(r.bake()).unwrap_or(chrono::Duration::MAX);
    if judged < min_judged {
        return Decision::Wait(format!(
            "{judged} of {} agents judged; {min_judged} needed",
            counts.placed
        ));
    }
    if !baked {
        let left = r.bake().saturating_sub(
            (now - r.wave_started_at)
                .to_std()
                .unwrap_or(std::time::Duration::ZERO),
        );
        return Decision::Wait(format!(
            "baking, {} left",
            humantime_secs(left.as_secs_f64())
        ));
    }
    if last {
        Decision::Complete
    } else {
        Decision::Advance
    }
}

fn humantime_secs(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// A new rollout's id: the module, the version and the start time, so that ids never
/// repeat and place agents afresh.
pub fn new_id(module: &str, to: u64, at: DateTime<Utc>) -> String {
    format!("{module}-v{to}-{}", at.format("%Y%m%dT%H%M%S%.3fZ"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ModuleStatus, Pending, RolledBack};

    fn rollout(waves: &str) -> Rollout {
        let now = Utc::now() - chrono::Duration::seconds(60);
        Rollout {
            id: "r1".into(),
            module: "m".into(),
            from: 1,
            to: 2,
            scope: "global".into(),
            waves: parse_plan(waves).unwrap(),
            bake_ms: 10_000,
            gates: Gates::default(),
            on_halt: OnHalt::Revert,
            revert_allowed: true,
            phase: Phase::Running,
            wave: 0,
            started_at: now,
            wave_started_at: now,
            updated_at: now,
            started_by: String::new(),
            halt: None,
            counts: Counts::default(),
            waiting: vec![],
            history: vec![],
        }
    }

    fn health(version: u64, ticks: u64, published: u64, cpu_us: u64) -> ModuleHealth {
        ModuleHealth {
            version,
            window_ms: ticks * 1000,
            ticks,
            published,
            cpu_us,
            ..Default::default()
        }
    }

    fn agent(pc: &str, version: u64, h: ModuleHealth, prev: Option<ModuleHealth>) -> AgentStatus {
        AgentStatus {
            pc_id: pc.into(),
            last_seen: Utc::now(),
            modules: vec![ModuleStatus {
                name: "m".into(),
                version,
                sha256: String::new(),
                since: Utc::now(),
                probation: false,
                traps: h.traps,
                health: Some(h),
                previous: prev,
            }],
            rollouts: [("m".to_string(), "r1".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn plans_parse_and_refuse_what_cannot_be_a_plan() {
        let w = parse_plan("canary, 1%,10%,0.5%").unwrap_err();
        assert!(w.contains("larger than"), "{w}");
        let w = parse_plan("canary,1%,50%,100%").unwrap();
        assert_eq!(w[0], Wave::Group("canary".into()));
        assert_eq!(w[1], Wave::Share(10_000));
        assert_eq!(w[3], Wave::Share(PPM_ALL));
        assert!(parse_plan("150%").unwrap_err().contains("at most 100%"));
        assert!(parse_plan("").unwrap_err().contains("no wave"));
        assert!(parse_plan("a/b").is_err());
        assert!(parse_plan("x,x").unwrap_err().contains("twice"));
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, r#"["canary","1%","50%","100%"]"#);
    }

    #[test]
    fn placement_grows_with_the_waves_and_the_entry_follows_the_phase() {
        let mut r = rollout("canary,1%,10%,100%");
        assert_eq!(r.placement().groups, ["canary"]);
        assert_eq!(r.placement().ppm, 0);
        r.wave = 2;
        assert_eq!(r.placement().ppm, 100_000);
        assert_eq!(r.entry().version, Some(1));
        r.phase = Phase::Completed;
        assert_eq!(r.entry().version, Some(2));
        assert!(r.entry().rollout.is_none());
        r.phase = Phase::Halted;
        r.halt = Some(Halt {
            gate: "cpu".into(),
            reason: String::new(),
            agents: vec![],
            at: Utc::now(),
            reverted: true,
        });
        assert_eq!(
            r.entry(),
            ModuleAssignment {
                version: Some(1),
                ..Default::default()
            }
        );
        // Only an entry with this rollout's placement is the rollout's: an end state, or
        // a version set by hand (even the rollout's own), is not rewritten.
        assert!(!r.owns(Some(&r.entry())));
        r.halt.as_mut().unwrap().reverted = false;
        assert!(r.owns(Some(&r.entry())));
        assert!(!r.owns(Some(&ModuleAssignment {
            version: Some(1),
            ..Default::default()
        })));
        let mut other = r.entry();
        other.rollout.as_mut().unwrap().id = "another".into();
        assert!(!r.owns(Some(&other)));
    }

    #[test]
    fn each_gate_fails_the_agent_that_breaks_it() {
        let r = rollout("100%");
        let v1 = health(1, 100, 100, 10_000);
        assert_eq!(
            judge_agent(&r, &agent("a", 2, health(2, 10, 10, 1_100), Some(v1))),
            Verdict::Healthy
        );
        let silent = judge_agent(&r, &agent("a", 2, health(2, 10, 0, 1_000), Some(v1)));
        assert!(
            matches!(
                silent,
                Verdict::Failed {
                    gate: "data-plane",
                    ..
                }
            ),
            "{silent:?}"
        );
        let hot = judge_agent(&r, &agent("a", 2, health(2, 10, 10, 10_000), Some(v1)));
        assert!(
            matches!(hot, Verdict::Failed { gate: "cpu", .. }),
            "{hot:?}"
        );
        let mut trapping = health(2, 10, 10, 1_000);
        trapping.traps = 1;
        let t = judge_agent(&r, &agent("a", 2, trapping, Some(v1)));
        assert!(
            matches!(
                t,
                Verdict::Failed {
                    gate: "failures",
                    ..
                }
            ),
            "{t:?}"
        );
        // Too young to judge; on the old version; no previous version to compare.
        assert!(matches!(
            judge_agent(&r, &agent("a", 2, health(2, 2, 0, 0), Some(v1))),
            Verdict::Waiting(_)
        ));
        assert_eq!(
            judge_agent(&r, &agent("a", 1, v1, None)),
            Verdict::Waiting("runs v1".into())
        );
        assert_eq!(
            judge_agent(&r, &agent("a", 2, health(2, 10, 0, 1), None)),
            Verdict::Healthy
        );
        // Rolled back or refused on this agent.
        let mut s = agent("a", 1, v1, None);
        s.rolled_back.push(RolledBack {
            name: "m".into(),
            version: 2,
            reason: "trap".into(),
            at: Utc::now(),
        });
        assert!(matches!(
            judge_agent(&r, &s),
            Verdict::Failed {
                gate: "failures",
                ..
            }
        ));
        let mut s = agent("a", 1, v1, None);
        s.pending.push(Pending {
            name: "m".into(),
            version: 2,
            why: "refused: bad signature".into(),
        });
        assert!(matches!(
            judge_agent(&r, &s),
            Verdict::Failed {
                gate: "failures",
                ..
            }
        ));
    }

    #[test]
    fn a_wave_advances_after_its_bake_and_halts_on_a_failure() {
        let mut r = rollout("50%,100%");
        let v1 = health(1, 100, 100, 10_000);
        let pcs: Vec<String> = (0..40).map(|i| format!("pc-{i}")).collect();
        let placement = r.placement();
        let statuses: BTreeMap<String, AgentStatus> = pcs
            .iter()
            .map(|pc| {
                let s = if placement.places(pc, &[]) {
                    agent(pc, 2, health(2, 10, 10, 1_000), Some(v1))
                } else {
                    agent(pc, 1, v1, None)
                };
                (pc.clone(), s)
            })
            .collect();
        let groups = BTreeMap::new();
        let j = judge(&r, &statuses, &groups, Utc::now());
        assert_eq!(j.decision, Decision::Advance, "{j:?}");
        assert_eq!(j.counts.target, 40);
        assert!(
            j.counts.placed > 5 && j.counts.placed < 35,
            "{:?}",
            j.counts
        );
        assert_eq!(j.counts.healthy, j.counts.placed);
        // Not baked yet.
        r.wave_started_at = Utc::now();
        let j = judge(&r, &statuses, &groups, Utc::now());
        assert!(
            matches!(j.decision, Decision::Wait(ref w) if w.contains("baking")),
            "{j:?}"
        );
        // One silent agent halts it, named.
        let mut bad = statuses.clone();
        let (pc, s) = bad
            .iter_mut()
            .find(|(_, s)| s.modules[0].version == 2)
            .unwrap();
        s.modules[0].health = Some(health(2, 10, 0, 1_000));
        let pc = pc.clone();
        let j = judge(&r, &bad, &groups, Utc::now());
        let Decision::Halt {
            gate,
            agents,
            reason,
        } = j.decision
        else {
            panic!("{j:?}")
        };
        assert_eq!(gate, "data-plane");
        assert!(agents[0].starts_with(&pc), "{agents:?}");
        assert!(reason.contains("wave 1 (50%)"), "{reason}");
        // A paused rollout still halts, but does not advance.
        r.phase = Phase::Paused;
        r.wave_started_at = Utc::now() - chrono::Duration::seconds(60);
        assert!(matches!(
            judge(&r, &bad, &groups, Utc::now()).decision,
            Decision::Halt { .. }
        ));
        assert_eq!(
            judge(&r, &statuses, &groups, Utc::now()).decision,
            Decision::Wait("paused".into())
        );
        // Stale agents are left out; the last wave completes.
        r.phase = Phase::Running;
        r.wave = 1;
        let mut all_new = statuses.clone();
        for s in all_new.values_mut() {
            *s = agent(&s.pc_id, 2, health(2, 10, 10, 1_000), Some(v1));
        }
        all_new.get_mut("pc-0").unwrap().last_seen = Utc::now() - chrono::Duration::minutes(5);
        let j = judge(&r, &all_new, &groups, Utc::now());
        assert_eq!(j.decision, Decision::Complete);
        assert_eq!(j.counts.target, 39);
        // An agent whose fresh record does not follow the rollout (a narrower scope pins
        // it) is held back, not waited for; one that has not written since the start is.
        let mut pinned = statuses.clone();
        let (pc, s) = pinned
            .iter_mut()
            .find(|(_, s)| s.modules[0].version == 2)
            .unwrap();
        let pc = pc.clone();
        s.rollouts.clear();
        r.wave = 0;
        let held = judge(&r, &pinned, &groups, Utc::now());
        let placed_before = judge(&r, &statuses, &groups, Utc::now()).counts.placed;
        assert!(placement.places(&pc, &[]));
        assert_eq!(held.counts.held_back, 1);
        assert_eq!(held.counts.placed, placed_before - 1);
        pinned.get_mut(&pc).unwrap().last_seen = r.started_at;
        assert_eq!(judge(&r, &pinned, &groups, Utc::now()).counts.held_back, 0);
    }

    #[test]
    fn a_group_scope_targets_its_members_and_an_empty_wave_is_skipped() {
        let mut r = rollout("1%,100%");
        r.scope = "groups.lab".into();
        let v1 = health(1, 100, 100, 10_000);
        let statuses: BTreeMap<String, AgentStatus> = (0..10)
            .map(|i| (format!("pc-{i}"), agent(&format!("pc-{i}"), 1, v1, None)))
            .collect();
        let groups: BTreeMap<String, Vec<String>> =
            [("pc-1".to_string(), vec!["lab".to_string()])].into();
        let j = judge(&r, &statuses, &groups, Utc::now());
        assert_eq!(j.counts.target, 1);
        // 1% of one agent places nobody (unless its hash is that low): nothing to bake.
        if j.counts.placed == 0 {
            assert_eq!(j.decision, Decision::Advance);
        }
    }
}
