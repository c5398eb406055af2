//! Guests in other languages: installs the JavaScript toolchain (componentize-js, pinned by
//! the example's package-lock.json) from npm into target/tools, builds the JavaScript
//! top-memory guest into target/guests, runs its unit tests under Node, and measures it
//! next to its Rust twin (`bench-polyglot`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use super::{cargo, root, run_step};

/// The JavaScript twin of docs/examples/guest-top-memory.
const JS_EXAMPLE: &str = "docs/examples/guest-top-memory-js";
/// Where the toolchain is installed: a copy of the example's package.json and lock, and
/// their node_modules.
const JS_TOOLS: &str = "target/tools/componentize-js";
/// The component `build_top_memory_js` writes.
const JS_GUEST: &str = "target/guests/top-memory-js.wasm";
/// Oldest Node.js componentize-js 0.23 runs on.
const NODE_MIN_MAJOR: u32 = 18;

/// Installs componentize-js as pinned by the example's package-lock.json into
/// target/tools/componentize-js, unless that exact lock is installed already. Returns the
/// path of its command.
fn ensure_componentize_js() -> Result<PathBuf> {
    let example = root().join(JS_EXAMPLE);
    let tools = root().join(JS_TOOLS);
    let bin = tools.join("node_modules/.bin/componentize-js");
    let lock = std::fs::read(example.join("package-lock.json"))
        .with_context(|| format!("cannot read {JS_EXAMPLE}/package-lock.json"))?;
    if bin.is_file() && std::fs::read(tools.join("package-lock.json")).ok() == Some(lock.clone()) {
        return Ok(bin);
    }
    check_node()?;
    std::fs::create_dir_all(&tools)
        .with_context(|| format!("cannot create {}", tools.display()))?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(example.join(file), tools.join(file))
            .with_context(|| format!("cannot copy {JS_EXAMPLE}/{file} to {JS_TOOLS}"))?;
    }
    run_step(
        &format!(
            "installing componentize-js from npm into {JS_TOOLS} (npm ci, pinned by the lock)"
        ),
        Command::new("npm").current_dir(&tools).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]),
    )
    .with_context(|| {
        format!(
            "the JavaScript example guest needs @bytecodealliance/componentize-js from the npm \
             registry; install it by hand with `cd {JS_TOOLS} && npm ci`"
        )
    })?;
    if !bin.is_file() {
        bail!(
            "npm ci in {JS_TOOLS} succeeded but did not install {}",
            bin.display()
        );
    }
    Ok(bin)
}

/// Fails with what to install when Node.js or npm is missing or too old.
fn check_node() -> Result<()> {
    let help = format!(
        "the JavaScript example guest needs Node.js >= {NODE_MIN_MAJOR} and npm on PATH \
         (Debian: apt-get install nodejs npm)"
    );
    let out = Command::new("node")
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run `node --version`: {help}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .trim()
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= NODE_MIN_MAJOR => {}
        _ => bail!("`node --version` printed {:?}: {help}", text.trim()),
    }
    Command::new("npm")
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run `npm --version`: {help}"))?;
    Ok(())
}

/// The newest modification time among `paths` (files, or the files of directories).
fn newest(paths: &[PathBuf]) -> Option<SystemTime> {
    paths
        .iter()
        .flat_map(|p| match std::fs::read_dir(p) {
            Ok(dir) => dir.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => vec![p.clone()],
        })
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok())
        .max()
}

/// Builds the JavaScript top-memory guest into target/guests/top-memory-js.wasm (unless
/// it is newer than its sources, the WIT and the toolchain's lock) and returns its path.
pub fn build_top_memory_js() -> Result<PathBuf> {
    let componentize = ensure_componentize_js()?;
    let example = root().join(JS_EXAMPLE);
    let out = root().join(JS_GUEST);
    let inputs = [
        example.join("src"),
        example.join("package-lock.json"),
        root().join("wit"),
    ];
    let built = out.metadata().and_then(|m| m.modified()).ok();
    if let (Some(built), Some(newest)) = (built, newest(&inputs))
        && built > newest
    {
        return Ok(out);
    }
    std::fs::create_dir_all(out.parent().expect("target/guests"))?;
    run_step(
        "building the JavaScript example guest (componentize-js)",
        Command::new(&componentize)
            .current_dir(root())
            .arg(example.join("src/guest.js"))
            .args(["--wit", "wit", "--world-name", "collector"])
            // fetch() and the HTTP server would import wasi:http, which no guest gets.
            .args(["--disable", "http", "fetch-event"])
            .arg("--out")
            .arg(&out),
    )?;
    Ok(out)
}

/// Runs the JavaScript guest's unit tests (its logic, natively) with Node's test runner.
pub fn test_js_logic() -> Result<()> {
    check_node()?;
    run_step(
        &format!("running the unit tests of {JS_EXAMPLE} (node --test)"),
        // The dot reporter keeps a passing run to one line and still shows what failed.
        Command::new("node")
            .current_dir(root().join(JS_EXAMPLE))
            .args(["--test", "--test-reporter=dot", "src/"]),
    )
}

/// Measures the top-memory guest in each language and writes the "Guests in other
/// languages" section of BENCHMARKS.md.
pub fn bench(rust_guest: &Path, extra: &[String]) -> Result<()> {
    let js = build_top_memory_js()?;
    run_step(
        "measuring the top-memory guest in each language (release build)",
        cargo()
            .args([
                "bench",
                "--package",
                "collector",
                "--bench",
                "polyglot",
                "--",
            ])
            .arg("--guest")
            .arg(format!("Rust={}", rust_guest.display()))
            .arg("--guest")
            .arg(format!("JavaScript={}", js.display()))
            .arg("--out")
            .arg(root().join("BENCHMARKS.md"))
            .args(extra),
    )
}
