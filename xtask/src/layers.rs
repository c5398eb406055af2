//! The workspace's layering, checked: each crate of the runtime lists what it must never
//! depend on, directly or through another crate (normal dependencies only; tests may use
//! anything). ARCHITECTURE.md's "Crates" table is the same list in prose.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Crates of ours above every library crate: only the CLI may know them.
const ABOVE: &[&str] = &["collector", "clap"];

/// (crate, what it must not depend on), besides [`ABOVE`].
const RULES: &[(&str, &[&str])] = &[
    (
        "collector-shared",
        &[
            "tokio",
            "async-nats",
            "wasmtime",
            "sysinfo",
            "collector-fsutil",
            "collector-bundle",
            "collector-fleet",
            "collector-sandbox",
            "collector-deploy",
            "collector-testkit",
            "collector-reference",
            "collector-fuzzing",
        ],
    ),
    (
        "collector-fsutil",
        &[
            "tokio",
            "async-nats",
            "wasmtime",
            "sysinfo",
            "collector-shared",
            "collector-bundle",
        ],
    ),
    (
        "collector-bundle",
        &[
            "tokio",
            "async-nats",
            "wasmtime",
            "sysinfo",
            "collector-fleet",
            "collector-sandbox",
        ],
    ),
    (
        "collector-fleet",
        &[
            "wasmtime",
            "sysinfo",
            "collector-sandbox",
            "collector-deploy",
            "collector-testkit",
        ],
    ),
    (
        "collector-sandbox",
        &[
            "async-nats",
            "collector-fleet",
            "collector-deploy",
            "collector-testkit",
        ],
    ),
    (
        "collector-testkit",
        &["async-nats", "collector-fleet", "collector-deploy"],
    ),
    (
        "collector-reference",
        &[
            "async-nats",
            "collector-fleet",
            "collector-deploy",
            "collector-testkit",
        ],
    ),
    (
        "collector-deploy",
        &["collector-testkit", "collector-reference"],
    ),
    ("collector-fuzzing", &["collector-reference"]),
];

/// The manifest of a library crate of [`RULES`].
fn manifest(root: &std::path::Path, krate: &str) -> std::path::PathBuf {
    match krate {
        "collector-shared" => root.join("shared/Cargo.toml"),
        _ => root
            .join("runtime/crates")
            .join(krate.trim_start_matches("collector-"))
            .join("Cargo.toml"),
    }
}

/// Fails naming every crate that depends on something its layer forbids, or that does
/// not take the workspace's lints (`missing_docs` among them: every library crate
/// documents its public API, and clippy's `-D warnings` makes a gap fail the build).
pub fn check(root: &std::path::Path) -> Result<()> {
    let mut broken = Vec::new();
    for (krate, _) in RULES {
        let path = manifest(root, krate);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let lints = text
            .split("\n[")
            .find(|section| section.starts_with("lints]"))
            .is_some_and(|section| {
                section
                    .lines()
                    .any(|l| l.replace(' ', "") == "workspace=true")
            });
        if !lints {
            broken.push(format!(
                "{krate} does not take the workspace's lints (`[lints] workspace = true` in {})",
                path.display()
            ));
        }
    }
    for (krate, forbidden) in RULES {
        let out = Command::new(env!("CARGO"))
            .current_dir(root)
            .args(["tree", "--quiet", "--package", krate, "--edges", "normal"])
            .args(["--prefix", "none", "--format", "{p}"])
            .output()
            .with_context(|| format!("cannot run cargo tree for {krate}"))?;
        if !out.status.success() {
            bail!(
                "cargo tree --package {krate} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        let names: std::collections::BTreeSet<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n != krate)
            .collect();
        for bad in forbidden.iter().chain(ABOVE) {
            if names.contains(bad) {
                broken.push(format!("{krate} depends on {bad}"));
            }
        }
    }
    if !broken.is_empty() {
        bail!(
            "crate layering broken (see ARCHITECTURE.md, Crates): {}",
            broken.join("; ")
        );
    }
    Ok(())
}
