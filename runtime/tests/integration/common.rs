//! Shared helpers: locating the built guest, building supervisors, broken WAT guests,
//! starting a throwaway nats-server, and capturing log output.

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use collector_bundle::grant::{DEFAULT_GRANT, Grant};
use collector_bundle::{self as bundle, Bundle, Manifest, SecretKey};
use collector_sandbox::agent::{Agent, AgentHandle, AgentOptions, ModuleSpec};
use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::{GuestModule, Supervisor};
use collector_sandbox::host::{Datetime, HostStats, Limits, Services, TickTime};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::{Fields, ProcessSource, SysinfoSource};
use collector_shared::{EffectiveConfig, ProcessPerf};

pub const PC_ID: &str = "pc-test";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example guest top-memory, built by `cargo xtask test`.
pub fn top_memory_wasm() -> PathBuf {
    let path = std::env::var_os("COLLECTOR_TOP_MEMORY_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/wasm32-wasip2/release/guest_top_memory.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// The default guest as built against `collector:api@0.1.0` (the frozen fixture crate
/// `runtime/tests/fixtures/process-perf-v0.1`), built by `cargo xtask test`.
pub fn guest_v0_1_wasm() -> PathBuf {
    let path = std::env::var_os("COLLECTOR_GUEST_V0_1_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/wasm32-wasip2/guest/guest_process_perf_v0_1.wasm")
        });
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// The default guest component, built by `cargo xtask build-guest` (or `cargo xtask test`).
pub fn guest_wasm() -> PathBuf {
    let path = std::env::var_os("COLLECTOR_GUEST_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/guests/process-perf.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-guest` first, or run the suite with `cargo xtask test`",
        path.display()
    );
    path
}

/// The default guest built with a fault (`trap`, `silent` or `cpu`: see
/// guest-process-perf's features), built by `cargo xtask build-guest --fault KIND` (or
/// `cargo xtask test`).
pub fn fault_wasm(kind: &str) -> PathBuf {
    let var = format!("COLLECTOR_FAULT_{}_WASM", kind.to_uppercase());
    let path = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join(format!("target/guests/process-perf-fault-{kind}.wasm"))
        });
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-guest --fault {kind}` first, or run the suite with `cargo xtask test`",
        path.display()
    );
    path
}

/// One sandbox per test binary: engines are meant to be shared.
pub fn sandbox() -> Arc<Sandbox> {
    static SANDBOX: OnceLock<Arc<Sandbox>> = OnceLock::new();
    SANDBOX.get_or_init(|| Sandbox::new().unwrap()).clone()
}

/// The default guest, compiled once per test binary.
pub fn process_perf_module() -> Arc<GuestModule> {
    static MODULE: OnceLock<Arc<GuestModule>> = OnceLock::new();
    MODULE
        .get_or_init(|| Arc::new(GuestModule::from_file(&sandbox(), &guest_wasm()).unwrap()))
        .clone()
}

pub fn services(source: Box<dyn ProcessSource>, sink: MemorySink, limits: Limits) -> Services {
    let mut services = Services::new(source, Arc::new(sink), PC_ID);
    services.limits = limits;
    services
}

/// The real guest over real sysinfo data, publishing into memory.
pub fn real_supervisor() -> (Supervisor, MemorySink) {
    let sink = MemorySink::default();
    let mut source = SysinfoSource::new().unwrap();
    // A first CPU reading, so that the guest publishes from its first tick (without
    // it, the guest's first tick would only prime the CPU baseline).
    source.sample(Fields::CPU_ONLY).unwrap();
    let source = Box::new(source);
    let sup = Supervisor::new(
        process_perf_module(),
        services(source, sink.clone(), Limits::default()),
    );
    (sup, sink)
}

pub fn enabled(interval: &str, top_n: u32) -> EffectiveConfig {
    EffectiveConfig {
        process_perf_enabled: true,
        host_perf_interval: interval.into(),
        process_perf_top_n: top_n,
        ..Default::default()
    }
}

/// Real clocks, as the agent would read them.
pub fn now(origin: Instant) -> TickTime {
    let wall = chrono::Utc::now();
    TickTime {
        wall: Datetime {
            seconds: wall.timestamp(),
            nanoseconds: wall.timestamp_subsec_nanos(),
        },
        monotonic: origin.elapsed().as_nanos() as u64,
    }
}

/// Decodes every message, checking the subject.
pub fn decode_all(messages: Vec<(String, Vec<u8>)>) -> Vec<ProcessPerf> {
    messages
        .into_iter()
        .map(|(subject, payload)| {
            assert_eq!(subject, format!("process_perf.{PC_ID}"));
            serde_json::from_slice(&payload).unwrap_or_else(|e| {
                panic!(
                    "not a ProcessPerf: {e}: {}",
                    String::from_utf8_lossy(&payload)
                )
            })
        })
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A component implementing the `collector` world whose `tick` body is `tick_body` (WAT
/// instructions that must leave an i32 result-pointer on the stack, or never return).
/// `configure` and `restore-state` succeed, `interval` is 100 ms, `save-state` is none.
pub fn wat_guest(tick_body: &str) -> String {
    wat_guest_with("(i32.const 0)", tick_body)
}

/// As [`wat_guest`], with the body of `configure` too.
pub fn wat_guest_with(configure_body: &str, tick_body: &str) -> String {
    let exports = guest_exports(
        "$i",
        r#"(core memory $i "mem")"#,
        r#"(core func $i "realloc")"#,
    );
    format!(
        r#"(component
  (core module $m
    (memory (export "mem") 1)
    (table $t 1 funcref)
    (global $ticks (mut i32) (i32.const 0))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "configure") (param i32 i32) (result i32) {configure_body})
    (func (export "interval") (result i64) (i64.const 100000000))
    (func (export "tick") (param i64 i32 i64) (result i32)
      (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
      {tick_body})
    (func (export "save-state") (result i32) (i32.const 0))
    (func (export "restore-state") (param i32 i32) (result i32) (i32.const 0))
  )
  (core instance $i (instantiate $m))
{exports}"#
    )
}

/// The component-level half every hand-written 0.1.0 test guest shares: lifts the
/// `guest` exports of core instance `instance` (its `memory` and `realloc`, as WAT
/// references), exports them as `collector:api/guest@0.1.0`, and closes the component.
pub fn guest_exports(instance: &str, memory: &str, realloc: &str) -> String {
    let lift = |name: &str| {
        format!(
            "(canon lift (core func {instance} \"{name}\") (memory {memory}) (realloc {realloc}))"
        )
    };
    format!(
        r#"  (type $datetime (record (field "seconds" s64) (field "nanoseconds" u32)))
  (type $tick-time (record (field "wall" $datetime) (field "monotonic" u64)))
  (func $configure (param "config" string) (result (result (error string)))
    {configure})
  (func $interval (result u64) (canon lift (core func {instance} "interval")))
  (func $tick (param "now" $tick-time) (result (result (error string)))
    {tick})
  (func $save (result (option (list u8)))
    {save})
  (func $restore (param "state" (list u8)) (result (result (error string)))
    {restore})
  (instance $exports
    (export "datetime" (type $datetime))
    (export "tick-time" (type $tick-time))
    (export "configure" (func $configure))
    (export "interval" (func $interval))
    (export "tick" (func $tick))
    (export "save-state" (func $save))
    (export "restore-state" (func $restore)))
  (export "collector:api/guest@0.1.0" (instance $exports)))"#,
        configure = lift("configure"),
        tick = lift("tick"),
        save = lift("save-state"),
        restore = lift("restore-state"),
    )
}

/// Compiles a WAT guest into a module named `name`.
pub fn wat_module(name: &str, wat: &str) -> Arc<GuestModule> {
    let sandbox = sandbox();
    let component = wasmtime::component::Component::new(sandbox.engine(), wat).unwrap();
    Arc::new(GuestModule::from_component(&sandbox, name, &component).unwrap())
}

/// A nats-server with JetStream in a temporary directory on a free loopback port,
/// killed on drop. It can be stopped and started again on the same port and store, as a
/// broker outage would.
pub struct NatsServer {
    child: Option<Child>,
    pub url: String,
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// A config file (`-c`) and the environment it reads secrets from, instead of the
    /// default open server.
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server run from config text `conf`, whose `{{PORT}}` and `{{STORE_DIR}}` are
    /// filled in, with `env` in its environment (for `$VARIABLE` secrets). It logs to
    /// [`NatsServer::log`].
    pub fn start_with_config(conf: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(Some((conf, env)))
    }

    /// What a server started with a config logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn start_with(config: Option<(&str, &[(&str, &str)])>) -> Self {
        let bin = std::env::var_os("COLLECTOR_NATS_SERVER")
            .map(PathBuf::from)
            .or_else(|| {
                let local = workspace().join("target/tools/nats/bin/nats-server");
                local.exists().then_some(local)
            })
            .expect(
                "no nats-server: run the suite with `cargo xtask test`, which installs one, \
                 or set COLLECTOR_NATS_SERVER=/path/to/nats-server (2.10 or newer)",
            );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            bin,
            dir: tempfile::tempdir().unwrap(),
            config: None,
        };
        if let Some((conf, env)) = config {
            let store = server.dir.path().join("jetstream");
            let text = conf
                .replace("{{PORT}}", &port.to_string())
                .replace("{{STORE_DIR}}", store.to_str().unwrap());
            let path = server.dir.path().join("nats-server.conf");
            std::fs::write(&path, text).unwrap();
            let env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            server.config = Some((path, env));
        }
        server.resume();
        server
    }

    /// Restarts a server started with a config on a new config (same placeholders), keeping
    /// its port and store.
    pub fn reconfigure(&mut self, conf: &str) {
        let (path, _) = self
            .config
            .as_ref()
            .expect("a server started with a config");
        let store = self.dir.path().join("jetstream");
        let text = conf
            .replace("{{PORT}}", &self.port.to_string())
            .replace("{{STORE_DIR}}", store.to_str().unwrap());
        std::fs::write(path, text).unwrap();
        self.stop();
        self.resume();
    }

    /// Kills the server (its store stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let mut command = Command::new(&self.bin);
        match &self.config {
            Some((path, env)) => {
                command
                    .arg("-c")
                    .arg(path)
                    .arg("-l")
                    .arg(self.dir.path().join("server.log"))
                    .envs(env.iter().map(|(k, v)| (k, v)));
            }
            None => {
                command
                    .args([
                        "-a",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-js",
                        "-sd",
                    ])
                    .arg(self.dir.path());
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let port = self.port;
        let up = wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "nats-server did not listen on port {port}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `collector run` process with its output read line by line on background threads,
/// killed on drop. `args` come after `run --pc-id pc-test --min-interval 10ms`.
pub struct AgentProcess {
    child: Child,
    pub stdout: Receiver<String>,
    pub stderr: Receiver<String>,
}

impl AgentProcess {
    pub fn start(args: &[&std::ffi::OsStr]) -> Self {
        Self::start_as(PC_ID, args)
    }

    /// As [`AgentProcess::start`], for machine `pc_id`.
    pub fn start_as(pc_id: &str, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["run", "--pc-id", pc_id, "--min-interval", "10ms"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next ProcessPerf line on stdout (within 10 s).
    pub fn next_message(&self) -> ProcessPerf {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "no ProcessPerf line on stdout ({e}); log:\n{}",
                    self.drain_log()
                )
            });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// What is left of the log, for failure messages.
    fn drain_log(&self) -> String {
        let mut out = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            out.push(line);
        }
        out.join("\n")
    }

    /// Skips stdout lines already printed, then waits for a fresh one.
    pub fn fresh_message(&self) -> ProcessPerf {
        while self.stdout.try_recv().is_ok() {}
        self.next_message()
    }

    /// The next log line containing `needle` (within 10 s).
    pub fn stderr_line_containing(&self, needle: &str) -> String {
        loop {
            let line = self
                .stderr
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("no log line containing {needle:?} ({e})"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the agent to stop as a service manager would (SIGTERM) and returns its exit
    /// status, or `None` if it was still running after `limit` (it is then killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) with a pid this test started and has not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops the agent and waits for it.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Makes a FIFO at `path`: opening it for reading blocks until a writer comes.
#[cfg(unix)]
pub fn fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// A deterministic signing key.
pub fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

/// Writes `key`'s public half to `dir/name.pub`.
pub fn write_public(dir: &Path, name: &str, key: &SecretKey) -> PathBuf {
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, key.public_key().to_line()).unwrap();
    path
}

/// A bundle holding exactly these parts, with no consistency check: for crafting bad
/// bundles as an attacker would.
pub fn craft(manifest: &[u8], signers: &[&SecretKey], component: &[u8]) -> Vec<u8> {
    Bundle {
        manifest,
        signatures: signers.iter().map(|k| k.sign(manifest)).collect(),
        component,
    }
    .encode()
    .unwrap()
}

/// A valid bundle of `component`.
pub fn signed(name: &str, version: u64, component: &[u8], signers: &[&SecretKey]) -> Vec<u8> {
    let manifest = Manifest::describe(name, version, component, chrono::Utc::now());
    bundle::sign(&manifest, component, signers).unwrap()
}

/// Puts a file into a watched directory the way a deployment tool should: written
/// beside it under a hidden name, then renamed, so the watcher never sees half a file.
pub fn drop_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// An agent running on its own thread, ticking as often as every 10 ms.
pub struct ThreadAgent {
    pub handle: AgentHandle,
    pub stats: Arc<HostStats>,
    thread: std::thread::JoinHandle<Services>,
}

impl ThreadAgent {
    pub fn spawn(sup: Supervisor, health_ticks: u32, config: EffectiveConfig) -> Self {
        Self::spawn_with(sup, health_ticks, config, |_| {})
    }

    /// As [`ThreadAgent::spawn`], letting `setup` adjust the agent before it runs.
    pub fn spawn_with(
        sup: Supervisor,
        health_ticks: u32,
        config: EffectiveConfig,
        setup: impl FnOnce(&mut Agent),
    ) -> Self {
        let stats = sup.stats();
        let (mut agent, handle) = Agent::new(
            sup,
            AgentOptions {
                min_interval: Duration::from_millis(10),
                health_ticks,
                ..AgentOptions::default()
            },
        );
        setup(&mut agent);
        let thread = std::thread::spawn(move || agent.run(config));
        Self {
            handle,
            stats,
            thread,
        }
    }

    /// Stops the agent; fails the test if the agent panicked.
    pub fn stop(self) {
        self.handle.shutdown();
        self.thread.join().expect("the agent did not panic");
    }
}

/// A temporary deployment: a modules directory, a state directory and a config file
/// that turns process_perf on at 100 ms, top 2.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub modules: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

impl Deployment {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(&modules).unwrap();
        let config = dir.path().join("agent.json");
        std::fs::write(
            &config,
            r#"{"process_perf_enabled": true, "host_perf_interval": "100ms", "process_perf_top_n": 2}"#,
        )
        .unwrap();
        Self {
            state: dir.path().join("state"),
            modules,
            config,
            dir,
        }
    }
}

/// Captures log output of the current thread.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn with_captured_logs<R>(f: impl FnOnce() -> R) -> (R, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, || {
        // Another test thread may have met a callsite while no subscriber was interested,
        // and tracing caches that as "never": ask every callsite again now that this
        // thread's subscriber exists, or its lines could be lost.
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

/// What the hooks of a swapped-in module reported.
#[derive(Default, Clone)]
pub struct Outcome(pub Arc<Mutex<Vec<String>>>);

impl Outcome {
    pub fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

pub fn spec(module: Arc<GuestModule>, label: &str, outcome: &Outcome) -> ModuleSpec {
    let healthy = outcome.clone();
    let rolled = outcome.clone();
    ModuleSpec {
        module,
        grant: Grant::new(&[DEFAULT_GRANT], PC_ID).unwrap(),
        limits: Limits::default(),
        label: label.into(),
        on_healthy: Some(Box::new(move || {
            healthy.0.lock().unwrap().push("healthy".into())
        })),
        on_rolled_back: Some(Box::new(move |why| {
            rolled.0.lock().unwrap().push(format!("rolled back: {why}"))
        })),
    }
}

/// A child process killed (and reaped) when the test ends, passed or failed.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
