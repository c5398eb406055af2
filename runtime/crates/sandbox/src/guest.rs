//! Guest modules: loading and checking a component ([`GuestModule`]), and running it
//! safely ([`Supervisor`]): every call under a time budget, traps contained, a fresh
//! instance after any trap.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use collector_shared::EffectiveConfig;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;

use crate::engine::{CallGate, Sandbox, ticks_for};
use crate::host::log::{GuestLogger, MAX_LINE_BYTES, MAX_QUOTED_BYTES, quote};
use crate::host::{Collector, CollectorPre, HostState, HostStats, Services, TickTime, v0_2, wasi};

pub use collector_bundle::wit::{WIT_PACKAGE, WIT_VERSION, WIT_VERSIONS};

/// Interfaces of `collector:api` a guest may import.
const API_IMPORTS: &[&str] = &["types", "processes", "publish", "log", "identity"];

/// Why a module was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file, as given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Fewer than 8 bytes, or they do not start with `\0asm`.
    #[error("not a WebAssembly file (it does not start with the `\\0asm` header)")]
    NotWasm,
    /// A core WebAssembly module (version 1), not a component.
    #[error(
        "this is a core WebAssembly module, not a component: build the guest for \
         wasm32-wasip2 (cargo build --target wasm32-wasip2), or wrap it with \
         `wasm-tools component new`"
    )]
    CoreModule,
    /// A WebAssembly header whose version and layer bytes (given) are neither a core
    /// module's nor a component's.
    #[error("unsupported WebAssembly encoding (version bytes {0:02x?})")]
    UnknownEncoding([u8; 4]),
    /// The component did not compile or could not be linked; wasmtime's message.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something outside `collector:api` and the capability-free
    /// WASI subset (sockets, HTTP...), or an item that is not an interface instance.
    #[error("imports `{import}`, which this host never offers: {reason}")]
    ForbiddenImport {
        /// The import's name as the component spells it, version included.
        import: String,
        /// Why the host does not offer it, worded for the guest's author.
        reason: String,
    },
    /// The component does not export `collector:api/guest` in a version this host
    /// implements; wasmtime's message.
    #[error(
        "does not export `{WIT_PACKAGE}/guest` in a version this host implements \
         ({versions}); guests must target the `collector` world of {WIT_PACKAGE}: {0}",
        versions = WIT_VERSIONS.join(", ")
    )]
    WrongWorld(String),
}

/// The pre-linked component, by the version of `collector:api` it targets.
enum Pre {
    V0_1(CollectorPre<HostState>),
    V0_2(v0_2::CollectorPre<HostState>),
}

/// The instance's exports, by the version of `collector:api` it targets.
enum Bindings {
    V0_1(Collector),
    V0_2(v0_2::Collector),
}

/// A compiled, checked guest component, ready to instantiate any number of times.
pub struct GuestModule {
    name: Arc<str>,
    pre: Pre,
    imports: Vec<String>,
    calls: CallGate,
    /// Keeps the engine's epoch thread alive for as long as the module can run, so a
    /// caller that drops its sandbox does not lose the time budget.
    _sandbox: Arc<Sandbox>,
}

impl GuestModule {
    /// Loads a component from a file; the module is named after the file.
    ///
    /// # Errors
    ///
    /// See [`GuestModule::from_bytes`]; also when the file cannot be read.
    pub fn from_file(sandbox: &Arc<Sandbox>, path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Self::from_bytes(sandbox, &name, &bytes)
    }

    /// Checks, compiles and links a component.
    ///
    /// # Errors
    ///
    /// When the bytes are not a component, import anything the host does not offer
    /// (filesystem, sockets...), or do not export the `collector` world.
    pub fn from_bytes(sandbox: &Arc<Sandbox>, name: &str, bytes: &[u8]) -> Result<Self, LoadError> {
        check_header(bytes)?;
        let component = sandbox.compile(name, bytes).map_err(LoadError::Invalid)?;
        Self::from_component(sandbox, name, &component)
    }

