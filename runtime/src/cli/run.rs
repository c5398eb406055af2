//! `collector run`: the agent. Modules come from local files (`--guest`, `--modules`,
//! the last-known-good) and run one at a time, or, with `--nats-url` and no local
//! module, from the fleet's assignments, several side by side under the reconciler.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::ops::NatsArgs;

use collector_bundle::grant::DEFAULT_GRANT;
use collector_bundle::{MAX_ROOT_LEN, SignedRoot, TrustRoot, TrustStore};
use collector_deploy::config_file;
use collector_deploy::nats_sink::NatsSink;
use collector_deploy::reconcile::{FleetLink, Reconciler, ReconcilerOptions};
use collector_deploy::{self as deploy, Accepted, Deployer, FleetState, Policy, StateDir};
use collector_fleet::watch::{self, WatchOptions};
use collector_sandbox::agent::AgentOptions;
use collector_sandbox::engine::Sandbox;
use collector_sandbox::host::{HostStats, Limits, Services};
use collector_sandbox::sink::{Sink, StdoutSink};
use collector_sandbox::source::{SharedSource, SysinfoSource, TimeBoxed};

/// Samples of several modules closer than this share one enumeration.
const SHARED_SAMPLE_WINDOW: Duration = Duration::from_millis(100);

/// Run a guest module against this machine's real processes.
///
/// The agent runs only signed bundles verified against --trust keys (or, for development,
/// an unsigned component with --insecure-allow-unsigned). With --modules it watches a
/// directory for newer bundles of the running module and swaps them in between two ticks;
/// with --state-dir it remembers the last module that ran healthy and rolls a new module
/// back to it if the new one traps on its first ticks.
///
/// Publishes go to standard output (one message per line) unless --nats-url is given.
/// With --nats-url the agent joins the fleet: settings come from kanade's `agent_config`
/// KV (unless --config is given) and, when no local module is given (--guest,
/// --modules), modules come from the fleet's assignments (`collector_config` KV, bundles
/// in the `collector_modules` object store), several side by side. The agent keeps its
/// status in the `collector_status` KV. It starts and runs its last-known-good modules
/// even while NATS is unreachable, and catches up when the server appears.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The module to start with: a signed bundle, or an unsigned component (.wasm) with
    /// --insecure-allow-unsigned. Optional with --modules or a last-known-good module in
    /// --state-dir.
    #[arg(long, value_name = "FILE")]
    guest: Option<PathBuf>,

    /// The trust root the agent is installed with (a file from `collector trust`): its
    /// signing keys sign bundles, and the agent follows newer roots from it (from the
    /// fleet's `collector_trust` bucket and `*.root` files in --modules), each signed by
    /// the root keys of the one before. Roots followed are kept in --state-dir, so a
    /// restart never goes back to an older one.
    #[arg(long, value_name = "ROOT", conflicts_with = "trust")]
    trust_root: Option<PathBuf>,

    /// A public key file (from `collector module keygen`) whose signatures are trusted.
    /// Repeat for several keys. These keys act as trust root version 0: they sign
    /// bundles, and a first trust root signed by them (--threshold of them) is followed.
    #[arg(long = "trust", value_name = "PUB")]
    trust: Vec<PathBuf>,

    /// How many distinct --trust keys must have signed a bundle.
    #[arg(long, value_name = "K", default_value_t = 1)]
    threshold: usize,

    /// Allow unsigned components (a loud warning is logged at every load). For
    /// development only: nobody vouches for such code.
    #[arg(long)]
    insecure_allow_unsigned: bool,

    /// Watch this directory for bundles: a newer valid version of the running module is
    /// verified and compiled off the tick path, then takes over at a tick boundary with
    /// the predecessor's state. Refused bundles are logged and change nothing.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,

    /// With --modules and no other module to start with, run bundles of this module name
    /// only (needed when the directory holds several modules).
    #[arg(long, value_name = "NAME")]
    module: Option<String>,

    /// Where the agent keeps its state: the highest accepted version per module
    /// (anti-rollback), the last-known-good bundle, rolled-back modules and the compile
    /// cache. Restarted with nothing else to run, the agent runs the last-known-good.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Ticks a new module must complete without a trap to count as healthy (and become
    /// the last-known-good); a trap before that rolls it back.
    #[arg(long, value_name = "N", default_value_t = 3)]
    health_ticks: u32,

    /// A JSON ConfigScope (the JSON stored in the `agent_config` KV) layered over the
    /// built-in defaults. Re-read when it changes; a bad edit is reported and the last
    /// good configuration stays. Without it, settings come from the fleet with
    /// --nats-url, else the defaults apply (process_perf off).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    nats: NatsArgs,

    /// Fleet mode: wait a random time up to this before downloading a newly assigned
    /// module, so that a fleet does not fetch all at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    rollout_jitter: Duration,

    /// Fleet mode: how often the status record is rewritten when nothing changed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    status_interval: Duration,

    /// Fleet mode: how often every key the agent follows is read again, whatever the
    /// change notices said (they are lost while the connection is down; a reconnect
    /// also reads everything again).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_resync)]
    fleet_resync: Duration,

    /// This machine's id in subjects and messages. Default: the host name.
    #[arg(long, value_name = "ID")]
    pc_id: Option<String>,

    /// For unsigned components only (bundles carry their own grant): a subject pattern
    /// the guest may publish to (NATS wildcards `*` and `>`; `{pc_id}` stands for this
    /// machine's id). Repeat for several. Publishes elsewhere are refused.
    #[arg(long = "grant", value_name = "SUBJECT", default_value = DEFAULT_GRANT)]
    grants: Vec<String>,

    /// Memory cap of the guest instance, in MiB, from 1 to 4096 (a bundle may ask for less).
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_memory_mib: u32,

    /// Time budget of each call into the guest (guest code only; host work such as
    /// process enumeration does not count). A guest over budget is stopped and restarted.
    /// A bundle may ask for less.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,

    /// Shortest tick interval honoured, whatever the guest asks for.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    min_interval: Duration,

    /// Longest a process enumeration may take; past it the guest gets an error for that
    /// tick and the agent carries on (the enumeration finishes in the background).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    enumeration_timeout: Duration,

    /// How often the --config file is checked for changes. A problem with it is reported
    /// once two checks in a row find it, so a file caught while an editor writes it is
    /// read again first.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    config_poll: Duration,

    /// How often the --modules directory is checked for new bundles.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    modules_poll: Duration,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let pc_id = match &args.pc_id {
        Some(id) => {
            collector_bundle::grant::check_pc_id(id)
                .map_err(|e| anyhow::anyhow!("--pc-id {id:?}: {e}"))?;
            id.clone()
        }
        None => {
            let host = collector_sandbox::source::host_name()
                .context("cannot read the host name; pass --pc-id")?;
            collector_bundle::grant::check_pc_id(&host).map_err(|e| {
                anyhow::anyhow!(
                    "the host name {host:?} cannot be the machine id ({e}); pass --pc-id"
                )
            })?;
            host
        }
    };
    let (config, config_text) = match &args.config {
        Some(path) => {
            let (config, text) = config_file::load(path)?;
            (config, Some(text))
        }
        None => (Default::default(), None),
    };
    if collector_fsutil::private::under_wine() {
        tracing::warn!(
            "running under Wine, which keeps no file access lists: secret files (cache.key, \
             keys) cannot be checked for other users' access here; never deploy this way"
        );
    }
    let state = args
        .state_dir
        .as_deref()
        .map(StateDir::open)
        .transpose()
        .context("--state-dir")?;
    let sandbox = match &state {
        Some(s) => Sandbox::with_cache(&s.cache_dir())?,
        None => Sandbox::new()?,
    };
    let trust = match &args.trust_root {
        Some(path) => Some(install_root(path)?),
        None if args.trust.is_empty() => None,
        None => Some(TrustRoot::from_keys(
            TrustStore::from_files(&args.trust, args.threshold).context("--trust")?,
        )),
    };
    collector_bundle::grant::Grant::new(&args.grants, &pc_id).context("--grant")?;
    let ceilings = Limits {
        memory_bytes: (args.max_memory_mib as usize) << 20,
        call_budget: args.call_timeout,
        ..Limits::default()
    };
    let deployer = Deployer::new(
        sandbox,
        Policy {
            trust,
            allow_unsigned: args.insecure_allow_unsigned,
            unsigned_grants: args.grants.clone(),
            ceilings,
            pc_id: pc_id.clone(),
        },
        state,
    );
    // A runtime for NATS only; agent loops run on threads of their own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = match args.nats.nats_url {
        Some(_) => Some(
            runtime
                .block_on(args.nats.options().connect_in_background("collector"))
                .context("--nats-url")?,
        ),
        None => None,
    };
    let sink: Arc<dyn Sink> = match &client {
        Some(client) => Arc::new(NatsSink::new(
            client.clone(),
            runtime.handle().clone(),
            Duration::from_secs(5),
        )),
        None => Arc::new(StdoutSink),
    };
    let saved = deployer.state().and_then(|s| {
        s.fleet_state()
            .inspect_err(|e| tracing::error!("{e:#}; starting without the fleet's saved view"))
            .ok()
            .flatten()
    });
    // Roots dropped next to the bundles count before the first module is chosen.
    let initial_roots = args
        .modules
        .as_deref()
        .and_then(|dir| deploy::offer_root_files(&deployer, &deploy::bundle_files(dir)));
    if let Some(root) = deployer.trust_root() {
        tracing::info!(
            version = root.version(),
            expires_at = ?root.expires_at(),
            "trust root held"
        );
    }
    let local = args.guest.is_some() || args.modules.is_some() || client.is_none();
    run_agent(
        &args,
        &pc_id,
        deployer,
        runtime,
        client,
        sink,
        config,
        config_text,
        saved,
        local,
        initial_roots,
    )
}

