//! The operator side of a fleet through the `collector` binary against a real
//! nats-server: publishing signed bundles, assigning versions to scopes, kanade's
//! settings written byte for byte as kanade writes them, and the fleet status report.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use async_nats::jetstream::{self, kv::Operation};
use chrono::Utc;
use collector_bundle::{Manifest, sha256_hex};
use collector_fleet::status::{AgentStatus, ModuleStatus, Pending, Refusal, RolledBack};
use futures_util::StreamExt as _;

use crate::common::{NatsServer, craft, key, signed, write_public};

/// Component bytes for bundles: publishing checks signatures and hashes, never compiles.
fn component(tag: &str) -> Vec<u8> {
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    bytes.extend_from_slice(tag.as_bytes());
    bytes
}

pub(crate) fn collector(nats: &NatsServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .env("NATS_URL", &nats.url)
        .env("NO_COLOR", "1")
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD")
        .env_remove("NATS_TOKEN")
        .output()
        .unwrap()
}

pub(crate) fn ok(nats: &NatsServer, args: &[&str]) -> String {
    let out = collector(nats, args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its standard error.
pub(crate) fn fails(nats: &NatsServer, args: &[&str], expected: &[&str]) -> String {
    let out = collector(nats, args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for e in expected {
        assert!(
            stderr.contains(e),
            "stderr of {args:?} lacks {e:?}:\n{stderr}"
        );
    }
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn js(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(&nats.url).await.unwrap())
}

/// A key's value as stored (`None`: absent or deleted) and its bucket's history.
fn kv_value(nats: &NatsServer, bucket: &str, key: &str) -> (Option<String>, i64) {
    block_on(async {
        let store = js(nats).await.get_key_value(bucket).await.unwrap();
        let history = store.status().await.unwrap().history();
        let value = match store.entry(key).await.unwrap() {
            Some(e) if e.operation == Operation::Put => {
                Some(String::from_utf8(e.value.to_vec()).unwrap())
            }
            _ => None,
        };
        (value, history)
    })
}

fn value(nats: &NatsServer, bucket: &str, key: &str) -> String {
    kv_value(nats, bucket, key)
        .0
        .unwrap_or_else(|| panic!("{bucket} {key} is absent"))
}

/// Writes a bundle file; returns its path.
fn bundle_file(dir: &Path, file: &str, bytes: &[u8]) -> String {
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn publish_verifies_first_and_a_version_is_immutable() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let signer = key(1);
    let trust = write_public(dir.path(), "signer", &signer);
    let trust = s(&trust);

    // Before anything is published, list says so rather than failing.
    let empty = ok(&nats, &["module", "list"]);
    assert!(empty.contains("no module published"), "{empty}");
    assert_eq!(ok(&nats, &["module", "list", "--json"]).trim(), "[]");

    let v7 = signed("process-perf", 7, &component("seven"), &[&signer]);
    let v7_path = bundle_file(dir.path(), "pp7.bundle", &v7);
    let out = ok(&nats, &["module", "publish", "--trust", trust, &v7_path]);
    let sha = sha256_hex(&v7);
    assert!(
        out.contains("published collector_modules/process-perf/7"),
        "{out}"
    );
    assert!(
        out.contains(&format!("size:      {} bytes", v7.len())),
        "{out}"
    );
    assert!(out.contains(&format!("sha256:    {sha}")), "{out}");
    assert!(
        out.contains(&format!("signed by: {}", signer.id())),
        "{out}"
    );

    // The same bytes again: fine, nothing changes.
    let again = ok(&nats, &["module", "publish", "--trust", trust, &v7_path]);
    assert!(again.contains("already published"), "{again}");

    // Other bytes under the same version: refused, the stored object is kept.
    let other = signed("process-perf", 7, &component("seven, rebuilt"), &[&signer]);
    let other_path = bundle_file(dir.path(), "pp7-other.bundle", &other);
    fails(
        &nats,
        &["module", "publish", "--trust", trust, &other_path],
        &[
            "process-perf/7",
            "a version is immutable; publish a higher version",
        ],
    );

    // Unsigned, signed by an untrusted key, or below the threshold: refused with the
    // reason, and nothing is uploaded.
    let comp = component("eight");
    let manifest = Manifest::describe("process-perf", 8, &comp, Utc::now()).to_json();
    let unsigned = bundle_file(dir.path(), "unsigned.bundle", &craft(&manifest, &[], &comp));
    fails(
        &nats,
        &["module", "publish", "--trust", trust, &unsigned],
        &[
            "unsigned.bundle",
            "signed by no trusted key",
            "not published",
        ],
    );
    let stranger = signed("process-perf", 8, &comp, &[&key(2)]);
    let stranger = bundle_file(dir.path(), "stranger.bundle", &stranger);
    fails(
        &nats,
        &["module", "publish", "--trust", trust, &stranger],
        &["stranger.bundle", "not trusted", "not published"],
    );
    let second = write_public(dir.path(), "second", &key(3));
    let v8 = signed("process-perf", 8, &comp, &[&signer]);
    let v8_path = bundle_file(dir.path(), "pp8.bundle", &v8);
    fails(
        &nats,
        &[
            "module",
            "publish",
            "--trust",
            trust,
            "--trust",
            s(&second),
            "--threshold",
            "2",
            &v8_path,
        ],
        &["2 required", "not published"],
    );
    // A tampered component (the signature still holds over the manifest).
    let mut tampered = v8.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let tampered = bundle_file(dir.path(), "tampered.bundle", &tampered);
    fails(
        &nats,
        &["module", "publish", "--trust", trust, &tampered],
        &["sha256", "altered after signing", "not published"],
    );

    ok(&nats, &["module", "publish", "--trust", trust, &v8_path]);
    let v10 = signed("process-perf", 10, &component("ten"), &[&signer]);
    ok(
        &nats,
        &[
            "module",
            "publish",
            "--trust",
            trust,
            &bundle_file(dir.path(), "pp10", &v10),
        ],
    );
    let tm = signed("top-memory", 2, &component("tm"), &[&signer]);
    // The flag instead of the environment.
    let url = nats.url.clone();
    ok(
        &nats,
        &[
            "module",
            "publish",
            "--nats-url",
            &url,
            "--trust",
            trust,
            &bundle_file(dir.path(), "tm", &tm),
        ],
    );

    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&nats, &["module", "list", "--json"])).unwrap();
    let rows: Vec<(String, u64, u64, String)> = listed
        .iter()
        .map(|r| {
            (
                r["module"].as_str().unwrap().to_string(),
                r["version"].as_u64().unwrap(),
                r["size"].as_u64().unwrap(),
                r["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let row = |name: &str, v: u64, b: &[u8]| (name.to_string(), v, b.len() as u64, sha256_hex(b));
    assert_eq!(
        rows,
        [
            row("process-perf", 7, &v7),
            row("process-perf", 8, &v8),
            row("process-perf", 10, &v10),
            row("top-memory", 2, &tm),
        ],
        "sorted by name then numeric version, the first v7 kept"
    );
    let published_at = listed[0]["published_at"].as_str().unwrap();
    let published_at: chrono::DateTime<Utc> = published_at.parse().unwrap();
    assert!(
        (Utc::now() - published_at).num_seconds().abs() < 120,
        "{published_at}"
    );

    let table = ok(&nats, &["module", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines[0].starts_with("MODULE"), "{table}");
    assert!(
        lines[3].starts_with("process-perf") && lines[3].contains(" 10 "),
        "{table}"
    );
    assert!(lines[4].contains(&sha256_hex(&tm)), "{table}");
}

#[test]
fn rollout_unassign_and_disable_write_exact_assignments() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let signer = key(1);
    let trust = write_public(dir.path(), "signer", &signer);
    let trust = s(&trust);
    for v in [7, 8] {
        let b = signed("process-perf", v, &component(&v.to_string()), &[&signer]);
        ok(
            &nats,
            &[
                "module",
                "publish",
                "--trust",
                trust,
                &bundle_file(dir.path(), &format!("pp{v}"), &b),
            ],
        );
    }

    fails(
        &nats,
        &["module", "rollout", "process-perf", "9", "--global"],
        &[
            "process-perf version 9 is not in the object store collector_modules",
            "published versions of process-perf: 7, 8",
            "collector module publish",
        ],
    );
    fails(
        &nats,
        &["module", "rollout", "top-memory", "1", "--global"],
        &["no version of top-memory is published"],
    );

    let out = ok(
        &nats,
        &[
            "module",
            "rollout",
            "process-perf",
            "8",
            "--group",
            "canary",
        ],
    );
    assert!(
        out.contains("groups.canary: process-perf version 8 assigned"),
        "{out}"
    );
    let (canary, history) = kv_value(&nats, "collector_config", "groups.canary");
    assert_eq!(
        canary.unwrap(),
        r#"{"modules":{"process-perf":{"version":8}}}"#
    );
    assert_eq!(history, 5);
    assert_eq!(
        kv_value(&nats, "collector_config", "global").0,
        None,
        "only the group changed"
    );

    ok(
        &nats,
        &["module", "rollout", "process-perf", "7", "--global"],
    );
    assert_eq!(
        value(&nats, "collector_config", "global"),
        r#"{"modules":{"process-perf":{"version":7}}}"#
    );
    let same = ok(
        &nats,
        &["module", "rollout", "process-perf", "7", "--global"],
    );
    assert!(same.contains("nothing changed"), "{same}");

    // disable at a PC, then a rollout there clears the enabled:false.
    ok(
        &nats,
        &["module", "disable", "process-perf", "--pc", "pc-b"],
    );
    assert_eq!(
        value(&nats, "collector_config", "pcs.pc-b"),
        r#"{"modules":{"process-perf":{"enabled":false}}}"#
    );
    ok(
        &nats,
        &["module", "rollout", "process-perf", "8", "--pc", "pc-b"],
    );
    assert_eq!(
        value(&nats, "collector_config", "pcs.pc-b"),
        r#"{"modules":{"process-perf":{"version":8}}}"#
    );
    ok(
        &nats,
        &["module", "disable", "process-perf", "--pc", "pc-b"],
    );
    assert_eq!(
        value(&nats, "collector_config", "pcs.pc-b"),
        r#"{"modules":{"process-perf":{"version":8,"enabled":false}}}"#,
        "disable keeps the version"
    );

    // What each PC resolves: pc-a is in the canary group, pc-b disabled it, pc-z has
    // only the global assignment.
    ok(
        &nats,
        &["config", "groups", "--pc", "pc-a", "--set", "canary"],
    );
    ok(
        &nats,
        &["config", "groups", "--pc", "pc-b", "--set", "canary"],
    );
    let resolved = |pc: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&nats, &["module", "effective", "--pc", pc, "--json"])).unwrap()
    };
    assert_eq!(
        resolved("pc-a"),
        serde_json::json!({"modules":{"process-perf":8},"conflicts":[]})
    );
    assert_eq!(
        resolved("pc-b"),
        serde_json::json!({"modules":{},"conflicts":[]})
    );
    assert_eq!(
        resolved("pc-z"),
        serde_json::json!({"modules":{"process-perf":7},"conflicts":[]})
    );
    let text = ok(&nats, &["module", "effective", "--pc", "pc-a"]);
    assert!(text.contains("pc pc-a, groups: canary\n"), "{text}");
    assert!(text.contains("groups.canary (revision "), "{text}");
    assert!(text.contains("pcs.pc-a (absent)"), "{text}");
    assert!(text.contains("\nprocess-perf version 8\n"), "{text}");

    // unassign leaves an empty scope, not a deleted key; again is a no-op.
    let out = ok(
        &nats,
        &["module", "unassign", "process-perf", "--group", "canary"],
    );
    assert!(out.contains("groups.canary: process-perf removed"), "{out}");
    assert_eq!(
        value(&nats, "collector_config", "groups.canary"),
        r#"{"modules":{}}"#
    );
    let again = ok(
        &nats,
        &["module", "unassign", "process-perf", "--group", "canary"],
    );
    assert!(
        again.contains("does not name process-perf; nothing changed"),
        "{again}"
    );

    fails(
        &nats,
        &["module", "rollout", "process-perf", "8", "--group", "a b"],
        &["--group: invalid group name \"a b\": holds ' '"],
    );
    fails(
        &nats,
        &[
            "module",
            "rollout",
            "process-perf",
            "8",
            "--pc",
            "x",
            "--group",
            "y",
        ],
        &["cannot be used with"],
    );

    // A value agents refuse (they keep the key's last good value) is overwritten, and
    // the operator is told what was there.
    block_on(async {
        let store = js(&nats)
            .await
            .get_key_value("collector_config")
            .await
            .unwrap();
        store
            .put("groups.broken", "{\"modules\":[]}".into())
            .await
            .unwrap();
    });
    let out = collector(
        &nats,
        &[
            "module",
            "rollout",
            "process-perf",
            "8",
            "--group",
            "broken",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for needle in [
        "collector_config groups.broken held a value agents refuse",
        "field `modules`",
        r#"it was (revision "#,
        r#"{"modules":[]}"#,
    ] {
        assert!(stderr.contains(needle), "lacks {needle:?}: {stderr}");
    }
    assert_eq!(
        value(&nats, "collector_config", "groups.broken"),
        r#"{"modules":{"process-perf":{"version":8}}}"#
    );
    // But one holding fields a newer tool wrote is not: rewriting it would drop them.
    let newer = r#"{"modules":{"process-perf":{"version":7,"ring":2}}}"#;
    block_on(async {
        let store = js(&nats)
            .await
            .get_key_value("collector_config")
            .await
            .unwrap();
        store.put("groups.newer", newer.into()).await.unwrap();
    });
    fails(
        &nats,
        &["module", "unassign", "process-perf", "--group", "newer"],
        &[
            "collector_config key groups.newer",
            "fields this collector does not know",
        ],
    );
    assert_eq!(value(&nats, "collector_config", "groups.newer"), newer);
}

#[test]
fn concurrent_rollouts_to_one_scope_lose_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let signer = key(1);
    let trust = write_public(dir.path(), "signer", &signer);
    let names: Vec<String> = (1..=6).map(|i| format!("m{i}")).collect();
    for name in &names {
        let b = signed(name, 1, &component(name), &[&signer]);
        ok(
            &nats,
            &[
                "module",
                "publish",
                "--trust",
                s(&trust),
                &bundle_file(dir.path(), name, &b),
            ],
        );
    }
    // Six operators assigning six modules to the same group at the same moment: without
    // compare-and-swap, the last write would erase the others.
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            Command::new(env!("CARGO_BIN_EXE_collector"))
                .args(["module", "rollout", name, "1", "--group", "ring"])
                .env("NATS_URL", &nats.url)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let expected: String = names
        .iter()
        .map(|n| format!(r#""{n}":{{"version":1}}"#))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        value(&nats, "collector_config", "groups.ring"),
        format!(r#"{{"modules":{{{expected}}}}}"#)
    );
}

#[test]
fn config_set_writes_the_bytes_kanade_writes() {
    let nats = NatsServer::start();
    let out = ok(
        &nats,
        &[
            "config",
            "set",
            "process_perf_top_n=5",
            "process_perf_enabled=true",
            "host_perf_interval=15s",
        ],
    );
    assert!(out.contains("global: set"), "{out}");
    let (global, history) = kv_value(&nats, "agent_config", "global");
    let global = global.unwrap();
    assert_eq!(
        global,
        r#"{"host_perf_interval":"15s","process_perf_enabled":true,"process_perf_top_n":5}"#
    );
    assert_eq!(history, 1, "kanade's agent_config keeps one revision");
    let theirs: kanade_shared::wire::ConfigScope = serde_json::from_str(&global).unwrap();
    assert_eq!(theirs.host_perf_interval.as_deref(), Some("15s"));
    assert_eq!(theirs.process_perf_enabled, Some(true));
    assert_eq!(theirs.process_perf_top_n, Some(5));
    assert_eq!(
        serde_json::to_string(&theirs).unwrap(),
        global,
        "kanade re-encodes it identically"
    );

    // Refusals change nothing.
    fails(
        &nats,
        &["config", "set", "host_perf_interval=15"],
        &["host_perf_interval=15: expected a duration"],
    );
    fails(
        &nats,
        &["config", "set", "process_perf_enabled=yes"],
        &["expected true or false"],
    );
    fails(
        &nats,
        &["config", "set", "process_perf_enabeld=true"],
        &[
            "unknown field \"process_perf_enabeld\"",
            "known fields: max_local_concurrent,",
            "client_display_name",
        ],
    );
    fails(
        &nats,
        &["config", "unset", "nope"],
        &["unknown field \"nope\""],
    );
    assert_eq!(value(&nats, "agent_config", "global"), global);

    // Timestamps are stored in UTC, as kanade normalises them.
    ok(
        &nats,
        &[
            "config",
            "set",
            "--pc",
            "pc-a",
            "process_perf_expires_at=2026-11-28T00:30:00.5+09:00",
        ],
    );
    let pc = value(&nats, "agent_config", "pcs.pc-a");
    assert_eq!(
        pc,
        r#"{"process_perf_expires_at":"2026-11-27T15:30:00.500Z"}"#
    );
    let theirs: kanade_shared::wire::ConfigScope = serde_json::from_str(&pc).unwrap();
    assert_eq!(
        theirs.process_perf_expires_at.unwrap(),
        "2026-11-27T15:30:00.5Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap()
    );

    // Unset of the last field leaves `{}`, not a deleted key; get shows it.
    let out = ok(
        &nats,
        &["config", "unset", "--pc", "pc-a", "process_perf_expires_at"],
    );
    assert!(
        out.contains("pcs.pc-a: unset process_perf_expires_at"),
        "{out}"
    );
    assert_eq!(value(&nats, "agent_config", "pcs.pc-a"), "{}");
    assert_eq!(
        ok(&nats, &["config", "get", "--pc", "pc-a", "--json"]).trim(),
        "{}"
    );

    // Unset keeps the other fields; a second unset writes nothing.
    ok(&nats, &["config", "unset", "process_perf_top_n"]);
    let after = r#"{"host_perf_interval":"15s","process_perf_enabled":true}"#;
    assert_eq!(value(&nats, "agent_config", "global"), after);
    let noop = ok(&nats, &["config", "unset", "process_perf_top_n"]);
    assert!(noop.contains("nothing changed"), "{noop}");
    let shown = ok(&nats, &["config", "get"]);
    assert!(shown.contains("agent_config global (revision "), "{shown}");
    assert!(shown.contains("  host_perf_interval = \"15s\""), "{shown}");
    assert_eq!(ok(&nats, &["config", "get", "--json"]).trim(), after);
    let missing = ok(&nats, &["config", "get", "--group", "nobody"]);
    assert!(missing.contains("groups.nobody: not set"), "{missing}");

    // After `kanade config clear` (a delete marker), set writes over the marker.
    block_on(async {
        let store = js(&nats).await.get_key_value("agent_config").await.unwrap();
        store.delete("pcs.pc-a").await.unwrap();
    });
    assert_eq!(kv_value(&nats, "agent_config", "pcs.pc-a").0, None);
    ok(
        &nats,
        &["config", "set", "--pc", "pc-a", "process_perf_top_n=3"],
    );
    assert_eq!(
        value(&nats, "agent_config", "pcs.pc-a"),
        r#"{"process_perf_top_n":3}"#
    );
}

#[test]
fn effective_resolves_groups_alphabetically_over_global_under_the_pc() {
    let nats = NatsServer::start();
    let out = ok(
        &nats,
        &[
            "config",
            "groups",
            "--pc",
            "pc-a",
            "--set",
            "zeta, alpha,zeta",
        ],
    );
    assert_eq!(out.trim(), "pc-a: alpha, zeta");
    let (groups, history) = kv_value(&nats, "agent_groups", "pc-a");
    assert_eq!(groups.unwrap(), r#"{"groups":["alpha","zeta"]}"#);
    assert_eq!(history, 1);
    assert_eq!(
        ok(&nats, &["config", "groups", "--pc", "pc-a"]).trim(),
        "pc-a: alpha, zeta"
    );
    assert_eq!(
        ok(&nats, &["config", "groups", "--pc", "pc-z"]).trim(),
        "pc-z: no group"
    );

    ok(
        &nats,
        &[
            "config",
            "set",
            "process_perf_top_n=5",
            "host_perf_interval=30s",
        ],
    );
    ok(
        &nats,
        &[
            "config",
            "set",
            "--group",
            "zeta",
            "process_perf_top_n=7",
            "process_perf_enabled=true",
        ],
    );
    ok(
        &nats,
        &[
            "config",
            "set",
            "--group",
            "alpha",
            "process_perf_top_n=6",
            "client_display_name=alpha",
        ],
    );
    ok(
        &nats,
        &["config", "set", "--group", "other", "process_perf_top_n=99"],
    );
    ok(
        &nats,
        &["config", "set", "--pc", "pc-a", "client_display_name=mine"],
    );

    let out = collector(&nats, &["config", "effective", "--pc", "pc-a", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ours["process_perf_top_n"], 7,
        "zeta sorts after alpha and wins; other is not a membership"
    );
    assert_eq!(ours["process_perf_enabled"], true);
    assert_eq!(ours["host_perf_interval"], "30s");
    assert_eq!(ours["client_display_name"], "mine");
    assert_eq!(ours["heartbeat_interval"], "30s", "built-in default");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("field `process_perf_top_n` is set by groups alpha, zeta"),
        "{stderr}"
    );

    // kanade's own resolution of the same stored values agrees.
    let scope = |key: &str| -> kanade_shared::wire::ConfigScope {
        serde_json::from_str(&value(&nats, "agent_config", key)).unwrap()
    };
    let groups = std::collections::BTreeMap::from([
        ("alpha".to_string(), scope("groups.alpha")),
        ("zeta".to_string(), scope("groups.zeta")),
        ("other".to_string(), scope("groups.other")),
    ]);
    let (theirs, _) = kanade_shared::wire::resolve(
        Some(&scope("global")),
        &groups,
        Some(&scope("pcs.pc-a")),
        &["alpha".to_string(), "zeta".to_string()],
    );
    assert_eq!(ours, serde_json::to_value(&theirs).unwrap());

    let text = ok(&nats, &["config", "effective", "--pc", "pc-a"]);
    assert!(text.contains("pc pc-a, groups: alpha, zeta"), "{text}");
    assert!(text.contains("groups.alpha (revision "), "{text}");
    assert!(
        text.contains("conflict: field `process_perf_top_n`"),
        "{text}"
    );
    // A PC in no group, with no layer of its own: global over the defaults.
    let lone: serde_json::Value = serde_json::from_str(&ok(
        &nats,
        &["config", "effective", "--pc", "pc-z", "--json"],
    ))
    .unwrap();
    assert_eq!(lone["process_perf_top_n"], 5);
    assert_eq!(lone["process_perf_enabled"], false);
    assert!(text.contains("pcs.pc-a (revision "), "{text}");

    ok(&nats, &["config", "groups", "--pc", "pc-a", "--set", ""]);
    assert_eq!(value(&nats, "agent_groups", "pc-a"), r#"{"groups":[]}"#);
    fails(
        &nats,
        &["config", "groups", "--pc", "pc-a", "--set", "ok,not ok"],
        &["--set: invalid group name \"not ok\""],
    );
}

fn synthetic(i: usize, now: chrono::DateTime<Utc>) -> AgentStatus {
    let pc_id = format!("pc-{i:04}");
    let version = if i.is_multiple_of(10) { 8 } else { 7 };
    let mut status = AgentStatus {
        pc_id,
        last_seen: now - chrono::Duration::seconds(if i.is_multiple_of(25) { 3600 } else { 10 }),
        agent_version: "0.1.0".into(),
        modules: vec![ModuleStatus {
            name: "process-perf".into(),
            version,
            sha256: "ab".repeat(32),
            since: now - chrono::Duration::seconds(100),
            probation: version == 8,
            traps: 0,
            health: None,
            previous: None,
        }],
        config_revision: 3,
        assignment_revision: 9,
        ..Default::default()
    };
    if i.is_multiple_of(7) {
        status.pending.push(Pending {
            name: "top-memory".into(),
            version: 3,
            why: "refused: signed by no trusted key".into(),
        });
        status.last_refusal = Some(Refusal {
            name: "top-memory".into(),
            version: 3,
            source: "collector_modules/top-memory/3".into(),
            reason: "signed by no trusted key, 1 required (the bundle carries no signature)".into(),
            at: now - chrono::Duration::seconds(60),
        });
        status.rolled_back.push(RolledBack {
            name: "process-perf".into(),
            version: 9,
            reason: "trapped on tick 2".into(),
            at: now - chrono::Duration::seconds(300),
        });
    }
    status
}

#[test]
fn fleet_status_summarises_hundreds_of_agents() {
    let nats = NatsServer::start();
    let nothing = ok(&nats, &["fleet", "status"]);
    assert!(nothing.starts_with("agents: 0"), "{nothing}");

    const AGENTS: usize = 400;
    let now = Utc::now();
    let records: Vec<AgentStatus> = (0..AGENTS).map(|i| synthetic(i, now)).collect();
    block_on(async {
        let js = js(&nats).await;
        let store = js
            .create_key_value(jetstream::kv::Config {
                bucket: "collector_status".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        futures_util::stream::iter(&records)
            .for_each_concurrent(64, |r| {
                let store = &store;
                async move {
                    store
                        .put(r.pc_id.as_str(), serde_json::to_vec(r).unwrap().into())
                        .await
                        .unwrap();
                }
            })
            .await;
        store.put("pc-broken", "not json".into()).await.unwrap();
        store.put("pc-gone", "{}".into()).await.unwrap();
        store.delete("pc-gone").await.unwrap();
    });

    let started = Instant::now();
    let out = collector(&nats, &["fleet", "status"]);
    let elapsed = started.elapsed();
    eprintln!("fleet status over {AGENTS} status records took {elapsed:?} (the whole process)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("collector_status key pc-broken: not a status record"),
        "{stderr}"
    );

    let stale_after = chrono::Duration::minutes(3);
    let count = |h: &str| {
        records
            .iter()
            .filter(|r| r.health(now, stale_after) == h)
            .count()
    };
    let (ok_n, probation, degraded, stale) = (
        count("ok"),
        count("probation"),
        count("degraded"),
        count("stale"),
    );
    assert!(
        ok_n > 0 && probation > 0 && degraded > 0 && stale > 0,
        "every health appears"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "agents: {AGENTS} (ok {ok_n}, probation {probation}, degraded {degraded}, stale {stale})"
        )
    );
    let v8 = records.iter().filter(|r| r.modules[0].version == 8).count();
    assert_eq!(lines[1], "modules:");
    assert_eq!(lines[2], format!("  process-perf v7: {}", AGENTS - v8));
    assert_eq!(
        lines[3],
        format!("  process-perf v8: {v8} ({v8} on probation)")
    );
    assert!(lines[5].starts_with("PC "), "{stdout}");
    let rows = &lines[6..];
    assert_eq!(
        rows.len(),
        AGENTS,
        "one row per readable record, deleted ones skipped"
    );
    assert!(
        rows[0].starts_with("pc-0000  process-perf v8*"),
        "{}",
        rows[0]
    );
    assert!(rows[0].contains(" stale "), "{}", rows[0]);
    assert!(
        rows[0].contains("top-memory v3: signed by no trusted key"),
        "{}",
        rows[0]
    );
    assert!(
        rows[1].starts_with("pc-0001  process-perf v7 "),
        "{}",
        rows[1]
    );
    assert!(
        rows[1].contains(" ok ") && rows[1].ends_with("s ago"),
        "{}",
        rows[1]
    );

    let json = ok(&nats, &["fleet", "status", "--json"]);
    let back: Vec<AgentStatus> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, records, "every record, unchanged, sorted by pc id");

    let one = ok(&nats, &["fleet", "status", "--pc", "pc-0007", "--details"]);
    assert!(
        one.starts_with("agents: 1 (ok 0, probation 0, degraded 1, stale 0)"),
        "{one}"
    );
    assert!(
        one.contains("    rolled back: process-perf v9 at "),
        "{one}"
    );
    assert!(one.contains(": trapped on tick 2"), "{one}");
    assert!(
        one.contains("    pending: top-memory v3: refused: signed by no trusted key"),
        "{one}"
    );
    let fresh = ok(
        &nats,
        &["fleet", "status", "--pc", "pc-0001", "--stale-after", "5s"],
    );
    assert!(fresh.contains(" stale "), "{fresh}");
    fails(
        &nats,
        &["fleet", "status", "--pc", "pc-nobody"],
        &["--pc pc-nobody: no status record"],
    );
}

#[test]
fn an_unreachable_server_is_named() {
    let nats = NatsServer::start();
    let port = nats.url.rsplit(':').next().unwrap().to_string();
    drop(nats);
    let out = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args([
            "fleet",
            "status",
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("NATS at nats://127.0.0.1:{port}")),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(["config", "get"])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--nats-url is required"),
        "{stderr}"
    );
}

#[test]
fn a_wider_rollout_names_the_narrower_scopes_that_keep_agents_off_it() {
    // The README's canary-then-global walkthrough: the canary group's assignment still
    // pins its agents after the global rollout, and the operator is told so.
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let signer = key(1);
    let trust = write_public(dir.path(), "signer", &signer);
    for v in [1, 2] {
        let b = signed("process-perf", v, &component(&v.to_string()), &[&signer]);
        ok(
            &nats,
            &[
                "module",
                "publish",
                "--trust",
                s(&trust),
                &bundle_file(dir.path(), &format!("pp{v}"), &b),
            ],
        );
    }
    let rollout = |scope: &[&str], version: &str| {
        let mut args = vec!["module", "rollout", "process-perf", version];
        args.extend_from_slice(scope);
        let out = collector(&nats, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert_eq!(rollout(&["--group", "canary"], "1"), "");
    ok(
        &nats,
        &["module", "disable", "process-perf", "--pc", "pc-z"],
    );
    ok(
        &nats,
        &["module", "rollout", "process-perf", "2", "--pc", "pc-y"],
    );
    let said = rollout(&["--global"], "2");
    for needle in [
        "narrower scopes keep some agents off process-perf version 2",
        "groups.canary: process-perf version 1",
        "collector module unassign process-perf --group canary",
        "pcs.pc-z: process-perf disabled",
        "collector module unassign process-perf --pc pc-z",
    ] {
        assert!(said.contains(needle), "lacks {needle:?}: {said}");
    }
    // pc-y is assigned the same version: nothing to say about it.
    assert!(!said.contains("pc-y"), "{said}");
    // Lifting the ring leaves only the pin to mention.
    ok(
        &nats,
        &["module", "unassign", "process-perf", "--group", "canary"],
    );
    let said = rollout(&["--global"], "2");
    assert!(!said.contains("canary") && said.contains("pc-z"), "{said}");
}
