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

type HmacSha256 = Hmac<Sha256>;

/// Domain separation for the MAC, versioned with the entry layout.
const MAC_CONTEXT: &[u8] = b"collector compile cache v1";

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
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => bytes.try_into().map_err(|_| {
                std::io::Error::other(format!(
                    "{}: expected a 32-byte key; delete it to start a new cache",
                    key_path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(std::io::Error::other)?;
                write_private(&key_path, &key)?;
                key
            }
            Err(e) => return Err(e),
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
        let outcome = match (std::fs::read(&artifact_path), std::fs::read(&mac_path)) {
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
            (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => CacheOutcome::Miss,
            (Ok(_), Err(_)) => CacheOutcome::Rejected("its MAC is missing".into()),
            (Err(e), _) => CacheOutcome::Rejected(format!("cannot be read: {e}")),
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
    crate::fsutil::write_atomic(path, bytes, Some(0o600))
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
