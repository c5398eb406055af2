//! A local cache of compiled guest components, so that a restart or a swap to a module
//! seen before costs a deserialization (~0.1 ms) instead of a Cranelift compile (tens of
//! milliseconds).
//!
//! A compiled artifact is native code that wasmtime loads without validation, so the
//! cache only ever loads artifacts this agent wrote itself: each entry is keyed by the
//! SHA-256 of the component and the engine's compatibility hash, and carries an
//! HMAC-SHA256 made with a secret key kept in the cache directory (mode 0600). An entry
//! whose MAC does not verify is recompiled and overwritten, never loaded.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use collector_fsutil::{Links, ReadError, ReadProblem, read_regular};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation for the MAC, versioned with the entry layout.
const MAC_CONTEXT: &[u8] = b"collector compile cache v1";

/// Largest compiled artifact (`.cwasm`) read back or written, in bytes (128 MiB): four
/// times the largest bundle, room for the native code of any component a bundle can
/// carry. A larger artifact is not cached, so every entry written can be read back.
pub const MAX_ARTIFACT_LEN: u64 = 128 * 1024 * 1024;

/// Length of the cache key (`cache.key`) and of an HMAC-SHA256 tag (`.mac`).
const KEY_LEN: usize = 32;

/// How a [`CompileCache::load`] was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Deserialized from a verified entry.
    Hit,
    /// Not cached yet: compiled and stored.
    Miss,
    /// An entry existed but failed verification: compiled again and overwritten.
    Rejected(String),
}

/// Compiled components on disk, authenticated with this agent's key.
pub struct CompileCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_hash: String,
}

impl CompileCache {
    /// Opens (or creates) the cache in `dir` for artifacts of `engine`.
    ///
    /// # Errors
    ///
    /// When the directory or its key cannot be created or read.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key_path = dir.join("cache.key");
        let bad_key = || {
            std::io::Error::other(format!(
                "{}: expected a {KEY_LEN}-byte key; delete it to start a new cache",
                key_path.display()
            ))
        };
        let key = match read_regular(&key_path, KEY_LEN as u64, Links::Refuse) {
            Ok(bytes) => {
                // Whoever can read the key can forge compiled code the agent would run
                // without validating it; whoever can write it, replace it.
                if let Some(why) = collector_fsutil::private::exposure(&key_path)? {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is not private: {why}; or delete it (and the cache's \
                             entries) to start a new cache",
                            key_path.display()
                        ),
                    ));
                }
                bytes.try_into().map_err(|_| bad_key())?
            }
            Err(e) if e.is_not_found() => {
                let mut key = [0u8; KEY_LEN];
                getrandom::fill(&mut key).map_err(std::io::Error::other)?;
                write_private(&key_path, &key)?;
                key
            }
            Err(ReadError {
                problem: ReadProblem::TooLarge { .. },
                ..
            }) => return Err(bad_key()),
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let mut hasher = Sha256Hasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            engine_hash,
        })
    }

    /// The compiled form of `bytes`, from the cache when a verified entry exists,
    /// otherwise compiled now and stored.
    ///
    /// # Errors
    ///
    /// When the component does not compile. Failures to write the cache are logged, not
    /// returned: the cache is an optimisation.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let content = hex::encode(Sha256::digest(bytes));
        let stem = format!("{content}-{}", self.engine_hash);
        let artifact_path = self.dir.join(format!("{stem}.cwasm"));
        let mac_path = self.dir.join(format!("{stem}.mac"));
        // Entries are files this agent wrote: a link or anything but a regular file in
        // their place was planted, and is refused without blocking or reading it whole.
        let read = |path: &Path, max| read_regular(path, max, Links::Refuse);
        let outcome = match (
            read(&artifact_path, MAX_ARTIFACT_LEN),
            read(&mac_path, KEY_LEN as u64),
        ) {
            (Ok(artifact), Ok(tag)) => {
                if self.mac(&stem, &artifact).verify_slice(&tag).is_ok() {
                    // SAFETY: the artifact carries a valid MAC under this agent's secret
                    // key, so this agent wrote it with `Component::serialize` for an
                    // engine with the same compatibility hash (part of the MAC input).
                    match unsafe { Component::deserialize(engine, &artifact) } {
                        Ok(component) => return Ok((component, CacheOutcome::Hit)),
                        Err(e) => CacheOutcome::Rejected(format!("cannot be loaded: {e}")),
                    }
                } else {
                    CacheOutcome::Rejected("its MAC does not verify".into())
                }
            }
            (Err(e), _) if e.is_not_found() => CacheOutcome::Miss,
            (Ok(_), Err(e)) if e.is_not_found() => {
                CacheOutcome::Rejected("its MAC is missing".into())
            }
            (Err(e), _) | (Ok(_), Err(e)) => CacheOutcome::Rejected(format!("cannot be read: {e}")),
        };
        if let CacheOutcome::Rejected(why) = &outcome {
            tracing::warn!(entry = %artifact_path.display(), why, "compile cache entry refused; recompiling");
        }
        let component = Component::from_binary(engine, bytes)?;
        if let Err(e) = self.store(&stem, &artifact_path, &mac_path, &component) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the compile cache");
        }
        Ok((component, outcome))
    }

    fn store(
        &self,
        stem: &str,
        artifact_path: &Path,
        mac_path: &Path,
        component: &Component,
    ) -> anyhow::Result<()> {
        let artifact = component.serialize().map_err(anyhow::Error::from)?;
        anyhow::ensure!(
            artifact.len() as u64 <= MAX_ARTIFACT_LEN,
            "{}: the compiled component is {} bytes, more than the {MAX_ARTIFACT_LEN} the \
             cache reads back; not cached",
            artifact_path.display(),
            artifact.len()
        );
        let tag = self.mac(stem, &artifact).finalize().into_bytes();
        // The MAC goes last: a crash in between leaves an entry that fails verification.
        write_private(artifact_path, &artifact)?;
        write_private(mac_path, &tag)?;
        Ok(())
    }

    fn mac(&self, stem: &str, artifact: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(MAC_CONTEXT);
        mac.update(stem.as_bytes());
        mac.update(artifact);
        mac
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    collector_fsutil::write_atomic(path, bytes, Some(0o600))
}

