//! The one component that reconciles what is wanted of this PC (the fleet's settings and
//! module assignments, from NATS or from the copy kept in the state directory; or local
//! modules from `--guest`, `--modules` and the last-known-good) with what runs:
//! one agent per module, each on its own thread with its own supervisor, ticker, grant,
//! limits, probation and state. It downloads and checks assigned bundles off every tick
//! path, hands accepted ones to the module's agent (which swaps them in at a tick
//! boundary), hears back from agents on a channel (healthy, rolled back), and keeps the
//! PC's status record and kanade `ObsEvent`s current.
//!
//! One module's trap, hang or rollback touches only that module's agent thread.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use collector_shared::EffectiveConfig;

use crate::{Accepted, Deployer, FleetState, ModuleId, RootOutcome};
use collector_bundle::MAX_BUNDLE_LEN;
use collector_fleet::assignment::Desired;
use collector_fleet::fetch::{self, FetchError};
use collector_fleet::status::{
    AgentStatus, KIND_REFUSED, KIND_REVOKED, KIND_ROLLED_BACK, KIND_TRUST_EXPIRY, KIND_TRUST_ROOT,
    KIND_TRUST_ROOT_REFUSED, KIND_UPDATE, KIND_VALUE_REFUSED, ModuleHealth, ModuleStatus,
    OBS_SOURCE, ObsEvent, Pending, Refusal, RolledBack, RootRefused, TrustStatus,
};
use collector_fleet::watch::FleetView;
use collector_fleet::{MODULES_STORE, STATUS_BUCKET, object_name, obs_subject, random_below};
use collector_sandbox::agent::{Agent, AgentHandle, AgentOptions, ConfigTarget, ModuleSpec};
use collector_sandbox::guest::Supervisor;
use collector_sandbox::host::{HostStats, Services};

/// Knobs of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcilerOptions {
    /// Options of every module's agent loop.
    pub agent: AgentOptions,
    /// A new assignment is fetched after a random delay up to this (spreads a fleet's
    /// downloads); zero fetches at once.
    pub rollout_jitter: Duration,
    /// The status record is rewritten at least this often, and on every change.
    pub status_every: Duration,
    /// Largest bundle downloaded (checked from the object's info first).
    pub max_bundle_len: u64,
    /// Longest a download may take.
    pub fetch_timeout: Duration,
    /// First retry delay of a failed download; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest delay between retries of a failed download.
    pub retry_max: Duration,
    /// How often a refused object is looked at again (replaced objects are retried).
    pub recheck_refused: Duration,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        Self {
            agent: AgentOptions::default(),
            rollout_jitter: Duration::ZERO,
            status_every: Duration::from_secs(60),
            max_bundle_len: MAX_BUNDLE_LEN,
            fetch_timeout: Duration::from_secs(30),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            recheck_refused: Duration::from_secs(60),
        }
    }
}

/// What the reconciler reacts to.
#[derive(Debug)]
pub enum Event {
    /// The fleet's new view of this PC.
    Fleet(Box<FleetView>),
    /// Settings from `--config FILE`.
    Config(Box<EffectiveConfig>),
    /// A local module (from `--modules`) that passed every check and was recorded.
    Offer(Box<Accepted>),
    /// A module completed its probation.
    Healthy(ModuleId),
    /// A module was rolled back.
    RolledBack(ModuleId, String),
    /// Trust root files from the fleet (`source` names where): the deployer follows
    /// them, then the running modules are judged again.
    Roots {
        /// Where they came from, for messages.
        source: String,
        /// The root files.
        roots: Vec<Vec<u8>>,
    },
    /// Roots the `--modules` watcher offered the deployer, and what came of it.
    RootsOffered(RootOutcome),
    /// Stop every module and return.
    Shutdown,
}

/// Sends events to a running reconciler. Cloneable.
#[derive(Debug, Clone)]
pub struct ReconcilerHandle {
    tx: Sender<Event>,
    running: Arc<AtomicBool>,
}

impl ReconcilerHandle {
    /// Delivers the fleet's new view.
    pub fn fleet(&self, view: FleetView) {
        let _ = self.tx.send(Event::Fleet(Box::new(view)));
    }

    /// Delivers trust root files read from the fleet.
    pub fn roots(&self, source: String, roots: Vec<Vec<u8>>) {
        let _ = self.tx.send(Event::Roots { source, roots });
    }

    /// Asks every module to stop; [`Reconciler::run`] returns once they have.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
}

