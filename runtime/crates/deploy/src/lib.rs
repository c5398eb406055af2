//! Which module the agent runs, and where it comes from: signed bundles checked against
//! the trust store (unsigned components only when explicitly allowed), the last-known-good
//! module kept in the state directory, and a watched directory that new bundles are
//! dropped into. Everything here happens off the tick path; the agent only receives
//! modules that are verified, compiled and linked.
//!
//! It must not depend on `collector-testkit` or `collector-reference`, which are test and
//! benchmark tools, not part of an agent, nor on the command line (clap, or the
//! `collector` crate that uses this one). `cargo xtask test` checks this layering.

pub mod config_file;
pub mod nats_sink;
pub mod reconcile;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use collector_bundle::grant::Grant;
use collector_bundle::{
    self as bundle, MAGIC, MAX_BUNDLE_LEN, MAX_ROOT_LEN, Manifest, ROOT_EXTENSION, SignedRoot,
    TrustRoot, TrustStore, VersionStore,
};
use collector_fsutil::{Links, MAX_STATE_FILE_LEN, open_regular, read_regular, write_atomic};
use collector_sandbox::agent::{HealthyHook, ModuleSpec, RollbackHook};
use collector_sandbox::engine::Sandbox;
use collector_sandbox::guest::GuestModule;
use collector_sandbox::host::Limits;

/// Directory of the state directory holding last-known-good bundles, one file per
/// module version (so that the file the state points to is never overwritten).
pub const LKG_DIR: &str = "last-known-good";
/// File of the state directory recording the last-known-good module and rolled-back ones.
pub const AGENT_STATE_FILE: &str = "agent-state.json";
/// Directory of the state directory holding the trust roots this agent followed, one
/// file per version (`v<N>.root`): at start the chain is followed again from the root
/// the agent was installed with, so a root is never taken back and a file planted there
/// counts for nothing unless it is signed as the chain requires.
pub const TRUST_DIR: &str = "trust-roots";
/// Older good versions kept per module besides the last-known-good, for when a revoked
/// key takes the newest away.
const EARLIER_GOOD: usize = 3;
/// One last-known-good module per module name.
const AGENT_STATE_FORMAT: &str = "collector-agent-state/2";
/// The first format: a single last-known-good module. Read, then rewritten as the second.
const AGENT_STATE_FORMAT_V1: &str = "collector-agent-state/1";
/// File of the state directory holding the fleet's last view of this PC (settings and
/// assignments), so that an agent started while NATS is away runs what it ran before.
pub const FLEET_STATE_FILE: &str = "fleet-state.json";
const FLEET_STATE_FORMAT: &str = "collector-fleet-state/1";

/// What the agent accepts to run.
pub struct Policy {
    /// The trust root the agent was installed with (`--trust-root`, or `--trust` keys as
    /// version 0); `None` when neither was given. Newer roots are followed from it.
    pub trust: Option<TrustRoot>,
    /// Whether bare (unsigned) components may run (`--insecure-allow-unsigned`).
    pub allow_unsigned: bool,
    /// Grant for unsigned components (bundles carry their own).
    pub unsigned_grants: Vec<String>,
    /// The agent's own limits: ceilings for what a manifest asks.
    pub ceilings: Limits,
    /// This machine's id, bound to `{pc_id}` in publish grants.
    pub pc_id: String,
}

/// A module's identity, as far as deployment is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleId {
    /// Module name, from the manifest (for an unsigned component, its file stem).
    pub name: String,
    /// Version from the manifest; 0 for an unsigned component.
    pub version: u64,
    /// SHA-256 of the component bytes.
    pub sha256: String,
}

impl std::fmt::Display for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// A module that passed every check, ready to run.
pub struct Accepted {
    /// Which module and version this is.
    pub id: ModuleId,
    /// The compiled component.
    pub module: Arc<GuestModule>,
    /// Subjects it may publish to: the manifest's grant, or `--grant` for an unsigned
    /// component, with `{pc_id}` bound.
    pub grant: Grant,
    /// The manifest's limits capped by the agent's ceilings (the ceilings themselves for
    /// an unsigned component).
    pub limits: Limits,
    /// The manifest, for signed bundles.
    pub manifest: Option<Manifest>,
    /// The bundle file's bytes, kept to become the last-known-good.
    pub bundle: Option<Vec<u8>>,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("id", &self.id)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Why a file was not accepted. The message names the file, and the module and version
/// when the manifest could be read.
#[derive(Debug, thiserror::Error)]
#[error("{subject}: {reason}")]
pub struct Refused {
    /// The file or object refused, with the module and version when known.
    pub subject: String,
    /// Why, in words meant for the operator.
    pub reason: String,
}

/// A module recorded as rolled back, so it is not tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedModule {
    /// The exact module (name, version and bytes) rolled back.
    #[serde(flatten)]
    pub id: ModuleId,
    /// Why it was rolled back, as the agent reported it.
    pub reason: String,
    /// When the rollback was recorded.
    pub at: DateTime<Utc>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct AgentStateFile {
    format: String,
    /// By module name.
    #[serde(default)]
    last_known_good: BTreeMap<String, ModuleId>,
    #[serde(default)]
    failed: Vec<FailedModule>,
    /// By module name, newest first: versions that were the last-known-good before the
    /// current one, tried in turn when it no longer passes the checks (its key was
    /// revoked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    earlier_good: BTreeMap<String, Vec<ModuleId>>,
}

/// The first format of `agent-state.json`.
#[derive(Debug, Deserialize)]
struct AgentStateFileV1 {
    last_known_good: Option<ModuleId>,
    #[serde(default)]
    failed: Vec<FailedModule>,
}

impl AgentStateFile {
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Format {
            format: String,
        }
        let format: Format = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        match format.format.as_str() {
            AGENT_STATE_FORMAT => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            AGENT_STATE_FORMAT_V1 => {
                let v1: AgentStateFileV1 =
                    serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                Ok(Self {
                    format: AGENT_STATE_FORMAT.into(),
                    last_known_good: v1
                        .last_known_good
                        .into_iter()
                        .map(|id| (id.name.clone(), id))
                        .collect(),
                    failed: v1.failed,
                    earlier_good: BTreeMap::new(),
                })
            }
            other => Err(format!(
                "unknown format {other:?}, expected {AGENT_STATE_FORMAT:?}"
            )),
        }
    }
}

