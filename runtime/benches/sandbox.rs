//! What the sandbox costs the endpoint, measured side by side with native baselines on the
//! same inputs in the same run: `cargo xtask bench` writes the table to BENCHMARKS.md.
//!
//! Under `cargo bench` (which passes `--bench`) every measurement runs in full; under
//! `cargo test --benches` it runs in smoke mode, a handful of iterations that only prove
//! the harness still works. Ratios, not absolute times, are the point: the machine is
//! noisy, so guest and native runs are interleaved and medians are reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use collector_bundle::{self as bundle, Manifest, SecretKey, TrustStore};
use collector_reference::ReferenceLoop;
use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::{GuestModule, Supervisor};
use collector_sandbox::host::{Datetime, HostStats, Services, TickTime};
use collector_sandbox::sink::{Sink, SinkError};
use collector_sandbox::source::{
    Fields, ProcessSource, ProcessTable, StaticSource, SysinfoSource, TimeBoxed,
};
use collector_shared::EffectiveConfig;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

const PC_ID: &str = "bench-pc";
const SIZES: [usize; 3] = [100, 1_000, 10_000];

/// Counts what it is given and drops it, so both sides pay the same for "publishing".
#[derive(Default)]
struct NullSink(AtomicU64);

impl Sink for NullSink {
    fn publish(&self, _subject: &str, payload: &[u8]) -> Result<(), SinkError> {
        self.0.fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// How much work each measurement does.
struct Effort {
    rounds: usize,
    per_round: usize,
    sysinfo_ticks: usize,
    swaps: usize,
    idle_ticks: usize,
    idle_wait: Duration,
    rss_ticks: usize,
    /// How long each `collector run` of the agent RSS rows runs.
    agent_window: Duration,
}

impl Effort {
    fn full() -> Self {
        Self {
            rounds: 15,
            per_round: 40,
            sysinfo_ticks: 240,
            swaps: 10,
            idle_ticks: 2_000,
            idle_wait: Duration::from_secs(2),
            rss_ticks: 30,
            agent_window: Duration::from_secs(10),
        }
    }

    fn smoke() -> Self {
        Self {
            rounds: 2,
            per_round: 2,
            sysinfo_ticks: 2,
            swaps: 1,
            idle_ticks: 5,
            idle_wait: Duration::from_millis(50),
            rss_ticks: 2,
            agent_window: Duration::from_secs(2),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let guest = guest_path();
    if let Some(i) = args.iter().position(|a| a == "--rss-child") {
        let n = args[i + 1].parse().expect("--rss-child N");
        let ticks = args[i + 2].parse().expect("--rss-child N TICKS");
        let cache = args.get(i + 3).map(PathBuf::from);
        rss_child(&guest, n, ticks, cache.as_deref());
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--profile-guest-tick") {
        // For `perf record`: nothing but guest ticks at N processes for S seconds.
        let n = args[i + 1].parse().expect("--profile-guest-tick N SECONDS");
        let secs: u64 = args[i + 2].parse().expect("--profile-guest-tick N SECONDS");
        let sandbox = Sandbox::new().expect("engine");
        let module = Arc::new(GuestModule::from_file(&sandbox, &guest).expect("guest"));
        let mut sup = supervisor(&module, Box::new(synthetic(n)));
        let (start, mut mono, mut ticks) = (Instant::now(), Duration::ZERO, 0u64);
        while start.elapsed() < Duration::from_secs(secs) {
            mono += Duration::from_secs(60);
            sup.tick(clock(mono).0).expect("tick");
            ticks += 1;
        }
        println!(
            "{:.2} µs per tick",
            start.elapsed().as_secs_f64() * 1e6 / ticks as f64
        );
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let effort = if full {
        Effort::full()
    } else {
        Effort::smoke()
    };
    let out = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| PathBuf::from(&args[i + 1]));

    let mut rows = Vec::new();
    let sandbox = Sandbox::new().expect("engine");
    let bytes = std::fs::read(&guest).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build it with `cargo xtask build-guest` (cargo xtask bench does)",
            guest.display()
        )
    });
    let module =
        Arc::new(GuestModule::from_bytes(&sandbox, "process-perf", &bytes).expect("guest"));

    for n in SIZES {
        eprintln!("bench: guest tick vs native reference, {n} processes");
        rows.push(tick_vs_native(&module, n, &effort));
    }
    eprintln!("bench: whole tick with real sysinfo");
    rows.extend(real_sysinfo(&module, &effort));
    rows.push(component_size(&bytes));
    eprintln!("bench: first start and hot swap latency");
    rows.extend(swap_latency(&module, &bytes, &effort));
    eprintln!("bench: idle cost");
    rows.extend(idle_cost(&module, &effort));
    eprintln!("bench: peak RSS");
    rows.extend(peak_rss(&guest, &effort));
    eprintln!("bench: peak RSS of collector run with the NATS sink");
    rows.extend(agent_rss(&guest, &effort));

    let report = render(&rows, &bytes, full);
    println!("{report}");
    if let Some(out) = out {
        // The sections after this harness's own come from longer runs it does not redo
        // (`cargo xtask fleet-sim --write`, `cargo xtask soak --write`): they are kept.
        let soak = std::fs::read_to_string(&out).ok().and_then(|text| {
            ["\n## Fleet scale", "\n## Soak\n"]
                .iter()
                .filter_map(|h| text.find(h))
                .min()
                .map(|i| format!("\n{}", &text[i..]))
        });
        let report = match soak {
            Some(soak) => format!("{}{soak}", report.trim_end_matches('\n')),
            None => report,
        };
        std::fs::write(&out, &report).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        eprintln!("bench: wrote {}", out.display());
    }
    let missed = rows.iter().filter(|r| !r.met).count();
    eprintln!(
        "bench: {} measurements, {} targets met, {missed} missed",
        rows.len(),
        rows.len() - missed
    );
}

fn guest_path() -> PathBuf {
    std::env::var_os("COLLECTOR_GUEST_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guests/process-perf.wasm")
        })
}