impl crate::ModuleTarget for ReconcilerHandle {
    fn offer(&self, accepted: Accepted) {
        let _ = self.tx.send(Event::Offer(Box::new(accepted)));
    }
    fn roots_offered(&self, outcome: RootOutcome) {
        let _ = self.tx.send(Event::RootsOffered(outcome));
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

impl ConfigTarget for ReconcilerHandle {
    fn configure(&self, config: EffectiveConfig) {
        let _ = self.tx.send(Event::Config(Box::new(config)));
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

/// The NATS side, when there is one.
pub struct FleetLink {
    /// Client for downloads, the status record and events.
    pub client: async_nats::Client,
    /// Runtime the client's calls are run on.
    pub runtime: tokio::runtime::Handle,
}

/// Makes the services of a new module's agent (its own counters; the shared process
/// source and sink).
pub type ServicesFactory = Box<dyn Fn() -> Services + Send>;

/// Counters of the reconciler's own work.
#[derive(Debug, Default)]
pub struct ReconcilerStats {
    /// Downloads that failed and were retried.
    pub download_retries: std::sync::atomic::AtomicU64,
    /// Modules handed to an agent (first start or swap).
    pub deployed: std::sync::atomic::AtomicU64,
    /// Bundles refused.
    pub refused: std::sync::atomic::AtomicU64,
    /// Bundles downloaded whole, and the time spent: downloading, verifying and
    /// compiling (or loading from the compile cache), recording the accepted version.
    pub downloads: std::sync::atomic::AtomicU64,
    /// Microseconds spent downloading those bundles.
    pub fetch_micros: std::sync::atomic::AtomicU64,
    /// Microseconds spent verifying and compiling (or loading from the compile cache)
    /// downloaded bundles, refused ones included.
    pub load_micros: std::sync::atomic::AtomicU64,
    /// Microseconds spent recording accepted versions (anti-rollback).
    pub record_micros: std::sync::atomic::AtomicU64,
}

/// Adds the time since `start` to a counter of microseconds.
fn add_micros(counter: &std::sync::atomic::AtomicU64, start: Instant) {
    let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    HostStats::bump(counter, micros);
}

/// A module's agent.
struct Running {
    handle: AgentHandle,
    thread: JoinHandle<()>,
    /// The module the agent runs now (or will after the swap it was sent).
    id: ModuleId,
    /// Its bundle (none for an unsigned component): judged again when the trust root
    /// changes.
    bundle: Option<Arc<Vec<u8>>>,
    /// What a rollback returns to, while `id` is on probation.
    fallback: Option<ModuleId>,
    since: DateTime<Utc>,
    probation: bool,
    stats: Arc<HostStats>,
    /// The module's counters when `id` took over: its health is the difference.
    baseline: Counters,
    /// What the version `id` replaced did over its last stretch.
    previous: Option<ModuleHealth>,
    /// The ticks and traps the last status record showed.
    reported: (u64, u64),
}

/// A module's counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Counters {
    at: Instant,
    ticks: u64,
    traps: u64,
    published: u64,
    refused: u64,
    bytes: u64,
    cpu_us: u64,
    host_cpu_us: u64,
}

impl Counters {
    fn of(stats: &HostStats) -> Self {
        let get = HostStats::get;
        Self {
            at: Instant::now(),
            ticks: get(&stats.ticks),
            traps: get(&stats.traps),
            published: get(&stats.published),
            refused: get(&stats.publish_denied)
                + get(&stats.publish_limited)
                + get(&stats.publish_failed),
            bytes: get(&stats.published_bytes),
            cpu_us: get(&stats.guest_cpu_us),
            host_cpu_us: get(&stats.host_cpu_us),
        }
    }

    /// What happened between `self` and `later`, as the health of `version`.
    fn health_until(&self, later: &Self, version: u64) -> ModuleHealth {
        ModuleHealth {
            version,
            window_ms: u64::try_from(later.at.duration_since(self.at).as_millis())
                .unwrap_or(u64::MAX),
            ticks: later.ticks.saturating_sub(self.ticks),
            traps: later.traps.saturating_sub(self.traps),
            published: later.published.saturating_sub(self.published),
            refused: later.refused.saturating_sub(self.refused),
            bytes: later.bytes.saturating_sub(self.bytes),
            cpu_us: later.cpu_us.saturating_sub(self.cpu_us),
            host_cpu_us: later.host_cpu_us.saturating_sub(self.host_cpu_us),
        }
    }
}

impl Running {
    /// What the version running now did since it took over.
    fn health(&self) -> ModuleHealth {
        self.baseline
            .health_until(&Counters::of(&self.stats), self.id.version)
    }

    /// Another version takes over now: the one running becomes `previous`.
    fn take_over(&mut self, id: ModuleId) {
        let now = Counters::of(&self.stats);
        self.previous = Some(self.baseline.health_until(&now, self.id.version));
        self.baseline = now;
        self.id = id;
        self.since = Utc::now();
    }
}

/// While a version has run fewer ticks than this, its status record is rewritten as its
/// ticks go by (at most once a second), so a rollout's gates judge it without waiting
/// for `--status-interval`.
/// How long before the trust root's expiry the agent warns (status and event).
pub const ROOT_WARN_BEFORE: chrono::TimeDelta = chrono::TimeDelta::days(14);
/// Modules stopped by a revocation kept in the status record.
const REVOKED_KEPT: usize = 8;

const YOUNG_TICKS: u64 = 30;
/// How often the reconciler looks at its modules' counters for a trap or a young
/// version's ticks.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Most modules one agent runs: an assignment naming more starts the first ones by name
/// and reports the rest, so that no assignment makes the agent's work or memory grow
/// with its size.
pub const MAX_MODULES: usize = 64;
/// Most starts (or swaps) of one module within two restart floors.
const RESTART_BURST: usize = 3;
/// Fewest milliseconds between two download attempts, whatever is assigned: with
/// [`MAX_MODULES`] and the retry backoff, this bounds what missing objects cost.
const ATTEMPT_SPACING: Duration = Duration::from_millis(50);

/// An assigned version that does not run yet.
struct Wanted {
    version: u64,
    /// When to try (again); `None`: never (it was rolled back here).
    due: Option<Instant>,
    attempts: u32,
    why: String,
    /// Set when the object was refused: its digest then, so only a replaced object is
    /// tried again.
    refused_digest: Option<Option<String>>,
}

/// Reconciles desired with actual state; see the module documentation.
pub struct Reconciler {
    pc_id: String,
    deployer: Arc<Deployer>,
    options: ReconcilerOptions,
    make_services: ServicesFactory,
    fleet: Option<FleetLink>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    running: Arc<AtomicBool>,
    config: EffectiveConfig,
    config_revision: u64,
    assignment_revision: u64,
    /// What the fleet assigns; `None` until it (or the saved copy) said anything.
    desired: Option<Desired>,
    /// Whether settings come from the fleet (else from `--config` or the defaults).
    fleet_config: bool,
    modules: BTreeMap<String, Running>,
    wanted: BTreeMap<String, Wanted>,
    rolled_back: Vec<RolledBack>,
    revoked: Vec<RolledBack>,
    trust_refused: Option<RootRefused>,
    trust_state: &'static str,
    last_refusal: Option<Refusal>,
    outbox: Vec<ObsEvent>,
    status_dirty: bool,
    /// Whether the status bucket was already made after a write found none.
    tried_status_create: bool,
    /// The fleet's last good values, saved for the next start.
    last_good: BTreeMap<String, collector_fleet::watch::GoodValue>,
    /// Values of the fleet's buckets refused, as the status record shows them.
    refused_values: BTreeMap<String, collector_fleet::watch::RefusedValue>,
    /// Assigned modules past [`MAX_MODULES`], not started.
    over_limit: usize,
    /// The staged rollout in force for each module, as the fleet's view says.
    rollouts: BTreeMap<String, String>,
    /// No download is tried before this.
    next_attempt: Instant,
    /// The last starts (or swaps) of each module, running or recently stopped, by name,
    /// oldest first: at most [`RESTART_BURST`] in any two restart floors.
    starts: BTreeMap<String, [Option<Instant>; RESTART_BURST]>,
    next_status: Instant,
    /// When the modules' counters are looked at next ([`HEALTH_EVERY`]).
    next_health: Instant,
    stats: Arc<ReconcilerStats>,
}

/// Most events kept while NATS is away; older ones are dropped first.
const OUTBOX_LIMIT: usize = 64;
/// Longest the reconciler waits on NATS for a status write or an event.
const NATS_CALL_TIMEOUT: Duration = Duration::from_secs(2);

impl Reconciler {
    /// A reconciler running nothing yet, with `config` in force.
    pub fn new(
        pc_id: &str,
        deployer: Arc<Deployer>,
        options: ReconcilerOptions,
        make_services: ServicesFactory,
        fleet: Option<FleetLink>,
        config: EffectiveConfig,
        fleet_config: bool,
    ) -> (Self, ReconcilerHandle) {
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(AtomicBool::new(true));
        let handle = ReconcilerHandle {
            tx: tx.clone(),
            running: running.clone(),
        };
        let reconciler = Self {
            pc_id: pc_id.to_string(),
            deployer,
            options,
            make_services,
            fleet,
            tx,
            rx,
            running,
            config,
            config_revision: 0,
            assignment_revision: 0,
            desired: None,
            fleet_config,
            modules: BTreeMap::new(),
            wanted: BTreeMap::new(),
            rolled_back: Vec::new(),
            revoked: Vec::new(),
            trust_refused: None,
            trust_state: "ok",
            last_refusal: None,
            outbox: Vec::new(),
            status_dirty: true,
            tried_status_create: false,
            last_good: BTreeMap::new(),
            refused_values: BTreeMap::new(),
            over_limit: 0,
            rollouts: BTreeMap::new(),
            next_attempt: Instant::now(),
            starts: BTreeMap::new(),
            next_status: Instant::now(),
            next_health: Instant::now() + HEALTH_EVERY,
            stats: Arc::new(ReconcilerStats::default()),
        };
        (reconciler, handle)
    }

    /// The reconciler's counters.
    pub fn stats(&self) -> Arc<ReconcilerStats> {
        self.stats.clone()
    }

    /// Starts from what the state directory remembers: the last settings and assignment
    /// from the fleet, and each assigned module's last-known-good version, so that an
    /// agent started while NATS is away runs what it ran before.
    pub fn restore(&mut self, saved: FleetState) {
        self.last_good = saved.last_good.clone();
        if self.fleet_config
            && let Some(config) = saved.config
        {
            tracing::info!(
                revision = saved.config_revision,
                "using the settings saved from the fleet until it answers"
            );
            self.config = config;
            self.config_revision = saved.config_revision;
        }
        let Some(modules) = saved.modules else {
            return;
        };
        self.assignment_revision = saved.assignment_revision;
        for name in modules.keys() {
            match self.deployer.load_last_known_good(Some(name)) {
                Ok(Some(lkg)) => {
                    tracing::info!(module = %lkg.id, "starting with the last-known-good module");
                    self.start(lkg, false);
                }
                Ok(None) => {}
                Err(e) => tracing::error!("the last-known-good module cannot be used: {e}"),
            }
        }
        self.desired = Some(modules);
        self.plan();
    }

    /// Runs until [`ReconcilerHandle::shutdown`]; stops every module before returning.
    pub fn run(mut self) {
        tracing::info!(pc_id = %self.pc_id, "reconciler started");
        loop {
            let now = Instant::now();
            let next = self
                .wanted
                .values()
                .filter_map(|w| w.due.map(|d| d.max(self.next_attempt)))
                .chain([self.next_status, self.next_health])
                .min()
                .unwrap_or(now + self.options.status_every);
            match self.rx.recv_timeout(next.saturating_duration_since(now)) {
                Ok(Event::Shutdown) => break,
                Ok(event) => self.on_event(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the reconciler holds a sender")
                }
            }
            self.deploy_due();
            self.look_at_health();
            self.look_at_trust_expiry();
            self.report();
        }
        self.running.store(false, Ordering::Relaxed);
        for (name, running) in std::mem::take(&mut self.modules) {
            running.handle.shutdown();
            if running.thread.join().is_err() {
                tracing::error!(module = %name, "the module's agent thread panicked");
            }
        }
        self.status_dirty = true;
        self.report();
        tracing::info!("reconciler stopped");
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Fleet(view) => self.on_view(*view),
            Event::Config(config) => self.set_config(*config),
            Event::Offer(accepted) => self.deploy(*accepted),
            Event::Healthy(id) => {
                if let Some(r) = self.modules.get_mut(&id.name)
                    && r.id == id
                {
                    r.probation = false;
                    r.fallback = None;
                    // Its health from here on: a steady state, without the first ticks
                    // of a fresh instance (page faults, caches) or the baseline tick.
                    r.baseline = Counters::of(&r.stats);
                    r.reported = (r.baseline.ticks, r.baseline.traps);
                    self.status_dirty = true;
                }
            }
            Event::RolledBack(id, reason) => self.on_rolled_back(id, reason),
            Event::Roots { source, roots } => {
                let outcome = self.deployer.offer_roots(&source, &roots);
                self.on_roots(outcome);
            }
            Event::RootsOffered(outcome) => self.on_roots(outcome),
            Event::Shutdown => {}
        }
    }

    fn on_view(&mut self, view: FleetView) {
        let mut changed = view.last_good != self.last_good;
        self.last_good = view.last_good;
        for (key, refusal) in &view.refused {
            if self.refused_values.get(key) != Some(refusal) {
                self.value_refused_event(key, refusal);
            }
        }
        self.refused_values = view.refused;
        if let Some(config) = view.config {
            changed |= self.config_revision != view.config_revision;
            self.config_revision = view.config_revision;
            self.set_config(config);
        }
        if view.rollouts != self.rollouts {
            self.rollouts = view.rollouts;
            self.status_dirty = true;
        }
        if let Some(modules) = view.modules {
            changed |= self.assignment_revision != view.assignment_revision
                || self.desired.as_ref() != Some(&modules);
            self.assignment_revision = view.assignment_revision;
            self.desired = Some(modules);
            self.plan();
        }
        if changed {
            self.save();
        }
        self.status_dirty = true;
    }

    /// Hands a changed configuration to every module; an unchanged one to none.
    fn set_config(&mut self, config: EffectiveConfig) {
        if config == self.config {
            return;
        }
        tracing::info!(
            revision = self.config_revision,
            "effective configuration changed; reconfiguring modules"
        );
        for r in self.modules.values() {
            r.handle.configure(config.clone());
        }
        self.config = config;
        self.save();
    }

    fn save(&self) {
        let mut saved = FleetState::new(
            self.fleet_config.then(|| self.config.clone()),
            self.config_revision,
            self.desired.clone(),
            self.assignment_revision,
        );
        saved.last_good = self.last_good.clone();
        if let Some(state) = self.deployer.state()
            && let Err(e) = state.save_fleet_state(&saved)
        {
            tracing::error!(error = %e, "cannot save the fleet's view in the state directory");
        }
    }

    /// Compares desired with actual state: stops unassigned modules, schedules downloads
    /// of assigned versions that do not run.
    fn plan(&mut self) {
        let Some(mut desired) = self.desired.clone() else {
            return;
        };
        // The first MAX_MODULES by name; the rest are counted, not tracked.
        let over = desired.len().saturating_sub(MAX_MODULES);
        if over != self.over_limit {
            if over > 0 {
                tracing::warn!(
                    assigned = desired.len(),
                    "more modules assigned than the {MAX_MODULES} an agent runs; {over} not started"
                );
            }
            self.over_limit = over;
            self.status_dirty = true;
        }
        if over > 0 {
            desired = desired.into_iter().take(MAX_MODULES).collect();
        }
        let unassigned: Vec<String> = self
            .modules
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        // Starts are remembered for a while after a stop, so that an assignment that
        // comes and goes does not restart a module faster than the floor either.
        let floor = self.restart_floor();
        let modules = &self.modules;
        self.starts.retain(|name, starts| {
            modules.contains_key(name)
                || starts[RESTART_BURST - 1].is_some_and(|at| at.elapsed() < floor * 2)
        });
        for name in unassigned {
            let r = self.modules.remove(&name).expect("listed");
            tracing::info!(module = %r.id, "no longer assigned; stopping it");
            r.handle.shutdown();
            if r.thread.join().is_err() {
                tracing::error!(module = %name, "the module's agent thread panicked");
            }
            self.event(
                KIND_UPDATE,
                &name,
                r.id.version,
                [
                    ("from", r.id.version.into()),
                    ("to", serde_json::Value::Null),
                ],
            );
            self.status_dirty = true;
        }
        self.wanted
            .retain(|name, w| desired.get(name) == Some(&w.version));
        for (name, &version) in &desired {
            if self
                .modules
                .get(name)
                .is_some_and(|r| r.id.version == version)
            {
                self.wanted.remove(name);
                continue;
            }
            if self.wanted.contains_key(name) {
                continue;
            }
            let jitter = random_below(self.options.rollout_jitter);
            // A module starts or changes version at most three times in two tick
            // intervals (and two seconds): a rollout, or a rollback, right after a start
            // goes at once, while an assignment flipping back and forth restarts a module
            // no more than one and a half times per interval.
            let floor = self.restart_allowed_at(name);
            let due = (Instant::now() + jitter).max(floor);
            tracing::info!(module = %name, version, ?jitter, "assigned; fetching it");
            self.wanted.insert(
                name.clone(),
                Wanted {
                    version,
                    due: Some(due),
                    attempts: 0,
                    why: "waiting to download".into(),
                    refused_digest: None,
                },
            );
            self.status_dirty = true;
        }
    }

    /// The restart floor: a module's tick interval, and at least a second. A module
    /// starts (or swaps) at most [`RESTART_BURST`] times within two floors.
    fn restart_floor(&self) -> Duration {
        self.config.host_perf_duration().max(Duration::from_secs(1))
    }

    /// When `name` may next start or swap: now, unless it did [`RESTART_BURST`] times
    /// within two floors.
    fn restart_allowed_at(&self, name: &str) -> Instant {
        match self.starts.get(name).and_then(|starts| starts[0]) {
            Some(oldest) => (oldest + self.restart_floor() * 2).max(Instant::now()),
            None => Instant::now(),
        }
    }

    fn note_start(&mut self, name: &str) {
        if !self.starts.contains_key(name) && self.starts.len() >= 2 * MAX_MODULES {
            return;
        }
        let slot = self.starts.entry(name.to_string()).or_default();
        slot.rotate_left(1);
        slot[RESTART_BURST - 1] = Some(Instant::now());
    }

    /// Tries the module whose turn came first, one per [`ATTEMPT_SPACING`]: whatever is
    /// assigned, downloads never run back to back.
    fn deploy_due(&mut self) {
        let now = Instant::now();
        if now < self.next_attempt {
            return;
        }
        let due = self
            .wanted
            .iter()
            .filter_map(|(n, w)| w.due.filter(|d| *d <= now).map(|d| (d, n.clone())))
            .min();
        if let Some((_, name)) = due {
            self.try_deploy(&name);
            self.next_attempt = Instant::now() + ATTEMPT_SPACING;
        }
    }

    fn try_deploy(&mut self, name: &str) {
        let Some(w) = self.wanted.get(name) else {
            return;
        };
        let version = w.version;
        let source = format!("{MODULES_STORE}/{}", object_name(name, version));
        let Some(fleet) = &self.fleet else {
            self.retry(name, "no NATS connection".into());
            return;
        };
        if fleet.client.connection_state() != async_nats::connection::State::Connected {
            self.retry(name, "not connected to NATS".into());
            return;
        }
        // The JetStream context spawns a task: it needs the runtime's context.
        let _runtime = fleet.runtime.enter();
        let js = async_nats::jetstream::new(fleet.client.clone());
        if let Some(refused) = &w.refused_digest {
            let now = fleet.runtime.block_on(fetch::digest(&js, name, version));
            if now.as_ref().ok() == Some(refused) || now.is_err() {
                let w = self.wanted.get_mut(name).expect("present");
                w.due = Some(Instant::now() + self.options.recheck_refused);
                return;
            }
            tracing::info!(module = %name, version, "the refused object was replaced; trying it again");
        }
        let started = Instant::now();
        let fetched = fleet.runtime.block_on(fetch::fetch(
            &js,
            name,
            version,
            self.options.max_bundle_len,
            self.options.fetch_timeout,
        ));
        let fetched = match fetched {
            Ok(f) => f,
            Err(FetchError::Unavailable(e)) => {
                self.retry(name, format!("download failed: {e}"));
                return;
            }
            Err(FetchError::Refused(e)) => {
                let digest = fleet
                    .runtime
                    .block_on(fetch::digest(&js, name, version))
                    .ok()
                    .flatten();
                self.refuse(name, version, &source, e, digest);
                return;
            }
        };
        let digest = fetched.digest.clone();
        HostStats::bump(&self.stats.downloads, 1);
        add_micros(&self.stats.fetch_micros, started);
        let started = Instant::now();
        let loaded = self.deployer.load_remote_bundle(&source, fetched.bytes);
        add_micros(&self.stats.load_micros, started);
        let accepted = match loaded {
            Ok(a) => a,
            Err(refused) => {
                self.refuse(name, version, &source, refused.reason, digest);
                return;
            }
        };
        if accepted.id.name != name || accepted.id.version != version {
            let reason = format!("holds {} where {name} v{version} was expected", accepted.id);
            self.refuse(name, version, &source, reason, digest);
            return;
        }
        let started = Instant::now();
        let recorded = self.deployer.record_accepted(&accepted);
        add_micros(&self.stats.record_micros, started);
        if let Err(e) = recorded {
            self.retry(name, format!("cannot record the accepted version: {e}"));
            return;
        }
        self.wanted.remove(name);
        self.deploy(accepted);
    }

    /// Hands an accepted module to its agent: a swap at the next tick boundary, or a new
    /// agent when the module does not run yet.
    fn deploy(&mut self, accepted: Accepted) {
        HostStats::bump(&self.stats.deployed, 1);
        let name = accepted.id.name.clone();
        let to = accepted.id.clone();
        match self.modules.get_mut(&name) {
            Some(r) => {
                let from = r.id.clone();
                tracing::info!(%from, %to, "new module accepted; swapping at the next tick boundary");
                r.bundle = accepted.bundle.clone().map(Arc::new);
                let spec = hooked_spec(&self.deployer, &self.tx, accepted);
                r.handle.swap(spec);
                r.fallback = if r.probation {
                    r.fallback.take().or(Some(from.clone()))
                } else {
                    Some(from.clone())
                };
                r.take_over(to.clone());
                r.probation = true;
                self.note_start(&name);
                self.event(
                    KIND_UPDATE,
                    &name,
                    to.version,
                    [("from", from.version.into()), ("to", to.version.into())],
                );
            }
            None => {
                tracing::info!(module = %to, "new module accepted; starting it");
                self.start(accepted, true);
                self.event(
                    KIND_UPDATE,
                    &name,
                    to.version,
                    [("from", serde_json::Value::Null), ("to", to.version.into())],
                );
            }
        }
        self.status_dirty = true;
    }

    /// Starts an agent thread for a module that does not run yet. `probation`: it
    /// becomes the last-known-good once healthy (false for the last-known-good itself).
    pub fn start(&mut self, accepted: Accepted, probation: bool) {
        let name = accepted.id.name.clone();
        let id = accepted.id.clone();
        self.note_start(&name);
        let mut services = (self.make_services)();
        services.grant = accepted.grant.clone();
        services.limits = accepted.limits.clone();
        let stats = services.stats.clone();
        let bundle = accepted.bundle.clone().map(Arc::new);
        let spec = hooked_spec(&self.deployer, &self.tx, accepted);
        let ModuleSpec {
            module,
            label,
            on_healthy,
            ..
        } = spec;
        let supervisor = Supervisor::new(module, services);
        let (mut agent, handle) = Agent::new(supervisor, self.options.agent.clone());
        let thread_label = label.clone();
        agent.set_label(label);
        if probation && let Some(hook) = on_healthy {
            agent.on_first_healthy(hook);
        }
        let config = self.config.clone();
        let thread = std::thread::Builder::new()
            .name(format!("module-{name}"))
            .spawn(move || {
                let services = agent.run(config);
                let stats = &services.stats;
                tracing::info!(
                    module = %thread_label,
                    ticks = HostStats::get(&stats.ticks),
                    published = HostStats::get(&stats.published),
                    publish_denied = HostStats::get(&stats.publish_denied),
                    publish_failed = HostStats::get(&stats.publish_failed),
                    traps = HostStats::get(&stats.traps),
                    "module summary"
                );
            })
            .expect("spawn a module's agent thread");
        self.modules.insert(
            name,
            Running {
                handle,
                thread,
                id,
                bundle,
                fallback: None,
                since: Utc::now(),
                probation,
                baseline: Counters::of(&stats),
                stats,
                previous: None,
                reported: (0, 0),
            },
        );
        self.status_dirty = true;
    }

    fn on_rolled_back(&mut self, id: ModuleId, reason: String) {
        tracing::warn!(module = %id, reason = %reason, "module rolled back; it will not be tried again here");
        self.rolled_back
            .retain(|r| !(r.name == id.name && r.version == id.version));
        self.rolled_back.push(RolledBack {
            name: id.name.clone(),
            version: id.version,
            reason: reason.clone(),
            at: Utc::now(),
        });
        let mut to = serde_json::Value::Null;
        if let Some(r) = self.modules.get_mut(&id.name)
            && r.id == id
        {
            if let Some(fallback) = r.fallback.take() {
                to = fallback.version.into();
                r.take_over(fallback);
            }
            r.probation = false;
            // The assigned version failed here: do not fetch it again.
            self.wanted.insert(
                id.name.clone(),
                Wanted {
                    version: id.version,
                    due: None,
                    attempts: 0,
                    why: format!("rolled back: {reason}"),
                    refused_digest: None,
                },
            );
        }
        self.event(
            KIND_ROLLED_BACK,
            &id.name,
            id.version,
            [("to", to), ("reason", reason.into())],
        );
        self.status_dirty = true;
    }

    fn retry(&mut self, name: &str, why: String) {
        let (min, max) = (self.options.retry_min, self.options.retry_max);
        let Some(w) = self.wanted.get_mut(name) else {
            return;
        };
        HostStats::bump(&self.stats.download_retries, 1);
        let delay = min.saturating_mul(1u32 << w.attempts.min(16)).min(max);
        w.attempts += 1;
        if w.attempts == 1 {
            tracing::warn!(module = %name, version = w.version, retry_in = ?delay, "{why}");
        } else {
            tracing::debug!(module = %name, version = w.version, retry_in = ?delay, attempts = w.attempts, "{why}");
        }
        w.due = Some(Instant::now() + delay);
        if w.why != why {
            w.why = why;
            self.status_dirty = true;
        }
    }

    fn refuse(
        &mut self,
        name: &str,
        version: u64,
        source: &str,
        reason: String,
        digest: Option<String>,
    ) {
        HostStats::bump(&self.stats.refused, 1);
        tracing::warn!("module refused: {source}: {reason}");
        if let Some(w) = self.wanted.get_mut(name) {
            w.why = format!("refused: {reason}");
            w.refused_digest = Some(digest);
            w.due = Some(Instant::now() + self.options.recheck_refused);
        }
        self.last_refusal = Some(Refusal {
            name: name.to_string(),
            version,
            source: source.to_string(),
            reason: reason.clone(),
            at: Utc::now(),
        });
        self.event(
            KIND_REFUSED,
            name,
            version,
            [("source", source.into()), ("reason", reason.into())],
        );
        self.status_dirty = true;
    }

    /// What came of trust roots offered: a newer root taken judges every running module
    /// again; a refusal is reported (once per reason).
    fn on_roots(&mut self, outcome: RootOutcome) {
        if let Some((from, to)) = outcome.adopted {
            tracing::info!(from, to, "took a newer trust root");
            self.trust_refused = None;
            self.trust_event(KIND_TRUST_ROOT, serde_json::json!({"from": from, "to": to}));
            self.status_dirty = true;
            // A download refused under the old root may pass under this one: at once,
            // not at the next recheck.
            for w in self.wanted.values_mut() {
                if w.refused_digest.take().is_some() {
                    w.due = Some(Instant::now());
                }
            }
            self.look_at_trust_expiry();
            self.judge_running_modules();
        }
        if let Some((version, reason)) = outcome.refused {
            let repeated = self
                .trust_refused
                .as_ref()
                .is_some_and(|r| r.reason == reason);
            if !repeated {
                tracing::warn!("trust root refused: {reason}");
                self.trust_event(
                    KIND_TRUST_ROOT_REFUSED,
                    serde_json::json!({"version": version, "reason": reason}),
                );
                self.trust_refused = Some(RootRefused {
                    version,
                    reason,
                    at: Utc::now(),
                });
                self.status_dirty = true;
            }
        }
    }

    /// Judges every running module under the root held now: one whose bundle is no
    /// longer vouched for (its signer revoked, removed or out of scope) is replaced by the
    /// newest earlier good version that still is, or stopped.
    fn judge_running_modules(&mut self) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        let mut changed = false;
        for name in names {
            let r = &self.modules[&name];
            let Some(bundle) = r.bundle.clone() else {
                continue;
            };
            let Err(reason) = self.deployer.still_trusted(&bundle) else {
                continue;
            };
            let id = r.id.clone();
            let root = self.deployer.trust_version().load(Ordering::Relaxed);
            let reason = format!("not vouched for by trust root version {root}: {reason}");
            tracing::warn!(module = %id, "{reason}; stopping it");
            let replacement = match self.deployer.load_last_known_good(Some(&name)) {
                Ok(Some(good)) if good.id != id => Some(good),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(module = %name, "no earlier good version can replace it: {e}");
                    None
                }
            };
            let to = replacement.as_ref().map(|g| g.id.version);
            match replacement {
                Some(good) => {
                    tracing::info!(module = %good.id, "replacing it with this earlier good version");
                    let r = self.modules.get_mut(&name).expect("listed");
                    r.bundle = good.bundle.clone().map(Arc::new);
                    r.take_over(good.id.clone());
                    r.probation = false;
                    r.fallback = None;
                    // Known good: it starts without probation, like a last-known-good at
                    // start (no hook would make it the last-known-good again).
                    let mut spec = hooked_spec(&self.deployer, &self.tx, good);
                    spec.on_healthy = None;
                    r.handle.swap(spec);
                }
                None => {
                    let r = self.modules.remove(&name).expect("listed");
                    r.handle.shutdown();
                    if r.thread.join().is_err() {
                        tracing::error!(module = %name, "the module's agent thread panicked");
                    }
                }
            }
            self.revoked.push(RolledBack {
                name: name.clone(),
                version: id.version,
                reason: reason.clone(),
                at: Utc::now(),
            });
            if self.revoked.len() > REVOKED_KEPT {
                self.revoked.remove(0);
            }
            self.event(
                KIND_REVOKED,
                &name,
                id.version,
                [
                    ("to", to.map_or(serde_json::Value::Null, Into::into)),
                    ("reason", reason.into()),
                ],
            );
            changed = true;
        }
        if changed {
            self.status_dirty = true;
            // The assigned version may be the one just stopped: it is fetched again, and
            // refused with the reason, which the status shows as pending.
            self.plan();
        }
    }