    /// Checks and links an already compiled component.
    ///
    /// # Errors
    ///
    /// As [`GuestModule::from_bytes`], minus the parsing errors.
    pub fn from_component(
        sandbox: &Arc<Sandbox>,
        name: &str,
        component: &Component,
    ) -> Result<Self, LoadError> {
        let imports = check_imports(sandbox, component)?;
        let instance_pre = sandbox
            .linker()
            .instantiate_pre(component)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        // The guest export decides the version; the imports may mix versions (each is
        // linked), which lets a guest move to a new interface one import at a time.
        let exports_v0_2 = component
            .component_type()
            .exports(sandbox.engine())
            .any(|(name, _)| name == format!("{WIT_PACKAGE}/guest@0.2.0"));
        let pre = if exports_v0_2 {
            Pre::V0_2(
                v0_2::CollectorPre::new(instance_pre)
                    .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?,
            )
        } else {
            Pre::V0_1(
                CollectorPre::new(instance_pre)
                    .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?,
            )
        };
        Ok(Self {
            name: name.into(),
            pre,
            imports,
            calls: sandbox.call_gate(),
            _sandbox: sandbox.clone(),
        })
    }

    /// The module's name, used in every log line about it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interfaces the component imports.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// The version of `collector:api` whose `guest` interface the component exports,
    /// such as `0.2.0`: one of [`WIT_VERSIONS`].
    pub fn api_version(&self) -> &'static str {
        match self.pre {
            Pre::V0_1(_) => "0.1.0",
            Pre::V0_2(_) => "0.2.0",
        }
    }

    fn engine(&self) -> &wasmtime::Engine {
        match &self.pre {
            Pre::V0_1(pre) => pre.engine(),
            Pre::V0_2(pre) => pre.engine(),
        }
    }
}

/// Tells a component from a core module or other bytes by its first 8 bytes, without
/// parsing anything else.
pub fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    match [bytes[4], bytes[5], bytes[6], bytes[7]] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        other => Err(LoadError::UnknownEncoding(other)),
    }
}

/// Refuses any import outside `collector:api` and the capability-free WASI subset,
/// before anything is instantiated.
fn check_imports(sandbox: &Sandbox, component: &Component) -> Result<Vec<String>, LoadError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, item) in ty.imports(sandbox.engine()) {
        let unversioned = name.split('@').next().unwrap_or(name);
        let allowed = if let Some(iface) = unversioned.strip_prefix("collector:api/") {
            API_IMPORTS.contains(&iface)
        } else {
            wasi::ALLOWED_WASI.contains(&unversioned)
        };
        if !allowed || !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
            let package = unversioned.split('/').next().unwrap_or_default();
            let reason = match wasi::refusal(package) {
                Some(reason) => reason.to_string(),
                None => format!(
                    "a guest may import only {WIT_PACKAGE}/{{{}}} and the WASI interfaces \
                     io, cli, random, clocks (wall-clock, monotonic-clock) and filesystem \
                     (types, preopens)",
                    API_IMPORTS.join(",")
                ),
            };
            return Err(LoadError::ForbiddenImport {
                import: name.to_string(),
                reason,
            });
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// What went wrong inside a guest call. The instance is gone afterwards; the next call
/// starts a fresh one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuestFault {
    /// The guest trapped.
    #[error("trapped in `{call}`: {message}")]
    Trap {
        /// The guest export that was called: `tick`, `configure`, `interval`,
        /// `save-state` or `restore-state`.
        call: &'static str,
        /// wasmtime's error with its backtrace (which names guest functions), escaped
        /// and cut as a guest log line is.
        message: String,
    },
    /// The call ran guest code for longer than [`Limits::call_budget`].
    ///
    /// [`Limits::call_budget`]: crate::host::Limits::call_budget
    #[error("`{call}` ran longer than its time budget of {budget:?}")]
    Timeout {
        /// The guest export that was called, as in [`GuestFault::Trap`].
        call: &'static str,
        /// The budget it ran out of.
        budget: Duration,
    },
    /// No instance could be created: instantiation failed, trapped or ran out of time,
    /// or the new instance trapped on its configuration. The message is escaped and cut.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// Why a predecessor's state was not carried into a successor; the successor then starts
/// fresh. Typed so that the mock host can tell a guest's refusal from a host limit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotCarried {
    /// The state was larger than the smaller of [`Limits::max_state_bytes`] and a
    /// quarter of the successor's memory.
    ///
    /// [`Limits::max_state_bytes`]: crate::host::Limits::max_state_bytes
    #[error("the state of {bytes} bytes is over the limit of {limit} bytes")]
    OverLimit {
        /// Size of the state.
        bytes: usize,
        /// The limit it was over, in bytes.
        limit: usize,
    },
    /// The successor's `restore-state` returned this error (escaped and cut).
    #[error("it refused it: {0}")]
    Refused(String),
    /// The successor trapped or timed out in `restore-state`; it was started again
    /// without the state.
    #[error("it trapped on it: {0}")]
    Trapped(GuestFault),
}