/// One line of the report.
struct Row {
    what: String,
    sandboxed: String,
    baseline: String,
    result: String,
    target: String,
    met: bool,
    /// Why the target can be missed and what would close it, shown when it is.
    why: Option<String>,
}

const WHY_SMALL_TICK: &str = "A guest tick pays a fixed cost the native loop does not: its calls \
    across the sandbox boundary (on a table this small, one sample with everyone's disk \
    counters and the names of the top-N; the first tick of a loop, and tables over 128 \
    processes, also ask sample-pids for the top-N's disk counters), each lowering its lists \
    into guest memory, plus code compiled by Cranelift rather than LLVM. At 100 processes \
    that fixed part is most of the tick. Sampling small tables in one call, a guest decision \
    the API allows, saved a crossing without moving this row beyond noise (three runs each \
    on 2026-12-02: 1.48-2.00x before, 1.49-1.58x after; the 0.1.0 guest, with one sample \
    call and serde_json, measured 1.95x on 2026-11-27); from 1,000 processes on, the guest's linear-time top-N selection and the \
    smaller sample it asks for win it back. What bounds it is the cost of each crossing \
    itself, which fewer calls per tick could lower only with a WIT function that samples \
    and names at once.";

const WHY_SYSINFO: &str = "On a table of at most 128 processes the guest takes everything in one \
    sample, as the native reference does, so both read the same /proc files. What remains \
    is the fixed cost the native loop does not pay: the hand-off to the time box's worker \
    thread and back (the enumeration runs there so that a hung /proc read cannot stall the \
    agent) and the guest call. The one-sample path moved this row from 1.22-1.33x (three \
    runs) to 1.12-1.21x (four runs) on 2026-12-02, same machine. Both sides spend \
    nearly all of a tick in sysinfo, so the ratio also moves with machine noise (see the \
    load average above). What would close it: enumerating on the caller's thread, which \
    would give up the time box; the agent keeps it.";

/// Largest table the default guest samples in one call with disk counters
/// (`ONE_SAMPLE_MAX` in `guest-process-perf/src/logic.rs`).
const GUEST_ONE_SAMPLE_MAX: usize = 128;

/// Why the whole tick cannot reach half the seed's on this machine: the /proc files each
/// side reads, counted from this run's process and thread counts.
fn why_seed(processes: usize, with_threads: usize) -> String {
    let top_n = 20;
    let (runtime_files, how) = if processes <= GUEST_ONE_SAMPLE_MAX {
        (
            processes * 3,
            format!(
                "on a table of at most {GUEST_ONE_SAMPLE_MAX} processes the runtime reads the \
                 same three files for processes only, so its share is {processes} processes × 3"
            ),
        )
    } else {
        (
            processes * 2 + top_n * 2,
            format!(
                "the runtime reads stat and statm for processes only, and stat and io for the \
                 top {top_n}, so its share is ({processes} processes × 2 + {top_n} × 2)"
            ),
        )
    };
    let share = runtime_files as f64 / (with_threads.max(1) * 3) as f64;
    format!(
        "The seed's loop reads stat, statm and io for every process and every thread \
         (sysinfo lists a process's threads as processes when tasks are refreshed, and the \
         seed sorts them all); {how} ÷ ({with_threads} processes and threads × 3) = \
         {share:.2} on this machine, before the fixed costs the seed does not pay (the \
         hand-off to the enumeration's worker thread, the guest call). The fewer threads a \
         machine runs per process, the higher that floor: what bounds it is reading the \
         /proc files of every process, which any loop that ranks every process by CPU pays."
    )
}

