//! A mock host for guest authors: run any guest component with no agent, no broker and no
//! real processes. The process table is scripted, time is virtual (wall and monotonic),
//! configuration changes are scripted (as the fleet's layers: global, groups, PC), module
//! swaps are scripted, and every publish, log line and host call is recorded for
//! assertions.
//!
//! The guest runs in the same sandbox as in production (same linker, limits, traps and
//! ticker), so what passes here behaves the same in the agent.
//!
//! It must not depend on a NATS client (async-nats), the fleet (`collector-fleet`),
//! `collector-deploy`, or the command line (clap, the `collector` crate): guest authors
//! take it as a dev-dependency, and it should bring them no broker client and no CLI.
//! `cargo xtask test` checks this layering.
//!
//! ```no_run
//! use std::time::Duration;
//! use collector_testkit::{MockHost, MockProcess};
//! use collector_shared::ConfigScope;
//!
//! let mut host = MockHost::from_file("target/guests/process-perf.wasm".as_ref())?;
//! host.set_processes(vec![MockProcess::new(1, "init").cpu(2.5).rss(4096)]);
//! host.configure(&ConfigScope { process_perf_enabled: Some(true), ..Default::default() })?;
//! host.tick()?;
//! let sent = host.take_published();
//! assert_eq!(sent[0].subject, "process_perf.test-pc");
//! host.advance(Duration::from_secs(60));
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod json_match;
pub mod scenario;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_shared::config::resolve;
use collector_shared::{ConfigScope, EffectiveConfig};

use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::{GuestFault, GuestModule, NotCarried, Supervisor, TickError};
use collector_sandbox::host::{Datetime, HostStats, LogBook, LogLine, Services, TickTime};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::{Fields, ProcessSource, ProcessTable};
use collector_sandbox::ticker::Ticker;
use collector_shared::scope::Layers;

/// The machine id the mock host reports unless told otherwise.
pub const DEFAULT_PC_ID: &str = "test-pc";

/// Wall-clock start of virtual time unless told otherwise: 2026-01-01T00:00:00Z.
pub fn default_start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).expect("valid timestamp")
}

/// One scripted process.
#[derive(Debug, Clone, PartialEq)]
pub struct MockProcess {
    /// Process id.
    pub pid: u32,
    /// What `processes.names` returns for it.
    pub name: String,
    /// CPU usage, in percent of one core (NaN allowed).
    pub cpu_pct: f32,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    /// Cumulative bytes read from disk.
    pub disk_read_bytes: u64,
    /// Cumulative bytes written to disk.
    pub disk_written_bytes: u64,
    /// The process exits right after the next sample: that sample lists it, a `names`
    /// call after it gets the empty string, and later samples no longer list it.
    pub exits_after_sample: bool,
}

impl MockProcess {
    /// An idle process with no memory and no I/O.
    pub fn new(pid: u32, name: &str) -> Self {
        Self {
            pid,
            name: name.to_string(),
            cpu_pct: 0.0,
            rss_bytes: 0,
            disk_read_bytes: 0,
            disk_written_bytes: 0,
            exits_after_sample: false,
        }
    }

    /// Sets the CPU usage, in percent of one core (NaN allowed).
    pub fn cpu(mut self, pct: f32) -> Self {
        self.cpu_pct = pct;
        self
    }

    /// Sets the resident memory.
    pub fn rss(mut self, bytes: u64) -> Self {
        self.rss_bytes = bytes;
        self
    }

    /// Sets the cumulative disk counters.
    pub fn disk(mut self, read: u64, written: u64) -> Self {
        self.disk_read_bytes = read;
        self.disk_written_bytes = written;
        self
    }

    /// Makes the process exit between the next sample and the name look-up after it.
    pub fn exits_after_sample(mut self) -> Self {
        self.exits_after_sample = true;
        self
    }
}

/// The scripted process table, shared between the mock host and its process source.
#[derive(Debug, Default)]
struct Script {
    processes: Vec<MockProcess>,
    /// While set, every sample fails with this reason.
    sample_failure: Option<String>,
}

