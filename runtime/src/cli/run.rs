//! `collector run`: the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::agent::{Agent, AgentOptions};
use crate::bundle::TrustStore;
use crate::config_file;
use crate::deploy::{self, Accepted, Deployer, Policy, StateDir};
use crate::engine::Sandbox;
use crate::grant::DEFAULT_GRANT;
use crate::guest::Supervisor;
use crate::host::{HostStats, Limits, Services};
use crate::sink::{NatsSink, Sink, StdoutSink};
use crate::source::{SysinfoSource, TimeBoxed};

/// Run a guest module against this machine's real processes.
///
/// The agent runs only signed bundles verified against --trust keys (or, for development,
/// an unsigned component with --insecure-allow-unsigned). With --modules it watches a
/// directory for newer bundles of the running module and swaps them in between two ticks;
/// with --state-dir it remembers the last module that ran healthy and rolls a new module
/// back to it if the new one traps on its first ticks.
///
/// Publishes go to standard output (one message per line) unless --nats-url is given.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The module to start with: a signed bundle, or an unsigned component (.wasm) with
    /// --insecure-allow-unsigned. Optional with --modules or a last-known-good module in
    /// --state-dir.
    #[arg(long, value_name = "FILE")]
    guest: Option<PathBuf>,

    /// A public key file (from `collector module keygen`) whose signatures are trusted.
    /// Repeat for several keys.
    #[arg(long = "trust", value_name = "PUB")]
    trust: Vec<PathBuf>,

    /// How many distinct trusted keys must have signed a bundle.
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
    /// good configuration stays. Without it, the defaults apply (process_perf off).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Publish to this NATS server (core publish) instead of standard output.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,

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

    /// How often the --config file is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    config_poll: Duration,

    /// How often the --modules directory is checked for new bundles.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    modules_poll: Duration,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let pc_id = match &args.pc_id {
        Some(id) => {
            crate::grant::check_pc_id(id).map_err(|e| anyhow::anyhow!("--pc-id {id:?}: {e}"))?;
            id.clone()
        }
        None => {
            let host =
                sysinfo::System::host_name().context("cannot read the host name; pass --pc-id")?;
            crate::grant::check_pc_id(&host).map_err(|e| {
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
    let trust = if args.trust.is_empty() {
        None
    } else {
        Some(TrustStore::from_files(&args.trust, args.threshold).context("--trust")?)
    };
    crate::grant::Grant::new(&args.grants, &pc_id).context("--grant")?;
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
    let (first, is_last_known_good) = first_module(&args, &deployer)?;
    // The last-known-good was recorded when it was first accepted, and may be older than
    // a module accepted since (and rolled back): recording it again would be refused.
    if !is_last_known_good {
        deployer
            .record_accepted(&first)
            .context("cannot record the accepted version in --state-dir")?;
    }
    tracing::info!(module = %first.id, pc_id, grant = %first.grant, "module loaded");

    // A runtime for the NATS client only; the agent loop runs on this thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let sink: Arc<dyn Sink> = match &args.nats_url {
        Some(url) => Arc::new(NatsSink::connect(
            url,
            runtime.handle().clone(),
            Duration::from_secs(5),
        )?),
        None => Arc::new(StdoutSink),
    };

    let source = TimeBoxed::new(Box::new(SysinfoSource::new()?), args.enumeration_timeout);
    let mut services = Services::new(Box::new(source), sink, &pc_id);
    services.grant = first.grant.clone();
    services.limits = first.limits.clone();
    let first_id = first.id.clone();
    let healthy_hook = if is_last_known_good {
        None
    } else {
        deployer.healthy_hook(&first)
    };
    let supervisor = Supervisor::new(first.module, services);
    let (mut agent, handle) = Agent::new(
        supervisor,
        AgentOptions {
            min_interval: args.min_interval,
            health_ticks: args.health_ticks,
        },
    );
    agent.set_label(first_id.to_string());
    if let Some(hook) = healthy_hook {
        agent.on_first_healthy(hook);
    }
    if let (Some(path), Some(text)) = (args.config.clone(), config_text) {
        config_file::watch(path, text, handle.clone(), args.config_poll);
    }
    if let Some(dir) = args.modules.clone() {
        deploy::watch(deployer, dir, first_id, handle.clone(), args.modules_poll);
    }
    let on_signal = handle.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("interrupted; stopping");
            on_signal.shutdown();
        }
    });
    let services = agent.run(config);
    let stats = &services.stats;
    tracing::info!(
        ticks = HostStats::get(&stats.ticks),
        published = HostStats::get(&stats.published),
        publish_denied = HostStats::get(&stats.publish_denied),
        traps = HostStats::get(&stats.traps),
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
    match deployer.load_last_known_good() {
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
