//! What the operator commands that talk to the fleet share: a Tokio runtime around one
//! command, the NATS connection, the scope flags (`--global`, `--group`, `--pc`) that
//! name a key of kanade's layered buckets, and reading the layers one PC resolves.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::fleet::scope::{Layers, Scope, keys_for};
use crate::fleet::{AgentGroups, GROUPS_BUCKET, NatsArgs, kv};

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
    let client = nats.connect("collector-cli", CONNECT_TIMEOUT).await?;
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

/// `value` when it can be the last part of a bucket key (a group name or a PC id):
/// letters, digits, `-`, `_` and `=`, with inner dots allowed.
///
/// # Errors
///
/// Naming `flag`, when it cannot.
pub fn check_name<'a>(flag: &str, value: &'a str) -> anyhow::Result<&'a str> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '.'));
    anyhow::ensure!(
        !value.is_empty() && ok_chars && !value.starts_with('.') && !value.ends_with('.'),
        "{flag} {value:?}: expected letters, digits, `-`, `_`, `=` or inner dots"
    );
    Ok(value)
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
        Some(bytes) => Ok(serde_json::from_slice::<AgentGroups>(&bytes)
            .with_context(|| format!("{GROUPS_BUCKET} key {pc}: expected {{\"groups\":[...]}}"))?
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
        assert_eq!(check_name("--pc", "pc-01.lab").unwrap(), "pc-01.lab");
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
