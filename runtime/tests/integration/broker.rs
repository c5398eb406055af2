//! Least privilege on the broker: nats-server runs the shipped docs/nats-server.conf
//! (only its address and store directory changed), and each role is held to it. Agents
//! run the whole fleet flow with their own credentials and nothing more (the server logs
//! no violation), while an agent's credentials cannot publish a module, change settings
//! or assignments, or speak for another PC; an operator cannot touch the module store.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use collector_bundle::{MAX_BUNDLE_LEN, RootDoc, RootSigningKey, SignedRoot};
use collector_fleet::fetch;
use collector_fleet::status::AgentStatus;
use collector_fleet::{
    ASSIGNMENTS_BUCKET, CONFIG_BUCKET, MODULES_STORE, MODULES_STREAM, STATUS_BUCKET, TRUST_BUCKET,
};
use futures_util::StreamExt as _;

use crate::common::{AgentProcess, NatsServer, key, signed, wait_for, write_public};

/// The template as shipped.
const TEMPLATE: &str = include_str!("../../../docs/nats-server.conf");

const PC_A_PASSWORD: &str = "pc-a-secret";
const OPERATOR_PASSWORD: &str = "operator-secret";
const PUBLISHER_PASSWORD: &str = "publisher-secret";
const KANADE_PASSWORD: &str = "kanade-secret";

/// How long a message that should not arrive is waited for.
const QUIET: Duration = Duration::from_secs(1);

