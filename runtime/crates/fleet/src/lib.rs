//! The fleet over NATS: how configuration, module assignments, signed bundles and status
//! travel between operators and agents, on the JetStream engine kanade already runs.
//!
//! | what | where | written by | read by |
//! |---|---|---|---|
//! | settings (kanade's own) | KV `agent_config`: `global`, `groups.<g>`, `pcs.<pc>` | `kanade config set`, `collector config set` | agents |
//! | group membership | KV `agent_groups`: `<pc>` → `{"groups":[...]}` | `kanade group add` | agents |
//! | module assignments | KV `collector_config`, same keys as `agent_config` | `collector module rollout` | agents |
//! | signed bundles | object store `collector_modules`: `<name>/<version>` | `collector module publish` | agents |
//! | agent status | KV `collector_status`: `<pc>` | each agent, its own key | `collector fleet status` |
//! | module transitions | `obs.<pc>` (kanade `ObsEvent`) | each agent | kanade's event timeline |
//! | staged rollouts | KV `collector_rollouts`: `<module>` | `collector rollout` (operators, controllers) | controllers, `rollout status` |
//! | rollout events | `obs.rollouts` (kanade `ObsEvent`) | the controller | kanade's event timeline |
//!
//! The collector never adds fields to `agent_config`: kanade's backend rewrites those
//! values through a fixed field list and would drop them.
//!
//! It must not depend on wasmtime, sysinfo, the `collector-sandbox`, `collector-deploy`
//! or `collector-testkit` crates, or the command line (`clap`, the `collector` crate):
//! operators' machines use it without wasmtime. `cargo xtask test` checks this
//! (`xtask/src/layers.rs`).

pub mod assignment;
pub mod fetch;
pub mod kv;
pub mod names;
pub mod rollout;
pub mod status;
pub mod trust;
pub mod watch;

/// kanade's scope keys and layers, shared with the mock host (`collector-shared`).
pub use collector_shared::scope;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

/// kanade's layered settings bucket.
pub const CONFIG_BUCKET: &str = "agent_config";
/// kanade's group membership bucket.
pub const GROUPS_BUCKET: &str = "agent_groups";
/// Module assignments, under kanade's scope keys.
pub const ASSIGNMENTS_BUCKET: &str = "collector_config";
/// One status record per agent.
pub const STATUS_BUCKET: &str = "collector_status";
/// Signed bundles, as `<name>/<version>`.
pub const MODULES_STORE: &str = "collector_modules";
/// The JetStream stream behind [`MODULES_STORE`].
pub const MODULES_STREAM: &str = "OBJ_collector_modules";

/// Trust roots, one key per version (`v1`, `v2`, ...): agents follow the chain from the
/// version they hold (`collector trust publish` writes them).
pub const TRUST_BUCKET: &str = "collector_trust";

/// Key of trust root `version` in [`TRUST_BUCKET`].
pub fn root_key(version: u64) -> String {
    format!("v{version}")
}

/// Object name of a module version in [`MODULES_STORE`].
pub fn object_name(name: &str, version: u64) -> String {
    format!("{name}/{version}")
}

/// Subject of kanade observability events for `pc_id`.
pub fn obs_subject(pc_id: &str) -> String {
    format!("obs.{pc_id}")
}

/// `{"groups":[...]}`, the value of `agent_groups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentGroups {
    /// Names of the groups the PC belongs to; absent in the value means none.
    #[serde(default)]
    pub groups: Vec<String>,
}

impl AgentGroups {
    /// Parses a value of `agent_groups` (kanade's membership is free-form JSON): the
    /// groups, sorted and de-duplicated, without the names that cannot be a key
    /// ([`names::group`]), each of which costs only itself.
    ///
    /// # Errors
    ///
    /// When the value is not an object with a `groups` list of strings.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Some(list) = value.get("groups") else {
            return Err("no `groups` field: not a group membership".into());
        };
        let mut groups: Vec<String> = serde_json::from_value::<Vec<String>>(list.clone())
            .map_err(|e| format!("field `groups`: {e}"))?;
        groups.retain(|g| match names::group(g) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("agent_groups: group skipped: {e}");
                false
            }
        });
        groups.sort();
        groups.dedup();
        Ok(Self { groups })
    }
}

