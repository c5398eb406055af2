//! The fleet half of `collector module`: publishing signed bundles into the
//! `collector_modules` object store, listing them, assigning versions to scopes of the
//! `collector_config` KV (rollout, unassign, disable), which agents watch, and showing
//! what one PC resolves from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream::object_store::{InfoErrorKind, ObjectInfo, ObjectMetadata, ObjectStore};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use clap::Args;
use futures_util::TryStreamExt as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::ops::{self, NatsArgs, RequiredScope};
use collector_bundle::{self as bundle, MAX_BUNDLE_LEN, TrustStore};
use collector_fleet::assignment::{self, AssignmentScope};
use collector_fleet::{self as fleet, ASSIGNMENTS_BUCKET, MODULES_STORE, kv, names};
use collector_shared::scope::Scope;

/// Revisions kept per key of `collector_config`: enough to see what a scope said
/// before the last few rollouts.
pub(super) const ASSIGNMENTS_HISTORY: i64 = 5;

/// Publish a signed bundle to the fleet's module store.
///
/// The bundle is checked first as an agent would check it (signatures against the
/// --trust keys and --threshold, manifest, format and WIT target, expiry, component
/// length and hash; not anti-rollback, which is per agent), and refused with the reason
/// if any check fails. It is stored in the object store `collector_modules` (created if
/// missing) as `<name>/<version>`. A version is immutable: publishing the same bytes
/// again succeeds ("already published"), other bytes under a published version are
/// refused. Publishing assigns nothing: `collector module rollout` does.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// A public key the agents trust (KEY.pub). Repeat for several.
    #[arg(long = "trust", value_name = "KEY.pub", required = true)]
    trust: Vec<PathBuf>,

    /// How many distinct trusted keys must have signed the bundle (as the agents require).
    #[arg(long, value_name = "K", default_value_t = 1)]
    threshold: usize,

    /// The signed bundle (from `collector module sign`).
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,

    #[command(flatten)]
    nats: NatsArgs,
}

/// List the module versions in the fleet's module store.
///
/// One line per object of `collector_modules`: module, version, size, SHA-256 of the
/// bundle and when it was published, sorted by name then version.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Assign a published module version to the fleet, a group or one PC.
///
/// Sets `modules.NAME.version` in that scope's key of the `collector_config` KV (created
/// if missing) and clears an `enabled: false` there. Agents merge scopes global → groups
/// (alphabetical) → PC, so a canary is a rollout to a group, followed by one to --global.
/// The version must be in the module store. Concurrent edits of the same scope are safe:
/// the write is a compare-and-swap on the key's revision, retried when it loses a race.
#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct RolloutArgs {
    /// The module's name, as signed.
    #[arg(value_name = "NAME")]
    name: String,

    /// The version to run (must have been published).
    #[arg(value_name = "VERSION")]
    version: u64,

    #[command(flatten)]
    scope: RequiredScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Remove a module from one scope's assignments.
///
/// Only that scope changes: a wider scope that assigns the module still applies (use
/// `collector module disable` to switch it off for a group or a PC). A scope left with
/// no module is kept as `{"modules":{}}`.
#[derive(Debug, Args)]
pub struct UnassignArgs {
    /// The module's name.
    #[arg(value_name = "NAME")]
    name: String,

    #[command(flatten)]
    scope: RequiredScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Switch a module off at one scope, even where a wider scope assigns it.
///
/// Writes `enabled: false` for the module in that scope (its version, if any, is kept).
/// `collector module rollout` at the same scope switches it on again.
#[derive(Debug, Args)]
pub struct DisableArgs {
    /// The module's name.
    #[arg(value_name = "NAME")]
    name: String,