/// What the fleet last said about this PC, kept for a start without NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetState {
    format: String,
    /// The effective settings in force (when they came from the fleet).
    pub config: Option<collector_shared::EffectiveConfig>,
    /// Highest revision of the fleet's `agent_config` bucket applied to those settings.
    pub config_revision: u64,
    /// The modules assigned (when they came from the fleet): name → version.
    pub modules: Option<BTreeMap<String, u64>>,
    /// Highest revision of the fleet's `collector_config` bucket applied to those
    /// assignments.
    pub assignment_revision: u64,
    /// The last good value of each key the agent follows, by `<bucket>/<key>`: given
    /// back to the fleet watch at start, so that a value refused then leaves the one
    /// before it in force.
    #[serde(default)]
    pub last_good: BTreeMap<String, collector_fleet::watch::GoodValue>,
}

impl FleetState {
    /// A fleet state in the current file format.
    pub fn new(
        config: Option<collector_shared::EffectiveConfig>,
        config_revision: u64,
        modules: Option<BTreeMap<String, u64>>,
        assignment_revision: u64,
    ) -> Self {
        Self {
            format: FLEET_STATE_FORMAT.into(),
            config,
            config_revision,
            modules,
            assignment_revision,
            last_good: BTreeMap::new(),
        }
    }
}

/// The state directory: accepted versions (anti-rollback), the last-known-good bundle,
/// and the modules that were rolled back.
pub struct StateDir {
    dir: PathBuf,
    versions: VersionStore,
    state: AgentStateFile,
}

