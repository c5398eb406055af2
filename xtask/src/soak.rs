//! `cargo xtask soak`: runs the release agent for minutes with a hot swap every few
//! seconds and samples what it holds (RSS, open file descriptors, threads), so that a
//! leak shows up as growth here before it shows up on a fleet.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The agent's tick interval.
const INTERVAL: &str = "100ms";
/// How often a new version is dropped into the modules directory (one swap each).
const SWAP_EVERY: Duration = Duration::from_secs(3);
/// How often the agent's resources are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Bundles kept in the modules directory; older ones are removed, as a deployment tool
/// would.
const KEEP_BUNDLES: usize = 3;
/// Growth allowed from the first third of the run to the last. An agent that leaks
/// nothing plateaus once its first swap is done: the mean RSS of the last third may
/// exceed the first third's by allocator noise only. Descriptors and threads come and go
/// around a swap (a bundle being read, a state file being replaced), so their floor is
/// compared: the fewest seen in the last third against the fewest in the first. A leak
/// raises the floor; a descriptor open at the instant of a sample does not.
const RSS_GROWTH_MAX: f64 = 0.10;
const FD_GROWTH_MAX: u64 = 1;
const THREAD_GROWTH_MAX: u64 = 1;
/// Rows of the table written into BENCHMARKS.md (the console gets every sample).
const REPORT_ROWS: usize = 11;

/// Set by SIGINT, SIGTERM or SIGHUP: the run stops and the agent is killed.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// One reading of the agent's resources.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    healthy: u64,
    lines: u64,
}

/// The agent, killed by its pid when this goes out of scope: at the end of the run, on
/// an error, on Ctrl-C.
struct AgentGuard(Child);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Options {
    minutes: f64,
    write: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        minutes: 10.0,
        write: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => {
                let value = args.next().context("--minutes needs a number")?;
                options.minutes = value
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0 && m.is_finite())
                    .with_context(|| format!("--minutes {value}: expected a positive number"))?;
            }
            "--write" => options.write = true,
            other => bail!("soak: unknown argument `{other}` (takes --minutes N and --write)"),
        }
    }
    Ok(options)
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let guest = super::build_guest()?;
    super::run_step(
        "building the release agent",
        super::cargo().args(["build", "--quiet", "--release", "--package", "collector"]),
    )?;
    let bin = super::root().join("target/release/collector");
    let key = dev_key(&bin)?;
    let dir = std::env::temp_dir().join(format!("collector-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let modules = dir.join("modules");
    let state = dir.join("state");
    std::fs::create_dir_all(&modules)?;
    let config = dir.join("agent.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"process_perf_enabled": true, "host_perf_interval": "{INTERVAL}", "process_perf_top_n": 5}}"#
        ),
    )?;
    let result = soak(
        &options, &bin, &key, &guest, &dir, &modules, &state, &config,
    );
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("xtask: soak: kept {} (agent log: agent.log)", dir.display()),
    }
    let report = result?;
    if options.write {
        write_section(&report)?;
    }
    Ok(())
}

/// The development signing key of `cargo xtask run` (target/dev-keys/dev), made on
/// first use.
fn dev_key(bin: &Path) -> Result<PathBuf> {
    let keys = super::root().join("target/dev-keys");
    let key = keys.join("dev");
    if !key.exists() {
        std::fs::create_dir_all(&keys)?;
        super::run_step(
            "making a development signing key in target/dev-keys",
            Command::new(bin)
                .args(["module", "keygen", "--out"])
                .arg(&key)
                .stdout(Stdio::null()),
        )?;
    }
    Ok(key)
}

/// Signs `guest` as version `version` into the modules directory.
fn drop_version(
    bin: &Path,
    key: &Path,
    guest: &Path,
    modules: &Path,
    version: u64,
) -> Result<PathBuf> {
    let out = modules.join(format!("process-perf-{version}.bundle"));
    // `module sign --out` writes under a hidden name and renames: the watcher never sees
    // half a bundle.
    let status = Command::new(bin)
        .args(["module", "sign", "--key"])
        .arg(key)
        .args(["--name", "process-perf", "--version", &version.to_string()])
        .arg(guest)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .context("cannot run collector module sign")?;
    if !status.success() {
        bail!("collector module sign failed ({status})");
    }
    Ok(out)
}

/// What a run measured, for the report.
struct Report {
    minutes: f64,
    samples: Vec<Sample>,
    dropped: u64,
    healthy: u64,
    refused: u64,
    lines: u64,
    verdicts: Vec<Verdict>,
}

struct Verdict {
    what: &'static str,
    first: String,
    last: String,
    max: String,
    growth: String,
    bound: String,
    ok: bool,
}

