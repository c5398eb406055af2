//! `collector test`: run scenario files against a guest on the mock host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::GuestModule;
use collector_testkit::scenario::{self, Scenario};

/// Test a guest module against scripted scenarios, with no agent, broker or real processes.
///
/// Each scenario (a TOML file; a directory means every .toml file in it) runs against a
/// fresh instance with scripted processes and virtual time. Failures show the step, what
/// was expected and what happened. The last line is the summary `N passed, M failed`; the
/// exit code is non-zero when anything failed. Format: docs/writing-a-guest.md.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The guest component (.wasm) under test.
    #[arg(value_name = "GUEST.wasm")]
    guest: PathBuf,

    /// Scenario files, or directories of them.
    #[arg(value_name = "SCENARIO", required = true)]
    scenarios: Vec<PathBuf>,

    /// Run only the scenarios whose name or file name contains this text (repeat for
    /// several: a scenario runs when any matches).
    #[arg(long, value_name = "TEXT")]
    filter: Vec<String>,

    /// A module that `swap` steps may name, besides the guest under test (repeat for
    /// several): `--module top-memory=target/wasm32-wasip2/release/guest_top_memory.wasm`.
    #[arg(long = "module", value_name = "NAME=PATH", value_parser = parse_module)]
    modules: Vec<(String, PathBuf)>,

    /// Print one JSON document instead of the text report, for CI systems:
    /// `{"guest":…,"passed":N,"failed":M,"scenarios":[{"name","file","passed","steps","failure"}]}`.
    #[arg(long)]
    json: bool,
}

/// One scenario's outcome, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    name: String,
    file: String,
    passed: bool,
    steps: usize,
    /// What went wrong (the text report's message), when it failed.
    failure: Option<String>,
}

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let sandbox = Sandbox::new()?;
    let module = Arc::new(
        GuestModule::from_file(&sandbox, &args.guest)
            .with_context(|| format!("guest {}", args.guest.display()))?,
    );
    let mut modules = scenario::Modules::new();
    for (name, path) in &args.modules {
        let module = GuestModule::from_file(&sandbox, path)
            .with_context(|| format!("--module {name}={}", path.display()))?;
        anyhow::ensure!(
            modules.insert(name.clone(), Arc::new(module)).is_none(),
            "--module {name}: given twice"
        );
    }
    let files = expand(&args.scenarios)?;
    let wanted = |name: &str, file: &std::path::Path| {
        args.filter.is_empty()
            || args
                .filter
                .iter()
                .any(|f| name.contains(f.as_str()) || file.to_string_lossy().contains(f.as_str()))
    };
    let mut outcomes = Vec::new();
    for file in &files {
        let scenario = match Scenario::load(file) {
            Ok(s) => s,
            Err(e) if wanted("", file) => {
                outcomes.push(Outcome {
                    name: file.display().to_string(),
                    file: file.display().to_string(),
                    passed: false,
                    steps: 0,
                    failure: Some(format!("malformed scenario:\n{e}")),
                });
                continue;
            }
            Err(_) => continue,
        };
        if !wanted(&scenario.name, file) {
            continue;
        }
        let report = scenario::run_with_modules(module.clone(), &modules, &scenario)?;
        outcomes.push(Outcome {
            passed: report.passed(),
            failure: report.failure.as_ref().map(ToString::to_string),
            name: report.name,
            file: file.display().to_string(),
            steps: report.steps,
        });
    }
    anyhow::ensure!(
        !outcomes.is_empty(),
        "--filter {}: no scenario among {} matches",
        args.filter.join(", "),
        files.len()
    );
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let failed = outcomes.len() - passed;
    if args.json {
        let report = serde_json::json!({
            "guest": args.guest.display().to_string(),
            "passed": passed,
            "failed": failed,
            "scenarios": outcomes,
        });
        println!("{report}");
    } else {
        for o in &outcomes {
            match &o.failure {
                None => println!("ok   {} ({} steps)", o.name, o.steps),
                Some(f) => {
                    println!("FAIL {} ({})", o.name, o.file);
                    for line in f.lines() {
                        println!("  {line}");
                    }
                }
            }
        }
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `NAME=PATH`, as `--module` takes it.
fn parse_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!(
            "expected NAME=PATH, such as top-memory=guest_top_memory.wasm, got {s:?}"
        )),
    }
}

/// Files as given, directories replaced by their `.toml` files in name order.
fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension() == Some("toml".as_ref()))
                .collect();
            found.sort();
            anyhow::ensure!(
                !found.is_empty(),
                "{}: no .toml scenario files in it",
                p.display()
            );
            files.extend(found);
        } else {
            files.push(p.to_path_buf());
        }
    }
    Ok(files)
}
