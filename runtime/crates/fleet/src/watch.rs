//! Follows what the fleet wants of one PC, the way kanade's agent follows `agent_config`:
//! its group membership (`agent_groups`), its settings (`agent_config`) and its module
//! assignments (`collector_config`).
//!
//! An agent reads only its own keys, each with a direct get by subject (the key is in the
//! request's subject, so a broker can allow it key by key: docs/nats-server.conf), and
//! learns of changes from the writes themselves: it subscribes to the put subjects of its
//! keys (`$KV.<bucket>.<key>`) and reads a key again when a write to it goes by. It never
//! creates a consumer, opens a bucket's stream info or lists keys, so its credential
//! needs none of those rights. A write it missed (a reconnect, a notice lost) is caught by
//! a full re-read at every reconnect and every [`RESYNC`].
//!
//! No value stops a module: a value that does not decode, or decodes to a shape this
//! agent does not know, is refused, and the last good value of that key stays in force
//! (across re-reads, reconnects and, through [`FleetView::last_good`], restarts). The
//! refusal is part of the view, for the status record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use collector_shared::config::resolve as resolve_config;
use collector_shared::scope::Scope;
use collector_shared::{ConfigScope, EffectiveConfig};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::assignment::{self, AssignmentScope, Desired};
use super::scope::{Applied, Layers, keys_for};
use super::{ASSIGNMENTS_BUCKET, AgentGroups, CONFIG_BUCKET, GROUPS_BUCKET};

/// How often every key is read again, whatever the notices said: a notice is a plain
/// message, lost when the connection drops, and a bucket may appear later. A few direct
/// gets per period.
pub const RESYNC: Duration = Duration::from_secs(10);
/// How long notices are gathered before the keys they name are read: a storm of writes
/// to one key costs one read.
const SETTLE: Duration = Duration::from_millis(25);
/// A key read again after a notice still holds its old revision when the write was
/// refused (a compare-and-swap lost) or the stream has not stored it yet: it is read
/// again after these pauses, then left to the next resync.
const REREAD: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1500),
];
/// How often the connection is checked for a reconnect (after which everything is read
/// again: notices sent while it was down are lost).
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

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
    /// The staged rollout in force for each assigned module (module → rollout id).
    pub rollouts: BTreeMap<String, String>,
    /// The PC's groups from `agent_groups`, sorted, without duplicates.
    pub groups: Vec<String>,
    /// Values refused (undecodable, or of an unknown shape), by `<bucket>/<key>`; the
    /// last good value of each stays in force.
    pub refused: BTreeMap<String, RefusedValue>,
    /// The last good value of every key followed, by `<bucket>/<key>`: saved by the
    /// agent and given back at its next start ([`WatchOptions::last_good`]), so that a
    /// value refused then still leaves the one before it in force.
    pub last_good: BTreeMap<String, GoodValue>,
}

/// A value of a key that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedValue {
    /// Its revision (stream sequence).
    pub revision: u64,
    /// Why, in words for the operator.
    pub reason: String,
}

/// The last value of a key that decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoodValue {
    /// Its revision (stream sequence).
    pub revision: u64,
    /// The value as written (JSON text).
    pub value: String,
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The PC whose keys are followed.
    pub pc_id: String,
    /// Follow `agent_config` (off with `--config FILE`).
    pub config: bool,
    /// Follow `collector_config` (off when modules come from local files).
    pub assignments: bool,
    /// First pause after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// How often every key is read again ([`RESYNC`] by default).
    pub resync: Duration,
    /// Last good values saved from an earlier run ([`FleetView::last_good`]).
    pub last_good: BTreeMap<String, GoodValue>,
}

impl WatchOptions {
    /// Follows settings and assignments for `pc_id`, with backoff from 250 ms to 30 s.
    pub fn new(pc_id: &str) -> Self {
        Self {
            pc_id: pc_id.to_string(),
            config: true,
            assignments: true,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            resync: RESYNC,
            last_good: BTreeMap::new(),
        }
    }
}

/// One key as read: its revision and its value (`None` when deleted, purged or absent).
pub(crate) struct Read {
    pub(crate) revision: u64,
    pub(crate) value: Option<bytes::Bytes>,
}

