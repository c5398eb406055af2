//! The wasmtime engine every guest runs on, configured for sandboxing, with the
//! background thread that advances its epoch (the clock behind per-call time budgets).

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use sha2::Digest as _;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use crate::cache::CompileCache;
use crate::host::{self, HostState};

/// How often the epoch advances: the resolution of time budgets.
pub const EPOCH_PERIOD: Duration = Duration::from_millis(10);

/// An engine, the linker of host functions, and the epoch ticker. Cheap to share.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<CompileCache>,
    /// Compiled components shared by every module of this sandbox, when on.
    shared: Option<SharedCompiles>,
    _ticker: EpochTicker,
}

/// Components compiled once for a whole process: the most recent few, by content hash.
/// Agents that load the same bytes at the same moment wait for one compile.
type SharedCompiles = Mutex<Vec<(String, Arc<OnceLock<Result<Component, String>>>)>>;

/// Compiled components kept by [`Sandbox::share_compiled`]: the versions of a rollout
/// and of its rollback.
const SHARED_COMPILES: usize = 4;

impl Sandbox {
    /// A sandbox that compiles every component it loads.
    ///
    /// # Errors
    ///
    /// When the engine cannot be created on this platform.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Self::build(None)
    }

    /// A sandbox that keeps compiled components in `cache_dir` (see [`CompileCache`]).
    ///
    /// # Errors
    ///
    /// When the engine cannot be created or the cache directory cannot be opened.
    pub fn with_cache(cache_dir: &Path) -> anyhow::Result<Arc<Self>> {
        Self::build(Some(cache_dir))
    }

    /// A sandbox for a process that hosts many agents (a fleet simulation): the same
    /// component bytes are compiled (or read from `cache_dir`) once, and every module
    /// loading them shares the compiled code, as separate machines each hold their own.
    ///
    /// # Errors
    ///
    /// As [`Sandbox::with_cache`].
    pub fn share_compiled(cache_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let mut sandbox = Self::build(Some(cache_dir))?;
        Arc::get_mut(&mut sandbox)
            .expect("just built, not shared yet")
            .shared = Some(Mutex::new(Vec::new()));
        Ok(sandbox)
    }

    /// Compiles `bytes`, through the compile cache and the shared compiles when on.
    pub(crate) fn compile(&self, name: &str, bytes: &[u8]) -> Result<Component, String> {
        let Some(shared) = &self.shared else {
            return self.compile_uncached(name, bytes);
        };
        let key = hex::encode(sha2::Sha256::digest(bytes));
        let slot = {
            let mut slots = shared.lock().expect("shared compiles lock");
            match slots.iter().find(|(k, _)| *k == key) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Arc::new(OnceLock::new());
                    if slots.len() == SHARED_COMPILES {
                        slots.remove(0);
                    }
                    slots.push((key, slot.clone()));
                    slot
                }
            }
        };
        slot.get_or_init(|| self.compile_uncached(name, bytes))
            .clone()
    }

    fn compile_uncached(&self, name: &str, bytes: &[u8]) -> Result<Component, String> {
        match &self.cache {
            Some(cache) => {
                let (component, outcome) = cache
                    .load(&self.engine, bytes)
                    .map_err(|e| format!("{e:#}"))?;
                tracing::debug!(guest = name, ?outcome, "compile cache");
                Ok(component)
            }
            None => Component::from_binary(&self.engine, bytes).map_err(|e| format!("{e:#}")),
        }
    }

    fn build(cache_dir: Option<&Path>) -> anyhow::Result<Arc<Self>> {
        // Compiles run on one thread: wasmtime's `parallel-compilation` feature is off on
        // purpose. An endpoint agent should not take every core of its host, compiles
        // happen off the tick path anyway, and one thread keeps the peak RSS of a first
        // start under 25 MB (two threads: ~27 MB, for a compile twice as fast).
        let mut config = Config::new();
        config.wasm_component_model(true);
        // Epochs bound the time of every call at ~10% of guest speed; fuel would cost more.
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
        let linker = host::linker(&engine).map_err(anyhow::Error::from)?;
        let cache = cache_dir
            .map(|dir| {
                CompileCache::open(dir, &engine)
                    .with_context(|| format!("cannot open the compile cache in {}", dir.display()))
            })
            .transpose()?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Arc::new(Self {
            engine,
            linker,
            cache,
            shared: None,
            _ticker: ticker,
        }))
    }

    /// The compile cache, when there is one.
    pub fn cache(&self) -> Option<&CompileCache> {
        self.cache.as_ref()
    }

    /// The wasmtime engine that compiles and runs this sandbox's guests.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Guest calls must hold an [`InCall`] from this gate so that epochs advance.
    pub(crate) fn call_gate(&self) -> CallGate {
        self._ticker.gate.clone()
    }
}

/// Number of epoch ticks that cover `budget` (at least one).
pub(crate) fn ticks_for(budget: Duration) -> u64 {
    let ticks = budget.as_nanos().div_ceil(EPOCH_PERIOD.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// Advances the engine's epoch every [`EPOCH_PERIOD`], but only while some guest call
/// is in progress: between ticks an idle agent has no thread waking up at all.
struct EpochTicker {
    gate: CallGate,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct GateState {
    active: usize,
    /// Whether the ticker thread sleeps on the condvar (only then is a wake-up needed).
    waiting: bool,
    stop: bool,
}

/// Counts guest calls in progress, waking the epoch ticker when the first one starts.
#[derive(Clone, Default)]
pub(crate) struct CallGate(Arc<(Mutex<GateState>, Condvar)>);

/// Held for the duration of a guest call.
pub(crate) struct InCall(CallGate);

impl CallGate {
    /// Marks a guest call as started until the returned guard is dropped.
    pub(crate) fn enter(&self) -> InCall {
        let (lock, wake) = &*self.0;
        let mut state = lock.lock().expect("call gate lock");
        state.active += 1;
        if state.waiting {
            state.waiting = false;
            wake.notify_one();
        }
        InCall(self.clone())
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        let (lock, _) = &*(self.0).0;
        lock.lock().expect("call gate lock").active -= 1;
    }
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let gate = CallGate::default();
        let shared = gate.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                let (lock, wake) = &*shared.0;
                let mut state = lock.lock().expect("call gate lock");
                loop {
                    if state.stop {
                        return;
                    }
                    if state.active == 0 {
                        state.waiting = true;
                        state = wake.wait(state).expect("call gate lock");
                        continue;
                    }
                    drop(state);
                    std::thread::sleep(EPOCH_PERIOD);
                    engine.increment_epoch();
                    state = lock.lock().expect("call gate lock");
                }
            })
            .expect("spawn the epoch ticker thread");
        Self {
            gate,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.gate.0;
        let mut state = lock.lock().expect("call gate lock");
        state.stop = true;
        state.waiting = false;
        drop(state);
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
