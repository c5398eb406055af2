//! Scenario files: human-written TOML scripts run against a guest on the mock host by
//! `collector test`. The format is documented in `docs/writing-a-guest.md`; in short:
//!
//! ```toml
//! name = "s06-top-n-zero-means-one"     # optional, defaults to the file name
//! pc_id = "pc-1"                        # optional, default "test-pc"
//! start = "2026-01-01T00:00:00Z"        # optional virtual wall-clock start
//!
//! [[step]]
//! config = { process_perf_enabled = true, process_perf_top_n = 0 }
//! [[step]]
//! processes = [{ pid = 1, name = "a", cpu = 5.0 }, { pid = 2, name = "b", cpu = 9.5 }]
//! [[step]]
//! tick = true
//! [[step]]
//! expect_publish = { subject = "process_perf.pc-1", json = { processes = [{ pid = 2 }] } }
//! ```
//!
//! Each step holds exactly one action. A failing step stops its scenario.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_shared::ConfigScope;
use serde::Deserialize;
use toml::Spanned;

use super::json_match::{self, MatchOptions};
use super::{Handoff, MockHost, MockOptions, MockProcess, Published, default_start};
use collector_sandbox::guest::{GuestModule, NotCarried};
use collector_sandbox::host::{HostStats, Level};
use collector_shared::scope::Scope;

/// Every action a step may hold, in the order they are documented.
pub const ACTIONS: &[&str] = &[
    "config",
    "unset",
    "layer",
    "groups",
    "processes",
    "fail_sample",
    "advance",
    "set_wall",
    "tick",
    "run",
    "swap",
    "fail_publish",
    "expect_publish",
    "expect_no_publish",
    "expect_interval",
    "expect_samples",
    "expect_name_lookups",
    "expect_ticks",
    "expect_log",
    "expect_handoff",
];

/// The values `expect_handoff` takes, in the order they are documented.
pub const HANDOFFS: &[&str] = &["carried", "none", "refused", "over-limit", "trapped"];

/// Modules that `swap` steps may name, besides the guest under test
/// (`collector test --module NAME=PATH`).
pub type Modules = BTreeMap<String, Arc<GuestModule>>;

