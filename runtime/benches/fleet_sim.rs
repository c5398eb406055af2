//! Fleet-scale simulation: N agents in this one process, each running the agent's own
//! fleet path (its own NATS connection, settings and assignment watches, download,
//! signature and anti-rollback checks, compile cache, swap at a tick boundary, status
//! record), against a NATS cluster started by `cargo xtask cluster up`. The operator's
//! side is the real `collector` binary: `module publish`, `config set`, `config groups`,
//! `module rollout`.
//!
//! It measures a rollout the way an operator lives it: v1 everywhere, v2 to a canary
//! group of 5%, v2 globally (optionally killing one server of three on the way), then a
//! rollback by assignment to v1 (v2 is signed with `--rollback-floor 1`). For each step:
//! the time from the assignment write until the server stored each targeted agent's
//! status record saying it runs the version (p50, p99, max), agents stuck, where the
//! time goes (download, verification and compile, recording), and at the end the
//! messages ingested per second, downloads retried, the RSS per agent and a check that
//! the buckets lost nothing. It draws agents on the new version over time for each step
//! as an SVG.
//!
//! What is shared, because every agent runs in one process on one machine: the process
//! enumeration (one `SharedSource`, as several modules of one agent share it) and the
//! compiled code of a component (`Sandbox::share_compiled`): each agent still verifies,
//! records and swaps what it runs, in its own state directory.
//!
//! After the steps come staged rollouts (fleet_sim/rollouts.rs) and trust roots
//! (fleet_sim/trust.rs): every agent follows the fleet's trust roots as `collector run`
//! does, a first root is published and taken, then a root revoking a signing key stops
//! the module version that key signed everywhere.
//!
//! `cargo xtask fleet-sim` runs it in full (release build, 1,000 agents by default);
//! `cargo xtask test` runs it in smoke mode (`cargo test --bench fleet_sim`): 20 agents,
//! one server killed during the global rollout, failing on a stuck agent, a canary
//! rollout that reaches beyond its group, or a bucket that lost data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use collector_bundle::{TrustRoot, TrustStore};
use collector_deploy::nats_sink::NatsSink;
use collector_deploy::reconcile::{FleetLink, Reconciler, ReconcilerOptions, ReconcilerStats};
use collector_deploy::{Deployer, Policy, StateDir};
use collector_fleet::status::AgentStatus;
use collector_fleet::watch::{self, WatchOptions};
use collector_fleet::{NatsOptions, STATUS_BUCKET, TRUST_BUCKET};
use collector_sandbox::agent::AgentOptions;
use collector_sandbox::engine::Sandbox;
use collector_sandbox::host::{HostStats, Limits, Services};
use collector_sandbox::source::{SharedSource, SysinfoSource, TimeBoxed};
use futures_util::StreamExt as _;

type Result<T> = std::result::Result<T, String>;

#[path = "fleet_sim/rollouts.rs"]
mod rollouts;
#[path = "fleet_sim/trust.rs"]
mod trust;

/// Share of the fleet in the canary group.
const CANARY_PERCENT: usize = 5;

struct Options {
    agents: usize,
    modules: usize,
    kill_node_at: Option<Duration>,
    cluster: PathBuf,
    interval: String,
    step_timeout: Duration,
    write: Option<PathBuf>,
    /// Staged rollouts to run after the steps, in order; with `true`, the controller is
    /// killed at a random moment.
    rollouts: Vec<(rollouts::Kind, bool)>,
    bake: Duration,
    /// Whether the trust roots scenario runs after the staged rollouts.
    trust_roots: bool,
    /// A full run (`cargo bench`), where missed targets fail it, not only stuck agents.
    full: bool,
}

const USAGE: &str = "\
usage: cargo xtask fleet-sim [--agents N] [--modules M] [--kill-node-at SECONDS]
                             [--interval DURATION] [--step-timeout SECONDS]
                             [--rollouts LIST] [--bake D] [--trust-roots on|off] [--write]

  --agents N          agents to run in this process (default 1000; smoke: 20)
  --modules M         modules assigned to every agent: 1 (process-perf) or 2 (and the
                      top-memory example) (default 1)
  --kill-node-at S    kill (SIGKILL) the server leading the module store S seconds after
                      the global rollout's assignment write (default: no kill; smoke: 0.05)
  --interval D        process_perf cadence every agent is given (default 5s)
  --step-timeout S    how long a step may take before its laggards count as stuck
                      (default 120)
  --cluster FILE      the cluster.json of `cargo xtask cluster up`
                      (default target/cluster/cluster.json, or $COLLECTOR_CLUSTER);
                      the fleet buckets of that cluster are emptied first
  --rollouts LIST     staged rollouts run after those steps, in order, each with waves
                      1%,10%,50%,100% and a controller (`collector rollout run`): `good`,
                      `trap`, `silent`, `cpu` (the default guest built with that fault),
                      `good-killed` (the controller killed at a random moment and
                      restarted); `none` for none
                      (default good,trap,silent,cpu,good-killed; smoke: trap)
  --bad-module KIND   the same as --rollouts KIND (trap, silent or cpu)
  --bake D            bake time of each wave (default 10s)
  --trust-roots on|off
                      after the staged rollouts, move every agent from its --trust key
                      (root version 0) to a published trust root v1 (target: p99 within
                      5 s), then revoke a signing key with root v2 while a version it
                      signed runs everywhere (target: gone from every agent within 10 s,
                      replaced by the earlier good version) (default on)
  --write             put the results in BENCHMARKS.md (sections Fleet scale, Staged
                      rollouts and Trust roots) and the plots in docs/fleet-convergence.svg
                      and docs/rollouts.svg";