/// How to reach and authenticate to NATS; shared by the agent and the operator commands.
/// The `collector` command line fills it from its flags, whose names the errors use
/// (`--nats-url`, `--nats-creds`...).
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// NATS server URL; several, comma-separated, for a cluster (the client fails over).
    pub nats_url: Option<String>,

    /// A NATS credentials file (JWT and nkey seed, as `nsc` writes it).
    pub nats_creds: Option<PathBuf>,

    /// User name (with --nats-password).
    pub nats_user: Option<String>,

    /// Password of --nats-user.
    pub nats_password: Option<String>,

    /// Authentication token.
    pub nats_token: Option<String>,

    /// A file holding an nkey seed (`SU...`).
    pub nats_nkey: Option<PathBuf>,

    /// CA certificate (PEM) to verify the server with; turns TLS on.
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS, with --tls-key.
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    pub tls_key: Option<PathBuf>,

    /// Prefix of this client's reply subjects (default `_INBOX`). Give each agent its
    /// own, such as `_INBOX_pc-a`, and let it subscribe only there, so that no agent can
    /// read the replies sent to others (docs/securing-a-deployment.md).
    pub nats_inbox_prefix: Option<String>,
}

impl NatsOptions {
    /// The server URLs, or an error naming `--nats-url` when none was given.
    ///
    /// # Errors
    ///
    /// When no URL was given or one does not parse.
    pub fn servers(&self) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
        let urls = self
            .nats_url
            .as_deref()
            .context("--nats-url is required (or set NATS_URL)")?;
        urls.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| anyhow::anyhow!("--nats-url {u:?}: {e}"))
            })
            .collect()
    }

    /// Connection options with the credentials and TLS settings given.
    ///
    /// # Errors
    ///
    /// When a credentials, nkey or TLS file cannot be read, or two kinds of credentials
    /// were given.
    pub async fn options(&self, name: &str) -> anyhow::Result<async_nats::ConnectOptions> {
        let kinds = [
            self.nats_creds.is_some(),
            self.nats_user.is_some() || self.nats_password.is_some(),
            self.nats_token.is_some(),
            self.nats_nkey.is_some(),
        ];
        anyhow::ensure!(
            kinds.iter().filter(|k| **k).count() <= 1,
            "give one kind of NATS credentials: --nats-creds, --nats-user/--nats-password, --nats-token or --nats-nkey"
        );
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)));
        if let Some(prefix) = &self.nats_inbox_prefix {
            anyhow::ensure!(
                !prefix.is_empty()
                    && prefix
                        .split('.')
                        .all(|t| !t.is_empty() && t != "*" && t != ">")
                    && !prefix.chars().any(|c| c.is_whitespace() || c.is_control()),
                "--nats-inbox-prefix {prefix:?}: expected dot-separated subject tokens without wildcards or spaces"
            );
            opts = opts.custom_inbox_prefix(prefix);
        }
        if let Some(path) = &self.nats_creds {
            opts = opts
                .credentials_file(path)
                .await
                .with_context(|| format!("--nats-creds {}", path.display()))?;
        }
        match (&self.nats_user, &self.nats_password) {
            (Some(user), Some(password)) => {
                opts = opts.user_and_password(user.clone(), password.clone());
            }
            (None, None) => {}
            _ => anyhow::bail!("--nats-user and --nats-password go together"),
        }
        if let Some(token) = &self.nats_token {
            opts = opts.token(token.clone());
        }
        if let Some(path) = &self.nats_nkey {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("--nats-nkey {}", path.display()))?;
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .with_context(|| {
                    format!(
                        "--nats-nkey {}: no nkey seed (a line starting with S)",
                        path.display()
                    )
                })?;
            opts = opts.nkey(seed.to_string());
        }
        if let Some(ca) = &self.tls_ca {
            anyhow::ensure!(ca.is_file(), "--tls-ca {}: no such file", ca.display());
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            opts = opts
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(opts)
    }

    /// Connects, waiting at most `timeout` for the server (operator commands).
    ///
    /// # Errors
    ///
    /// When the options are invalid or no server answers in time.
    pub async fn connect(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<async_nats::Client> {
        let servers = self.servers()?;
        let shown = self.nats_url.clone().unwrap_or_default();
        let opts = self.options(name).await?;
        tokio::time::timeout(timeout, opts.connect(servers))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from NATS at {shown} within {timeout:?}"))?
            .with_context(|| format!("cannot connect to NATS at {shown}"))
    }

    /// Connects in the background: returns at once, and the client keeps trying (an agent
    /// must start and run its last-known-good modules while the server is away).
    ///
    /// # Errors
    ///
    /// When the options are invalid.
    pub async fn connect_in_background(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let servers = self.servers()?;
        let opts = self.options(name).await?.retry_on_initial_connect();
        opts.connect(servers)
            .await
            .context("cannot set up the NATS client")
    }
}

/// A uniformly random duration in `[0, max)`; zero for zero. Spreads a fleet's
/// re-reads and downloads so that agents do not all ask at once.
pub fn random_below(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return max / 2;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(u64::from_le_bytes(bytes) % nanos)
}
