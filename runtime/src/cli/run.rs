//! `collector run`: the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::agent::{Agent, AgentOptions};
use crate::config_file;
use crate::engine::Sandbox;
use crate::grant::{DEFAULT_GRANT, Grant};
use crate::guest::{GuestModule, Supervisor};
use crate::host::{HostStats, Limits, Services};
use crate::sink::{NatsSink, Sink, StdoutSink};
use crate::source::SysinfoSource;

/// Run a guest module against this machine's real processes.
///
/// Publishes go to standard output (one message per line) unless --nats-url is given.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest component (.wasm) to run.
    #[arg(long, value_name = "FILE")]
    guest: PathBuf,

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

    /// A subject pattern the guest may publish to (NATS wildcards `*` and `>`; `{pc_id}`
    /// stands for this machine's id). Repeat for several. Publishes elsewhere are refused.
    #[arg(long = "grant", value_name = "SUBJECT", default_value = DEFAULT_GRANT)]
    grants: Vec<String>,

    /// Memory cap of the guest instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    max_memory_mib: usize,

    /// Time budget of each call into the guest (guest code only; host work such as
    /// process enumeration does not count). A guest over budget is stopped and restarted.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,

    /// Shortest tick interval honoured, whatever the guest asks for.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    min_interval: Duration,

    /// How often the --config file is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    config_poll: Duration,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let pc_id = match args.pc_id {
        Some(id) => id,
        None => sysinfo::System::host_name().context("cannot read the host name; pass --pc-id")?,
    };
    let grant = Grant::new(&args.grants, &pc_id).context("--grant")?;
    let (config, config_text) = match &args.config {
        Some(path) => {
            let (config, text) = config_file::load(path)?;
            (config, Some(text))
        }
        None => (Default::default(), None),
    };

    let sandbox = Sandbox::new()?;
    let module = GuestModule::from_file(&sandbox, &args.guest)
        .with_context(|| format!("guest {}", args.guest.display()))?;
    tracing::info!(guest = module.name(), file = %args.guest.display(), pc_id, grant = %grant, "guest loaded");

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

    let mut services = Services::new(Box::new(SysinfoSource::new()?), sink, &pc_id);
    services.grant = grant;
    services.limits = Limits {
        memory_bytes: args.max_memory_mib << 20,
        call_budget: args.call_timeout,
        ..Limits::default()
    };
    let supervisor = Supervisor::new(Arc::new(module), services);
    let (agent, handle) = Agent::new(
        supervisor,
        AgentOptions {
            min_interval: args.min_interval,
            ..AgentOptions::default()
        },
    );
    if let (Some(path), Some(text)) = (args.config, config_text) {
        config_file::watch(path, text, handle.clone(), args.config_poll);
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
        traps = HostStats::get(&stats.traps),
        "summary"
    );
    Ok(ExitCode::SUCCESS)
}
