//! The fleet over a real nats-server with JetStream: agents (the `collector` binary) take
//! settings from kanade's `agent_config`, modules from assignments and the object store,
//! report status and ObsEvents, and keep running through broker outages.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, object_store};
use collector_fleet::status::AgentStatus;
use collector_fleet::{
    ASSIGNMENTS_BUCKET, CONFIG_BUCKET, GROUPS_BUCKET, MODULES_STORE, STATUS_BUCKET,
};
use futures_util::StreamExt;

use crate::common::*;

/// A nats-server with the fleet's buckets, and a client to play operator and kanade.
pub struct Fleet {
    pub server: NatsServer,
    pub rt: tokio::runtime::Runtime,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub dir: tempfile::TempDir,
    pub trust: PathBuf,
}

impl Fleet {
    pub fn start() -> Self {
        let server = NatsServer::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt.block_on(async_nats::connect(&server.url)).unwrap();
        let js = {
            let _runtime = rt.enter();
            jetstream::new(client.clone())
        };
        rt.block_on(async {
            for (bucket, history) in [
                (CONFIG_BUCKET, 1),
                (GROUPS_BUCKET, 1),
                (ASSIGNMENTS_BUCKET, 5),
                (STATUS_BUCKET, 1),
            ] {
                js.create_key_value(kv::Config {
                    bucket: bucket.into(),
                    history,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            js.create_object_store(object_store::Config {
                bucket: MODULES_STORE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let trust = write_public(dir.path(), "signer", &key(1));
        Self {
            server,
            rt,
            client,
            js,
            dir,
            trust,
        }
    }

    fn kv(&self, bucket: &str) -> kv::Store {
        self.rt
            .block_on(self.js.get_key_value(bucket))
            .unwrap_or_else(|e| panic!("KV {bucket}: {e}"))
    }

    /// Puts raw bytes, as kanade (or an attacker with write access) would.
    pub fn put(&self, bucket: &str, key: &str, value: &[u8]) {
        let kv = self.kv(bucket);
        self.rt
            .block_on(kv.put(key, value.to_vec().into()))
            .unwrap();
    }

    pub fn delete(&self, bucket: &str, key: &str) {
        let kv = self.kv(bucket);
        self.rt.block_on(kv.delete(key)).unwrap();
    }

    /// Puts an object straight into the module store, behind the operator CLI's back.
    pub fn put_module(&self, name: &str, version: u64, bundle: &[u8]) {
        self.rt.block_on(async {
            let store = self.js.get_object_store(MODULES_STORE).await.unwrap();
            let mut reader = bundle;
            store
                .put(format!("{name}/{version}").as_str(), &mut reader)
                .await
                .unwrap();
        });
    }

    /// Assigns `name` at `version` at scope `key` (replacing that scope's assignments).
    pub fn assign(&self, key: &str, modules: &[(&str, u64)]) {
        let modules: serde_json::Map<String, serde_json::Value> = modules
            .iter()
            .map(|(n, v)| (n.to_string(), serde_json::json!({ "version": v })))
            .collect();
        let value = serde_json::json!({ "modules": modules });
        self.put(ASSIGNMENTS_BUCKET, key, value.to_string().as_bytes());
    }

    pub fn status(&self, pc_id: &str) -> Option<AgentStatus> {
        let kv = self.kv(STATUS_BUCKET);
        let bytes = self.rt.block_on(kv.get(pc_id)).unwrap()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    /// Waits until `pc_id`'s status satisfies `cond`; fails with the last status.
    pub fn wait_status(
        &self,
        pc_id: &str,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(pc_id);
            if let Some(s) = &status
                && cond(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{pc_id}: {what} not reached within {limit:?}; last status: {status:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts an agent for `pc_id` with its own state directory.
    pub fn agent(&self, pc_id: &str, extra: &[&str]) -> AgentProcess {
        let state = self.state_dir(pc_id);
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--nats-url"),
            OsStr::new(&self.server.url),
            OsStr::new("--trust"),
            self.trust.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
            OsStr::new("--health-ticks"),
            OsStr::new("2"),
            OsStr::new("--status-interval"),
            OsStr::new("1s"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        AgentProcess::start_as(pc_id, &args)
    }

    pub fn state_dir(&self, pc_id: &str) -> PathBuf {
        self.dir.path().join(format!("state-{pc_id}"))
    }

    /// A subscription, ready (flushed) when this returns.
    pub fn subscribe(&self, subject: &str) -> async_nats::Subscriber {
        let sub = self
            .rt
            .block_on(self.client.subscribe(subject.to_string()))
            .unwrap();
        self.rt.block_on(self.client.flush()).unwrap();
        sub
    }

    /// The next message of `sub` within `limit`.
    pub fn next(&self, sub: &mut async_nats::Subscriber, limit: Duration) -> Option<Vec<u8>> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, sub.next()).await })
            .ok()
            .flatten()
            .map(|m| m.payload.to_vec())
    }
}

/// The process-perf guest, signed by the trusted key as `version`.
pub(crate) fn process_perf(version: u64) -> Vec<u8> {
    signed(
        "process-perf",
        version,
        &std::fs::read(guest_wasm()).unwrap(),
        &[&key(1)],
    )
}

/// Settings that turn process_perf on at `interval`, top 2.
pub(crate) fn enable(fleet: &Fleet, key: &str, interval: &str) {
    let value = format!(
        r#"{{"host_perf_interval":"{interval}","process_perf_enabled":true,"process_perf_top_n":2}}"#
    );
    fleet.put(CONFIG_BUCKET, key, value.as_bytes());
}

pub(crate) fn runs(status: &AgentStatus, name: &str, version: u64) -> bool {
    status
        .modules
        .iter()
        .any(|m| m.name == name && m.version == version && !m.probation)
}

pub(crate) fn version_of(status: &AgentStatus, name: &str) -> Option<u64> {
    status
        .modules
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.version)
}

const CONVERGE: Duration = Duration::from_secs(20);

#[test]
fn a_canary_group_then_global_rollout_reaches_exactly_its_targets() {
    let fleet = Fleet::start();
    for v in [1, 2] {
        fleet.put_module("process-perf", v, &process_perf(v));
    }
    fleet.put(GROUPS_BUCKET, "pc-a", br#"{"groups":["canary"]}"#);
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let a = fleet.agent("pc-a", &[]);
    let b = fleet.agent("pc-b", &[]);
    for pc in ["pc-a", "pc-b"] {
        fleet.wait_status(pc, CONVERGE, "v1 healthy", |s| runs(s, "process-perf", 1));
    }

    fleet.assign("groups.canary", &[("process-perf", 2)]);
    let sa = fleet.wait_status("pc-a", CONVERGE, "v2 healthy on the canary", |s| {
        runs(s, "process-perf", 2)
    });
    assert!(
        sa.assignment_revision > 0 && sa.pending.is_empty(),
        "{sa:#?}"
    );
    // pc-b has seen the canary write (its status is rewritten every second) and stays.
    std::thread::sleep(Duration::from_millis(1500));
    let sb = fleet.status("pc-b").unwrap();
    assert_eq!(version_of(&sb, "process-perf"), Some(1), "{sb:#?}");
    assert!(sb.pending.is_empty(), "{sb:#?}");

    // pc-b is pinned by its own scope; the global rollout leaves it where it is.
    fleet.assign("pcs.pc-b", &[("process-perf", 1)]);
    fleet.assign("global", &[("process-perf", 2)]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        version_of(&fleet.status("pc-b").unwrap(), "process-perf"),
        Some(1)
    );
    assert!(runs(&fleet.status("pc-a").unwrap(), "process-perf", 2));

    // Deleting the pin clears that layer: the global assignment applies.
    fleet.delete(ASSIGNMENTS_BUCKET, "pcs.pc-b");
    fleet.wait_status("pc-b", CONVERGE, "v2 after the pin is deleted", |s| {
        runs(s, "process-perf", 2)
    });
    for (mut agent, pc) in [(a, "pc-a"), (b, "pc-b")] {
        let status = agent.terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{pc} stops on SIGTERM with status 0: {status:?}"
        );
    }
}

#[test]
fn bundles_put_behind_the_operators_back_are_refused_and_the_running_module_carries_on() {
    let fleet = Fleet::start();
    fleet.put_module("process-perf", 5, &process_perf(5));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 5)]);
    let mut events = fleet.subscribe("obs.pc-a");
    let mut published = fleet.subscribe("process_perf.pc-a");
    let _agent = fleet.agent("pc-a", &[]);
    fleet.wait_status("pc-a", CONVERGE, "v5 healthy", |s| {
        runs(s, "process-perf", 5)
    });

    let component = std::fs::read(guest_wasm()).unwrap();
    let mut tampered = process_perf(6);
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let wrong_key = signed("process-perf", 7, &component, &[&key(2)]);
    let cases: [(u64, Vec<u8>, &str); 3] = [
        (6, tampered, "sha256"),
        (7, wrong_key, "signature"),
        (4, process_perf(4), "anti-rollback"),
    ];
    for (version, bytes, why) in cases {
        fleet.put_module("process-perf", version, &bytes);
        fleet.assign("global", &[("process-perf", version)]);
        let s = fleet.wait_status("pc-a", CONVERGE, &format!("v{version} refused"), |s| {
            s.last_refusal
                .as_ref()
                .is_some_and(|r| r.version == version)
        });
        let refusal = s.last_refusal.clone().unwrap();
        assert!(
            refusal.reason.to_lowercase().contains(why),
            "v{version}: the reason says {why:?}: {refusal:#?}"
        );
        assert_eq!(
            refusal.source,
            format!("collector_modules/process-perf/{version}")
        );
        assert_eq!(version_of(&s, "process-perf"), Some(5), "{s:#?}");
        assert!(
            s.pending
                .iter()
                .any(|p| p.version == version && p.why.starts_with("refused")),
            "{s:#?}"
        );
        // The event, decoded with kanade's own type.
        let event = loop {
            let bytes = fleet
                .next(&mut events, Duration::from_secs(10))
                .expect("an ObsEvent on obs.pc-a");
            let event: kanade_shared::wire::ObsEvent = serde_json::from_slice(&bytes).unwrap();
            if event.kind == "collector_module_refused" && event.payload["version"] == version {
                break event;
            }
        };
        assert_eq!(event.pc_id, "pc-a");
        assert_eq!(event.source, "collector:modules");
        assert!(event.event_record_id.is_some());
        assert!(
            event.payload["reason"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(why)
        );
        // v5 keeps publishing.
        while fleet
            .next(&mut published, Duration::from_millis(1))
            .is_some()
        {}
        let bytes = fleet
            .next(&mut published, Duration::from_secs(10))
            .expect("the running module keeps publishing");
        let perf: kanade_shared::wire::ProcessPerf = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(perf.pc_id, "pc-a");
    }
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

#[test]
fn the_agent_rides_out_broker_outages_and_starts_offline_on_its_last_known_good() {
    let mut fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let agent = fleet.agent("pc-a", &[]);
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });

    // Outage: ticks and sampling go on (the guest hears that its publishes fail), and
    // nothing spins.
    fleet.server.stop();
    while agent.stderr.try_recv().is_ok() {}
    agent.stderr_line_containing("not connected to NATS");
    let (cpu_before, t0) = (cpu_time(agent.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(agent.pid()) - cpu_before;
    assert!(
        used < t0.elapsed() / 2,
        "the agent used {used:?} of CPU in {:?} while NATS was down",
        t0.elapsed()
    );
    agent.stderr_line_containing("not connected to NATS");

    // The server comes back: publishes resume and the watches see new writes.
    fleet.server.resume();
    let client = fleet
        .rt
        .block_on(async_nats::connect(&fleet.server.url))
        .unwrap();
    let js = {
        let _runtime = fleet.rt.enter();
        jetstream::new(client.clone())
    };
    let fleet = Fleet {
        js,
        client,
        ..fleet
    };
    let mut published = fleet.subscribe("process_perf.pc-a");
    assert!(
        fleet
            .next(&mut published, Duration::from_secs(20))
            .is_some(),
        "publishes resume after the server is back"
    );
    fleet.put(CONFIG_BUCKET, "pcs.pc-a", br#"{"process_perf_top_n":1}"#);
    let one = wait_for(Duration::from_secs(20), || {
        fleet
            .next(&mut published, Duration::from_secs(1))
            .map(|b| serde_json::from_slice::<collector_shared::ProcessPerf>(&b).unwrap())
            .is_some_and(|m| m.processes.len() == 1)
    });
    assert!(one, "a setting written after the outage reaches the guest");
    agent.stop();

    // A start with the server down: the last-known-good module runs with the last
    // effective settings (process_perf is only turned on by the fleet's settings).
    let mut fleet = fleet;
    fleet.server.stop();
    let offline = fleet.agent("pc-a", &[]);
    offline.stderr_line_containing("starting with the last-known-good module");
    offline.stderr_line_containing("not connected to NATS");
    fleet.server.resume();
    offline.stop();
}

#[test]
fn settings_written_as_kanade_writes_them_reach_the_guest_quickly() {
    let fleet = Fleet::start();
    fleet.put_module("process-perf", 1, &process_perf(1));
    // Built with kanade's own type: the bytes `kanade config set` stores.
    let scope = kanade_shared::wire::ConfigScope {
        host_perf_interval: Some("200ms".into()),
        process_perf_enabled: Some(true),
        process_perf_top_n: Some(3),
        ..Default::default()
    };
    fleet.put(
        CONFIG_BUCKET,
        "global",
        &serde_json::to_vec(&scope).unwrap(),
    );
    fleet.assign("global", &[("process-perf", 1)]);
    let mut published = fleet.subscribe("process_perf.pc-a");
    let _agent = fleet.agent("pc-a", &[]);
    let first = fleet
        .next(&mut published, CONVERGE)
        .expect("publishes with the global settings");
    let first: kanade_shared::wire::ProcessPerf = serde_json::from_slice(&first).unwrap();
    assert!(first.processes.len() <= 3);

    // Group membership and a group layer, as kanade writes them.
    let group = kanade_shared::wire::ConfigScope {
        process_perf_top_n: Some(1),
        ..Default::default()
    };
    fleet.put(
        CONFIG_BUCKET,
        "groups.alpha",
        &serde_json::to_vec(&group).unwrap(),
    );
    let written = Instant::now();
    fleet.put(GROUPS_BUCKET, "pc-a", br#"{"groups":["alpha","zeta"]}"#);
    let applied = wait_for(Duration::from_secs(10), || {
        fleet
            .next(&mut published, Duration::from_millis(500))
            .map(|b| serde_json::from_slice::<collector_shared::ProcessPerf>(&b).unwrap())
            .is_some_and(|m| m.processes.len() == 1)
    });
    assert!(applied, "the group's top_n reaches the guest");
    eprintln!(
        "group membership change to a published message with the new setting: {:?}",
        written.elapsed()
    );
    let s = fleet.status("pc-a").unwrap();
    assert!(s.config_revision > 0, "{s:#?}");

    // The operator's view of this PC's settings is the agent's.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_collector"))
        .args([
            "config",
            "effective",
            "--pc",
            "pc-a",
            "--json",
            "--nats-url",
        ])
        .arg(&fleet.server.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let operator: collector_shared::EffectiveConfig = serde_json::from_slice(&out.stdout).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fleet.state_dir("pc-a").join("fleet-state.json")).unwrap(),
    )
    .unwrap();
    let agent: collector_shared::EffectiveConfig =
        serde_json::from_value(saved["config"].clone()).unwrap();
    assert_eq!(operator, agent);
    assert_eq!(agent.process_perf_top_n, 1);
    // And kanade's own resolution of the same layers agrees.
    let kanade_global: kanade_shared::wire::ConfigScope = scope;
    let (kanade, _warnings) = kanade_shared::wire::resolve(
        Some(&kanade_global),
        &std::collections::BTreeMap::from([("alpha".to_string(), group)]),
        None,
        &["alpha".to_string(), "zeta".to_string()],
    );
    assert_eq!(kanade.process_perf_top_n, agent.process_perf_top_n);
    assert_eq!(kanade.host_perf_interval, agent.host_perf_interval);
}

/// Both guests' messages, counted per subject over `window`, with the longest gap.
fn watch_subject(
    fleet: &Fleet,
    sub: &mut async_nats::Subscriber,
    window: Duration,
) -> (usize, Duration) {
    let start = Instant::now();
    let mut last = Instant::now();
    let (mut count, mut gap) = (0, Duration::ZERO);
    while start.elapsed() < window {
        if fleet.next(sub, Duration::from_secs(5)).is_some() {
            count += 1;
            gap = gap.max(last.elapsed());
            last = Instant::now();
        } else {
            gap = gap.max(last.elapsed());
        }
    }
    (count, gap)
}

#[test]
fn two_modules_run_side_by_side_and_one_trapping_never_costs_the_other_a_tick() {
    let fleet = Fleet::start();
    let trapper = wat::parse_str(wat_guest("unreachable")).unwrap();
    fleet.put_module("process-perf", 1, &process_perf(1));
    fleet.put_module("trapper", 1, &signed("trapper", 1, &trapper, &[&key(1)]));
    fleet.put_module(
        "top-memory",
        1,
        &signed(
            "top-memory",
            1,
            &std::fs::read(top_memory_wasm()).unwrap(),
            &[&key(1)],
        ),
    );
    enable(&fleet, "global", "250ms");
    fleet.assign(
        "global",
        &[("process-perf", 1), ("trapper", 1), ("top-memory", 1)],
    );
    let mut perf = fleet.subscribe("process_perf.pc-a");
    let mut memory = fleet.subscribe("process_mem.pc-a");
    let mut agent = fleet.agent("pc-a", &[]);
    fleet.wait_status("pc-a", CONVERGE, "all three running", |s| {
        s.modules.len() == 3
    });
    // Warm-up: the first messages, then a steady window.
    fleet
        .next(&mut perf, CONVERGE)
        .expect("process-perf publishes");
    fleet
        .next(&mut memory, CONVERGE)
        .expect("top-memory publishes");
    let window: u64 = std::env::var("COLLECTOR_SIDE_BY_SIDE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(window);
    let (count, gap) = watch_subject(&fleet, &mut perf, window);
    let expected = window.as_millis() as usize / 250;
    eprintln!(
        "process-perf beside a trapping module: {count} messages in {window:?} (expected {expected}), longest gap {gap:?}"
    );
    assert!(
        count * 10 >= expected * 9,
        "{count} messages, {expected} ticks expected"
    );
    assert!(gap < Duration::from_millis(1000), "longest gap {gap:?}");
    let s = fleet.status("pc-a").unwrap();
    let trapper = s.modules.iter().find(|m| m.name == "trapper").unwrap();
    assert!(trapper.traps > 10, "the trapping module trapped: {s:#?}");
    assert!(
        s.modules
            .iter()
            .all(|m| m.name == "trapper" || m.traps == 0),
        "{s:#?}"
    );
    // top-memory got its messages through as well.
    assert!(fleet.next(&mut memory, Duration::from_secs(5)).is_some());
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // Ticks on one grid: the two sampling modules share most enumerations.
    let summary = agent.stderr_line_containing("enumerations=");
    let field = |name: &str| -> u64 {
        let at = summary
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name} in {summary}"));
        summary[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (enumerations, samples) = (field("enumerations"), field("samples"));
    eprintln!("two sampling modules: {enumerations} enumerations for {samples} samples");
    assert!(
        enumerations * 4 <= samples * 3,
        "{enumerations} enumerations for {samples} samples: {summary}"
    );
}
