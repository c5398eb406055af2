//! Anti-rollback: the highest version of each module an agent has accepted, and the
//! lowest its signers let it go back to (the manifest's `rollback_floor`), kept on disk
//! so that an old (perhaps vulnerable) but validly signed bundle cannot be replayed, not
//! even after a restart. A version, once accepted, is pinned to its bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use collector_fsutil::{Links, MAX_STATE_FILE_LEN, read_regular};

/// The store's file name inside the state directory.
pub const VERSIONS_FILE: &str = "bundle-versions.json";

/// The `format` of the store file.
const STORE_FORMAT: &str = "collector-versions/1";

/// The highest version of a module accepted, the hashes of its component and manifest,
/// and how far back the agent may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedVersion {
    /// The highest version of the module accepted.
    pub version: u64,
    /// Lowercase hex SHA-256 of that version's component.
    pub sha256: String,
    /// SHA-256 of the manifest's canonical JSON: the same version may not come back with
    /// other grants, limits or expiry either. Absent in stores written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// The lowest version still acceptable: the highest `rollback_floor` of the
    /// manifests accepted. Absent: `version` (no going back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u64>,
    /// Versions between the floor and `version` accepted before, pinned to their hashes
    /// so that going back to one never brings other bytes under its number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub earlier: BTreeMap<u64, Pinned>,
}

/// What a version was accepted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    /// Lowercase hex SHA-256 of the component.
    pub sha256: String,
    /// Lowercase hex SHA-256 of the manifest's canonical JSON.
    pub manifest_sha256: String,
}

/// Most earlier versions kept pinned per module (the lowest are forgotten first, and
/// the floor rises with them).
const MAX_EARLIER: usize = 32;

impl AcceptedVersion {
    /// The lowest version acceptable now.
    pub fn floor(&self) -> u64 {
        self.floor.unwrap_or(self.version).min(self.version)
    }
}

/// The hash that pins what a manifest says (its canonical JSON).
fn manifest_digest(manifest: &Manifest) -> String {
    super::sha256_hex(&manifest.to_json())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    format: String,
    modules: BTreeMap<String, AcceptedVersion>,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read: unreadable, not a regular file (a symbolic
    /// link included), or over [`collector_fsutil::MAX_STATE_FILE_LEN`].
    #[error("cannot read the version store {path}: {reason}")]
    Read {
        /// The store file's path.
        path: String,
        /// Why it cannot be read, for people.
        reason: String,
    },
    /// The file was read but is not a valid store: not its JSON shape, another `format`,
    /// or an invalid module name. It is left as it is for the operator to deal with.
    #[error(
        "the version store {path} is corrupt ({reason}); it is never reset automatically, \
         since that would make older bundles acceptable again: restore it, or remove it \
         knowingly"
    )]
    Corrupt {
        /// The store file's path.
        path: String,
        /// What is wrong with it, for people.
        reason: String,
    },
}

/// A bundle that would take a module back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    /// The version is below the lowest one the module may go back to.
    #[error(
        "module `{name}` version {offered} is older than version {accepted}, which this \
         agent has already accepted, and its signers allow going back only to version \
         {floor} (anti-rollback)"
    )]
    Older {
        /// The module's name.
        name: String,
        /// The version the bundle carries.
        offered: u64,
        /// The highest version accepted so far.
        accepted: u64,
        /// The lowest version still acceptable.
        floor: u64,
    },
    /// The version was accepted before with a different component.
    #[error(
        "module `{name}` version {version} was already accepted with a different component \
         (sha256 {accepted_sha256}, this one has {offered_sha256}); a changed component \
         needs a higher version"
    )]
    SameVersionOtherBytes {
        /// The module's name.
        name: String,
        /// The version, both accepted and offered.
        version: u64,
        /// The bundle's component SHA-256, lowercase hex.
        offered_sha256: String,
        /// The SHA-256 that version was accepted with, lowercase hex.
        accepted_sha256: String,
    },
    /// The version was accepted before with the same component but a manifest that
    /// differs elsewhere (grants, limits, expiry...).
    #[error(
        "module `{name}` version {version} was already accepted with a different manifest \
         (other grants, limits or expiry); a changed manifest needs a higher version"
    )]
    SameVersionOtherManifest {
        /// The module's name.
        name: String,
        /// The version, both accepted and offered.
        version: u64,
    },
}

/// The highest accepted version per module name, persisted in a state directory.
///
/// One agent owns a state directory: the store is not locked against other writers.
#[derive(Debug)]
pub struct VersionStore {
    dir: PathBuf,
    path: PathBuf,
    accepted: BTreeMap<String, AcceptedVersion>,
}

