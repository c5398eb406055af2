//! The `collector` binary as a user meets it: help, bad input, and a config file edited
//! while the agent runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use collector_shared::ProcessPerf;

use crate::common::*;

fn collector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collector"))
}

fn run_fails_with(args: &[&str], expected: &[&str]) {
    let out = collector().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for e in expected {
        assert!(
            stderr.contains(e),
            "stderr of {args:?} lacks {e:?}:\n{stderr}"
        );
    }
}

#[test]
fn help_explains_every_run_flag() {
    let out = collector().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--guest",
        "--config",
        "--nats-url",
        "--pc-id",
        "--grant",
        "--call-timeout",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
}

#[test]
fn a_missing_or_non_component_guest_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.wasm");
    run_fails_with(
        &["run", "--guest", missing.to_str().unwrap()],
        &["nope.wasm", "No such file"],
    );

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "hello").unwrap();
    run_fails_with(
        &["run", "--guest", text.to_str().unwrap()],
        &["notes.wasm", "not a WebAssembly file"],
    );

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, wat::parse_str("(module)").unwrap()).unwrap();
    run_fails_with(
        &["run", "--guest", core.to_str().unwrap()],
        &["core.wasm", "core WebAssembly module, not a component"],
    );
}

#[test]
fn a_bad_config_at_start_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.json");
    std::fs::write(&cfg, r#"{"process_perf_top_n": "lots"}"#).unwrap();
    let guest = guest_wasm();
    run_fails_with(
        &[
            "run",
            "--guest",
            guest.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        &["agent.json", "process_perf_top_n", "expected u32"],
    );
}

/// The agent process with its output read line by line on background threads.
struct Running {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Running {
    fn start(guest: &Path, config: &Path) -> Self {
        let mut child = collector()
            .args([
                "run",
                "--pc-id",
                PC_ID,
                "--min-interval",
                "10ms",
                "--config-poll",
                "50ms",
            ])
            .arg("--guest")
            .arg(guest)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
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
}

impl Drop for Running {
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

fn next_message(rx: &Receiver<String>) -> ProcessPerf {
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a ProcessPerf line on stdout");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn stderr_line_containing(rx: &Receiver<String>, needle: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn config_file_edits_apply_while_running_and_bad_edits_keep_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.json");
    std::fs::write(&cfg, r#"{"host_perf_interval": "100ms"}"#).unwrap();
    let agent = Running::start(&guest_wasm(), &cfg);
    stderr_line_containing(&agent.stderr, "agent started");
    assert!(
        agent
            .stdout
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "process_perf is off by default"
    );

    std::fs::write(
        &cfg,
        r#"{"host_perf_interval": "100ms", "process_perf_enabled": true, "process_perf_top_n": 3}"#,
    )
    .unwrap();
    let msg = next_message(&agent.stdout);
    assert_eq!(msg.pc_id, PC_ID);
    assert!(msg.processes.len() <= 3);

    std::fs::write(
        &cfg,
        r#"{"process_perf_enabled": true, "process_perf_top_n": -3}"#,
    )
    .unwrap();
    let line = stderr_line_containing(&agent.stderr, "keeping the last good configuration");
    assert!(line.contains("agent.json"), "{line}");
    assert!(line.contains("process_perf_top_n"), "{line}");
    // Drain what was published before the bad edit, then check the loop goes on.
    while agent.stdout.try_recv().is_ok() {}
    let msg = next_message(&agent.stdout);
    assert!(msg.processes.len() <= 3, "still the last good top_n");
}