/// A server run from the template, with pc-b's nkey seed in a file.
struct Broker {
    server: NatsServer,
    dir: tempfile::TempDir,
    pc_b_seed: PathBuf,
    trust: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Broker {
    fn start() -> Self {
        let conf = TEMPLATE
            .replace("listen: 0.0.0.0:4222", "listen: 127.0.0.1:{{PORT}}")
            .replace(
                r#"store_dir: "/var/lib/nats/jetstream""#,
                r#"store_dir: "{{STORE_DIR}}""#,
            );
        assert!(
            conf.contains("{{PORT}}") && conf.contains("{{STORE_DIR}}"),
            "the template's listen or store_dir line changed; update this test"
        );
        let pc_b = nkeys::KeyPair::new_user();
        let server = NatsServer::start_with_config(
            &conf,
            &[
                ("PC_A_PASSWORD", PC_A_PASSWORD),
                ("PC_B_NKEY", &pc_b.public_key()),
                ("OPERATOR_PASSWORD", OPERATOR_PASSWORD),
                ("PUBLISHER_PASSWORD", PUBLISHER_PASSWORD),
                ("KANADE_PASSWORD", KANADE_PASSWORD),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let pc_b_seed = dir.path().join("pc-b.nk");
        std::fs::write(&pc_b_seed, format!("{}\n", pc_b.seed().unwrap())).unwrap();
        let trust = write_public(dir.path(), "signer", &key(1));
        Self {
            server,
            dir,
            pc_b_seed,
            trust,
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    /// The `--nats-*` flags of `who`.
    fn creds(&self, who: &str) -> Vec<String> {
        let password = match who {
            "pc-a" => PC_A_PASSWORD,
            "operator" => OPERATOR_PASSWORD,
            "publisher" => PUBLISHER_PASSWORD,
            "kanade" => KANADE_PASSWORD,
            "pc-b" => {
                return vec![
                    "--nats-nkey".into(),
                    self.pc_b_seed.to_str().unwrap().into(),
                    "--nats-inbox-prefix".into(),
                    "_INBOX_pc-b".into(),
                ];
            }
            _ => panic!("no such user {who}"),
        };
        let mut flags = vec![
            "--nats-user".into(),
            who.into(),
            "--nats-password".into(),
            password.into(),
        ];
        if who == "pc-a" {
            flags.extend(["--nats-inbox-prefix".into(), "_INBOX_pc-a".into()]);
        }
        flags
    }

    /// Runs `collector <args>` as `who`.
    fn collector(&self, who: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(args)
            .args(self.creds(who))
            .env("NATS_URL", &self.server.url)
            .env("NO_COLOR", "1")
            .env_remove("NATS_USER")
            .env_remove("NATS_PASSWORD")
            .env_remove("NATS_TOKEN")
            .output()
            .unwrap()
    }

    fn ok(&self, who: &str, args: &[&str]) -> String {
        let out = self.collector(who, args);
        assert!(
            out.status.success(),
            "{who}: {args:?} failed:\n{}\nserver violations: {:#?}",
            String::from_utf8_lossy(&out.stderr),
            self.violations()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn denied(&self, who: &str, args: &[&str]) {
        let out = self.collector(who, args);
        assert!(
            !out.status.success(),
            "{who}: {args:?} should be refused by the broker:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// A client connected as `who`, and the server errors it was sent (permission
    /// violations arrive there, asynchronously).
    fn client(&self, who: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let opts = match who {
            "pc-b" => {
                let seed = std::fs::read_to_string(&self.pc_b_seed).unwrap();
                async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            }
            _ => {
                let creds = self.creds(who);
                async_nats::ConnectOptions::with_user_and_password(
                    creds[1].clone(),
                    creds[3].clone(),
                )
            }
        }
        .custom_inbox_prefix(match who {
            "pc-a" | "pc-b" => format!("_INBOX_{who}"),
            _ => "_INBOX".into(),
        })
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        });
        let client = self
            .rt
            .block_on(opts.connect(&self.server.url))
            .unwrap_or_else(|e| panic!("{who} cannot connect: {e}"));
        (client, errors)
    }

    fn js(&self, who: &str) -> jetstream::Context {
        let (client, _) = self.client(who);
        let _rt = self.rt.enter();
        jetstream::new(client)
    }

    /// A key as the operator reads it.
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let js = self.js("operator");
        self.rt.block_on(async {
            let store = js.get_key_value(bucket).await.unwrap();
            store.get(key).await.unwrap().map(|b| b.to_vec())
        })
    }

    /// Whether the module store holds `object`, as the operator sees it.
    fn published(&self, object: &str) -> bool {
        let js = self.js("operator");
        self.rt.block_on(async {
            let store = js.get_object_store(MODULES_STORE).await.unwrap();
            store.info(object).await.is_ok()
        })
    }

    fn status(&self, pc: &str) -> Option<AgentStatus> {
        self.get(STATUS_BUCKET, pc)
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    /// A `collector run` for `pc`, fleet mode, with its own credentials.
    fn agent(&self, pc: &str) -> AgentProcess {
        let state = self.dir.path().join(format!("state-{pc}"));
        let mut args: Vec<String> = vec![
            "--nats-url".into(),
            self.server.url.clone(),
            "--trust".into(),
            self.trust.to_str().unwrap().into(),
            "--state-dir".into(),
            state.to_str().unwrap().into(),
            "--health-ticks".into(),
            "2".into(),
            "--status-interval".into(),
            "1s".into(),
        ];
        args.extend(self.creds(pc));
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        AgentProcess::start_as(pc, &args)
    }

    /// The lines of the server log that report a permission violation.
    fn violations(&self) -> Vec<String> {
        self.server
            .log()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_string)
            .collect()
    }

    /// The fleet's buckets (operator) and one published module (publisher).
    fn with_module(&self) -> String {
        let out = self.ok("operator", &["fleet", "init"]);
        for bucket in [ASSIGNMENTS_BUCKET, STATUS_BUCKET] {
            assert!(out.contains(&format!("{bucket}: created")), "{out}");
        }
        // Idempotent, with the history each bucket needs.
        let again = self.ok("operator", &["fleet", "init"]);
        assert!(again.contains("collector_status: already there"), "{again}");
        let js = self.js("operator");
        for (bucket, history) in [(ASSIGNMENTS_BUCKET, 5), (STATUS_BUCKET, 1)] {
            let kept = self.rt.block_on(async {
                let store = js.get_key_value(bucket).await.unwrap();
                store.status().await.unwrap().history()
            });
            assert_eq!(kept, history, "{bucket}");
        }
        let bundle = bundle_file(self.dir.path(), 1);
        self.ok(
            "publisher",
            &["module", "publish", "--trust", s(&self.trust), &bundle],
        );
        bundle
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The process-perf guest signed as `version`, written to a file.
fn bundle_file(dir: &Path, version: u64) -> String {
    let bytes = signed(
        "process-perf",
        version,
        &std::fs::read(crate::common::guest_wasm()).unwrap(),
        &[&key(1)],
    );
    let path = dir.join(format!("process-perf-{version}.bundle"));
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// The next message of `sub` within `limit`.
fn next(
    rt: &tokio::runtime::Runtime,
    sub: &mut async_nats::Subscriber,
    limit: Duration,
) -> Option<async_nats::Message> {
    rt.block_on(async { tokio::time::timeout(limit, sub.next()).await })
        .ok()
        .flatten()
}

fn wait_status(
    broker: &Broker,
    pc: &str,
    what: &str,
    cond: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = broker.status(pc);
        if let Some(s) = &status
            && cond(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{pc}: {what} not reached; last status: {status:#?}\nserver violations: {:#?}",
            broker.violations()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agents_run_the_whole_fleet_flow_with_only_their_own_rights() {
    let broker = Broker::start();
    // kanade makes its own settings bucket, perhaps without direct gets: agents then
    // read it through the stream's message API.
    let kanade = broker.js("kanade");
    broker
        .rt
        .block_on(kanade.create_stream(jetstream::stream::Config {
            name: format!("KV_{CONFIG_BUCKET}"),
            subjects: vec![format!("$KV.{CONFIG_BUCKET}.>")],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            discard: jetstream::stream::DiscardPolicy::New,
            allow_direct: false,
            ..Default::default()
        }))
        .unwrap();
    broker.with_module();
    broker.ok(
        "operator",
        &[
            "config",
            "set",
            "process_perf_enabled=true",
            "host_perf_interval=200ms",
            "process_perf_top_n=2",
        ],
    );
    broker.ok(
        "operator",
        &["config", "groups", "--pc", "pc-b", "--set", "canary"],
    );
    broker.ok(
        "operator",
        &["module", "rollout", "process-perf", "1", "--global"],
    );

    // kanade's backend consumes the agents' data and events.
    let (kanade, _) = broker.client("kanade");
    let mut data = broker
        .rt
        .block_on(kanade.subscribe("process_perf.>"))
        .unwrap();
    let mut events = broker.rt.block_on(kanade.subscribe("obs.>")).unwrap();
    broker.rt.block_on(kanade.flush()).unwrap();

    // pc-a signs in with a user and password, pc-b with an nkey.
    let _a = broker.agent("pc-a");
    let _b = broker.agent("pc-b");
    for pc in ["pc-a", "pc-b"] {
        let status = wait_status(&broker, pc, "process-perf 1 running", |s| {
            s.modules
                .iter()
                .any(|m| m.name == "process-perf" && m.version == 1 && !m.probation)
        });
        assert!(status.config_revision > 0, "{status:#?}");
        assert!(status.assignment_revision > 0, "{status:#?}");
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let msg = next(&broker.rt, &mut data, Duration::from_secs(10))
            .expect("both agents' process_perf data reaches kanade");
        seen.insert(msg.subject.to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["process_perf.pc-a", "process_perf.pc-b"]
    );
    let event =
        next(&broker.rt, &mut events, Duration::from_secs(10)).expect("module events reach kanade");
    assert!(
        ["obs.pc-a", "obs.pc-b"].contains(&event.subject.as_str()),
        "{}",
        event.subject
    );

    // The agents asked for nothing they were not allowed: not one violation logged.
    assert_eq!(broker.violations(), Vec::<String>::new());
    let listed = broker.ok("operator", &["fleet", "status"]);
    assert!(
        listed.contains("pc-a") && listed.contains("pc-b"),
        "{listed}"
    );
    // The operator's other reads need nothing more either.
    let modules = broker.ok("operator", &["module", "list"]);
    assert!(modules.contains("process-perf"), "{modules}");
    broker.ok("operator", &["module", "effective", "--pc", "pc-b"]);
    broker.ok("operator", &["config", "effective", "--pc", "pc-b"]);
    broker.ok("operator", &["config", "get"]);
    assert_eq!(broker.violations(), Vec::<String>::new());
}

#[test]
fn an_agents_credentials_cannot_write_the_fleet_or_speak_for_another_pc() {
    let broker = Broker::start();
    let bundle = broker.with_module();
    broker.ok(
        "operator",
        &["module", "rollout", "process-perf", "1", "--global"],
    );
    let assignments = broker.get(ASSIGNMENTS_BUCKET, "global").unwrap();

    // Through the operator commands, as an agent: every write is refused.
    let v2 = bundle_file(broker.dir.path(), 2);
    // (Each refusal costs a request timeout: the broker drops a denied message without
    // an answer, so pc-b, the nkey user, only tries the module store.)
    broker.denied(
        "pc-a",
        &["module", "publish", "--trust", s(&broker.trust), &v2],
    );
    broker.denied(
        "pc-a",
        &["module", "rollout", "process-perf", "1", "--pc", "pc-a"],
    );
    broker.denied(
        "pc-a",
        &["config", "set", "--pc", "pc-a", "process_perf_top_n=9"],
    );
    broker.denied(
        "pc-b",
        &["module", "publish", "--trust", s(&broker.trust), &v2],
    );
    assert!(!broker.published("process-perf/2"));
    assert_eq!(
        broker.get(ASSIGNMENTS_BUCKET, "global").unwrap(),
        assignments
    );
    assert_eq!(broker.get(ASSIGNMENTS_BUCKET, "pcs.pc-a"), None);
    assert_eq!(broker.get(CONFIG_BUCKET, "pcs.pc-a"), None);
    let log = broker.violations().join("\n");
    for needle in [
        "user:pc-a",
        "nkey:U",
        // Publishing opens the module store, which agents may only read by direct gets.
        // So is a rollout, which checks the store before it writes the assignment.
        "$JS.API.STREAM.INFO.OBJ_collector_modules",
        "KV_agent_config",
    ] {
        assert!(log.contains(needle), "no violation with {needle:?}:\n{log}");
    }

    // Directly: kanade listens on every PC's subjects.
    let (kanade, _) = broker.client("kanade");
    let mut data = broker
        .rt
        .block_on(kanade.subscribe("process_perf.>"))
        .unwrap();
    let mut events = broker.rt.block_on(kanade.subscribe("obs.>")).unwrap();
    broker.rt.block_on(kanade.flush()).unwrap();
    let (agent, errors) = broker.client("pc-a");
    broker.rt.block_on(async {
        agent
            .publish("process_perf.pc-b", "forged".into())
            .await
            .unwrap();
        agent.publish("obs.pc-b", "forged".into()).await.unwrap();
        agent.flush().await.unwrap();
        // Its own subject passes: the listener would have seen a forgery.
        agent
            .publish("process_perf.pc-a", "own".into())
            .await
            .unwrap();
        agent.flush().await.unwrap();
    });
    // Nor can it listen to the replies sent to other clients.
    let _snoop = broker.rt.block_on(agent.subscribe("_INBOX.>")).unwrap();
    broker.rt.block_on(agent.flush()).unwrap();
    let first = next(&broker.rt, &mut data, QUIET).expect("pc-a's own data arrives");
    assert_eq!(first.subject.as_str(), "process_perf.pc-a");
    assert_eq!(&first.payload[..], b"own");
    assert!(next(&broker.rt, &mut data, QUIET).is_none());
    assert!(next(&broker.rt, &mut events, QUIET).is_none());
    let told = errors.lock().unwrap().join("\n");
    assert!(
        told.contains("process_perf.pc-b")
            && told.contains("obs.pc-b")
            && told.contains("Subscription to \"_INBOX.>\""),
        "the client was not told of its violations: {told}"
    );

    // JetStream writes get no acknowledgement: they fail, and nothing is stored. An
    // agent has no JetStream of its own: only its status key is ever acknowledged.
    broker.rt.block_on(async {
        let ask = |subject: String, body: &'static str| {
            let agent = agent.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(1), agent.request(subject, body.into()))
                    .await
                    .is_ok_and(|r| {
                        r.is_ok_and(|m| String::from_utf8_lossy(&m.payload).contains("\"seq\""))
                    })
            }
        };
        assert!(
            ask(format!("$KV.{STATUS_BUCKET}.pc-a"), "{}").await,
            "its own key"
        );
        for (subject, body) in [
            (format!("$KV.{STATUS_BUCKET}.pc-b"), "{}"),
            (format!("$KV.{ASSIGNMENTS_BUCKET}.global"), "{}"),
            (format!("$JS.API.STREAM.DELETE.KV_{ASSIGNMENTS_BUCKET}"), ""),
            (format!("$JS.API.STREAM.PURGE.KV_{ASSIGNMENTS_BUCKET}"), ""),
            (
                "$JS.API.STREAM.CREATE.KV_elsewhere".to_string(),
                r#"{"name":"KV_elsewhere","subjects":["$KV.elsewhere.>"]}"#,
            ),
            ("$O.collector_modules.C.forged".to_string(), "forged"),
            (
                format!(
                    "$O.collector_modules.M.{}",
                    URL_SAFE.encode("process-perf/1")
                ),
                "forged",
            ),
        ] {
            assert!(
                !ask(subject.clone(), body).await,
                "{subject} was acknowledged"
            );
        }
        // Other agents' records are not readable either.
        let read = tokio::time::timeout(
            Duration::from_secs(1),
            agent.request(
                format!("$JS.API.DIRECT.GET.KV_{STATUS_BUCKET}.$KV.{STATUS_BUCKET}.pc-b"),
                "".into(),
            ),
        )
        .await;
        assert!(!read.is_ok_and(|r| r.is_ok()), "pc-a read a status record");
    });
    let log = broker.violations().join("\n");
    for needle in [
        "Subject \"$KV.collector_config.global\"",
        "Subject \"$O.collector_modules.C.forged\"",
    ] {
        assert!(log.contains(needle), "no violation with {needle:?}:\n{log}");
    }
    assert_eq!(broker.get(STATUS_BUCKET, "pc-b"), None);
    assert_eq!(
        broker.get(ASSIGNMENTS_BUCKET, "global").unwrap(),
        assignments
    );

    // The operator assigns but cannot publish; kanade neither.
    broker.ok(
        "operator",
        &["module", "rollout", "process-perf", "1", "--pc", "pc-a"],
    );
    for who in ["operator", "kanade"] {
        broker.denied(
            who,
            &["module", "publish", "--trust", s(&broker.trust), &v2],
        );
    }
    assert!(!broker.published("process-perf/2"));
    // The publisher can, and republishing the same bytes is harmless.
    broker.ok(
        "publisher",
        &["module", "publish", "--trust", s(&broker.trust), &bundle],
    );
    broker.ok(
        "publisher",
        &["module", "publish", "--trust", s(&broker.trust), &v2],
    );
    assert!(broker.published("process-perf/2"));
}

#[test]
fn an_agent_downloads_the_largest_bundle_with_its_own_rights_alone() {
    // The largest bundle an agent accepts, in 256 chunks, through the agent's own
    // download path: direct gets only, so no consumer and no flow control to answer.
    let broker = Broker::start();
    broker.with_module();
    let big: Vec<u8> = (0..MAX_BUNDLE_LEN).map(|i| (i % 251) as u8).collect();
    let publisher = broker.js("publisher");
    broker.rt.block_on(async {
        let store = publisher.get_object_store(MODULES_STORE).await.unwrap();
        store.put("big/1", &mut &big[..]).await.unwrap();
    });
    let agent = broker.js("pc-a");
    let got = broker
        .rt
        .block_on(fetch::fetch(
            &agent,
            "big",
            1,
            MAX_BUNDLE_LEN,
            Duration::from_secs(60),
        ))
        .expect("downloaded with the agent's rights");
    assert!(
        got.bytes == big,
        "{} bytes of {}",
        got.bytes.len(),
        big.len()
    );
    assert_eq!(broker.violations(), Vec::<String>::new());
}

#[test]
fn an_inbox_prefix_must_be_a_plain_subject() {
    // Checked before connecting: a wildcard would widen what the client listens to.
    for bad in ["_INBOX.>", "_INBOX.*.x", "a..b", "", "has space"] {
        let out = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["fleet", "status", "--nats-inbox-prefix", bad])
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env_remove("NATS_INBOX_PREFIX")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(stderr.contains("--nats-inbox-prefix"), "{bad:?}: {stderr}");
    }
}

// --- An agent's credential as an attacker holds it -------------------------------
//
// What an attacker who stole pc-a's credential tries: the moves below were each seen to
// work on the single-account layout this template replaced (found from outside with
// nats-server 2.15.1).

/// The operator's view of a key: its revision and value (`None` when absent).
fn entry(broker: &Broker, bucket: &str, key: &str) -> Option<(u64, Vec<u8>)> {
    let js = broker.js("operator");
    broker.rt.block_on(async {
        let store = js.get_key_value(bucket).await.unwrap();
        store
            .entry(key)
            .await
            .unwrap()
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.revision, e.value.to_vec()))
    })
}

/// pc-b's own status record, written with pc-b's credential as its agent does.
fn put_own_status(broker: &Broker, pc: &str, body: &str) {
    let (client, _) = broker.client(pc);
    broker.rt.block_on(async {
        let reply = client
            .request(format!("$KV.{STATUS_BUCKET}.{pc}"), body.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("{pc} cannot write its own status key: {e}"));
        assert!(
            String::from_utf8_lossy(&reply.payload).contains("\"seq\""),
            "{}",
            String::from_utf8_lossy(&reply.payload)
        );
    });
}

/// A fleet with a global and a canary assignment, settings, a status record of pc-b
/// and two published versions.
fn fleet_to_attack(broker: &Broker) {
    broker.with_module();
    let v2 = bundle_file(broker.dir.path(), 2);
    broker.ok(
        "publisher",
        &["module", "publish", "--trust", s(&broker.trust), &v2],
    );
    broker.ok(
        "operator",
        &["module", "rollout", "process-perf", "1", "--global"],
    );
    broker.ok(
        "operator",
        &[
            "module",
            "rollout",
            "process-perf",
            "2",
            "--group",
            "canary",
        ],
    );
    broker.ok("operator", &["config", "set", "process_perf_enabled=true"]);
    broker.ok(
        "operator",
        &["config", "set", "--pc", "pc-b", "process_perf_top_n=7"],
    );
    put_own_status(broker, "pc-b", r#"{"pc_id":"pc-b","genuine":true}"#);
}

#[test]
fn an_agents_credential_cannot_steer_jetstream_answers_into_the_fleet() {
    let broker = Broker::start();
    fleet_to_attack(&broker);
    let meta_v2 = format!("$O.{MODULES_STORE}.M.{}", URL_SAFE.encode("process-perf/2"));
    let meta_v1 = format!("$O.{MODULES_STORE}.M.{}", URL_SAFE.encode("process-perf/1"));
    let watched = [
        (ASSIGNMENTS_BUCKET, "global"),
        (ASSIGNMENTS_BUCKET, "pcs.pc-b"),
        (CONFIG_BUCKET, "global"),
        (STATUS_BUCKET, "pc-b"),
    ];
    let before: Vec<_> = watched.iter().map(|(b, k)| entry(&broker, b, k)).collect();
    let (kanade, _) = broker.client("kanade");
    let mut forged = broker.rt.block_on(async {
        let sub = kanade.subscribe("process_perf.pc-b").await.unwrap();
        let events = kanade.subscribe("obs.pc-b").await.unwrap();
        kanade.flush().await.unwrap();
        futures_util::stream::select(sub, events)
    });

    // Every request an agent might be allowed, answered onto every subject that matters:
    // the answer to a read of the canary assignment becomes the fleet's, settings are
    // reset, pc-b's status and data are forged, a bundle's metadata is repointed.
    let requests: Vec<(String, String)> = vec![
        (
            format!(
                "$JS.API.DIRECT.GET.KV_{ASSIGNMENTS_BUCKET}.$KV.{ASSIGNMENTS_BUCKET}.groups.canary"
            ),
            String::new(),
        ),
        (
            format!("$JS.API.DIRECT.GET.KV_{CONFIG_BUCKET}.$KV.{CONFIG_BUCKET}.global"),
            String::new(),
        ),
        (
            format!("$JS.API.DIRECT.GET.{MODULES_STREAM}.{meta_v1}"),
            String::new(),
        ),
        (
            format!("$JS.API.STREAM.MSG.GET.KV_{ASSIGNMENTS_BUCKET}"),
            format!(r#"{{"last_by_subj":"$KV.{ASSIGNMENTS_BUCKET}.groups.canary"}}"#),
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.KV_{ASSIGNMENTS_BUCKET}"),
            format!(
                r#"{{"stream_name":"KV_{ASSIGNMENTS_BUCKET}","config":{{"deliver_policy":"last_per_subject","ack_policy":"none","filter_subject":"$KV.{ASSIGNMENTS_BUCKET}.>","mem_storage":true,"num_replicas":1}}}}"#
            ),
        ),
        (
            format!("$JS.API.STREAM.INFO.KV_{CONFIG_BUCKET}"),
            String::new(),
        ),
        (
            format!("$KV.{STATUS_BUCKET}.pc-a"),
            r#"{"pc_id":"pc-a"}"#.into(),
        ),
    ];
    let targets = [
        format!("$KV.{ASSIGNMENTS_BUCKET}.global"),
        format!("$KV.{ASSIGNMENTS_BUCKET}.pcs.pc-b"),
        format!("$KV.{CONFIG_BUCKET}.global"),
        format!("$KV.{STATUS_BUCKET}.pc-b"),
        meta_v2.clone(),
        "process_perf.pc-b".into(),
        "obs.pc-b".into(),
    ];
    let (agent, _) = broker.client("pc-a");
    broker.rt.block_on(async {
        for (subject, body) in &requests {
            for target in &targets {
                agent
                    .publish_with_reply(subject.clone(), target.clone(), body.clone().into())
                    .await
                    .unwrap();
            }
        }
        // And a consumer of its own whose deliveries go where the attacker says: a
        // deliver subject is not checked against anyone's permissions either.
        for target in &targets {
            if target.starts_with(&format!("$KV.{ASSIGNMENTS_BUCKET}")) {
                continue; // the server refuses a delivery into the stream's own subjects
            }
            let body = format!(
                r#"{{"stream_name":"KV_{ASSIGNMENTS_BUCKET}","config":{{"deliver_subject":"{target}","deliver_policy":"last","ack_policy":"none","filter_subject":"$KV.{ASSIGNMENTS_BUCKET}.groups.canary","mem_storage":true,"num_replicas":1}}}}"#
            );
            let _ = agent
                .request(format!("$JS.API.CONSUMER.CREATE.KV_{ASSIGNMENTS_BUCKET}"), body.into())
                .await;
        }
        agent.flush().await.unwrap();
    });
    std::thread::sleep(QUIET);

    let after: Vec<_> = watched.iter().map(|(b, k)| entry(&broker, b, k)).collect();
    for (i, (bucket, key)) in watched.iter().enumerate() {
        assert_eq!(
            after[i]
                .as_ref()
                .map(|(rev, v)| (rev, String::from_utf8_lossy(v))),
            before[i]
                .as_ref()
                .map(|(rev, v)| (rev, String::from_utf8_lossy(v))),
            "{bucket} {key} was rewritten by pc-a's credential"
        );
    }
    let (publisher, _) = broker.client("publisher");
    let metadata = broker.rt.block_on(async {
        let js = jetstream::new(publisher);
        let stream = js.get_stream(MODULES_STREAM).await.unwrap();
        stream
            .get_last_raw_message_by_subject(&meta_v2)
            .await
            .unwrap()
    });
    let info: serde_json::Value = serde_json::from_slice(&metadata.payload).unwrap_or_else(|e| {
        panic!(
            "process-perf/2's metadata was replaced ({e}): {:?}",
            metadata.payload
        )
    });
    assert_eq!(info["name"], "process-perf/2", "{info}");
    let got = broker
        .rt
        .block_on(async { tokio::time::timeout(QUIET, forged.next()).await })
        .ok()
        .flatten();
    assert!(
        got.is_none(),
        "kanade received a message in pc-b's name: {:?}",
        got.map(|m| (m.subject, m.payload))
    );
}

#[test]
fn an_agents_credential_cannot_purge_other_records_with_a_rollup() {
    let broker = Broker::start();
    fleet_to_attack(&broker);
    let (agent, _) = broker.client("pc-a");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let answer = broker.rt.block_on(async {
        agent
            .request_with_headers(
                format!("$KV.{STATUS_BUCKET}.pc-a"),
                headers,
                r#"{"pc_id":"pc-a"}"#.into(),
            )
            .await
            .map(|m| String::from_utf8_lossy(&m.payload).to_string())
    });
    assert!(
        entry(&broker, STATUS_BUCKET, "pc-b").is_some(),
        "pc-a's rollup purged pc-b's status record (answer: {answer:?})"
    );
    // Its own plain puts still work.
    put_own_status(&broker, "pc-a", r#"{"pc_id":"pc-a"}"#);
}

#[test]
fn an_agents_credential_cannot_list_the_fleet_read_other_pcs_or_make_consumers() {
    let broker = Broker::start();
    fleet_to_attack(&broker);
    let (agent, _) = broker.client("pc-a");
    let answers = broker.rt.block_on(async {
        let mut answers = Vec::new();
        for (subject, body) in [
            (
                format!("$JS.API.STREAM.INFO.KV_{STATUS_BUCKET}"),
                r#"{"subjects_filter":">"}"#.to_string(),
            ),
            (
                format!("$JS.API.STREAM.INFO.KV_{CONFIG_BUCKET}"),
                r#"{"subjects_filter":">"}"#.to_string(),
            ),
            (
                format!("$JS.API.DIRECT.GET.KV_{CONFIG_BUCKET}.$KV.{CONFIG_BUCKET}.pcs.pc-b"),
                String::new(),
            ),
            (
                format!("$JS.API.DIRECT.GET.KV_{CONFIG_BUCKET}.$KV.{CONFIG_BUCKET}.global"),
                format!(r#"{{"last_by_subj":"$KV.{CONFIG_BUCKET}.pcs.pc-b"}}"#),
            ),
            (
                format!("$JS.API.DIRECT.GET.KV_{CONFIG_BUCKET}"),
                format!(r#"{{"last_by_subj":"$KV.{CONFIG_BUCKET}.pcs.pc-b"}}"#),
            ),
        ] {
            if let Ok(Ok(m)) = tokio::time::timeout(
                Duration::from_millis(500),
                agent.request(subject.clone(), body.into()),
            )
            .await
            {
                answers.push(format!("{subject}: {}", String::from_utf8_lossy(&m.payload)));
            }
        }
        // Durable consumers, as many as it likes.
        for i in 0..20 {
            for bucket in [CONFIG_BUCKET, ASSIGNMENTS_BUCKET] {
                let body = format!(
                    r#"{{"stream_name":"KV_{bucket}","config":{{"durable_name":"hoard{i}","deliver_policy":"last_per_subject","ack_policy":"none","num_replicas":1}}}}"#
                );
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    agent.request(format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.hoard{i}"), body.into()),
                )
                .await;
            }
        }
        answers
    });
    for answer in &answers {
        assert!(
            !answer.contains("pc-b") && !answer.contains("process_perf_top_n"),
            "pc-a learnt another PC's key: {answer}"
        );
    }
    // (The operator's own commands may leave short-lived ephemeral consumers: only the
    // attacker's durable ones are looked for.)
    // kanade's backend may list consumers; the operator may not.
    let js = broker.js("kanade");
    for bucket in [CONFIG_BUCKET, ASSIGNMENTS_BUCKET] {
        let hoarded: Vec<String> = broker.rt.block_on(async {
            let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
            let names = stream
                .consumer_names()
                .filter_map(|n| async move { n.ok() })
                .filter(|n| std::future::ready(n.starts_with("hoard")))
                .collect();
            tokio::time::timeout(Duration::from_secs(10), names)
                .await
                .expect("consumer names listed within 10 s")
        });
        assert_eq!(
            hoarded,
            Vec::<String>::new(),
            "pc-a made consumers on KV_{bucket}"
        );
    }
}

/// A trust root version 1 that agents installed with `--trust signer.pub` (key 1, the
/// implicit version 0) follow: signed by key 1 and by its own root key 50; key 1 keeps
/// signing bundles.
fn first_root() -> Vec<u8> {
    let now = chrono::Utc::now();
    let doc = RootDoc {
        version: 1,
        issued_at: now,
        expires_at: now + chrono::Duration::days(90),
        root_keys: vec![key(50).public_key()],
        root_threshold: 1,
        signing_keys: vec![RootSigningKey {
            key: key(1).public_key(),
            modules: None,
        }],
        signing_threshold: 1,
        revoked: Vec::new(),
    };
    let mut root = SignedRoot::new(&doc).unwrap();
    root.sign(&key(1)).unwrap();
    root.sign(&key(50)).unwrap();
    root.to_bytes()
}

#[test]
fn only_the_publisher_writes_trust_roots_and_agents_follow_them_with_their_own_rights() {
    let broker = Broker::start();
    broker.with_module();
    let out = broker.ok("operator", &["fleet", "init"]);
    assert!(
        out.contains(&format!("{TRUST_BUCKET}: already there")),
        "{out}"
    );
    broker.ok(
        "operator",
        &["module", "rollout", "process-perf", "1", "--global"],
    );
    let _a = broker.agent("pc-a");
    wait_status(&broker, "pc-a", "version 0: the --trust key", |s| {
        s.trust.as_ref().is_some_and(|t| t.version == 0)
    });

    // The publisher writes version 1; the agent reads it with its own credential.
    let js = broker.js("publisher");
    broker.rt.block_on(async {
        let store = js.get_key_value(TRUST_BUCKET).await.unwrap();
        store.put("v1", first_root().into()).await.unwrap();
    });
    wait_status(
        &broker,
        "pc-a",
        "root 1 followed from the --trust key",
        |s| s.trust.as_ref().is_some_and(|t| t.version == 1),
    );

    // Anyone else writing a root: an agent, an operator, kanade's backend.
    let forged = b"{\"signed\": \"forged\", \"signatures\": []}";
    for who in ["pc-a", "operator", "kanade"] {
        let (client, errors) = broker.client(who);
        broker.rt.block_on(async {
            let _ = client
                .publish(format!("$KV.{TRUST_BUCKET}.v2"), forged.as_slice().into())
                .await;
            let _ = client.flush().await;
        });
        assert!(
            wait_for(Duration::from_secs(5), || !errors
                .lock()
                .unwrap()
                .is_empty()),
            "{who}: the broker took a write to {TRUST_BUCKET}"
        );
        assert_eq!(broker.get(TRUST_BUCKET, "v2"), None, "{who} wrote a root");
    }
    // Nor can the bucket be purged, or a published root deleted, from there.
    let (operator, _) = broker.client("operator");
    let purge = broker.rt.block_on(async {
        operator
            .request(format!("$JS.API.STREAM.PURGE.KV_{TRUST_BUCKET}"), "".into())
            .await
    });
    assert!(
        purge.is_err()
            || !String::from_utf8_lossy(&purge.unwrap().payload).contains("\"success\":true"),
        "the operator purged the trust roots"
    );
    assert!(broker.get(TRUST_BUCKET, "v1").is_some());
    assert!(
        broker
            .status("pc-a")
            .unwrap()
            .trust
            .unwrap()
            .refused
            .is_none()
    );
}