/// A scenario file that could not be read or understood.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ScenarioError {
    /// The scenario file, as given.
    pub file: String,
    /// What is wrong, starting with the step and line when they are known.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    name: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
    pc_id: Option<String>,
    start: Option<Spanned<String>>,
    grants: Option<Vec<String>>,
    #[serde(default)]
    step: Vec<Spanned<StepSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    /// Shown in failure reports.
    label: Option<String>,
    config: Option<toml::Table>,
    unset: Option<Vec<String>>,
    layer: Option<LayerSpec>,
    groups: Option<Vec<String>>,
    processes: Option<Vec<ProcessSpec>>,
    fail_sample: Option<toml::Value>,
    advance: Option<String>,
    set_wall: Option<String>,
    tick: Option<bool>,
    run: Option<String>,
    swap: Option<SwapSpec>,
    fail_publish: Option<bool>,
    expect_publish: Option<ExpectPublishSpec>,
    expect_no_publish: Option<bool>,
    expect_interval: Option<String>,
    expect_samples: Option<u64>,
    expect_name_lookups: Option<u64>,
    expect_ticks: Option<u64>,
    expect_log: Option<ExpectLogSpec>,
    expect_handoff: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerSpec {
    scope: String,
    value: Option<toml::Table>,
    delete: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapSpec {
    module: Option<String>,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessSpec {
    pid: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    cpu: Number,
    #[serde(default)]
    rss: u64,
    #[serde(default)]
    read: u64,
    #[serde(default)]
    written: u64,
    #[serde(default)]
    exits_after_sample: bool,
}

/// A TOML number written either as integer or float (`5`, `5.0`, `nan`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
    #[default]
    #[serde(skip)]
    Zero,
}

impl Number {
    fn as_f32(self) -> f32 {
        match self {
            Number::Int(i) => i as f32,
            Number::Float(f) => f as f32,
            Number::Zero => 0.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectPublishSpec {
    subject: Option<String>,
    json: Option<toml::Value>,
    #[serde(default)]
    ordered: bool,
    tolerance: Option<f64>,
    relative_tolerance: Option<f64>,
    #[serde(default)]
    exact_keys: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectLogSpec {
    level: Option<String>,
    contains: String,
}

/// One step, checked and ready to run.
#[derive(Debug, Clone)]
pub enum Action {
    /// `config`: overlays these fields on the PC's own layer and configures the guest,
    /// whether or not the effective configuration changed.
    Config(ConfigScope),
    /// `unset`: removes these fields from the PC's own layer; the guest is configured
    /// only if the effective configuration changed.
    Unset(Vec<String>),
    /// A put (`Some`) or delete (`None`) of the layer with this key.
    Layer(String, Option<ConfigScope>),
    /// `groups`: the PC's group memberships (sorted, without duplicates), replacing the
    /// previous ones; the guest is configured only if the effective configuration changed.
    Groups(Vec<String>),
    /// `processes`: replaces the scripted process table, which stays until replaced.
    Processes(Vec<MockProcess>),
    /// `Some(reason)` makes samples fail, `None` succeed again.
    FailSample(Option<String>),
    /// `advance`: moves both clocks forward by this much, without ticking.
    Advance(Duration),
    /// `set_wall`: sets the wall clock (forwards or backwards); monotonic time is
    /// untouched.
    SetWall(DateTime<Utc>),
    /// `tick = true`: one tick now, whatever the ticker's schedule.
    Tick,
    /// `run`: advances time by this span, ticking whenever the agent's ticker would.
    Run(Duration),
    /// `swap`: replaces the running module between two ticks, as the agent does.
    Swap {
        /// `None`: the guest under test again.
        module: Option<String>,
        /// Handed over instead of the predecessor's state.
        state: Option<Vec<u8>>,
    },
    /// `fail_publish`: makes the sink refuse (`true`) or accept again (`false`) every
    /// publish, as a broker outage.
    FailPublish(bool),
    /// `expect_publish`: takes the oldest publish no earlier `expect_publish` took, and
    /// checks it.
    ExpectPublish {
        /// The subject it must have, exactly; `None` accepts any.
        subject: Option<String>,
        /// The pattern its JSON payload must match (see [`json_match`]); `None` does not
        /// look at the payload.
        json: Option<serde_json::Value>,
        /// How loosely `json` is compared (`ordered`, `tolerance`, `relative_tolerance`,
        /// `exact_keys`).
        options: MatchOptions,
    },
    /// `expect_no_publish = true`: fails if a publish was not taken by an
    /// `expect_publish`; takes nothing.
    ExpectNoPublish,
    /// `expect_interval`: the interval the guest last asked for.
    ExpectInterval(Duration),
    /// `expect_samples`: `processes.sample` calls since the start, failed ones included.
    ExpectSamples(u64),
    /// `expect_name_lookups`: names returned by `processes.names` since the start
    /// (processes looked up, not calls).
    ExpectNameLookups(u64),
    /// `expect_ticks`: ticks run so far by `tick` and `run` steps.
    ExpectTicks(u64),
    /// `expect_log`: some line the guest logged since the previous `expect_log` (or the
    /// start) matches.
    ExpectLog {
        /// The level the line must have; `None` accepts any.
        level: Option<Level>,
        /// Text the line must contain.
        contains: String,
    },
    /// `expect_handoff`: what the last `swap` did with the state.
    ExpectHandoff {
        /// One of [`HANDOFFS`].
        result: &'static str,
        /// Text the reason (the guest's refusal, the trap, or the limit) must contain;
        /// `None` checks the result only.
        contains: Option<String>,
    },
}

impl Action {
    /// The action's key in the file.
    pub fn key(&self) -> &'static str {
        match self {
            Action::Config(_) => "config",
            Action::Unset(_) => "unset",
            Action::Layer(..) => "layer",
            Action::Groups(_) => "groups",
            Action::Processes(_) => "processes",
            Action::FailSample(_) => "fail_sample",
            Action::Advance(_) => "advance",
            Action::SetWall(_) => "set_wall",
            Action::Tick => "tick",
            Action::Run(_) => "run",
            Action::Swap { .. } => "swap",
            Action::FailPublish(_) => "fail_publish",
            Action::ExpectPublish { .. } => "expect_publish",
            Action::ExpectNoPublish => "expect_no_publish",
            Action::ExpectInterval(_) => "expect_interval",
            Action::ExpectSamples(_) => "expect_samples",
            Action::ExpectNameLookups(_) => "expect_name_lookups",
            Action::ExpectTicks(_) => "expect_ticks",
            Action::ExpectLog { .. } => "expect_log",
            Action::ExpectHandoff { .. } => "expect_handoff",
        }
    }
}

/// A step with where it was written.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based line of the `[[step]]` header.
    pub line: usize,
    /// The step's `label`, shown in failure reports.
    pub label: Option<String>,
    /// What the step does.
    pub action: Action,
}

/// A parsed scenario file.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The file's `name`, or else the file name without its extension.
    pub name: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// The mock host's options, from the file's `pc_id`, `start` and `grants`.
    pub options: MockOptions,
    /// The `[[step]]` tables, in order; never empty.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Reads and checks a scenario file.
    ///
    /// # Errors
    ///
    /// A [`ScenarioError`] naming the file, the line and what was expected.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses scenario text; `path` is used for the name and in errors.
    ///
    /// # Errors
    ///
    /// A [`ScenarioError`] naming the file, the step, the line, the field and what was
    /// expected.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ScenarioError> {
        let file = path.display().to_string();
        let fail = |line: usize, message: String| ScenarioError {
            file: file.clone(),
            message: format!("line {line}: {message}"),
        };
        let spec = decode(text).map_err(|message| ScenarioError {
            file: file.clone(),
            message,
        })?;
        let mut options = MockOptions::default();
        if let Some(pc_id) = spec.pc_id {
            options.pc_id = pc_id;
        }
        options.grants = spec.grants;
        options.start = match spec.start {
            Some(s) => parse_time(s.get_ref())
                .map_err(|m| fail(line_of(text, s.span().start), format!("`start`: {m}")))?,
            None => default_start(),
        };
        if spec.step.is_empty() {
            return Err(fail(1, "no steps: add at least one [[step]] table".into()));
        }
        let steps = spec
            .step
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                let line = line_of(text, s.span().start);
                let step = s.into_inner();
                let label = step.label.clone();
                let action = step_action(step, &options.pc_id).map_err(|m| ScenarioError {
                    file: file.clone(),
                    message: format!("step {} (line {line}): {m}", index + 1),
                })?;
                Ok(Step {
                    line,
                    label,
                    action,
                })
            })
            .collect::<Result<_, ScenarioError>>()?;
        let name = spec.name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| file.clone())
        });
        Ok(Self {
            name,
            file: path.to_path_buf(),
            options,
            steps,
        })
    }
}

