//! `collector module`: making and checking signed guest bundles (keygen, sign, verify,
//! inspect), for the people who approve modules and for checking a bundle before it
//! ships; the subcommands that ship them to a fleet live in `module_fleet.rs`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, SubsecRound as _, Utc};
use clap::{Args, Subcommand};

use super::module_fleet;
use collector_bundle::grant::DEFAULT_GRANT;
use collector_bundle::{
    self as bundle, Bundle, MAX_BUNDLE_LEN, Manifest, SecretKey, TrustStore, VersionStore,
};
#[cfg(feature = "sandbox")]
use collector_sandbox::engine::Sandbox;
#[cfg(feature = "sandbox")]
use collector_sandbox::guest::{GuestModule, check_header};

/// Make, check and ship signed guest bundles.
///
/// A bundle is one file holding a guest component, a manifest (name, version, hash,
/// grants, limits, expiry) and Ed25519 signatures over that manifest. Agents given
/// trusted public keys run only bundles signed by enough of those keys.
///
/// Typical use: `keygen` once per signer, `sign` each release, `verify` with the public
/// keys the agents trust before shipping, `inspect` to see what a bundle holds.
///
/// Over NATS: `publish` uploads a bundle to the fleet's module store, `list` shows the
/// published versions, `rollout` assigns a version to the fleet, a group or a PC,
/// `unassign` and `disable` take it away again, `effective` shows what one PC resolves.
#[derive(Debug, Args)]
pub struct ModuleArgs {
    #[command(subcommand)]
    command: ModuleCommand,
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    Keygen(KeygenArgs),
    Sign(SignArgs),
    Verify(VerifyArgs),
    Inspect(InspectArgs),
    Publish(module_fleet::PublishArgs),
    List(module_fleet::ListArgs),
    Rollout(module_fleet::RolloutArgs),
    Unassign(module_fleet::UnassignArgs),
    Disable(module_fleet::DisableArgs),
    Effective(module_fleet::EffectiveArgs),
}

/// Create a signing key pair: KEY (secret, readable by its owner only) and KEY.pub.
///
/// Prints the key id, the short name under which signatures and errors refer to the key.
#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the secret key; the public key goes to the same path plus `.pub`.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,

    /// Replace KEY and KEY.pub if they exist (the old key is lost).
    #[arg(long)]
    force: bool,
}

/// Sign a guest component into a bundle.
///
/// The component is checked first (it must be a component this host would load), then
/// a manifest describing it is written and signed with every --key.
#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
struct SignArgs {
    /// A secret key file from `collector module keygen`. Repeat to sign with several keys,
    /// for agents that require more than one signature (--threshold of verify).
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,

    /// The module's name: letters, digits, `.`, `_` and `-`. Agents keep the highest
    /// version they accepted per name.
    #[arg(long, value_name = "NAME")]
    name: String,

    /// The module's version. Agents refuse a lower version than one they accepted, and
    /// the same version with a different component.
    #[arg(long, value_name = "N")]
    version: u64,

    /// Let agents that accepted this version go back to versions down to N when an
    /// operator assigns one (`collector module rollout NAME N`), with no new signature.
    /// Without it they refuse anything lower. A floor only ever rises: sign a security
    /// fix with --rollback-floor equal to its version to close the way back.
    #[arg(long, value_name = "N")]
    rollback_floor: Option<u64>,

    /// Make the bundle expire this long after now (for instance `90days`); agents refuse
    /// it afterwards. Without it the bundle never expires.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,

    /// A subject pattern the module may publish to (NATS wildcards `*` and `>`; `{pc_id}`
    /// stands for the agent's machine id). Repeat for several.
    #[arg(long = "grant", value_name = "SUBJECT", default_value = DEFAULT_GRANT)]
    grants: Vec<String>,

    /// Memory cap of the module's instance, in MiB. Without it the agent's setting applies.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,

    /// Time budget of each call into the module, in whole milliseconds (for instance
    /// `500ms`). Without it the agent's setting applies.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    call_timeout: Option<Duration>,

