//! `collector test`: run scenario files against a guest on the mock host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::engine::Sandbox;
use crate::guest::GuestModule;
use crate::testkit::scenario::{self, Scenario};

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
}

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let sandbox = Sandbox::new()?;
    let module = Arc::new(
        GuestModule::from_file(&sandbox, &args.guest)
            .with_context(|| format!("guest {}", args.guest.display()))?,
    );
    let files = expand(&args.scenarios)?;
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let scenario = match Scenario::load(file) {
            Ok(s) => s,
            Err(e) => {
                failed += 1;
                println!("FAIL {}\n  malformed scenario:", file.display());
                for line in e.to_string().lines() {
                    println!("    {line}");
                }
                continue;
            }
        };
        let report = scenario::run(module.clone(), &scenario)?;
        match &report.failure {
            None => {
                passed += 1;
                println!("ok   {} ({} steps)", report.name, report.steps);
            }
            Some(f) => {
                failed += 1;
                println!("FAIL {} ({})\n  {f}", report.name, file.display());
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