#[allow(clippy::too_many_arguments)]
fn soak(
    options: &Options,
    bin: &Path,
    key: &Path,
    guest: &Path,
    dir: &Path,
    modules: &Path,
    state: &Path,
    config: &Path,
) -> Result<Report> {
    // Versions only grow: the run's start time, then one more per swap.
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let mut bundles = vec![drop_version(bin, key, guest, modules, base)?];
    let public = key.with_extension("pub");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--pc-id",
        "soak",
        "--min-interval",
        INTERVAL,
        "--trust",
    ])
    .arg(&public)
    .arg("--modules")
    .arg(modules)
    .arg("--state-dir")
    .arg(state)
    .arg("--config")
    .arg(config)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Its own process group: Ctrl-C reaches this task only, which kills the agent by pid.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut agent = AgentGuard(cmd.spawn().context("cannot start the agent")?);
    let pid = agent.0.id();
    eprintln!(
        "xtask: soak: agent pid {pid}, {} min, a swap every {} s, sampled every {} s",
        options.minutes,
        SWAP_EVERY.as_secs(),
        SAMPLE_EVERY.as_secs()
    );

    let lines = Arc::new(AtomicU64::new(0));
    let healthy = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stdout = agent.0.stdout.take().expect("piped");
    let counter = lines.clone();
    std::thread::spawn(move || {
        for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let stderr = agent.0.stderr.take().expect("piped");
    let mut log = std::fs::File::create(dir.join("agent.log"))?;
    let (ok, bad) = (healthy.clone(), refused.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("saved as the last-known-good module") {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            if line.contains("module refused") || line.contains("rolling back") {
                bad.fetch_add(1, Ordering::Relaxed);
            }
            let _ = writeln!(log, "{line}");
        }
    });

    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let started = Instant::now();
    let mut next_swap = started + SWAP_EVERY;
    // Sampling starts once the first swap is done (the second last-known-good save): from
    // then on the agent only repeats what it has done once, so any growth is a leak, not
    // a start-up cost.
    let mut next_sample: Option<Instant> = None;
    let mut dropped = 0u64;
    let mut samples = Vec::new();
    eprintln!(
        "{:>8} {:>9} {:>5} {:>8} {:>8} {:>8}",
        "elapsed", "RSS MiB", "fds", "threads", "healthy", "lines"
    );
    while started.elapsed() < total {
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted; the agent (pid {pid}) was killed");
        }
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited early ({status})");
        }
        let now = Instant::now();
        if now >= next_swap {
            dropped += 1;
            bundles.push(drop_version(bin, key, guest, modules, base + dropped)?);
            if bundles.len() > KEEP_BUNDLES {
                std::fs::remove_file(bundles.remove(0))?;
            }
            next_swap += SWAP_EVERY;
        }
        if next_sample.is_none() && healthy.load(Ordering::Relaxed) > 1 {
            next_sample = Some(now);
        }
        if next_sample.is_some_and(|at| now >= at) {
            let sample = sample(pid, started.elapsed(), &healthy, &lines)?;
            eprintln!(
                "{:>7.0}s {:>9.1} {:>5} {:>8} {:>8} {:>8}",
                sample.at.as_secs_f64(),
                sample.rss_kib as f64 / 1024.0,
                sample.fds,
                sample.threads,
                sample.healthy,
                sample.lines
            );
            samples.push(sample);
            next_sample = next_sample.map(|at| at + SAMPLE_EVERY);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);

    let report = Report {
        minutes: options.minutes,
        verdicts: verdicts(&samples)?,
        dropped,
        healthy: healthy.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        lines: lines.load(Ordering::Relaxed),
        samples,
    };
    eprintln!(
        "xtask: soak: {} versions dropped, {} saved as last-known-good (the first module included), {} refused or rolled back, {} lines published",
        report.dropped, report.healthy, report.refused, report.lines
    );
    for v in &report.verdicts {
        eprintln!(
            "xtask: soak: {:<8} first third {:>9}, last third {:>9}, max {:>9}: growth {} (bound {}) {}",
            v.what,
            v.first,
            v.last,
            v.max,
            v.growth,
            v.bound,
            if v.ok { "ok" } else { "EXCEEDED" }
        );
    }
    let exceeded: Vec<&str> = report
        .verdicts
        .iter()
        .filter(|v| !v.ok)
        .map(|v| v.what)
        .collect();
    if !exceeded.is_empty() {
        if options.write {
            write_section(&report)?;
        }
        bail!("growth above the bound: {}", exceeded.join(", "));
    }
    // Every version but the newest (maybe still on probation) must have swapped in.
    if report.healthy < report.dropped || report.refused > 0 {
        bail!(
            "swaps did not all succeed: {} dropped, {} healthy after the first, {} refused or rolled back (see the agent log)",
            report.dropped,
            report.healthy.saturating_sub(1),
            report.refused
        );
    }
    Ok(report)
}

/// Reads VmRSS and Threads from /proc/PID/status and counts /proc/PID/fd.
fn sample(pid: u32, at: Duration, healthy: &AtomicU64, lines: &AtomicU64) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?
        .count() as u64;
    Ok(Sample {
        at,
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
        healthy: healthy.load(Ordering::Relaxed),
        lines: lines.load(Ordering::Relaxed),
    })
}