impl StateDir {
    /// Opens (or creates) a state directory.
    ///
    /// # Errors
    ///
    /// When it cannot be created, or a state file is unreadable or corrupt (never reset
    /// silently: that would lift anti-rollback).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the state directory {}: {e}", dir.display())
        })?;
        let versions = VersionStore::open(dir)?;
        let path = dir.join(AGENT_STATE_FILE);
        let state = match read_regular(&path, MAX_STATE_FILE_LEN, Links::Refuse) {
            Ok(bytes) => {
                let state = AgentStateFile::parse(&bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is corrupt ({e}); fix or remove it (removing forgets the last-known-good modules)",
                        path.display()
                    )
                })?;
                // Checked as when they came in a manifest, whoever edited the file since:
                // a last-known-good's name becomes a file name.
                if let Some((key, id)) = state
                    .last_known_good
                    .iter()
                    .find(|(key, id)| **key != id.name)
                {
                    anyhow::bail!(
                        "{} is corrupt (field `last_known_good.{key}` holds module name {:?}); fix or remove it (removing forgets the last-known-good modules)",
                        path.display(),
                        id.name
                    );
                }
                let lkg = state
                    .last_known_good
                    .values()
                    .map(|id| ("last_known_good.name".to_string(), id));
                let failed = state
                    .failed
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (format!("failed[{i}].name"), &f.id));
                let earlier = state.earlier_good.iter().flat_map(|(key, ids)| {
                    ids.iter()
                        .enumerate()
                        .map(move |(i, id)| (format!("earlier_good.{key}[{i}].name"), id))
                });
                if let Some((key, id)) = state.earlier_good.iter().find_map(|(key, ids)| {
                    ids.iter().find(|id| id.name != *key).map(|id| (key, id))
                }) {
                    anyhow::bail!(
                        "{} is corrupt (field `earlier_good.{key}` holds module name {:?}); fix or remove it (removing forgets the last-known-good modules)",
                        path.display(),
                        id.name
                    );
                }
                for (field, id) in lkg.chain(failed).chain(earlier) {
                    bundle::check_module_name(&id.name).map_err(|e| {
                        anyhow::anyhow!(
                            "{} is corrupt (field `{field}`: {e}); fix or remove it (removing forgets the last-known-good modules)",
                            path.display()
                        )
                    })?;
                }
                state
            }
            Err(e) if e.is_not_found() => AgentStateFile {
                format: AGENT_STATE_FORMAT.into(),
                ..Default::default()
            },
            Err(e) => anyhow::bail!("cannot read the agent state: {e}"),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            versions,
            state,
        })
    }

    /// Where the compile cache lives.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// The last-known-good version of module `name`, if any.
    pub fn last_known_good(&self, name: &str) -> Option<&ModuleId> {
        self.state.last_known_good.get(name)
    }

    /// The good versions of module `name`, newest first: the last-known-good, then the
    /// ones before it.
    pub fn good_versions(&self, name: &str) -> Vec<ModuleId> {
        self.state
            .last_known_good
            .get(name)
            .into_iter()
            .chain(self.state.earlier_good.get(name).into_iter().flatten())
            .cloned()
            .collect()
    }

    /// Every last-known-good module, by name.
    pub fn last_known_goods(&self) -> &BTreeMap<String, ModuleId> {
        &self.state.last_known_good
    }

    /// The fleet's last view of this PC, if one was saved.
    ///
    /// # Errors
    ///
    /// When the file exists but cannot be read or parsed.
    pub fn fleet_state(&self) -> anyhow::Result<Option<FleetState>> {
        let path = self.dir.join(FLEET_STATE_FILE);
        match read_regular(&path, MAX_STATE_FILE_LEN, Links::Refuse) {
            Ok(bytes) => {
                let state: FleetState = serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))?;
                anyhow::ensure!(
                    state.format == FLEET_STATE_FORMAT,
                    "{}: unknown format {:?}, expected {FLEET_STATE_FORMAT:?}",
                    path.display(),
                    state.format
                );
                // Module names become object and file names: checked like names from
                // the network.
                for name in state.modules.iter().flat_map(|m| m.keys()) {
                    bundle::check_module_name(name).map_err(|e| {
                        anyhow::anyhow!(
                            "{} is corrupt (field `modules.{name}`: {e})",
                            path.display()
                        )
                    })?;
                }
                Ok(Some(state))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => anyhow::bail!("{e}"),
        }
    }

    /// Saves the fleet's view of this PC.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn save_fleet_state(&self, state: &FleetState) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).expect("fleet state serializes");
        bytes.push(b'\n');
        write_atomic(&self.dir.join(FLEET_STATE_FILE), &bytes, None)
    }

    /// Whether this exact module (name, version and bytes) was rolled back, and why.
    pub fn failed(&self, id: &ModuleId) -> Option<&FailedModule> {
        self.state.failed.iter().find(|f| f.id == *id)
    }

    /// Where the last-known-good bundle of `id` lives. Names are checked when they come
    /// in, but whatever the name, the file stays in its directory: a character a module
    /// name cannot hold (a `/` above all) is replaced.
    fn lkg_path(&self, id: &ModuleId) -> PathBuf {
        let name: String = id
            .name
            .chars()
            .map(|c| {
                if bundle::is_module_name_char(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir
            .join(LKG_DIR)
            .join(format!("{name}-v{}.bundle", id.version))
    }

    fn save(&self) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        bytes.push(b'\n');
        write_atomic(&self.dir.join(AGENT_STATE_FILE), &bytes, None)
    }

    /// Makes `bundle` the last-known-good module of its name. The bundle is written under its own
    /// name before the state points to it, and the previous one is removed only after:
    /// a crash at any point leaves a state whose bundle exists.
    fn set_last_known_good(&mut self, id: &ModuleId, bundle: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.join(LKG_DIR))?;
        // What an earlier crash left goes first, so a crash during this save leaves at
        // most one file besides the current bundle, however many crashes came before.
        self.remove_unreferenced_bundles();
        write_atomic(&self.lkg_path(id), bundle, None)?;
        self.promote(id)?;
        self.remove_unreferenced_bundles();
        Ok(())
    }

    /// Removes the files of the last-known-good directory the state does not point to:
    /// the previous bundle, and what a crash left (a previous bundle the state no longer
    /// named, a bundle half-written under its temporary name). Only this agent writes
    /// there, under the state lock, so nothing else is being written meanwhile.
    fn remove_unreferenced_bundles(&self) {
        let keep: std::collections::HashSet<PathBuf> = self
            .state
            .last_known_good
            .values()
            .chain(self.state.earlier_good.values().flatten())
            .map(|id| self.lkg_path(id))
            .collect();
        let Ok(entries) = std::fs::read_dir(self.dir.join(LKG_DIR)) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if !keep.contains(&path) && entry.file_type().is_ok_and(|t| !t.is_dir()) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// The roots saved in [`TRUST_DIR`], by version, as their bytes (unreadable files are
    /// logged and skipped).
    fn saved_roots(&self) -> BTreeMap<u64, Vec<u8>> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(self.dir.join(TRUST_DIR)) else {
            return out;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.strip_suffix(".root"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            match read_regular(&entry.path(), MAX_ROOT_LEN as u64, Links::Refuse) {
                Ok(bytes) => {
                    out.insert(version, bytes);
                }
                Err(e) => tracing::error!("cannot read a saved trust root: {e}"),
            }
        }
        out
    }

    fn save_root(&self, root: &SignedRoot) -> std::io::Result<()> {
        let dir = self.dir.join(TRUST_DIR);
        std::fs::create_dir_all(&dir)?;
        write_atomic(
            &dir.join(format!("v{}.root", root.doc().version)),
            &root.to_bytes(),
            None,
        )
    }

    /// Makes `id` the last-known-good of its module (a new one, or one of its earlier
    /// good versions again); the one it replaces becomes the newest earlier version.
    fn promote(&mut self, id: &ModuleId) -> std::io::Result<()> {
        let earlier = self.state.earlier_good.entry(id.name.clone()).or_default();
        earlier.retain(|e| e != id);
        if let Some(previous) = self
            .state
            .last_known_good
            .insert(id.name.clone(), id.clone())
            && previous != *id
        {
            earlier.insert(0, previous);
        }
        earlier.truncate(EARLIER_GOOD);
        if earlier.is_empty() {
            self.state.earlier_good.remove(&id.name);
        }
        self.save()
    }

    fn record_failure(&mut self, id: &ModuleId, reason: &str) -> std::io::Result<()> {
        if self.failed(id).is_none() {
            self.state.failed.push(FailedModule {
                id: id.clone(),
                reason: reason.to_string(),
                at: Utc::now(),
            });
        }
        self.save()
    }
}

/// Loads and checks modules for one agent.
pub struct Deployer {
    sandbox: Arc<Sandbox>,
    policy: Policy,
    state: Option<Arc<Mutex<StateDir>>>,
    /// The trust root held now: the installed one, or one followed since.
    trust: RwLock<Option<TrustRoot>>,
    /// Its version, for the fleet's root follower (which asks for the next one).
    trust_version: Arc<AtomicU64>,
}

/// What came of roots offered to the agent ([`Deployer::offer_roots`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RootOutcome {
    /// The versions held before and after, when a newer root was taken.
    pub adopted: Option<(u64, u64)>,
    /// Why a root was not taken, when one was refused: its version (when it could be
    /// read) and the reason.
    pub refused: Option<(Option<u64>, String)>,
}

