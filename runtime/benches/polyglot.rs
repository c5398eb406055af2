//! What a guest written in another language costs next to its Rust twin: component size,
//! compile time, compile-cache load, first call, tick time, the smallest memory cap it
//! runs under and the agent's peak RSS. `cargo xtask bench-polyglot` builds the guests and
//! writes the "Guests in other languages" section of BENCHMARKS.md; the sandbox harness
//! (`sandbox.rs`) keeps that section when it rewrites the file.
//!
//! Guests are given as `--guest LABEL=PATH` (repeatable). Under `cargo test --benches`
//! (no `--bench`) it runs in smoke mode on whatever guests the environment names
//! (`COLLECTOR_TOP_MEMORY_WASM`, `COLLECTOR_TOP_MEMORY_JS_WASM`), and on none otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use collector_bundle as bundle;
use collector_sandbox::cache;
use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::{GuestModule, Supervisor};
use collector_sandbox::host::{Datetime, Limits, Services, TickTime};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::{ProcessTable, StaticSource};
use collector_shared::EffectiveConfig;

const SIZES: [usize; 3] = [100, 1_000, 10_000];
/// Memory caps tried, smallest first, to find the smallest one a guest runs under.
const CAPS_MIB: [usize; 8] = [2, 4, 8, 16, 24, 32, 48, 64];
const SECTION: &str = "## Guests in other languages";

struct Effort {
    ticks: usize,
    compiles: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss-child") {
        let path = PathBuf::from(&args[i + 1]);
        let cache = args.get(i + 2).map(PathBuf::from);
        rss_child(&path, cache.as_deref());
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let effort = if full {
        Effort {
            ticks: 30,
            compiles: 2,
        }
    } else {
        Effort {
            ticks: 2,
            compiles: 1,
        }
    };
    let mut guests: Vec<(String, PathBuf)> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--guest")
        .map(|(i, _)| {
            let spec = args.get(i + 1).expect("--guest LABEL=PATH");
            let (label, path) = spec.split_once('=').expect("--guest LABEL=PATH");
            (label.to_string(), PathBuf::from(path))
        })
        .collect();
    if guests.is_empty() && !full {
        for (label, var) in [
            ("Rust", "COLLECTOR_TOP_MEMORY_WASM"),
            ("JavaScript", "COLLECTOR_TOP_MEMORY_JS_WASM"),
        ] {
            if let Some(path) = std::env::var_os(var) {
                guests.push((label.into(), path.into()));
            }
        }
    }
    let out = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| PathBuf::from(&args[i + 1]));

    let mut columns = Vec::new();
    for (label, path) in &guests {
        eprintln!("bench-polyglot: {label} ({})", path.display());
        columns.push((label.clone(), measure(path, &effort)));
    }
    let section = render(&columns, full);
    println!("{section}");
    if let Some(out) = out {
        write_section(&out, &section);
        eprintln!("bench-polyglot: wrote the section to {}", out.display());
    }
}

/// Every measurement of one guest, as (row label, value) in table order.
fn measure(path: &Path, e: &Effort) -> Vec<(String, String)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows = vec![
        (
            "component size".to_string(),
            format!("{:.2} MB", bytes.len() as f64 / 1e6),
        ),
        (
            format!(
                "fits a bundle (`MAX_BUNDLE_LEN`, {} MiB)",
                bundle::MAX_BUNDLE_LEN >> 20
            ),
            // The manifest and signatures add a few KiB.
            yes_no(bytes.len() as u64 + (64 << 10) <= bundle::MAX_BUNDLE_LEN),
        ),
    ];

    // Compiling: what a first start or a new module costs, off the tick path.
    let sandbox = Sandbox::new().expect("engine");
    let mut compiles = Vec::new();
    let mut module = None;
    for _ in 0..e.compiles {
        let start = Instant::now();
        module = Some(GuestModule::from_bytes(&sandbox, "guest", &bytes).expect("guest loads"));
        compiles.push(start.elapsed().as_secs_f64());
    }
    let module = Arc::new(module.expect("compiled once"));
    rows.push(("compile (one thread)".into(), secs(median(compiles))));

    // The compile cache: what every later start costs.
    let dir = tempfile::tempdir().expect("tempdir");
    let cached = Sandbox::with_cache(dir.path()).expect("cache");
    GuestModule::from_bytes(&cached, "guest", &bytes).expect("fills the cache");
    let artifact: u64 = std::fs::read_dir(dir.path())
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let mut loads = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        GuestModule::from_bytes(&cached, "guest", &bytes).expect("loads from the cache");
        loads.push(start.elapsed().as_secs_f64());
    }
    rows.push((
        "compiled artifact in the cache".into(),
        format!("{:.1} MB", artifact as f64 / 1e6),
    ));
    rows.push((
        format!(
            "artifact cached (`MAX_ARTIFACT_LEN`, {} MiB)",
            cache::MAX_ARTIFACT_LEN >> 20
        ),
        yes_no(artifact > 0 && artifact <= cache::MAX_ARTIFACT_LEN),
    ));
    rows.push(("load from the compile cache".into(), secs(median(loads))));

    // The first call instantiates the component, then configures it.
    let mut firsts = Vec::new();
    for _ in 0..5 {
        let mut sup = supervisor(&module, synthetic(100), Limits::default());
        let start = Instant::now();
        sup.configure(&enabled()).expect("configure");
        firsts.push(start.elapsed().as_secs_f64());
    }
    rows.push(("instantiate + configure".into(), secs(median(firsts))));

    for n in SIZES {
        let mut sup = supervisor(&module, synthetic(n), Limits::default());
        sup.configure(&enabled()).expect("configure");
        let mut ticks = Vec::new();
        for i in 0..=e.ticks {
            let start = Instant::now();
            sup.tick(clock(i)).expect("tick");
            if i > 0 {
                ticks.push(start.elapsed().as_secs_f64());
            }
        }
        rows.push((format!("tick, {n} processes"), secs(median(ticks))));
    }

    let cap = CAPS_MIB.iter().find(|&&mib| {
        let limits = Limits {
            memory_bytes: mib << 20,
            ..Limits::default()
        };
        let mut sup = supervisor(&module, synthetic(10_000), limits);
        sup.configure(&enabled()).is_ok() && (0..3).all(|i| sup.tick(clock(i)).is_ok())
    });
    rows.push((
        "smallest memory cap that runs 10000 processes".into(),
        cap.map_or("over 64 MiB".into(), |m| format!("{m} MiB")),
    ));

    let exe = std::env::current_exe().expect("current exe");
    let rss = |cache: Option<&Path>| -> String {
        let mut cmd = Command::new(&exe);
        cmd.arg("--rss-child").arg(path);
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
        let kb: f64 = text
            .trim()
            .strip_prefix("maxrss_kb=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected RSS child output: {text}"));
        format!("{:.1} MB", kb / 1024.0)
    };
    rows.push((
        "agent peak RSS, 1000 processes (first start, compiling)".into(),
        rss(None),
    ));
    rows.push((
        "agent peak RSS, 1000 processes (restart, compile cache)".into(),
        rss(Some(dir.path())),
    ));
    rows
}

