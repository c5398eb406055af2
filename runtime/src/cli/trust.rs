//! `collector trust`: the security team's tool for trust roots. It prepares each version
//! of a root (the first with `init`, the next ones with `add-key`, `remove-key`,
//! `revoke`, `rotate` and `renew`), signs it with offline root keys, merges signatures
//! gathered on separate machines, checks a root as an agent would take it, shows one,
//! and publishes roots into the fleet's `collector_trust` bucket.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream::kv::CreateErrorKind;
use chrono::{DateTime, SubsecRound as _, Utc};
use clap::{Args, Subcommand};

use super::module::{now, rfc3339, write_atomically};
use super::ops::{self, NatsArgs};
use collector_bundle::{
    self as bundle, KeyId, MAX_ROOT_LEN, MAX_SCOPE_PATTERNS, PublicKey, RootDoc, RootRefusal,
    RootSigningKey, SecretKey, SignedRoot, TrustRoot, TrustStore, check_scope_pattern,
};
use collector_fleet::{TRUST_BUCKET, kv, root_key};

/// Prepare, sign, check and publish trust roots: which keys agents accept bundles from.
///
/// A trust root is a versioned, expiring document listing the root keys (which sign
/// roots) and how many of them must sign, the signing keys (which sign bundles, each
/// possibly limited to some modules) and how many of them must sign a bundle, and the
/// revoked keys. An agent takes version N+1 only if it is signed by the threshold of
/// version N's root keys AND by the threshold of its own root keys. Agents started with
/// `--trust KEY.pub` hold version 0: those keys are its root keys and signing keys.
///
/// Workflow. Root keys stay offline, each on its holder's machine. One machine
/// prepares a root: `init` writes the first one, `add-key`, `remove-key`, `revoke`,
/// `rotate` and `renew` write the next version of a root file; each writes it unsigned
/// and says which keys must sign it. The file is copied to each root key holder, who
/// runs `sign` there; the signed copies come back as files, and `merge` gathers their
/// signatures into one. `verify` checks the result as an agent would, `show` prints
/// what a root holds, and `publish`, from a machine that reaches NATS, stores it in the
/// fleet's `collector_trust` bucket, from which agents follow it. No step needs a
/// secret key and the network at once.
#[derive(Debug, Args)]
pub struct TrustArgs {
    #[command(subcommand)]
    command: TrustCommand,
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    Init(InitArgs),
    AddKey(AddKeyArgs),
    RemoveKey(RemoveKeyArgs),
    Revoke(RevokeArgs),
    Rotate(RotateArgs),
    Renew(RenewArgs),
    Sign(SignArgs),
    Merge(MergeArgs),
    Verify(VerifyArgs),
    Show(ShowArgs),
    Publish(PublishArgs),
}

/// Write the first trust root (version 1), unsigned.
///
/// Sign it afterwards with `collector trust sign` by --root-threshold of the --root-key
/// holders. To move agents that run with `--trust KEY.pub` keys onto it, it must also
/// be signed by enough of those keys (`collector trust verify --trust`).
#[derive(Debug, Args)]
struct InitArgs {
    /// A root key's public key file (KEY.pub from `collector module keygen`). Root keys
    /// sign roots, this one and the next; keep their secret halves offline. Repeat for
    /// several.
    #[arg(long = "root-key", value_name = "KEY.pub", required = true)]
    root_keys: Vec<PathBuf>,

    /// How many distinct root keys must sign this root, and the next version.
    #[arg(long, value_name = "K")]
    root_threshold: usize,

    /// A signing key's public key file: the keys that sign bundles. Append
    /// `=MODULE,...` to let it sign only those modules (a name, or a prefix ending in
    /// `*`): `--signing-key team.pub=process-perf,disk-*`. Repeat for several.
    #[arg(
        long = "signing-key",
        value_name = "KEY.pub[=MODULES]",
        required = true
    )]
    signing_keys: Vec<String>,

    /// How many distinct signing keys must sign a bundle.
    #[arg(long, value_name = "K", default_value_t = 1)]
    signing_threshold: usize,

    /// How long the root is valid (for instance `365days`). Agents accept no new bundle
    /// under an expired root: renew it before (`collector trust renew`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "365days")]
    expires_in: Duration,

    /// Where to write the unsigned root (for instance `v1.root`).
    #[arg(long, value_name = "ROOT")]
    out: PathBuf,

    /// Replace --out if it exists (its signatures are lost).
    #[arg(long)]
    force: bool,
}

/// What every command that prepares the next version of a root takes.
#[derive(Debug, Args)]
struct NextArgs {
    /// The root file to start from (version N); it is not changed.
    #[arg(value_name = "ROOT")]
    root: PathBuf,

    /// Where to write version N+1, unsigned (for instance `v2.root`). Never the input
    /// root.
    #[arg(long, value_name = "NEXT")]
    out: PathBuf,

    /// How long version N+1 is valid, from now (for instance `365days`). Without it, as
    /// long as version N was valid from its issue.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,

    /// Replace --out if it exists (its signatures are lost); the input root is never
    /// replaced.
    #[arg(long)]
    force: bool,
}

/// Prepare the next version of a root with more signing keys (or a new module scope
/// for a signing key it has).
#[derive(Debug, Args)]
struct AddKeyArgs {
    #[command(flatten)]
    next: NextArgs,

    /// A signing key's public key file to add. Append `=MODULE,...` to let it sign only
    /// those modules (a name, or a prefix ending in `*`); a key the root already has
    /// gets that scope instead. Repeat for several.
    #[arg(
        long = "signing-key",
        value_name = "KEY.pub[=MODULES]",
        required = true
    )]
    signing_keys: Vec<String>,

    /// How many distinct signing keys must sign a bundle from version N+1 on. Without
    /// it, as in version N.
    #[arg(long, value_name = "K")]
    signing_threshold: Option<usize>,
}

