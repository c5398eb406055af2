//! `collector rollout`: staged rollouts that stop themselves. `start` writes the rollout
//! (`collector_rollouts`, key = module) and its first wave; a controller (`run`, or
//! `start --follow`) judges each wave from the agents' status records, advances it after
//! its bake time, and halts it (reverting or pinning) when a gate fails; `status`,
//! `watch`, `pause`, `resume` and `abort` read and steer it from any operator machine.
//!
//! Every change of a rollout is a compare-and-swap on its key: two controllers, or one
//! killed and restarted mid-wave, never advance a wave twice, and the assignment a
//! controller writes is derived from the rollout's state alone (`Rollout::entry`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream::kv::{Operation, Store};
use chrono::Utc;
use clap::{Args, Subcommand, ValueEnum};
use futures_util::{StreamExt as _, TryStreamExt as _};

use super::module_fleet;
use super::ops::{self, NatsArgs};
use collector_bundle::{Bundle, MAX_BUNDLE_LEN, Manifest};
use collector_fleet::assignment::{AssignmentScope, ModuleAssignment};
use collector_fleet::rollout::{
    self, Counts, Decision, EVENTS_PC_ID, EVENTS_SOURCE, Gates, Halt, OnHalt, Phase,
    ROLLOUTS_BUCKET, Rollout, WaveRecord,
};
use collector_fleet::status::{AgentStatus, ObsEvent};
use collector_fleet::{
    ASSIGNMENTS_BUCKET, AgentGroups, GROUPS_BUCKET, STATUS_BUCKET, fetch, kv, names, obs_subject,
};
use collector_shared::scope::Scope;

/// Revisions kept per key of `collector_rollouts`.
pub(super) const ROLLOUTS_HISTORY: i64 = 10;
/// How often a controller judges its rollouts.
const STEP_EVERY: Duration = Duration::from_millis(500);
/// How long after a start a controller waits for its first wave's assignment before
/// taking its absence for someone else's change.
const START_GRACE: chrono::Duration = chrono::Duration::seconds(30);
/// How often a controller rewrites a rollout's counts when only they changed.
const COUNTS_EVERY: chrono::Duration = chrono::Duration::seconds(2);

/// Staged rollouts: waves, bake time, health gates, automatic halt and revert.
///
/// A rollout moves one module of the fleet (or of a group) from the version it runs to a
/// new one, wave by wave: groups (`canary`) and shares of the agents (`1%`, `10%`,
/// `100%`). Agents place themselves: an agent's place in the order is a hash of its PC id
/// and the rollout, so 1% is inside 10%. A controller (`collector rollout run`, next to the
/// broker, or `start --follow` in a terminal) advances a wave once it has baked with every
/// gate passing, and halts on the first gate that fails: traps, rollbacks or refusals of
/// the new version; an agent that published with the old version and now publishes (much)
/// less; an agent where the new version's code spends several times the CPU per tick. A
/// halt sends the agents that moved back to the old version when the new version's
/// signers allowed it (`module sign --rollback-floor`), else pins everyone where they
/// are. The rollout and its state live in the `collector_rollouts` KV, so any operator
/// machine sees and steers it; its events go on kanade's timeline (`obs.rollouts`).
#[derive(Debug, Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    Start(Box<StartArgs>),
    Status(StatusArgs),
    Watch(WatchArgs),
    Run(RunArgs),
    /// Pause a rollout: its waves stop advancing (its gates still halt it).
    Pause(SteerArgs),
    /// Resume a paused rollout; the current wave bakes again from now.
    Resume(SteerArgs),
    Abort(AbortArgs),
}