fn rss_child(path: &Path, cache: Option<&Path>) {
    let sandbox = match cache {
        Some(dir) => Sandbox::with_cache(dir).expect("cache"),
        None => Sandbox::new().expect("engine"),
    };
    let bytes = std::fs::read(path).expect("guest");
    let module = Arc::new(GuestModule::from_bytes(&sandbox, "guest", &bytes).expect("guest"));
    drop(bytes);
    let mut sup = supervisor(&module, synthetic(1_000), Limits::default());
    sup.configure(&enabled()).expect("configure");
    for i in 0..10 {
        sup.tick(clock(i)).expect("tick");
    }
    // VmHWM, not getrusage: Linux carries `ru_maxrss` across execve.
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status");
    println!("maxrss_kb={hwm}");
}

fn supervisor(module: &Arc<GuestModule>, source: StaticSource, limits: Limits) -> Supervisor {
    let mut services = Services::new(
        Box::new(source),
        Arc::new(MemorySink::default()),
        "bench-pc",
    );
    services.limits = limits;
    Supervisor::new(module.clone(), services)
}

fn enabled() -> EffectiveConfig {
    EffectiveConfig {
        process_perf_enabled: true,
        ..EffectiveConfig::default()
    }
}

/// The time of tick `i`, one minute apart.
fn clock(i: usize) -> TickTime {
    let secs = 60 * i as u64;
    TickTime {
        wall: Datetime {
            seconds: 1_800_000_000 + secs as i64,
            nanoseconds: 0,
        },
        monotonic: secs * 1_000_000_000,
    }
}

/// A deterministic table of `n` processes with spread-out memory readings.
fn synthetic(n: usize) -> StaticSource {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pids: Vec<u32> = (0..n as u32).map(|i| 100 + i * 3).collect();
    StaticSource {
        table: ProcessTable {
            cpu_pct: vec![0.0; n],
            rss_bytes: (0..n).map(|_| next() % (4 << 30)).collect(),
            disk_read_bytes: vec![0; n],
            disk_written_bytes: vec![0; n],
            pids: pids.clone(),
        },
        names: pids
            .iter()
            .map(|p| (*p, format!("process-{p}")))
            .collect::<HashMap<_, _>>(),
    }
}

fn yes_no(yes: bool) -> String {
    if yes { "yes" } else { "**no**" }.into()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn render(columns: &[(String, Vec<(String, String)>)], full: bool) -> String {
    let mut s = format!("{SECTION}\n\n");
    let host = if cfg!(debug_assertions) {
        "the dev-profile host (dependencies at opt-level 2 as `cargo xtask test` builds \
         them, this crate unoptimized)"
    } else {
        "the release host"
    };
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    s.push_str(&format!(
        "The top-memory example guest in each language (`docs/examples/`), measured by \
         `cargo xtask bench-polyglot` (the harness is `runtime/benches/polyglot.rs`) with \
         {host}: one compile thread, default limits (64 MiB, 1 s), synthetic process \
         tables, medians. Each guest publishes the top 20 processes by memory. Load average \
         at the end of the run: {load} on {} cores; compare the columns, not the absolute \
         times, across runs.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    if !full {
        s.push_str("(smoke mode: too few iterations to mean anything)\n\n");
    }
    s.push_str("| measurement |");
    for (label, _) in columns {
        s.push_str(&format!(" {label} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(columns.len()));
    s.push('\n');
    if let Some((_, first)) = columns.first() {
        for (i, (what, _)) in first.iter().enumerate() {
            s.push_str(&format!("| {what} |"));
            for (_, rows) in columns {
                s.push_str(&format!(" {} |", rows[i].1));
            }
            s.push('\n');
        }
    }
    s
}

/// Replaces this harness's section of `out` (from its heading to the next `## ` heading
/// or the end), or appends it.
fn write_section(out: &Path, section: &str) {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let text = match text.find(&format!("\n{SECTION}\n")) {
        Some(start) => {
            let body = start + 1 + SECTION.len();
            let end = text[body..]
                .find("\n## ")
                .map_or(text.len(), |i| body + i + 1);
            format!("{}{}\n{}", &text[..start + 1], section, &text[end..])
        }
        None => format!("{}\n\n{section}", text.trim_end()),
    };
    let text = format!("{}\n", text.trim_end());
    std::fs::write(out, text).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}