    /// Every [`HEALTH_EVERY`], with the health: whether the trust root held is close to
    /// its expiry or past it; a change is logged, reported as an event and in the status.
    fn look_at_trust_expiry(&mut self) {
        let Some(expires_at) = self.deployer.trust_root().and_then(|r| r.expires_at()) else {
            return;
        };
        let now = Utc::now();
        let state = if now >= expires_at {
            "expired"
        } else if expires_at - now <= ROOT_WARN_BEFORE {
            "expiring"
        } else {
            "ok"
        };
        if state == self.trust_state {
            return;
        }
        self.trust_state = state;
        self.status_dirty = true;
        let version = self.deployer.trust_version().load(Ordering::Relaxed);
        match state {
            "expired" => tracing::error!(
                version,
                %expires_at,
                "the trust root has expired: no new bundle is accepted until a renewed root arrives (running modules go on)"
            ),
            "expiring" => tracing::warn!(
                version,
                %expires_at,
                "the trust root expires soon: publish a renewed root (`collector trust renew`)"
            ),
            _ => {}
        }
        if state != "ok" {
            self.trust_event(
                KIND_TRUST_EXPIRY,
                serde_json::json!({"version": version, "state": state, "expires_at": expires_at}),
            );
        }
    }

    fn trust_event(&mut self, kind: &str, payload: serde_json::Value) {
        if self.fleet.is_none() {
            return;
        }
        if self.outbox.len() == OUTBOX_LIMIT {
            self.outbox.remove(0);
        }
        self.outbox
            .push(ObsEvent::trust(&self.pc_id, Utc::now(), kind, payload));
    }