    #[command(flatten)]
    scope: RequiredScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Show the modules one PC should run, as its agent resolves its assignments.
///
/// Reads the PC's groups (`agent_groups`) and the `global`, `groups.<g>` and `pcs.<pc>`
/// keys of `collector_config`, merges them global → groups (alphabetical) → PC, and
/// prints each module and version, then the modules two of its groups assign different
/// versions of (the alphabetically last group wins). What the agent really runs is in
/// `collector fleet status`.
#[derive(Debug, Args)]
pub struct EffectiveArgs {
    /// The PC.
    #[arg(long, value_name = "ID", required = true)]
    pc: String,

    /// Print `{"modules":{NAME:VERSION},"conflicts":[...]}` instead.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    nats: NatsArgs,
}

pub fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let path = args.bundle.display().to_string();
    let bytes = bundle::read_bounded(&args.bundle, MAX_BUNDLE_LEN)
        .with_context(|| format!("bundle {path}"))?;
    let trust = TrustStore::from_files(&args.trust, args.threshold).context("--trust")?;
    let verified = bundle::verify(&path, &bytes, &trust, Utc::now(), None)
        .map_err(|e| anyhow!("{e}; not published"))?;
    let manifest = &verified.manifest;
    let object = fleet::object_name(&manifest.name, manifest.version);
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    let sha256 = hex::encode(digest);

    ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let store = kv::open_or_create_objects(&js, MODULES_STORE).await?;
        if let Some(existing) = info(&store, &object).await? {
            if same_bytes(&store, &existing, &bytes, &digest).await? {
                println!(
                    "already published: {MODULES_STORE}/{object} holds these exact bytes \
                     (sha256 {sha256})"
                );
                return Ok(());
            }
            bail!(
                "{path}: {MODULES_STORE}/{object} is already published with other bytes \
                 (sha256 {}); a version is immutable; publish a higher version",
                digest_hex(&existing).unwrap_or_else(|| "unknown".into())
            );
        }
        let meta = ObjectMetadata {
            name: object.clone(),
            description: Some(format!(
                "collector module {} version {}",
                manifest.name, manifest.version
            )),
            metadata: [
                ("module".to_string(), manifest.name.clone()),
                ("version".to_string(), manifest.version.to_string()),
                ("component_sha256".to_string(), manifest.sha256.clone()),
            ]
            .into(),
            ..Default::default()
        };
        let stored = store
            .put(meta, &mut bytes.as_slice())
            .await
            .with_context(|| format!("cannot upload {path} to {MODULES_STORE}/{object}"))?;
        anyhow::ensure!(
            stored.size == bytes.len() && digest_of(&stored) == Some(digest),
            "{MODULES_STORE}/{object}: the server stored {} bytes with digest {:?}, expected \
             {} bytes with sha256 {sha256}",
            stored.size,
            stored.digest,
            bytes.len()
        );
        Ok(())
    })?;

    let signers: Vec<String> = verified.signers.iter().map(ToString::to_string).collect();
    println!("published {MODULES_STORE}/{object}");
    println!(
        "  module:    {} version {}",
        manifest.name, manifest.version
    );
    println!("  size:      {} bytes", bytes.len());
    println!("  sha256:    {sha256}");
    println!("  component: sha256 {}", manifest.sha256);
    println!("  signed by: {}", signers.join(", "));
    println!(
        "assign it with: collector module rollout {} {} --group G | --global | --pc ID",
        manifest.name, manifest.version
    );
    Ok(())
}

/// The object's info, `None` when there is no such object.
async fn info(store: &ObjectStore, object: &str) -> anyhow::Result<Option<ObjectInfo>> {
    match store.info(object).await {
        Ok(info) if !info.deleted => Ok(Some(info)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("cannot look up {MODULES_STORE}/{object}"))),
    }
}

/// Whether the stored object holds exactly `bytes`: by its digest when the server gave
/// one, else by downloading it.
async fn same_bytes(
    store: &ObjectStore,
    existing: &ObjectInfo,
    bytes: &[u8],
    digest: &[u8; 32],
) -> anyhow::Result<bool> {
    if existing.size != bytes.len() {
        return Ok(false);
    }
    if let Some(stored) = digest_of(existing) {
        return Ok(&stored == digest);
    }
    let mut object = store
        .get(&existing.name)
        .await
        .with_context(|| format!("cannot download {MODULES_STORE}/{}", existing.name))?;
    let mut stored = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut stored)
        .await
        .with_context(|| format!("cannot download {MODULES_STORE}/{}", existing.name))?;
    Ok(stored == bytes)
}

