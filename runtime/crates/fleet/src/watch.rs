//! Follows what the fleet wants of one PC, the way kanade's agent follows `agent_config`:
//! its group membership (`agent_groups`), its settings (`agent_config`) and its module
//! assignments (`collector_config`). Each run reads the PC's keys directly, then watches
//! exactly those keys (the watch replays current values, and revisions already applied
//! are ignored, so nothing written between the read and the watch is lost). A
//! membership change reopens the watches on the new key set; a watch that ends (server
//! gone, bucket deleted) is reopened with exponential backoff, never in a busy loop.
//! Agents only read these buckets and never create them.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use collector_shared::config::resolve as resolve_config;
use collector_shared::{ConfigScope, EffectiveConfig};
use futures_util::StreamExt;

use super::assignment::{self, AssignmentScope, Desired};
use super::scope::{Applied, Layers, keys_for};
use super::{ASSIGNMENTS_BUCKET, AgentGroups, CONFIG_BUCKET, GROUPS_BUCKET};

/// How often buckets that were missing are looked for again.
const RECHECK_MISSING: Duration = Duration::from_secs(10);
/// How often the PC's keys are read again directly and compared with what the watches
/// delivered: a watch whose consumer vanished with a server can stall without an error
/// (seen with `cargo xtask fleet-sim --kill-node-at`). A few direct reads per period.
const RESYNC: Duration = Duration::from_secs(10);

/// What the fleet wants of this PC.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    /// `None` when settings are not taken from the fleet (`--config FILE`).
    pub config: Option<EffectiveConfig>,
    /// Highest `agent_config` revision applied.
    pub config_revision: u64,
    /// `None` when assignments are not taken from the fleet (local modules).
    pub modules: Option<Desired>,
    /// Highest `collector_config` revision applied.
    pub assignment_revision: u64,
    pub groups: Vec<String>,
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub pc_id: String,
    /// Follow `agent_config` (off with `--config FILE`).
    pub config: bool,
    /// Follow `collector_config` (off when modules come from local files).
    pub assignments: bool,
    /// First pause after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl WatchOptions {
    pub fn new(pc_id: &str) -> Self {
        Self {
            pc_id: pc_id.to_string(),
            config: true,
            assignments: true,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The mirror of this PC's keys.
#[derive(Debug, Default)]
struct State {
    groups: Vec<String>,
    groups_revision: u64,
    config: Layers<ConfigScope>,
    assignments: Layers<AssignmentScope>,
    /// Conflicts last reported, so they are logged when they change, not at every event.
    reported_conflicts: Vec<String>,
}

impl State {
    fn apply_groups(&mut self, revision: u64, value: Option<&[u8]>) -> bool {
        if revision != 0 && revision <= self.groups_revision {
            return false;
        }
        self.groups_revision = revision;
        let groups = match value {
            None => Vec::new(),
            Some(bytes) => match serde_json::from_slice::<AgentGroups>(bytes) {
                Ok(mut g) => {
                    g.groups.sort();
                    g.groups.dedup();
                    g.groups
                }
                Err(e) => {
                    tracing::warn!(bucket = GROUPS_BUCKET, error = %e, "undecodable group membership; keeping the previous one");
                    return false;
                }
            },
        };
        let changed = groups != self.groups;
        self.groups = groups;
        changed
    }

    fn apply_config(&mut self, pc_id: &str, entry: &kv::Entry) -> bool {
        let value = match decoded(entry, |b| {
            let text = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            ConfigScope::from_json(text)
                .map(|(scope, _unknown)| scope)
                .map_err(|e| e.to_string())
        }) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(bucket = CONFIG_BUCKET, key = %entry.key, error = %e, "undecodable settings; keeping the previous value");
                return false;
            }
        };
        self.config.apply(pc_id, &entry.key, entry.revision, value) == Applied::Changed
    }

    fn apply_assignment(&mut self, pc_id: &str, entry: &kv::Entry) -> bool {
        let value = match decoded(entry, AssignmentScope::from_json) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(bucket = ASSIGNMENTS_BUCKET, key = %entry.key, error = %e, "undecodable assignment; keeping the previous value");
                return false;
            }
        };
        self.assignments
            .apply(pc_id, &entry.key, entry.revision, value)
            == Applied::Changed
    }

    fn view(&mut self, opts: &WatchOptions) -> FleetView {
        let mut conflicts = Vec::new();
        let config = opts.config.then(|| {
            let layers = &self.config;
            let resolved = resolve_config(
                layers.global.as_ref(),
                layers.groups_of(&self.groups),
                layers.pc.as_ref(),
            );
            conflicts.extend(
                resolved
                    .conflicts
                    .iter()
                    .map(|c| format!("{CONFIG_BUCKET}: {c}")),
            );
            resolved.config
        });
        let modules = opts.assignments.then(|| {
            let layers = &self.assignments;
            let resolved = assignment::resolve(
                layers.global.as_ref(),
                layers.groups_of(&self.groups),
                layers.pc.as_ref(),
            );
            conflicts.extend(
                resolved
                    .conflicts
                    .iter()
                    .map(|c| format!("{ASSIGNMENTS_BUCKET}: {c} (the last group wins)")),
            );
            resolved.modules
        });
        if conflicts != self.reported_conflicts {
            for c in &conflicts {
                tracing::warn!(pc_id = %opts.pc_id, "group conflict: {c}");
            }
            self.reported_conflicts = conflicts;
        }
        FleetView {
            config,
            config_revision: self.config.revision(),
            modules,
            assignment_revision: self.assignments.revision(),
            groups: self.groups.clone(),
        }
    }
}

