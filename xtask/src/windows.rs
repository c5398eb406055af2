//! `cargo xtask windows-smoke` (and a step of `cargo xtask test`): cross-builds the agent
//! for `x86_64-pc-windows-gnu` and runs it under Wine: keys, a bundle and a trust root
//! made and checked by the Windows binary, the signed run publishing ProcessPerf lines, a
//! restart on the last-known-good, a hot swap from `--modules`, the rollback of a
//! trapping swap, and the scenario suite under the mock host.
//!
//! What it needs is installed when missing, as nats-server is: the rustup target, and
//! Debian's `gcc-mingw-w64-x86-64` and `wine64` (through apt-get, as root). Wine 8.0 lacks
//! `bcryptprimitives.dll`, from which Rust's standard library takes its randomness on
//! Windows 10 and later: a stand-in (`xtask/wine/bcryptprimitives.c`, forwarding to
//! `RtlGenRandom`) is built next to the test's `collector.exe`, never shipped.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::{cargo, root, run_step};

/// The Windows target the agent is cross-built for.
pub const TARGET: &str = "x86_64-pc-windows-gnu";
/// The C compiler of that target (and the linker rustc uses for it).
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";
/// Debian's packages that provide it and Wine.
const PACKAGES: [&str; 2] = ["gcc-mingw-w64-x86-64", "wine64"];
/// A machine id the `fault-trap` guest traps on: `fnv1a_32("wine-3") % 100` is 4, under
/// the build's 30 (guest-process-perf/src/lib.rs).
const TRAPPING_PC: &str = "wine-3";
/// Longest one step may take under Wine (its first start creates the prefix).
const STEP_TIMEOUT: Duration = Duration::from_secs(240);

/// Installs what the smoke run needs, builds the Windows agent and runs the smoke steps.
pub fn smoke(guest: &Path, trap_guest: &Path, top_memory: &Path) -> Result<()> {
    let wine = ensure_tools()?;
    run_step(
        &format!("cross-building the agent for {TARGET}"),
        cargo().args([
            "build",
            "--quiet",
            "--package",
            "collector",
            "--bin",
            "collector",
            "--target",
            TARGET,
        ]),
    )?;
    let dir = root().join("target/windows-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let exe = root().join(format!("target/{TARGET}/debug/collector.exe"));
    std::fs::copy(&exe, dir.join("collector.exe"))
        .with_context(|| format!("cannot copy {}", exe.display()))?;
    run_step(
        "building the bcryptprimitives.dll stand-in for Wine",
        Command::new(MINGW_GCC)
            .args(["-shared", "-O2", "-o"])
            .arg(dir.join("bcryptprimitives.dll"))
            .arg(root().join("xtask/wine/bcryptprimitives.c"))
            .arg("-ladvapi32"),
    )?;
    std::fs::copy(guest, dir.join("process-perf.wasm"))?;
    std::fs::copy(trap_guest, dir.join("process-perf-trap.wasm"))?;
    std::fs::copy(top_memory, dir.join("top-memory.wasm"))?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"process_perf_enabled": true, "host_perf_interval": "1s", "process_perf_top_n": 5}"#,
    )?;
    let w = Wine { wine, dir };
    let started = Instant::now();
    // Wine's server outlives the programs it ran by a few seconds: stopped at the end,
    // whatever happened.
    let _stop = StopWineServer;
    w.steps()?;
    eprintln!(
        "xtask: windows smoke run passed under Wine in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Finds (or installs) the target, the mingw compiler and Wine; returns the `wine64`
/// program.
fn ensure_tools() -> Result<PathBuf> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        run_step(
            &format!("installing the {TARGET} target"),
            Command::new("rustup").args(["target", "add", TARGET]),
        )?;
    }
    let have_gcc = Command::new(MINGW_GCC)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_gcc || find_wine().is_none() {
        install_packages()?;
    }
    find_wine().context("wine64 is still missing after installing it")
}

fn find_wine() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("wine64"))
        .chain([PathBuf::from("/usr/lib/wine/wine64")])
        .find(|p| p.is_file())
}