/// The mirror of this PC's keys.
#[derive(Debug, Default)]
struct State {
    groups: Vec<String>,
    groups_revision: u64,
    config: Layers<ConfigScope>,
    assignments: Layers<AssignmentScope>,
    /// Last good value of each key, by `<bucket>/<key>`.
    good: BTreeMap<String, GoodValue>,
    /// Refused values, by `<bucket>/<key>`.
    refused: BTreeMap<String, RefusedValue>,
    /// Conflicts last reported, so they are logged when they change, not at every event.
    reported_conflicts: Vec<String>,
}

/// `<bucket>/<key>`, how refusals and last good values are named.
fn id(bucket: &str, key: &str) -> String {
    format!("{bucket}/{key}")
}

impl State {
    /// A state that knows only the last good values (and the conflicts reported) of
    /// `prev`: what a full re-read starts from.
    fn fresh_from(prev: &State) -> Self {
        Self {
            good: prev.good.clone(),
            reported_conflicts: prev.reported_conflicts.clone(),
            ..Self::default()
        }
    }

    /// Applies one key's read; true when the view may have changed.
    fn apply(&mut self, pc_id: &str, bucket: &str, key: &str, read: &Read) -> bool {
        let name = id(bucket, key);
        let text = match &read.value {
            None => None,
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(t) => Some(t.to_string()),
                Err(e) => {
                    return self.refuse(
                        pc_id,
                        bucket,
                        key,
                        read.revision,
                        format!("not UTF-8: {e}"),
                    );
                }
            },
        };
        if let Some(text) = &text
            && let Err(reason) = self.apply_text(pc_id, bucket, key, read.revision, Some(text))
        {
            return self.refuse(pc_id, bucket, key, read.revision, reason);
        }
        let changed = match text {
            None => {
                self.good.remove(&name);
                self.apply_text(pc_id, bucket, key, read.revision, None)
                    .unwrap_or(false)
            }
            Some(value) => {
                self.good.insert(
                    name.clone(),
                    GoodValue {
                        revision: read.revision,
                        value,
                    },
                );
                true
            }
        };
        if self.refused.remove(&name).is_some() {
            tracing::info!(
                bucket,
                key,
                revision = read.revision,
                "a good value replaced the refused one"
            );
            return true;
        }
        changed
    }

    /// Refuses a value: the last good one of the key stays (or comes back) in force.
    fn refuse(
        &mut self,
        pc_id: &str,
        bucket: &str,
        key: &str,
        revision: u64,
        reason: String,
    ) -> bool {
        let name = id(bucket, key);
        let refusal = RefusedValue { revision, reason };
        let new = self.refused.get(&name) != Some(&refusal);
        if new {
            match self.good.get(&name) {
                Some(good) => {
                    tracing::warn!(bucket, key, revision, reason = %refusal.reason, kept_revision = good.revision, "refused a value; keeping the last good one")
                }
                None => {
                    tracing::warn!(bucket, key, revision, reason = %refusal.reason, "refused a value; there is no earlier good one, so the key counts as unset")
                }
            }
            self.refused.insert(name.clone(), refusal);
        }
        if let Some(good) = self.good.get(&name).cloned() {
            // It decoded before; if the rules changed since, it is simply dropped.
            let _ = self.apply_text(pc_id, bucket, key, 0, Some(&good.value));
        }
        new
    }

    /// Decodes and applies a value (`None`: the key is cleared). `Err` when it does
    /// not decode; `Ok(changed)` otherwise.
    fn apply_text(
        &mut self,
        pc_id: &str,
        bucket: &str,
        key: &str,
        revision: u64,
        text: Option<&str>,
    ) -> Result<bool, String> {
        match bucket {
            GROUPS_BUCKET => {
                if revision != 0 && revision <= self.groups_revision {
                    return Ok(false);
                }
                let groups = match text {
                    None => Vec::new(),
                    Some(t) => AgentGroups::from_json(t)?.groups,
                };
                if revision != 0 {
                    self.groups_revision = revision;
                }
                let changed = groups != self.groups;
                self.groups = groups;
                Ok(changed)
            }
            CONFIG_BUCKET => {
                let value = text
                    .map(|t| {
                        let (scope, unknown) =
                            ConfigScope::from_json(t).map_err(|e| e.to_string())?;
                        // Fields this agent does not know are fine next to known ones (a
                        // newer kanade); a value of nothing but unknown fields is another
                        // shape altogether (a JetStream answer), never "all defaults".
                        if scope == ConfigScope::default() && !unknown.is_empty() {
                            return Err(format!(
                                "holds none of the settings' fields, only {}: not a settings value",
                                unknown.join(", ")
                            ));
                        }
                        Ok(scope)
                    })
                    .transpose()?;
                Ok(self.config.apply(pc_id, key, revision, value) == Applied::Changed)
            }
            _ => {
                let value = text
                    .map(|t| AssignmentScope::from_json(t.as_bytes()))
                    .transpose()?;
                Ok(self.assignments.apply(pc_id, key, revision, value) == Applied::Changed)
            }
        }
    }

    /// The revision applied for a key, to tell whether a read brought something new.
    fn revision_of(&self, bucket: &str, key: &str) -> u64 {
        let name = id(bucket, key);
        let refused = self.refused.get(&name).map_or(0, |r| r.revision);
        let good = self.good.get(&name).map_or(0, |g| g.revision);
        refused.max(good)
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
        let mut rollouts = BTreeMap::new();
        let modules = opts.assignments.then(|| {
            let layers = &self.assignments;
            let resolved = assignment::resolve(
                layers.global.as_ref(),
                layers.groups_of(&self.groups),
                layers.pc.as_ref(),
                assignment::Agent {
                    pc_id: &opts.pc_id,
                    groups: &self.groups,
                },
            );
            conflicts.extend(
                resolved
                    .conflicts
                    .iter()
                    .map(|c| format!("{ASSIGNMENTS_BUCKET}: {c} (the last group wins)")),
            );
            rollouts = resolved.rollouts;
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
            rollouts,
            groups: self.groups.clone(),
            refused: self.refused.clone(),
            last_good: self.good.clone(),
        }
    }
}

