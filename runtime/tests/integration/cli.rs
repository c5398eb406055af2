//! The `collector` binary as a user meets it: help, bad input, and a config file edited
//! while the agent runs.

use std::process::Command;
use std::time::Duration;

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
        &[
            "run",
            "--insecure-allow-unsigned",
            "--guest",
            missing.to_str().unwrap(),
        ],
        &["nope.wasm", "No such file"],
    );

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "hello").unwrap();
    run_fails_with(
        &[
            "run",
            "--insecure-allow-unsigned",
            "--guest",
            text.to_str().unwrap(),
        ],
        &["notes.wasm", "not a WebAssembly file"],
    );

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, wat::parse_str("(module)").unwrap()).unwrap();
    run_fails_with(
        &[
            "run",
            "--insecure-allow-unsigned",
            "--guest",
            core.to_str().unwrap(),
        ],
        &["core.wasm", "core WebAssembly module, not a component"],
    );

    let guest = guest_wasm();
    run_fails_with(
        &["run", "--guest", guest.to_str().unwrap()],
        &["not a signed bundle", "--insecure-allow-unsigned"],
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
            "--insecure-allow-unsigned",
            "--guest",
            guest.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        &["agent.json", "process_perf_top_n", "expected u32"],
    );
}

#[test]
fn config_file_edits_apply_while_running_and_bad_edits_keep_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.json");
    std::fs::write(&cfg, r#"{"host_perf_interval": "100ms"}"#).unwrap();
    let agent = AgentProcess::start(&[
        "--insecure-allow-unsigned".as_ref(),
        "--config-poll".as_ref(),
        "50ms".as_ref(),
        "--guest".as_ref(),
        guest_wasm().as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]);
    agent.stderr_line_containing("agent started");
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
    let msg = agent.next_message();
    assert_eq!(msg.pc_id, PC_ID);
    assert!(msg.processes.len() <= 3);

    std::fs::write(
        &cfg,
        r#"{"process_perf_enabled": true, "process_perf_top_n": -3}"#,
    )
    .unwrap();
    let line = agent.stderr_line_containing("keeping the last good configuration");
    assert!(line.contains("agent.json"), "{line}");
    assert!(line.contains("process_perf_top_n"), "{line}");
    // Drain what was published before the bad edit, then check the loop goes on.
    while agent.stdout.try_recv().is_ok() {}
    let msg = agent.next_message();
    assert!(msg.processes.len() <= 3, "still the last good top_n");
}

const SCENARIO_HEAD: &str = r#"
pc_id = "pc-1"
[[step]]
config = { process_perf_enabled = true }
[[step]]
processes = [{ pid = 7, name = "seven", cpu = 50.0 }, { pid = 8, name = "eight", cpu = 10.0 }]
[[step]]
tick = true
"#;