/// Raised from the epoch callback when a call exhausts its budget.
#[derive(Debug, thiserror::Error)]
#[error("time budget of {0:?} exhausted")]
struct BudgetExhausted(Duration);

/// How a tick went.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TickError {
    /// The guest returned an error; it keeps running. The text is the guest's, escaped
    /// and cut at [`MAX_QUOTED_BYTES`] bytes.
    #[error("guest reported an error: {0}")]
    Guest(String),
    /// The guest trapped or timed out; its instance was discarded.
    #[error(transparent)]
    Fault(#[from] GuestFault),
}

/// Replaces the default WASI clocks or randomness of each new instance (the mock host
/// makes them virtual and deterministic).
pub type WasiCustomizer = Arc<dyn Fn(&mut WasiCtxBuilder) + Send + Sync>;

struct Live {
    store: Store<HostState>,
    bindings: Bindings,
}

enum Slot {
    Live(Box<Live>),
    Idle(Services),
    /// Only while a transition is in progress.
    Empty,
}

/// Runs one guest module: keeps an instance alive, feeds it the configuration, and
/// replaces it with a fresh one after a trap. Never panics because of a guest.
pub struct Supervisor {
    module: Arc<GuestModule>,
    slot: Slot,
    /// The configuration handed to every new instance, as the guest's API version
    /// wants it (JSON text for 0.1.0, a record for 0.2.0).
    config: Option<EffectiveConfig>,
    interval: Option<Duration>,
    wasi: Option<WasiCustomizer>,
    /// What the guest's WASI clocks read: the time of the latest tick.
    now: TickTime,
}

impl Supervisor {
    /// Prepares to run `module` with `services`; the instance is created on first use.
    pub fn new(module: Arc<GuestModule>, services: Services) -> Self {
        Self {
            module,
            slot: Slot::Idle(services),
            config: None,
            interval: None,
            wasi: None,
            now: wasi::BEFORE_FIRST_TICK,
        }
    }

    /// Sets how new instances' WASI context is customized.
    pub fn set_wasi_customizer(&mut self, customizer: WasiCustomizer) {
        self.wasi = Some(customizer);
    }

    /// The module being run.
    pub fn module(&self) -> &Arc<GuestModule> {
        &self.module
    }

    /// The counters shared with the host functions.
    pub fn stats(&self) -> Arc<HostStats> {
        self.services().stats.clone()
    }

    /// The services behind the host functions.
    pub fn services(&self) -> &Services {
        match &self.slot {
            Slot::Live(live) => &live.store.data().services,
            Slot::Idle(services) => services,
            Slot::Empty => unreachable!("slot is only empty during a transition"),
        }
    }

    /// Mutable access to the services, for instance to script the process table.
    pub fn services_mut(&mut self) -> &mut Services {
        match &mut self.slot {
            Slot::Live(live) => &mut live.store.data_mut().services,
            Slot::Idle(services) => services,
            Slot::Empty => unreachable!("slot is only empty during a transition"),
        }
    }

    /// Gives up the module and returns the services (for a successor module).
    pub fn into_services(self) -> Services {
        match self.slot {
            Slot::Live(live) => live.store.into_data().into_services(),
            Slot::Idle(services) => services,
            Slot::Empty => unreachable!("slot is only empty during a transition"),
        }
    }

    /// Whether the guest has been given a configuration.
    pub fn is_configured(&self) -> bool {
        self.config.is_some()
    }

    /// Whether an instance is currently alive.
    pub fn is_live(&self) -> bool {
        matches!(self.slot, Slot::Live(_))
    }

    /// The interval the guest last asked for, if it was asked.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Replaces the module, keeping the services and configuration; the instance of the
    /// old module is dropped. Returns the old module. Call [`Supervisor::start`] next.
    pub fn swap_module(&mut self, module: Arc<GuestModule>) -> Arc<GuestModule> {
        self.discard();
        self.interval = None;
        std::mem::replace(&mut self.module, module)
    }