impl Deployer {
    /// A deployer compiling with `sandbox`, accepting what `policy` allows, and keeping
    /// anti-rollback and last-known-good in `state` (without one, neither is kept).
    pub fn new(sandbox: Arc<Sandbox>, policy: Policy, state: Option<StateDir>) -> Arc<Self> {
        let mut held = policy.trust.clone();
        // The chain followed before: each saved root must follow the one before it,
        // from the installed root (a file planted there counts for nothing).
        if let (Some(root), Some(state)) = (held.as_mut(), state.as_ref()) {
            for (version, bytes) in state.saved_roots() {
                if version <= root.version() {
                    continue;
                }
                let followed = SignedRoot::parse(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|next| root.follow(&next).map_err(|e| e.to_string()));
                match followed {
                    Ok(next) => *root = next,
                    Err(e) => {
                        tracing::error!(
                            version,
                            held = root.version(),
                            "the saved trust root {TRUST_DIR}/v{version}.root does not follow the chain ({e}); staying at version {}",
                            root.version()
                        );
                        break;
                    }
                }
            }
            if let Some(installed) = &policy.trust
                && root.version() > installed.version()
            {
                tracing::info!(
                    installed = installed.version(),
                    held = root.version(),
                    "trust root followed since installation"
                );
            }
        }
        let version = held.as_ref().map_or(0, TrustRoot::version);
        Arc::new(Self {
            sandbox,
            policy,
            state: state.map(|s| Arc::new(Mutex::new(s))),
            trust: RwLock::new(held),
            trust_version: Arc::new(AtomicU64::new(version)),
        })
    }

    /// The trust root held now, when there is one.
    pub fn trust_root(&self) -> Option<TrustRoot> {
        self.trust.read().expect("trust lock").clone()
    }

    /// The version of the root held (0 for `--trust` keys or none), kept current.
    pub fn trust_version(&self) -> Arc<AtomicU64> {
        self.trust_version.clone()
    }

    fn trust_store(&self) -> Option<TrustStore> {
        self.trust
            .read()
            .expect("trust lock")
            .as_ref()
            .map(|r| r.store().clone())
    }

    /// Takes the newest root that `roots` (root files, from `source`) lead to from the
    /// root held: each must be the next version, signed as [`TrustRoot::follow`]
    /// requires, and the last taken must not have expired. A root of a version already
    /// passed is ignored when it is the one followed then, and refused when it differs.
    /// Taken roots are saved in the state directory.
    pub fn offer_roots(&self, source: &str, roots: &[Vec<u8>]) -> RootOutcome {
        let mut outcome = RootOutcome::default();
        let Some(held) = self.trust_root() else {
            outcome.refused = Some((
                None,
                format!(
                    "{source}: a trust root, but this agent was given no --trust-root or --trust to follow it from"
                ),
            ));
            return outcome;
        };
        let mut parsed = Vec::new();
        for bytes in roots {
            match SignedRoot::parse(bytes) {
                Ok(root) => parsed.push(root),
                Err(e) => outcome.refused = Some((None, format!("{source}: {e}"))),
            }
        }
        parsed.sort_by_key(|r| r.doc().version);
        parsed.dedup_by(|a, b| a.digest() == b.digest());
        let saved = self.state().map(|s| s.saved_roots()).unwrap_or_default();
        let mut chain = Vec::new();
        for root in parsed {
            let version = root.doc().version;
            if version <= held.version() {
                let same = if version == held.version() {
                    held.signed().map(SignedRoot::digest)
                } else {
                    saved
                        .get(&version)
                        .and_then(|b| SignedRoot::parse(b).ok())
                        .map(|r| r.digest())
                };
                if same.as_deref() != Some(root.digest().as_str()) {
                    outcome.refused = Some((
                        Some(version),
                        format!(
                            "{source}: {}",
                            bundle::RootRefusal::NotNext {
                                held: held.version(),
                                offered: version
                            }
                        ),
                    ));
                }
                continue;
            }
            chain.push(root);
        }
        // The longest run that follows, then the longest of it whose last root is valid.
        let now = Utc::now();
        let mut step = held.clone();
        let mut followed: Vec<(TrustRoot, &SignedRoot)> = Vec::new();
        for root in &chain {
            match step.follow(root) {
                Ok(next) => {
                    followed.push((next.clone(), root));
                    step = next;
                }
                Err(e) => {
                    outcome.refused = Some((Some(root.doc().version), format!("{source}: {e}")));
                    break;
                }
            }
        }
        let Some(last_valid) = followed
            .iter()
            .rposition(|(r, _)| r.expires_at().is_none_or(|at| at > now))
        else {
            if let Some((root, _)) = followed.last() {
                let expired = bundle::RootRefusal::Expired {
                    version: root.version(),
                    expires_at: root.expires_at().unwrap_or(now),
                    now,
                };
                outcome.refused = Some((Some(root.version()), format!("{source}: {expired}")));
            }
            return outcome;
        };
        if let Some(state) = self.state() {
            for (_, signed) in &followed[..=last_valid] {
                if let Err(e) = state.save_root(signed) {
                    outcome.refused = Some((
                        Some(signed.doc().version),
                        format!("cannot save the trust root in the state directory: {e}"),
                    ));
                    return outcome;
                }
            }
        }
        let to = followed[last_valid].0.clone();
        outcome.adopted = Some((held.version(), to.version()));
        self.trust_version.store(to.version(), Ordering::Relaxed);
        *self.trust.write().expect("trust lock") = Some(to);
        outcome
    }

    /// Whether a bundle that already runs here is still vouched for by the root held now
    /// (its signers not revoked or removed, within their scopes). Neither the root's nor
    /// the bundle's expiry is judged: a running module goes on past them.
    ///
    /// # Errors
    ///
    /// Why it is no longer vouched for.
    pub fn still_trusted(&self, bytes: &[u8]) -> Result<(), String> {
        let Some(trust) = self.trust_store() else {
            return Ok(());
        };
        // The earliest instant there is: no expiry is ever reached.
        bundle::verify(
            "",
            bytes,
            &trust.ignoring_expiry(),
            DateTime::<Utc>::MIN_UTC,
            None,
        )
        .map(|_| ())
        .map_err(|e| e.refusal.to_string())
    }