/// Reads the root an agent is installed with: it must carry its own root keys'
/// threshold of signatures.
fn install_root(path: &std::path::Path) -> anyhow::Result<TrustRoot> {
    let bytes = collector_bundle::read_bounded(path, MAX_ROOT_LEN as u64)
        .map_err(|e| anyhow::anyhow!("--trust-root {}: {e}", path.display()))?;
    let signed = SignedRoot::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("--trust-root {}: {e}", path.display()))?;
    let root = TrustRoot::install(signed)
        .map_err(|e| anyhow::anyhow!("--trust-root {}: {e}", path.display()))?;
    if root.expires_at().is_some_and(|at| at <= chrono::Utc::now()) {
        tracing::warn!(
            file = %path.display(),
            version = root.version(),
            "the installed trust root has expired: no new bundle is accepted until a newer root is followed"
        );
    }
    Ok(root)
}

/// Calls `stop` on SIGINT or SIGTERM (what service managers and container runtimes send).
fn on_signal(runtime: &tokio::runtime::Runtime, stop: impl FnOnce() + Send + 'static) {
    runtime.spawn(async move {
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            _ = term => tracing::info!("terminated; stopping"),
        }
        stop();
    });
}

/// Runs the agent: local modules (`--guest`, `--modules`, the last-known-good) when
/// `local`, else the fleet's assignments; settings from `--config`, else from the fleet
/// when connected, else the defaults. Everything goes through the reconciler.
#[allow(clippy::too_many_arguments)]
fn run_agent(
    args: &RunArgs,
    pc_id: &str,
    deployer: Arc<Deployer>,
    runtime: tokio::runtime::Runtime,
    client: Option<async_nats::Client>,
    sink: Arc<dyn Sink>,
    config: collector_shared::EffectiveConfig,
    config_text: Option<String>,
    saved: Option<FleetState>,
    local: bool,
    initial_roots: Option<deploy::RootOutcome>,
) -> anyhow::Result<ExitCode> {
    let fleet_config = client.is_some() && args.config.is_none();
    let first = if local {
        let (first, is_last_known_good) = first_module(args, &deployer)?;
        // The last-known-good was recorded when it was first accepted, and may be older
        // than a module accepted since (and rolled back): recording it again would be
        // refused.
        if !is_last_known_good {
            deployer
                .record_accepted(&first)
                .context("cannot record the accepted version in --state-dir")?;
        }
        tracing::info!(module = %first.id, pc_id, grant = %first.grant, "module loaded");
        Some((first, is_last_known_good))
    } else {
        anyhow::ensure!(
            deployer.trust_root().is_some(),
            "--trust-root: fleet mode runs signed bundles only; give the trust root (or --trust, the public key(s)) that signs them"
        );
        None
    };
    let source = TimeBoxed::new(Box::new(SysinfoSource::new()?), args.enumeration_timeout);
    let shared = SharedSource::new(Box::new(source), SHARED_SAMPLE_WINDOW);
    let services_pc_id = pc_id.to_string();
    let shared_for_services = shared.clone();
    let make_services = Box::new(move || {
        Services::new(
            Box::new(shared_for_services.clone()),
            sink.clone(),
            &services_pc_id,
        )
    });
    let options = ReconcilerOptions {
        agent: AgentOptions {
            min_interval: args.min_interval,
            health_ticks: args.health_ticks,
            grid_origin: Some(std::time::Instant::now()),
        },
        rollout_jitter: args.rollout_jitter,
        status_every: args.status_interval,
        ..ReconcilerOptions::default()
    };
    let has_state = deployer.state().is_some();
    let (mut reconciler, handle) = Reconciler::new(
        pc_id,
        deployer.clone(),
        options,
        make_services,
        client.clone().map(|client| FleetLink {
            client,
            runtime: runtime.handle().clone(),
        }),
        config,
        fleet_config,
    );
    let last_good = saved
        .as_ref()
        .map(|s| s.last_good.clone())
        .unwrap_or_default();
    if let Some(mut saved) = saved {
        if local {
            // Local modules: only the saved settings apply.
            saved.modules = None;
        }
        reconciler.restore(saved);
    }
    if let Some(outcome) = initial_roots {
        deploy::ModuleTarget::roots_offered(&handle, outcome);
    }
    let first_id = first.as_ref().map(|(first, _)| first.id.clone());
    if let Some((first, is_last_known_good)) = first {
        // With a state directory a first module is on probation too (it becomes the
        // last-known-good once healthy); the last-known-good itself is not.
        reconciler.start(first, has_state && !is_last_known_good);
    }
    if let (Some(path), Some(text)) = (args.config.clone(), config_text) {
        config_file::watch(path, text, handle.clone(), args.config_poll);
    }
    let watcher = client
        .clone()
        .filter(|_| fleet_config || !local)
        .map(|client| {
            let target = handle.clone();
            let options = WatchOptions {
                config: fleet_config,
                assignments: !local,
                last_good,
                resync: args.fleet_resync,
                ..WatchOptions::new(pc_id)
            };
            runtime.spawn(watch::run(client, options, move |view| target.fleet(view)))
        });
    let root_follower = client
        .clone()
        .filter(|_| deployer.trust_root().is_some())
        .map(|client| {
            let target = handle.clone();
            runtime.spawn(collector_fleet::trust::follow(
                client,
                deployer.trust_version(),
                args.fleet_resync,
                move |source, roots| target.roots(source, roots),
            ))
        });
    if let (Some(dir), Some(first_id)) = (args.modules.clone(), first_id) {
        deploy::watch(deployer, dir, first_id, handle.clone(), args.modules_poll);
    }
    let stop = handle.clone();
    on_signal(&runtime, move || stop.shutdown());
    let stats = reconciler.stats();
    reconciler.run();
    for task in [watcher, root_follower].into_iter().flatten() {
        task.abort();
    }
    let (enumerations, samples) = shared.counts();
    tracing::info!(
        deployed = HostStats::get(&stats.deployed),
        refused = HostStats::get(&stats.refused),
        download_retries = HostStats::get(&stats.download_retries),
        enumerations,
        samples,
        "summary"
    );
    Ok(ExitCode::SUCCESS)
}