/// The SHA-256 an object store recorded (`SHA-256=<base64url>`).
fn digest_of(info: &ObjectInfo) -> Option<[u8; 32]> {
    let b64 = info.digest.as_deref()?.strip_prefix("SHA-256=")?;
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
        .ok()?;
    raw.try_into().ok()
}

fn digest_hex(info: &ObjectInfo) -> Option<String> {
    digest_of(info).map(hex::encode)
}

/// One published version, as `list --json` prints it.
#[derive(Debug, Serialize)]
struct Listed {
    module: String,
    /// `None` for an object whose name is not `<name>/<version>`.
    version: Option<u64>,
    object: String,
    size: usize,
    sha256: Option<String>,
    published_at: Option<DateTime<Utc>>,
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let infos = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let Some(store) = kv::open_objects(&js, MODULES_STORE).await? else {
            return Ok(None);
        };
        let infos: Vec<ObjectInfo> = store
            .list()
            .await
            .with_context(|| format!("cannot list {MODULES_STORE}"))?
            .try_collect()
            .await
            .with_context(|| format!("cannot list {MODULES_STORE}"))?;
        Ok(Some(infos))
    })?;
    let mut rows: Vec<Listed> = infos
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.deleted)
        .map(|i| {
            let (module, version) = match i.name.rsplit_once('/') {
                Some((m, v)) if v.parse::<u64>().is_ok() => (m.to_string(), v.parse().ok()),
                _ => (i.name.clone(), None),
            };
            Listed {
                module,
                version,
                sha256: digest_hex(&i),
                size: i.size,
                published_at: i
                    .modified
                    .and_then(|m| DateTime::from_timestamp(m.unix_timestamp(), m.nanosecond())),
                object: i.name,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.module, a.version).cmp(&(&b.module, b.version)));

    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no module published in {MODULES_STORE} (collector module publish adds one)");
        return Ok(());
    }
    // Object names come from the store: shown escaped, one line each.
    for r in &mut rows {
        r.module = names::printable(&r.module, 80);
    }
    let width = rows
        .iter()
        .map(|r| r.module.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "{:<width$}  {:>8}  {:>10}  {:<64}  PUBLISHED",
        "MODULE", "VERSION", "SIZE", "SHA256"
    );
    for r in &rows {
        println!(
            "{:<width$}  {:>8}  {:>10}  {:<64}  {}",
            r.module,
            r.version.map_or_else(|| "-".into(), |v| v.to_string()),
            r.size,
            r.sha256.as_deref().unwrap_or("-"),
            r.published_at.map_or_else(|| "-".into(), ops::rfc3339),
        );
    }
    Ok(())
}