const WHY_RSS: &str = "A first start compiles the guest with Cranelift, whose working memory \
    adds to the peak; a restart loads it from the compile cache. What would close it: \
    starting from the compile cache, which any agent with a --state-dir does after its \
    first start.";

const WHY_AGENT_RSS: &str = "What bounds it, from the rows of this run: the \"agent peak RSS\" \
    rows above run the same engine, guest and sampling in a bare process (no CLI, no tokio \
    runtime, no NATS client, no config watcher), so the difference between those rows and \
    these is what the binary around the sandbox costs (its own code pages, its one tokio \
    worker thread, the async-nats connection and its buffers); the difference between a first \
    start and a restart is Cranelift's working memory while it compiles, which a smaller \
    guest shrinks but does not remove. Each further module adds its compiled code, its \
    store and linear memory (top-memory, still a 0.1.0 guest with serde_json, is twice the \
    size of process-perf). What would close it: the compile cache on every start (any \
    agent with a --state-dir after its first start) and moving top-memory to 0.2.0; \
    below that, a leaner binary around the sandbox.";

const WHY_SWAP: &str = "Compiling the component with Cranelift on one thread is nearly all of it (the \
    compile-cache row shows the rest). The agent compiles on one thread on purpose: an \
    endpoint agent should not take every core, and more compile threads raise the \
    first-start peak RSS. The swap never \
    blocks ticks (verification and compilation run on the watcher thread, the new module \
    takes over at the next tick boundary), and every later start of the same module comes \
    from the compile cache. What would close it: parallel compilation where cores are to \
    spare, or a smaller guest still.";

fn enabled() -> EffectiveConfig {
    EffectiveConfig {
        process_perf_enabled: true,
        ..EffectiveConfig::default()
    }
}

fn clock(mono: Duration) -> (TickTime, DateTime<Utc>) {
    let wall = DateTime::from_timestamp(1_800_000_000, 0).unwrap()
        + chrono::Duration::from_std(mono).unwrap();
    let time = TickTime {
        wall: Datetime {
            seconds: wall.timestamp(),
            nanoseconds: wall.timestamp_subsec_nanos(),
        },
        monotonic: mono.as_nanos() as u64,
    };
    (time, wall)
}

/// A deterministic synthetic process table: spread-out CPU readings with ties and some
/// idle processes, realistic memory and I/O counters.
fn synthetic(n: usize) -> StaticSource {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pids: Vec<u32> = (0..n as u32).map(|i| 100 + i * 3).collect();
    let cpu = (0..n)
        .map(|_| match next() % 10 {
            0..=3 => 0.0,
            4 => 1.5,
            _ => (next() % 40_000) as f32 / 100.0,
        })
        .collect();
    StaticSource {
        table: ProcessTable {
            cpu_pct: cpu,
            rss_bytes: (0..n).map(|_| next() % (4 << 30)).collect(),
            disk_read_bytes: (0..n).map(|_| next() % (1 << 40)).collect(),
            disk_written_bytes: (0..n).map(|_| next() % (1 << 40)).collect(),
            pids: pids.clone(),
        },
        names: pids
            .iter()
            .map(|p| (*p, format!("process-{p}")))
            .collect::<HashMap<_, _>>(),
    }
}