/// The module to start with: --guest, else the last-known-good, else the newest bundle
/// in --modules. Returns it and whether it is the last-known-good.
fn first_module(args: &RunArgs, deployer: &Arc<Deployer>) -> anyhow::Result<(Accepted, bool)> {
    if let Some(path) = &args.guest {
        return Ok((deployer.load_file(path).context("--guest")?, false));
    }
    match deployer.load_last_known_good(args.module.as_deref()) {
        Ok(Some(lkg)) => {
            tracing::info!(module = %lkg.id, "starting with the last-known-good module");
            return Ok((lkg, true));
        }
        Ok(None) => {}
        Err(e) => tracing::error!("the last-known-good module cannot be used: {e}"),
    }
    if let Some(dir) = &args.modules {
        let files = deploy::bundle_files(dir);
        return deployer
            .best_of(&files, args.module.as_deref(), None)
            .map(|a| (a, false))
            .with_context(|| {
                format!(
                    "no acceptable bundle in {} ({} files looked at; see the refusals above)",
                    dir.display(),
                    files.len()
                )
            });
    }
    anyhow::bail!(
        "nothing to run: pass --guest FILE, or --modules DIR (with --state-dir the agent \
         also remembers the last module that ran healthy)"
    )
}

/// `--fleet-resync`: a duration of at least 100 ms (a smaller one would spin).
fn parse_resync(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("{text}: at least 100ms"));
    }
    Ok(d)
}