/// Start a staged rollout of a published module version.
///
/// Writes the rollout to `collector_rollouts` and its first wave into the scope's
/// assignment (`collector_config`); a controller then moves it along (`--follow` runs one
/// here until the rollout ends; `collector rollout run` runs one as a service). The
/// version it starts from is what the scope assigns now (`--from` to say it). Refused
/// while another rollout of the module is running or paused. Narrower scopes that keep
/// agents off the new version (a group or a PC pinned to another version) are listed;
/// `--include-narrower` lifts their pins, so the rollout reaches those agents too.
#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct StartArgs {
    /// The module's name, as signed.
    #[arg(value_name = "NAME")]
    name: String,

    /// The version to roll out (must have been published).
    #[arg(value_name = "VERSION")]
    version: u64,

    #[command(flatten)]
    scope: RolloutScope,

    /// The version agents run now (default: what the scope assigns).
    #[arg(long, value_name = "V")]
    from: Option<u64>,

    /// The waves, in order: groups (`canary`) and growing shares of the scope's agents.
    #[arg(long, value_name = "PLAN", default_value = "1%,10%,50%,100%")]
    waves: String,

    /// How long each wave runs, every gate passing, before the next starts.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    bake: Duration,

    /// Most agents of a wave that may fail, in percent (0: the first failure halts).
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = percent)]
    max_failures: f64,

    /// Agents of a wave that must be judged (healthy or failed) before it may pass, in
    /// percent of the wave.
    #[arg(long, value_name = "PCT", default_value_t = 90.0, value_parser = percent)]
    min_reporting: f64,

    /// Ticks an agent must run the new version after its probation before it counts as
    /// healthy; the data-plane and CPU gates compare per-tick figures over them.
    #[arg(long, value_name = "N", default_value_t = 5)]
    min_ticks: u64,

    /// Data-plane gate: an agent fails when the new version publishes fewer than this
    /// fraction of the old version's messages per tick on it (0 turns the gate off).
    #[arg(long, value_name = "RATIO", default_value_t = 0.5, value_parser = ratio)]
    min_publish_ratio: f64,

    /// CPU gate: an agent fails when the new version's code spends more than this many
    /// times the old version's CPU per tick on it (0 turns the gate off).
    #[arg(long, value_name = "RATIO", default_value_t = 3.0, value_parser = ratio)]
    max_cpu_ratio: f64,

    /// What a halt does: send the agents that moved back to the old version (when the
    /// new version's rollback floor allows it; else pin), or pin everyone where they are.
    #[arg(long, value_enum, default_value_t = HaltChoice::Revert)]
    on_halt: HaltChoice,

    /// Lift the version pins of narrower scopes (groups, PCs) on this module, so the
    /// rollout reaches their agents too.
    #[arg(long)]
    include_narrower: bool,

    /// Run a controller for this rollout here, printing its progress, until it completes
    /// or halts.
    #[arg(long)]
    follow: bool,

    #[command(flatten)]
    nats: NatsArgs,
}

/// The fleet or one group.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
struct RolloutScope {
    /// Every agent of the fleet (key `global`).
    #[arg(long)]
    global: bool,

