//! Staged rollouts through the real binary and a real nats-server: agents (the
//! `collector` binary) place themselves from the rollout's assignment, report per-module
//! health, and a controller (`collector rollout run`, another process) advances waves,
//! halts on a failing gate and sends the agents back. The bad versions are the default
//! guest built with a fault (guest-process-perf's `fault-*` features): they pass their
//! probation, then misbehave.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use collector_bundle::Manifest;
use collector_fleet::rollout::{Phase, ROLLOUTS_BUCKET, Rollout};
use collector_fleet::status::ObsEvent;
use collector_fleet::{ASSIGNMENTS_BUCKET, GROUPS_BUCKET, STATUS_BUCKET};

use crate::common::*;
use crate::fleet::{Fleet, enable, runs, version_of};
use crate::fleet_cli::{fails, ok};

/// A bundle of `component` as process-perf `version`, which agents may leave for any
/// version down to `floor`.
fn bundle(component: &[u8], version: u64, floor: Option<u64>) -> Vec<u8> {
    let mut manifest = Manifest::describe("process-perf", version, component, chrono::Utc::now());
    manifest.rollback_floor = floor;
    collector_bundle::sign(&manifest, component, &[&key(1)]).unwrap()
}

/// A rollout controller process (`collector rollout run`), killed when the test ends.
fn controller(fleet: &Fleet) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["rollout", "run"])
            .env("NATS_URL", &fleet.server.url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn rollout_of(fleet: &Fleet) -> Option<Rollout> {
    let kv = fleet
        .rt
        .block_on(fleet.js.get_key_value(ROLLOUTS_BUCKET))
        .ok()?;
    let bytes = fleet.rt.block_on(kv.get("process-perf")).unwrap()?;
    Some(Rollout::from_json(&bytes).unwrap())
}

/// Waits for the rollout to satisfy `cond`, watching every agent's record meanwhile:
/// returns the rollout and, per PC, every process-perf version its records showed.
fn follow(
    fleet: &Fleet,
    pcs: &[String],
    limit: Duration,
    seen: &mut BTreeMap<String, BTreeSet<u64>>,
    mut cond: impl FnMut(&Rollout) -> bool,
) -> Rollout {
    let deadline = Instant::now() + limit;
    loop {
        for pc in pcs {
            if let Some(v) = fleet
                .status(pc)
                .as_ref()
                .and_then(|s| version_of(s, "process-perf"))
            {
                seen.entry(pc.clone()).or_default().insert(v);
            }
        }
        let r = rollout_of(fleet);
        if let Some(r) = &r
            && cond(r)
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "rollout not there within {limit:?}: {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Eight agents on v1 (pc-0 and pc-1 in group canary), publishing every 250 ms, and v2
/// (`v2_component`, rollback floor 1) published.
fn fleet_on_v1(v2_component: &[u8]) -> (Fleet, Vec<String>, Vec<AgentProcess>) {
    let fleet = Fleet::start();
    let good = std::fs::read(guest_wasm()).unwrap();
    fleet.put_module("process-perf", 1, &bundle(&good, 1, None));
    fleet.put_module("process-perf", 2, &bundle(v2_component, 2, Some(1)));
    enable(&fleet, "global", "250ms");
    fleet.assign("global", &[("process-perf", 1)]);
    for pc in ["pc-0", "pc-1"] {
        fleet.put(GROUPS_BUCKET, pc, br#"{"groups":["canary"]}"#);
    }
    let pcs: Vec<String> = (0..8).map(|i| format!("pc-{i}")).collect();
    let agents = pcs.iter().map(|pc| fleet.agent(pc, &[])).collect();
    for pc in &pcs {
        fleet.wait_status(pc, Duration::from_secs(30), "v1 publishing", |s| {
            runs(s, "process-perf", 1)
                && s.modules[0]
                    .health
                    .is_some_and(|h| h.ticks >= 4 && h.published >= 2)
        });
    }
    (fleet, pcs, agents)
}

fn events(fleet: &Fleet, sub: &mut async_nats::Subscriber) -> Vec<ObsEvent> {
    let mut out = Vec::new();
    while let Some(bytes) = fleet.next(sub, Duration::from_millis(300)) {
        out.push(serde_json::from_slice(&bytes).unwrap());
    }
    out
}

#[test]
fn a_version_that_goes_silent_after_probation_is_halted_in_its_first_wave_and_reverted() {
    let silent = std::fs::read(fault_wasm("silent")).unwrap();
    let (fleet, pcs, _agents) = fleet_on_v1(&silent);
    // A record that is no status at all, and one full of markup, on the broker: the
    // controller judges around them.
    fleet.put(STATUS_BUCKET, "pc-junk", b"\x00\xff not json");
    let mut sub = fleet.subscribe("obs.rollouts");
    let _controller = controller(&fleet);
    let started = ok(
        &fleet.server,
        &[
            "rollout",
            "start",
            "process-perf",
            "2",
            "--global",
            "--waves",
            "canary,50%,100%",
            "--bake",
            "20s",
            "--min-ticks",
            "4",
        ],
    );
    assert!(started.contains("v1 -> v2"), "{started}");
    assert!(
        started.contains("agents that moved go back to v1"),
        "{started}"
    );
    let mut seen = BTreeMap::new();
    let r = follow(&fleet, &pcs, Duration::from_secs(60), &mut seen, |r| {
        r.phase == Phase::Halted
    });
    let halted_at = Instant::now();
    let halt = r.halt.clone().unwrap();
    assert_eq!(halt.gate, "data-plane", "{halt:#?}");
    assert!(halt.reverted, "{halt:#?}");
    assert_eq!(r.wave, 0, "halted in the canary wave: {r:#?}");
    assert!(
        halt.agents
            .iter()
            .all(|a| a.starts_with("pc-0") || a.starts_with("pc-1")),
        "{halt:#?}"
    );
    assert!(!halt.agents.is_empty());
    // The canaries go back to v1; nobody else ever ran v2.
    for pc in &pcs[..2] {
        fleet.wait_status(pc, Duration::from_secs(10), "back on v1", |s| {
            version_of(s, "process-perf") == Some(1)
        });
    }
    assert!(halted_at.elapsed() < Duration::from_secs(10));
    for pc in &pcs[2..] {
        assert_eq!(
            seen.get(pc).cloned().unwrap_or_default(),
            BTreeSet::from([1]),
            "{pc}"
        );
    }
    // The assignment is v1 again, with no rollout in it; the status command says why.
    let kv = fleet
        .rt
        .block_on(fleet.js.get_key_value(ASSIGNMENTS_BUCKET))
        .unwrap();
    let global = fleet.rt.block_on(kv.get("global")).unwrap().unwrap();
    assert_eq!(
        &global[..],
        br#"{"modules":{"process-perf":{"version":1}}}"#
    );
    let status = ok(&fleet.server, &["rollout", "status", "process-perf"]);
    assert!(status.contains("halted by the data-plane gate"), "{status}");
    assert!(status.contains("tripped: pc-"), "{status}");
    let fleet_status = ok(&fleet.server, &["fleet", "status"]);
    assert!(
        fleet_status.contains("rollout: process-perf v1->v2 halted"),
        "{fleet_status}"
    );
    // kanade's timeline heard it start and halt, with the gate.
    let kinds: Vec<ObsEvent> = events(&fleet, &mut sub);
    let started = kinds
        .iter()
        .filter(|e| e.kind == "collector_rollout_started")
        .count();
    let halted: Vec<&ObsEvent> = kinds
        .iter()
        .filter(|e| e.kind == "collector_rollout_halted")
        .collect();
    assert_eq!((started, halted.len()), (1, 1), "{kinds:#?}");
    assert_eq!(halted[0].payload["gate"], "data-plane");
    assert_eq!(halted[0].pc_id, "rollouts");
    // A second start is refused only while one runs: this one is over.
    let again = ok(
        &fleet.server,
        &[
            "rollout",
            "start",
            "process-perf",
            "2",
            "--global",
            "--waves",
            "canary",
            "--bake",
            "1s",
        ],
    );
    assert!(again.contains("started"), "{again}");
    fails(
        &fleet.server,
        &["rollout", "start", "process-perf", "2", "--global"],
        &["rollout abort"],
    );
}

#[test]
fn a_good_version_goes_through_every_wave_under_two_controllers_one_killed_midway() {
    let good = std::fs::read(guest_wasm()).unwrap();
    let (fleet, pcs, _agents) = fleet_on_v1(&good);
    let mut sub = fleet.subscribe("obs.rollouts");
    let mut first = controller(&fleet);
    let _second = controller(&fleet);
    ok(
        &fleet.server,
        &[
            "rollout",
            "start",
            "process-perf",
            "2",
            "--global",
            "--waves",
            "canary,50%,100%",
            "--bake",
            "2s",
            "--min-ticks",
            "3",
        ],
    );
    let mut seen = BTreeMap::new();
    follow(&fleet, &pcs, Duration::from_secs(60), &mut seen, |r| {
        r.wave >= 1
    });
    // Killed mid-rollout, as a crash would: the other carries on, and a third started
    // later picks up where the state says.
    let _ = first.0.kill();
    let _ = first.0.wait();
    let _third = controller(&fleet);
    let r = follow(&fleet, &pcs, Duration::from_secs(90), &mut seen, |r| {
        !r.phase.active()
    });
    assert_eq!(r.phase, Phase::Completed, "{r:#?}");
    assert_eq!(r.history.len(), 3, "each wave entered once: {r:#?}");
    for pc in &pcs {
        fleet.wait_status(pc, Duration::from_secs(20), "on v2", |s| {
            runs(s, "process-perf", 2)
        });
    }
    let kv = fleet
        .rt
        .block_on(fleet.js.get_key_value(ASSIGNMENTS_BUCKET))
        .unwrap();
    let global = fleet.rt.block_on(kv.get("global")).unwrap().unwrap();
    assert_eq!(
        &global[..],
        br#"{"modules":{"process-perf":{"version":2}}}"#
    );
    // An operator's own assignment after the rollout ended, even of the rollout's old
    // version, stays: the controllers still running leave an ended rollout's scope alone.
    ok(
        &fleet.server,
        &["module", "rollout", "process-perf", "1", "--global"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let global = fleet.rt.block_on(kv.get("global")).unwrap().unwrap();
    assert_eq!(
        &global[..],
        br#"{"modules":{"process-perf":{"version":1}}}"#
    );
    let all = events(&fleet, &mut sub);
    let count = |kind: &str| all.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("collector_rollout_wave_advanced"), 2, "{all:#?}");
    assert_eq!(count("collector_rollout_completed"), 1, "{all:#?}");
    assert_eq!(count("collector_rollout_halted"), 0, "{all:#?}");
}

#[test]
fn bad_plans_and_gates_are_refused_by_name_before_anything_is_written() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["rollout", "start", "process-perf", "2"])
            .args(args)
            // Nothing listens here: each refusal must come before any connection.
            .env("NATS_URL", "nats://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--global", "--waves", "10%,5%"]);
    assert!(e.contains("--waves") && e.contains("larger than"), "{e}");
    let e = run(&["--global", "--waves", "canary,150%"]);
    assert!(e.contains("--waves") && e.contains("at most 100%"), "{e}");
    let e = run(&["--global", "--max-failures", "120"]);
    assert!(
        e.contains("--max-failures") && e.contains("0 to 100"),
        "{e}"
    );
    let e = run(&["--global", "--bake", "soon"]);
    assert!(e.contains("--bake"), "{e}");
    let e = run(&["--waves", "1%"]);
    assert!(e.contains("--global") && e.contains("--group"), "{e}");
    let e = run(&["--group", "../x"]);
    assert!(e.contains("--group"), "{e}");
}
