//! What the operator commands that talk to the fleet share: a Tokio runtime around one
//! command, the NATS connection, the scope flags (`--global`, `--group`, `--pc`) that
//! name a key of kanade's layered buckets, and reading the layers one PC resolves.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use collector_fleet::{AgentGroups, GROUPS_BUCKET, NatsOptions, kv, names};
use collector_shared::scope::{Layers, Scope, keys_for};

/// How to reach and authenticate to NATS: the flags of `collector run` and of the operator
/// commands. Secrets may come from the environment instead of the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct NatsArgs {
    /// NATS server URL; several, comma-separated, for a cluster (the client fails over).
    #[arg(long, value_name = "URL", env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// A NATS credentials file (JWT and nkey seed, as `nsc` writes it).
    #[arg(long, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,

    /// User name (with --nats-password).
    #[arg(long, value_name = "USER", env = "NATS_USER")]
    pub nats_user: Option<String>,

    /// Password of --nats-user.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,

    /// Authentication token.
    #[arg(long, value_name = "TOKEN", env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// A file holding an nkey seed (`SU...`).
    #[arg(long, value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,

    /// CA certificate (PEM) to verify the server with; turns TLS on.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS, with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Prefix of this client's reply subjects (default `_INBOX`). Give each agent its
    /// own, such as `_INBOX_pc-a`, and let it subscribe only there, so that no agent can
    /// read the replies sent to others (docs/securing-a-deployment.md).
    #[arg(long, value_name = "PREFIX", env = "NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
}

impl NatsArgs {
    /// The connection these flags describe.
    pub fn options(&self) -> NatsOptions {
        NatsOptions {
            nats_url: self.nats_url.clone(),
            nats_creds: self.nats_creds.clone(),
            nats_user: self.nats_user.clone(),
            nats_password: self.nats_password.clone(),
            nats_token: self.nats_token.clone(),
            nats_nkey: self.nats_nkey.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            nats_inbox_prefix: self.nats_inbox_prefix.clone(),
        }
    }
}

/// How long an operator command waits for the server before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one command's future on a runtime of its own.
pub fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Connects as an operator tool and returns the JetStream context.
pub async fn jetstream(nats: &NatsArgs) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = nats
        .options()
        .connect("collector-cli", CONNECT_TIMEOUT)
        .await?;
    Ok(async_nats::jetstream::new(client))
}

/// Exactly one scope: the fleet, a group, or one PC.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct RequiredScope {
    /// Every agent of the fleet (key `global`).
    #[arg(long)]
    pub global: bool,

    /// The agents of group G (key `groups.G`); a canary is a group.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// One agent, by its PC id (key `pcs.ID`).
    #[arg(long, value_name = "ID")]
    pub pc: Option<String>,
}

impl RequiredScope {
    /// The scope, its name checked.
    ///
    /// # Errors
    ///
    /// When the group or PC id cannot be a bucket key.
    pub fn scope(&self) -> anyhow::Result<Scope<'_>> {
        scope_of(self.group.as_deref(), self.pc.as_deref())
    }
}

/// A group or a PC; the fleet-wide `global` scope when neither is given.
#[derive(Debug, Clone, Args)]
#[group(multiple = false)]
pub struct OptionalScope {
    /// The layer of group G (key `groups.G`) instead of `global`.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// The layer of one PC (key `pcs.ID`) instead of `global`.
    #[arg(long, value_name = "ID")]
    pub pc: Option<String>,
}

impl OptionalScope {
    /// The scope, its name checked.
    ///
    /// # Errors
    ///
    /// When the group or PC id cannot be a bucket key.
    pub fn scope(&self) -> anyhow::Result<Scope<'_>> {
        scope_of(self.group.as_deref(), self.pc.as_deref())
    }
}

fn scope_of<'a>(group: Option<&'a str>, pc: Option<&'a str>) -> anyhow::Result<Scope<'a>> {
    Ok(match (group, pc) {
        (Some(g), _) => Scope::Group(check_name("--group", g)?),
        (None, Some(pc)) => Scope::Pc(check_name("--pc", pc)?),
        (None, None) => Scope::Global,
    })
}

/// `value` when it is a valid group name (`--group`, `--set`) or PC id (`--pc`), checked
/// by the rules agents apply ([`names`]) before any request is made.
///
/// # Errors
///
/// Naming `flag`, when it cannot.
pub fn check_name<'a>(flag: &str, value: &'a str) -> anyhow::Result<&'a str> {
    let checked = if flag == "--pc" {
        names::pc_id(value)
    } else {
        names::group(value)
    };
    checked.map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    Ok(value)
}