/// A [`ProcessSource`] reading the script.
struct ScriptedSource(Arc<Mutex<Script>>);

impl ProcessSource for ScriptedSource {
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
        let mut script = self.0.lock().expect("script lock");
        if let Some(reason) = &script.sample_failure {
            return Err(reason.clone());
        }
        let p = &script.processes;
        let mut table = ProcessTable {
            pids: p.iter().map(|p| p.pid).collect(),
            cpu_pct: p.iter().map(|p| p.cpu_pct).collect(),
            rss_bytes: p.iter().map(|p| p.rss_bytes).collect(),
            disk_read_bytes: p.iter().map(|p| p.disk_read_bytes).collect(),
            disk_written_bytes: p.iter().map(|p| p.disk_written_bytes).collect(),
        };
        table.retain_fields(fields);
        // Gone before the guest can ask for its name: the race every real host has.
        script.processes.retain(|p| !p.exits_after_sample);
        Ok(table)
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        let script = self.0.lock().expect("script lock");
        let names: HashMap<u32, &str> = script
            .processes
            .iter()
            .map(|p| (p.pid, p.name.as_str()))
            .collect();
        pids.iter()
            .map(|pid| names.get(pid).copied().unwrap_or_default().to_string())
            .collect()
    }
}

/// Virtual time: wall clock and monotonic offset.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: DateTime<Utc>,
    mono: Duration,
}

#[derive(Clone)]
struct SharedClock(Arc<Mutex<Clock>>);

impl SharedClock {
    fn get(&self) -> Clock {
        *self.0.lock().expect("clock lock")
    }
}

/// A message the guest published.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Subject it was published on.
    pub subject: String,
    /// Payload bytes, as the guest gave them.
    pub payload: Vec<u8>,
    /// Virtual wall-clock time of the publish.
    pub at: DateTime<Utc>,
}

/// Options of a [`MockHost`].
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Machine id the guest sees (`identity.pc-id`) and that `{pc_id}` stands for in
    /// grants; [`DEFAULT_PC_ID`] by default.
    pub pc_id: String,
    /// Virtual wall-clock time at the start; [`default_start`] by default. Monotonic
    /// time starts at zero.
    pub start: DateTime<Utc>,
    /// Grant patterns; `None` uses the default grant.
    pub grants: Option<Vec<String>>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            pc_id: DEFAULT_PC_ID.into(),
            start: default_start(),
            grants: None,
        }
    }
}

/// A guest component running against scripted processes and virtual time.
pub struct MockHost {
    supervisor: Supervisor,
    script: Arc<Mutex<Script>>,
    clock: SharedClock,
    sink: MemorySink,
    log_book: LogBook,
    pc_id: String,
    /// The configuration as the fleet layers it; `configure` writes the PC's own layer.
    layers: Layers<ConfigScope>,
    groups: Vec<String>,
    /// The resolution of `layers`, handed to the guest.
    config: EffectiveConfig,
    ticker: Ticker,
    /// Publishes already seen by the caller (the sink is drained into here).
    published: Vec<Published>,
    logs_read: usize,
}