pub fn rollout(args: RolloutArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    let (name, version) = (ops::check_module(&args.name)?, args.version);
    let written = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        require_published(&js, name, version).await?;
        edit_assignments(&js, scope, |s| {
            let m = s.modules.entry(name.to_string()).or_default();
            m.version = Some(version);
            // A plain assignment ends a staged rollout's placement at this scope (the
            // rollout's controller then halts it: its assignment was changed).
            m.rollout = None;
            if m.enabled == Some(false) {
                m.enabled = None;
            }
            Ok(())
        })
        .await
    })?;
    if written.changed {
        println!("{scope}: {name} version {version} assigned");
    } else {
        println!("{scope}: already assigns {name} version {version}; nothing changed");
    }
    print_written(scope, &written);
    let overrides = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        narrower_overrides(&js, scope, name, version).await
    });
    match overrides {
        Ok(found) if !found.is_empty() => {
            eprintln!("warning: narrower scopes keep some agents off {name} version {version}:");
            for (key, what, undo) in &found {
                eprintln!("  {key}: {what} (`{undo}` lets this assignment reach them)");
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot look for narrower scopes that override this: {e:#}"),
    }
    Ok(())
}

/// The scopes narrower than `scope` that say otherwise about `name` (another version,
/// or disabled): (key, what it says, the command that would lift it). A group's
/// assignment beats the fleet's and a PC's beats both, so an operator rolling out to
/// `global` is told which rings and pins keep agents where they are.
pub(super) async fn narrower_overrides(
    js: &async_nats::jetstream::Context,
    scope: Scope<'_>,
    name: &str,
    version: u64,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let Some(store) = kv::open_kv(js, ASSIGNMENTS_BUCKET).await? else {
        return Ok(Vec::new());
    };
    let mut keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| anyhow!("cannot list {ASSIGNMENTS_BUCKET}: {e}"))?
        .try_collect()
        .await
        .map_err(|e| anyhow!("cannot list {ASSIGNMENTS_BUCKET}: {e}"))?;
    keys.sort();
    let mut found = Vec::new();
    for key in keys {
        let narrower = matches!(
            (scope, Scope::parse(&key)),
            (Scope::Global, Some(Scope::Group(_) | Scope::Pc(_)))
                | (Scope::Group(_), Some(Scope::Pc(_)))
        );
        if !narrower {
            continue;
        }
        let Some(bytes) = kv::read(&store, ASSIGNMENTS_BUCKET, &key).await?.value else {
            continue;
        };
        let Ok(value) = AssignmentScope::from_json(&bytes) else {
            continue;
        };
        let Some(m) = value.modules.get(name) else {
            continue;
        };
        let flag = match Scope::parse(&key) {
            Some(Scope::Group(g)) => format!("--group {g}"),
            Some(Scope::Pc(pc)) => format!("--pc {pc}"),
            _ => continue,
        };
        let what = if m.enabled == Some(false) {
            format!("{name} disabled")
        } else {
            match m.version {
                Some(v) if v != version => format!("{name} version {v}"),
                _ => continue,
            }
        };
        let undo = format!("collector module unassign {name} {flag}");
        found.push((names::printable(&key, 200), what, undo));
    }
    Ok(found)
}

pub fn unassign(args: UnassignArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    let name = ops::check_module(&args.name)?;
    let written = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        edit_assignments(&js, scope, |s| {
            s.modules.remove(name);
            Ok(())
        })
        .await
    })?;
    if written.changed {
        println!("{scope}: {name} removed");
    } else {
        println!("{scope}: does not name {name}; nothing changed");
    }
    print_written(scope, &written);
    Ok(())
}

pub fn disable(args: DisableArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    let name = ops::check_module(&args.name)?;
    let written = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        edit_assignments(&js, scope, |s| {
            s.modules.entry(name.to_string()).or_default().enabled = Some(false);
            Ok(())
        })
        .await
    })?;
    if written.changed {
        println!("{scope}: {name} disabled");
    } else {
        println!("{scope}: {name} is already disabled; nothing changed");
    }
    print_written(scope, &written);
    Ok(())
}

fn print_written(scope: Scope<'_>, written: &kv::Written<AssignmentScope>) {
    ops::report_replaced(ASSIGNMENTS_BUCKET, &scope.key(), written.replaced.as_ref());
    let revision = written
        .revision
        .map_or_else(|| "absent".to_string(), |r| format!("revision {r}"));
    println!(
        "{ASSIGNMENTS_BUCKET} {scope} ({revision}): {}",
        String::from_utf8_lossy(&written.value.to_json())
    );
}