    /// Starts a fresh instance: hands it `state` from a predecessor (before any
    /// configuration, as the WIT promises), then the configuration, then asks for the
    /// interval. Returns why the state was not carried over, if it was not: the guest
    /// refused it, it was over the limit, or the guest trapped on it.
    ///
    /// A predecessor's state never blocks its successor: a state over
    /// [`Limits::max_state_bytes`](crate::host::Limits::max_state_bytes) (or a quarter of
    /// the successor's memory) is not handed over, and a successor that traps in
    /// `restore-state` is started again, fresh, without it.
    ///
    /// # Errors
    ///
    /// When the new instance fails to start or traps on any of these calls (other than
    /// `restore-state`).
    pub fn start(&mut self, state: Option<&[u8]>) -> Result<Option<NotCarried>, GuestFault> {
        self.discard();
        let limits = &self.services().limits;
        let limit = limits.max_state_bytes.min(limits.memory_bytes / 4);
        let mut not_carried = None;
        let state = state.filter(|state| {
            let fits = state.len() <= limit;
            if !fits {
                not_carried = Some(NotCarried::OverLimit {
                    bytes: state.len(),
                    limit,
                });
            }
            fits
        });
        self.instantiate_idle()?;
        if let Some(state) = state {
            match self.restore_state(state) {
                Ok(Ok(())) => {}
                Ok(Err(refusal)) => not_carried = Some(NotCarried::Refused(refusal)),
                Err(fault) => {
                    // Whatever the state held, the successor deserves its chance without
                    // it; a module that cannot start even fresh fails below.
                    not_carried = Some(NotCarried::Trapped(fault));
                    self.instantiate_idle()?;
                }
            }
        }
        self.push_config()?;
        self.refresh_interval()?;
        Ok(not_carried)
    }

    /// Creates an instance if there is none (without configuring it).
    fn instantiate_idle(&mut self) -> Result<(), GuestFault> {
        if let Slot::Idle(_) = self.slot {
            let Slot::Idle(services) = std::mem::replace(&mut self.slot, Slot::Empty) else {
                unreachable!()
            };
            self.instantiate(services)?;
        }
        Ok(())
    }

    /// Passes a new effective configuration and asks for the interval. Returns whether
    /// the interval changed (the caller then restarts its ticker).
    ///
    /// # Errors
    ///
    /// When the guest trapped; the configuration is still kept for the next instance.
    pub fn configure(&mut self, config: &EffectiveConfig) -> Result<bool, GuestFault> {
        self.config = Some(config.clone());
        if self.is_live() {
            self.push_config()?;
        } else {
            // Instantiation pushes the stored config.
            self.live()?;
        }
        self.refresh_interval()
    }

    /// Runs one tick at `now`, then asks for the interval.
    ///
    /// # Errors
    ///
    /// [`TickError::Guest`] when the guest reported an error, [`TickError::Fault`] when
    /// it trapped (the next call starts a fresh instance).
    pub fn tick(&mut self, now: TickTime) -> Result<(), TickError> {
        self.now = now;
        let result = self.call("tick", |b, s| match b {
            Bindings::V0_1(b) => b.collector_api_guest().call_tick(s, now),
            Bindings::V0_2(b) => b.collector_api_guest().call_tick(
                s,
                v0_2::collector::api::types::TickTime {
                    wall: v0_2::collector::api::types::Datetime {
                        seconds: now.wall.seconds,
                        nanoseconds: now.wall.nanoseconds,
                    },
                    monotonic: now.monotonic,
                },
            ),
        })?;
        let stats = self.stats();
        HostStats::bump(&stats.ticks, 1);
        // The WIT promises the interval is asked after every tick, failed or not.
        self.refresh_interval()?;
        result.map_err(|message| {
            HostStats::bump(&stats.tick_errors, 1);
            let message = quote(&message, MAX_QUOTED_BYTES);
            tracing::warn!(guest = self.module.name(), error = %message, "tick reported an error");
            TickError::Guest(message)
        })
    }