    /// Loads a bundle or (when allowed) an unsigned component from `path`.
    ///
    /// # Errors
    ///
    /// [`Refused`] with the reason; nothing is recorded.
    pub fn load_file(&self, path: &Path) -> Result<Accepted, Refused> {
        let bytes = bundle::read_bounded(path, MAX_BUNDLE_LEN).map_err(|e| Refused {
            subject: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let file_stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.load_bytes(&path.display().to_string(), &file_stem, bytes, true)
    }

    fn load_bytes(
        &self,
        subject: &str,
        unsigned_name: &str,
        bytes: Vec<u8>,
        anti_rollback: bool,
    ) -> Result<Accepted, Refused> {
        if bytes.starts_with(MAGIC) {
            self.load_bundle(subject, bytes, anti_rollback)
        } else {
            self.load_unsigned(subject, unsigned_name, &bytes)
        }
    }

    fn load_bundle(
        &self,
        subject: &str,
        bytes: Vec<u8>,
        anti_rollback: bool,
    ) -> Result<Accepted, Refused> {
        let refuse = |reason: String| Refused {
            subject: describe(subject, &bytes),
            reason,
        };
        let Some(trust) = self.trust_store() else {
            return Err(refuse(
                "a signed bundle, but no --trust key was given to check it against".into(),
            ));
        };
        // A module that already ran here goes on under an expired root.
        let trust = if anti_rollback {
            trust
        } else {
            trust.ignoring_expiry()
        };
        let state = self.state.as_ref().map(|s| s.lock().expect("state lock"));
        let versions = state
            .as_ref()
            .filter(|_| anti_rollback)
            .map(|s| &s.versions);
        let verified = bundle::verify(subject, &bytes, &trust, Utc::now(), versions)
            .map_err(|e| refuse(e.refusal.to_string()))?;
        let manifest = verified.manifest;
        let id = ModuleId {
            name: manifest.name.clone(),
            version: manifest.version,
            sha256: manifest.sha256.clone(),
        };
        if let Some(failed) = state.as_ref().and_then(|s| s.failed(&id)) {
            return Err(refuse(format!(
                "this version was rolled back on {} ({}); publish a new version",
                failed.at.format("%Y-%m-%d %H:%M:%S UTC"),
                failed.reason
            )));
        }
        drop(state);
        let grant = manifest
            .grant(&self.policy.pc_id)
            .map_err(|e| refuse(format!("manifest grant: {e}")))?;
        let module = GuestModule::from_bytes(&self.sandbox, &manifest.name, &verified.component)
            .map_err(|e| refuse(e.to_string()))?;
        // The signers vouched for a component of this API version: another one would run
        // against host functions they did not review it with.
        let declared = manifest.wit.rsplit('@').next().unwrap_or_default();
        if declared != module.api_version() {
            return Err(refuse(format!(
                "manifest field `wit` says {}, but the component exports the guest interface \
                 of {}@{}",
                manifest.wit,
                collector_bundle::wit::WIT_PACKAGE,
                module.api_version()
            )));
        }
        let ceilings = &self.policy.ceilings;
        let limits = Limits {
            memory_bytes: manifest
                .limits
                .memory_mib
                .map_or(ceilings.memory_bytes, |m| {
                    usize::try_from(m.saturating_mul(1 << 20))
                        .unwrap_or(usize::MAX)
                        .min(ceilings.memory_bytes)
                }),
            call_budget: manifest
                .limits
                .call_timeout()
                .map_or(ceilings.call_budget, |t| t.min(ceilings.call_budget)),
            ..ceilings.clone()
        };
        Ok(Accepted {
            id,
            module: Arc::new(module),
            grant,
            limits,
            manifest: Some(manifest),
            bundle: Some(bytes),
        })
    }

    fn load_unsigned(&self, subject: &str, name: &str, bytes: &[u8]) -> Result<Accepted, Refused> {
        let refuse = |reason: String| Refused {
            subject: subject.to_string(),
            reason,
        };
        if !self.policy.allow_unsigned {
            return Err(refuse(
                "not a signed bundle; sign it with `collector module sign`, or run it for \
                 development with --insecure-allow-unsigned"
                    .into(),
            ));
        }
        tracing::warn!(
            file = subject,
            "RUNNING AN UNSIGNED MODULE (--insecure-allow-unsigned): nobody vouched for this code; never use this flag in production"
        );
        let module = GuestModule::from_bytes(&self.sandbox, name, bytes)
            .map_err(|e| refuse(e.to_string()))?;
        let grant = Grant::new(&self.policy.unsigned_grants, &self.policy.pc_id)
            .map_err(|e| refuse(format!("--grant: {e}")))?;
        Ok(Accepted {
            id: ModuleId {
                name: name.to_string(),
                version: 0,
                sha256: bundle::sha256_hex(bytes),
            },
            module: Arc::new(module),
            grant,
            limits: self.policy.ceilings.clone(),
            manifest: None,
            bundle: None,
        })
    }

    /// Loads the last-known-good bundle of the state directory. Its signature is checked
    /// again (the trust store may have changed); anti-rollback is not, since it is older
    /// than a module that was rolled back, by design.
    ///
    /// # Errors
    ///
    /// When there is none, or it no longer passes the checks.
    pub fn load_last_known_good(&self, name: Option<&str>) -> Result<Option<Accepted>, Refused> {
        let Some(state) = &self.state else {
            return Ok(None);
        };
        let candidates: Vec<(PathBuf, ModuleId)> = {
            let s = state.lock().expect("state lock");
            let all = s.last_known_goods();
            let name = match name {
                Some(name) => name.to_string(),
                None if all.len() > 1 => {
                    return Err(Refused {
                        subject: s.dir.join(AGENT_STATE_FILE).display().to_string(),
                        reason: format!(
                            "there is a last-known-good module for each of {}; pass --module NAME",
                            all.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
                None => match all.keys().next() {
                    Some(name) => name.clone(),
                    None => return Ok(None),
                },
            };
            s.good_versions(&name)
                .into_iter()
                .map(|id| (s.lkg_path(&id), id))
                .collect()
        };
        let mut first_refusal = None;
        for (path, expected) in candidates {
            match self.load_good(&path, &expected) {
                Ok(accepted) => {
                    if let Some(newer) = &first_refusal {
                        tracing::warn!(module = %accepted.id, "a newer last-known-good no longer passes the checks ({newer}); using this earlier one");
                        if let Err(e) = state.lock().expect("state lock").promote(&accepted.id) {
                            tracing::error!(module = %accepted.id, error = %e, "cannot save it as the last-known-good");
                        }
                    }
                    return Ok(Some(accepted));
                }
                Err(e) => {
                    tracing::warn!("a last-known-good module cannot be used: {e}");
                    first_refusal.get_or_insert(e);
                }
            }
        }
        first_refusal.map_or(Ok(None), Err)
    }

    fn load_good(&self, path: &Path, expected: &ModuleId) -> Result<Accepted, Refused> {
        // Written by the agent in its state directory: a link there was planted.
        let bytes = read_regular(path, MAX_BUNDLE_LEN, Links::Refuse).map_err(|e| Refused {
            subject: path.display().to_string(),
            reason: e.problem.to_string(),
        })?;
        let accepted = self.load_bytes(&path.display().to_string(), "", bytes, false)?;
        if accepted.id != *expected {
            return Err(Refused {
                subject: path.display().to_string(),
                reason: format!("holds {} but the state records {expected}", accepted.id),
            });
        }
        Ok(accepted)
    }

    /// Checks a bundle that came from the network (`subject` names where): only signed
    /// bundles, whatever `--insecure-allow-unsigned` says, with anti-rollback.
    ///
    /// # Errors
    ///
    /// [`Refused`] with the reason; nothing is recorded.
    pub fn load_remote_bundle(&self, subject: &str, bytes: Vec<u8>) -> Result<Accepted, Refused> {
        if !bytes.starts_with(MAGIC) {
            return Err(Refused {
                subject: subject.to_string(),
                reason: "not a signed bundle; modules from the fleet must be signed".into(),
            });
        }
        self.load_bundle(subject, bytes, true)
    }

    /// The state directory, when there is one.
    pub fn state(&self) -> Option<std::sync::MutexGuard<'_, StateDir>> {
        self.state.as_ref().map(|s| s.lock().expect("state lock"))
    }

    /// Records that `accepted` is about to run: its version becomes the lowest this agent
    /// will take for its name (anti-rollback).
    ///
    /// # Errors
    ///
    /// When the state directory cannot be written.
    pub fn record_accepted(&self, accepted: &Accepted) -> std::io::Result<()> {
        if let (Some(state), Some(manifest)) = (&self.state, &accepted.manifest) {
            state
                .lock()
                .expect("state lock")
                .versions
                .record(manifest)?;
        }
        Ok(())
    }

    /// Hook that makes `accepted` the last-known-good once it is healthy.
    pub fn healthy_hook(self: &Arc<Self>, accepted: &Accepted) -> Option<HealthyHook> {
        let state = self.state.clone()?;
        let bundle = accepted.bundle.clone()?;
        let id = accepted.id.clone();
        Some(Box::new(move || {
            match state
                .lock()
                .expect("state lock")
                .set_last_known_good(&id, &bundle)
            {
                Ok(()) => tracing::info!(module = %id, "saved as the last-known-good module"),
                Err(e) => {
                    tracing::error!(module = %id, error = %e, "cannot save the last-known-good module")
                }
            }
        }))
    }

    /// Hook that records a rolled-back module so it is never tried again.
    pub fn rollback_hook(self: &Arc<Self>, accepted: &Accepted) -> Option<RollbackHook> {
        let state = self.state.clone()?;
        let id = accepted.id.clone();
        Some(Box::new(move |reason: &str| {
            if let Err(e) = state
                .lock()
                .expect("state lock")
                .record_failure(&id, reason)
            {
                tracing::error!(module = %id, error = %e, "cannot record the rollback");
            }
        }))
    }

    /// Turns an accepted module into what the agent swaps in, with its hooks.
    pub fn spec(self: &Arc<Self>, accepted: Accepted) -> ModuleSpec {
        ModuleSpec {
            on_healthy: self.healthy_hook(&accepted),
            on_rolled_back: self.rollback_hook(&accepted),
            label: accepted.id.to_string(),
            module: accepted.module,
            grant: accepted.grant,
            limits: accepted.limits,
        }
    }

    /// The newest acceptable bundle among `files` for `name` (any name when `None`),
    /// newer than `above`. Refusals are logged with the file, module and version.
    pub fn best_of(
        &self,
        files: &[PathBuf],
        name: Option<&str>,
        above: Option<&ModuleId>,
    ) -> Option<Accepted> {
        let mut best: Option<Accepted> = None;
        for path in files {
            if is_root_file(path) {
                continue;
            }
            if !starts_with_magic(path) {
                tracing::warn!(file = %path.display(), "not a signed bundle; a modules directory takes bundles only (see `collector module sign`)");
                continue;
            }
            match self.load_file(path) {
                Ok(a) if name.is_some_and(|n| n != a.id.name) => {
                    tracing::info!(file = %path.display(), module = %a.id, "bundle for another module; ignored");
                }
                Ok(a) if above.is_some_and(|cur| a.id.version <= cur.version) => {}
                Ok(a) if best.as_ref().is_none_or(|b| a.id.version > b.id.version) => {
                    best = Some(a)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("module refused: {e}"),
            }
        }
        best
    }
}

/// Whether the file begins like a bundle (reads 8 bytes only). The name may have turned
/// into a FIFO or a device since it was listed: the open never blocks, and only a regular
/// file counts.
/// Whether `path` names a trust root file (`*.root`), which a modules directory may hold
/// besides bundles.
pub fn is_root_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == ROOT_EXTENSION)
}

/// Offers the trust root files among `files` to `deployer`; returns what came of it,
/// with the files' names as the source. Unreadable files are logged and skipped.
pub fn offer_root_files(deployer: &Deployer, files: &[PathBuf]) -> Option<RootOutcome> {
    let roots: Vec<&PathBuf> = files.iter().filter(|p| is_root_file(p)).collect();
    if roots.is_empty() {
        return None;
    }
    let mut bytes = Vec::new();
    for path in &roots {
        match bundle::read_bounded(path, MAX_ROOT_LEN as u64) {
            Ok(b) => bytes.push(b),
            Err(e) => tracing::warn!(file = %path.display(), "cannot read a trust root file: {e}"),
        }
    }
    let source = match roots.as_slice() {
        [one] => one.display().to_string(),
        _ => format!(
            "{} trust root files in {}",
            roots.len(),
            roots[0].parent().unwrap_or(Path::new(".")).display()
        ),
    };
    Some(deployer.offer_roots(&source, &bytes))
}

fn starts_with_magic(path: &Path) -> bool {
    use std::io::Read as _;
    let mut head = [0u8; 8];
    open_regular(path, Links::Follow)
        .is_ok_and(|mut f| f.read_exact(&mut head).is_ok_and(|()| head == *MAGIC))
}

/// Names a bundle by its manifest when it can be read, for log lines.
fn describe(subject: &str, bytes: &[u8]) -> String {
    bundle::Bundle::parse(bytes)
        .ok()
        .and_then(|b| Manifest::parse(b.manifest).ok())
        .map_or_else(
            || subject.to_string(),
            |m| format!("{subject} ({} v{})", m.name, m.version),
        )
}

/// Regular files of `dir`, in name order.
pub fn bundle_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file() && !is_hidden(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Files being written by hand are often dot-files or editor temporaries.
fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.') || n.ends_with('~') || n.ends_with(".tmp"))
}

/// Where the `--modules` watcher hands accepted modules: the reconciler.
pub trait ModuleTarget: Send + 'static {
    /// Takes a module that passed every check and was recorded as accepted.
    fn offer(&self, accepted: Accepted);
    /// Trust roots were taken, or refused, from the directory: the running modules must
    /// be judged again under the root held now.
    fn roots_offered(&self, outcome: RootOutcome);
    /// Whether offers are still wanted (the watcher stops when this turns false).
    fn is_running(&self) -> bool;
}

/// Watches `dir` every `poll` for a newer bundle of the running module and offers it to
/// `agent`. Verification and compilation happen on this thread, never on the tick path.
/// Stops when the target is gone.
pub fn watch(
    deployer: Arc<Deployer>,
    dir: PathBuf,
    running: ModuleId,
    agent: impl ModuleTarget,
    poll: Duration,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("modules-watch".into())
        .spawn(move || {
            let mut current = running;
            // Files already looked at, by size and modification time: a refused bundle
            // is reported once, not at every poll.
            let mut seen: HashMap<PathBuf, (u64, Option<SystemTime>)> = HashMap::new();
            loop {
                if !agent.is_running() {
                    return;
                }
                // Rebuilt at every poll, so deleted files are forgotten.
                let mut now_seen = HashMap::new();
                let mut changed = Vec::new();
                for path in bundle_files(&dir) {
                    let stamp = std::fs::metadata(&path)
                        .map(|m| (m.len(), m.modified().ok()))
                        .unwrap_or_default();
                    if seen.get(&path) != Some(&stamp) {
                        changed.push(path.clone());
                    }
                    now_seen.insert(path, stamp);
                }
                seen = now_seen;
                // Roots first: a bundle in the same batch is judged under the newest.
                if let Some(outcome) = offer_root_files(&deployer, &changed) {
                    agent.roots_offered(outcome);
                }
                if let Some(next) = deployer.best_of(&changed, Some(&current.name), Some(&current)) {
                    match deployer.record_accepted(&next) {
                        Ok(()) => {
                            current = next.id.clone();
                            agent.offer(next);
                        }
                        Err(e) => {
                            tracing::error!(module = %next.id, error = %e, "cannot record the accepted version; not swapping (retrying at the next poll)");
                            seen.clear();
                        }
                    }
                }
                std::thread::sleep(poll);
            }
        })
        .expect("spawn the modules watcher thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(version: u64, sha: &str) -> ModuleId {
        ModuleId {
            name: "process-perf".into(),
            version,
            sha256: sha.into(),
        }
    }

    #[test]
    fn a_rolled_back_version_does_not_taint_other_versions_of_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateDir::open(dir.path()).unwrap();
        state.set_last_known_good(&id(2, "aa"), b"v2").unwrap();
        // v3 re-signs the same component (other limits) and is rolled back.
        state
            .record_failure(&id(3, "aa"), "failed to start")
            .unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.failed(&id(3, "aa")).is_some());
        assert!(
            state.failed(&id(2, "aa")).is_none(),
            "the last-known-good stays usable"
        );
        assert_eq!(state.last_known_good("process-perf"), Some(&id(2, "aa")));
    }

    #[test]
    fn the_last_known_good_file_is_replaced_only_after_the_state_points_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateDir::open(dir.path()).unwrap();
        state.set_last_known_good(&id(1, "aa"), b"one").unwrap();
        state.set_last_known_good(&id(2, "bb"), b"two").unwrap();
        let lkg = dir.path().join(LKG_DIR);
        let mut files: Vec<_> = std::fs::read_dir(&lkg)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        // v1 stays as the earlier good version, in case v2's signer is revoked.
        assert_eq!(files, ["process-perf-v1.bundle", "process-perf-v2.bundle"]);
        assert_eq!(
            std::fs::read(lkg.join("process-perf-v2.bundle")).unwrap(),
            b"two"
        );
        assert_eq!(
            state.good_versions("process-perf"),
            [id(2, "bb"), id(1, "aa")]
        );
    }