    /// The guest component (.wasm) to sign.
    #[arg(value_name = "GUEST.wasm")]
    guest: PathBuf,

    /// Where to write the bundle (replaced atomically if it exists).
    #[arg(long, value_name = "BUNDLE")]
    out: PathBuf,
}

/// Check a bundle as an agent would: exits 0 only if it is valid.
///
/// The keys it is checked against are --trust key files (as agents started with
/// `--trust`), or a trust root (--trust-root: its signing keys, their module scopes,
/// its revoked keys and its expiry). Prints the signers and a summary of the manifest;
/// on failure, the reason.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("keys")
        .required(true)
        .args(["trust", "trust_root"])
))]
struct VerifyArgs {
    /// A trusted public key file (KEY.pub). Repeat for several.
    #[arg(long = "trust", value_name = "KEY.pub")]
    trust: Vec<PathBuf>,

    /// How many distinct trusted keys must have signed the bundle (with --trust; a trust
    /// root sets its own).
    #[arg(
        long,
        value_name = "K",
        default_value_t = 1,
        conflicts_with = "trust_root"
    )]
    threshold: usize,

    /// A trust root file (from `collector trust`) to check the bundle against instead of
    /// --trust keys. It must carry the threshold of its own root keys, as a root an
    /// agent is installed with (`collector trust verify ROOT`).
    #[arg(long, value_name = "ROOT")]
    trust_root: Option<PathBuf>,

    /// Also refuse a rollback against the versions an agent with this state directory
    /// has accepted (read only: nothing is recorded).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The bundle to check.
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,
}

/// Show what a bundle holds: the manifest, the signatures' key ids (checked only with
/// --trust or --trust-root), whether the component matches the manifest, and the
/// component's imports.
///
/// Exits non-zero when the bundle is damaged (component not matching its manifest,
/// invalid manifest or component). With --trust or --trust-root, each signature is
/// also checked and the verdict of `collector module verify` is shown, without changing
/// the exit code.
#[derive(Debug, Args)]
struct InspectArgs {
    /// A trusted public key file (KEY.pub) to check the signatures against. Repeat for
    /// several.
    #[arg(long = "trust", value_name = "KEY.pub", conflicts_with = "trust_root")]
    trust: Vec<PathBuf>,

    /// How many distinct --trust keys an agent requires.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 1,
        requires = "trust",
        conflicts_with = "trust_root"
    )]
    threshold: usize,

    /// A trust root file (from `collector trust`) to check the signatures against
    /// instead of --trust keys.
    #[arg(long, value_name = "ROOT")]
    trust_root: Option<PathBuf>,

    /// The bundle to inspect.
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,
}

impl ModuleArgs {
    /// Whether the subcommand works over NATS (and so prints its own report).
    pub fn talks_to_nats(&self) -> bool {
        matches!(
            self.command,
            ModuleCommand::Publish(_)
                | ModuleCommand::List(_)
                | ModuleCommand::Rollout(_)
                | ModuleCommand::Unassign(_)
                | ModuleCommand::Disable(_)
                | ModuleCommand::Effective(_)
        )
    }
}

pub fn run(args: ModuleArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ModuleCommand::Keygen(args) => keygen(args),
        ModuleCommand::Sign(args) => sign(args),
        ModuleCommand::Verify(args) => verify(args),
        ModuleCommand::Inspect(args) => inspect(args),
        ModuleCommand::Publish(args) => module_fleet::publish(args),
        ModuleCommand::List(args) => module_fleet::list(args),
        ModuleCommand::Rollout(args) => module_fleet::rollout(args),
        ModuleCommand::Unassign(args) => module_fleet::unassign(args),
        ModuleCommand::Disable(args) => module_fleet::disable(args),
        ModuleCommand::Effective(args) => module_fleet::effective(args),
    }
    .map(|()| ExitCode::SUCCESS)
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    let public = key.write_pair(&args.out, args.force).map_err(|e| match e {
        bundle::KeyError::Exists { .. } => anyhow!("{e}; pass --force to replace the key pair"),
        other => anyhow!(other),
    })?;
    println!("key id {}", key.id());
    println!(
        "secret key: {} (keep it private; sign with --key)",
        args.out.display()
    );
    println!(
        "public key: {} (give it to agents and to verify with --trust)",
        public.display()
    );
    Ok(())
}