/// Prepare the next version of a root without some signing keys.
///
/// A removed key is not revoked: bundles it signed stop counting under the new root,
/// but it is not named as revoked, and a later root may add it again. Use `revoke` for
/// a key that leaked.
#[derive(Debug, Args)]
struct RemoveKeyArgs {
    #[command(flatten)]
    next: NextArgs,

    /// The signing key to remove: its key id (16 hex digits) or its public key file.
    /// Repeat for several.
    #[arg(long = "key", value_name = "ID|KEY.pub", required = true)]
    keys: Vec<String>,

    /// How many distinct signing keys must sign a bundle from version N+1 on. Without
    /// it, as in version N.
    #[arg(long, value_name = "K")]
    signing_threshold: Option<usize>,
}

/// Prepare the next version of a root that revokes keys.
///
/// A revoked key leaves the root keys and the signing keys and is listed as revoked:
/// agents that take the new root refuse bundles it signed, naming it, and no root it
/// signs counts its signature. A key the root does not hold (one leaked from
/// elsewhere) may be revoked too.
#[derive(Debug, Args)]
struct RevokeArgs {
    #[command(flatten)]
    next: NextArgs,

    /// The key to revoke: its key id (16 hex digits) or its public key file. Repeat for
    /// several.
    #[arg(long = "key", value_name = "ID|KEY.pub", required = true)]
    keys: Vec<String>,

    /// How many distinct root keys must sign a root from version N+1 on (when the
    /// revoked keys leave too few for the current one). Without it, as in version N.
    #[arg(long, value_name = "K")]
    root_threshold: Option<usize>,

    /// How many distinct signing keys must sign a bundle from version N+1 on. Without
    /// it, as in version N.
    #[arg(long, value_name = "K")]
    signing_threshold: Option<usize>,
}

/// Prepare the next version of a root with other root keys or thresholds.
///
/// The new version must still be signed by the root threshold of the current root
/// keys: new root keys alone cannot take over.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["add_root_keys", "remove_root_keys", "root_threshold", "signing_threshold"])
))]
struct RotateArgs {
    #[command(flatten)]
    next: NextArgs,

    /// A public key file to make a root key. Repeat for several.
    #[arg(long = "add-root-key", value_name = "KEY.pub")]
    add_root_keys: Vec<PathBuf>,

    /// A root key to retire (not revoked): its key id (16 hex digits) or public key
    /// file. Repeat for several.
    #[arg(long = "remove-root-key", value_name = "ID|KEY.pub")]
    remove_root_keys: Vec<String>,

    /// How many distinct root keys must sign a root from version N+1 on.
    #[arg(long, value_name = "K")]
    root_threshold: Option<usize>,

    /// How many distinct signing keys must sign a bundle from version N+1 on.
    #[arg(long, value_name = "K")]
    signing_threshold: Option<usize>,
}

/// Prepare the next version of a root with the same keys and a new expiry.
#[derive(Debug, Args)]
struct RenewArgs {
    #[command(flatten)]
    next: NextArgs,
}

/// Add signatures to a root file.
///
/// Run it on each root key holder's machine. A root is taken when the root threshold of
/// its own root keys signed it and, for version N+1, the root threshold of version N's
/// root keys: a key that is a root key of version N only signs too.
#[derive(Debug, Args)]
struct SignArgs {
    /// The root file to sign (changed in place unless --out).
    #[arg(value_name = "ROOT")]
    root: PathBuf,

    /// A secret key file (from `collector module keygen`). Repeat to sign with several.
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,

    /// Write the signed root here instead of replacing ROOT (written atomically either
    /// way).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Merge the signatures of copies of one root signed on separate machines.
#[derive(Debug, Args)]
struct MergeArgs {
    /// Where to write the merged root (written atomically; may be one of the copies).
    /// When it exists, its own signatures are kept: it must hold the same root.
    #[arg(long, value_name = "ROOT")]
    out: PathBuf,

    /// The signed copies: files of one root document (same version, same content).
    #[arg(value_name = "COPY", required = true)]
    copies: Vec<PathBuf>,
}

/// Check a root as an agent would take it: exits 0 only if it would.
///
/// Without --previous or --trust, the root must carry the threshold of its own root
/// keys: that is how an agent is installed with a first root. With them, it must
/// follow the last of them (both thresholds). In both cases it must not have expired.
/// On failure, prints why and which keys could still sign.
#[derive(Debug, Args)]
struct VerifyArgs {
    /// The root file to check.
    #[arg(value_name = "ROOT")]
    root: PathBuf,

    /// A root the agents hold or that comes before ROOT: the chain from the root an
    /// agent holds, oldest first, each the version before the next, the last one the
    /// version before ROOT. The first is checked as an installed root (its own
    /// threshold), unless --trust is given. Repeat for each version.
    #[arg(long = "previous", value_name = "PREV")]
    previous: Vec<PathBuf>,

    /// A public key file the agents run with (`collector run --trust`): version 0, the
    /// root before version 1 (or before the first --previous). Repeat for several.
    #[arg(long = "trust", value_name = "KEY.pub")]
    trust: Vec<PathBuf>,