impl MockHost {
    /// Loads a guest component from a file with default options.
    ///
    /// # Errors
    ///
    /// When the file cannot be loaded as a guest (see [`GuestModule::from_file`]).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        Self::with_options(path, MockOptions::default())
    }

    /// Loads a guest component from a file.
    ///
    /// # Errors
    ///
    /// When the file cannot be loaded as a guest, or a grant pattern is invalid.
    pub fn with_options(path: &Path, options: MockOptions) -> anyhow::Result<Self> {
        let sandbox = Sandbox::new()?;
        let module = GuestModule::from_file(&sandbox, path)?;
        Self::with_module(Arc::new(module), options)
    }

    /// Runs an already loaded module.
    ///
    /// # Errors
    ///
    /// When a grant pattern is invalid.
    pub fn with_module(module: Arc<GuestModule>, options: MockOptions) -> anyhow::Result<Self> {
        let script = Arc::new(Mutex::new(Script::default()));
        let sink = MemorySink::default();
        let log_book = LogBook::default();
        let mut services = Services::new(
            Box::new(ScriptedSource(script.clone())),
            Arc::new(sink.clone()),
            &options.pc_id,
        );
        if let Some(grants) = &options.grants {
            services.grant = collector_bundle::grant::Grant::new(grants, &options.pc_id)?;
        }
        services.log_book = Some(log_book.clone());
        let clock = SharedClock(Arc::new(Mutex::new(Clock {
            wall: options.start,
            mono: Duration::ZERO,
        })));
        let mut supervisor = Supervisor::new(module, services);
        // Each instance gets its own generators, seeded from its number: a run repeats
        // exactly, and an instance started after a trap does not replay its predecessor.
        let instances = std::sync::atomic::AtomicU64::new(0);
        supervisor.set_wasi_customizer(Arc::new(move |b| {
            let n = instances.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            collector_sandbox::host::deterministic_random(b, n);
        }));
        Ok(Self {
            supervisor,
            script,
            clock,
            sink,
            log_book,
            pc_id: options.pc_id,
            layers: Layers::default(),
            groups: Vec::new(),
            config: EffectiveConfig::default(),
            ticker: Ticker::new(Duration::ZERO, Duration::ZERO),
            published: Vec::new(),
            logs_read: 0,
        })
    }

    /// Replaces the process table.
    pub fn set_processes(&mut self, processes: Vec<MockProcess>) {
        self.script.lock().expect("script lock").processes = processes;
    }

    /// Makes every sample fail with `reason` (`Some`), or succeed again (`None`).
    pub fn set_sample_failing(&mut self, reason: Option<String>) {
        self.script.lock().expect("script lock").sample_failure = reason;
    }

    /// Overlays `scope` on the current effective configuration (it is merged into the
    /// PC's own layer, the last one to resolve) and hands the result to the guest, changed
    /// or not. Returns whether the guest's interval changed (the ticker then restarts, as
    /// in the agent).
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn configure(&mut self, scope: &ConfigScope) -> Result<bool, GuestFault> {
        let pc = self.layers.pc.take().unwrap_or_default();
        self.layers.pc = Some(edit_scope(&pc, |fields| fields.extend(scope_fields(scope))));
        self.config = self.resolved();
        self.hand_over()
    }

    /// Removes `fields` from the PC's own layer (as `collector config unset --pc`), so
    /// that they fall back to the groups, the global layer or the built-in defaults.
    /// Returns whether the effective configuration changed; only then is the guest
    /// configured, as the agent does with the fleet's settings.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn unset(&mut self, fields: &[String]) -> Result<bool, GuestFault> {
        if let Some(pc) = self.layers.pc.take() {
            self.layers.pc = Some(edit_scope(&pc, |map| {
                for f in fields {
                    map.remove(f);
                }
            }));
        }
        self.reconfigure()
    }

    /// Delivers one entry of the fleet's settings bucket, as the agent's watch does:
    /// `value` is the whole new value of the layer `key` (`global`, `groups.<name>` or
    /// `pcs.<pc_id>`), `None` deletes the layer. Another PC's key changes nothing.
    /// Returns whether the effective configuration changed; only then is the guest
    /// configured.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn put_layer(&mut self, key: &str, value: Option<ConfigScope>) -> Result<bool, GuestFault> {
        // Revision 0 skips the replay marks: the mock delivers each entry once, in order.
        self.layers.apply(&self.pc_id, key, 0, value);
        self.reconfigure()
    }

    /// Sets the PC's group memberships (its `agent_groups` value). Returns whether the
    /// effective configuration changed; only then is the guest configured.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn set_groups(&mut self, groups: Vec<String>) -> Result<bool, GuestFault> {
        self.groups = groups;
        self.reconfigure()
    }

    /// Resolves the layers; hands the result over only when it differs from the last one.
    fn reconfigure(&mut self) -> Result<bool, GuestFault> {
        let config = self.resolved();
        if config == self.config {
            return Ok(false);
        }
        self.config = config;
        self.hand_over()?;
        Ok(true)
    }

    fn resolved(&self) -> EffectiveConfig {
        let layers = &self.layers;
        resolve(
            layers.global.as_ref(),
            layers.groups_of(&self.groups),
            layers.pc.as_ref(),
        )
        .config
    }

    /// Gives the guest the current effective configuration; restarts the ticker when
    /// the interval changed.
    fn hand_over(&mut self) -> Result<bool, GuestFault> {
        let changed = self.supervisor.configure(&self.config)?;
        if changed {
            self.ticker.restart(self.clock.get().mono);
        }
        Ok(changed)
    }

    /// The effective configuration the guest was last given.
    pub fn config(&self) -> &EffectiveConfig {
        &self.config
    }

    /// Moves both clocks forward.
    pub fn advance(&mut self, by: Duration) {
        let mut c = self.clock.0.lock().expect("clock lock");
        // Saturates at the end of representable time rather than panicking on a script
        // that advances by centuries.
        c.wall = chrono::Duration::from_std(by)
            .ok()
            .and_then(|d| c.wall.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        c.mono = c.mono.saturating_add(by);
    }

    /// Sets the wall clock (a jump, as after an NTP correction); monotonic time is
    /// unaffected.
    pub fn set_wall(&mut self, wall: DateTime<Utc>) {
        self.clock.0.lock().expect("clock lock").wall = wall;
    }

    /// Virtual wall-clock time now.
    pub fn wall(&self) -> DateTime<Utc> {
        self.clock.get().wall
    }

    /// Virtual monotonic time now.
    pub fn monotonic(&self) -> Duration {
        self.clock.get().mono
    }

    /// Makes the sink refuse (`true`) or accept (`false`) publishes, as a broker outage.
    pub fn set_publish_failing(&mut self, failing: bool) {
        self.sink.set_failing(failing);
    }

    /// One tick now.
    ///
    /// # Errors
    ///
    /// When the guest reports an error or traps.
    pub fn tick(&mut self) -> Result<(), TickError> {
        // As in the agent, a guest is always configured before its first tick.
        if !self.supervisor.is_configured() {
            self.hand_over()?;
        }
        let c = self.clock.get();
        let now = TickTime {
            wall: Datetime {
                seconds: c.wall.timestamp(),
                nanoseconds: c.wall.timestamp_subsec_nanos(),
            },
            monotonic: u64::try_from(c.mono.as_nanos()).unwrap_or(u64::MAX),
        };
        let result = self.supervisor.tick(now);
        self.ticker.ticked(c.mono, self.supervisor.interval());
        self.collect();
        result
    }

    /// Advances virtual time by `span`, ticking whenever the agent's ticker would (the
    /// first tick of a fresh host is due at once).
    /// Returns the number of ticks and the errors they reported.
    pub fn run_for(&mut self, span: Duration) -> (u64, Vec<TickError>) {
        let end = self.monotonic().saturating_add(span);
        let mut ticks = 0;
        let mut errors = Vec::new();
        while self.ticker.next() <= end {
            let due = self.ticker.next();
            let now = self.monotonic();
            if due > now {
                self.advance(due - now);
            }
            ticks += 1;
            if let Err(e) = self.tick() {
                errors.push(e);
            }
        }
        let now = self.monotonic();
        self.advance(end.saturating_sub(now));
        (ticks, errors)
    }

    /// The interval the guest last asked for.
    pub fn interval(&self) -> Option<Duration> {
        self.supervisor.interval()
    }

    /// When the ticker's next tick is due, in virtual monotonic time.
    pub fn next_tick(&self) -> Duration {
        self.ticker.next()
    }

    /// Every publish so far, oldest first.
    pub fn published(&mut self) -> &[Published] {
        self.collect();
        &self.published
    }

    /// Takes the publishes recorded so far.
    pub fn take_published(&mut self) -> Vec<Published> {
        self.collect();
        std::mem::take(&mut self.published)
    }

    /// Every line the guest logged so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.log_book.lock().expect("log book lock").clone()
    }

    /// Lines logged since the previous call.
    pub fn new_logs(&mut self) -> Vec<LogLine> {
        let logs = self.logs();
        let fresh = logs[self.logs_read.min(logs.len())..].to_vec();
        self.logs_read = logs.len();
        fresh
    }

    /// Counters of host calls (samples, name look-ups, publishes, traps...).
    pub fn stats(&self) -> Arc<HostStats> {
        self.supervisor.stats()
    }

    /// The guest's saved state, if it keeps any.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn save_state(&mut self) -> Result<Option<Vec<u8>>, GuestFault> {
        self.supervisor.save_state()
    }

    /// Hands the guest a predecessor's state; returns the guest's refusal, if any.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<Result<(), String>, GuestFault> {
        self.supervisor.restore_state(state)
    }

    /// Replaces the running module between two ticks, as the agent does: the
    /// predecessor's `save-state` goes to the successor's `restore-state`, then the
    /// successor gets the current configuration and is asked for its interval (a new
    /// interval restarts the ticker). Counters, publishes and logs carry on.
    ///
    /// # Errors
    ///
    /// When the successor failed to start (in the agent, a rollback).
    pub fn swap(&mut self, module: Arc<GuestModule>) -> Result<Handoff, GuestFault> {
        self.swap_inner(module, None)
    }

    /// As [`MockHost::swap`], but the successor is handed `state` instead of what the
    /// predecessor saved: a state from a module of another kind, or from an older version.
    ///
    /// # Errors
    ///
    /// When the successor failed to start.
    pub fn swap_with_state(
        &mut self,
        module: Arc<GuestModule>,
        state: Vec<u8>,
    ) -> Result<Handoff, GuestFault> {
        self.swap_inner(module, Some(state))
    }

    fn swap_inner(
        &mut self,
        module: Arc<GuestModule>,
        replacement: Option<Vec<u8>>,
    ) -> Result<Handoff, GuestFault> {
        // The predecessor is asked even when its answer is replaced, as it would be; a
        // trap while saving hands over nothing, as in the agent.
        let saved = self.supervisor.save_state().ok().flatten();
        let state = replacement.or(saved);
        let before = self.supervisor.interval();
        self.supervisor.swap_module(module);
        let not_carried = self.supervisor.start(state.as_deref())?;
        if self.supervisor.interval() != before {
            self.ticker.restart(self.clock.get().mono);
        }
        Ok(match (state, not_carried) {
            (None, _) => Handoff::NoState,
            (Some(state), None) => Handoff::Carried { bytes: state.len() },
            (Some(_), Some(why)) => Handoff::NotCarried(why),
        })
    }

    fn collect(&mut self) {
        let at = self.clock.get().wall;
        self.published.extend(
            self.sink
                .take()
                .into_iter()
                .map(|(subject, payload)| Published {
                    subject,
                    payload,
                    at,
                }),
        );
    }
}