fn mean(values: &[u64]) -> f64 {
    values.iter().sum::<u64>() as f64 / values.len().max(1) as f64
}

fn least(values: &[u64]) -> u64 {
    values.iter().copied().min().unwrap_or(0)
}

/// Compares the first third of the samples with the last third.
fn verdicts(samples: &[Sample]) -> Result<Vec<Verdict>> {
    if samples.len() < 3 {
        bail!(
            "only {} samples: run for longer (a sample every {} s)",
            samples.len(),
            SAMPLE_EVERY.as_secs()
        );
    }
    let third = samples.len() / 3;
    let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
    let pick = |s: &[Sample], f: fn(&Sample) -> u64| s.iter().map(f).collect::<Vec<_>>();
    let mib = |kib: f64| format!("{:.1} MiB", kib / 1024.0);

    let (rss_first, rss_last) = (
        mean(&pick(first, |s| s.rss_kib)),
        mean(&pick(last, |s| s.rss_kib)),
    );
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let rss_growth = rss_last / rss_first - 1.0;
    let mut out = vec![Verdict {
        what: "RSS",
        first: mib(rss_first),
        last: mib(rss_last),
        max: mib(rss_max as f64),
        growth: format!("{:+.1}%", rss_growth * 100.0),
        bound: format!("≤ +{:.0}% (means)", RSS_GROWTH_MAX * 100.0),
        ok: rss_growth <= RSS_GROWTH_MAX,
    }];
    for (what, f, bound) in [
        (
            "fds",
            (|s: &Sample| s.fds) as fn(&Sample) -> u64,
            FD_GROWTH_MAX,
        ),
        ("threads", |s: &Sample| s.threads, THREAD_GROWTH_MAX),
    ] {
        let (a, b) = (least(&pick(first, f)), least(&pick(last, f)));
        let max = samples.iter().map(f).max().unwrap_or(0);
        out.push(Verdict {
            what,
            first: a.to_string(),
            last: b.to_string(),
            max: max.to_string(),
            growth: format!("{:+}", b as i64 - a as i64),
            bound: format!("≤ +{bound} (fewest)"),
            ok: b <= a + bound,
        });
    }
    Ok(out)
}

/// Replaces (or appends) the `## Soak` section of BENCHMARKS.md.
fn write_section(report: &Report) -> Result<()> {
    let mut s = String::new();
    s.push_str("## Soak\n\n");
    let _ = writeln!(
        s,
        "`cargo xtask soak --minutes {} --write`: the release agent at a {INTERVAL} interval \
         with `--modules` and `--state-dir`, a new version of process-perf dropped into the \
         modules directory every {} s (a hot swap, three health ticks, a last-known-good \
         save), its resources read from `/proc/PID` every {} s from the first completed swap on. \
         Measured {} on the machine above.\n",
        report.minutes,
        SWAP_EVERY.as_secs(),
        SAMPLE_EVERY.as_secs(),
        utc_now()
    );
    let _ = writeln!(
        s,
        "{} versions dropped, {} saved as last-known-good (the first module included), {} \
         refused or rolled back; {} lines published.\n",
        report.dropped, report.healthy, report.refused, report.lines
    );
    s.push_str("| elapsed | RSS | open fds | threads | last-known-good saves |\n");
    s.push_str("|---|---|---|---|---|\n");
    let n = report.samples.len();
    let rows = REPORT_ROWS.min(n);
    for i in 0..rows {
        let sample = &report.samples[if rows > 1 {
            i * (n - 1) / (rows - 1)
        } else {
            0
        }];
        let _ = writeln!(
            s,
            "| {:.0} s | {:.1} MiB | {} | {} | {} |",
            sample.at.as_secs_f64(),
            sample.rss_kib as f64 / 1024.0,
            sample.fds,
            sample.threads,
            sample.healthy
        );
    }
    s.push_str(
        "\n| resource | first third | last third | max | growth | bound | verdict |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for v in &report.verdicts {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            v.what,
            v.first,
            v.last,
            v.max,
            v.growth,
            v.bound,
            if v.ok { "met" } else { "**EXCEEDED**" }
        );
    }
    let path = super::root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let text = match text.find("\n## Soak\n") {
        Some(start) => {
            let body = start + 1;
            let end = text[body + 1..]
                .find("\n## ")
                .map_or(text.len(), |e| body + 1 + e + 1);
            match &text[end..] {
                "" => format!("{}{s}", &text[..body]),
                rest => format!("{}{s}\n{rest}", &text[..body]),
            }
        }
        None => format!("{}\n\n{s}", text.trim_end()),
    };
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: soak: wrote the Soak section of {}", path.display());
    Ok(())
}

/// The current time in UTC, as `date` prints it (xtask has no date library).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "at an unknown date".into())
}
