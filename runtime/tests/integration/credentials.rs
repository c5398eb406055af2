//! `collector fleet credentials`: the secure layout as easy as the open one. The command
//! writes a broker configuration and an nkey per user for a list of PCs; nats-server runs
//! it as written, the fleet walkthrough works on top of it with each role's own seed, an
//! agent's seed cannot steer the fleet, and a PC added later joins without touching the
//! others' seeds.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use collector_fleet::ASSIGNMENTS_BUCKET;
use collector_fleet::status::AgentStatus;
use futures_util::StreamExt as _;

use crate::common::{AgentProcess, KillOnDrop, NatsServer, guest_wasm, key, signed, write_public};

fn credentials(dir: &Path, pcs: &[&str]) -> Output {
    let mut args = vec![
        "fleet".to_string(),
        "credentials".into(),
        "--dir".into(),
        dir.to_str().unwrap().into(),
        "--listen".into(),
        "127.0.0.1:{{PORT}}".into(),
        "--store-dir".into(),
        "{{STORE_DIR}}".into(),
    ];
    for pc in pcs {
        args.extend(["--pc".into(), (*pc).to_string()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `collector <args>` signed in with `seed`.
fn as_user(server: &NatsServer, seed: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .args(["--nats-nkey", seed.to_str().unwrap()])
        .env("NATS_URL", &server.url)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn ok(server: &NatsServer, seed: &Path, args: &[&str]) -> String {
    let out = as_user(server, seed, args);
    assert!(
        out.status.success(),
        "{args:?}: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn agent(server: &NatsServer, dir: &Path, work: &Path, trust: &Path, pc: &str) -> AgentProcess {
    let seed = dir.join("agents").join(format!("{pc}.nk"));
    let state = work.join(format!("state-{pc}"));
    let inbox = format!("_INBOX_{pc}");
    let args: Vec<&OsStr> = [
        "--nats-url",
        &server.url,
        "--nats-nkey",
        seed.to_str().unwrap(),
        "--nats-inbox-prefix",
        &inbox,
        "--trust",
        trust.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--health-ticks",
        "2",
        "--status-interval",
        "1s",
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    AgentProcess::start_as(pc, &args)
}

/// Waits until `pc` runs process-perf past its probation (v1, or v2 once the staged
/// rollout below has moved the fleet).
fn wait_running(server: &NatsServer, operator: &Path, pc: &str) -> AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = as_user(server, operator, &["fleet", "status", "--json", "--pc", pc]);
        if out.status.success() {
            let records: Vec<AgentStatus> = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(r) = records
                .into_iter()
                .find(|r| r.modules.iter().any(|m| m.version >= 1 && !m.probation))
            {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{pc} never ran process-perf; server log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn generated_credentials_run_the_fleet_and_take_a_pc_added_later() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("creds");
    credentials(&dir, &["pc-a", "pc-b"]);
    let conf = std::fs::read_to_string(dir.join("nats-server.conf")).unwrap();
    let mut server = NatsServer::start_with_config(&conf, &[]);
    let operator = dir.join("operator.nk");
    let publisher = dir.join("publisher.nk");
    let trust = write_public(work.path(), "signer", &key(1));

    ok(&server, &operator, &["fleet", "init"]);
    let bundle = work.path().join("process-perf-1.bundle");
    let bytes = signed(
        "process-perf",
        1,
        &std::fs::read(guest_wasm()).unwrap(),
        &[&key(1)],
    );
    std::fs::write(&bundle, bytes).unwrap();
    ok(
        &server,
        &publisher,
        &[
            "module",
            "publish",
            "--trust",
            trust.to_str().unwrap(),
            bundle.to_str().unwrap(),
        ],
    );
    ok(
        &server,
        &operator,
        &[
            "config",
            "set",
            "process_perf_enabled=true",
            "host_perf_interval=200ms",
        ],
    );
    ok(
        &server,
        &operator,
        &["module", "rollout", "process-perf", "1", "--global"],
    );

    // kanade's backend, signed in with its seed, receives the agents' data.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kanade_seed = std::fs::read_to_string(dir.join("kanade.nk")).unwrap();
    let kanade = rt
        .block_on(
            async_nats::ConnectOptions::with_nkey(kanade_seed.trim().into()).connect(&server.url),
        )
        .unwrap();
    let mut data = rt.block_on(kanade.subscribe("process_perf.>")).unwrap();
    rt.block_on(kanade.flush()).unwrap();

    let _a = agent(&server, &dir, work.path(), &trust, "pc-a");
    wait_running(&server, &operator, "pc-a");
    let got = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), data.next()).await })
        .expect("pc-a's data reaches kanade")
        .unwrap();
    assert_eq!(got.subject.as_str(), "process_perf.pc-a");
    let violations: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        violations,
        Vec::<String>::new(),
        "the agent asked for more than it may"
    );

    // A staged rollout under the operator's credentials: the controller reads the
    // status and group buckets, writes the rollout and the assignment, and tells
    // kanade's timeline, with no permission violation.
    let v2 = work.path().join("process-perf-2.bundle");
    let bytes = signed(
        "process-perf",
        2,
        &std::fs::read(guest_wasm()).unwrap(),
        &[&key(1)],
    );
    std::fs::write(&v2, bytes).unwrap();
    ok(
        &server,
        &publisher,
        &[
            "module",
            "publish",
            "--trust",
            trust.to_str().unwrap(),
            v2.to_str().unwrap(),
        ],
    );
    let mut timeline = rt.block_on(kanade.subscribe("obs.rollouts")).unwrap();
    rt.block_on(kanade.flush()).unwrap();
    ok(
        &server,
        &operator,
        &[
            "rollout",
            "start",
            "process-perf",
            "2",
            "--global",
            "--waves",
            "100%",
            "--bake",
            "1s",
            "--min-ticks",
            "2",
        ],
    );
    let mut controller = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["rollout", "run", "--nats-nkey", operator.to_str().unwrap()])
            .env("NATS_URL", &server.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let json = ok(&server, &operator, &["rollout", "status", "--json"]);
        if json.contains(r#""phase": "completed""#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not complete: {json}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = controller.0.kill();
    let event = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), timeline.next()).await })
        .expect("the rollout's events reach kanade")
        .unwrap();
    assert_eq!(event.subject.as_str(), "obs.rollouts");
    let violations: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        violations,
        Vec::<String>::new(),
        "a rollout asked for more than the operator may"
    );

    // pc-a's seed steers nothing: a read answered onto the fleet's assignment key.
    let seed_a = std::fs::read_to_string(dir.join("agents/pc-a.nk")).unwrap();
    let before = ok(
        &server,
        &operator,
        &["module", "effective", "--pc", "pc-b", "--json"],
    );
    rt.block_on(async {
        let a = async_nats::ConnectOptions::with_nkey(seed_a.trim().into())
            .custom_inbox_prefix("_INBOX_pc-a")
            .connect(&server.url)
            .await
            .unwrap();
        a.publish_with_reply(
            format!("$JS.API.DIRECT.GET.KV_{ASSIGNMENTS_BUCKET}.$KV.{ASSIGNMENTS_BUCKET}.global"),
            format!("$KV.{ASSIGNMENTS_BUCKET}.pcs.pc-b"),
            "".into(),
        )
        .await
        .unwrap();
        a.flush().await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ok(
            &server,
            &operator,
            &["module", "effective", "--pc", "pc-b", "--json"]
        ),
        before
    );

    // A PC added later: pc-a's seed stays, pc-c joins.
    let out = credentials(&dir, &["pc-c"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("3 PCs") && said.contains("pc-c.nk"), "{said}");
    assert!(
        !said.contains("pc-a.nk"),
        "pc-a's seed was made anew: {said}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("agents/pc-a.nk")).unwrap(),
        seed_a
    );
    server.reconfigure(&std::fs::read_to_string(dir.join("nats-server.conf")).unwrap());
    let _c = agent(&server, &dir, work.path(), &trust, "pc-c");
    wait_running(&server, &operator, "pc-c");
    wait_running(&server, &operator, "pc-a");

    // Seeds are the owner's alone.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for seed in ["operator.nk", "agents/pc-c.nk"] {
            let mode = std::fs::metadata(dir.join(seed))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{seed} is readable by others: {mode:o}");
        }
    }
}

#[test]
fn bad_pc_ids_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    for bad in ["has space", "a.b", "../x", ""] {
        let out = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["fleet", "credentials", "--dir"])
            .arg(work.path())
            .args(["--pc", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            stderr.contains("--pc") && stderr.contains("PC id"),
            "{stderr}"
        );
    }
    assert!(!work.path().join("nats-server.conf").exists());
}