/// Feeds `Hash` output into SHA-256, for a hash that is stable across processes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use collector_fsutil::hostile;

    #[test]
    fn a_key_others_may_read_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        CompileCache::open(dir.path(), &Engine::default()).unwrap();
        let key = dir.path().join("cache.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = CompileCache::open(dir.path(), &Engine::default())
            .err()
            .expect("a readable key refused")
            .to_string();
        assert!(
            err.contains("cache.key") && err.contains("not private") && err.contains("644"),
            "{err}"
        );
    }

    #[test]
    fn a_key_that_blocks_or_never_ends_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cache.key");
        hostile::each(&key, |what| {
            let cache_dir = dir.path().to_path_buf();
            let err = hostile::promptly(what, move || {
                CompileCache::open(&cache_dir, &Engine::default()).err()
            })
            .unwrap_or_else(|| panic!("{what} accepted as the cache key"));
            assert!(err.to_string().contains("cache.key"), "{what}: {err}");
        });
    }

    #[test]
    fn an_entry_that_blocks_or_never_ends_is_recompiled_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let component = wat::parse_str("(component)").unwrap();
        let cache = std::sync::Arc::new(CompileCache::open(dir.path(), &engine).unwrap());
        let (_, outcome) = cache.load(&engine, &component).unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        let entries: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm" || e == "mac"))
            .collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        for entry in entries {
            hostile::each(&entry, |what| {
                let (cache, engine, component) = (cache.clone(), engine.clone(), component.clone());
                let outcome = hostile::promptly(what, move || {
                    cache.load(&engine, &component).map(|(_, outcome)| outcome)
                })
                .unwrap();
                assert!(
                    matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("expected a regular file")),
                    "{what} as {}: {outcome:?}",
                    entry.display()
                );
            });
            // `each` leaves the entry removed: put it back for the next one.
            cache.load(&engine, &component).unwrap();
        }
    }
}
