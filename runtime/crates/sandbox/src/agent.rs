//! The agent loop in real time: ticks the guest at the cadence it asks for, feeds it
//! configuration changes, swaps modules at tick boundaries, rolls back a new module that
//! fails its first ticks, and survives anything a guest does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use collector_shared::EffectiveConfig;

use crate::guest::{GuestModule, Supervisor, TickError};
use crate::host::{Datetime, Limits, Services, TickTime};
use crate::ticker::Ticker;
use collector_bundle::grant::Grant;

/// Called once with no argument when a swapped-in module has passed its probation.
pub type HealthyHook = Box<dyn FnOnce() + Send>;
/// Called once with the reason when a swapped-in module is rolled back.
pub type RollbackHook = Box<dyn FnOnce(&str) + Send>;

/// A module ready to take over: compiled and checked, with the grant and limits it runs
/// under. Compilation happens before this is sent, off the tick path.
pub struct ModuleSpec {
    /// The component that takes over.
    pub module: Arc<GuestModule>,
    /// Subjects it may publish to; replaces the running module's grant at the swap.
    pub grant: Grant,
    /// The host limits it runs under; replace the running module's at the swap.
    pub limits: Limits,
    /// How logs name it, for instance `process-perf v3`.
    pub label: String,
    /// Runs once the module has passed its probation ([`AgentOptions::health_ticks`]
    /// ticks without a trap; at once when that is 0).
    pub on_healthy: Option<HealthyHook>,
    /// Runs with the reason when the module fails to start, traps or times out during
    /// its probation and the previous module is restored. Neither hook runs when the
    /// module is replaced before it has proven healthy.
    pub on_rolled_back: Option<RollbackHook>,
}

impl std::fmt::Debug for ModuleSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSpec")
            .field("label", &self.label)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Something the agent loop should react to.
#[derive(Debug)]
pub enum Event {
    /// A new effective configuration.
    Config(Box<EffectiveConfig>),
    /// Replace the running module at the next tick boundary.
    Swap(Box<ModuleSpec>),
    /// Stop after the current tick.
    Shutdown,
}

/// Sends events to a running agent. Cloneable; the agent keeps running (on its last
/// configuration) when every handle is dropped.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    tx: Sender<Event>,
    running: Arc<AtomicBool>,
}

impl AgentHandle {
    /// Delivers a new effective configuration (used from the next tick on).
    pub fn configure(&self, config: EffectiveConfig) {
        let _ = self.tx.send(Event::Config(Box::new(config)));
    }

    /// Hands over a new module; it takes over between two ticks.
    pub fn swap(&self, spec: ModuleSpec) {
        let _ = self.tx.send(Event::Swap(Box::new(spec)));
    }

    /// Whether the agent loop has not finished yet.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Asks the agent to stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
}

/// Where configuration sources deliver: one agent, or the reconciler of several.
pub trait ConfigTarget: Send + 'static {
    /// Delivers a new effective configuration.
    fn configure(&self, config: EffectiveConfig);
    /// Whether deliveries are still wanted (a source stops when this turns false).
    fn is_running(&self) -> bool;
}

impl ConfigTarget for AgentHandle {
    fn configure(&self, config: EffectiveConfig) {
        AgentHandle::configure(self, config);
    }
    fn is_running(&self) -> bool {
        AgentHandle::is_running(self)
    }
}

/// Knobs of the loop itself.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Shortest interval honoured, whatever the guest asks for.
    pub min_interval: Duration,
    /// Ticks a swapped-in module must complete without a trap before it counts as
    /// healthy; a trap before that (or during its start) rolls it back.
    pub health_ticks: u32,
    /// When set, ticks after the first fall on the grid of multiples of the interval
    /// counted from this instant: agents sharing it and a cadence tick together (and
    /// share enumerations). When unset, the phase is the agent's own.
    pub grid_origin: Option<Instant>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            health_ticks: 3,
            grid_origin: None,
        }
    }
}

/// The module to return to if the one on probation fails.
struct Fallback {
    module: Arc<GuestModule>,
    grant: Grant,
    limits: Limits,
    label: String,
    /// Its state when it was swapped out, handed back on rollback.
    state: Option<Vec<u8>>,
    /// Set when it was itself still on probation (a first module): restored, it goes back
    /// on probation and this hook runs once it is healthy.
    on_healthy: Option<HealthyHook>,
}