    /// Tells kanade's timeline that a value of a fleet bucket was refused.
    fn value_refused_event(&mut self, key: &str, refusal: &collector_fleet::watch::RefusedValue) {
        if self.fleet.is_none() {
            return;
        }
        if self.outbox.len() == OUTBOX_LIMIT {
            self.outbox.remove(0);
        }
        let at = Utc::now();
        self.outbox.push(ObsEvent {
            pc_id: self.pc_id.clone(),
            at,
            kind: KIND_VALUE_REFUSED.into(),
            source: OBS_SOURCE.into(),
            event_record_id: Some(format!(
                "{KIND_VALUE_REFUSED}:{key}:{}:{}",
                refusal.revision,
                at.timestamp_nanos_opt().unwrap_or_default()
            )),
            payload: serde_json::json!({
                "key": key,
                "revision": refusal.revision,
                "reason": refusal.reason,
            }),
        });
    }

    fn event<const N: usize>(
        &mut self,
        kind: &str,
        name: &str,
        version: u64,
        fields: [(&str, serde_json::Value); N],
    ) {
        if self.fleet.is_none() {
            return;
        }
        let payload = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if self.outbox.len() == OUTBOX_LIMIT {
            self.outbox.remove(0);
        }
        self.outbox.push(ObsEvent::module(
            &self.pc_id,
            Utc::now(),
            kind,
            name,
            version,
            payload,
        ));
    }