fn install_packages() -> Result<()> {
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let have_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(root_user && have_apt) {
        bail!(
            "the Windows smoke run needs {MINGW_GCC} and wine64: install them with \
             `apt-get install {}` (as root), or skip the run with COLLECTOR_SKIP_WINDOWS=1",
            PACKAGES.join(" ")
        );
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("xtask: installing {} with apt-get", PACKAGES.join(" "));
    if install() {
        return Ok(());
    }
    run_step(
        "updating apt's package lists",
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !install() {
        bail!("apt-get install {} failed", PACKAGES.join(" "));
    }
    Ok(())
}

/// Stops the Wine server of the smoke run's prefix when dropped.
struct StopWineServer;

impl Drop for StopWineServer {
    fn drop(&mut self) {
        let server = [
            "wineserver",
            "/usr/lib/wine/wineserver64",
            "/usr/lib/wine/wineserver",
        ]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok());
        if let Some(server) = server {
            let _ = Command::new(server)
                .arg("-k")
                .env("WINEPREFIX", prefix())
                .status();
        }
    }
}

fn prefix() -> PathBuf {
    root().join("target/wine-prefix")
}

/// The smoke run's directory and how to run a program there under Wine.
struct Wine {
    wine: PathBuf,
    dir: PathBuf,
}

/// A `collector.exe` running under Wine, its output lines on channels; killed (with
/// Wine's server) when dropped.
struct Running {
    child: std::process::Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Waits for a line of stdout (`out`) or stderr that contains every needle.
    fn wait_line(&mut self, out: bool, needles: &[&str], what: &str) -> Result<String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let rx = if out { &self.stdout } else { &self.stderr };
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    let found = needles.iter().all(|n| line.contains(n));
                    self.seen.push(line.clone());
                    if found {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    let mut log: Vec<String> = self.stderr.try_iter().collect();
                    log.splice(0..0, self.seen.iter().cloned());
                    let tail = log.len().saturating_sub(40);
                    bail!(
                        "{what}: no line with {needles:?} within {STEP_TIMEOUT:?}; output:\n{}",
                        log[tail..].join("\n")
                    );
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
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

impl Wine {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.wine);
        cmd.arg("collector.exe")
            .args(args)
            .current_dir(&self.dir)
            .env("WINEPREFIX", prefix())
            .env("WINEDEBUG", "-all")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `collector.exe args` to the end; it must succeed. Returns its stdout.
    fn ok(&self, what: &str, args: &[&str]) -> Result<String> {
        eprintln!("xtask: windows: {what}");
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.wine.display()))?;
        let (out, err) = (
            lines(child.stdout.take().expect("piped")),
            lines(child.stderr.take().expect("piped")),
        );
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what}: collector.exe {args:?} did not finish within {STEP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout: Vec<String> = out.iter().collect();
        let stderr: Vec<String> = err.iter().collect();
        if !status.success() {
            bail!(
                "{what}: collector.exe {args:?} failed ({status}):\n{}\n{}",
                stdout.join("\n"),
                stderr.join("\n")
            );
        }
        Ok(stdout.join("\n"))
    }

    fn start(&self, what: &str, args: &[&str]) -> Result<Running> {
        eprintln!("xtask: windows: {what}");
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.wine.display()))?;
        Ok(Running {
            stdout: lines(child.stdout.take().expect("piped")),
            stderr: lines(child.stderr.take().expect("piped")),
            child,
            seen: Vec::new(),
        })
    }

    fn sign(&self, guest: &str, version: u64, out: &str) -> Result<()> {
        let v = version.to_string();
        self.ok(
            &format!("signing {guest} as version {version}"),
            &[
                "module",
                "sign",
                "--key",
                "signer",
                "--name",
                "process-perf",
                "--version",
                &v,
                guest,
                "--out",
                out,
            ],
        )
        .map(drop)
    }

    fn drop_in(&self, dir: &str, name: &str, from: &str) -> Result<()> {
        let tmp = self.dir.join(dir).join(format!(".{name}.partial"));
        std::fs::copy(self.dir.join(from), &tmp)?;
        std::fs::rename(&tmp, self.dir.join(dir).join(name))?;
        Ok(())
    }

    fn steps(&self) -> Result<()> {
        let version = self.ok(
            "collector.exe --version (the first start makes the prefix)",
            &["--version"],
        )?;
        if !version.starts_with("collector ") {
            bail!("--version printed {version:?}");
        }
        // Keys, a trust root and bundles, made and checked by the Windows binary.
        for key in ["root1", "signer"] {
            self.ok(
                &format!("module keygen {key}"),
                &["module", "keygen", "--out", key],
            )?;
        }
        self.ok(
            "trust init, sign, verify",
            &[
                "trust",
                "init",
                "--root-key",
                "root1.pub",
                "--root-threshold",
                "1",
                "--signing-key",
                "signer.pub",
                "--out",
                "v1.root",
            ],
        )?;
        self.ok(
            "trust sign",
            &["trust", "sign", "v1.root", "--key", "root1"],
        )?;
        self.ok("trust verify", &["trust", "verify", "v1.root"])?;
        self.sign("process-perf.wasm", 1, "pp-1.bundle")?;
        self.sign("process-perf.wasm", 2, "pp-2.bundle")?;
        self.sign("process-perf-trap.wasm", 3, "pp-3-trap.bundle")?;
        self.ok(
            "module verify --trust-root",
            &["module", "verify", "--trust-root", "v1.root", "pp-1.bundle"],
        )?;

        // The signed run: ProcessPerf lines, then a restart on the last-known-good.
        let run = |extra: &[&str]| -> Vec<String> {
            let mut args: Vec<String> = [
                "run",
                "--trust-root",
                "v1.root",
                "--config",
                "config.json",
                "--pc-id",
                TRAPPING_PC,
                "--min-interval",
                "100ms",
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
            args.extend(extra.iter().map(|s| (*s).to_string()));
            args
        };
        let pc = format!("\"pc_id\":\"{TRAPPING_PC}\"");
        {
            let args = run(&["--guest", "pp-1.bundle", "--state-dir", "state"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut agent = self.start("the signed run", &args)?;
            // Wine keeps no access lists: the agent must know where it runs.
            agent.wait_line(false, &["running under Wine"], "the Wine warning")?;
            for _ in 0..2 {
                agent.wait_line(true, &["{\"", &pc], "a ProcessPerf line")?;
            }
            agent.wait_line(
                false,
                &["saved as the last-known-good"],
                "the last-known-good",
            )?;
        }
        {
            let args = run(&["--state-dir", "state"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut agent = self.start("a restart on the last-known-good", &args)?;
            agent.wait_line(
                false,
                &["starting with the last-known-good module"],
                "the restart",
            )?;
            agent.wait_line(true, &["{\"", &pc], "a ProcessPerf line after the restart")?;
        }

        // Hot swap from --modules, then a trapping version rolled back.
        std::fs::create_dir_all(self.dir.join("modules"))?;
        self.drop_in("modules", "pp-1.bundle", "pp-1.bundle")?;
        let args = run(&[
            "--modules",
            "modules",
            "--modules-poll",
            "200ms",
            "--state-dir",
            "state-swap",
            "--health-ticks",
            "10",
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut agent = self.start("hot swap and rollback from --modules", &args)?;
        agent.wait_line(true, &["{\"", &pc], "a ProcessPerf line of v1")?;
        self.drop_in("modules", "pp-2.bundle", "pp-2.bundle")?;
        agent.wait_line(false, &["swapping", "process-perf v2"], "the swap to v2")?;
        agent.wait_line(false, &["saved as the last-known-good", "v2"], "v2 healthy")?;
        self.drop_in("modules", "pp-3-trap.bundle", "pp-3-trap.bundle")?;
        agent.wait_line(
            false,
            &["rolling back to the previous module"],
            "the rollback of v3",
        )?;
        while agent.stdout.try_recv().is_ok() {}
        agent.wait_line(true, &["{\"", &pc], "a ProcessPerf line after the rollback")?;
        drop(agent);

        // The scenario suite, under the mock host.
        let scenarios = root().join("guest-process-perf/scenarios");
        let scenarios = windows_path(&scenarios);
        self.ok(
            "the scenario suite under the mock host",
            &[
                "test",
                "process-perf.wasm",
                &scenarios,
                "--module=top-memory=top-memory.wasm",
            ],
        )?;
        Ok(())
    }
}

/// A Linux absolute path as Wine's Z: drive shows it.
fn windows_path(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}