    /// How many of the --trust keys the agents require (their `--threshold`).
    #[arg(long, value_name = "K", default_value_t = 1, requires = "trust")]
    threshold: usize,
}

/// Show what a root file holds: version, validity, keys, thresholds, revoked keys and
/// its signatures, checked against its own keys.
#[derive(Debug, Args)]
struct ShowArgs {
    /// The root file.
    #[arg(value_name = "ROOT")]
    root: PathBuf,
}

/// Publish roots to the fleet's `collector_trust` bucket, in version order.
///
/// Each root is stored under `v<version>` and agents follow it from the version they
/// hold. Before anything is written, each root must follow the version before it, read
/// from the bucket or given in the same call (version 1 must carry its own threshold),
/// and none may have expired. A published version is never replaced: publishing the
/// same root again succeeds ("already published"), another root under a published
/// version is refused. The bucket is made by `collector fleet init`.
#[derive(Debug, Args)]
struct PublishArgs {
    /// The root files, in any order (for instance `v2.root v3.root`).
    #[arg(value_name = "ROOT", required = true)]
    roots: Vec<PathBuf>,

    #[command(flatten)]
    nats: NatsArgs,
}

impl TrustArgs {
    /// Whether the subcommand works over NATS (and so prints its own report).
    pub fn talks_to_nats(&self) -> bool {
        matches!(self.command, TrustCommand::Publish(_))
    }
}

pub fn run(args: TrustArgs) -> anyhow::Result<()> {
    match args.command {
        TrustCommand::Init(args) => init(args),
        TrustCommand::AddKey(args) => add_key(args),
        TrustCommand::RemoveKey(args) => remove_key(args),
        TrustCommand::Revoke(args) => revoke(args),
        TrustCommand::Rotate(args) => rotate(args),
        TrustCommand::Renew(args) => prepare_next(&args.next, |_| Ok(())),
        TrustCommand::Sign(args) => sign(args),
        TrustCommand::Merge(args) => merge(args),
        TrustCommand::Verify(args) => verify(args),
        TrustCommand::Show(args) => show(args),
        TrustCommand::Publish(args) => publish(args),
    }
}

/// Reads a root file (at most [`MAX_ROOT_LEN`] bytes); errors name the file.
pub(super) fn read_root(path: &Path) -> anyhow::Result<SignedRoot> {
    let name = path.display();
    let bytes =
        bundle::read_bounded(path, MAX_ROOT_LEN as u64).with_context(|| format!("root {name}"))?;
    SignedRoot::parse(&bytes).with_context(|| format!("root {name}"))
}

/// The store bundles are checked against under root file `path`, installed as an agent
/// installs a first root (its own threshold); `flag` names it in errors.
pub(super) fn root_store(flag: &str, path: &Path) -> anyhow::Result<TrustStore> {
    let root = read_root(path).with_context(|| flag.to_string())?;
    let installed = TrustRoot::install(root.clone())
        .map_err(|e| anyhow!("{flag}: {}", refused(path, &e, None, &root)))?;
    Ok(installed.store().clone())
}

/// What a signature must be by to count when it is by no root key of `version`, for
/// people: version 0 is the `--trust` keys.
fn version_before(version: u64) -> String {
    if version <= 1 {
        "one of the --trust keys agents run with (version 0)".into()
    } else {
        format!("a root key of version {}", version - 1)
    }
}

fn ids<'a>(keys: impl IntoIterator<Item = &'a KeyId>) -> String {
    let ids: Vec<String> = keys.into_iter().map(KeyId::to_string).collect();
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

fn key_ids(keys: &[PublicKey]) -> Vec<KeyId> {
    keys.iter().map(PublicKey::id).collect()
}

/// `--expires-in` as a validity period, refused when not positive or absurdly long.
fn validity(d: Duration) -> anyhow::Result<chrono::Duration> {
    chrono::Duration::from_std(d)
        .ok()
        .filter(|v| *v > chrono::Duration::zero())
        .filter(|v| now().checked_add_signed(*v).is_some())
        .ok_or_else(|| {
            anyhow!(
                "--expires-in {}: expected a positive duration of at most a few centuries",
                humantime::format_duration(d)
            )
        })
}

/// `expires in 364 days`, `expires in 3h 2m`, or `EXPIRED`.
fn expiry_note(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if expires_at <= now {
        return "EXPIRED".into();
    }
    let left = expires_at - now;
    match left.num_days() {
        0 => {
            let secs = u64::try_from(left.num_seconds()).unwrap_or(0).max(1);
            format!(
                "expires in {}",
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
        1 => "expires in 1 day".into(),
        n => format!("expires in {n} days"),
    }
}

/// A `--signing-key KEY.pub[=MODULE,...]` value. A path holding `=` that names an
/// existing file is taken whole.
fn signing_key(spec: &str) -> anyhow::Result<RootSigningKey> {
    let flag = "--signing-key";
    let (path, modules) = match spec.rsplit_once('=') {
        Some((path, modules)) if !Path::new(spec).is_file() => (path, Some(modules)),
        _ => (spec, None),
    };
    let modules = match modules {
        None => None,
        Some(text) => {
            if text.trim().is_empty() {
                bail!(
                    "{flag} {spec}: no module after `=`; leave `=` out to let the key sign \
                     any module"
                );
            }
            let mut patterns: Vec<String> = Vec::new();
            for p in text.split(',').map(str::trim) {
                check_scope_pattern(p).map_err(|e| {
                    anyhow!(
                        "{flag} {spec}: {e} (expected module names or prefixes ending in `*`, \
                         comma-separated)"
                    )
                })?;
                if !patterns.iter().any(|q| q == p) {
                    patterns.push(p.to_string());
                }
            }
            if patterns.len() > MAX_SCOPE_PATTERNS {
                bail!(
                    "{flag} {spec}: {} module patterns, at most {MAX_SCOPE_PATTERNS}",
                    patterns.len()
                );
            }
            Some(patterns)
        }
    };
    let key = PublicKey::read(Path::new(path)).with_context(|| format!("{flag} {spec}"))?;
    Ok(RootSigningKey { key, modules })
}

/// A `--key ID|KEY.pub` value: an existing file is read as a public key, anything else
/// must be a key id.
fn key_ref(flag: &str, text: &str) -> anyhow::Result<KeyId> {
    let path = Path::new(text);
    if path.exists() {
        return Ok(PublicKey::read(path)
            .with_context(|| format!("{flag} {text}"))?
            .id());
    }
    text.parse::<KeyId>().map_err(|_| {
        anyhow!(
            "{flag} {text}: expected a key id (16 hex digits) or a public key file (KEY.pub), \
             and there is no such file"
        )
    })
}

fn scope_text(modules: Option<&[String]>) -> String {
    match modules {
        None => "any module".into(),
        Some(m) => m.join(", "),
    }
}

/// Refuses thresholds a root of these keys can never meet, naming the flag that sets
/// them.
fn check_thresholds(doc: &RootDoc) -> anyhow::Result<()> {
    let v = doc.version;
    let (n, t) = (doc.root_keys.len(), doc.root_threshold);
    if n == 0 {
        bail!("version {v} would have no root key: at least one --root-key is needed");
    }
    if t == 0 || t > n {
        bail!(
            "root threshold {t} cannot be met by the {n} root key(s) of version {v}: pass \
             --root-threshold from 1 to {n}"
        );
    }
    let (n, t) = (doc.signing_keys.len(), doc.signing_threshold);
    if n == 0 {
        bail!(
            "version {v} would have no signing key left: add one first (`collector trust add-key`)"
        );
    }
    if t == 0 || t > n {
        bail!(
            "signing threshold {t} cannot be met by the {n} signing key(s) of version {v}: \
             pass --signing-threshold from 1 to {n}"
        );
    }
    Ok(())
}

/// Whether `a` and `b` name the same file (when both exist), or the same path.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Writes a freshly prepared root to `out`, refusing the input root and, without
/// `force`, an existing file.
fn write_prepared(
    out: &Path,
    input: Option<&Path>,
    force: bool,
    root: &SignedRoot,
) -> anyhow::Result<()> {
    let shown = out.display();
    if let Some(input) = input
        && same_file(input, out)
    {
        bail!(
            "--out {shown}: that is the input root; write version {} to another file \
             (for instance v{}.root)",
            root.doc().version,
            root.doc().version
        );
    }
    if !force && out.symlink_metadata().is_ok() {
        bail!("--out {shown}: already exists; pass --force to replace it");
    }
    write_atomically(out, &root.to_bytes()).with_context(|| format!("--out {shown}"))
}

/// The lines describing a root's keys and validity.
fn describe(doc: &RootDoc, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  version:  {}", doc.version);
    let _ = writeln!(out, "  issued:   {}", rfc3339(doc.issued_at));
    let _ = writeln!(
        out,
        "  expires:  {} ({})",
        rfc3339(doc.expires_at),
        expiry_note(doc.expires_at, now)
    );
    let _ = writeln!(
        out,
        "  root keys ({} of {} must sign a root): {}",
        doc.root_threshold,
        doc.root_keys.len(),
        ids(&key_ids(&doc.root_keys))
    );
    let _ = writeln!(
        out,
        "  signing keys ({} of {} must sign a bundle):",
        doc.signing_threshold,
        doc.signing_keys.len()
    );
    for k in &doc.signing_keys {
        let _ = writeln!(
            out,
            "    {} (may sign: {})",
            k.key.id(),
            scope_text(k.modules.as_deref())
        );
    }
    let _ = writeln!(out, "  revoked:  {}", ids(&doc.revoked));
    out
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let mut root_keys: Vec<PublicKey> = Vec::new();
    for path in &args.root_keys {
        let key =
            PublicKey::read(path).with_context(|| format!("--root-key {}", path.display()))?;
        if root_keys.contains(&key) {
            bail!(
                "--root-key {}: key {} is given twice",
                path.display(),
                key.id()
            );
        }
        root_keys.push(key);
    }
    let mut signing_keys: Vec<RootSigningKey> = Vec::new();
    for spec in &args.signing_keys {
        let key = signing_key(spec)?;
        if signing_keys.iter().any(|k| k.key == key.key) {
            bail!("--signing-key {spec}: key {} is given twice", key.key.id());
        }
        signing_keys.push(key);
    }
    let valid_for = validity(args.expires_in)?;
    let issued_at = now().trunc_subsecs(0);
    let doc = RootDoc {
        version: 1,
        issued_at,
        expires_at: issued_at + valid_for,
        root_keys,
        root_threshold: args.root_threshold,
        signing_keys,
        signing_threshold: args.signing_threshold,
        revoked: Vec::new(),
    };
    check_thresholds(&doc)?;
    let root = SignedRoot::new(&doc).context("version 1")?;
    write_prepared(&args.out, None, args.force, &root)?;

    let out = args.out.display();
    println!("wrote {out}: trust root version 1, unsigned");
    print!("{}", describe(&doc, now()));
    println!(
        "to be taken by agents, it must be signed by {} of its root keys: {}",
        doc.root_threshold,
        ids(&key_ids(&doc.root_keys))
    );
    println!(
        "  (agents that run with --trust KEY.pub take it only if enough of those keys sign \
         it too: check with `collector trust verify {out} --trust KEY.pub`)"
    );
    println!(
        "next: `collector trust sign {out} --key KEY` on each root key holder's machine, \
         `collector trust merge` to gather signed copies"
    );
    Ok(())
}

/// Reads the input root, prepares version N+1 with `edit`, checks that it can be taken,
/// writes it and reports what changed and who must sign.
fn prepare_next(
    next: &NextArgs,
    edit: impl FnOnce(&mut RootDoc) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let input = read_root(&next.root)?;
    let old = input.doc();
    let valid_for = next.expires_in.map(validity).transpose()?;
    let mut doc = old.next(now(), valid_for);
    edit(&mut doc)?;
    // Signatures by keys the new root revokes do not count: the old root keys left
    // must still be able to meet the old threshold.
    let usable: Vec<KeyId> = key_ids(&old.root_keys)
        .into_iter()
        .filter(|id| !doc.revoked.contains(id))
        .collect();
    if usable.len() < old.root_threshold {
        bail!(
            "version {} could never be taken: it revokes root keys of version {}, leaving \
             {} of them to sign it where {} are required; retire root keys with `rotate` \
             first, or revoke fewer at once",
            doc.version,
            old.version,
            usable.len(),
            old.root_threshold
        );
    }
    check_thresholds(&doc)?;
    let root = SignedRoot::new(&doc).with_context(|| format!("version {}", doc.version))?;
    write_prepared(&next.out, Some(&next.root), next.force, &root)?;

    let out = next.out.display();
    println!(
        "wrote {out}: trust root version {}, unsigned (from version {} in {})",
        doc.version,
        old.version,
        next.root.display()
    );
    println!("changes:");
    for change in changes(old, &doc, now()) {
        println!("  {change}");
    }
    println!("to be taken by agents, it must be signed by both:");
    println!(
        "  {} of the root keys of version {}: {}",
        old.root_threshold,
        old.version,
        ids(&usable)
    );
    println!(
        "  {} of the root keys of version {}: {}",
        doc.root_threshold,
        doc.version,
        ids(&key_ids(&doc.root_keys))
    );
    println!("  (a key in both lists counts for both)");
    println!(
        "next: `collector trust sign {out} --key KEY` on each root key holder's machine, \
         `collector trust merge` to gather signed copies"
    );
    Ok(())
}

/// What differs between a root and the next version prepared from it, for people.
fn changes(old: &RootDoc, new: &RootDoc, now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    let old_root = key_ids(&old.root_keys);
    let new_root = key_ids(&new.root_keys);
    for id in new_root.iter().filter(|id| !old_root.contains(id)) {
        out.push(format!("root key {id} added"));
    }
    for id in old_root.iter().filter(|id| !new_root.contains(id)) {
        if !new.revoked.contains(id) {
            out.push(format!("root key {id} retired (not revoked)"));
        }
    }
    if old.root_threshold != new.root_threshold {
        out.push(format!(
            "root threshold {} (was {})",
            new.root_threshold, old.root_threshold
        ));
    }
    for k in &new.signing_keys {
        match old.signing_keys.iter().find(|o| o.key == k.key) {
            None => out.push(format!(
                "signing key {} added (may sign: {})",
                k.key.id(),
                scope_text(k.modules.as_deref())
            )),
            Some(o) if o.modules != k.modules => out.push(format!(
                "signing key {} may sign: {} (was: {})",
                k.key.id(),
                scope_text(k.modules.as_deref()),
                scope_text(o.modules.as_deref())
            )),
            Some(_) => {}
        }
    }
    for o in &old.signing_keys {
        let id = o.key.id();
        if !new.signing_keys.iter().any(|k| k.key == o.key) && !new.revoked.contains(&id) {
            out.push(format!(
                "signing key {id} removed (not revoked: bundles it signed stop counting)"
            ));
        }
    }
    if old.signing_threshold != new.signing_threshold {
        out.push(format!(
            "signing threshold {} (was {})",
            new.signing_threshold, old.signing_threshold
        ));
    }
    for id in new.revoked.iter().filter(|id| !old.revoked.contains(id)) {
        let was = if old_root.contains(id) && old.signing_keys.iter().any(|k| k.key.id() == *id) {
            "a root and signing key"
        } else if old_root.contains(id) {
            "a root key"
        } else if old.signing_keys.iter().any(|k| k.key.id() == *id) {
            "a signing key"
        } else {
            "not a key"
        };
        out.push(format!(
            "key {id} revoked (it was {was} of version {})",
            old.version
        ));
    }
    out.push(format!(
        "expires {} ({}; version {} expires {})",
        rfc3339(new.expires_at),
        expiry_note(new.expires_at, now),
        old.version,
        rfc3339(old.expires_at)
    ));
    out
}

fn add_key(args: AddKeyArgs) -> anyhow::Result<()> {
    let keys = args
        .signing_keys
        .iter()
        .map(|spec| Ok((spec, signing_key(spec)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prepare_next(&args.next, |doc| {
        for (spec, key) in keys {
            let id = key.key.id();
            if doc.revoked.contains(&id) {
                bail!(
                    "--signing-key {spec}: key {id} is revoked by version {}; a revoked key \
                     never signs again",
                    doc.version - 1
                );
            }
            match doc.signing_keys.iter_mut().find(|k| k.key == key.key) {
                Some(k) if k.modules == key.modules => bail!(
                    "--signing-key {spec}: key {id} is already a signing key of version {} \
                     (may sign: {})",
                    doc.version - 1,
                    scope_text(k.modules.as_deref())
                ),
                Some(k) => k.modules = key.modules,
                None => doc.signing_keys.push(key),
            }
        }
        if let Some(t) = args.signing_threshold {
            doc.signing_threshold = t;
        }
        Ok(())
    })
}

fn remove_key(args: RemoveKeyArgs) -> anyhow::Result<()> {
    let ids = args
        .keys
        .iter()
        .map(|k| Ok((k, key_ref("--key", k)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prepare_next(&args.next, |doc| {
        for (text, id) in ids {
            let before = doc.signing_keys.len();
            doc.signing_keys.retain(|k| k.key.id() != id);
            if doc.signing_keys.len() == before {
                let hint = if doc.root_keys.iter().any(|k| k.id() == id) {
                    " (it is a root key: `collector trust rotate --remove-root-key` retires it)"
                } else {
                    ""
                };
                bail!(
                    "--key {text}: key {id} is not a signing key of version {}{hint}",
                    doc.version - 1
                );
            }
        }
        if let Some(t) = args.signing_threshold {
            doc.signing_threshold = t;
        }
        if doc.signing_keys.is_empty() {
            bail!(
                "version {} would have no signing key left: add the new key first \
                 (`collector trust add-key`)",
                doc.version
            );
        }
        Ok(())
    })
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let ids = args
        .keys
        .iter()
        .map(|k| Ok((k, key_ref("--key", k)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prepare_next(&args.next, |doc| {
        let held = doc.version - 1;
        let mut revoked_any = false;
        for (text, id) in ids {
            if doc.revoked.contains(&id) {
                eprintln!("note: --key {text}: key {id} is already revoked by version {held}");
                continue;
            }
            revoked_any = true;
            if !doc.revoke(id) {
                eprintln!(
                    "note: --key {text}: key {id} is not a key of version {held}; it is \
                     revoked all the same (agents will refuse bundles and roots it signs)"
                );
            }
        }
        if !revoked_any {
            bail!("nothing to revoke: every --key is already revoked by version {held}");
        }
        if let Some(t) = args.root_threshold {
            doc.root_threshold = t;
        }
        if let Some(t) = args.signing_threshold {
            doc.signing_threshold = t;
        }
        Ok(())
    })
}

fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let added = args
        .add_root_keys
        .iter()
        .map(|p| {
            Ok((
                p,
                PublicKey::read(p).with_context(|| format!("--add-root-key {}", p.display()))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let removed = args
        .remove_root_keys
        .iter()
        .map(|k| Ok((k, key_ref("--remove-root-key", k)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prepare_next(&args.next, |doc| {
        let held = doc.version - 1;
        for (text, id) in removed {
            let before = doc.root_keys.len();
            doc.root_keys.retain(|k| k.id() != id);
            if doc.root_keys.len() == before {
                bail!("--remove-root-key {text}: key {id} is not a root key of version {held}");
            }
        }
        for (path, key) in added {
            let id = key.id();
            if doc.revoked.contains(&id) {
                bail!(
                    "--add-root-key {}: key {id} is revoked by version {held}; a revoked key \
                     never signs again",
                    path.display()
                );
            }
            if doc.root_keys.contains(&key) {
                bail!(
                    "--add-root-key {}: key {id} is already a root key of version {held}",
                    path.display()
                );
            }
            doc.root_keys.push(key);
        }
        if let Some(t) = args.root_threshold {
            doc.root_threshold = t;
        }
        if let Some(t) = args.signing_threshold {
            doc.signing_threshold = t;
        }
        Ok(())
    })
}

fn sign(args: SignArgs) -> anyhow::Result<()> {
    let mut root = read_root(&args.root)?;
    let keys = args
        .keys
        .iter()
        .map(|p| SecretKey::read(p).with_context(|| format!("--key {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let doc = root.doc().clone();
    let v = doc.version;
    for (path, key) in args.keys.iter().zip(&keys) {
        let id = key.id();
        let role = if doc.revoked.contains(&id) {
            eprintln!(
                "warning: --key {}: key {id} is revoked by version {v}: its signature never \
                 counts",
                path.display()
            );
            "revoked by this version"
        } else if doc.root_keys.iter().any(|k| k.id() == id) {
            "root key of this version"
        } else {
            let before = version_before(v);
            eprintln!(
                "warning: --key {}: key {id} is not a root key of version {v}; its signature \
                 counts only if it is {before}",
                path.display(),
            );
            "not a root key of this version (needed only if it is a root key of the version \
             before)"
        };
        let added = root
            .sign(key)
            .with_context(|| format!("--key {}", path.display()))?;
        if added {
            println!("signed by {id}: {role}");
        } else {
            println!("already signed by {id}: {role}");
        }
    }
    let out = args.out.as_deref().unwrap_or(&args.root);
    write_atomically(out, &root.to_bytes()).with_context(|| format!("root {}", out.display()))?;
    let own = root.signers_among(&doc.root_keys, &doc.revoked);
    println!(
        "wrote {}: version {v}, {} signature(s); signed by {} of its own root keys ({}), {} \
         required",
        out.display(),
        root.signatures().len(),
        own.len(),
        ids(&own),
        doc.root_threshold
    );
    Ok(())
}

fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let (first, rest) = args
        .copies
        .split_first()
        .expect("clap requires at least one copy");
    let mut merged = read_root(first)?;
    println!(
        "{}: version {}, {} signature(s)",
        first.display(),
        merged.doc().version,
        merged.signatures().len()
    );
    // What --out already holds counts too: merging copies into a file that carries
    // signatures of its own must not lose them.
    let out_is_a_copy = args.copies.iter().any(|c| same_file(c, &args.out));
    let existing = if !out_is_a_copy && args.out.exists() {
        let held = read_root(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
        if held.digest() != merged.digest() {
            bail!(
                "--out {}: holds another root (version {}) than {} (version {}); its signatures \
                 would be lost: write the merge to another file",
                args.out.display(),
                held.doc().version,
                first.display(),
                merged.doc().version
            );
        }
        Some(held)
    } else {
        None
    };
    let others = rest
        .iter()
        .map(|p| (p.as_path(), None))
        .chain(existing.map(|held| (args.out.as_path(), Some(held))));
    for (path, held) in others {
        let copy = match held {
            Some(held) => held,
            None => read_root(path)?,
        };
        let added = merged
            .merge(&copy)
            .with_context(|| format!("root {}", path.display()))?;
        println!(
            "{}: {added} signature(s) added of {}",
            path.display(),
            copy.signatures().len()
        );
    }
    write_atomically(&args.out, &merged.to_bytes())
        .with_context(|| format!("--out {}", args.out.display()))?;
    let doc = merged.doc();
    let own = merged.signers_among(&doc.root_keys, &doc.revoked);
    println!(
        "wrote {}: version {}, {} signature(s); signed by {} of its own root keys ({}), {} \
         required",
        args.out.display(),
        doc.version,
        merged.signatures().len(),
        own.len(),
        ids(&own),
        doc.root_threshold
    );
    Ok(())
}

/// For each root threshold `root` does not meet yet (of `held`'s root keys, when it
/// follows a held root, and of its own), how many signatures are missing and which
/// keys could still give them.
fn still_needed(held: Option<&TrustRoot>, root: &SignedRoot) -> Vec<String> {
    let doc = root.doc();
    let mut out = Vec::new();
    let mut check = |what: String, keys: &[PublicKey], required: usize| {
        let signers = root.signers_among(keys, &doc.revoked);
        if signers.len() >= required {
            return;
        }
        let could: Vec<KeyId> = keys
            .iter()
            .map(PublicKey::id)
            .filter(|id| !signers.contains(id) && !doc.revoked.contains(id))
            .collect();
        out.push(format!(
            "{} more signature(s) needed from the root keys of {what}, which could still \
             sign: {}",
            required - signers.len(),
            ids(&could)
        ));
    };
    if let Some(held) = held {
        check(
            format!("version {}", held.version()),
            held.root_keys(),
            held.root_threshold(),
        );
    }
    check(
        format!("version {} (its own)", doc.version),
        &doc.root_keys,
        doc.root_threshold,
    );
    out
}

fn refused(
    path: &Path,
    refusal: &RootRefusal,
    held: Option<&TrustRoot>,
    root: &SignedRoot,
) -> anyhow::Error {
    let mut text = format!("{}: not taken: {refusal}", path.display());
    match refusal {
        RootRefusal::HeldThreshold { .. } | RootRefusal::OwnThreshold { .. } => {
            for line in still_needed(held, root) {
                let _ = write!(text, "; {line}");
            }
        }
        RootRefusal::Expired { .. } => {
            text.push_str("; prepare a renewed version (`collector trust renew`) and publish it")
        }
        RootRefusal::NotNext { .. } | RootRefusal::Invalid(_) => {}
    }
    anyhow!(text)
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let root = read_root(&args.root)?;
    let now = now();
    let mut held: Option<(TrustRoot, String)> = if args.trust.is_empty() {
        None
    } else {
        let store = TrustStore::from_files(&args.trust, args.threshold).context("--trust")?;
        Some((TrustRoot::from_keys(store), "--trust keys".into()))
    };
    for prev in &args.previous {
        let signed = read_root(prev).with_context(|| format!("--previous {}", prev.display()))?;
        let next = match &held {
            None => TrustRoot::install(signed.clone()),
            Some((h, _)) => h.follow(&signed),
        }
        .map_err(|e| {
            let held = held.as_ref().map(|(h, _)| h);
            anyhow!("--previous {}", refused(prev, &e, held, &signed))
        })?;
        held = Some((next, prev.display().to_string()));
    }
    let taken = match &held {
        None => TrustRoot::install(root.clone()),
        Some((h, _)) => h.follow(&root),
    }
    .map_err(|e| refused(&args.root, &e, held.as_ref().map(|(h, _)| h), &root))?;
    let doc = root.doc();
    if now >= doc.expires_at {
        let e = RootRefusal::Expired {
            version: doc.version,
            expires_at: doc.expires_at,
            now,
        };
        return Err(refused(&args.root, &e, None, &root));
    }

    match &held {
        None => println!(
            "valid: {} (an agent can be installed with it: signed by its own root threshold)",
            args.root.display()
        ),
        Some((h, from)) => {
            println!(
                "valid: {} (an agent holding version {} takes it)",
                args.root.display(),
                h.version()
            );
            let signers = root.signers_among(h.root_keys(), &doc.revoked);
            println!(
                "  root keys of version {} ({from}) that signed: {} ({} required)",
                h.version(),
                ids(&signers),
                h.root_threshold()
            );
        }
    }
    let own = root.signers_among(&doc.root_keys, &doc.revoked);
    println!(
        "  its own root keys that signed: {} ({} required)",
        ids(&own),
        doc.root_threshold
    );
    println!(
        "  version {}, {} ({}); bundles need {} of its {} signing key(s)",
        taken.version(),
        expiry_note(doc.expires_at, now),
        rfc3339(doc.expires_at),
        doc.signing_threshold,
        doc.signing_keys.len()
    );
    Ok(())
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let root = read_root(&args.root)?;
    let doc = root.doc();
    let now = now();
    let mut out = String::new();
    let _ = writeln!(out, "trust root {}", args.root.display());
    out.push_str(&describe(doc, now));
    let own = root.signers_among(&doc.root_keys, &doc.revoked);
    let _ = writeln!(
        out,
        "signatures: {} ({} of its own root keys signed, {} required{})",
        root.signatures().len(),
        own.len(),
        doc.root_threshold,
        if own.len() >= doc.root_threshold {
            ""
        } else {
            ": NOT ENOUGH"
        }
    );
    let signing: Vec<&PublicKey> = doc.signing_keys.iter().map(|k| &k.key).collect();
    for (i, s) in root.signatures().iter().enumerate() {
        let bytes = root.signed_bytes();
        let by_root = doc
            .root_keys
            .iter()
            .find(|k| k.verifies(bytes, &s.signature));
        let by_signing = signing.iter().find(|k| k.verifies(bytes, &s.signature));
        let claims = s.key_id;
        let what = match (by_root, by_signing) {
            (Some(k), _) => format!("key {}: valid, root key of this version", k.id()),
            (None, Some(k)) => format!(
                "key {}: valid, a signing key of this version but not a root key (does not \
                 count)",
                k.id()
            ),
            (None, None) if doc.revoked.contains(&claims) => {
                format!("key {claims}: revoked by this version (does not count)")
            }
            (None, None)
                if doc.root_keys.iter().any(|k| k.id() == claims)
                    || signing.iter().any(|k| k.id() == claims) =>
            {
                format!("key {claims}: INVALID, does not verify over this document")
            }
            (None, None) => format!(
                "key {claims}: not a key of this version, not checked here (it counts if it is \
                 {}: `collector trust verify --previous` or `--trust` checks it)",
                version_before(doc.version)
            ),
        };
        let _ = writeln!(out, "  {}. {what}", i + 1);
    }
    let _ = writeln!(out, "digest: sha256 {}", root.digest());
    print!("{out}");
    Ok(())
}

/// One root given to `publish`, and what the bucket already holds under its version.
struct ToPublish {
    path: PathBuf,
    root: SignedRoot,
    /// The digest stored under its version, when there is one.
    stored: Option<String>,
}

fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let now = now();
    let mut given: Vec<(PathBuf, SignedRoot)> = Vec::new();
    for path in &args.roots {
        let root = read_root(path)?;
        let v = root.doc().version;
        match given.iter().find(|(_, r)| r.doc().version == v) {
            Some((other, r)) if r.digest() != root.digest() => bail!(
                "{} and {} are two different roots of version {v}; publish one",
                other.display(),
                path.display()
            ),
            Some(_) => {}
            None => given.push((path.clone(), root)),
        }
    }
    given.sort_by_key(|(_, r)| r.doc().version);

    ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let store = kv::open_kv(&js, TRUST_BUCKET).await?.ok_or_else(|| {
            anyhow!(
                "the KV bucket {TRUST_BUCKET} does not exist: run `collector fleet init` \
                 first"
            )
        })?;
        let read_stored = |version: u64| {
            let store = &store;
            async move {
                let key = root_key(version);
                let Some(bytes) = kv::read(store, TRUST_BUCKET, &key).await?.value else {
                    return Ok::<_, anyhow::Error>(None);
                };
                let root = SignedRoot::parse(&bytes)
                    .map_err(|e| anyhow!("{TRUST_BUCKET} {key} does not hold a valid root: {e}"))?;
                Ok(Some(root))
            }
        };

        // Check every root against the one before it before writing anything.
        let mut plan: Vec<ToPublish> = Vec::new();
        let mut held: Option<TrustRoot> = None;
        for (path, root) in given {
            let v = root.doc().version;
            let shown = path.display();
            let stored = read_stored(v).await?;
            if let Some(s) = &stored
                && s.digest() != root.digest()
            {
                bail!(
                    "{shown}: {TRUST_BUCKET} {} already holds another root of version {v} \
                     (digest {}, this one {}); a published version is never replaced: \
                     prepare version {} instead",
                    root_key(v),
                    s.digest(),
                    root.digest(),
                    v + 1
                );
            }
            let previous = match held.take() {
                Some(h) if h.version() + 1 == v => Some(h),
                _ if v == 1 => None,
                _ => {
                    let prev = read_stored(v - 1).await?.ok_or_else(|| {
                        anyhow!(
                            "{shown}: version {v} follows version {}, which is neither in \
                             {TRUST_BUCKET} nor given: pass the earlier root files too \
                             (`collector trust publish v{}.root {shown}`)",
                            v - 1,
                            v - 1
                        )
                    })?;
                    Some(TrustRoot::install(prev).map_err(|e| {
                        anyhow!(
                            "{TRUST_BUCKET} {} does not hold a root agents take: {e}",
                            root_key(v - 1)
                        )
                    })?)
                }
            };
            let taken = match &previous {
                None => TrustRoot::install(root.clone()),
                Some(p) => p.follow(&root),
            }
            .map_err(|e| refused(&path, &e, previous.as_ref(), &root))?;
            if stored.is_none() && now >= root.doc().expires_at {
                let e = RootRefusal::Expired {
                    version: v,
                    expires_at: root.doc().expires_at,
                    now,
                };
                return Err(refused(&path, &e, None, &root)
                    .context("not published: agents would refuse it"));
            }
            held = Some(taken);
            plan.push(ToPublish {
                path,
                stored: stored.map(|s| s.digest()),
                root,
            });
        }

        for p in plan {
            let v = p.root.doc().version;
            let key = root_key(v);
            let digest = p.root.digest();
            if p.stored.is_some() {
                println!(
                    "already published: {TRUST_BUCKET} {key} holds this root (version {v}, \
                     digest {digest})"
                );
                continue;
            }
            match store.create(&key, p.root.to_bytes().into()).await {
                Ok(revision) => println!(
                    "published {TRUST_BUCKET} {key}: version {v} from {} (revision \
                     {revision}, digest {digest}, {})",
                    p.path.display(),
                    expiry_note(p.root.doc().expires_at, now)
                ),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                    // Someone published this version meanwhile.
                    match read_stored(v).await? {
                        Some(s) if s.digest() == digest => println!(
                            "already published: {TRUST_BUCKET} {key} holds this root \
                             (version {v}, digest {digest})"
                        ),
                        _ => bail!(
                            "{}: {TRUST_BUCKET} {key} was just published with another root of \
                             version {v}; a published version is never replaced",
                            p.path.display()
                        ),
                    }
                }
                Err(e) => {
                    return Err(anyhow!(e).context(format!(
                        "cannot publish {} to {TRUST_BUCKET} {key}",
                        p.path.display()
                    )));
                }
            }
        }
        Ok(())
    })
}