    /// The status record as of now.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            pc_id: self.pc_id.clone(),
            last_seen: Utc::now(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            modules: self
                .modules
                .values()
                .map(|r| ModuleStatus {
                    name: r.id.name.clone(),
                    version: r.id.version,
                    sha256: r.id.sha256.clone(),
                    since: r.since,
                    probation: r.probation,
                    traps: HostStats::get(&r.stats.traps),
                    health: Some(r.health()),
                    previous: r.previous,
                })
                .collect(),
            rolled_back: self.rolled_back.clone(),
            revoked: self.revoked.clone(),
            trust: self.deployer.trust_root().map(|root| TrustStatus {
                version: root.version(),
                expires_at: root.expires_at(),
                state: self.trust_state.to_string(),
                refused: self.trust_refused.clone(),
            }),
            last_refusal: self.last_refusal.clone(),
            pending: self
                .wanted
                .iter()
                .map(|(name, w)| Pending {
                    name: name.clone(),
                    version: w.version,
                    why: w.why.clone(),
                })
                .collect(),
            refused_values: self.refused_values.clone(),
            over_limit: self.over_limit as u64,
            rollouts: self.rollouts.clone(),
            config_revision: self.config_revision,
            assignment_revision: self.assignment_revision,
        }
    }

    /// Every [`HEALTH_EVERY`]: a module that trapped since the last record, or a young
    /// version that ticked, makes the record due now.
    fn look_at_health(&mut self) {
        let now = Instant::now();
        if now < self.next_health {
            return;
        }
        self.next_health = now + HEALTH_EVERY;
        for r in self.modules.values_mut() {
            let c = Counters::of(&r.stats);
            let young = c.ticks.saturating_sub(r.baseline.ticks) <= YOUNG_TICKS;
            if c.traps != r.reported.1 || (young && c.ticks != r.reported.0) {
                r.reported = (c.ticks, c.traps);
                self.status_dirty = true;
            }
        }
    }

    /// Sends pending events and, when it changed or is due, the status record. Skipped
    /// while NATS is away (the next report catches up).
    fn report(&mut self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let now = Instant::now();
        if fleet.client.connection_state() != async_nats::connection::State::Connected {
            // Looked at again in a second: the loop sleeps until then, never spins.
            self.next_status = now + Duration::from_secs(1).min(self.options.status_every);
            return;
        }
        if !self.outbox.is_empty() {
            let client = fleet.client.clone();
            let subject = obs_subject(&self.pc_id);
            let events = std::mem::take(&mut self.outbox);
            let sent = fleet.runtime.block_on(async {
                tokio::time::timeout(NATS_CALL_TIMEOUT, async {
                    for e in &events {
                        let bytes = serde_json::to_vec(e).expect("events serialize");
                        client
                            .publish(subject.clone(), bytes.into())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    client.flush().await.map_err(|e| e.to_string())
                })
                .await
            });
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("cannot send module events now; keeping them for later");
                self.outbox = events;
            }
        }
        if !self.status_dirty && now < self.next_status {
            return;
        }
        let status = self.status();
        let bytes = serde_json::to_vec(&status).expect("status serializes");
        let _runtime = fleet.runtime.enter();
        let js = async_nats::jetstream::new(fleet.client.clone());
        let pc_id = self.pc_id.clone();
        // A plain JetStream publish onto the record's subject: the agent needs no right
        // to open the bucket (stream info), only to write its own key.
        let tried_create = &mut self.tried_status_create;
        let written = fleet.runtime.block_on(async {
            tokio::time::timeout(NATS_CALL_TIMEOUT, async {
                let subject = format!("$KV.{STATUS_BUCKET}.{pc_id}");
                match put_status(&js, &subject, &bytes).await {
                    Err(e) if !std::mem::replace(tried_create, true) => {
                        // On an open broker without the bucket, the agent makes it, once.
                        let config = async_nats::jetstream::kv::Config {
                            bucket: STATUS_BUCKET.into(),
                            history: 1,
                            ..Default::default()
                        };
                        match js.create_key_value(config).await {
                            Ok(_) => put_status(&js, &subject, &bytes).await,
                            Err(_) => Err(e),
                        }
                    }
                    other => other,
                }
            })
            .await
        });
        match written {
            Ok(Ok(_)) => {
                self.status_dirty = false;
                self.next_status = now + self.options.status_every;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot write the status record to {STATUS_BUCKET} (an operator creates the fleet's buckets with `collector fleet init`)");
                self.next_status = now + Duration::from_secs(5).min(self.options.status_every);
            }
            Err(_) => {
                tracing::debug!("status write timed out");
                self.next_status = now + Duration::from_secs(5).min(self.options.status_every);
            }
        }
    }
}

/// Writes a status record: a JetStream publish onto its key's subject, acknowledged.
async fn put_status(
    js: &async_nats::jetstream::Context,
    subject: &str,
    bytes: &[u8],
) -> Result<(), String> {
    js.publish(subject.to_string(), bytes.to_vec().into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The deployer's spec, with hooks that also tell the reconciler.
fn hooked_spec(deployer: &Arc<Deployer>, tx: &Sender<Event>, accepted: Accepted) -> ModuleSpec {
    let id = accepted.id.clone();
    let mut spec = deployer.spec(accepted);
    let record = spec.on_healthy.take();
    let (healthy_tx, healthy_id) = (tx.clone(), id.clone());
    spec.on_healthy = Some(Box::new(move || {
        if let Some(record) = record {
            record();
        }
        let _ = healthy_tx.send(Event::Healthy(healthy_id));
    }));
    let record = spec.on_rolled_back.take();
    let rolled_tx = tx.clone();
    spec.on_rolled_back = Some(Box::new(move |reason: &str| {
        if let Some(record) = record {
            record(reason);
        }
        let _ = rolled_tx.send(Event::RolledBack(id, reason.to_string()));
    }));
    spec
}