fn sign(args: SignArgs) -> anyhow::Result<()> {
    let keys = args
        .keys
        .iter()
        .map(|p| SecretKey::read(p).context("--key"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let guest = &args.guest;
    let component = bundle::read_bounded(guest, MAX_BUNDLE_LEN)
        .with_context(|| format!("guest {}", guest.display()))?;
    check_loadable(&args.name, guest, &component)?;

    let issued_at = now().trunc_subsecs(0);
    let mut manifest = Manifest::describe(&args.name, args.version, &component, issued_at);
    manifest.grants.publish = args.grants;
    manifest.limits.memory_mib = args.memory_mib;
    if let Some(floor) = args.rollback_floor {
        if floor > args.version {
            bail!(
                "--rollback-floor {floor}: expected at most the version ({})",
                args.version
            );
        }
        manifest.rollback_floor = Some(floor);
    }
    if let Some(timeout) = args.call_timeout {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 || Duration::from_millis(ms) != timeout {
            bail!(
                "--call-timeout {}: expected a whole number of milliseconds, at least 1ms",
                humantime::format_duration(timeout)
            );
        }
        manifest.limits.call_timeout_ms = Some(ms);
    }
    if let Some(d) = args.expires_in {
        let expires = chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| issued_at.checked_add_signed(d))
            .filter(|e| *e > issued_at)
            .ok_or_else(|| {
                anyhow!(
                    "--expires-in {}: expected a positive duration of at most a few \
                     centuries",
                    humantime::format_duration(d)
                )
            })?;
        manifest.expires_at = Some(expires.trunc_subsecs(0));
    }

    let key_refs: Vec<&SecretKey> = keys.iter().collect();
    let bytes = bundle::sign(&manifest, &component, &key_refs).map_err(|e| match e {
        bundle::SignError::DuplicateKey(_) => anyhow!("--key: {e}"),
        bundle::SignError::Manifest(_) => anyhow!("{e} (check --name and --grant)"),
        other => anyhow!(other),
    })?;
    // What was just written must verify with its own keys; anything else is a bug here.
    let own = TrustStore::new(keys.iter().map(SecretKey::public_key), keys.len())?;
    let out = args.out.display().to_string();
    let verified = bundle::verify(&out, &bytes, &own, issued_at, None)?;
    write_atomically(&args.out, &bytes).with_context(|| format!("--out {out}"))?;

    println!("signed {out}");
    print!("{}", summary(&verified.manifest, &verified.signers, None));
    Ok(())
}

/// The store of `--trust-root ROOT`, else of `--trust` keys (`None` when neither).
fn trust_store(
    trust: &[PathBuf],
    threshold: usize,
    trust_root: Option<&Path>,
) -> anyhow::Result<Option<TrustStore>> {
    Ok(match trust_root {
        Some(root) => Some(super::trust::root_store("--trust-root", root)?),
        None if trust.is_empty() => None,
        None => Some(TrustStore::from_files(trust, threshold).context("--trust")?),
    })
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let trust = trust_store(&args.trust, args.threshold, args.trust_root.as_deref())?
        .ok_or_else(|| anyhow!("--trust or --trust-root is required"))?;
    let versions = args
        .state_dir
        .as_deref()
        .map(VersionStore::open)
        .transpose()
        .context("--state-dir")?;
    let verified = bundle::verify_file(&args.bundle, &trust, now(), versions.as_ref())?;
    println!("valid: {}", args.bundle.display());
    print!(
        "{}",
        summary(
            &verified.manifest,
            &verified.signers,
            Some(trust.threshold())
        )
    );
    if trust.version() > 0 {
        println!("  under:     trust root version {}", trust.version());
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let path = args.bundle.display().to_string();
    let bytes = bundle::read_bounded(&args.bundle, MAX_BUNDLE_LEN)
        .with_context(|| format!("bundle {path}"))?;
    let parts = Bundle::parse(&bytes).with_context(|| format!("bundle {path}"))?;
    let mut problems: Vec<String> = Vec::new();
    let mut out = String::new();

    let _ = writeln!(out, "bundle: {path} ({} bytes)", bytes.len());
    let _ = writeln!(out, "manifest ({} bytes):", parts.manifest.len());
    // The stored bytes are what was signed, so they are shown as they are when they are
    // already readable; compact or damaged ones are pretty-printed or shown lossily.
    let text = match (
        std::str::from_utf8(parts.manifest),
        serde_json::from_slice::<serde_json::Value>(parts.manifest),
    ) {
        (Ok(text), Ok(_)) if text.trim().contains('\n') => text.trim_end().to_string(),
        (_, Ok(value)) => serde_json::to_string_pretty(&value).expect("JSON values serialize"),
        (_, Err(_)) => String::from_utf8_lossy(parts.manifest).into_owned(),
    };
    for line in printable(&text).lines() {
        let _ = writeln!(out, "  {line}");
    }
    let manifest = Manifest::parse(parts.manifest)
        .map_err(|e| problems.push(e.to_string()))
        .ok();

    let trust = trust_store(&args.trust, args.threshold, args.trust_root.as_deref())?;
    match &trust {
        None => {
            let _ = writeln!(
                out,
                "signatures: {} (not checked here; `collector module verify --trust KEY.pub` \
                 checks them)",
                parts.signatures.len()
            );
        }
        Some(store) => {
            let against = match store.version() {
                0 => "the --trust keys".to_string(),
                v => format!("trust root version {v}"),
            };
            let _ = writeln!(
                out,
                "signatures: {} (checked against {against}, {} required)",
                parts.signatures.len(),
                store.threshold()
            );
        }
    }
    for (i, s) in parts.signatures.iter().enumerate() {
        let status = trust.as_ref().map_or_else(String::new, |store| {
            format!(
                ": {}",
                signature_status(store, parts.manifest, manifest.as_ref(), s)
            )
        });
        let _ = writeln!(out, "  {}. key id {}{status}", i + 1, s.key_id);
    }
    if let Some(store) = &trust {
        match bundle::verify(&path, &bytes, store, now(), None) {
            Ok(_) => {
                let _ = writeln!(out, "verdict: valid (an agent with this trust accepts it)");
            }
            Err(e) => {
                let _ = writeln!(out, "verdict: refused: {e}");
            }
        }
    }

    let _ = writeln!(
        out,
        "component: {} bytes, sha256 {}",
        parts.component.len(),
        bundle::sha256_hex(parts.component)
    );
    if let Some(manifest) = &manifest {
        match bundle::check_component(manifest, parts.component) {
            Ok(()) => {
                let _ = writeln!(out, "  matches the manifest's length and sha256");
            }
            Err(e) => {
                let _ = writeln!(out, "  DOES NOT MATCH THE MANIFEST: {e}");
                problems.push(e.to_string());
            }
        }
    }
    match component_imports(parts.component, manifest.as_ref()) {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(out, "  cannot be read as a component: {e:#}");
            problems.push(format!("component: {e:#}"));
        }
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("cannot write to standard output")?;

    if problems.is_empty() {
        Ok(())
    } else {
        bail!("bundle {path}: {}", problems.join("; "))
    }
}

/// What one signature of a bundle is worth under `store`.
fn signature_status(
    store: &TrustStore,
    manifest_bytes: &[u8],
    manifest: Option<&Manifest>,
    entry: &bundle::SignatureEntry,
) -> String {
    match store.signer_of(manifest_bytes, &entry.signature) {
        Some(key) => match manifest {
            Some(m) if !store.may_sign(key, &m.name) => format!(
                "valid, by trusted key {}, which may sign {} only: does not count for {:?}",
                key.id(),
                store.scope_of(key).unwrap_or_default().join(", "),
                m.name
            ),
            _ => format!("valid, by trusted key {}", key.id()),
        },
        None if store.is_revoked(entry.key_id) => "REVOKED by the trust root".into(),
        None if store.knows(entry.key_id) => {
            "INVALID: claims a trusted key but does not verify over this manifest".into()
        }
        None => "not a trusted key".into(),
    }
}

/// Signing vouches for the module: refuse what no agent would load.
#[cfg(feature = "sandbox")]
fn check_loadable(name: &str, guest: &std::path::Path, component: &[u8]) -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    GuestModule::from_bytes(&sandbox, name, component).with_context(|| {
        format!(
            "guest {}: not a component this host would load, so it is not signed",
            guest.display()
        )
    })?;
    Ok(())
}

/// Built without the sandbox: the component cannot be compiled here, so signing says so.
#[cfg(not(feature = "sandbox"))]
fn check_loadable(_name: &str, guest: &std::path::Path, _component: &[u8]) -> anyhow::Result<()> {
    eprintln!(
        "warning: guest {}: not checked against the sandbox (this collector was built without \
         the `sandbox` feature); check it with `collector module inspect` on an agent build",
        guest.display()
    );
    Ok(())
}

/// Built without the sandbox: imports cannot be listed.
#[cfg(not(feature = "sandbox"))]
fn component_imports(_bytes: &[u8], _manifest: Option<&Manifest>) -> anyhow::Result<String> {
    Ok("imports: not listed (this collector was built without the `sandbox` feature)\n".into())
}

/// The component's imports, with the functions of each imported interface, and whether
/// this host would load it.
#[cfg(feature = "sandbox")]
fn component_imports(bytes: &[u8], manifest: Option<&Manifest>) -> anyhow::Result<String> {
    check_header(bytes)?;
    let sandbox = Sandbox::new()?;
    let name = manifest.map_or("bundle", |m| m.name.as_str());
    collector_sandbox::guest::describe_imports(&sandbox, name, bytes)
}

/// The lines describing an accepted or freshly signed bundle.
fn summary(manifest: &Manifest, signers: &[bundle::KeyId], threshold: Option<usize>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  module:    {} version {}",
        manifest.name, manifest.version
    );
    if let Some(floor) = manifest.rollback_floor.filter(|f| *f < manifest.version) {
        let _ = writeln!(out, "  rollback:  agents may go back to version {floor}");
    }
    let _ = writeln!(
        out,
        "  component: {} bytes, sha256 {}",
        manifest.length, manifest.sha256
    );
    let _ = writeln!(out, "  wit:       {}", manifest.wit);
    let grants = if manifest.grants.publish.is_empty() {
        "none (it may not publish)".to_string()
    } else {
        manifest.grants.publish.join(", ")
    };
    let _ = writeln!(out, "  publish:   {grants}");
    let mut limits = Vec::new();
    if let Some(mib) = manifest.limits.memory_mib {
        limits.push(format!("memory {mib} MiB"));
    }
    if let Some(ms) = manifest.limits.call_timeout_ms {
        limits.push(format!("call timeout {ms} ms"));
    }
    let limits = if limits.is_empty() {
        "none set (the agent's apply)".to_string()
    } else {
        limits.join(", ")
    };
    let _ = writeln!(out, "  limits:    {limits}");
    let _ = writeln!(out, "  issued:    {}", rfc3339(manifest.issued_at));
    let expires = manifest
        .expires_at
        .map_or_else(|| "never".to_string(), rfc3339);
    let _ = writeln!(out, "  expires:   {expires}");
    let ids: Vec<String> = signers.iter().map(ToString::to_string).collect();
    let of = threshold.map_or_else(String::new, |k| format!(" ({k} required)"));
    let _ = writeln!(out, "  signed by: {}{of}", ids.join(", "));
    out
}

/// Writes `bytes` next to `path` then renames it into place, so an agent watching `path`
/// never sees half a bundle.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("cannot write {}: {e}", path.display())
    })
}

/// `text` with control characters other than newlines escaped: JSON strings may hold C1
/// controls raw, and an unverified bundle must not be able to drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

pub(super) fn now() -> DateTime<Utc> {
    DateTime::<Utc>::from(SystemTime::now())
}