#[test]
fn collector_test_passes_good_scenarios_and_explains_a_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "{SCENARIO_HEAD}[[step]]\nexpect_publish = {{ ordered = true, json = {{ processes = [{{ pid = 7 }}, {{ pid = 8 }}] }} }}\n"
        ),
    )
    .unwrap();
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        format!(
            "{SCENARIO_HEAD}[[step]]\nexpect_publish = {{ ordered = true, json = {{ processes = [{{ pid = 8 }}, {{ pid = 7 }}] }} }}\n"
        ),
    )
    .unwrap();
    let guest = guest_wasm();

    let out = collector()
        .arg("test")
        .arg(&guest)
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ok   good (4 steps)"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("1 passed, 0 failed"));

    let out = collector()
        .arg("test")
        .arg(&guest)
        .arg(&good)
        .arg(&wrong)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL wrong"), "{stdout}");
    assert!(
        stdout.contains("step 4 (line 9) expect_publish"),
        "{stdout}"
    );
    assert!(
        stdout.contains("at processes[0].pid: expected 8, got 7"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"name\": \"seven\""),
        "the published JSON is shown: {stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("1 passed, 1 failed"));

    // For CI systems: one JSON document, and a filter on names.
    let json_run = |filter: &str| {
        let out = collector()
            .arg("test")
            .arg(&guest)
            .arg(dir.path())
            .args(["--json", "--filter", filter])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.success(), report)
    };
    let (ok, report) = json_run("good");
    assert!(ok, "{report}");
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(report["scenarios"][0]["name"], "good");
    assert_eq!(report["scenarios"][0]["steps"], 4);
    let (ok, report) = json_run("wrong");
    assert!(!ok, "{report}");
    assert_eq!(report["scenarios"].as_array().map(Vec::len), Some(1));
    assert!(
        report["scenarios"][0]["failure"]
            .as_str()
            .is_some_and(|f| f.contains("expected 8, got 7")),
        "{report}"
    );
    let out = collector()
        .arg("test")
        .arg(&guest)
        .arg(dir.path())
        .args(["--filter", "nothing-matches"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--filter nothing-matches"), "{stderr}");
}

#[test]
fn collector_test_reports_a_malformed_scenario_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[step]]\ntick = true\n\n[[step]]\nexpect_samples = \"two\"\n",
    )
    .unwrap();
    let out = collector()
        .arg("test")
        .arg(guest_wasm())
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("bad.toml"), "{stdout}");
    assert!(stdout.contains("line 5"), "{stdout}");
    assert!(stdout.contains("expected u64"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed"));
}

/// Scenarios that use every addition to the format with a wrong expectation: each must
/// fail, and say which file, step and field, and what was expected against what happened.
const WRONG_SCENARIOS: &[(&str, &str, &[&str])] = &[
    (
        "exit",
        r#"[[step]]
config = { process_perf_enabled = true }
[[step]]
processes = [{ pid = 2, name = "cc1", cpu = 9.0, exits_after_sample = true }]
[[step]]
tick = true
[[step]]
expect_publish = { ordered = true, json = { processes = [{ pid = 2, name = "cc1" }] } }
"#,
        &[
            "step 4 (line 7) expect_publish",
            "at processes[0].name: expected \"cc1\", got \"\"",
        ],
    ),
    (
        "fail-sample",
        r#"[[step]]
config = { process_perf_enabled = true }
[[step]]
fail_sample = "no procfs"
[[step]]
tick = true
[[step]]
label = "wrongly expects a message"
expect_publish = {}
"#,
        &[
            "step 4 (line 7) expect_publish \"wrongly expects a message\"",
            "expected a publish, but the guest published nothing more",
        ],
    ),
    (
        "layers",
        r#"pc_id = "pc-1"
[[step]]
layer = { scope = "global", value = { process_perf_enabled = true } }
[[step]]
layer = { scope = "groups.canary", value = { process_perf_top_n = 1 } }
[[step]]
processes = [{ pid = 1, cpu = 2.0 }, { pid = 2, cpu = 1.0 }]
[[step]]
tick = true
[[step]]
label = "the PC is in no group: the canary layer does not apply"
expect_publish = { json = { processes = [{ pid = 1 }] } }
"#,
        &[
            "step 5 (line 10) expect_publish",
            "at processes: expected 1 elements, got 2 elements",
        ],
    ),
    (
        "unset",
        r#"[[step]]
config = { process_perf_enabled = true, host_perf_interval = "10s" }
[[step]]
unset = ["host_perf_interval"]
[[step]]
expect_interval = "10s"
"#,
        &[
            "step 3 (line 5) expect_interval",
            "expected interval 10s, the guest asks for 1m",
        ],
    ),
    (
        "handoff",
        r#"[[step]]
tick = true
[[step]]
swap = {}
[[step]]
expect_handoff = "refused"
"#,
        &[
            "step 3 (line 5) expect_handoff",
            "expected handoff \"refused\", got \"carried\"",
        ],
    ),
    (
        "handoff-reason",
        r#"[[step]]
tick = true
[[step]]
swap = { state = "garbage" }
[[step]]
expect_handoff = { result = "refused", contains = "too old" }
"#,
        &[
            "step 3 (line 5) expect_handoff",
            "expected the refused handoff's reason to contain \"too old\", it is \"unrecognised state",
        ],
    ),
    (
        "module",
        r#"[[step]]
swap = { module = "nope" }
"#,
        &[
            "step 1 (line 1) swap",
            "no module named `nope`: pass `--module nope=PATH` to collector test (given: top-memory)",
        ],
    ),
    (
        "relative",
        r#"[[step]]
config = { process_perf_enabled = true, host_perf_interval = "7s" }
[[step]]
processes = [{ pid = 3, read = 0 }]
[[step]]
run = "0s"
[[step]]
processes = [{ pid = 3, read = 1000000 }]
[[step]]
run = "7s"
[[step]]
expect_publish = {}
[[step]]
expect_publish = { relative_tolerance = 0.001, json = { processes = [{ disk_read_bytes_per_sec = 142000 }] } }
"#,
        &[
            "step 7 (line 13) expect_publish",
            "at processes[0]: expected {\"disk_read_bytes_per_sec\":142000}, got no matching element",
        ],
    ),
    (
        "extra-keys",
        r#"[[step]]
config = { process_perf_enabled = true }
[[step]]
processes = [{ pid = 3 }]
[[step]]
tick = true
[[step]]
expect_publish = { exact_keys = true, ordered = true, json = { pc_id = "test-pc", at = "$any", processes = [{ pid = 3, name = "", cpu_pct = 0 }] } }
"#,
        &[
            "step 4 (line 7) expect_publish",
            "at processes[0].rss_bytes: expected no such key (exact_keys: the pattern does not name it), got 0",
        ],
    ),
    (
        "malformed",
        r#"pc_id = "pc-1"
[[step]]
tick = true
[[step]]
layer = { scope = "group.canary", value = {} }
"#,
        &[
            "malformed scenario",
            "malformed.toml: step 2 (line 4): `layer.scope`: expected \"global\", \"groups.<name>\" or \"pcs.pc-1\", got \"group.canary\"",
        ],
    ),
];

#[test]
fn collector_test_explains_wrong_expectations_of_every_format_addition() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, _) in WRONG_SCENARIOS {
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
    }
    let out = collector()
        .arg("test")
        .arg(guest_wasm())
        .arg(dir.path())
        .arg(format!(
            "--module=top-memory={}",
            top_memory_wasm().display()
        ))
        .arg("--json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["passed"], 0, "{report:#}");
    assert_eq!(report["failed"], WRONG_SCENARIOS.len(), "{report:#}");
    for (name, _, wanted) in WRONG_SCENARIOS {
        let scenario = report["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s["file"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/{name}.toml"))
            })
            .unwrap_or_else(|| panic!("{name} is not in the report: {report:#}"));
        let failure = scenario["failure"].as_str().unwrap_or_default();
        for w in *wanted {
            assert!(failure.contains(w), "{name}: {w:?} not in:\n{failure}");
        }
    }
}

#[test]
fn collector_test_refuses_a_bad_module_flag() {
    run_fails_with(
        &["test", "guest.wasm", "s.toml", "--module", "top-memory"],
        &["--module", "expected NAME=PATH"],
    );
    let guest = guest_wasm();
    let guest = guest.to_str().unwrap();
    run_fails_with(
        &["test", guest, "s.toml", "--module", "x=/nonexistent.wasm"],
        &["--module x=/nonexistent.wasm"],
    );
}