/// `name` when it is a valid module name, checked before any request is made.
///
/// # Errors
///
/// Naming the module name and what is wrong with it.
pub fn check_module(name: &str) -> anyhow::Result<&str> {
    names::module(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(name)
}

/// Tells the operator that an edit overwrote a value agents refuse, and what it was.
pub fn report_replaced(bucket: &str, key: &str, replaced: Option<&kv::Replaced>) {
    if let Some(r) = replaced {
        eprintln!(
            "warning: {bucket} {key} held a value agents refuse ({}), now replaced; it was (revision {}): {}",
            names::printable(&r.reason, 300),
            r.revision,
            names::printable(&r.value, 2000)
        );
    }
}

/// The groups `pc` belongs to (`agent_groups`; none when the bucket or key is absent).
///
/// # Errors
///
/// When the server cannot be asked or the value is not `{"groups":[...]}`.
pub async fn read_groups(
    js: &async_nats::jetstream::Context,
    pc: &str,
) -> anyhow::Result<Vec<String>> {
    let Some(store) = kv::open_kv(js, GROUPS_BUCKET).await? else {
        return Ok(Vec::new());
    };
    match kv::read(&store, GROUPS_BUCKET, pc).await?.value {
        Some(bytes) => Ok(AgentGroups::from_json(&String::from_utf8_lossy(&bytes))
            .map_err(|e| {
                anyhow::anyhow!("{GROUPS_BUCKET} key {pc}: {}", names::printable(&e, 300))
            })?
            .groups),
        None => Ok(Vec::new()),
    }
}

/// The layers of one bucket that apply to one PC, as its agent reads them.
pub struct PcLayers<T> {
    /// The PC's groups, from `agent_groups`.
    pub groups: Vec<String>,
    pub layers: Layers<T>,
    /// Each key that applies and the revision it was read at (`None`: absent).
    pub revisions: Vec<(String, Option<u64>)>,
}

impl<T> PcLayers<T> {
    /// `global (revision 3), groups.canary (absent), ...`
    pub fn describe(&self) -> String {
        let shown: Vec<String> = self
            .revisions
            .iter()
            .map(|(key, rev)| match rev {
                Some(r) => format!("{key} (revision {r})"),
                None => format!("{key} (absent)"),
            })
            .collect();
        shown.join(", ")
    }
}

/// Reads the PC's groups, then the keys of layered `bucket` that apply to it (`global`,
/// `groups.<g>`, `pcs.<pc>`), decoding each with `decode(key, bytes)`.
///
/// # Errors
///
/// When the server cannot be asked or a value does not decode.
pub async fn read_pc_layers<T: PartialEq>(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    pc: &str,
    decode: impl Fn(&str, &[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<PcLayers<T>> {
    let groups = read_groups(js, pc).await?;
    let store = kv::open_kv(js, bucket).await?;
    let mut layers = Layers::default();
    let mut revisions = Vec::new();
    for key in keys_for(pc, &groups) {
        let read = match &store {
            Some(store) => kv::read(store, bucket, &key).await?,
            None => kv::Read {
                value: None,
                revision: None,
            },
        };
        match read.value {
            Some(bytes) => {
                let value = decode(&key, &bytes)?;
                let revision = read.revision.unwrap_or_default();
                layers.apply(pc, &key, revision, Some(value));
                revisions.push((key, Some(revision)));
            }
            None => revisions.push((key, None)),
        }
    }
    Ok(PcLayers {
        groups,
        layers,
        revisions,
    })
}

/// How long ago `then` was, shortly: `42s`, `5m`, `3h`, `2d` (`in 5s` for the future).
pub fn age(now: chrono::DateTime<chrono::Utc>, then: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (now - then).num_seconds();
    let (future, secs) = (secs < 0, secs.unsigned_abs());
    let text = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A timestamp as operators read it: RFC 3339, UTC, whole seconds.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_key_tokens() {
        assert_eq!(check_name("--pc", "pc-01_lab").unwrap(), "pc-01_lab");
        assert_eq!(check_name("--group", "ring.1").unwrap(), "ring.1");
        // A PC id is one subject token, as the agent requires of its own.
        assert!(check_name("--pc", "pc-01.lab").is_err());
        for bad in ["", "a b", "a*", ".a", "a.", "a>b"] {
            let err = check_name("--group", bad).unwrap_err().to_string();
            assert!(err.starts_with("--group"), "{err}");
        }
    }

    #[test]
    fn ages_are_short() {
        let now: chrono::DateTime<chrono::Utc> = "2026-11-27T12:00:00Z".parse().unwrap();
        let at = |s: &str| s.parse().unwrap();
        assert_eq!(age(now, at("2026-11-27T11:59:18Z")), "42s ago");
        assert_eq!(age(now, at("2026-11-27T11:55:00Z")), "5m ago");
        assert_eq!(age(now, at("2026-11-27T09:00:00Z")), "3h ago");
        assert_eq!(age(now, at("2026-11-25T12:00:00Z")), "2d ago");
        assert_eq!(age(now, at("2026-11-27T12:00:05Z")), "in 5s");
    }
}