    #[test]
    fn earlier_good_versions_are_kept_newest_first_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateDir::open(dir.path()).unwrap();
        for v in 1..=6 {
            state
                .set_last_known_good(&id(v, &format!("{v:02}")), b"x")
                .unwrap();
        }
        let state = StateDir::open(dir.path()).unwrap();
        let versions: Vec<u64> = state
            .good_versions("process-perf")
            .iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(versions, [6, 5, 4, 3]);
        let mut files: Vec<_> = std::fs::read_dir(dir.path().join(LKG_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files.len(), 4, "{files:?}");
        // An earlier one made current again keeps the newer ones after it.
        let mut state = state;
        state.promote(&id(4, "04")).unwrap();
        let versions: Vec<u64> = state
            .good_versions("process-perf")
            .iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(versions, [4, 6, 5, 3]);
    }

    #[test]
    fn bundles_a_crash_left_behind_are_removed_at_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateDir::open(dir.path()).unwrap();
        state.set_last_known_good(&id(2, "bb"), b"two").unwrap();
        let lkg = dir.path().join(LKG_DIR);
        // Killed after the state pointed to v2 but before v1 was removed, and later while
        // v3 was being written.
        std::fs::write(lkg.join("process-perf-v1.bundle"), b"one").unwrap();
        std::fs::write(lkg.join(".process-perf-v3.bundle.tmp"), b"thr").unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.last_known_good("process-perf"), Some(&id(2, "bb")));
        let mut state = state;
        state.set_last_known_good(&id(4, "dd"), b"four").unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&lkg)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["process-perf-v2.bundle", "process-perf-v4.bundle"]);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(AGENT_STATE_FILE), "{not json").unwrap();
        let err = StateDir::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains(AGENT_STATE_FILE) && err.contains("corrupt"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_state_file_or_bundle_that_blocks_or_never_ends_is_an_error_at_once() {
        use collector_fsutil::hostile;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AGENT_STATE_FILE);
        hostile::each(&path, |what| {
            let state = dir.path().to_path_buf();
            let err = hostile::promptly(what, move || StateDir::open(&state).err())
                .unwrap_or_else(|| panic!("{what} accepted as {AGENT_STATE_FILE}"));
            assert!(err.to_string().contains(AGENT_STATE_FILE), "{what}: {err}");
        });
        let bundle = dir.path().join("v1.bundle");
        hostile::each(&bundle, |what| {
            let p = bundle.clone();
            assert!(
                !hostile::promptly(what, move || starts_with_magic(&p)),
                "{what}"
            );
            let p = bundle.clone();
            let read = hostile::promptly(what, move || bundle::read_bounded(&p, MAX_BUNDLE_LEN));
            assert!(read.is_err(), "{what}");
        });
    }

    #[test]
    fn module_names_read_back_from_the_state_file_are_checked_like_manifest_names() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(state.join(LKG_DIR)).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let victim = outside.join("victim-v1.bundle");
        let absolute = outside.join("victim").display().to_string();
        let module = |name: &str| serde_json::json!({"name": name, "version": 1, "sha256": "aa"});
        let cases = [
            (
                serde_json::json!({"format": AGENT_STATE_FORMAT_V1, "last_known_good": module("../../outside/victim")}),
                "last_known_good.name",
            ),
            (
                serde_json::json!({"format": AGENT_STATE_FORMAT_V1, "last_known_good": module(&absolute)}),
                "last_known_good.name",
            ),
            (
                serde_json::json!({"format": AGENT_STATE_FORMAT, "last_known_good": {"victim": module("../../outside/victim")}}),
                "last_known_good.victim",
            ),
            (
                serde_json::json!({
                    "format": AGENT_STATE_FORMAT,
                    "last_known_good": {"process-perf": module("process-perf")},
                    "failed": [
                        {"name": "process-perf", "version": 2, "sha256": "bb", "reason": "trap", "at": "2025-01-01T00:00:00Z"},
                        {"name": "../x", "version": 3, "sha256": "cc", "reason": "trap", "at": "2025-01-01T00:00:00Z"},
                    ],
                }),
                "failed[1].name",
            ),
        ];
        for (file, field) in cases {
            std::fs::write(&victim, b"not the agent's").unwrap();
            std::fs::write(state.join(AGENT_STATE_FILE), file.to_string()).unwrap();
            // What the agent does next with a state it accepted: a new last-known-good
            // replaces the recorded one, whose file is removed.
            let result =
                StateDir::open(&state).map(|mut s| s.set_last_known_good(&id(2, "bb"), b"two"));
            assert!(
                victim.exists(),
                "{field}: a file outside the state directory was removed"
            );
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{file} accepted"))
                .to_string();
            assert!(
                err.contains(AGENT_STATE_FILE)
                    && err.contains(field)
                    && err.contains("module name"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_last_known_good_path_stays_in_its_directory_whatever_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        for name in ["../../x", "/tmp/abs", "a/b", "..", ""] {
            let path = state.lkg_path(&ModuleId {
                name: name.into(),
                version: 1,
                sha256: "aa".into(),
            });
            assert_eq!(
                path.parent(),
                Some(dir.path().join(LKG_DIR).as_path()),
                "{name:?}: {}",
                path.display()
            );
            assert!(
                path.file_name().is_some_and(|f| f != ".." && f != "."),
                "{name:?}: {}",
                path.display()
            );
        }
    }
}