/// Decodes the file's structure. Errors say where: the step (by number, as failure
/// reports count them) and the field path within it, the line, and what was expected.
fn decode(text: &str) -> Result<FileSpec, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| located(text, None, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().clone();
        located(text, Some(&path), e.inner())
    })
}

/// `step N (line L): `field`: message`, or `line L: `field`: message` outside the steps.
fn located(text: &str, path: Option<&serde_path_to_error::Path>, e: &toml::de::Error) -> String {
    use serde_path_to_error::Segment;
    let mut step = None;
    let mut field = String::new();
    for (i, segment) in path.into_iter().flat_map(|p| p.iter()).enumerate() {
        match segment {
            Segment::Seq { index } if i == 1 && field == "step" => {
                step = Some(index + 1);
                field.clear();
            }
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                // Spanned values show up as private keys; they are no field of the file.
                if !key.starts_with("$__") {
                    if !field.is_empty() {
                        field.push('.');
                    }
                    field.push_str(key);
                }
            }
            Segment::Unknown => {}
        }
    }
    let mut out = String::new();
    if let Some(n) = step {
        out.push_str(&format!("step {n} "));
    }
    match e.span() {
        Some(span) if step.is_some() => {
            out.push_str(&format!("(line {}): ", line_of(text, span.start)))
        }
        Some(span) => out.push_str(&format!("line {}: ", line_of(text, span.start))),
        None if step.is_some() => out = out.trim_end().to_string() + ": ",
        None => {}
    }
    if !field.is_empty() {
        out.push_str(&format!("`{field}`: "));
    }
    out.push_str(e.message().trim_end());
    if field == "step" && step.is_none() {
        out.push_str(" (write each step as a [[step]] table, with two brackets)");
    }
    out
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("expected an RFC 3339 time such as \"2026-01-01T00:00:00Z\", got {s:?} ({e})")
        })
}

fn parse_duration(key: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("`{key}`: expected a duration such as \"2s\" or \"1m 30s\", got {s:?} ({e})")
    })
}

/// A table of configuration fields, as a scope; `key` names it in errors.
fn config_scope(key: &str, table: &toml::Table) -> Result<ConfigScope, String> {
    let json = serde_json::to_string(table).map_err(|e| format!("`{key}`: {e}"))?;
    let (scope, unknown) = ConfigScope::from_json(&json).map_err(|e| {
        // The position is in JSON made from the table, which the author never saw.
        let message = e
            .message
            .rsplit_once(" at line ")
            .map_or(e.message.as_str(), |(m, _)| m);
        match &e.field {
            Some(field) => format!("`{key}.{field}`: {message}"),
            None => format!("`{key}`: {message}"),
        }
    })?;
    if let Some(field) = unknown.first() {
        return Err(format!(
            "`{key}`: unknown field `{field}`, expected one of {}",
            ConfigScope::FIELDS.join(", ")
        ));
    }
    Ok(scope)
}

/// A layer key of the fleet's grammar that reaches this PC.
fn layer_key(scope: &str, pc_id: &str) -> Result<String, String> {
    match Scope::parse(scope) {
        Some(Scope::Pc(other)) if other != pc_id => Err(format!(
            "`layer.scope`: {scope:?} is another PC's layer (this scenario's pc_id is {pc_id:?}); the fleet never delivers it"
        )),
        Some(parsed) => Ok(parsed.key()),
        None => Err(format!(
            "`layer.scope`: expected \"global\", \"groups.<name>\" or \"pcs.{pc_id}\", got {scope:?}"
        )),
    }
}

