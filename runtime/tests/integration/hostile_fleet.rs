//! The fleet's buckets as hostile input: values that do not decode or have another
//! shape, invalid names, and what the operator's commands make of them. An agent keeps
//! each key's last good value (and its running modules) whatever a bucket holds, refuses
//! invalid names before using them, and says so in its status record; an operator can
//! always overwrite a bad value, and is told what was there.

use std::process::{Command, Output};
use std::time::Duration;

use collector_fleet::{ASSIGNMENTS_BUCKET, CONFIG_BUCKET, GROUPS_BUCKET};

use crate::fleet::{Fleet, enable, process_perf, runs};

/// How long a state that must hold is watched: several re-reads (`--fleet-resync`).
const HOLD: Duration = Duration::from_secs(3);
const CONVERGE: Duration = Duration::from_secs(20);

fn operator(fleet: &Fleet, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .env("NATS_URL", &fleet.server.url)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Watches pc-a's status for `HOLD`: `cond` must hold at every record.
fn holds(fleet: &Fleet, what: &str, cond: impl Fn(&collector_fleet::status::AgentStatus) -> bool) {
    let until = std::time::Instant::now() + HOLD;
    while std::time::Instant::now() < until {
        let status = fleet.status("pc-a").expect("a status record");
        assert!(cond(&status), "{what} no longer holds: {status:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn no_value_in_a_bucket_stops_a_module_across_rereads_and_restarts() {
    let fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let args = ["--fleet-resync", "300ms"];
    let agent = fleet.agent("pc-a", &args);
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });

    // A version written as a string does not decode; a JetStream API answer steered onto
    // the settings key decodes to nothing but unknown fields. Neither may read as
    // "assign nothing" or "all defaults".
    let bad_assignment = r#"{"modules":{"process-perf":{"version":"1"}}}"#;
    let bad_settings = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":1}"#;
    fleet.put(ASSIGNMENTS_BUCKET, "global", bad_assignment.as_bytes());
    fleet.put(CONFIG_BUCKET, "global", bad_settings.as_bytes());
    let refused = |s: &collector_fleet::status::AgentStatus| {
        s.refused_values.contains_key("collector_config/global")
            && s.refused_values.contains_key("agent_config/global")
    };
    let status = fleet.wait_status("pc-a", CONVERGE, "both values refused", refused);
    assert_eq!(
        status.health(chrono::Utc::now(), chrono::Duration::seconds(60)),
        "degraded"
    );
    let reason = &status.refused_values["collector_config/global"].reason;
    assert!(reason.contains("version"), "{reason}");
    holds(&fleet, "v1 running and the refusals shown", |s| {
        runs(s, "process-perf", 1) && refused(s)
    });
    // Its settings stayed too: data still flows at the fleet's interval.
    let mut data = fleet.subscribe("process_perf.pc-a");
    assert!(fleet.next(&mut data, Duration::from_secs(5)).is_some());
    agent.stop();

    // A restart with the bad values still there: the saved last good values apply.
    let _agent = fleet.agent("pc-a", &args);
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy after a restart", |s| {
        runs(s, "process-perf", 1) && refused(s)
    });
    holds(&fleet, "v1 running after a restart", |s| {
        runs(s, "process-perf", 1)
    });
    let mut data = fleet.subscribe("process_perf.pc-a");
    assert!(fleet.next(&mut data, Duration::from_secs(5)).is_some());

    // The operator overwrites the bad value, and is told what was there.
    let out = operator(
        &fleet,
        &["module", "rollout", "process-perf", "1", "--global"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("replaced") && stderr.contains(r#""version":"1""#),
        "{stderr}"
    );
    fleet.wait_status("pc-a", CONVERGE, "the refusal cleared", |s| {
        !s.refused_values.contains_key("collector_config/global") && runs(s, "process-perf", 1)
    });
}

#[test]
fn invalid_names_are_refused_before_use_and_cost_only_themselves() {
    let mut fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    // kanade's membership is free-form: one unusable group name among good ones.
    fleet.put(
        GROUPS_BUCKET,
        "pc-a",
        br#"{"groups":["has space","canary"]}"#,
    );
    fleet.put(
        CONFIG_BUCKET,
        "groups.canary",
        br#"{"process_perf_top_n":3}"#,
    );
    let args = ["--fleet-resync", "300ms"];
    let agent = fleet.agent("pc-a", &args);
    let status = fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });
    assert!(status.config_revision > 0, "{status:#?}");
    // The canary's settings arrived: the bad name cost only itself.
    let mut data = fleet.subscribe("process_perf.pc-a");
    let message = fleet.next(&mut data, Duration::from_secs(5)).expect("data");
    let perf: serde_json::Value = serde_json::from_slice(&message).unwrap();
    assert_eq!(
        perf["processes"].as_array().map(Vec::len),
        Some(3),
        "the canary's top 3, over the fleet's top 2: {perf}"
    );

    // Names that would walk a path, widen a subject or escape a terminal: the value
    // naming them is refused as a whole, and the last good one stays.
    for bad in [
        "../x",
        "a\u{0}b",
        "",
        "a*",
        "\u{202e}gpj",
        &"n".repeat(3500),
    ] {
        let value = serde_json::json!({ "modules": { bad: { "version": 1 } } }).to_string();
        fleet.put(ASSIGNMENTS_BUCKET, "global", value.as_bytes());
        fleet.wait_status("pc-a", CONVERGE, "the value refused", |s| {
            s.refused_values.contains_key("collector_config/global")
        });
        holds(&fleet, "v1 running", |s| runs(s, "process-perf", 1));
    }
    // Nothing invalid was saved: an offline restart starts what ran.
    agent.stop();
    let saved = std::fs::read_to_string(fleet.state_dir("pc-a").join("fleet-state.json")).unwrap();
    assert!(
        !saved.contains("../x") && !saved.contains("nnnn"),
        "{saved}"
    );
    fleet.server.stop();
    let offline = fleet.agent("pc-a", &args);
    offline.stderr_line_containing("agent started module=process-perf v1");
    drop(offline);
    fleet.server.resume();

    // The operator's commands refuse such names before any request.
    for bad in ["../x", "a b", &"n".repeat(3500)] {
        let out = operator(&fleet, &["module", "rollout", bad, "1", "--global"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(stderr.contains("module name"), "{stderr}");
        assert!(
            stderr.len() < 600,
            "the error repeats the whole name: {stderr}"
        );
    }
}

#[test]
fn nothing_an_agent_writes_reaches_the_operators_terminal_raw() {
    let fleet = Fleet::start();
    // pc-a's record: escape sequences (title, clear screen, colour), a newline that
    // forges a table row, a bidi override, and a claim to be pc-b.
    let hostile =
        "\u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31mred\nforged-pc   evil v9   ok\r\u{202e}exe.txt";
    let record = serde_json::json!({
        "pc_id": "pc-b",
        "last_seen": chrono::Utc::now(),
        "agent_version": hostile,
        "modules": [{
            "name": hostile, "version": 1, "sha256": hostile,
            "since": chrono::Utc::now(), "probation": false, "traps": 0
        }],
        "pending": [{ "name": "m", "version": 2, "why": hostile }],
        "config_revision": 1,
        "assignment_revision": 1
    });
    fleet.put(
        collector_fleet::STATUS_BUCKET,
        "pc-a",
        record.to_string().as_bytes(),
    );
    // And a record far over any status record's size.
    let mut big = record.clone();
    big["agent_version"] = "x".repeat(900 * 1024).into();
    fleet.put(
        collector_fleet::STATUS_BUCKET,
        "pc-c",
        big.to_string().as_bytes(),
    );
    // A settings value with the same text, for `config get`.
    let value = serde_json::json!({ "client_display_name": hostile }).to_string();
    fleet.put(CONFIG_BUCKET, "global", value.as_bytes());

    for args in [
        &["fleet", "status", "--details"][..],
        &["config", "get"][..],
    ] {
        let out = operator(&fleet, args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        for (what, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            assert!(
                !text.contains('\u{1b}')
                    && !text.contains('\u{7}')
                    && !text.contains('\r')
                    && !text.contains('\u{202e}'),
                "{args:?} {what} carries raw control or bidi characters: {text:?}"
            );
            assert!(
                !text.lines().any(|l| l.starts_with("forged-pc")),
                "{args:?} {what}: a forged row: {text}"
            );
        }
        if args[0] == "fleet" {
            // Listed under its key, never as the PC it claims to be.
            assert!(stdout.lines().any(|l| l.starts_with("pc-a ")), "{stdout}");
            assert!(!stdout.lines().any(|l| l.starts_with("pc-b")), "{stdout}");
            assert!(stderr.contains("names PC pc-b"), "{stderr}");
            // The oversized record is skipped, and said so.
            assert!(
                stderr.contains("pc-c") && stderr.contains("KiB"),
                "{stderr}"
            );
            assert!(stdout.contains("\\u{1b}[2J"), "shown escaped: {stdout}");
        }
    }
    // --json stays exact (JSON escapes control characters itself).
    let out = operator(&fleet, &["fleet", "status", "--json"]);
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records[0]["agent_version"], hostile);
}

#[test]
fn what_is_assigned_never_buys_unbounded_work() {
    let fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "200ms");
    // An object whose metadata lies: a hundred thousand chunks of one byte.
    let meta = serde_json::json!({
        "name": "liar/1", "bucket": collector_fleet::MODULES_STORE, "nuid": "LIAR",
        "size": 100_000, "chunks": 100_000, "mtime": chrono::Utc::now(),
        "digest": "SHA-256=AAAA"
    });
    fleet.rt.block_on(async {
        let subject = format!(
            "$O.{}.M.{}",
            collector_fleet::MODULES_STORE,
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, "liar/1")
        );
        fleet
            .js
            .publish(subject, meta.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    // Ten thousand modules that do not exist, besides two that do (or claim to).
    let mut modules = serde_json::Map::new();
    modules.insert("process-perf".into(), serde_json::json!({ "version": 1 }));
    modules.insert("liar".into(), serde_json::json!({ "version": 1 }));
    for i in 0..10_000 {
        modules.insert(format!("zz-{i:05}"), serde_json::json!({ "version": 1 }));
    }
    let value = serde_json::json!({ "modules": modules }).to_string();
    fleet.put(ASSIGNMENTS_BUCKET, "global", value.as_bytes());
    let _agent = fleet.agent("pc-a", &[]);
    let status = fleet.wait_status(
        "pc-a",
        CONVERGE,
        "the liar refused and the rest summed up",
        |s| {
            runs(s, "process-perf", 1)
                && s.last_refusal.as_ref().is_some_and(|r| r.name == "liar")
                && s.over_limit > 0
        },
    );
    assert_eq!(status.over_limit, 10_002 - 64, "{:?}", status.over_limit);
    assert!(status.pending.len() < 64, "{}", status.pending.len());
    let reason = &status.last_refusal.as_ref().unwrap().reason;
    assert!(reason.contains("100000 chunks"), "{reason}");
    let record = serde_json::to_vec(&status).unwrap();
    assert!(
        record.len() < 16 * 1024,
        "a status record of {} bytes",
        record.len()
    );
}

#[test]
fn an_assignment_storm_restarts_and_publishes_no_faster_than_the_interval() {
    let fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "500ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let agent = fleet.agent("pc-a", &[]);
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });
    let mut data = fleet.subscribe("process_perf.pc-a");
    while fleet.next(&mut data, Duration::from_millis(10)).is_some() {}

    // Three seconds of an assignment flipping on and off, a hundred times a second.
    let storm = Duration::from_secs(3);
    let start = std::time::Instant::now();
    let mut flips = 0;
    while start.elapsed() < storm {
        if flips % 2 == 0 {
            fleet.put(ASSIGNMENTS_BUCKET, "global", br#"{"modules":{}}"#);
        } else {
            fleet.assign("global", &[("process-perf", 1)]);
        }
        flips += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    fleet.assign("global", &[("process-perf", 1)]);
    // It converges on the last state.
    fleet.wait_status("pc-a", CONVERGE, "v1 running after the storm", |s| {
        runs(s, "process-perf", 1)
    });
    let window = start.elapsed() + Duration::from_secs(1);
    std::thread::sleep(Duration::from_secs(1));
    let mut messages = 0;
    while fleet.next(&mut data, Duration::from_millis(50)).is_some() {
        messages += 1;
    }
    // One message per 500 ms tick, and at most one more per restart; restarts come at
    // most three in any two seconds (twice the restart floor: the 500 ms interval, and
    // at least a second): far from one per flip.
    let restarts = 3 * (window.as_secs() as usize / 2 + 1);
    let most = (window.as_millis() / 500) as usize + restarts + 2;
    assert!(
        messages <= most,
        "{messages} messages in {window:?} after {flips} flips (at most {most})"
    );
    let mut starts = 0;
    while let Ok(line) = agent.stderr.recv_timeout(Duration::from_millis(100)) {
        starts += usize::from(line.contains("agent started"));
    }
    assert!(
        starts <= restarts + 1,
        "{starts} module starts in {window:?}"
    );
}