/// Exponential backoff between attempts.
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

/// Why a key could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// No server answered: the bucket does not exist (yet), or allows no direct gets.
    NoBucket,
    /// Anything else (a timeout, an error status).
    Failed(String),
}

/// Reads a key with a direct get by subject, the one read an agent's credential allows.
pub(crate) async fn read_key(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
) -> Result<Read, ReadError> {
    let stream = js
        .get_stream_no_info(format!("KV_{bucket}"))
        .await
        .map_err(|e| ReadError::Failed(e.to_string()))?;
    match stream
        .direct_get_last_for_subject(format!("$KV.{bucket}.{key}"))
        .await
    {
        Ok(message) => {
            let operation = message
                .headers
                .get("KV-Operation")
                .map(|v| v.as_str().to_string());
            let deleted = matches!(operation.as_deref(), Some("DEL" | "PURGE"));
            Ok(Read {
                revision: message.sequence,
                value: (!deleted).then_some(message.payload),
            })
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(Read {
            revision: 0,
            value: None,
        }),
        Err(e) if e.kind() == DirectGetErrorKind::Request => Err(ReadError::NoBucket),
        Err(e) => Err(ReadError::Failed(e.to_string())),
    }
}

/// The buckets followed.
fn buckets(opts: &WatchOptions) -> Vec<&'static str> {
    let mut out = vec![GROUPS_BUCKET];
    if opts.config {
        out.push(CONFIG_BUCKET);
    }
    if opts.assignments {
        out.push(ASSIGNMENTS_BUCKET);
    }
    out
}

/// The put subjects of the keys followed: the PC's membership, and in each settings
/// bucket the fleet's key, every group's (filtered on arrival) and the PC's own.
fn notice_subjects(opts: &WatchOptions) -> Vec<String> {
    let mut out = vec![format!("$KV.{GROUPS_BUCKET}.{}", opts.pc_id)];
    for bucket in buckets(opts).into_iter().skip(1) {
        out.push(format!("$KV.{bucket}.{}", Scope::Global.key()));
        out.push(format!("$KV.{bucket}.groups.>"));
        out.push(format!("$KV.{bucket}.{}", Scope::Pc(&opts.pc_id).key()));
    }
    out
}