impl VersionStore {
    /// Opens the store in `state_dir`. A missing file (or directory) is an empty store;
    /// the directory is created on the first [`VersionStore::record`].
    ///
    /// # Errors
    ///
    /// When the file exists but cannot be read, or does not hold a valid store.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(VERSIONS_FILE);
        let shown = path.display().to_string();
        // The agent writes this file itself: a link in its place was planted.
        let accepted = match read_regular(&path, MAX_STATE_FILE_LEN, Links::Refuse) {
            Ok(bytes) => parse(&bytes).map_err(|reason| StoreError::Corrupt {
                path: shown,
                reason,
            })?,
            Err(e) if e.is_not_found() => BTreeMap::new(),
            Err(e) => {
                return Err(StoreError::Read {
                    path: shown,
                    reason: e.problem.to_string(),
                });
            }
        };
        Ok(Self {
            dir: state_dir.to_path_buf(),
            path,
            accepted,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version of `name` last recorded, if any.
    pub fn accepted(&self, name: &str) -> Option<&AcceptedVersion> {
        self.accepted.get(name)
    }

    /// Whether `manifest` may be accepted: a higher version than the one recorded for its
    /// name, or the same version with the same component (the same bundle loaded again,
    /// for instance after a restart).
    ///
    /// # Errors
    ///
    /// When the version is lower, or equal with a different component hash.
    pub fn check(&self, manifest: &Manifest) -> Result<(), RollbackError> {
        let Some(accepted) = self.accepted.get(&manifest.name) else {
            return Ok(());
        };
        if manifest.version < accepted.floor() {
            return Err(RollbackError::Older {
                name: manifest.name.clone(),
                offered: manifest.version,
                accepted: accepted.version,
                floor: accepted.floor(),
            });
        }
        // What this version was accepted with before, if it was.
        let pinned = if manifest.version == accepted.version {
            Some((
                accepted.sha256.as_str(),
                accepted.manifest_sha256.as_deref(),
            ))
        } else {
            accepted
                .earlier
                .get(&manifest.version)
                .map(|p| (p.sha256.as_str(), Some(p.manifest_sha256.as_str())))
        };
        let Some((sha256, manifest_sha256)) = pinned else {
            return Ok(());
        };
        if manifest.sha256 != sha256 {
            return Err(RollbackError::SameVersionOtherBytes {
                name: manifest.name.clone(),
                version: manifest.version,
                offered_sha256: manifest.sha256.clone(),
                accepted_sha256: sha256.to_string(),
            });
        }
        if manifest_sha256.is_some_and(|d| *d != manifest_digest(manifest)) {
            return Err(RollbackError::SameVersionOtherManifest {
                name: manifest.name.clone(),
                version: manifest.version,
            });
        }
        Ok(())
    }

    /// Records `manifest` as the accepted version of its module, durably: the file is
    /// replaced atomically (temporary file, fsync, rename, fsync of the directory), so a
    /// crash leaves either the old store or the new one. Call it only once the module is
    /// really running.
    ///
    /// # Errors
    ///
    /// When the manifest would fail [`VersionStore::check`] (kind `InvalidInput`: the
    /// store never goes back), or the store cannot be written; the store in memory is then
    /// unchanged.
    pub fn record(&mut self, manifest: &Manifest) -> std::io::Result<()> {
        self.check(manifest)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut next = self.accepted.clone();
        let entry = next_entry(self.accepted.get(&manifest.name), manifest);
        next.insert(manifest.name.clone(), entry);
        self.persist(&next)?;
        self.accepted = next;
        Ok(())
    }

    fn persist(&self, modules: &BTreeMap<String, AcceptedVersion>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot create the state directory {}: {e}",
                    self.dir.display()
                ),
            )
        })?;
        let file = StoreFile {
            format: STORE_FORMAT.to_string(),
            modules: modules.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("the store serializes");
        bytes.push(b'\n');
        collector_fsutil::write_atomic(&self.path, &bytes, None)
    }
}