fn step_action(step: StepSpec, pc_id: &str) -> Result<Action, String> {
    let mut actions = Vec::new();
    if let Some(table) = step.config {
        actions.push(Action::Config(config_scope("config", &table)?));
    }
    if let Some(fields) = step.unset {
        if let Some(f) = fields
            .iter()
            .find(|f| !ConfigScope::FIELDS.contains(&f.as_str()))
        {
            return Err(format!(
                "`unset`: unknown field `{f}`, expected one of {}",
                ConfigScope::FIELDS.join(", ")
            ));
        }
        if fields.is_empty() {
            return Err("`unset`: expected at least one field name".into());
        }
        actions.push(Action::Unset(fields));
    }
    if let Some(layer) = step.layer {
        let key = layer_key(&layer.scope, pc_id)?;
        let value = match (layer.value, layer.delete) {
            (Some(table), None) => Some(config_scope("layer.value", &table)?),
            (None, Some(true)) => None,
            (None, Some(false)) => {
                return Err("`layer.delete`: must be `true` (or give `value` instead)".into());
            }
            (Some(_), Some(_)) => {
                return Err(
                    "`layer`: `value` puts the layer and `delete` removes it; give one of them"
                        .into(),
                );
            }
            (None, None) => {
                return Err(
                    "`layer`: expected `value = { ... }` (the layer's whole new value) or `delete = true`"
                        .into(),
                );
            }
        };
        actions.push(Action::Layer(key, value));
    }
    if let Some(mut groups) = step.groups {
        if groups.iter().any(String::is_empty) {
            return Err("`groups`: a group name cannot be empty".into());
        }
        // As kanade stores memberships: sorted, without duplicates.
        groups.sort();
        groups.dedup();
        actions.push(Action::Groups(groups));
    }
    if let Some(procs) = step.processes {
        actions.push(Action::Processes(
            procs
                .into_iter()
                .map(|p| {
                    let process = MockProcess::new(p.pid, &p.name)
                        .cpu(p.cpu.as_f32())
                        .rss(p.rss)
                        .disk(p.read, p.written);
                    if p.exits_after_sample {
                        process.exits_after_sample()
                    } else {
                        process
                    }
                })
                .collect(),
        ));
    }
    if let Some(value) = step.fail_sample {
        actions.push(Action::FailSample(match value {
            toml::Value::Boolean(true) => Some("simulated sampling failure".into()),
            toml::Value::Boolean(false) => None,
            toml::Value::String(reason) if !reason.is_empty() => Some(reason),
            other => {
                return Err(format!(
                    "`fail_sample`: expected `true`, `false` or a non-empty reason string, got {other}"
                ));
            }
        }));
    }
    if let Some(d) = step.advance {
        actions.push(Action::Advance(parse_duration("advance", &d)?));
    }
    if let Some(t) = step.set_wall {
        actions.push(Action::SetWall(
            parse_time(&t).map_err(|m| format!("`set_wall`: {m}"))?,
        ));
    }
    if let Some(tick) = step.tick {
        if !tick {
            return Err("`tick` must be `true` (omit the step to not tick)".into());
        }
        actions.push(Action::Tick);
    }
    if let Some(d) = step.run {
        actions.push(Action::Run(parse_duration("run", &d)?));
    }
    if let Some(swap) = step.swap {
        if let Some(name) = &swap.module
            && name.is_empty()
        {
            return Err(
                "`swap.module`: expected a module name given with `collector test --module NAME=PATH` (omit it for the guest under test)"
                    .into(),
            );
        }
        actions.push(Action::Swap {
            module: swap.module,
            state: swap.state.map(String::into_bytes),
        });
    }
    if let Some(f) = step.fail_publish {
        actions.push(Action::FailPublish(f));
    }
    if let Some(e) = step.expect_publish {
        let json = e
            .json
            .map(|t| serde_json::to_value(t).map_err(|e| format!("`expect_publish.json`: {e}")))
            .transpose()?;
        let mut options = MatchOptions {
            ordered: e.ordered,
            exact_keys: e.exact_keys,
            ..MatchOptions::default()
        };
        for (key, given, slot) in [
            ("tolerance", e.tolerance, &mut options.tolerance),
            (
                "relative_tolerance",
                e.relative_tolerance,
                &mut options.relative_tolerance,
            ),
        ] {
            if let Some(t) = given {
                if !(t >= 0.0 && t.is_finite()) {
                    return Err(format!(
                        "`expect_publish.{key}`: expected a finite number >= 0, got {t}"
                    ));
                }
                *slot = t;
            }
        }
        actions.push(Action::ExpectPublish {
            subject: e.subject,
            json,
            options,
        });
    }
    if let Some(flag) = step.expect_no_publish {
        if !flag {
            return Err("`expect_no_publish` must be `true`".into());
        }
        actions.push(Action::ExpectNoPublish);
    }
    if let Some(d) = step.expect_interval {
        actions.push(Action::ExpectInterval(parse_duration(
            "expect_interval",
            &d,
        )?));
    }
    if let Some(n) = step.expect_samples {
        actions.push(Action::ExpectSamples(n));
    }
    if let Some(n) = step.expect_name_lookups {
        actions.push(Action::ExpectNameLookups(n));
    }
    if let Some(n) = step.expect_ticks {
        actions.push(Action::ExpectTicks(n));
    }
    if let Some(e) = step.expect_log {
        let level = e
            .level
            .map(|l| match l.as_str() {
                "trace" => Ok(Level::Trace),
                "debug" => Ok(Level::Debug),
                "info" => Ok(Level::Info),
                "warn" => Ok(Level::Warn),
                "error" => Ok(Level::Error),
                other => Err(format!(
                    "`expect_log.level`: expected trace, debug, info, warn or error, got {other:?}"
                )),
            })
            .transpose()?;
        actions.push(Action::ExpectLog {
            level,
            contains: e.contains,
        });
    }
    if let Some(value) = step.expect_handoff {
        actions.push(expect_handoff(value)?);
    }
    match actions.len() {
        1 => Ok(actions.pop().expect("one action")),
        0 => Err(format!(
            "a step needs one action, one of: {}",
            ACTIONS.join(", ")
        )),
        _ => Err(format!(
            "a step holds exactly one action, this one has {}: split it into several [[step]] tables",
            actions
                .iter()
                .map(Action::key)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `expect_handoff = "carried"` or `expect_handoff = { result = "refused", contains = "..." }`.
fn expect_handoff(value: toml::Value) -> Result<Action, String> {
    let known = |result: &str, key: &str| {
        HANDOFFS
            .iter()
            .find(|h| **h == result)
            .copied()
            .ok_or_else(|| {
                format!(
                    "`{key}`: expected one of {}, got {result:?}",
                    quoted(HANDOFFS)
                )
            })
    };
    match value {
        toml::Value::String(result) => Ok(Action::ExpectHandoff {
            result: known(&result, "expect_handoff")?,
            contains: None,
        }),
        toml::Value::Table(mut table) => {
            let result = match table.remove("result") {
                Some(toml::Value::String(r)) => known(&r, "expect_handoff.result")?,
                Some(other) => {
                    return Err(format!(
                        "`expect_handoff.result`: expected a string, one of {}, got {other}",
                        quoted(HANDOFFS)
                    ));
                }
                None => {
                    return Err(format!(
                        "`expect_handoff.result`: missing, expected one of {}",
                        quoted(HANDOFFS)
                    ));
                }
            };
            let contains = match table.remove("contains") {
                Some(toml::Value::String(c)) => Some(c),
                Some(other) => {
                    return Err(format!(
                        "`expect_handoff.contains`: expected a string, got {other}"
                    ));
                }
                None => None,
            };
            if let Some(key) = table.keys().next() {
                return Err(format!(
                    "`expect_handoff`: unknown field `{key}`, expected `result` or `contains`"
                ));
            }
            Ok(Action::ExpectHandoff { result, contains })
        }
        other => Err(format!(
            "`expect_handoff`: expected one of {} or a table {{ result, contains }}, got {other}",
            quoted(HANDOFFS)
        )),
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a step failed.
#[derive(Debug, Clone)]
pub struct StepFailure {
    /// 0-based index of the step.
    pub index: usize,
    /// 1-based line of the step's `[[step]]` header.
    pub line: usize,
    /// The step's action key, such as `expect_publish`.
    pub action: &'static str,
    /// The step's `label`, if it has one.
    pub label: Option<String>,
    /// What was expected and what happened, possibly over several lines.
    pub message: String,
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} (line {}) {}",
            self.index + 1,
            self.line,
            self.action
        )?;
        if let Some(label) = &self.label {
            write!(f, " \"{label}\"")?;
        }
        write!(f, ":")?;
        for line in self.message.lines() {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// The scenario file.
    pub file: PathBuf,
    /// Number of steps in the scenario, whether or not they all ran.
    pub steps: usize,
    /// The step that failed (the steps after it did not run); `None` when all passed.
    pub failure: Option<StepFailure>,
}

impl ScenarioReport {
    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Runs `scenario` against a fresh instance of `module`.
///
/// # Errors
///
/// Only when the mock host cannot be set up (an invalid grant pattern); guest failures
/// are reported in the [`ScenarioReport`].
pub fn run(module: Arc<GuestModule>, scenario: &Scenario) -> anyhow::Result<ScenarioReport> {
    run_with_modules(module, &Modules::new(), scenario)
}

/// As [`run`], with `modules` for the scenario's `swap` steps to name.
///
/// # Errors
///
/// Only when the mock host cannot be set up (an invalid grant pattern); guest failures
/// are reported in the [`ScenarioReport`].
pub fn run_with_modules(
    module: Arc<GuestModule>,
    modules: &Modules,
    scenario: &Scenario,
) -> anyhow::Result<ScenarioReport> {
    let mut run = Run {
        host: MockHost::with_module(module.clone(), scenario.options.clone())?,
        guest: module,
        modules,
        pending: VecDeque::new(),
        total_ticks: 0,
        handoff: None,
    };
    let mut failure = None;
    for (index, step) in scenario.steps.iter().enumerate() {
        if let Err(message) = run.step(&step.action) {
            failure = Some(StepFailure {
                index,
                line: step.line,
                action: step.action.key(),
                label: step.label.clone(),
                message,
            });
            break;
        }
    }
    Ok(ScenarioReport {
        name: scenario.name.clone(),
        file: scenario.file.clone(),
        steps: scenario.steps.len(),
        failure,
    })
}

/// One scenario in progress.
struct Run<'a> {
    host: MockHost,
    /// The guest under test, for a `swap` that names no module.
    guest: Arc<GuestModule>,
    modules: &'a Modules,
    /// Publishes not yet taken by an `expect_publish`.
    pending: VecDeque<Published>,
    total_ticks: u64,
    /// What the last swap did with the state, for `expect_handoff`.
    handoff: Option<Handoff>,
}

impl Run<'_> {
    fn step(&mut self, action: &Action) -> Result<(), String> {
        let trapped = |e| format!("the guest trapped while being configured: {e}");
        let host = &mut self.host;
        let pending = &mut self.pending;
        let total_ticks = &mut self.total_ticks;
        match action {
            Action::Config(scope) => {
                host.configure(scope).map_err(trapped)?;
            }
            Action::Unset(fields) => {
                host.unset(fields).map_err(trapped)?;
            }
            Action::Layer(key, value) => {
                host.put_layer(key, value.clone()).map_err(trapped)?;
            }
            Action::Groups(groups) => {
                host.set_groups(groups.clone()).map_err(trapped)?;
            }
            Action::FailSample(reason) => host.set_sample_failing(reason.clone()),
            Action::Swap { module, state } => {
                let next = match module {
                    None => self.guest.clone(),
                    Some(name) => self.modules.get(name).cloned().ok_or_else(|| {
                        format!(
                            "no module named `{name}`: pass `--module {name}=PATH` to collector test (given: {})",
                            if self.modules.is_empty() {
                                "none".to_string()
                            } else {
                                self.modules.keys().cloned().collect::<Vec<_>>().join(", ")
                            }
                        )
                    })?,
                };
                // What the predecessor published before the swap stays in order.
                pending.extend(host.take_published());
                let handoff = match state {
                    None => host.swap(next),
                    Some(bytes) => host.swap_with_state(next, bytes.clone()),
                }
                .map_err(|e| format!("the new module failed to start: {e}"))?;
                self.handoff = Some(handoff);
            }
            Action::ExpectHandoff { result, contains } => {
                let Some(handoff) = &self.handoff else {
                    return Err("expected a handoff, but no `swap` step came before".into());
                };
                check_handoff(handoff, result, contains.as_deref())?;
            }
            Action::Processes(p) => host.set_processes(p.clone()),
            Action::Advance(d) => host.advance(*d),
            Action::SetWall(t) => host.set_wall(*t),
            Action::Tick => {
                *total_ticks += 1;
                host.tick().map_err(|e| format!("the tick failed: {e}"))?;
            }
            Action::Run(d) => {
                let (ticks, errors) = host.run_for(*d);
                *total_ticks += ticks;
                if let Some(e) = errors.first() {
                    return Err(format!("a tick failed: {e}"));
                }
            }
            Action::FailPublish(f) => host.set_publish_failing(*f),
            Action::ExpectPublish {
                subject,
                json,
                options,
            } => {
                pending.extend(host.take_published());
                let Some(msg) = pending.pop_front() else {
                    return Err("expected a publish, but the guest published nothing more".into());
                };
                check_publish(&msg, subject.as_deref(), json.as_ref(), *options)?;
            }
            Action::ExpectNoPublish => {
                pending.extend(host.take_published());
                if let Some(msg) = pending.front() {
                    return Err(format!(
                        "expected no publish, got {} on {}:\n{}",
                        pending.len(),
                        msg.subject,
                        pretty(&msg.payload)
                    ));
                }
            }
            Action::ExpectInterval(want) => match host.interval() {
                Some(got) if got == *want => {}
                got => {
                    return Err(format!(
                        "expected interval {}, the guest asks for {}",
                        humantime::format_duration(*want),
                        got.map_or("nothing".to_string(), |g| humantime::format_duration(g)
                            .to_string())
                    ));
                }
            },
            Action::ExpectSamples(n) => {
                expect_count("process samples", *n, HostStats::get(&host.stats().samples))?;
            }
            Action::ExpectNameLookups(n) => {
                expect_count(
                    "name look-ups",
                    *n,
                    HostStats::get(&host.stats().names_looked_up),
                )?;
            }
            Action::ExpectTicks(n) => expect_count("ticks", *n, *total_ticks)?,
            Action::ExpectLog { level, contains } => {
                let fresh = host.new_logs();
                let found = fresh.iter().any(|l| {
                    level.is_none_or(|lv| l.level == lv) && l.message.contains(contains.as_str())
                });
                if !found {
                    let seen: Vec<String> = fresh
                        .iter()
                        .map(|l| format!("[{:?}] {}", l.level, l.message))
                        .collect();
                    return Err(format!(
                        "expected a {}log line containing {contains:?} since the previous expect_log; lines:\n{}",
                        level.map_or(String::new(), |l| format!("{l:?} ")),
                        if seen.is_empty() {
                            "(none)".to_string()
                        } else {
                            seen.join("\n")
                        }
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Compares a swap's outcome with `expect_handoff`.
fn check_handoff(handoff: &Handoff, result: &str, contains: Option<&str>) -> Result<(), String> {
    let (got, text) = match handoff {
        Handoff::NoState => ("none", String::new()),
        Handoff::Carried { .. } => ("carried", String::new()),
        Handoff::NotCarried(NotCarried::Refused(why)) => ("refused", why.clone()),
        Handoff::NotCarried(NotCarried::OverLimit { .. }) => ("over-limit", handoff.to_string()),
        Handoff::NotCarried(NotCarried::Trapped(fault)) => ("trapped", fault.to_string()),
    };
    if got != result {
        return Err(format!(
            "expected handoff {result:?}, got {got:?}: {handoff}"
        ));
    }
    if let Some(c) = contains
        && !text.contains(c)
    {
        return Err(format!(
            "expected the {got} handoff's reason to contain {c:?}, it is {text:?}"
        ));
    }
    Ok(())
}

fn expect_count(what: &str, want: u64, got: u64) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{what} so far: expected {want}, counted {got}"))
    }
}

fn check_publish(
    msg: &Published,
    subject: Option<&str>,
    json: Option<&serde_json::Value>,
    options: MatchOptions,
) -> Result<(), String> {
    let mut problems = Vec::new();
    if let Some(s) = subject
        && s != msg.subject
    {
        problems.push(format!("subject: expected {s:?}, got {:?}", msg.subject));
    }
    if let Some(expected) = json {
        match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
            Ok(actual) => problems.extend(
                json_match::mismatches(expected, &actual, options)
                    .iter()
                    .map(ToString::to_string),
            ),
            Err(e) => problems.push(format!("payload is not JSON: {e}")),
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the publish does not match:\n{}\npublished on {}:\n{}",
        problems
            .iter()
            .map(|p| format!("- {p}"))
            .collect::<Vec<_>>()
            .join("\n"),
        msg.subject,
        pretty(&msg.payload)
    ))
}

fn pretty(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("s.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_action() {
        let s = parse(
            r#"
pc_id = "pc-9"
start = "2026-05-01T00:00:00Z"
[[step]]
config = { process_perf_enabled = true, host_perf_interval = "2s" }
[[step]]
unset = ["process_perf_top_n"]
[[step]]
layer = { scope = "groups.canary", value = { process_perf_top_n = 3 } }
[[step]]
groups = ["zeta", "canary", "zeta"]
[[step]]
processes = [{ pid = 1, name = "a", cpu = nan, rss = 5 }, { pid = 2, cpu = 3, exits_after_sample = true }]
[[step]]
fail_sample = "permission denied"
[[step]]
advance = "1m"
[[step]]
set_wall = "2026-05-01T01:00:00Z"
[[step]]
tick = true
[[step]]
run = "10s"
[[step]]
swap = { module = "top-memory", state = "old" }
[[step]]
fail_publish = true
[[step]]
label = "first message"
expect_publish = { subject = "x", json = { pid = 1 }, ordered = true, tolerance = 0.5, relative_tolerance = 0.01, exact_keys = true }
[[step]]
expect_no_publish = true
[[step]]
expect_interval = "2s"
[[step]]
expect_samples = 1
[[step]]
expect_name_lookups = 2
[[step]]
expect_ticks = 3
[[step]]
expect_log = { level = "warn", contains = "x" }
[[step]]
expect_handoff = { result = "refused", contains = "format" }
"#,
        )
        .unwrap();
        assert_eq!(s.name, "s");
        assert_eq!(s.options.pc_id, "pc-9");
        let keys: Vec<_> = s.steps.iter().map(|s| s.action.key()).collect();
        assert_eq!(keys, ACTIONS);
        assert_eq!(s.steps[0].line, 4);
        let step = |key: &str| {
            s.steps
                .iter()
                .find(|s| s.action.key() == key)
                .unwrap_or_else(|| panic!("no {key} step"))
        };
        let Action::Processes(p) = &step("processes").action else {
            unreachable!()
        };
        assert!(p[0].cpu_pct.is_nan());
        assert_eq!(p[1].cpu_pct, 3.0);
        let Action::ExpectPublish { options, .. } = &step("expect_publish").action else {
            unreachable!()
        };
        assert_eq!(
            step("expect_publish").label.as_deref(),
            Some("first message")
        );
        assert!(options.ordered);
        assert_eq!(options.tolerance, 0.5);
        // Relative tolerance and exact keys.
        assert_eq!(options.relative_tolerance, 0.01);
        assert!(options.exact_keys);
        // Failing samples and exiting processes.
        assert!(!p[0].exits_after_sample && p[1].exits_after_sample);
        let Action::FailSample(reason) = &step("fail_sample").action else {
            unreachable!()
        };
        assert_eq!(reason.as_deref(), Some("permission denied"));
        // Configuration layers.
        let Action::Unset(fields) = &step("unset").action else {
            unreachable!()
        };
        assert_eq!(fields, &["process_perf_top_n"]);
        let Action::Layer(key, Some(scope)) = &step("layer").action else {
            unreachable!()
        };
        assert_eq!(
            (key.as_str(), scope.process_perf_top_n),
            ("groups.canary", Some(3))
        );
        let Action::Groups(groups) = &step("groups").action else {
            unreachable!()
        };
        assert_eq!(groups, &["canary", "zeta"], "sorted and deduplicated");
        // Swaps.
        let Action::Swap { module, state } = &step("swap").action else {
            unreachable!()
        };
        assert_eq!(
            (module.as_deref(), state.as_deref()),
            (Some("top-memory"), Some(&b"old"[..]))
        );
        let Action::ExpectHandoff { result, contains } = &step("expect_handoff").action else {
            unreachable!()
        };
        assert_eq!((*result, contains.as_deref()), ("refused", Some("format")));
    }

    #[test]
    fn fail_sample_takes_a_flag_or_a_reason() {
        let s = parse("[[step]]\nfail_sample = true\n[[step]]\nfail_sample = false\n").unwrap();
        assert!(matches!(&s.steps[0].action, Action::FailSample(Some(_))));
        assert!(matches!(&s.steps[1].action, Action::FailSample(None)));
    }

    #[test]
    fn a_layer_is_put_or_deleted_whole() {
        let s =
            parse("pc_id = \"pc-1\"\n[[step]]\nlayer = { scope = \"pcs.pc-1\", delete = true }\n")
                .unwrap();
        assert!(matches!(&s.steps[0].action, Action::Layer(k, None) if k == "pcs.pc-1"));
    }

    #[test]
    fn swap_and_expect_handoff_have_short_forms() {
        let s = parse("[[step]]\nswap = {}\n[[step]]\nexpect_handoff = \"none\"\n").unwrap();
        assert!(matches!(
            &s.steps[0].action,
            Action::Swap {
                module: None,
                state: None
            }
        ));
        assert!(matches!(
            &s.steps[1].action,
            Action::ExpectHandoff {
                result: "none",
                contains: None
            }
        ));
    }

    #[test]
    fn malformed_files_name_the_step_the_field_and_what_was_expected() {
        let err = error("[[step]]\ntick = true\n[[step]]\ntick = true\nadvance = \"1s\"\n");
        assert!(
            err.starts_with("s.toml: step 2 (line 3): a step holds exactly one action"),
            "{err}"
        );

        let err = error("[[step]]\ntick = true\n[[step]]\nexpect_publsh = {}\n");
        assert!(
            err.starts_with("s.toml: step 2 (line 4): ")
                && err.contains("unknown field `expect_publsh`"),
            "{err}"
        );

        let err = error("[[step]]\nadvance = \"soon\"\n");
        assert!(
            err.contains("step 1 (line 1): `advance`: expected a duration"),
            "{err}"
        );

        let err = error("[[step]]\ntick = true\n\n[[step]]\nexpect_samples = \"two\"\n");
        assert!(
            err.starts_with("s.toml: step 2 (line 5): `expect_samples`: ")
                && err.contains("expected u64"),
            "{err}"
        );

        let err = error(
            "[[step]]\nexpect_publish = { json = {}, tolerance = 0.1 }\n[[step]]\nexpect_publish = { tolerance = \"1%\" }\n",
        );
        assert!(
            err.starts_with("s.toml: step 2 (line 4): `expect_publish.tolerance`: ")
                && err.contains("expected f64"),
            "{err}"
        );

        let err =
            error("[[step]]\nprocesses = [{ pid = 1 }, { pid = 2, exits_after_sample = 1 }]\n");
        assert!(
            err.contains("step 1 (line 2): `processes[1].exits_after_sample`: ")
                && err.contains("expected a boolean"),
            "{err}"
        );

        let err = error("start = 5\n[[step]]\ntick = true\n");
        assert!(err.starts_with("s.toml: line 1: `start`: "), "{err}");

        let err = error("[[step]]\nconfig = { process_perf_top_n = \"x\" }\n");
        assert!(
            err.ends_with(
                "step 1 (line 1): `config.process_perf_top_n`: invalid type: string \"x\", expected u32"
            ),
            "{err}"
        );

        let err = error("[step]\ntick = true\n");
        assert!(
            err.starts_with("s.toml: line 1: `step`: ") && err.ends_with("with two brackets)"),
            "{err}"
        );

        let err = error("nme = \"x\"\n[[step]]\ntick = true\n");
        assert!(
            err.starts_with("s.toml: line 1: `nme`: unknown field `nme`"),
            "{err}"
        );

        let err = error("[[step]]\nconfig = { top_n = 3 }\n");
        assert!(err.contains("unknown field `top_n`"), "{err}");

        let err = error("name = \"x\"\n");
        assert!(err.contains("no steps"), "{err}");

        let err = error("[[step]]\n");
        assert!(err.contains("a step needs one action"), "{err}");
    }

    #[test]
    fn malformed_new_actions_say_what_was_expected() {
        for (step, wanted) in [
            (
                "unset = [\"top_n\"]",
                "`unset`: unknown field `top_n`, expected one of",
            ),
            ("unset = []", "`unset`: expected at least one field name"),
            (
                "layer = { scope = \"group.canary\", value = {} }",
                "`layer.scope`: expected \"global\", \"groups.<name>\" or \"pcs.pc-1\", got \"group.canary\"",
            ),
            (
                "layer = { scope = \"pcs.pc-2\", value = {} }",
                "`layer.scope`: \"pcs.pc-2\" is another PC's layer",
            ),
            (
                "layer = { scope = \"global\" }",
                "`layer`: expected `value = { ... }`",
            ),
            (
                "layer = { scope = \"global\", value = {}, delete = true }",
                "give one of them",
            ),
            (
                "layer = { scope = \"global\", value = { process_perf_top_n = -1 } }",
                "`layer.value.process_perf_top_n`: invalid value: integer `-1`, expected u32",
            ),
            ("groups = [\"\"]", "`groups`: a group name cannot be empty"),
            (
                "fail_sample = 3",
                "`fail_sample`: expected `true`, `false` or a non-empty reason string, got 3",
            ),
            (
                "swap = { module = \"\" }",
                "`swap.module`: expected a module name",
            ),
            (
                "expect_handoff = \"accepted\"",
                "`expect_handoff`: expected one of \"carried\", \"none\", \"refused\", \"over-limit\", \"trapped\", got \"accepted\"",
            ),
            (
                "expect_handoff = { contains = \"x\" }",
                "`expect_handoff.result`: missing",
            ),
            (
                "expect_handoff = { result = \"refused\", reason = \"x\" }",
                "`expect_handoff`: unknown field `reason`",
            ),
            (
                "expect_publish = { relative_tolerance = -0.1 }",
                "`expect_publish.relative_tolerance`: expected a finite number >= 0, got -0.1",
            ),
            (
                "expect_publish = { tolerance = inf }",
                "`expect_publish.tolerance`: expected a finite number >= 0, got inf",
            ),
        ] {
            let err = error(&format!(
                "pc_id = \"pc-1\"\n[[step]]\ntick = true\n[[step]]\n{step}\n"
            ));
            assert!(
                err.starts_with("s.toml: step 2 (line 4): ") && err.contains(wanted),
                "{step}: {err}"
            );
        }
    }
}