/// What became of the predecessor's state in a swap.
#[derive(Debug, Clone)]
pub enum Handoff {
    /// The predecessor saved nothing (or trapped while saving).
    NoState,
    /// The successor's `restore-state` accepted the state.
    Carried {
        /// Size of the state handed over, in bytes.
        bytes: usize,
    },
    /// The successor started fresh, without the state.
    NotCarried(NotCarried),
}

impl std::fmt::Display for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handoff::NoState => f.write_str("the predecessor saved no state"),
            Handoff::Carried { bytes } => write!(f, "a state of {bytes} bytes was carried over"),
            Handoff::NotCarried(why) => write!(f, "the state was not carried over: {why}"),
        }
    }
}

/// The fields a scope sets, as JSON.
fn scope_fields(scope: &ConfigScope) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(scope) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => unreachable!("a ConfigScope serializes to an object"),
    }
}

/// `scope` with its fields edited as a JSON object; `ConfigScope` has no per-field
/// setter by name, and its serde form is the one the fleet stores.
fn edit_scope(
    scope: &ConfigScope,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> ConfigScope {
    let mut fields = scope_fields(scope);
    edit(&mut fields);
    serde_json::from_value(serde_json::Value::Object(fields))
        .expect("fields of valid scopes make a valid scope")
}