    /// The agents of group G (key `groups.G`).
    #[arg(long, value_name = "G")]
    group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HaltChoice {
    Revert,
    Pin,
}

/// Show rollouts: waves, counts by state, the gate that halted one and the agents that
/// tripped it.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this module's rollout.
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Print the rollouts as stored, as a JSON array.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Follow one rollout, printing each change, until it completes or halts (read-only:
/// a controller must run somewhere).
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The module.
    #[arg(value_name = "NAME")]
    name: String,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Run a rollout controller until stopped (SIGTERM, Ctrl-C): it judges every running
/// rollout twice a second and advances, completes or halts each. Safe to run on several
/// machines at once: every change is a compare-and-swap.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only this module's rollout.
    #[arg(long, value_name = "NAME")]
    module: Option<String>,

    #[command(flatten)]
    nats: NatsArgs,
}

/// The rollout to pause or resume.
#[derive(Debug, Args)]
pub struct SteerArgs {
    /// The module.
    #[arg(value_name = "NAME")]
    name: String,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Stop a rollout now: the agents that moved go back to the old version (when its
/// rollback floor allows it), or, with --pin, everyone stays where they are.
#[derive(Debug, Args)]
pub struct AbortArgs {
    /// The module.
    #[arg(value_name = "NAME")]
    name: String,

    /// Keep every agent where it is.
    #[arg(long)]
    pin: bool,

    /// Why, for the record and the event.
    #[arg(long, value_name = "TEXT", default_value = "aborted by an operator")]
    reason: String,

    #[command(flatten)]
    nats: NatsArgs,
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}`: expected a percentage such as 5 or 2.5"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{s}`: expected a percentage from 0 to 100"))
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}`: expected a number such as 0.5 or 3"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("`{s}`: expected a non-negative number"))
    }
}

impl RolloutArgs {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            RolloutCommand::Start(args) => start(*args),
            RolloutCommand::Status(args) => status(args),
            RolloutCommand::Watch(args) => watch(args),
            RolloutCommand::Run(args) => run_controller(args),
            RolloutCommand::Pause(args) => steer(args, Phase::Running, Phase::Paused),
            RolloutCommand::Resume(args) => steer(args, Phase::Paused, Phase::Running),
            RolloutCommand::Abort(args) => abort(args),
        }
    }
}

/// `user@host`, for the record.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_else(|_| "?".into());
    names::printable(&format!("{user}@{host}"), 120)
}

fn decode_rollout(bytes: &[u8]) -> Result<Option<Rollout>, kv::Undecodable> {
    Rollout::from_json(bytes)
        .map(Some)
        .map_err(|e| kv::Undecodable::Keep(anyhow!("{ROLLOUTS_BUCKET}: {e}")))
}

fn encode_rollout(r: &Option<Rollout>) -> Vec<u8> {
    r.as_ref().map(Rollout::to_json).unwrap_or_default()
}

fn start(args: StartArgs) -> anyhow::Result<()> {
    let name = ops::check_module(&args.name)?.to_string();
    let scope = match &args.scope.group {
        Some(g) => Scope::Group(ops::check_name("--group", g)?),
        None => Scope::Global,
    };
    let waves = rollout::parse_plan(&args.waves).map_err(|e| anyhow!("--waves: {e}"))?;
    if args.bake > Duration::from_secs(7 * 24 * 3600) {
        bail!("--bake: at most a week");
    }
    let to = args.version;
    let follow = args.follow;
    let nats = args.nats.clone();
    let started = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        module_fleet::require_published(&js, &name, to).await?;
        let manifest = published_manifest(&js, &name, to).await?;
        let assignments =
            kv::open_or_create_kv(&js, ASSIGNMENTS_BUCKET, module_fleet::ASSIGNMENTS_HISTORY)
                .await?;
        let key = scope.key();
        let current = kv::read(&assignments, ASSIGNMENTS_BUCKET, &key).await?;
        let entry = current
            .value
            .as_deref()
            .map(AssignmentScope::from_json)
            .transpose()
            .map_err(|e| anyhow!("{ASSIGNMENTS_BUCKET} {key}: {e}"))?
            .and_then(|s| s.modules.get(&name).cloned());
        let from = match (args.from, entry.as_ref().and_then(|e| e.version)) {
            (Some(f), _) => f,
            (None, Some(v)) => v,
            (None, None) => bail!(
                "{scope} assigns no version of {name} to start from: assign one first \
                 (`collector module rollout {name} VERSION {}`) or give --from",
                scope_flag(scope)
            ),
        };
        if from == to {
            bail!("{scope} already runs {name} version {to}: nothing to roll out");
        }
        let floor = manifest.rollback_floor.unwrap_or(manifest.version);
        let revert_allowed = floor <= from;
        let overrides = module_fleet::narrower_overrides(&js, scope, &name, to).await?;
        let now = Utc::now();
        let id = rollout::new_id(&name, to, now);
        let r = Rollout {
            id,
            module: name.clone(),
            from,
            to,
            scope: key.clone(),
            waves: waves.clone(),
            bake_ms: u64::try_from(args.bake.as_millis()).unwrap_or(u64::MAX),
            gates: Gates {
                max_failure_pct: args.max_failures,
                min_reporting_pct: args.min_reporting,
                min_ticks: args.min_ticks,
                min_publish_ratio: args.min_publish_ratio,
                max_cpu_ratio: args.max_cpu_ratio,
            },
            on_halt: match args.on_halt {
                HaltChoice::Revert => OnHalt::Revert,
                HaltChoice::Pin => OnHalt::Pin,
            },
            revert_allowed,
            phase: Phase::Running,
            wave: 0,
            started_at: now,
            wave_started_at: now,
            updated_at: now,
            started_by: operator(),
            halt: None,
            counts: Counts::default(),
            waiting: Vec::new(),
            history: vec![WaveRecord {
                wave: waves[0].clone(),
                started_at: now,
                ended_at: None,
                placed: 0,
            }],
        };
        let rollouts = kv::open_or_create_kv(&js, ROLLOUTS_BUCKET, ROLLOUTS_HISTORY).await?;
        let mut refused = None;
        let written = kv::read_modify_write(
            &rollouts,
            ROLLOUTS_BUCKET,
            &name,
            |b| decode_rollout(b).or(Ok(None)),
            encode_rollout,
            |stored| {
                if let Some(old) = stored.as_ref().filter(|o| o.phase.active()) {
                    refused = Some(format!(
                        "a rollout of {name} is {} ({} v{} to v{}, wave {} of {}): \
                         wait for it, or stop it with `collector rollout abort {name}`",
                        phase_word(old.phase),
                        old.scope,
                        old.from,
                        old.to,
                        old.wave + 1,
                        old.waves.len()
                    ));
                    return Ok(());
                }
                *stored = Some(r.clone());
                Ok(())
            },
        )
        .await?;
        if let Some(why) = refused {
            bail!(why);
        }
        let mut lifted = Vec::new();
        for (key, what, _) in &overrides {
            if !args.include_narrower || what.ends_with("disabled") {
                continue;
            }
            let Some(narrow) = Scope::parse(key) else {
                continue;
            };
            module_fleet::edit_assignments(&js, narrow, |s| {
                if let Some(m) = s.modules.get_mut(&name) {
                    m.version = None;
                    m.rollout = None;
                    if m.enabled.is_none() {
                        s.modules.remove(&name);
                    }
                }
                Ok(())
            })
            .await?;
            lifted.push(format!("{key} ({what})"));
        }
        settle(
            &js,
            &rollouts,
            written.revision.unwrap_or(0),
            r.clone(),
            true,
        )
        .await?;
        publish_event(&js, &r, rollout::KIND_STARTED, serde_json::json!({})).await;
        Ok((r, overrides, lifted))
    })?;
    let (r, overrides, lifted) = started;
    println!(
        "rollout {} started: {name} v{} -> v{to} on {} in {} waves ({}), {} bake per wave",
        r.id,
        r.from,
        r.scope,
        r.waves.len(),
        plan_text(&r),
        humantime::format_duration(r.bake())
    );
    println!(
        "gates: failures at most {}%, {}% of a wave judged, {} ticks each; data plane >= {}x, CPU <= {}x of v{}",
        r.gates.max_failure_pct,
        r.gates.min_reporting_pct,
        r.gates.min_ticks,
        r.gates.min_publish_ratio,
        r.gates.max_cpu_ratio,
        r.from
    );
    if r.revert_allowed {
        println!(
            "on a halt: {}",
            match r.on_halt {
                OnHalt::Revert => format!("agents that moved go back to v{}", r.from),
                OnHalt::Pin => "every agent stays where it is".to_string(),
            }
        );
    } else {
        println!(
            "on a halt: every agent stays where it is (v{to} is signed with a rollback floor above v{}, so agents that ran it refuse to go back)",
            r.from
        );
    }
    for l in &lifted {
        println!("lifted the pin of {l}: the rollout reaches its agents");
    }
    if lifted.is_empty() && !overrides.is_empty() {
        eprintln!("warning: narrower scopes keep some agents off {name} version {to}:");
        for (key, what, undo) in &overrides {
            eprintln!("  {key}: {what} (`{undo}` lets the rollout reach them)");
        }
        eprintln!("  (--include-narrower lifts their version pins when the rollout starts)");
    }
    if follow {
        return ops::block_on(controller(&nats, Some(name), true));
    }
    println!(
        "a controller moves it along: run `collector rollout run` (a service next to the broker) or \
         `collector rollout watch {name}` with one running; `collector rollout status {name}` shows it"
    );
    Ok(())
}

fn scope_flag(scope: Scope<'_>) -> String {
    match scope {
        Scope::Group(g) => format!("--group {g}"),
        Scope::Pc(p) => format!("--pc {p}"),
        Scope::Global => "--global".into(),
    }
}

fn phase_word(p: Phase) -> &'static str {
    match p {
        Phase::Running => "running",
        Phase::Paused => "paused",
        Phase::Halted => "halted",
        Phase::Completed => "completed",
    }
}

fn plan_text(r: &Rollout) -> String {
    r.waves
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The manifest of a published bundle (not verified: agents verify; this reads the
/// rollback floor to tell whether a halt can revert).
async fn published_manifest(
    js: &async_nats::jetstream::Context,
    name: &str,
    version: u64,
) -> anyhow::Result<Manifest> {
    let fetched = fetch::fetch(js, name, version, MAX_BUNDLE_LEN, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("cannot read {name} version {version} from the module store: {e}"))?;
    let bundle = Bundle::parse(&fetched.bytes)
        .map_err(|e| anyhow!("{name} version {version} in the module store: {e}"))?;
    Manifest::parse(bundle.manifest)
        .map_err(|e| anyhow!("{name} version {version} in the module store: {e}"))
}

/// Makes the scope's assignment of the module say what the rollout's state says. Only an
/// entry that carries this rollout's placement is rewritten (or any entry, for the
/// `initial` write of `rollout start`): an entry set since by hand, or by another
/// rollout, is left alone, and for a running rollout that means it was taken from it.
/// Returns whether the entry is (now) the rollout's.
async fn ensure_assignment(
    js: &async_nats::jetstream::Context,
    r: &Rollout,
    initial: bool,
) -> anyhow::Result<bool> {
    let Some(scope) = Scope::parse(&r.scope) else {
        bail!(
            "{ROLLOUTS_BUCKET} {}: scope `{}` is not a key",
            r.module,
            r.scope
        );
    };
    let want = r.entry();
    let mut foreign = false;
    module_fleet::edit_assignments(js, scope, |s| {
        let current = s.modules.get(&r.module);
        if current == Some(&want) {
            return Ok(());
        }
        if !initial && !r.owns(current) {
            foreign = true;
            return Ok(());
        }
        let enabled = current.and_then(|c| c.enabled);
        s.modules.insert(
            r.module.clone(),
            ModuleAssignment {
                enabled,
                ..want.clone()
            },
        );
        Ok(())
    })
    .await?;
    Ok(!foreign)
}

/// [`ensure_assignment`], then again from the rollout as it is now for as long as it
/// changed meanwhile: a controller acting on a state another one just moved on from
/// leaves the assignment as the newest state says, not as its own.
async fn settle(
    js: &async_nats::jetstream::Context,
    rollouts: &Store,
    mut revision: u64,
    mut r: Rollout,
    initial: bool,
) -> anyhow::Result<bool> {
    let mut owned = true;
    for round in 0..8 {
        owned = ensure_assignment(js, &r, initial && round == 0).await?;
        let now = kv::read(rollouts, ROLLOUTS_BUCKET, &r.module).await?;
        match (now.value, now.revision) {
            (Some(bytes), Some(rev)) if rev != revision => {
                r = Rollout::from_json(&bytes)
                    .map_err(|e| anyhow!("{ROLLOUTS_BUCKET} {}: {e}", r.module))?;
                revision = rev;
            }
            _ => break,
        }
    }
    Ok(owned)
}

/// Sends a rollout event to kanade's timeline; a failure is only logged.
async fn publish_event(
    js: &async_nats::jetstream::Context,
    r: &Rollout,
    kind: &str,
    extra: serde_json::Value,
) {
    let at = Utc::now();
    let mut payload = serde_json::json!({
        "rollout": r.id,
        "module": r.module,
        "from": r.from,
        "to": r.to,
        "scope": r.scope,
        "wave": r.wave + 1,
        "waves": r.waves.len(),
        "plan": plan_text(r),
    });
    if let (Some(p), serde_json::Value::Object(e)) = (payload.as_object_mut(), extra) {
        p.extend(e);
    }
    let event = ObsEvent {
        pc_id: EVENTS_PC_ID.into(),
        at,
        kind: kind.into(),
        source: EVENTS_SOURCE.into(),
        event_record_id: Some(format!(
            "{kind}:{}:{}:{}",
            r.id,
            r.wave,
            at.timestamp_nanos_opt().unwrap_or_default()
        )),
        payload,
    };
    let client = js.client();
    let bytes = serde_json::to_vec(&event).expect("events serialize");
    let sent = async {
        client
            .publish(obs_subject(EVENTS_PC_ID), bytes.into())
            .await?;
        client.flush().await?;
        anyhow::Ok(())
    };
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), sent)
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    {
        tracing::warn!(kind, error = %e, "cannot send the rollout event");
    }
}

/// What a controller knows of the fleet: every agent's record and groups, kept by
/// watches of `collector_status` and `agent_groups`.
#[derive(Default)]
struct FleetMirror {
    statuses: BTreeMap<String, AgentStatus>,
    groups: BTreeMap<String, Vec<String>>,
}

async fn mirror(js: &async_nats::jetstream::Context) -> anyhow::Result<Arc<Mutex<FleetMirror>>> {
    let shared = Arc::new(Mutex::new(FleetMirror::default()));
    let status = kv::open_or_create_kv(js, STATUS_BUCKET, 1).await?;
    let groups = kv::open_kv(js, GROUPS_BUCKET).await?;
    spawn_watch(
        status,
        STATUS_BUCKET,
        shared.clone(),
        |m, key, value| match value {
            Some(v) if v.len() <= usize::try_from(kv::MAX_STATUS_RECORD).unwrap_or(usize::MAX) => {
                match serde_json::from_slice::<AgentStatus>(v) {
                    Ok(s) => {
                        m.statuses.insert(key.to_string(), s);
                    }
                    Err(_) => {
                        m.statuses.remove(key);
                    }
                }
            }
            _ => {
                m.statuses.remove(key);
            }
        },
    )
    .await?;
    if let Some(groups) = groups {
        spawn_watch(groups, GROUPS_BUCKET, shared.clone(), |m, key, value| {
            let parsed = value
                .and_then(|v| AgentGroups::from_json(&String::from_utf8_lossy(v)).ok())
                .map(|g| g.groups);
            match parsed {
                Some(g) => m.groups.insert(key.to_string(), g),
                None => m.groups.remove(key),
            };
        })
        .await?;
    }
    Ok(shared)
}

/// Follows every key of `store` (its latest values, then each change) into the mirror,
/// starting again after an error.
async fn spawn_watch(
    store: Store,
    bucket: &'static str,
    shared: Arc<Mutex<FleetMirror>>,
    apply: fn(&mut FleetMirror, &str, Option<&[u8]>),
) -> anyhow::Result<()> {
    let mut watch = store
        .watch_with_history(">")
        .await
        .with_context(|| format!("cannot watch {bucket}"))?;
    tokio::spawn(async move {
        loop {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { break };
                let value = (entry.operation == Operation::Put).then_some(&entry.value[..]);
                apply(&mut shared.lock().expect("mirror lock"), &entry.key, value);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            match store.watch_with_history(">").await {
                Ok(w) => watch = w,
                Err(e) => tracing::warn!(bucket, error = %e, "cannot watch again; retrying"),
            }
        }
    });
    Ok(())
}

fn run_controller(args: RunArgs) -> anyhow::Result<()> {
    let only = args
        .module
        .as_deref()
        .map(ops::check_module)
        .transpose()?
        .map(str::to_string);
    ops::block_on(controller(&args.nats, only, false))
}

/// Judges the active rollouts (one module's, or all) every [`STEP_EVERY`] until stopped;
/// with `until_done`, until that module's rollout is no longer active.
async fn controller(nats: &NatsArgs, only: Option<String>, until_done: bool) -> anyhow::Result<()> {
    let js = ops::jetstream(nats).await?;
    let rollouts = kv::open_or_create_kv(&js, ROLLOUTS_BUCKET, ROLLOUTS_HISTORY).await?;
    let fleet = mirror(&js).await?;
    eprintln!(
        "rollout controller: judging {} every {} ms",
        only.as_deref()
            .map_or("every running rollout".to_string(), |m| format!(
                "the rollout of {m}"
            )),
        STEP_EVERY.as_millis()
    );
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    let mut tick = tokio::time::interval(STEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => {
                eprintln!("rollout controller: stopped; the rollouts carry on where they are when a controller runs again");
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        let keys: Vec<String> = match &only {
            Some(m) => vec![m.clone()],
            None => match rollouts.keys().await {
                Ok(k) => k.try_collect().await.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list {ROLLOUTS_BUCKET}");
                    continue;
                }
            },
        };
        for key in keys {
            match step(&js, &rollouts, &key, &fleet).await {
                Ok(Some(r)) => {
                    let line = progress_line(&r);
                    if shown.get(&key) != Some(&line) {
                        println!("{}", line);
                        shown.insert(key.clone(), line);
                    }
                    if until_done && !r.phase.active() {
                        print!("{}", describe(&r));
                        return ended(&r);
                    }
                }
                Ok(None) => {
                    if until_done {
                        bail!("{ROLLOUTS_BUCKET} has no rollout of {key}");
                    }
                }
                Err(e) => eprintln!("rollout controller: {key}: {e:#}"),
            }
        }
    }
}

/// Success for a completed rollout; an error (exit status 1) for a halted one, so that a
/// script following it knows.
fn ended(r: &Rollout) -> anyhow::Result<()> {
    match &r.halt {
        Some(h) if r.phase == Phase::Halted => bail!(
            "the rollout of {} halted ({} gate)",
            names::printable(&r.module, 80),
            names::printable(&h.gate, 40)
        ),
        _ => Ok(()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// One judgment of one rollout; returns it as it stands afterwards.
async fn step(
    js: &async_nats::jetstream::Context,
    rollouts: &Store,
    key: &str,
    fleet: &Arc<Mutex<FleetMirror>>,
) -> anyhow::Result<Option<Rollout>> {
    let read = kv::read(rollouts, ROLLOUTS_BUCKET, key).await?;
    let (Some(bytes), Some(revision)) = (read.value, read.revision) else {
        return Ok(None);
    };
    let r = Rollout::from_json(&bytes).map_err(|e| anyhow!("{ROLLOUTS_BUCKET} {key}: {e}"))?;
    if !r.phase.active() {
        // A halt or completion whose assignment write was cut short is finished here.
        settle(js, rollouts, revision, r.clone(), false).await?;
        return Ok(Some(r));
    }
    let now = Utc::now();
    let mut next = r.clone();
    let mut event: Option<(&str, serde_json::Value)> = None;
    let owned = settle(js, rollouts, revision, r.clone(), false).await?;
    if !owned && r.wave == 0 && now - r.started_at < START_GRACE {
        // `rollout start` writes the rollout, then its first wave: this pass fell between.
        return Ok(Some(r));
    }
    if !owned {
        halt(
            &mut next,
            "assignment",
            format!(
                "{ASSIGNMENTS_BUCKET} {} no longer says what the rollout wrote (someone assigned {} by hand); \
             the rollout stopped and left the assignment as it is",
                r.scope, r.module
            ),
            Vec::new(),
            false,
            now,
        );
        event = Some((rollout::KIND_HALTED, halt_payload(&next)));
    } else {
        let judgment = {
            let m = fleet.lock().expect("mirror lock");
            rollout::judge(&r, &m.statuses, &m.groups, now)
        };
        next.counts = judgment.counts;
        next.waiting = judgment.waiting;
        match judgment.decision {
            Decision::Wait(_) => {}
            Decision::Advance => {
                close_wave(&mut next, now);
                next.wave += 1;
                next.wave_started_at = now;
                next.history.push(WaveRecord {
                    wave: next.waves[next.wave].clone(),
                    started_at: now,
                    ended_at: None,
                    placed: 0,
                });
                event = Some((rollout::KIND_WAVE, serde_json::json!({})));
            }
            Decision::Complete => {
                close_wave(&mut next, now);
                next.phase = Phase::Completed;
                event = Some((rollout::KIND_COMPLETED, serde_json::json!({})));
            }
            Decision::Halt {
                gate,
                reason,
                agents,
            } => {
                let revert = r.on_halt == OnHalt::Revert && r.revert_allowed;
                halt(&mut next, &gate, reason, agents, revert, now);
                event = Some((rollout::KIND_HALTED, halt_payload(&next)));
            }
        }
    }
    let counts_only = event.is_none();
    if counts_only
        && (next.counts == r.counts && next.waiting == r.waiting
            || now - r.updated_at < COUNTS_EVERY)
    {
        return Ok(Some(r));
    }
    next.updated_at = now;
    let written = match rollouts.update(key, next.to_json().into(), revision).await {
        Ok(written) => written,
        // Another controller (or an operator) changed it first: judged again next time.
        Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
            return Ok(Some(r));
        }
        Err(e) => return Err(anyhow!(e).context(format!("cannot write {ROLLOUTS_BUCKET} {key}"))),
    };
    if let Some((kind, payload)) = event {
        settle(js, rollouts, written, next.clone(), false).await?;
        publish_event(js, &next, kind, payload).await;
    }
    Ok(Some(next))
}

fn close_wave(r: &mut Rollout, now: chrono::DateTime<Utc>) {
    let placed = r.counts.placed;
    if let Some(w) = r.history.last_mut() {
        w.ended_at = Some(now);
        w.placed = placed;
    }
}

fn halt(
    r: &mut Rollout,
    gate: &str,
    reason: String,
    agents: Vec<String>,
    reverted: bool,
    now: chrono::DateTime<Utc>,
) {
    close_wave(r, now);
    r.phase = Phase::Halted;
    r.halt = Some(Halt {
        gate: gate.to_string(),
        reason,
        agents,
        at: now,
        reverted,
    });
}

fn halt_payload(r: &Rollout) -> serde_json::Value {
    let h = r.halt.as_ref().expect("halted");
    serde_json::json!({
        "gate": h.gate,
        "reason": h.reason,
        "agents": h.agents,
        "reverted": h.reverted,
    })
}

/// One line: where a rollout is and what it waits for.
fn progress_line(r: &Rollout) -> String {
    let c = &r.counts;
    let head = format!(
        "{} v{}->v{} {}: wave {}/{} ({}): {} of {} agents placed, {} on v{}, {} healthy, {} failed",
        names::printable(&r.module, 80),
        r.from,
        r.to,
        phase_word(r.phase),
        r.wave + 1,
        r.waves.len(),
        r.waves[r.wave],
        c.placed,
        c.target,
        c.on_new,
        r.to,
        c.healthy,
        c.failed
    );
    match &r.halt {
        Some(h) => format!(
            "{head}; halted by the {} gate{}",
            names::printable(&h.gate, 40),
            if h.reverted {
                format!(", agents sent back to v{}", r.from)
            } else {
                ", agents pinned where they are".to_string()
            }
        ),
        None => head,
    }
}

/// The full picture of one rollout, for a terminal (every stored string escaped).
fn describe(r: &Rollout) -> String {
    use std::fmt::Write as _;
    let p = |s: &str, n| names::printable(s, n);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {} of {} on {}: v{} -> v{}, {} (started {} by {})",
        p(&r.id, 120),
        p(&r.module, 80),
        p(&r.scope, 80),
        r.from,
        r.to,
        phase_word(r.phase),
        ops::age(Utc::now(), r.started_at),
        p(&r.started_by, 120)
    );
    for (i, w) in r.waves.iter().enumerate() {
        let mark = match i.cmp(&r.wave) {
            std::cmp::Ordering::Less => "passed",
            std::cmp::Ordering::Equal if r.phase == Phase::Completed => "passed",
            std::cmp::Ordering::Equal if r.phase == Phase::Halted => "halted here",
            std::cmp::Ordering::Equal => "current",
            std::cmp::Ordering::Greater => "",
        };
        let placed = r
            .history
            .get(i)
            .filter(|h| h.ended_at.is_some())
            .map(|h| format!(", {} agents", h.placed))
            .unwrap_or_default();
        let _ = writeln!(out, "  wave {} {w:<10} {mark}{placed}", i + 1);
    }
    let c = &r.counts;
    let _ = writeln!(
        out,
        "agents: {} in scope, {} placed on v{}, {} run it, {} healthy, {} failed",
        c.target, c.placed, r.to, c.on_new, c.healthy, c.failed
    );
    let _ = writeln!(
        out,
        "bake {} per wave; gates: failures <= {}%, judged >= {}%, {} ticks, data plane >= {}x, CPU <= {}x",
        humantime::format_duration(r.bake()),
        r.gates.max_failure_pct,
        r.gates.min_reporting_pct,
        r.gates.min_ticks,
        r.gates.min_publish_ratio,
        r.gates.max_cpu_ratio
    );
    if let Some(h) = &r.halt {
        let _ = writeln!(
            out,
            "halted by the {} gate: {}",
            p(&h.gate, 40),
            p(&h.reason, 1000)
        );
        let _ = writeln!(
            out,
            "{}",
            if h.reverted {
                format!("the agents that moved were sent back to v{}", r.from)
            } else {
                "every agent was left where it was".to_string()
            }
        );
        for a in &h.agents {
            let _ = writeln!(out, "  tripped: {}", p(a, 300));
        }
    } else if r.phase.active() && !r.waiting.is_empty() {
        let _ = writeln!(out, "waiting on:");
        for w in r.waiting.iter().take(10) {
            let _ = writeln!(out, "  {}", p(w, 300));
        }
    }
    out
}

/// Every rollout of the bucket (or one module's), sorted by module.
async fn read_rollouts(
    js: &async_nats::jetstream::Context,
    only: Option<&str>,
) -> anyhow::Result<Vec<Rollout>> {
    let Some(store) = kv::open_kv(js, ROLLOUTS_BUCKET).await? else {
        return Ok(Vec::new());
    };
    let keys: Vec<String> = match only {
        Some(m) => vec![m.to_string()],
        None => store
            .keys()
            .await
            .with_context(|| format!("cannot list {ROLLOUTS_BUCKET}"))?
            .try_collect()
            .await
            .with_context(|| format!("cannot list {ROLLOUTS_BUCKET}"))?,
    };
    let mut out = Vec::new();
    for key in keys {
        if let Some(bytes) = kv::read(&store, ROLLOUTS_BUCKET, &key).await?.value {
            match Rollout::from_json(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => eprintln!(
                    "warning: {ROLLOUTS_BUCKET} {}: {}",
                    names::printable(&key, 80),
                    names::printable(&e, 300)
                ),
            }
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    Ok(out)
}

/// One line per rollout, for `fleet status`.
pub(super) async fn summary_lines(js: &async_nats::jetstream::Context) -> Vec<String> {
    match read_rollouts(js, None).await {
        Ok(rs) => rs
            .iter()
            .filter(|r| r.phase.active() || Utc::now() - r.updated_at < chrono::Duration::hours(24))
            .map(progress_line)
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let only = args.name.as_deref().map(ops::check_module).transpose()?;
    let rs = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        read_rollouts(&js, only).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rs)?);
        return Ok(());
    }
    if rs.is_empty() {
        match only {
            Some(m) => bail!("no rollout of {m} in {ROLLOUTS_BUCKET}"),
            None => println!("no rollout"),
        }
    }
    for r in &rs {
        print!("{}", describe(r));
    }
    Ok(())
}

fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let name = ops::check_module(&args.name)?.to_string();
    ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let mut last = String::new();
        loop {
            let Some(r) = read_rollouts(&js, Some(&name)).await?.pop() else {
                bail!("no rollout of {name} in {ROLLOUTS_BUCKET}");
            };
            let line = progress_line(&r);
            if line != last {
                println!("{line}");
                last = line;
            }
            if !r.phase.active() {
                print!("{}", describe(&r));
                return ended(&r);
            }
            tokio::time::sleep(STEP_EVERY).await;
        }
    })
}

/// Changes a rollout by compare-and-swap; `change` returns an error to refuse.
async fn edit_rollout(
    js: &async_nats::jetstream::Context,
    name: &str,
    mut change: impl FnMut(&mut Rollout) -> anyhow::Result<()>,
) -> anyhow::Result<(Rollout, u64, Store)> {
    let store = kv::open_kv(js, ROLLOUTS_BUCKET)
        .await?
        .ok_or_else(|| anyhow!("no rollout of {name}: {ROLLOUTS_BUCKET} does not exist"))?;
    let written = kv::read_modify_write(
        &store,
        ROLLOUTS_BUCKET,
        name,
        decode_rollout,
        encode_rollout,
        |stored| {
            let Some(r) = stored.as_mut() else {
                bail!("no rollout of {name} in {ROLLOUTS_BUCKET}");
            };
            change(r)?;
            r.updated_at = Utc::now();
            Ok(())
        },
    )
    .await?;
    let r = written
        .value
        .ok_or_else(|| anyhow!("no rollout of {name}"))?;
    Ok((r, written.revision.unwrap_or(0), store))
}

fn steer(args: SteerArgs, from: Phase, to: Phase) -> anyhow::Result<()> {
    let name = ops::check_module(&args.name)?.to_string();
    let r = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let (r, _, _) = edit_rollout(&js, &name, |r| {
            if r.phase != from {
                bail!(
                    "the rollout of {name} is {}, not {}",
                    phase_word(r.phase),
                    phase_word(from)
                );
            }
            r.phase = to;
            if to == Phase::Running {
                // The bake starts again: a paused wave has not been watched as long.
                r.wave_started_at = Utc::now();
            }
            Ok(())
        })
        .await?;
        publish_event(
            &js,
            &r,
            rollout::KIND_STEERED,
            serde_json::json!({ "phase": phase_word(to), "by": operator() }),
        )
        .await;
        Ok(r)
    })?;
    println!("{}", progress_line(&r));
    Ok(())
}

fn abort(args: AbortArgs) -> anyhow::Result<()> {
    let name = ops::check_module(&args.name)?.to_string();
    let reason = names::printable(&args.reason, 300);
    let r = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let (r, revision, store) = edit_rollout(&js, &name, |r| {
            if !r.phase.active() {
                bail!("the rollout of {name} is already {}", phase_word(r.phase));
            }
            let revert = !args.pin && r.revert_allowed;
            halt(
                r,
                "operator",
                format!("{reason} ({})", operator()),
                Vec::new(),
                revert,
                Utc::now(),
            );
            Ok(())
        })
        .await?;
        settle(&js, &store, revision, r.clone(), false).await?;
        publish_event(&js, &r, rollout::KIND_HALTED, halt_payload(&r)).await;
        Ok(r)
    })?;
    print!("{}", describe(&r));
    Ok(())
}