    /// Asks the guest for state to hand to a successor. A state over
    /// [`Limits::max_state_bytes`](crate::host::Limits::max_state_bytes) is dropped with
    /// a warning (`None`): it could make any successor trap on it, and so block every
    /// update.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn save_state(&mut self) -> Result<Option<Vec<u8>>, GuestFault> {
        let state = self.call("save-state", |b, s| match b {
            Bindings::V0_1(b) => b.collector_api_guest().call_save_state(s),
            Bindings::V0_2(b) => b.collector_api_guest().call_save_state(s),
        })?;
        let limit = self.services().limits.max_state_bytes;
        Ok(state.and_then(|state| self.within_state_limit(state, limit)))
    }

    /// `state` if it is at most `limit` bytes; otherwise a warning and `None`.
    fn within_state_limit(&self, state: Vec<u8>, limit: usize) -> Option<Vec<u8>> {
        if state.len() <= limit {
            return Some(state);
        }
        HostStats::bump(&self.services().stats.states_dropped, 1);
        tracing::warn!(
            guest = self.module.name(),
            bytes = state.len(),
            limit,
            "saved state dropped: larger than the limit; the successor starts fresh"
        );
        None
    }

    /// Hands the guest the state of a predecessor. Returns the guest's refusal (escaped
    /// and cut at [`MAX_QUOTED_BYTES`] bytes), if any.
    ///
    /// # Errors
    ///
    /// When the guest trapped.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<Result<(), String>, GuestFault> {
        let result = self.call("restore-state", |b, s| match b {
            Bindings::V0_1(b) => b.collector_api_guest().call_restore_state(s, state),
            Bindings::V0_2(b) => b.collector_api_guest().call_restore_state(s, state),
        })?;
        Ok(result.map_err(|refusal| quote(&refusal, MAX_QUOTED_BYTES)))
    }

    fn refresh_interval(&mut self) -> Result<bool, GuestFault> {
        let ns = self.call("interval", |b, s| match b {
            Bindings::V0_1(b) => b.collector_api_guest().call_interval(s),
            Bindings::V0_2(b) => b.collector_api_guest().call_interval(s),
        })?;
        let interval = Some(Duration::from_nanos(ns));
        let changed = interval != self.interval;
        self.interval = interval;
        Ok(changed)
    }

    fn push_config(&mut self) -> Result<(), GuestFault> {
        let Some(config) = self.config.clone() else {
            return Ok(());
        };
        let result = self.call("configure", |b, s| match b {
            Bindings::V0_1(b) => {
                let json = serde_json::to_string(&config).expect("EffectiveConfig serializes");
                b.collector_api_guest().call_configure(s, &json)
            }
            Bindings::V0_2(b) => b
                .collector_api_guest()
                .call_configure(s, &crate::host::settings::settings(&config)),
        })?;
        if let Err(message) = result {
            let message = quote(&message, MAX_QUOTED_BYTES);
            tracing::warn!(guest = self.module.name(), error = %message, "guest refused the configuration");
        }
        Ok(())
    }

    /// The live instance, creating one (and configuring it) when there is none.
    fn live(&mut self) -> Result<&mut Live, GuestFault> {
        if let Slot::Idle(_) = self.slot {
            let Slot::Idle(services) = std::mem::replace(&mut self.slot, Slot::Empty) else {
                unreachable!()
            };
            self.instantiate(services)?;
            self.push_config()?;
        }
        match &mut self.slot {
            Slot::Live(live) => Ok(live),
            _ => Err(GuestFault::Instantiate(
                "the instance trapped while being configured".into(),
            )),
        }
    }

    /// Creates an instance and puts it in the slot; on failure the slot is idle again.
    fn instantiate(&mut self, services: Services) -> Result<(), GuestFault> {
        let name = self.module.name.clone();
        let logger = Arc::new(GuestLogger::new(
            name.clone(),
            services.log_book.clone(),
            services.stats.clone(),
        ));
        let ctx = wasi::context(&logger, |b| {
            if let Some(customize) = &self.wasi {
                customize(b);
            }
        });
        HostStats::bump(&services.stats.instantiations, 1);
        let engine = self.module.engine();
        let mut store = Store::new(engine, HostState::new(services, name, logger, ctx));
        store.data_mut().clock = self.now;
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            let budget = state.services.limits.call_budget;
            let used = state.call.guest_time();
            if used >= budget {
                Err(wasmtime::Error::new(BudgetExhausted(budget)))
            } else {
                Ok(UpdateDeadline::Continue(ticks_for(budget - used)))
            }
        });
        store.data_mut().begin_call();
        store.set_epoch_deadline(ticks_for(store.data().services.limits.call_budget));
        let in_call = self.module.calls.enter();
        let instance = match &self.module.pre {
            Pre::V0_1(pre) => pre.instantiate(&mut store).map(Bindings::V0_1),
            Pre::V0_2(pre) => pre.instantiate(&mut store).map(Bindings::V0_2),
        };
        drop(in_call);
        report_refused(self.module.name(), "instantiate", &store.data().logger);
        match instance {
            Ok(bindings) => {
                self.slot = Slot::Live(Box::new(Live { store, bindings }));
                Ok(())
            }
            Err(e) => {
                // The message may quote the guest (names from its custom sections).
                let fault = GuestFault::Instantiate(quote(&format!("{e:#}"), MAX_LINE_BYTES));
                let services = store.into_data().into_services();
                HostStats::bump(&services.stats.traps, 1);
                tracing::error!(guest = self.module.name(), error = %fault, "guest failed to start");
                self.slot = Slot::Idle(services);
                Err(fault)
            }
        }
    }

    /// Calls into the guest under the time budget; on a trap, discards the instance.
    fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, GuestFault> {
        let gate = self.module.calls.clone();
        let now = self.now;
        let live = self.live()?;
        let budget = live.store.data().services.limits.call_budget;
        live.store.data_mut().clock = now;
        live.store.data_mut().begin_call();
        live.store.set_epoch_deadline(ticks_for(budget));
        let result = {
            let _in_call = gate.enter();
            let cpu = CallCpu::start();
            let result = f(&live.bindings, &mut live.store);
            cpu.stop(live.store.data());
            result
        };
        let logger = live.store.data().logger.clone();
        report_refused(self.module.name(), call, &logger);
        result.map_err(|e| {
            let fault = if e.downcast_ref::<BudgetExhausted>().is_some() {
                GuestFault::Timeout { call, budget }
            } else {
                // A trap's backtrace holds function names from the guest's name section.
                GuestFault::Trap {
                    call,
                    message: quote(&format!("{e:#}"), MAX_LINE_BYTES),
                }
            };
            self.discard();
            HostStats::bump(&self.services().stats.traps, 1);
            tracing::error!(guest = self.module.name(), error = %fault, "guest instance discarded; a fresh one starts on the next call");
            fault
        })
    }

    fn discard(&mut self) {
        if !matches!(self.slot, Slot::Live(_)) {
            return;
        }
        if let Slot::Live(live) = std::mem::replace(&mut self.slot, Slot::Empty) {
            self.slot = Slot::Idle(live.store.into_data().into_services());
        }
    }
}

