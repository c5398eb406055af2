//! The agent loop in real time: ticks the guest at the cadence it asks for, feeds it
//! configuration changes, and survives anything the guest does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use collector_shared::EffectiveConfig;

use crate::guest::Supervisor;
use crate::host::{Datetime, Services, TickTime};
use crate::ticker::Ticker;

/// Something the agent loop should react to.
#[derive(Debug)]
pub enum Event {
    /// A new effective configuration.
    Config(Box<EffectiveConfig>),
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

    /// Whether the agent loop has not finished yet.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Asks the agent to stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
}

/// Knobs of the loop itself.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Shortest interval honoured, whatever the guest asks for.
    pub min_interval: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
        }
    }
}

/// A guest under supervision, ticked in real time.
pub struct Agent {
    supervisor: Supervisor,
    options: AgentOptions,
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
            supervisor,
            options,
            events,
            _keepalive: tx.clone(),
            running: running.clone(),
            origin: Instant::now(),
        };
        (agent, AgentHandle { tx, running })
    }

    /// Runs until [`AgentHandle::shutdown`], starting with `config`. The first tick is
    /// immediate; so is the first tick after the interval changes (the ticker restarts).
    /// Returns the services, with the sink flushed.
    pub fn run(mut self, config: EffectiveConfig) -> Services {
        let _running = RunningGuard(self.running.clone());
        let name = self.supervisor.module().name().to_string();
        let _ = self.supervisor.configure(&config);
        let mut ticker = Ticker::new(self.origin.elapsed(), self.options.min_interval);
        let period = ticker.period(self.supervisor.interval());
        tracing::info!(guest = %name, interval = ?period, "agent started");
        loop {
            let wait = ticker.next().saturating_sub(self.origin.elapsed());
            match self.events.recv_timeout(wait) {
                Ok(Event::Config(config)) => {
                    // A trap is logged by the supervisor; the next tick retries.
                    if let Ok(true) = self.supervisor.configure(&config) {
                        let period = ticker.period(self.supervisor.interval());
                        tracing::info!(guest = %name, interval = ?period, "cadence changed; ticker restarted");
                        ticker.restart(self.origin.elapsed());
                    }
                }
                Ok(Event::Shutdown) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.supervisor.tick(self.now());
                    ticker.ticked(self.origin.elapsed(), self.supervisor.interval());
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the agent holds a sender"),
            }
        }
        tracing::info!(guest = %name, "agent stopped");
        let services = self.supervisor.into_services();
        services.sink.flush();
        services
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
