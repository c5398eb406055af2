//! The host side of the `collector:api` WIT world: the per-instance store data, the
//! services behind the host functions, and the linker that offers them (plus a
//! capability-free WASI) to guests. One file per WIT interface implementation, each
//! implementing every version of its interface (0.1.0 and 0.2.0) over one body.

mod identity;
pub(crate) mod log;
mod processes;
mod publish;
pub mod settings;
pub(crate) mod wasi;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::sink::Sink;
use crate::source::ProcessSource;
use collector_bundle::grant::{DEFAULT_GRANT, Grant};

/// The bindings of `collector:api@0.1.0`, re-exported at the root of this module.
// The items `bindgen!` generates carry no docs.
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "collector",
        // `names` has no error in its signature: a request over the limit ends the call.
        imports: { "collector:api/processes.names": trappable },
    });
}
pub use bindings::*;

pub use collector::api::types::{Datetime, Level, TickTime};
pub use exports::collector::api::guest::Guest as GuestExports;
pub use wasi::deterministic_random;

/// The bindings of `collector:api@0.2.0` (`wit/v0.2.0`). The root of this module holds
/// those of 0.1.0, which stay as they were so that 0.1.0 guests run unchanged.
// The items `bindgen!` generates here carry no docs.
#[allow(missing_docs)]
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../../../wit/v0.2.0",
        world: "collector",
        // As in 0.1.0: a name list over the limit ends the call.
        imports: { "collector:api/processes.names": trappable },
    });
}

/// Counters of what guests asked of the host. Shared with tests, the mock host and the
/// benchmarks, which assert on them (for instance: an inactive tick enumerates nothing).
#[derive(Debug, Default)]
pub struct HostStats {
    /// Enumerations of every process, made for `processes.sample`.
    pub samples: AtomicU64,
    /// Refreshes of chosen processes, made for `processes.sample-pids` (0.2.0): a few
    /// processes each, so they are not counted in `samples`, but they count towards
    /// [`Limits::max_samples_per_call`] as samples do.
    pub pid_samples: AtomicU64,
    /// Calls to `processes.sample` refused without an enumeration: over the per-call
    /// count or after the call's host time budget was spent.
    pub samples_refused: AtomicU64,
    /// Processes returned by all samples.
    pub processes_sampled: AtomicU64,
    /// Calls to `processes.names`.
    pub name_calls: AtomicU64,
    /// Names returned by all `names` calls.
    pub names_looked_up: AtomicU64,
    /// Messages handed to the sink.
    pub published: AtomicU64,
    /// Bytes of the messages handed to the sink.
    pub published_bytes: AtomicU64,
    /// Publishes refused: subject outside the grant.
    pub publish_denied: AtomicU64,
    /// Publishes refused: too large or over the per-call limit.
    pub publish_limited: AtomicU64,
    /// Publishes the sink failed to take.
    pub publish_failed: AtomicU64,
    /// Log lines written by guests (including their stdout and stderr).
    pub log_lines: AtomicU64,
    /// Guest lines, and host warnings about a guest, dropped over the per-call budget.
    pub log_dropped: AtomicU64,
    /// Saved states dropped for being over `Limits::max_state_bytes`.
    pub states_dropped: AtomicU64,
    /// Ticks run to completion.
    pub ticks: AtomicU64,
    /// Ticks whose guest returned an error (counted in `ticks` too).
    pub tick_errors: AtomicU64,
    /// Calls into the guest that trapped (including timeouts).
    pub traps: AtomicU64,
    /// Instances created.
    pub instantiations: AtomicU64,
    /// CPU time of the calling thread spent running guest code in calls into the guest
    /// (host functions excluded), in microseconds.
    pub guest_cpu_us: AtomicU64,
    /// CPU time of the calling thread spent in host functions on the guest's behalf
    /// (enumerations, name look-ups, publishes), in microseconds. With a
    /// [`crate::source::SharedSource`], an enumeration is paid by the module whose call
    /// made it.
    pub host_cpu_us: AtomicU64,
}