fn supervisor(module: &Arc<GuestModule>, source: Box<dyn ProcessSource>) -> Supervisor {
    let mut sup = Supervisor::new(
        module.clone(),
        Services::new(source, Arc::new(NullSink::default()), PC_ID),
    );
    sup.configure(&enabled()).expect("configure");
    sup
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn micros(d: f64) -> String {
    if d >= 1000.0 {
        format!("{:.2} ms", d / 1000.0)
    } else {
        format!("{d:.1} µs")
    }
}

fn ratio_row(what: String, guest_us: f64, native_us: f64, limit: f64) -> Row {
    let ratio = guest_us / native_us;
    Row {
        what,
        sandboxed: micros(guest_us),
        baseline: micros(native_us),
        result: format!("{ratio:.3}x"),
        target: format!("≤ {limit}x"),
        met: ratio <= limit,
        why: None,
    }
}

/// 1. One tick of the guest (boundary crossing and publish included) against the native
///    reference implementation, on the same synthetic table.
fn tick_vs_native(module: &Arc<GuestModule>, n: usize, e: &Effort) -> Row {
    let mut guest = supervisor(module, Box::new(synthetic(n)));
    let mut native = ReferenceLoop::new(PC_ID, enabled());
    let mut source = synthetic(n);
    let sink = NullSink::default();
    let mut mono = Duration::ZERO;
    let (mut guest_rounds, mut native_rounds) = (Vec::new(), Vec::new());
    for round in 0..=e.rounds {
        let start = Instant::now();
        for _ in 0..e.per_round {
            mono += Duration::from_secs(60);
            guest.tick(clock(mono).0).expect("guest tick");
        }
        let g = start.elapsed().as_secs_f64() * 1e6 / e.per_round as f64;
        let start = Instant::now();
        for _ in 0..e.per_round {
            mono += Duration::from_secs(60);
            if let Some((subject, payload)) = native.tick(clock(mono).1, mono, &mut source) {
                sink.publish(&subject, &payload).expect("null sink");
            }
        }
        let nat = start.elapsed().as_secs_f64() * 1e6 / e.per_round as f64;
        // Round 0 warms caches and the allocator on both sides.
        if round > 0 {
            guest_rounds.push(g);
            native_rounds.push(nat);
        }
    }
    let limit = 1.2;
    Row {
        why: Some(WHY_SMALL_TICK.into()),
        ..ratio_row(
            format!("guest tick vs native logic, {n} processes"),
            median(guest_rounds),
            median(native_rounds),
            limit,
        )
    }
}

/// The seed's enumeration, for the seed's loop: one `System`, refreshed exactly as
/// `seed-process-perf.rs` refreshes it (tasks included, so every thread is listed and
/// sorted as a process, as the seed does), every measurement of everyone.
struct SeedSource {
    system: System,
}

impl ProcessSource for SeedSource {
    fn sample(&mut self, _fields: Fields) -> Result<ProcessTable, String> {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory()
                .with_disk_usage(),
        );
        let mut table = ProcessTable::default();
        for (pid, p) in self.system.processes() {
            let d = p.disk_usage();
            table.pids.push(pid.as_u32());
            table.cpu_pct.push(p.cpu_usage());
            table.rss_bytes.push(p.memory());
            table.disk_read_bytes.push(d.total_read_bytes);
            table.disk_written_bytes.push(d.total_written_bytes);
        }
        Ok(table)
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        pids.iter()
            .map(|&pid| {
                self.system
                    .process(Pid::from_u32(pid))
                    .map(|p| p.name().to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// 2. A whole tick on this machine's real processes: the runtime with the guest (as
///    `collector run` sets it up), the native reference loop on the runtime's sysinfo
///    source, and the seed's loop (the reference logic on the seed's enumeration), each
///    with its own sysinfo `System`. Ticks rotate so each side sees the same machine.
fn real_sysinfo(module: &Arc<GuestModule>, e: &Effort) -> Vec<Row> {
    // As `collector run` sets it up: enumeration on a worker thread, under a timeout.
    let agent_source = TimeBoxed::new(
        Box::new(SysinfoSource::new().expect("sysinfo")),
        Duration::from_secs(5),
    );
    let mut guest = supervisor(module, Box::new(agent_source));
    let mut native = ReferenceLoop::new(PC_ID, enabled());
    let mut source = SysinfoSource::new().expect("sysinfo");
    let mut seed = ReferenceLoop::new(PC_ID, enabled());
    let mut seed_source = SeedSource {
        system: System::new().expect("sysinfo"),
    };
    let sink = NullSink::default();
    let origin = Instant::now();
    let (mut g, mut nat, mut sd) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..e.sysinfo_ticks + 2 {
        let mono = origin.elapsed();
        let mut times = [0.0; 3];
        // Rotate which side goes first, so none always runs on a warmer machine.
        for k in 0..3 {
            let side = (i + k) % 3;
            let start = Instant::now();
            match side {
                0 => guest.tick(clock(mono).0).expect("guest tick"),
                1 => {
                    if let Some((subject, payload)) = native.tick(clock(mono).1, mono, &mut source)
                    {
                        sink.publish(&subject, &payload).expect("null sink");
                    }
                }
                _ => {
                    if let Some((subject, payload)) =
                        seed.tick(clock(mono).1, mono, &mut seed_source)
                    {
                        sink.publish(&subject, &payload).expect("null sink");
                    }
                }
            }
            times[side] = start.elapsed().as_secs_f64() * 1e6;
        }
        // The first two refreshes of each `System` build its process list (and the
        // guest's first tick is its CPU priming).
        if i >= 2 {
            g.push(times[0]);
            nat.push(times[1]);
            sd.push(times[2]);
        }
    }
    let processes = source
        .sample(Default::default())
        .map(|t| t.len())
        .unwrap_or(0);
    let with_threads = seed_source.system.processes().len();
    let (g, nat, sd) = (median(g), median(nat), median(sd));
    vec![
        Row {
            why: Some(WHY_SYSINFO.into()),
            ..ratio_row(
                format!(
                    "whole tick, real sysinfo, vs the native reference on the runtime's \
                     source ({processes} processes on this machine)"
                ),
                g,
                nat,
                1.02,
            )
        },
        Row {
            why: Some(why_seed(processes, with_threads)),
            ..ratio_row(
                format!(
                    "whole tick, real sysinfo, vs the seed's loop ({with_threads} processes \
                     and threads, as the seed counts them)"
                ),
                g,
                sd,
                0.5,
            )
        },
    ]
}

/// The size of the guest component, which bounds its compile time and memory.
fn component_size(bytes: &[u8]) -> Row {
    let kb = bytes.len() as f64 / 1000.0;
    Row {
        what: "guest component size (process-perf)".into(),
        sandboxed: format!("{kb:.1} KB"),
        baseline: "—".into(),
        result: format!("{} bytes", bytes.len()),
        target: "≤ 150 KB".into(),
        met: bytes.len() <= 150_000,
        why: None,
    }
}

/// 3. From a signed bundle being available to the first tick of the new module: verify,
///    compile (or load from the compile cache), instantiate with the predecessor's
///    state, configure, tick.
fn swap_latency(module: &Arc<GuestModule>, bytes: &[u8], e: &Effort) -> Vec<Row> {
    let key = SecretKey::from_seed(&[42; 32]);
    let manifest = Manifest::describe("process-perf", 2, bytes, Utc::now());
    let signed = bundle::sign(&manifest, bytes, &[&key]).expect("sign");
    let trust = TrustStore::new([key.public_key()], 1).expect("trust");
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cached = Sandbox::with_cache(cache_dir.path()).expect("cache");
    GuestModule::from_bytes(&cached, "warm-up", bytes).expect("fill the cache");
    let plain = Sandbox::new().expect("engine");

    let measure = |sandbox: &Arc<Sandbox>| {
        let mut sup = supervisor(module, Box::new(synthetic(1_000)));
        let mut mono = Duration::from_secs(60);
        sup.tick(clock(mono).0).expect("tick");
        let mut times = Vec::new();
        for _ in 0..e.swaps {
            mono += Duration::from_secs(60);
            let start = Instant::now();
            let verified =
                bundle::verify("bench", &signed, &trust, Utc::now(), None).expect("verify");
            let next = GuestModule::from_bytes(sandbox, "process-perf", &verified.component)
                .expect("load");
            let state = sup.save_state().expect("save");
            sup.swap_module(Arc::new(next));
            sup.start(state.as_deref()).expect("start");
            sup.tick(clock(mono).0).expect("first tick");
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
        median(times)
    };
    let from_wasm = measure(&plain);
    let from_cache = measure(&cached);
    // A first start: a new engine (and its epoch thread), the bundle verified, the
    // component compiled, a first instance configured and ticked.
    let mut first = Vec::new();
    for _ in 0..e.swaps {
        let start = Instant::now();
        let sandbox = Sandbox::new().expect("engine");
        let verified = bundle::verify("bench", &signed, &trust, Utc::now(), None).expect("verify");
        let module = Arc::new(
            GuestModule::from_bytes(&sandbox, "process-perf", &verified.component).expect("load"),
        );
        let mut sup = supervisor(&module, Box::new(synthetic(1_000)));
        sup.tick(clock(Duration::from_secs(60)).0)
            .expect("first tick");
        first.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let first = median(first);
    let size = format!("{} KB component", bytes.len() / 1000);
    vec![
        Row {
            what: format!(
                "first start to first tick: engine, verify, compile, instantiate, configure, \
                 tick ({size})"
            ),
            sandboxed: micros(first),
            baseline: "—".into(),
            result: micros(first),
            target: "≤ 100 ms".into(),
            met: first <= 100_000.0,
            why: Some(WHY_SWAP.into()),
        },
        Row {
            what: format!("hot swap to first tick, compiling the .wasm ({size})"),
            sandboxed: micros(from_wasm),
            baseline: "—".into(),
            result: micros(from_wasm),
            target: "≤ 100 ms".into(),
            met: from_wasm <= 100_000.0,
            why: Some(WHY_SWAP.into()),
        },
        Row {
            what: "hot swap to first tick, from the compile cache".into(),
            sandboxed: micros(from_cache),
            baseline: "—".into(),
            result: micros(from_cache),
            target: "≤ 2 ms".into(),
            met: from_cache <= 2_000.0,
            why: None,
        },
    ]
}

fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// 4. A gated-off loop (process_perf disabled): CPU per idle tick, host calls made, and
///    what the agent burns between ticks.
fn idle_cost(module: &Arc<GuestModule>, e: &Effort) -> Vec<Row> {
    let mut sup = Supervisor::new(
        module.clone(),
        Services::new(
            Box::new(synthetic(10_000)),
            Arc::new(NullSink::default()),
            PC_ID,
        ),
    );
    sup.configure(&EffectiveConfig::default())
        .expect("configure");
    let mut mono = Duration::ZERO;
    sup.tick(clock(mono).0).expect("warm-up tick");
    let stats = sup.stats();
    let calls_before = host_calls(&stats);
    let start = thread_cpu();
    for _ in 0..e.idle_ticks {
        mono += Duration::from_secs(60);
        sup.tick(clock(mono).0).expect("idle tick");
    }
    let per_tick = (thread_cpu() - start).as_secs_f64() * 1e6 / e.idle_ticks as f64;
    let calls = host_calls(&stats) - calls_before;

    let before = process_cpu();
    std::thread::sleep(e.idle_wait);
    let between = (process_cpu() - before).as_secs_f64() * 1e6 / e.idle_wait.as_secs_f64();
    vec![
        Row {
            what: "idle tick (gated off): CPU time per tick".into(),
            sandboxed: micros(per_tick),
            baseline: "—".into(),
            result: micros(per_tick),
            target: "≤ 20 µs".into(),
            met: per_tick <= 20.0,
            why: None,
        },
        Row {
            what: format!(
                "idle ticks: host calls (samples, names, publishes) in {}",
                e.idle_ticks
            ),
            sandboxed: calls.to_string(),
            baseline: "—".into(),
            result: format!("{calls} calls, no process enumeration"),
            target: "0 enumerations".into(),
            met: HostStats::get(&stats.samples) == 0 && calls == 0,
            why: None,
        },
        Row {
            what: "idle agent between ticks: CPU of the whole process".into(),
            sandboxed: format!("{} per second", micros(between)),
            baseline: "—".into(),
            result: format!("{} per second", micros(between)),
            target: "≤ 1 ms per second (no periodic wake-ups)".into(),
            met: between <= 1_000.0,
            why: None,
        },
    ]
}

fn host_calls(stats: &HostStats) -> u64 {
    HostStats::get(&stats.samples)
        + HostStats::get(&stats.name_calls)
        + HostStats::get(&stats.published)
}

/// 5. Peak RSS of an agent process running the guest over N synthetic processes, on a
///    first start (compiling the guest) and on a restart (from the compile cache).
fn peak_rss(guest: &Path, e: &Effort) -> Vec<Row> {
    let exe = std::env::current_exe().expect("current exe");
    let cache = tempfile::tempdir().expect("tempdir");
    let run = |n: usize, cache: Option<&Path>| -> f64 {
        let mut cmd = Command::new(&exe);
        cmd.args(["--rss-child", &n.to_string(), &e.rss_ticks.to_string()])
            .env("COLLECTOR_GUEST_WASM", guest);
        if let Some(c) = cache {
            cmd.arg(c);
        }
        let out = cmd.output().expect("spawn the RSS child");
        assert!(
            out.status.success(),
            "RSS child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .strip_prefix("maxrss_kb=")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("unexpected RSS child output: {text}"))
            / 1024.0
    };
    // Fill the cache once so that the restart measurements deserialize.
    run(100, Some(cache.path()));
    SIZES
        .iter()
        .flat_map(|&n| {
            let first = run(n, None);
            let restart = run(n, Some(cache.path()));
            let limit = if n >= 10_000 { Some(25.0) } else { None };
            [
                ("first start, compiling", first),
                ("restart, compile cache", restart),
            ]
            .into_iter()
            .map(move |(how, mb)| Row {
                what: format!("agent peak RSS, {n} processes ({how})"),
                sandboxed: format!("{mb:.1} MB"),
                baseline: "—".into(),
                result: format!("{mb:.1} MB"),
                target: limit.map_or("—".into(), |l| format!("≤ {l} MB")),
                met: limit.is_none_or(|l| mb <= l),
                why: Some(WHY_RSS.into()),
            })
        })
        .collect()
}

/// The high-water mark of a running process's resident memory, in MB.
fn vm_hwm_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status");
    kb as f64 / 1024.0
}

/// A nats-server on a free local port, with JetStream in a temporary directory; stopped
/// when dropped.
struct NatsServer {
    child: std::process::Child,
    url: String,
}

impl NatsServer {
    fn start(bin: &Path, dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 6. Peak RSS of the real agent, `collector run` with the NATS sink, on this machine's
///    processes (process_perf on at 1 s, top 20): a first start (compiling the guest, no
///    state directory) and a restart (from the compile cache of its state directory).
fn agent_rss(guest: &Path, e: &Effort) -> Vec<Row> {
    let Some(nats_bin) = std::env::var_os("COLLECTOR_NATS_SERVER").map(PathBuf::from) else {
        return vec![Row {
            what: "collector run with the NATS sink: peak RSS".into(),
            sandboxed: "not measured".into(),
            baseline: "—".into(),
            result: "not measured".into(),
            target: "≤ 22 MB first start, ≤ 18 MB restart".into(),
            met: false,
            why: Some(
                "COLLECTOR_NATS_SERVER was not set (cargo xtask bench sets it to the \
                 nats-server it installs)."
                    .into(),
            ),
        }];
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start(&nats_bin, &dir.path().join("jetstream"));
    let collector = Path::new(env!("CARGO_BIN_EXE_collector"));
    let run_ok = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(collector)
            .args(args)
            .output()
            .expect("run collector");
        assert!(
            out.status.success(),
            "collector {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = dir.path().join("key");
    let bundle = dir.path().join("process-perf.bundle");
    run_ok(&[
        "module".as_ref(),
        "keygen".as_ref(),
        "--out".as_ref(),
        key.as_os_str(),
    ]);
    run_ok(&[
        "module".as_ref(),
        "sign".as_ref(),
        "--key".as_ref(),
        key.as_os_str(),
        "--name".as_ref(),
        "process-perf".as_ref(),
        "--version".as_ref(),
        "1".as_ref(),
        guest.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"process_perf_enabled": true, "host_perf_interval": "1s", "process_perf_top_n": 20}"#,
    )
    .expect("write the config");
    let public = dir.path().join("key.pub");
    let state = dir.path().join("state");
    let run = |state: Option<&Path>| -> f64 {
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(collector);
        cmd.arg("run")
            .arg("--trust")
            .arg(&public)
            .arg("--guest")
            .arg(&bundle)
            .arg("--config")
            .arg(&config)
            .args(["--nats-url", &nats.url, "--pc-id", PC_ID])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        if let Some(state) = state {
            cmd.arg("--state-dir").arg(state);
        }
        let mut child = cmd.spawn().expect("spawn collector run");
        std::thread::sleep(e.agent_window);
        let alive = child.try_wait().expect("agent status").is_none();
        let mb = if alive { vm_hwm_mb(child.id()) } else { 0.0 };
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            alive,
            "collector run exited early: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        mb
    };
    let first = run(None);
    run(Some(&state));
    let restart = run(Some(&state));
    let together = two_modules_rss(collector, &nats, dir.path(), &key, &bundle, e);
    drop(nats);
    let row = |what: &str, mb: f64, limit: f64| Row {
        what: format!("collector run with the NATS sink, peak RSS ({what})"),
        sandboxed: format!("{mb:.1} MB"),
        baseline: "—".into(),
        result: format!("{mb:.1} MB"),
        target: format!("≤ {limit} MB"),
        met: mb <= limit,
        why: Some(WHY_AGENT_RSS.into()),
    };
    let mut rows = vec![
        row("first start, compiling process-perf", first, 22.0),
        row("restart, compile cache", restart, 18.0),
    ];
    if let Some((first, restart)) = together {
        rows.push(row(
            "process-perf and top-memory from the fleet, first start, compiling both",
            first,
            25.0,
        ));
        rows.push(row(
            "process-perf and top-memory from the fleet, restart, compile cache",
            restart,
            25.0,
        ));
    }
    rows
}

/// The peak RSS of `collector run` in fleet mode running process-perf and the
/// top-memory example side by side, on a first start and on a restart. `None` when the
/// top-memory component was not built (COLLECTOR_TOP_MEMORY_WASM).
fn two_modules_rss(
    collector: &Path,
    nats: &NatsServer,
    dir: &Path,
    key: &Path,
    process_perf: &Path,
    e: &Effort,
) -> Option<(f64, f64)> {
    let top_memory = PathBuf::from(std::env::var_os("COLLECTOR_TOP_MEMORY_WASM")?);
    let fleet_ok = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(collector)
            .args(args)
            .env("NATS_URL", &nats.url)
            .output()
            .expect("run collector");
        assert!(
            out.status.success(),
            "collector {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let public = dir.join("key.pub");
    let top_bundle = dir.join("top-memory.bundle");
    fleet_ok(&[
        "module".as_ref(),
        "sign".as_ref(),
        "--key".as_ref(),
        key.as_os_str(),
        "--name".as_ref(),
        "top-memory".as_ref(),
        "--version".as_ref(),
        "1".as_ref(),
        "--grant".as_ref(),
        "process_mem.{pc_id}".as_ref(),
        top_memory.as_os_str(),
        "--out".as_ref(),
        top_bundle.as_os_str(),
    ]);
    fleet_ok(&["fleet".as_ref(), "init".as_ref()]);
    for bundle in [process_perf, top_bundle.as_path()] {
        fleet_ok(&[
            "module".as_ref(),
            "publish".as_ref(),
            "--trust".as_ref(),
            public.as_os_str(),
            bundle.as_os_str(),
        ]);
    }
    fleet_ok(&[
        "config".as_ref(),
        "set".as_ref(),
        "process_perf_enabled=true".as_ref(),
        "host_perf_interval=1s".as_ref(),
        "process_perf_top_n=20".as_ref(),
    ]);
    for name in ["process-perf", "top-memory"] {
        fleet_ok(&[
            "module".as_ref(),
            "rollout".as_ref(),
            name.as_ref(),
            "1".as_ref(),
            "--global".as_ref(),
        ]);
    }
    let state = dir.join("fleet-state");
    let run = || -> f64 {
        let log = dir.join("fleet-agent.log");
        let mut child = Command::new(collector)
            .args(["run", "--pc-id", PC_ID, "--nats-url", &nats.url, "--trust"])
            .arg(&public)
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("spawn collector run");
        // Both modules downloaded, compiled and ticking, then the measured window.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let started = ["process-perf", "top-memory"].iter().all(|m| {
                text.lines()
                    .any(|l| l.contains("agent started") && l.contains(m))
            });
            if started || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(e.agent_window);
        let alive = child.try_wait().expect("agent status").is_none();
        let mb = if alive { vm_hwm_mb(child.id()) } else { 0.0 };
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(alive, "collector run exited early: {text}");
        for m in ["process-perf", "top-memory"] {
            assert!(
                text.lines()
                    .any(|l| l.contains("agent started") && l.contains(m)),
                "{m} did not start: {text}"
            );
        }
        mb
    };
    let first = run();
    let restart = run();
    Some((first, restart))
}

fn rss_child(guest: &Path, n: usize, ticks: usize, cache: Option<&Path>) {
    let sandbox = match cache {
        Some(dir) => Sandbox::with_cache(dir).expect("cache"),
        None => Sandbox::new().expect("engine"),
    };
    let bytes = std::fs::read(guest).expect("guest");
    let module =
        Arc::new(GuestModule::from_bytes(&sandbox, "process-perf", &bytes).expect("guest"));
    drop(bytes);
    let mut sup = supervisor(&module, Box::new(synthetic(n)));
    let mut mono = Duration::ZERO;
    for _ in 0..ticks {
        mono += Duration::from_secs(60);
        sup.tick(clock(mono).0).expect("tick");
    }
    // VmHWM, not getrusage: Linux carries `ru_maxrss` across execve, so a child would
    // report the peak of the benchmark process that spawned it.
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status");
    println!("maxrss_kb={hwm}");
}

fn render(rows: &[Row], guest: &[u8], full: bool) -> String {
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "What moving the collector's logic into a WebAssembly sandbox costs the endpoint, \
         measured by `cargo xtask bench` (the harness is `runtime/benches/sandbox.rs`). \
         Sandboxed and native runs are interleaved in the same process on the same inputs, \
         and medians are reported: compare ratios, not absolute times, across machines.\n\n",
    );
    if !full {
        out.push_str("**Smoke run: a few iterations only; these numbers mean nothing.**\n\n");
    }
    out.push_str("## Machine\n\n");
    for line in machine(guest) {
        out.push_str(&format!("- {line}\n"));
    }
    out.push_str("\n## Results\n\n");
    out.push_str("| measurement | sandboxed | native baseline | result | target | verdict |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in rows {
        let verdict = if r.met { "met" } else { "**MISSED**" };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {verdict} |\n",
            r.what, r.sandboxed, r.baseline, r.result, r.target
        ));
    }
    let missed: Vec<&Row> = rows.iter().filter(|r| !r.met).collect();
    if !missed.is_empty() {
        out.push_str("\n## Missed targets\n\n");
        for r in missed {
            let why = r
                .why
                .as_deref()
                .unwrap_or("No explanation is recorded for this measurement.");
            out.push_str(&format!(
                "- **{}** ({}, target {}): {why}\n",
                r.what, r.result, r.target
            ));
        }
    }
    out.push_str(
        "\n## Reproduce\n\n```sh\ncargo xtask bench    # builds the guest and the release harness, \
         rewrites this file\n```\n\n`cargo xtask test` runs the same harness in smoke mode.\n",
    );
    out
}

fn machine(guest: &[u8]) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let command = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let wasmtime =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
            .ok()
            .and_then(|lock| {
                let i = lock.find("name = \"wasmtime\"\n")?;
                lock[i..].lines().nth(1).map(|l| {
                    l.trim_start_matches("version = ")
                        .trim_matches('"')
                        .to_string()
                })
            })
            .unwrap_or_default();
    vec![
        format!("CPU: {model}, {cores} cores available"),
        format!("memory: {mem}"),
        format!("OS: {}", command("uname", &["-sr"])),
        format!("toolchain: {}", command("rustc", &["--version"])),
        format!("wasmtime {wasmtime}, Cranelift, epoch interruption on"),
        format!("guest: process-perf, {} bytes", guest.len()),
        format!("measured: {}", Utc::now().format("%Y-%m-%d %H:%M UTC")),
        format!(
            "load average (1, 5, 15 min) as the run ended: {}",
            std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "unknown".into())
        ),
    ]
}