/// Reads every key of this PC, membership first (it decides which keys apply), into a
/// fresh state that starts from `prev`'s last good values. Buckets that do not answer
/// count as empty, except the gate (the assignments, or the settings when only they are
/// followed): until it answers nothing is known, and no view is given (an empty one
/// would stop every module).
async fn snapshot(
    js: &jetstream::Context,
    opts: &WatchOptions,
    prev: &State,
    missing: &mut BTreeSet<&'static str>,
) -> Result<State, String> {
    let pc_id = &opts.pc_id;
    let mut fresh = State::fresh_from(prev);
    missing.clear();
    let gate = if opts.assignments {
        ASSIGNMENTS_BUCKET
    } else {
        CONFIG_BUCKET
    };
    let read = async |bucket: &'static str, key: &str, missing: &mut BTreeSet<&'static str>| {
        match read_key(js, bucket, key).await {
            Ok(r) => Ok(Some(r)),
            Err(ReadError::NoBucket) if bucket != gate => {
                missing.insert(bucket);
                Ok(None)
            }
            Err(ReadError::NoBucket) => Err(format!(
                "no server answered a direct get on {bucket}: the bucket is missing (an operator creates it with `collector fleet init`) or made without direct gets (`collector fleet init` turns them on)"
            )),
            Err(ReadError::Failed(e)) => Err(format!("cannot read {bucket} key {key}: {e}")),
        }
    };
    if let Some(r) = read(GROUPS_BUCKET, pc_id, missing).await? {
        fresh.apply(pc_id, GROUPS_BUCKET, pc_id, &r);
    }
    for key in keys_for(pc_id, &fresh.groups) {
        for bucket in buckets(opts).into_iter().skip(1) {
            if let Some(r) = read(bucket, &key, missing).await? {
                fresh.apply(pc_id, bucket, &key, &r);
            }
        }
    }
    // A key no longer followed (a group left) keeps no last good value.
    let followed: BTreeSet<String> = keys_for(pc_id, &fresh.groups)
        .iter()
        .flat_map(|k| buckets(opts).into_iter().skip(1).map(move |b| id(b, k)))
        .chain([id(GROUPS_BUCKET, pc_id)])
        .collect();
    fresh.good.retain(|k, _| followed.contains(k));
    fresh.refused.retain(|k, _| followed.contains(k));
    Ok(fresh)
}

/// The bucket and key a notice's subject names, when it is one this PC follows.
fn noticed<'a>(
    subject: &'a str,
    opts: &WatchOptions,
    groups: &[String],
) -> Option<(&'static str, &'a str)> {
    let rest = subject.strip_prefix("$KV.")?;
    let (bucket, key) = rest.split_once('.')?;
    let bucket = buckets(opts).into_iter().find(|b| *b == bucket)?;
    let ours = if bucket == GROUPS_BUCKET {
        key == opts.pc_id
    } else {
        match Scope::parse(key)? {
            Scope::Global => true,
            Scope::Pc(pc) => pc == opts.pc_id,
            Scope::Group(g) => groups.iter().any(|m| m == g),
        }
    };
    ours.then_some((bucket, key))
}