impl HostStats {
    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds `by` to one counter.
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// A request the host refuses by ending the call with a trap, because the function has
/// no way to return an error (see [`Limits::max_names_per_call`]).
#[derive(Debug, thiserror::Error)]
#[error("`{call}` asked for {asked} {what} in one call; the limit is {limit}")]
pub struct OverLimit {
    /// The host function that refused, such as `names`.
    pub call: &'static str,
    /// What was counted, such as `PIDs`.
    pub what: &'static str,
    /// How many the guest asked for.
    pub asked: usize,
    /// The most allowed in one call.
    pub limit: usize,
}

/// Largest table a guest may have (indirect-call tables of real guests hold hundreds).
pub const MAX_TABLE_ELEMENTS: usize = 20_000;

/// Bounds on what a guest may ask of the host. The guest's own memory and time are
/// bounded by `memory_bytes` and `call_budget`; the rest bound the work and memory the
/// host spends on the guest's behalf, so that a hostile guest cannot make the agent
/// around it do what its sandbox forbids.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory of one instance, in bytes.
    pub memory_bytes: usize,
    /// Time a single call into the guest may spend running guest code (time spent in
    /// host functions, such as process enumeration, does not count).
    pub call_budget: Duration,
    /// Time a single call into the guest may make the host spend in host functions
    /// (enumerations, name look-ups, publishes). Once spent, those functions refuse
    /// further work for the rest of the call; a guest that keeps calling then spins on
    /// refusals, which is guest time, and is stopped at `call_budget`.
    pub host_budget: Duration,
    /// Most enumerations (`processes.sample`) per call into the guest; further samples
    /// fail without enumerating.
    pub max_samples_per_call: u32,
    /// Most PIDs in one `processes.names` call; more ends the call with a trap, before
    /// any look-up (a name list cannot be answered in part).
    pub max_names_per_call: usize,
    /// Longest subject `publish` accepts; longer ones are refused as not granted before
    /// they are matched or logged.
    pub max_subject_bytes: usize,
    /// Largest state carried from a module into its successor; a larger one is dropped
    /// with a warning and the successor starts fresh.
    pub max_state_bytes: usize,
    /// Largest payload accepted by `publish`.
    pub max_payload_bytes: usize,
    /// Most publishes accepted per call into the guest.
    pub max_publishes_per_call: u32,
    /// Most log lines accepted per call into the guest; the rest are counted and dropped.
    pub max_log_lines_per_call: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_budget: Duration::from_secs(1),
            host_budget: Duration::from_secs(4),
            max_samples_per_call: 4,
            max_names_per_call: 65_536,
            max_subject_bytes: 256,
            max_state_bytes: 1 << 20,
            max_payload_bytes: 1 << 20,
            max_publishes_per_call: 16,
            max_log_lines_per_call: 200,
        }
    }
}

/// A line a guest logged (through `log` or its stdout/stderr), as kept for the mock host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The level the guest gave; `info` for stdout lines, `warn` for stderr lines.
    pub level: Level,
    /// The text, escaped and cut as in the agent's log.
    pub message: String,
}

/// Where guest log lines are recorded, in addition to the agent's log.
pub type LogBook = Arc<Mutex<Vec<LogLine>>>;

/// What the host functions act on. It outlives instances: after a trap, the next
/// instance gets the same services.
pub struct Services {
    /// Where `processes.sample`, `sample-pids` and `names` read processes.
    pub processes: Box<dyn ProcessSource>,
    /// Where accepted publishes go.
    pub sink: Arc<dyn Sink>,
    /// This machine's id, as `identity.pc-id` returns it to the guest.
    pub pc_id: String,
    /// The subjects `publish` accepts, with `{pc_id}` already bound.
    pub grant: Grant,
    /// Bounds on what the guest may ask of the host.
    pub limits: Limits,
    /// Counters of what the guest asked; clones of the `Arc` see them too.
    pub stats: Arc<HostStats>,
    /// When set, guest log lines are also recorded here.
    pub log_book: Option<LogBook>,
}