fn parse_options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let mut o = Options {
        agents: if full { 1000 } else { 20 },
        modules: 1,
        kill_node_at: (!full).then(|| Duration::from_millis(50)),
        cluster: std::env::var_os("COLLECTOR_CLUSTER")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/cluster/cluster.json")),
        interval: "5s".into(),
        step_timeout: Duration::from_secs(if full { 120 } else { 60 }),
        write: None,
        rollouts: if full {
            parse_rollouts("good,trap,silent,cpu,good-killed")?
        } else {
            parse_rollouts("trap")?
        },
        bake: Duration::from_secs(10),
        trust_roots: true,
        full,
    };
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<String>, flag: &str| -> Result<String> {
        it.next()
            .cloned()
            .ok_or(format!("{flag} needs a value\n\n{USAGE}"))
    };
    let number = |v: String, flag: &str| -> Result<f64> {
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .ok_or(format!("{flag} {v}: expected a non-negative number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--agents" => {
                let v = value(&mut it, arg)?;
                o.agents = v.parse().ok().filter(|n| *n >= 1).ok_or(format!(
                    "--agents {v}: expected a whole number of at least 1"
                ))?;
            }
            "--modules" => {
                let v = value(&mut it, arg)?;
                o.modules = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=2).contains(n))
                    .ok_or(format!("--modules {v}: expected 1 or 2"))?;
            }
            "--kill-node-at" => {
                let v = value(&mut it, arg)?;
                o.kill_node_at = Some(Duration::from_secs_f64(number(v, arg)?));
            }
            "--no-kill" => o.kill_node_at = None,
            "--interval" => {
                let v = value(&mut it, arg)?;
                humantime::parse_duration(&v)
                    .map_err(|e| format!("--interval {v}: expected a duration such as 5s ({e})"))?;
                o.interval = v;
            }
            "--step-timeout" => {
                let v = value(&mut it, arg)?;
                o.step_timeout = Duration::from_secs_f64(number(v, arg)?);
            }
            "--cluster" => o.cluster = value(&mut it, arg)?.into(),
            "--rollouts" => o.rollouts = parse_rollouts(&value(&mut it, arg)?)?,
            "--bad-module" => {
                let v = value(&mut it, arg)?;
                o.rollouts = parse_rollouts(&v)?;
                if o.rollouts.iter().any(|(k, _)| *k == rollouts::Kind::Good) {
                    return Err(format!("--bad-module {v}: expected trap, silent or cpu"));
                }
            }
            "--bake" => {
                let v = value(&mut it, arg)?;
                o.bake = humantime::parse_duration(&v)
                    .map_err(|e| format!("--bake {v}: expected a duration such as 10s ({e})"))?;
            }
            "--trust-roots" => {
                let v = value(&mut it, arg)?;
                o.trust_roots = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--trust-roots {v}: expected on or off")),
                };
            }
            "--write" => o.write = Some(root.clone()),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}`\n\n{USAGE}")),
        }
    }
    Ok(o)
}

fn parse_rollouts(list: &str) -> Result<Vec<(rollouts::Kind, bool)>> {
    if list == "none" {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(|k| {
            let (k, killed) = match k.strip_suffix("-killed") {
                Some(k) => (k, true),
                None => (k, false),
            };
            rollouts::Kind::parse(k)
                .map(|kind| (kind, killed))
                .ok_or(format!(
                    "--rollouts: `{k}`: expected good, trap, silent, cpu or good-killed"
                ))
        })
        .collect()
}

/// A server of the cluster, from cluster.json.
#[derive(Debug, Clone, serde::Deserialize)]
struct Node {
    name: String,
    pid: i32,
}

#[derive(Debug, serde::Deserialize)]
struct ClusterFile {
    urls: String,
    nodes: Vec<Node>,
}

fn main() {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COLLECTOR_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match simulate(&options) {
        Ok(report) => {
            let failures = report.failures();
            println!("{}", report.table(&options));
            if !report.rollouts.is_empty() {
                println!(
                    "{}",
                    rollouts::table(&report.rollouts, options.agents, options.bake)
                );
            }
            if let Some(t) = &report.trust {
                eprintln!(
                    "fleet-sim: trust roots:\n{}",
                    trust::table(t, options.agents)
                );
            }
            if let Some(root) = &options.write
                && let Err(e) = report.write(&options, root)
            {
                eprintln!("fleet-sim: {e}");
                std::process::exit(1);
            }
            if !failures.is_empty() {
                for f in &failures {
                    eprintln!("fleet-sim: FAILED: {f}");
                }
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            std::process::exit(1);
        }
    }
}

/// The operator's `collector` binary, against the cluster.
struct Operator {
    urls: String,
    dir: PathBuf,
    retries: AtomicU64,
}

/// How long an operator keeps re-running a command that fails, as while a cluster that
/// lost a server elects new leaders.
const OPERATOR_PATIENCE: Duration = Duration::from_secs(30);

impl Operator {
    /// Runs a command, again after a pause while it fails, up to [`OPERATOR_PATIENCE`].
    fn run(&self, args: &[&str]) -> Result<String> {
        let deadline = Instant::now() + OPERATOR_PATIENCE;
        loop {
            match self.run_once(args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() < deadline && transient(&e) => {
                    eprintln!("fleet-sim: {e}; again in 1 s");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn run_once(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(args)
            .env("NATS_URL", &self.urls)
            .env("COLLECTOR_LOG", "error")
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("cannot run collector: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`collector {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Whether a command failed for want of a server (one was killed, a leader is being
/// elected) rather than for what it was asked.
fn transient(error: &str) -> bool {
    [
        "timed out",
        "deadline has elapsed",
        "no responders",
        "cannot connect",
        "no answer",
    ]
    .iter()
    .any(|t| error.contains(t))
}

/// Empties the fleet's buckets of what an earlier run left (modules, assignments,
/// groups, status records), so that this run's agents see only this run's rollout.
async fn clear_fleet(client: &async_nats::Client) -> Result<usize> {
    let js = async_nats::jetstream::new(client.clone());
    let mut cleared = 0;
    for bucket in [
        "collector_config",
        "agent_groups",
        STATUS_BUCKET,
        "agent_config",
    ] {
        // The whole stream at once: the status bucket refuses rollup headers (a
        // per-key purge), as `fleet init` sets it.
        let stream = js.get_stream(format!("KV_{bucket}")).await.map_err(|e| {
            format!("{bucket}: {e} (was the cluster made by `cargo xtask cluster up`?)")
        })?;
        let purged = stream
            .purge()
            .await
            .map_err(|e| format!("{bucket}: cannot purge: {e}"))?
            .purged;
        cleared += usize::try_from(purged).unwrap_or(usize::MAX);
    }
    // Rollouts an earlier run left (a cluster made before staged rollouts has none).
    if let Ok(stream) = js.get_stream("KV_collector_rollouts").await {
        let purged = stream
            .purge()
            .await
            .map_err(|e| format!("collector_rollouts: cannot purge: {e}"))?
            .purged;
        cleared += usize::try_from(purged).unwrap_or(usize::MAX);
    }
    // Trust roots an earlier run published, under its own keys: this run's agents could
    // not follow them, and the bucket refuses purges (a published root stays), so the
    // stream goes; `fleet init` makes it again (`ensure_trust_bucket`).
    let trust = format!("KV_{TRUST_BUCKET}");
    if let Ok(stream) = js.get_stream(&trust).await {
        let roots = stream.cached_info().state.messages;
        if roots > 0 {
            js.delete_stream(&trust)
                .await
                .map_err(|e| format!("{TRUST_BUCKET}: cannot delete: {e}"))?;
            cleared += usize::try_from(roots).unwrap_or(usize::MAX);
        }
    }
    let store = js
        .get_object_store("collector_modules")
        .await
        .map_err(|e| format!("collector_modules: {e}"))?;
    let names: Vec<String> = match store.list().await {
        Ok(list) => {
            list.filter_map(|o| async move { o.ok().map(|o| o.name) })
                .collect()
                .await
        }
        Err(_) => Vec::new(),
    };
    for name in names {
        store
            .delete(&name)
            .await
            .map_err(|e| format!("collector_modules {name}: {e}"))?;
        cleared += 1;
    }
    Ok(cleared)
}

/// Makes the trust root bucket when it is missing (`clear_fleet` deleted what an earlier
/// run left there, or the cluster was made before trust roots) with `collector fleet
/// init`, as `cargo xtask cluster up` made the others: it leaves the buckets that exist
/// as they are.
fn ensure_trust_bucket(
    runtime: &tokio::runtime::Runtime,
    client: &async_nats::Client,
    operator: &Operator,
    servers: usize,
) -> Result<()> {
    let exists = runtime.block_on(async {
        let js = async_nats::jetstream::new(client.clone());
        js.get_stream(format!("KV_{TRUST_BUCKET}")).await.is_ok()
    });
    if !exists {
        let replicas = servers.clamp(1, 3).to_string();
        operator.run(&["fleet", "init", "--replicas", &replicas])?;
    }
    Ok(())
}

/// What every status record said last, and when each changed.
#[derive(Default)]
struct Statuses {
    /// PC → module → version running, as last reported.
    now: BTreeMap<String, BTreeMap<String, u64>>,
    /// Every change: when, which PC, what it runs since.
    changes: Vec<(Instant, String, BTreeMap<String, u64>)>,
    /// PC → version of the trust root it holds (none: it checks against no root), as
    /// last reported.
    trust: BTreeMap<String, Option<u64>>,
    /// Every change of a PC's trust root version: when, which PC, the version since.
    trust_changes: Vec<(Instant, String, Option<u64>)>,
    /// PC → its last record, whole (probation, revoked modules).
    records: BTreeMap<String, AgentStatus>,
}

/// One measured step of the rollout.
struct Step {
    name: String,
    targets: usize,
    /// Targets already on the version when the step began.
    already: usize,
    /// Seconds from the assignment write to each targeted agent running the version.
    converged: Vec<f64>,
    stuck: Vec<String>,
    /// Agents outside the targets that changed what they run during the step.
    strays: Vec<String>,
    downloads: u64,
    fetch_ms: f64,
    load_ms: f64,
    record_ms: f64,
    killed: Option<String>,
}

struct Report {
    agents: usize,
    modules: Vec<String>,
    startup: f64,
    steps: Vec<Step>,
    messages: u64,
    messages_per_second: f64,
    decoded: u64,
    retries: u64,
    operator_retries: u64,
    /// How long `collector fleet status` took, and the first line it printed.
    status_seconds: f64,
    status_head: String,
    rss_per_agent_mb: f64,
    rss_total_mb: f64,
    buckets: Vec<String>,
    rollouts: Vec<rollouts::Scenario>,
    trust: Option<trust::Outcome>,
}

fn simulate(o: &Options) -> Result<Report> {
    let cluster_text = std::fs::read_to_string(&o.cluster).map_err(|e| {
        format!(
            "cannot read {} ({e}): start a cluster first with `cargo xtask cluster up`",
            o.cluster.display()
        )
    })?;
    let cluster: ClusterFile =
        serde_json::from_str(&cluster_text).map_err(|e| format!("{}: {e}", o.cluster.display()))?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let operator = Operator {
        urls: cluster.urls.clone(),
        dir: work.path().to_path_buf(),
        retries: AtomicU64::new(0),
    };
    eprintln!(
        "fleet-sim: {} agents, {} module(s), cluster {}",
        o.agents, o.modules, cluster.urls
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let nats = NatsOptions {
        nats_url: Some(cluster.urls.clone()),
        ..NatsOptions::default()
    };
    let observer = runtime
        .block_on(nats.connect("fleet-sim", Duration::from_secs(10)))
        .map_err(|e| format!("{e:#}"))?;
    let cleared = runtime.block_on(clear_fleet(&observer))?;
    if cleared > 0 {
        eprintln!("fleet-sim: cleared {cleared} keys and objects an earlier run left");
    }
    ensure_trust_bucket(&runtime, &observer, &operator, cluster.nodes.len())?;

    // The security team's side: a key, two versions of each module, published.
    operator.run(&["module", "keygen", "--out", "signer"])?;
    let mut guests = vec![("process-perf", guest_path("COLLECTOR_GUEST_WASM")?)];
    if o.modules > 1 {
        guests.push(("top-memory", guest_path("COLLECTOR_TOP_MEMORY_WASM")?));
    }
    let modules: Vec<String> = guests.iter().map(|(n, _)| n.to_string()).collect();
    let mut published = BTreeMap::new();
    for (name, path) in &guests {
        let component = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for version in [1u64, 2] {
            // Each version its own bytes (a custom section), so each is compiled once.
            let file = format!("{name}-{version}.wasm");
            std::fs::write(work.path().join(&file), with_marker(&component, version))
                .map_err(|e| e.to_string())?;
            let bundle = format!("{name}-{version}.bundle");
            let v = version.to_string();
            let mut sign = vec![
                "module",
                "sign",
                "--key",
                "signer",
                "--name",
                name,
                "--version",
                &v,
                &file,
                "--out",
                &bundle,
            ];
            if version == 2 {
                sign.extend(["--rollback-floor", "1"]);
            }
            operator.run(&sign)?;
            operator.run(&["module", "publish", "--trust", "signer.pub", &bundle])?;
            let bytes = std::fs::read(work.path().join(&bundle)).map_err(|e| e.to_string())?;
            published.insert(format!("{name}/{version}"), sha256(&bytes));
        }
    }
    let interval = format!("host_perf_interval={}", o.interval);
    operator.run(&[
        "config",
        "set",
        "process_perf_enabled=true",
        &interval,
        "process_perf_top_n=5",
    ])?;
    let pcs: Vec<String> = (0..o.agents).map(|i| format!("pc-{i:04}")).collect();
    let every = 100 / CANARY_PERCENT;
    let canary: BTreeSet<String> = pcs.iter().step_by(every).cloned().collect();
    for pc in &canary {
        operator.run(&["config", "groups", "--pc", pc, "--set", "canary"])?;
    }

    // What the agents say about themselves, as an operator would read it.
    let statuses = Arc::new(Mutex::new(Statuses::default()));
    {
        let statuses = statuses.clone();
        let client = observer.clone();
        runtime.spawn(async move { follow_statuses(client, statuses).await });
    }
    let messages = Arc::new(AtomicU64::new(0));
    let decoded = Arc::new(AtomicU64::new(0));
    {
        let (messages, decoded) = (messages.clone(), decoded.clone());
        let client = observer.clone();
        runtime.spawn(async move {
            let Ok(mut sub) = client.subscribe("process_perf.>").await else {
                return;
            };
            while let Some(msg) = sub.next().await {
                let n = messages.fetch_add(1, Ordering::Relaxed);
                // Every hundredth message must be what kanade's backend accepts.
                if n % 100 == 0
                    && serde_json::from_slice::<kanade_shared::wire::ProcessPerf>(&msg.payload)
                        .is_ok()
                {
                    decoded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    let rss_before = rss_mb();
    let started = Instant::now();
    let fleet = start_agents(&pcs, &runtime, &nats, work.path())?;
    wait_for(&statuses, o.step_timeout, |s| s.now.len() >= o.agents)
        .map_err(|_| format!("not every agent reported within {:?}", o.step_timeout))?;
    let startup = started.elapsed().as_secs_f64();
    eprintln!("fleet-sim: {} agents up in {startup:.1} s", o.agents);

    let all: BTreeSet<String> = pcs.iter().cloned().collect();
    let mut steps = Vec::new();
    let messages_from = (Instant::now(), messages.load(Ordering::Relaxed));
    let rollout = |version: u64, scope: &[&str]| -> Result<()> {
        let v = version.to_string();
        for m in &modules {
            let mut args = vec!["module", "rollout", m.as_str(), v.as_str()];
            args.extend(scope);
            operator.run(&args)?;
        }
        Ok(())
    };
    let step = |name: &str,
                version: u64,
                targets: &BTreeSet<String>,
                kill: Option<Duration>,
                write: &dyn Fn() -> Result<()>|
     -> Result<Step> {
        eprintln!("fleet-sim: {name}");
        let before = totals(&fleet.stats);
        let on_version =
            |m: &BTreeMap<String, u64>| modules.iter().all(|n| m.get(n) == Some(&version));
        // Agents already on the version (a canary promoted globally) have nothing to do.
        let already: BTreeSet<String> = {
            let s = statuses.lock().unwrap();
            targets
                .iter()
                .filter(|pc| s.now.get(*pc).is_some_and(on_version))
                .cloned()
                .collect()
        };
        let started = Instant::now();
        let killer = kill.map(|after| {
            let nodes = cluster.nodes.clone();
            let observer = observer.clone();
            let handle = runtime.handle().clone();
            std::thread::spawn(move || {
                std::thread::sleep(after.saturating_sub(started.elapsed()));
                kill_module_store_leader(&handle, &observer, &nodes)
            })
        });
        write()?;
        // The assignment write: the last command returned, its KV put acknowledged.
        let t0 = Instant::now();
        let done = |s: &Statuses| {
            targets
                .iter()
                .all(|pc| s.now.get(pc).is_some_and(on_version))
        };
        let _ = wait_for(&statuses, o.step_timeout, done);
        // Time for strays to show.
        std::thread::sleep(Duration::from_secs(1));
        let killed = killer.map(|k| k.join().unwrap_or_else(|_| Err("panicked".into())));
        let s = statuses.lock().unwrap();
        let mut converged = Vec::new();
        let mut stuck = Vec::new();
        for pc in targets.iter().filter(|pc| !already.contains(*pc)) {
            let first = s
                .changes
                .iter()
                .find(|(at, who, m)| *at >= started && who == pc && on_version(m));
            let running = s.now.get(pc).is_some_and(on_version);
            match first {
                Some((at, _, _)) if running => {
                    converged.push(at.saturating_duration_since(t0).as_secs_f64());
                }
                _ => stuck.push(pc.clone()),
            }
        }
        let strays: BTreeSet<String> = s
            .changes
            .iter()
            .filter(|(at, who, _)| *at >= started && !targets.contains(who))
            .map(|(_, who, _)| who.clone())
            .collect();
        drop(s);
        converged.sort_by(f64::total_cmp);
        let after = totals(&fleet.stats);
        let downloads = after[0] - before[0];
        let mean = |i: usize| {
            if downloads == 0 {
                0.0
            } else {
                (after[i] - before[i]) as f64 / downloads as f64 / 1000.0
            }
        };
        Ok(Step {
            name: name.into(),
            targets: targets.len(),
            already: already.len(),
            converged,
            stuck,
            strays: strays.into_iter().collect(),
            downloads,
            fetch_ms: mean(1),
            load_ms: mean(2),
            record_ms: mean(3),
            killed: killed.transpose()?,
        })
    };

    steps.push(step("v1 everywhere", 1, &all, None, &|| {
        rollout(1, &["--global"])
    })?);
    steps.push(step("v2 to the canary group", 2, &canary, None, &|| {
        rollout(2, &["--group", "canary"])
    })?);
    steps.push(step("v2 everywhere", 2, &all, o.kill_node_at, &|| {
        rollout(2, &["--global"])
    })?);
    steps.push(step("back to v1 by assignment", 1, &all, None, &|| {
        for m in &modules {
            operator.run(&["module", "unassign", m, "--group", "canary"])?;
        }
        rollout(1, &["--global"])
    })?);
    let elapsed = messages_from.0.elapsed().as_secs_f64();
    let ingested = messages.load(Ordering::Relaxed) - messages_from.1;
    let rss_after = rss_mb();
    let buckets = check_buckets(&runtime, &observer, &published, &canary, &pcs, &modules);

    // Staged rollouts, at a cadence their gates can judge in seconds.
    let mut staged = Vec::new();
    // The version of process-perf every agent runs, and the next free one.
    let (mut current, mut next) = (1u64, 3u64);
    if !o.rollouts.is_empty() {
        operator.run(&["config", "set", "host_perf_interval=1s"])?;
        let env = rollouts::Env {
            operator: &operator,
            runtime: &runtime,
            observer: &observer,
            statuses: &statuses,
            pcs: &pcs,
            work: work.path(),
            bake: o.bake,
            timeout: o.step_timeout,
        };
        let good = std::fs::read(guest_path("COLLECTOR_GUEST_WASM")?).map_err(|e| e.to_string())?;
        for (kind, killed) in &o.rollouts {
            let component = match kind {
                rollouts::Kind::Good => good.clone(),
                rollouts::Kind::Bad(k) => {
                    let var = format!("COLLECTOR_FAULT_{}_WASM", k.to_uppercase());
                    std::fs::read(guest_path(&var)?).map_err(|e| e.to_string())?
                }
            };
            let kill = killed.then(|| {
                let most = o.bake.as_secs_f64() * 4.0;
                Duration::from_secs_f64(1.0 + random_fraction() * most)
            });
            let s = rollouts::run(&env, *kind, &component, current, next, kill)?;
            if s.phase == "completed" {
                current = next;
            }
            next += 1;
            staged.push(s);
        }
    }
    // Trust roots: a first root taken by every agent, then a signing key revoked.
    let trust = if o.trust_roots {
        let good = std::fs::read(guest_path("COLLECTOR_GUEST_WASM")?).map_err(|e| e.to_string())?;
        let env = trust::Env {
            operator: &operator,
            statuses: &statuses,
            pcs: &pcs,
            work: work.path(),
            timeout: o.step_timeout,
            full: o.full,
            // The staged rollouts set it already; probation takes three ticks.
            fast_ticks: o.rollouts.is_empty(),
        };
        Some(trust::run(&env, &good, current, next))
    } else {
        None
    };
    // What an operator reads next: the summary of the whole fleet.
    let asked = Instant::now();
    let summary = operator.run_once(&["fleet", "status"])?;
    let status_seconds = asked.elapsed().as_secs_f64();
    let status_head = summary
        .lines()
        .find(|l| !l.starts_with("rollout:"))
        .unwrap_or_default()
        .to_string();
    let retries = fleet
        .stats
        .iter()
        .map(|s| HostStats::get(&s.download_retries))
        .sum();
    fleet.stop();
    Ok(Report {
        agents: o.agents,
        modules,
        startup,
        steps,
        messages: ingested,
        messages_per_second: ingested as f64 / elapsed,
        decoded: decoded.load(Ordering::Relaxed),
        retries,
        operator_retries: operator.retries.load(Ordering::Relaxed),
        status_seconds,
        status_head,
        rss_per_agent_mb: (rss_after - rss_before) / o.agents as f64,
        rss_total_mb: rss_after,
        buckets,
        rollouts: staged,
        trust,
    })
}

/// A number in [0, 1) that differs from run to run (the clock's nanoseconds): when to
/// kill the controller need not be unpredictable, only not always the same.
fn random_fraction() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos) / 1e9
}

/// Downloads, and the microseconds spent fetching, loading and recording, summed over
/// every agent.
fn totals(stats: &[Arc<ReconcilerStats>]) -> [u64; 4] {
    let mut t = [0; 4];
    for s in stats {
        t[0] += HostStats::get(&s.downloads);
        t[1] += HostStats::get(&s.fetch_micros);
        t[2] += HostStats::get(&s.load_micros);
        t[3] += HostStats::get(&s.record_micros);
    }
    t
}

/// The agents, running.
struct Fleet {
    handles: Vec<collector_deploy::reconcile::ReconcilerHandle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    /// Each agent's trust root follower.
    followers: Vec<tokio::task::JoinHandle<()>>,
    stats: Vec<Arc<ReconcilerStats>>,
}

impl Fleet {
    fn stop(self) {
        for w in self.watchers.iter().chain(&self.followers) {
            w.abort();
        }
        for h in &self.handles {
            h.shutdown();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn start_agents(
    pcs: &[String],
    runtime: &tokio::runtime::Runtime,
    nats: &NatsOptions,
    work: &Path,
) -> Result<Fleet> {
    let sandbox = Sandbox::share_compiled(&work.join("compiled")).map_err(|e| format!("{e:#}"))?;
    let trust = || TrustStore::from_files(&[work.join("signer.pub")], 1).map_err(|e| e.to_string());
    let source = TimeBoxed::new(
        Box::new(SysinfoSource::new().map_err(|e| format!("{e:#}"))?),
        Duration::from_secs(5),
    );
    let shared = SharedSource::new(Box::new(source), Duration::from_millis(100));
    let grid = Instant::now();
    let mut fleet = Fleet {
        handles: Vec::new(),
        threads: Vec::new(),
        watchers: Vec::new(),
        followers: Vec::new(),
        stats: Vec::new(),
    };
    for pc in pcs {
        let state = StateDir::open(&work.join("agents").join(pc)).map_err(|e| format!("{e:#}"))?;
        let deployer = Deployer::new(
            sandbox.clone(),
            Policy {
                trust: Some(TrustRoot::from_keys(trust()?)),
                allow_unsigned: false,
                unsigned_grants: Vec::new(),
                ceilings: Limits::default(),
                pc_id: pc.clone(),
            },
            Some(state),
        );
        let held = deployer.trust_version();
        let client = runtime
            .block_on(nats.connect_in_background(pc))
            .map_err(|e| format!("{e:#}"))?;
        let sink = Arc::new(NatsSink::new(
            client.clone(),
            runtime.handle().clone(),
            Duration::from_secs(5),
        ));
        let (source, services_pc) = (shared.clone(), pc.clone());
        let make_services =
            Box::new(move || Services::new(Box::new(source.clone()), sink.clone(), &services_pc));
        let options = ReconcilerOptions {
            agent: AgentOptions {
                grid_origin: Some(grid),
                ..AgentOptions::default()
            },
            ..ReconcilerOptions::default()
        };
        let (reconciler, handle) = Reconciler::new(
            pc,
            deployer,
            options,
            make_services,
            Some(FleetLink {
                client: client.clone(),
                runtime: runtime.handle().clone(),
            }),
            Default::default(),
            true,
        );
        fleet.stats.push(reconciler.stats());
        let target = handle.clone();
        fleet.watchers.push(runtime.spawn(watch::run(
            client.clone(),
            WatchOptions::new(pc),
            move |view| target.fleet(view),
        )));
        // The trust roots of the fleet, followed from the version held, as `collector run`
        // does next to the watch.
        let target = handle.clone();
        fleet
            .followers
            .push(runtime.spawn(collector_fleet::trust::follow(
                client,
                held,
                watch::RESYNC,
                move |source, roots| target.roots(source, roots),
            )));
        fleet.handles.push(handle);
        fleet.threads.push(
            std::thread::Builder::new()
                .name(format!("reconciler-{pc}"))
                .stack_size(256 * 1024)
                .spawn(move || reconciler.run())
                .map_err(|e| format!("cannot start an agent thread: {e}"))?,
        );
    }
    Ok(fleet)
}

async fn follow_statuses(client: async_nats::Client, statuses: Arc<Mutex<Statuses>>) {
    let js = async_nats::jetstream::new(client);
    loop {
        let Ok(kv) = js.get_key_value(STATUS_BUCKET).await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        let Ok(mut watch) = kv.watch_all().await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        while let Some(Ok(entry)) = watch.next().await {
            let Ok(status) = serde_json::from_slice::<AgentStatus>(&entry.value) else {
                continue;
            };
            let running: BTreeMap<String, u64> = status
                .modules
                .iter()
                .map(|m| (m.name.clone(), m.version))
                .collect();
            // When the server stored the record (its own timestamp, on this machine's
            // clock), not when this watch delivered it: a watch that stalls with a lost
            // server and then delivers a backlog at once must not delay the measurement.
            let age = SystemTime::now()
                .duration_since(SystemTime::from(entry.created))
                .unwrap_or_default();
            let stored = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let root = status.trust.as_ref().map(|t| t.version);
            let mut s = statuses.lock().unwrap();
            if s.now.get(&status.pc_id) != Some(&running) {
                s.changes
                    .push((stored, status.pc_id.clone(), running.clone()));
            }
            s.now.insert(status.pc_id.clone(), running);
            if s.trust.get(&status.pc_id) != Some(&root) {
                s.trust_changes.push((stored, status.pc_id.clone(), root));
            }
            s.trust.insert(status.pc_id.clone(), root);
            s.records.insert(status.pc_id.clone(), status);
        }
        // The watch ended (a server went away): open it again.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_for(
    statuses: &Mutex<Statuses>,
    timeout: Duration,
    done: impl Fn(&Statuses) -> bool,
) -> std::result::Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done(&statuses.lock().unwrap()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(())
}

/// Kills the server that leads the module store's stream: downloads in flight lose
/// their server, and the stream must elect another leader.
fn kill_module_store_leader(
    runtime: &tokio::runtime::Handle,
    client: &async_nats::Client,
    nodes: &[Node],
) -> Result<String> {
    let leader = runtime.block_on(async {
        let js = async_nats::jetstream::new(client.clone());
        let mut stream = js.get_stream("OBJ_collector_modules").await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    });
    let node = nodes
        .iter()
        .find(|n| Some(&n.name) == leader.as_ref())
        .or(nodes.first())
        .ok_or("no server to kill in cluster.json")?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(node.pid, libc::SIGKILL) };
    if r != 0 {
        return Err(format!(
            "cannot kill {} (pid {}): {}",
            node.name,
            node.pid,
            std::io::Error::last_os_error()
        ));
    }
    eprintln!("fleet-sim: killed {} (pid {})", node.name, node.pid);
    Ok(format!("{} (leader of the module store)", node.name))
}

/// After the last step: every bucket still holds what was written to it.
fn check_buckets(
    runtime: &tokio::runtime::Runtime,
    client: &async_nats::Client,
    published: &BTreeMap<String, String>,
    canary: &BTreeSet<String>,
    pcs: &[String],
    modules: &[String],
) -> Vec<String> {
    runtime.block_on(async {
        let mut problems = Vec::new();
        let js = async_nats::jetstream::new(client.clone());
        match js.get_object_store("collector_modules").await {
            Ok(store) => {
                for (object, digest) in published {
                    let mut bytes = Vec::new();
                    let read = async {
                        let mut obj = store.get(object).await.map_err(|e| e.to_string())?;
                        tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut bytes)
                            .await
                            .map_err(|e| e.to_string())
                    };
                    match read.await {
                        Ok(_) if sha256(&bytes) == *digest => {}
                        Ok(_) => problems.push(format!("{object}: other bytes than published")),
                        Err(e) => problems.push(format!("{object}: {e}")),
                    }
                }
            }
            Err(e) => problems.push(format!("collector_modules: {e}")),
        }
        let key = |bucket: &'static str, key: String| {
            let js = js.clone();
            async move {
                let kv = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
                kv.get(&key).await.map_err(|e| e.to_string())
            }
        };
        match key("collector_config", "global".into()).await {
            Ok(Some(v)) => {
                let text = String::from_utf8_lossy(&v);
                for m in modules {
                    if !text.contains(&format!("\"{m}\"")) {
                        problems.push(format!("collector_config global lost {m}: {text}"));
                    }
                }
            }
            other => problems.push(format!("collector_config global: {other:?}")),
        }
        match key("agent_config", "global".into()).await {
            Ok(Some(v)) if String::from_utf8_lossy(&v).contains("process_perf_enabled") => {}
            other => problems.push(format!("agent_config global: {other:?}")),
        }
        for pc in canary {
            match key("agent_groups", pc.clone()).await {
                Ok(Some(v)) if String::from_utf8_lossy(&v).contains("canary") => {}
                other => problems.push(format!("agent_groups {pc}: {other:?}")),
            }
        }
        for pc in pcs {
            if !matches!(key(STATUS_BUCKET, pc.clone()).await, Ok(Some(_))) {
                problems.push(format!("{STATUS_BUCKET} {pc}: missing"));
            }
        }
        problems
    })
}

fn guest_path(var: &str) -> Result<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from).ok_or(format!(
        "set {var} to the guest component (`cargo xtask fleet-sim` does)"
    ))?;
    if !path.is_file() {
        return Err(format!("{var}={}: no such file", path.display()));
    }
    Ok(path)
}

/// The component with a custom section naming the version appended: other bytes, the
/// same code.
fn with_marker(component: &[u8], version: u64) -> Vec<u8> {
    let name = b"collector-fleet-sim";
    let payload = version.to_le_bytes();
    let mut section = leb128(name.len() as u64);
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut out = component.to_vec();
    out.push(0); // custom section id
    out.extend(leb128(section.len() as u64));
    out.extend(section);
    out
}

fn leb128(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Report {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for s in &self.steps {
            if !s.stuck.is_empty() {
                f.push(format!(
                    "{}: {} agents stuck (first: {})",
                    s.name,
                    s.stuck.len(),
                    s.stuck
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !s.strays.is_empty() {
                f.push(format!(
                    "{}: agents outside the targets changed: {}",
                    s.name,
                    s.strays
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        f.extend(self.buckets.iter().map(|b| format!("bucket check: {b}")));
        for r in &self.rollouts {
            f.extend(r.failures.iter().cloned());
        }
        if let Some(t) = &self.trust {
            f.extend(t.failures.iter().cloned());
        }
        if self.messages == 0 {
            f.push("no process_perf message was ingested".into());
        } else if self.decoded == 0 {
            f.push("no process_perf message decoded as kanade's ProcessPerf".into());
        }
        f
    }

    fn table(&self, o: &Options) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{} agents in one process, {} module(s) each ({}), 3-server NATS cluster, \
             buckets with 3 replicas; process_perf every {}. Agents up and reporting in \
             {:.1} s.\n",
            self.agents,
            self.modules.len(),
            self.modules.join(", "),
            o.interval,
            self.startup
        );
        let _ = writeln!(
            t,
            "| step | targets | moved | p50 | p99 | max | stuck | outside targets | \
             downloads | fetch | verify + compile | record |"
        );
        let _ = writeln!(
            t,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in &self.steps {
            let p = |q| percentile(&s.converged, q).map_or("-".into(), |v| format!("{v:.2} s"));
            let name = match &s.killed {
                Some(k) => format!("{} (killed {k})", s.name),
                None => s.name.clone(),
            };
            let _ = writeln!(
                t,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
                s.targets,
                s.targets - s.already,
                p(50.0),
                p(99.0),
                p(100.0),
                s.stuck.len(),
                s.strays.len(),
                s.downloads,
                s.fetch_ms,
                s.load_ms,
                s.record_ms
            );
        }
        let _ = writeln!(
            t,
            "\nMessages ingested: {} ({:.0}/s; every 100th decoded as kanade's ProcessPerf: \
             {} ok). Downloads retried: {}. Operator commands re-run after a failure: {}. \
             RSS: {:.0} MB in all, {:.2} MB per agent.",
            self.messages,
            self.messages_per_second,
            self.decoded,
            self.retries,
            self.operator_retries,
            self.rss_total_mb,
            self.rss_per_agent_mb
        );
        let _ = writeln!(
            t,
            "`collector fleet status` over the {} records: {:.2} s (first line: `{}`).",
            self.agents, self.status_seconds, self.status_head
        );
        let _ = writeln!(
            t,
            "Buckets after the run: {}.",
            if self.buckets.is_empty() {
                "every object, assignment, setting, group membership and status record intact"
                    .to_string()
            } else {
                self.buckets.join("; ")
            }
        );
        t
    }

    /// The BENCHMARKS.md section and the plot.
    fn write(&self, o: &Options, root: &Path) -> Result<()> {
        // One section per kind of run: with and without a server lost.
        let (heading, file) = match o.kill_node_at {
            None => ("## Fleet scale", "fleet-convergence.svg"),
            Some(_) => (
                "## Fleet scale, one server of three killed",
                "fleet-convergence-node-loss.svg",
            ),
        };
        let plot = root.join("docs").join(file);
        std::fs::write(&plot, self.plot()).map_err(|e| format!("{}: {e}", plot.display()))?;
        let mut section = format!("{heading}\n\n");
        let _ = writeln!(
            section,
            "`cargo xtask cluster up && cargo xtask fleet-sim --agents {}{}{} --write` \
             (release build); `cargo xtask test` runs a smoke version (3 servers, 20 agents, \
             one server killed). Each agent runs the agent's fleet path with its own NATS \
             connection and state directory; the process enumeration and the compiled code \
             of a component are shared, as on one machine. Times run from the assignment \
             write (`collector module rollout` returned) until the server stored the \
             agent's status record saying it runs the version (the record's own timestamp, \
             so a watch of the harness that stalls with a lost server does not delay the \
             measurement); fetch, verify + compile and record are means per download.\n",
            o.agents,
            if o.modules > 1 { " --modules 2" } else { "" },
            o.kill_node_at
                .map(|d| format!(" --kill-node-at {}", d.as_secs_f64()))
                .unwrap_or_default()
        );
        section.push_str(&self.table(o));
        let _ = writeln!(
            section,
            "\n![Agents on the new version over time](docs/{file})\n"
        );
        let path = root.join("BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let text = replace_section(&text, heading, &section);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("fleet-sim: wrote {} and {}", path.display(), plot.display());
        if !self.rollouts.is_empty() {
            let plot = root.join("docs/rollouts.svg");
            std::fs::write(&plot, rollouts::plot(&self.rollouts, o.agents))
                .map_err(|e| format!("{}: {e}", plot.display()))?;
            let heading = "## Staged rollouts";
            let mut section = format!("{heading}\n\n");
            let _ = writeln!(
                section,
                "`cargo xtask cluster up && cargo xtask fleet-sim --agents {} --write` \
                 (release build), after the steps above; `cargo xtask test` runs a smoke \
                 version (20 agents, the trap build). Each scenario publishes a new version \
                 (signed with a rollback floor at the version running), runs \
                 `collector rollout start process-perf V --global --waves {} --bake {}s` \
                 and a controller (`collector rollout run`), with process_perf every \
                 second. The bad versions are the default guest built with a fault: \
                 `trap` traps from its 6th tick on 30% of machines (after its 3-tick \
                 probation), `silent` publishes nothing, `cpu` spends about 10x the CPU \
                 per tick. A scenario fails unless a good version completes within its \
                 bakes plus {} s, and a bad one halts in the first wave that holds an \
                 agent it fails on, by the gate that names the fault, with no more agents \
                 having run it than that wave placed, all of them back on the old version \
                 within 10 s and none stuck. `good-killed` kills the controller at a \
                 random moment and starts another a second later.\n",
                o.agents,
                rollouts::WAVES,
                o.bake.as_secs_f64(),
                10
            );
            section.push_str(&rollouts::table(&self.rollouts, o.agents, o.bake));
            section.push_str(
                "\n![Agents on the new version during each staged rollout](docs/rollouts.svg)\n\n",
            );
            let path = root.join("BENCHMARKS.md");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let text = replace_section(&text, heading, &section);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if let Some(t) = &self.trust {
            let heading = "## Trust roots";
            let section = format!("{heading}\n\n{}", trust::section(t, o.agents));
            let path = root.join("BENCHMARKS.md");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let text = if text.contains(&format!("\n{heading}\n")) {
                replace_section(&text, heading, &section)
            } else {
                insert_after_section(&text, "## Staged rollouts", &section)
            };
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Agents on the new version against seconds since the assignment write, one line
    /// per step.
    fn plot(&self) -> String {
        let (w, h, left, bottom, top, right) = (720.0, 420.0, 60.0, 50.0, 30.0, 220.0);
        let xmax = self
            .steps
            .iter()
            .filter_map(|s| s.converged.last().copied())
            .fold(1.0_f64, f64::max)
            * 1.05;
        let ymax = self.agents as f64;
        let x = |v: f64| left + v / xmax * (w - left - right);
        let y = |v: f64| h - bottom - v / ymax * (h - bottom - top);
        let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{} agents: \
             agents on the new version after the assignment write</text>\n",
            (w - right + left) / 2.0,
            self.agents
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
            h - bottom,
            w - right,
            h - bottom,
            h - bottom
        );
        for i in 0..=5 {
            let xv = xmax * f64::from(i) / 5.0;
            let yv = ymax * f64::from(i) / 5.0;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.1}</text>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.0}</text>\
                 <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                x(xv),
                h - bottom + 16.0,
                left - 6.0,
                y(yv) + 4.0,
                y(yv),
                w - right,
                y(yv)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds after the assignment \
             write</text>",
            (w - right + left) / 2.0,
            h - 12.0
        );
        for (i, s) in self.steps.iter().enumerate() {
            let color = colors[i % colors.len()];
            let mut points = format!("{:.1},{:.1}", x(0.0), y(0.0));
            for (n, t) in s.converged.iter().enumerate() {
                let _ = write!(
                    points,
                    " {:.1},{:.1} {:.1},{:.1}",
                    x(*t),
                    y(n as f64),
                    x(*t),
                    y((n + 1) as f64)
                );
            }
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{points}\"/>\
                 <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"/>\
                 <text x=\"{}\" y=\"{}\">{} ({} agents)</text>",
                w - right + 10.0,
                top + 20.0 * i as f64,
                w - right + 30.0,
                top + 20.0 * i as f64,
                w - right + 36.0,
                top + 4.0 + 20.0 * i as f64,
                s.name,
                s.targets - s.already
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// `text` with `section` inserted after the section starting at `after` (up to the next
/// `## ` heading), or as [`replace_section`] inserts a section when `after` is absent.
fn insert_after_section(text: &str, after: &str, section: &str) -> String {
    let marker = format!("\n{after}\n");
    let Some(start) = text.find(&marker) else {
        let heading = section.lines().next().unwrap_or_default();
        return replace_section(text, heading, section);
    };
    let rest = &text[start + marker.len()..];
    match rest.find("\n## ") {
        Some(i) => {
            let end = start + marker.len() + i;
            format!("{}\n{section}{}", &text[..end], &text[end..])
        }
        None => format!("{}\n\n{section}", text.trim_end()),
    }
}

/// `text` with the section starting at `heading` (up to the next `## ` heading) replaced
/// by `section`, or `section` inserted before `## Soak` (or at the end) when absent.
fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let marker = format!("\n{heading}\n");
    if let Some(start) = text.find(&marker) {
        let rest = &text[start + marker.len()..];
        let end = rest
            .find("\n## ")
            .map_or(text.len(), |i| start + marker.len() + i);
        return format!("{}\n{section}{}", &text[..start], &text[end..]);
    }
    match text.find("\n## Soak\n") {
        Some(i) => format!("{}\n{section}{}", &text[..i], &text[i..]),
        None => format!("{}\n\n{section}", text.trim_end()),
    }
}