/// Follows the fleet for `opts.pc_id` until the task is dropped, calling `on_change`
/// with every new view (never twice with the same view).
pub async fn run(
    client: async_nats::Client,
    opts: WatchOptions,
    mut on_change: impl FnMut(FleetView) + Send,
) {
    let js = jetstream::new(client.clone());
    let pc_id = opts.pc_id.clone();
    let mut backoff = Backoff::new(opts.min_backoff, opts.max_backoff);
    let mut state = State {
        good: opts.last_good.clone(),
        ..State::default()
    };
    let mut last: Option<FleetView> = None;
    let mut emit = |state: &mut State, last: &mut Option<FleetView>| {
        let view = state.view(&opts);
        if last.as_ref() != Some(&view) {
            *last = Some(view.clone());
            on_change(view);
        }
    };

    // Notices first, so that no write between them and the first read goes unseen.
    let mut notices = loop {
        let mut subs = Vec::new();
        let mut failed = None;
        for subject in notice_subjects(&opts) {
            match client.subscribe(subject.clone()).await {
                Ok(s) => subs.push(s),
                Err(e) => {
                    failed = Some(format!("{subject}: {e}"));
                    break;
                }
            }
        }
        match failed {
            None => break futures_util::stream::select_all(subs),
            Some(e) => {
                backoff
                    .fail("cannot subscribe to the fleet's notices", e)
                    .await
            }
        }
    };
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "flush after subscribing");
    }

    let mut missing = BTreeSet::new();
    let mut reported_missing = BTreeSet::new();
    let mut connects = client.statistics().connects.load(Ordering::Relaxed);
    let mut full_read_due = Some(Instant::now());
    let mut next_resync = Instant::now() + opts.resync + super::random_below(opts.resync / 2);
    // Keys to read (bucket, key) → how many times read already without news.
    let mut pending: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    let mut pending_due: Option<Instant> = None;
    let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
    reconnect_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if full_read_due.is_some_and(|at| at <= Instant::now()) {
            match snapshot(&js, &opts, &state, &mut missing).await {
                Ok(fresh) => {
                    state = fresh;
                    emit(&mut state, &mut last);
                    backoff.succeeded();
                    full_read_due = None;
                    pending.clear();
                    pending_due = None;
                    next_resync = Instant::now() + opts.resync;
                    if missing != reported_missing {
                        if !missing.is_empty() {
                            tracing::warn!(buckets = ?missing, "fleet buckets missing (or without direct gets): counted as empty, looked for again every {:?}", opts.resync);
                        }
                        reported_missing = missing.clone();
                    }
                }
                Err(e) => {
                    backoff
                        .fail("cannot read the fleet's keys for this PC", e)
                        .await;
                    continue;
                }
            }
        }
        if pending_due.is_some_and(|at| at <= Instant::now()) {
            pending_due = None;
            let keys: Vec<_> = std::mem::take(&mut pending).into_iter().collect();
            let mut groups_changed = false;
            // Everything noticed is read before anything is applied, and the view is
            // given once: writes made together (a pin, then a global change) never show
            // as a state in between that an agent would act on.
            let mut reads = Vec::with_capacity(keys.len());
            for ((bucket, key), tries) in keys {
                match read_key(&js, bucket, &key).await {
                    Ok(read) => reads.push((bucket, key, tries, read)),
                    Err(e) => {
                        tracing::debug!(bucket, key, error = ?e, "cannot read a noticed key; reading everything again");
                        full_read_due = Some(Instant::now());
                    }
                }
            }
            let mut changed = false;
            for (bucket, key, tries, read) in reads {
                let news = read.revision > state.revision_of(bucket, &key);
                changed |= state.apply(&pc_id, bucket, &key, &read);
                if bucket == GROUPS_BUCKET && news {
                    groups_changed = true;
                }
                if !news && tries < REREAD.len() {
                    let at = Instant::now() + REREAD[tries];
                    pending.insert((bucket, key), tries + 1);
                    pending_due = Some(pending_due.map_or(at, |d| d.min(at)));
                }
            }
            // New groups: their keys must be read before the view is given; the full
            // read does it.
            if groups_changed {
                full_read_due = Some(Instant::now());
            }
            if changed && full_read_due.is_none() {
                emit(&mut state, &mut last);
            }
            continue;
        }
        let wake = [full_read_due, pending_due, Some(next_resync)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_resync);
        tokio::select! {
            notice = notices.next() => {
                let Some(notice) = notice else {
                    // The client is gone: nothing more will come.
                    tracing::warn!("the fleet's notices ended; no further changes are followed");
                    std::future::pending::<()>().await;
                    return;
                };
                if let Some((bucket, key)) = noticed(notice.subject.as_str(), &opts, &state.groups) {
                    pending.entry((bucket, key.to_string())).or_insert(0);
                    let at = Instant::now() + SETTLE;
                    pending_due = Some(pending_due.map_or(at, |d| d.min(at)));
                }
            }
            _ = reconnect_check.tick() => {
                let now = client.statistics().connects.load(Ordering::Relaxed);
                if now != connects {
                    connects = now;
                    tracing::info!("reconnected to NATS; reading the fleet's keys again");
                    full_read_due = Some(Instant::now());
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if next_resync <= Instant::now() {
                    full_read_due = Some(Instant::now());
                    next_resync = Instant::now() + opts.resync;
                }
            }
        }
    }
}