impl Services {
    /// Services with the default grant ([`DEFAULT_GRANT`]), default limits, fresh
    /// counters and no log book.
    pub fn new(processes: Box<dyn ProcessSource>, sink: Arc<dyn Sink>, pc_id: &str) -> Self {
        Self {
            processes,
            sink,
            pc_id: pc_id.to_string(),
            // An id that is not a valid subject token gets a grant that allows nothing
            // (the CLI refuses such an id before it gets here).
            grant: Grant::new(&[DEFAULT_GRANT], pc_id).unwrap_or_else(|_| Grant::none()),
            limits: Limits::default(),
            stats: Arc::new(HostStats::default()),
            log_book: None,
        }
    }
}

/// Accounting of the call in progress, for the time budget and per-call limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallState {
    pub started: Instant,
    /// Time spent inside host functions during this call.
    pub in_host: Duration,
    /// The thread's CPU time spent inside host functions during this call.
    pub host_cpu: Duration,
    pub publishes: u32,
    /// Enumerations made during this call.
    pub samples: u32,
}

impl CallState {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            in_host: Duration::ZERO,
            host_cpu: Duration::ZERO,
            publishes: 0,
            samples: 0,
        }
    }

    /// Time spent running guest code so far in this call.
    pub fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.in_host)
    }
}

/// Store data of one guest instance.
pub struct HostState {
    pub(crate) services: Services,
    pub(crate) guest_name: Arc<str>,
    pub(crate) logger: Arc<log::GuestLogger>,
    pub(crate) call: CallState,
    /// The time WASI clocks read (see `wasi.rs`), set before every call.
    pub(crate) clock: TickTime,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
}

impl HostState {
    pub(crate) fn new(
        services: Services,
        guest_name: Arc<str>,
        logger: Arc<log::GuestLogger>,
        wasi: WasiCtx,
    ) -> Self {
        // One linear memory (so the cap is the guest's total), and tables small enough that
        // `table.grow` cannot be used to take memory around the cap.
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(services.limits.memory_bytes)
            .memories(1)
            .instances(16)
            .tables(16)
            .table_elements(MAX_TABLE_ELEMENTS)
            .build();
        Self {
            services,
            guest_name,
            logger,
            call: CallState::new(),
            clock: wasi::BEFORE_FIRST_TICK,
            wasi,
            table: ResourceTable::new(),
            limits,
        }
    }

    /// Starts the accounting of a new call into the guest.
    pub(crate) fn begin_call(&mut self) {
        self.call = CallState::new();
        self.logger
            .begin_call(self.services.limits.max_log_lines_per_call);
    }

    /// Whether this call has spent its host time budget ([`Limits::host_budget`]).
    pub(crate) fn host_budget_spent(&self) -> bool {
        self.call.in_host >= self.services.limits.host_budget
    }

    /// Runs `f` as host work: its time does not count against the guest's budget, but
    /// against the call's host budget.
    pub(crate) fn host_work<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let start = Instant::now();
        let cpu = cpu_time::ThreadTime::try_now().ok();
        let out = f(self);
        self.call.in_host += start.elapsed();
        if let Some(spent) = cpu.and_then(|c| c.try_elapsed().ok()) {
            self.call.host_cpu += spent;
        }
        out
    }

    pub(crate) fn into_services(self) -> Services {
        self.services
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl collector::api::types::Host for HostState {}

impl v0_2::collector::api::types::Host for HostState {}

/// Builds the linker every guest is instantiated with: the `collector:api` imports of
/// every supported version and the capability-free part of WASI (see `wasi.rs`). Sockets
/// and HTTP are not linked at all.
///
/// # Errors
///
/// Only on an internal inconsistency (a name defined twice).
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    Collector::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    v0_2::Collector::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    wasi::add_to_linker(&mut linker)?;
    Ok(linker)
}