/// A put's value decoded, or `None` for a delete or purge (the layer is cleared).
fn decoded<T>(
    entry: &kv::Entry,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match entry.operation {
        kv::Operation::Put => decode(&entry.value).map(Some),
        kv::Operation::Delete | kv::Operation::Purge => Ok(None),
    }
}

/// Exponential backoff between reopen attempts.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
            failures: 0,
        }
    }

    /// Logs the failure (a warning for the first of a streak, debug after) and sleeps.
    async fn fail(&mut self, what: &str, error: String) {
        self.failures += 1;
        if self.failures == 1 {
            tracing::warn!(error = %error, retry_in = ?self.next, "{what}; retrying with backoff");
        } else {
            tracing::debug!(error = %error, retry_in = ?self.next, failures = self.failures, "{what}");
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "fleet buckets reachable again");
        }
        self.failures = 0;
        self.next = self.min;
    }
}

/// The next entry of an optional watch; pends forever when there is none.
async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Follows the fleet for `opts.pc_id` until the task is dropped, calling `on_change`
/// with every new view (never twice with the same view).
pub async fn run(
    client: async_nats::Client,
    opts: WatchOptions,
    mut on_change: impl FnMut(FleetView) + Send,
) {
    let js = jetstream::new(client);
    let pc_id = opts.pc_id.clone();
    let mut backoff = Backoff::new(opts.min_backoff, opts.max_backoff);
    let mut state = State::default();
    let mut last: Option<FleetView> = None;
    let mut reported_missing: Vec<&str> = Vec::new();
    let mut emit = |state: &mut State, last: &mut Option<FleetView>| {
        let view = state.view(&opts);
        if last.as_ref() != Some(&view) {
            *last = Some(view.clone());
            on_change(view);
        }
    };
    loop {
        // Open what we follow; an agent never creates buckets (it may not write them).
        // The first bucket needed is the gate: until it opens, nothing is known and no
        // view is given (an empty one would stop every module). The others may be
        // missing on a fleet that does not use them yet: they count as empty and are
        // looked for again every `RECHECK_MISSING`.
        let gate = if opts.assignments {
            ASSIGNMENTS_BUCKET
        } else {
            CONFIG_BUCKET
        };
        let gate_kv = match js.get_key_value(gate).await {
            Ok(kv) => kv,
            Err(e) => {
                backoff
                    .fail(&format!("cannot open KV {gate}"), e.to_string())
                    .await;
                continue;
            }
        };
        let mut missing = Vec::new();
        let mut open = |name: &'static str, kv: Result<kv::Store, _>| match kv {
            Ok(kv) => Some(kv),
            Err(e) => {
                tracing::debug!(bucket = name, error = %e, "bucket not there (yet); counted as empty");
                missing.push(name);
                None
            }
        };
        let groups_kv = open(GROUPS_BUCKET, js.get_key_value(GROUPS_BUCKET).await);
        let (config_kv, assignments_kv) = if opts.assignments {
            let config = if opts.config {
                open(CONFIG_BUCKET, js.get_key_value(CONFIG_BUCKET).await)
            } else {
                None
            };
            (config, Some(gate_kv))
        } else {
            (Some(gate_kv), None)
        };
        if !missing.is_empty() && reported_missing != missing {
            tracing::warn!(buckets = ?missing, "fleet buckets missing: counted as empty, looked for again every {RECHECK_MISSING:?}");
            reported_missing = missing.clone();
        }

        // A fresh snapshot, swapped in only when complete: a failed read never
        // publishes a half-read (or default) view.
        let mut fresh = State {
            reported_conflicts: std::mem::take(&mut state.reported_conflicts),
            ..State::default()
        };
        if let Err(e) = snapshot(
            &mut fresh,
            &pc_id,
            groups_kv.as_ref(),
            config_kv.as_ref(),
            assignments_kv.as_ref(),
        )
        .await
        {
            state.reported_conflicts = fresh.reported_conflicts;
            backoff
                .fail("cannot read the fleet's keys for this PC", e.to_string())
                .await;
            continue;
        }
        state = fresh;
        emit(&mut state, &mut last);

        let keys = keys_for(&pc_id, &state.groups);
        let watches = async {
            let groups = match &groups_kv {
                Some(kv) => Some(kv.watch_with_history(&pc_id).await?),
                None => None,
            };
            let config = match &config_kv {
                Some(kv) => Some(kv.watch_many_with_history(keys.iter()).await?),
                None => None,
            };
            let assignments = match &assignments_kv {
                Some(kv) => Some(kv.watch_many_with_history(keys.iter()).await?),
                None => None,
            };
            Ok::<_, kv::WatchError>((groups, config, assignments))
        };
        let (mut groups_w, mut config_w, mut assignments_w) = match watches.await {
            Ok(w) => w,
            Err(e) => {
                backoff
                    .fail("cannot watch the fleet's keys", e.to_string())
                    .await;
                continue;
            }
        };
        backoff.succeeded();
        tracing::debug!(pc_id, ?keys, "watching the fleet's keys");

        let recheck = async {
            if missing.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RECHECK_MISSING).await;
        };
        tokio::pin!(recheck);
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + RESYNC + super::random_below(RESYNC / 2),
            RESYNC,
        );
        // A watch that errs (a server lost, a missed heartbeat) may have missed entries:
        // it is reopened behind a fresh snapshot rather than trusted to resume.
        let ended = loop {
            tokio::select! {
                () = &mut recheck => break "",
                _ = resync.tick() => {
                    let mut fresh = State {
                        reported_conflicts: state.reported_conflicts.clone(),
                        ..State::default()
                    };
                    let read = snapshot(
                        &mut fresh,
                        &pc_id,
                        groups_kv.as_ref(),
                        config_kv.as_ref(),
                        assignments_kv.as_ref(),
                    )
                    .await;
                    let seen = |v: &FleetView| (v.config.clone(), v.modules.clone(), v.groups.clone());
                    if read.is_ok() && last.as_ref().map(seen) != Some(seen(&fresh.view(&opts))) {
                        tracing::warn!("a fleet watch missed an update; reading the keys again and reopening it");
                        break "";
                    }
                }
                entry = next_entry(&mut groups_w) => {
                    let Some(entry) = entry else { break GROUPS_BUCKET };
                    let Ok(entry) = entry.inspect_err(|e| tracing::warn!(error = %e, "agent_groups watch")) else { break GROUPS_BUCKET };
                    let value = (entry.operation == kv::Operation::Put).then_some(&entry.value[..]);
                    if state.apply_groups(entry.revision, value) {
                        emit(&mut state, &mut last);
                        if keys_for(&pc_id, &state.groups) != keys {
                            tracing::info!(groups = ?state.groups, "group membership changed; following the new groups' keys");
                            break "";
                        }
                    }
                }
                entry = next_entry(&mut config_w) => {
                    let Some(entry) = entry else { break CONFIG_BUCKET };
                    let Ok(entry) = entry.inspect_err(|e| tracing::warn!(error = %e, "agent_config watch")) else { break CONFIG_BUCKET };
                    if state.apply_config(&pc_id, &entry) {
                        emit(&mut state, &mut last);
                    }
                }
                entry = next_entry(&mut assignments_w) => {
                    let Some(entry) = entry else { break ASSIGNMENTS_BUCKET };
                    let Ok(entry) = entry.inspect_err(|e| tracing::warn!(error = %e, "collector_config watch")) else { break ASSIGNMENTS_BUCKET };
                    if state.apply_assignment(&pc_id, &entry) {
                        emit(&mut state, &mut last);
                    }
                }
            }
        };
        if !ended.is_empty() {
            backoff
                .fail(
                    &format!("the {ended} watch ended or failed"),
                    "reopening it".into(),
                )
                .await;
        }
    }
}

/// Reads this PC's keys directly: membership first (it decides which keys apply).
async fn snapshot(
    state: &mut State,
    pc_id: &str,
    groups_kv: Option<&kv::Store>,
    config_kv: Option<&kv::Store>,
    assignments_kv: Option<&kv::Store>,
) -> Result<(), kv::EntryError> {
    if let Some(kv) = groups_kv
        && let Some(entry) = kv.entry(pc_id).await?
    {
        let value = (entry.operation == kv::Operation::Put).then_some(&entry.value[..]);
        state.apply_groups(entry.revision, value);
    }
    for key in keys_for(pc_id, &state.groups) {
        if let Some(kv) = config_kv
            && let Some(entry) = kv.entry(&key).await?
        {
            state.apply_config(pc_id, &entry);
        }
        if let Some(kv) = assignments_kv
            && let Some(entry) = kv.entry(&key).await?
        {
            state.apply_assignment(pc_id, &entry);
        }
    }
    Ok(())
}