/// A swapped-in module that has not yet proven itself.
struct Probation {
    ticks_left: u32,
    /// `None` for a first module: there is nothing to return to, so a trap only
    /// restarts its count.
    fallback: Option<Fallback>,
    on_healthy: Option<HealthyHook>,
    on_rolled_back: Option<RollbackHook>,
}

/// A guest under supervision, ticked in real time.
pub struct Agent {
    supervisor: Supervisor,
    label: String,
    options: AgentOptions,
    probation: Option<Probation>,
    events: Receiver<Event>,
    /// Keeps the channel open so that a closed configuration source can never turn
    /// `recv_timeout` into an immediate error, and the loop into a spin.
    _keepalive: Sender<Event>,
    running: Arc<AtomicBool>,
    origin: Instant,
}

/// Marks the agent as finished however `run` ends.
struct RunningGuard(Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Agent {
    /// Wraps a supervisor; returns the agent and a handle to send it events.
    pub fn new(supervisor: Supervisor, options: AgentOptions) -> (Self, AgentHandle) {
        let (tx, events) = mpsc::channel();
        let running = Arc::new(AtomicBool::new(true));
        let agent = Self {
            label: supervisor.module().name().to_string(),
            supervisor,
            options: options.clone(),
            probation: None,
            events,
            _keepalive: tx.clone(),
            running: running.clone(),
            origin: options.grid_origin.unwrap_or_else(Instant::now),
        };
        (agent, AgentHandle { tx, running })
    }

    /// Names the running module in logs (default: the module's name).
    pub fn set_label(&mut self, label: String) {
        self.label = label;
    }

    /// Puts the first module on probation too: `on_healthy` runs once it has completed
    /// the health ticks in a row (a trap restarts the count; there is nothing to roll
    /// back to).
    pub fn on_first_healthy(&mut self, on_healthy: HealthyHook) {
        self.probation = Some(Probation {
            ticks_left: self.options.health_ticks.max(1),
            fallback: None,
            on_healthy: Some(on_healthy),
            on_rolled_back: None,
        });
    }

    /// Runs until [`AgentHandle::shutdown`], starting with `config`. The first tick is
    /// immediate; so is the first tick after the interval changes (the ticker restarts).
    /// Returns the services, with the sink flushed.
    pub fn run(mut self, config: EffectiveConfig) -> Services {
        let _running = RunningGuard(self.running.clone());
        let _ = self.supervisor.configure(&config);
        let mut ticker = Ticker::new(self.origin.elapsed(), self.options.min_interval);
        let period = ticker.period(self.supervisor.interval());
        tracing::info!(module = %self.label, interval = ?period, "agent started");
        loop {
            let wait = ticker.next().saturating_sub(self.origin.elapsed());
            match self.events.recv_timeout(wait) {
                Ok(Event::Config(config)) => {
                    // A trap is logged by the supervisor; the next tick retries.
                    if let Ok(true) = self.supervisor.configure(&config) {
                        self.restart_ticker(&mut ticker, "cadence changed");
                    }
                }
                Ok(Event::Swap(spec)) => {
                    let before = self.supervisor.interval();
                    self.swap(*spec);
                    if self.supervisor.interval() != before {
                        self.restart_ticker(&mut ticker, "new module asks for another cadence");
                    }
                }
                Ok(Event::Shutdown) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let result = self.supervisor.tick(self.now());
                    // A rollback happens here, inside the tick slot: the schedule stays.
                    self.after_tick(result);
                    if self.options.grid_origin.is_some() {
                        ticker.ticked_on_grid(self.origin.elapsed(), self.supervisor.interval());
                    } else {
                        ticker.ticked(self.origin.elapsed(), self.supervisor.interval());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the agent holds a sender"),
            }
        }
        tracing::info!(module = %self.label, "agent stopped");
        let services = self.supervisor.into_services();
        services.sink.flush();
        services
    }

    fn restart_ticker(&self, ticker: &mut Ticker, why: &str) {
        let period = ticker.period(self.supervisor.interval());
        tracing::info!(module = %self.label, interval = ?period, "{why}; ticker restarted");
        ticker.restart(self.origin.elapsed());
    }

    /// Replaces the running module between two ticks, carrying its state over.
    fn swap(&mut self, spec: ModuleSpec) {
        let ModuleSpec {
            module,
            grant,
            limits,
            label,
            on_healthy,
            on_rolled_back,
        } = spec;
        let state = self.supervisor.save_state().ok().flatten();
        let old_module = self.supervisor.swap_module(module);
        let services = self.supervisor.services_mut();
        let old_grant = std::mem::replace(&mut services.grant, grant);
        let old_limits = std::mem::replace(&mut services.limits, limits);
        let old_label = std::mem::replace(&mut self.label, label);
        let replaced = Fallback {
            module: old_module,
            grant: old_grant,
            limits: old_limits,
            label: old_label.clone(),
            state: state.clone(),
            on_healthy: None,
        };
        let fallback = match self.probation.take() {
            // A swapped-in module still on probation is dropped; the healthy module to
            // return to stays the older one. Being replaced is not failing: the module
            // is not marked as rolled back (an operator may assign it again).
            Some(Probation {
                fallback: Some(older),
                ..
            }) => {
                tracing::info!(module = %old_label, "replaced before it proved healthy");
                older
            }
            // A first module still on probation: the best there is to return to, and it
            // keeps its chance to become the last-known-good.
            Some(Probation {
                fallback: None,
                on_healthy,
                ..
            }) => Fallback {
                on_healthy,
                ..replaced
            },
            None => replaced,
        };
        tracing::info!(from = %old_label, to = %self.label, state_bytes = state.as_ref().map_or(0, Vec::len), "swapping modules at a tick boundary");
        self.probation = Some(Probation {
            ticks_left: self.options.health_ticks,
            fallback: Some(fallback),
            on_healthy,
            on_rolled_back,
        });
        match self.supervisor.start(state.as_deref()) {
            Ok(None) => {
                if state.is_some() {
                    tracing::info!(module = %self.label, "state carried over");
                }
            }
            Ok(Some(refusal)) => {
                tracing::info!(module = %self.label, reason = %refusal, "the new module starts fresh, without the predecessor's state");
            }
            Err(fault) => self.roll_back(&format!("failed to start: {fault}")),
        }
        if self.options.health_ticks == 0 {
            self.mark_healthy();
        }
    }

    fn after_tick(&mut self, result: Result<(), TickError>) {
        let Some(probation) = &mut self.probation else {
            return;
        };
        match result {
            Err(TickError::Fault(_)) if probation.fallback.is_none() => {
                probation.ticks_left = self.options.health_ticks.max(1);
            }
            Err(TickError::Fault(fault)) => self.roll_back(&fault.to_string()),
            // A guest-reported error is the guest's business, not a crash.
            Ok(()) | Err(TickError::Guest(_)) => {
                probation.ticks_left = probation.ticks_left.saturating_sub(1);
                if probation.ticks_left == 0 {
                    self.mark_healthy();
                }
            }
        }
    }

    fn mark_healthy(&mut self) {
        if let Some(p) = self.probation.take() {
            tracing::info!(module = %self.label, ticks = self.options.health_ticks, "new module is healthy");
            if let Some(hook) = p.on_healthy {
                hook();
            }
        }
    }

    fn roll_back(&mut self, reason: &str) {
        let Some(p) = self.probation.take() else {
            return;
        };
        let Some(Fallback {
            module,
            grant,
            limits,
            label,
            state,
            on_healthy,
        }) = p.fallback
        else {
            tracing::error!(module = %self.label, reason, "no healthy module to roll back to; it keeps running");
            return;
        };
        tracing::error!(module = %self.label, back_to = %label, reason, "rolling back to the previous module");
        if let Some(hook) = p.on_rolled_back {
            hook(reason);
        }
        self.supervisor.swap_module(module);
        let services = self.supervisor.services_mut();
        services.grant = grant;
        services.limits = limits;
        self.label = label;
        if let Some(hook) = on_healthy {
            // It never completed its own probation: it gets another go.
            self.on_first_healthy(hook);
        }
        if let Err(fault) = self.supervisor.start(state.as_deref()) {
            // It gets the usual fresh-instance retries on the next ticks.
            tracing::error!(module = %self.label, error = %fault, "the previous module failed to restart; retrying on the next tick");
        }
    }

    fn now(&self) -> TickTime {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        TickTime {
            wall: Datetime {
                seconds: i64::try_from(wall.as_secs()).unwrap_or(i64::MAX),
                nanoseconds: wall.subsec_nanos(),
            },
            monotonic: u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }
}