/// The calling thread's CPU time over one call into the guest, split into guest code
/// ([`HostStats::guest_cpu_us`]) and host functions ([`HostStats::host_cpu_us`]).
/// Where the platform cannot tell a thread's CPU time, the call is not counted.
struct CallCpu(Option<cpu_time::ThreadTime>);

impl CallCpu {
    fn start() -> Self {
        Self(cpu_time::ThreadTime::try_now().ok())
    }

    fn stop(self, state: &HostState) {
        let Some(spent) = self.0.and_then(|start| start.try_elapsed().ok()) else {
            return;
        };
        let host = state.call.host_cpu;
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let stats = &state.services.stats;
        HostStats::bump(&stats.guest_cpu_us, micros(spent.saturating_sub(host)));
        HostStats::bump(&stats.host_cpu_us, micros(host));
    }
}

/// The one line per call that says what the guest's log budget refused in it.
fn report_refused(guest: &str, call: &'static str, logger: &GuestLogger) {
    if let Some(refused) = logger.refused() {
        tracing::warn!(
            guest,
            call,
            guest_lines = refused.lines,
            host_warnings = refused.warnings,
            "log lines over the per-call limit were dropped"
        );
    }
}

/// The component's imports, with the functions of each imported interface, and whether
/// this host would load it (`module_name` names the module in the refusal), as `collector module
/// inspect` prints them.
///
/// # Errors
///
/// When the bytes are not a component this engine can parse.
pub fn describe_imports(
    sandbox: &Arc<Sandbox>,
    module_name: &str,
    bytes: &[u8],
) -> anyhow::Result<String> {
    check_header(bytes)?;
    let engine = sandbox.engine();
    let component = Component::from_binary(engine, bytes).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mut out = String::from("imports:\n");
    for (name, item) in component.component_type().imports(engine) {
        let detail = match &item.ty {
            ComponentItem::ComponentInstance(instance) => {
                let funcs: Vec<&str> = instance
                    .exports(engine)
                    .filter(|(_, e)| matches!(e.ty, ComponentItem::ComponentFunc(_)))
                    .map(|(n, _)| n)
                    .collect();
                if funcs.is_empty() {
                    "types only".to_string()
                } else {
                    funcs.join(", ")
                }
            }
            ComponentItem::ComponentFunc(_) => "function".to_string(),
            _ => "other item".to_string(),
        };
        let _ = writeln!(out, "  {name}: {detail}");
    }
    match GuestModule::from_component(sandbox, module_name, &component) {
        Ok(_) => out.push_str("this host would load the component\n"),
        Err(e) => {
            let _ = writeln!(out, "this host would refuse the component: {e}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_names_core_modules_and_garbage() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(
            check_header(b"\0asm\x02\0\0\0"),
            Err(LoadError::UnknownEncoding(_))
        ));
    }
}