/// The record of a module once `manifest` (which passed the check) is accepted.
fn next_entry(before: Option<&AcceptedVersion>, manifest: &Manifest) -> AcceptedVersion {
    let pin = Pinned {
        sha256: manifest.sha256.clone(),
        manifest_sha256: manifest_digest(manifest),
    };
    let own_floor = manifest.rollback_floor.unwrap_or(manifest.version);
    let mut entry = match before {
        None => AcceptedVersion {
            version: manifest.version,
            sha256: pin.sha256,
            manifest_sha256: Some(pin.manifest_sha256),
            floor: Some(own_floor),
            earlier: BTreeMap::new(),
        },
        Some(before) if manifest.version > before.version => {
            let mut earlier = before.earlier.clone();
            if let Some(digest) = &before.manifest_sha256 {
                earlier.insert(
                    before.version,
                    Pinned {
                        sha256: before.sha256.clone(),
                        manifest_sha256: digest.clone(),
                    },
                );
            }
            AcceptedVersion {
                version: manifest.version,
                sha256: pin.sha256,
                manifest_sha256: Some(pin.manifest_sha256),
                // A floor never goes down.
                floor: Some(own_floor.max(before.floor())),
                earlier,
            }
        }
        // The same version again, or one going back within the floor: the highest
        // stays what it was.
        Some(before) => {
            let mut entry = before.clone();
            if manifest.version < before.version {
                entry.earlier.insert(manifest.version, pin);
            }
            entry
        }
    };
    let floor = entry.floor();
    entry.earlier.retain(|v, _| *v >= floor);
    while entry.earlier.len() > MAX_EARLIER {
        let lowest = *entry.earlier.keys().next().expect("not empty");
        entry.earlier.remove(&lowest);
        entry.floor = Some(entry.floor().max(lowest + 1));
    }
    if entry.floor == Some(entry.version) {
        // The default: keep files of agents that never saw a floor as they were.
        entry.floor = None;
    }
    entry
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, AcceptedVersion>, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let file: StoreFile = serde_path_to_error::deserialize(&mut *de)
        .map_err(|e| format!("at `{}`: {}", e.path(), e.inner()))?;
    // A second document after the first would be read by other tools, not by this one.
    de.end().map_err(|e| format!("after the document: {e}"))?;
    if file.format != STORE_FORMAT {
        return Err(format!(
            "format {:?}, expected {STORE_FORMAT:?}",
            file.format
        ));
    }
    // Names are checked as when they came in a manifest, whoever edited the file since.
    for name in file.modules.keys() {
        super::check_module_name(name).map_err(|e| format!("at `modules`: {e}"))?;
    }
    Ok(file.modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: u64, component: &[u8]) -> Manifest {
        Manifest::describe(
            "process-perf",
            version,
            component,
            "2025-01-01T00:00:00Z".parse().unwrap(),
        )
    }

    #[test]
    fn lower_versions_are_refused_and_equal_ones_only_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = VersionStore::open(dir.path()).unwrap();
        assert!(store.check(&manifest(1, b"one")).is_ok(), "empty store");
        store.record(&manifest(5, b"five")).unwrap();

        assert_eq!(
            store.check(&manifest(4, b"four")),
            Err(RollbackError::Older {
                name: "process-perf".into(),
                offered: 4,
                accepted: 5,
                floor: 5
            })
        );
        let err = store.check(&manifest(5, b"other five")).unwrap_err();
        assert!(
            matches!(err, RollbackError::SameVersionOtherBytes { version: 5, .. }),
            "{err}"
        );
        assert!(store.check(&manifest(5, b"five")).is_ok(), "re-load");
        assert!(store.check(&manifest(6, b"six")).is_ok());

        let mut other = manifest(1, b"x");
        other.name = "other".into();
        assert!(store.check(&other).is_ok(), "versions are per module");

        let err = store.record(&manifest(4, b"four")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(store.accepted("process-perf").unwrap().version, 5);
    }

    fn with_floor(version: u64, floor: u64, component: &[u8]) -> Manifest {
        let mut m = manifest(version, component);
        m.rollback_floor = Some(floor);
        m
    }

    #[test]
    fn a_signed_floor_lets_an_agent_go_back_and_only_ever_rises() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = VersionStore::open(dir.path()).unwrap();
        store.record(&manifest(1, b"one")).unwrap();
        store.record(&with_floor(2, 1, b"two")).unwrap();
        // Back to the version run before, with its own bytes only.
        assert!(store.check(&manifest(1, b"one")).is_ok());
        let err = store.check(&manifest(1, b"another one")).unwrap_err();
        assert!(
            matches!(err, RollbackError::SameVersionOtherBytes { version: 1, .. }),
            "{err}"
        );
        store.record(&manifest(1, b"one")).unwrap();
        assert_eq!(store.accepted("process-perf").unwrap().version, 2);
        assert!(
            store.check(&with_floor(2, 1, b"two")).is_ok(),
            "forward again"
        );
        assert!(
            store.check(&manifest(0, b"zero")).is_err(),
            "below the floor"
        );

        // The floor survives a restart.
        let mut store = VersionStore::open(dir.path()).unwrap();
        assert!(store.check(&manifest(1, b"one")).is_ok());
        // A fix signed without a floor closes the way back, even for a later version
        // that would allow it again.
        store.record(&manifest(3, b"three")).unwrap();
        store.record(&with_floor(4, 1, b"four")).unwrap();
        for old in [manifest(1, b"one"), with_floor(2, 1, b"two")] {
            let err = store.check(&old).unwrap_err();
            assert!(
                matches!(
                    err,
                    RollbackError::Older {
                        floor: 3,
                        accepted: 4,
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(store.check(&manifest(3, b"three")).is_ok());
    }

    #[test]
    fn the_same_version_may_not_come_back_with_another_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = VersionStore::open(dir.path()).unwrap();
        store.record(&manifest(4, b"four")).unwrap();
        let mut wider = manifest(4, b"four");
        wider.grants.publish = vec![">".into()];
        assert!(matches!(
            store.check(&wider),
            Err(RollbackError::SameVersionOtherManifest { version: 4, .. })
        ));
        assert!(
            store.check(&manifest(4, b"four")).is_ok(),
            "the same manifest is fine"
        );
        wider.version = 5;
        assert!(
            store.check(&wider).is_ok(),
            "a higher version may change it"
        );
    }

    #[test]
    fn stores_written_before_manifest_hashes_still_open_and_check_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(VERSIONS_FILE),
            format!(
                r#"{{"format":"collector-versions/1","modules":{{"process-perf":{{"version":4,"sha256":"{}"}}}}}}"#,
                super::super::sha256_hex(b"four")
            ),
        )
        .unwrap();
        let store = VersionStore::open(dir.path()).unwrap();
        assert!(store.check(&manifest(4, b"four")).is_ok());
        assert!(store.check(&manifest(4, b"other")).is_err());
    }

    #[test]
    fn records_survive_a_restart_and_replace_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut store = VersionStore::open(&state).unwrap();
        store.record(&manifest(2, b"two")).unwrap();
        store.record(&manifest(3, b"three")).unwrap();
        store.record(&manifest(3, b"three")).unwrap();

        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [VERSIONS_FILE], "no temporary file left behind");

        let reopened = VersionStore::open(&state).unwrap();
        assert_eq!(
            reopened.accepted("process-perf"),
            Some(&AcceptedVersion {
                version: 3,
                sha256: super::super::sha256_hex(b"three"),
                manifest_sha256: Some(manifest_digest(&manifest(3, b"three"))),
                floor: None,
                earlier: BTreeMap::new(),
            })
        );
        assert!(matches!(
            reopened.check(&manifest(2, b"two")),
            Err(RollbackError::Older { .. })
        ));
        assert!(reopened.check(&manifest(3, b"three")).is_ok());
    }

    #[test]
    fn a_corrupt_store_is_an_error_naming_the_file_never_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VERSIONS_FILE);
        for text in [
            "{ not json",
            r#"{"format": "collector-versions/1", "modules": {"m": {"version": -1, "sha256": ""}}}"#,
            r#"{"format": "something-else", "modules": {}}"#,
            r#"{"format": "collector-versions/1", "modules": {"../x": {"version": 1, "sha256": ""}}}"#,
            "",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = VersionStore::open(dir.path()).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{text}: {err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "untouched");
        }
    }

    #[test]
    fn a_store_with_a_second_document_after_it_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VERSIONS_FILE);
        let store = r#"{"format": "collector-versions/1", "modules": {}}"#;
        std::fs::write(&path, format!("{store}\n \t\r\n")).unwrap();
        assert!(
            VersionStore::open(dir.path()).is_ok(),
            "trailing whitespace is fine"
        );
        std::fs::write(&path, format!("{store}\n{store}")).unwrap();
        let err = VersionStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_store_that_blocks_or_never_ends_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VERSIONS_FILE);
        collector_fsutil::hostile::each(&path, |what| {
            let state = dir.path().to_path_buf();
            let err = collector_fsutil::hostile::promptly(what, move || VersionStore::open(&state))
                .expect_err(what);
            assert!(matches!(err, StoreError::Read { .. }), "{what}: {err}");
            assert!(err.to_string().contains(VERSIONS_FILE), "{what}: {err}");
        });
    }
}