pub fn effective(args: EffectiveArgs) -> anyhow::Result<()> {
    let pc = ops::check_name("--pc", &args.pc)?;
    let read = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        ops::read_pc_layers(&js, ASSIGNMENTS_BUCKET, pc, |key, bytes| {
            AssignmentScope::from_json(bytes)
                .map_err(|e| anyhow!("{ASSIGNMENTS_BUCKET} {key}: {e}"))
        })
        .await
    })?;
    let layers = &read.layers;
    let resolved = assignment::resolve(
        layers.global.as_ref(),
        layers.groups_of(&read.groups),
        layers.pc.as_ref(),
        assignment::Agent {
            pc_id: pc,
            groups: &read.groups,
        },
    );
    if args.json {
        let out = serde_json::json!({
            "modules": resolved.modules,
            "conflicts": resolved.conflicts,
        });
        println!("{out}");
        return Ok(());
    }
    let groups = if read.groups.is_empty() {
        "none".to_string()
    } else {
        read.groups.join(", ")
    };
    println!("pc {pc}, groups: {groups}");
    println!("layers: {}", read.describe());
    if resolved.modules.is_empty() {
        println!("no module assigned");
    }
    for (name, version) in &resolved.modules {
        println!("{name} version {version}");
    }
    for c in &resolved.conflicts {
        println!("conflict: {c} (the last group wins)");
    }
    Ok(())
}

/// Refuses a version that is not in the module store, listing those that are.
pub(super) async fn require_published(
    js: &async_nats::jetstream::Context,
    name: &str,
    version: u64,
) -> anyhow::Result<()> {
    let object = fleet::object_name(name, version);
    let store = kv::open_objects(js, MODULES_STORE).await?;
    if let Some(store) = &store
        && info(store, &object).await?.is_some()
    {
        return Ok(());
    }
    let mut published: BTreeMap<u64, ()> = BTreeMap::new();
    if let Some(store) = &store {
        let infos: Vec<ObjectInfo> = store.list().await?.try_collect().await?;
        for i in infos.iter().filter(|i| !i.deleted) {
            if let Some((m, v)) = i.name.rsplit_once('/')
                && m == name
                && let Ok(v) = v.parse()
            {
                published.insert(v, ());
            }
        }
    }
    let known = if published.is_empty() {
        format!("no version of {name} is published")
    } else {
        let v: Vec<String> = published.keys().map(ToString::to_string).collect();
        format!("published versions of {name}: {}", v.join(", "))
    };
    bail!(
        "{name} version {version} is not in the object store {MODULES_STORE} ({known}); \
         publish it first with `collector module publish`"
    )
}

/// A stored scope, refused when re-encoding it would lose something: agents ignore
/// fields they do not know, but an edit by this tool must not drop what a newer one wrote.
fn decode_assignments(bytes: &[u8]) -> Result<AssignmentScope, kv::Undecodable> {
    let scope = AssignmentScope::from_json(bytes).map_err(kv::Undecodable::Refused)?;
    let stored: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| kv::Undecodable::Refused(e.to_string()))?;
    let kept: serde_json::Value = serde_json::from_slice(&scope.to_json())
        .map_err(|e| kv::Undecodable::Refused(e.to_string()))?;
    if stored != kept {
        return Err(kv::Undecodable::Keep(anyhow!(
            "it holds fields this collector does not know ({}); edit it with the newer tool that \
             wrote them",
            names::printable(&String::from_utf8_lossy(bytes), 400)
        )));
    }
    Ok(scope)
}

/// Compare-and-swap edit of one scope of `collector_config` (created if missing).
pub(super) async fn edit_assignments(
    js: &async_nats::jetstream::Context,
    scope: Scope<'_>,
    mutate: impl FnMut(&mut AssignmentScope) -> anyhow::Result<()>,
) -> anyhow::Result<kv::Written<AssignmentScope>> {
    let store = kv::open_or_create_kv(js, ASSIGNMENTS_BUCKET, ASSIGNMENTS_HISTORY).await?;
    kv::read_modify_write(
        &store,
        ASSIGNMENTS_BUCKET,
        &scope.key(),
        decode_assignments,
        AssignmentScope::to_json,
        mutate,
    )
    .await
}
