//! Ed25519 keys for signing bundles: generation, the one-line key files, key ids, and the
//! set of keys an agent trusts.
//!
//! Key files are one line each, `collector-ed25519-secret <base64 seed>` and
//! `collector-ed25519-public <base64 key>`, so a public key can be pasted into a ticket or
//! a configuration system without tooling, and a secret key is never mistaken for a
//! public one.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::format::SignatureEntry;

/// First word of a secret key file.
pub const SECRET_PREFIX: &str = "collector-ed25519-secret";
/// First word of a public key file.
pub const PUBLIC_PREFIX: &str = "collector-ed25519-public";

/// Key files are one short line; anything longer is not a key file.
const MAX_KEY_FILE_LEN: u64 = 1024;

/// Why a key could not be generated, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read: it is missing or unreadable, not a regular file, or
    /// over 1 KiB.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The cause; a file that is not regular or too large comes as
        /// [`std::io::ErrorKind::Other`].
        source: std::io::Error,
    },
    /// A key file could not be created, written or synced, or (when forced) the old one
    /// could not be removed.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file's path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Something is already at a path a key file was to be written to, and overwriting
    /// was not forced.
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// The path that is taken.
        path: String,
    },
    /// The text is not one line `<prefix> <base64 of 32 bytes>` of the expected kind
    /// (a public key file where a secret one is expected is reported as such).
    #[error(
        "{origin} is not a {expected} key file (expected one line `{prefix} <base64>`): {reason}"
    )]
    Format {
        /// Where the text came from: the file's path, or the caller's name for it.
        origin: String,
        /// The kind of key expected: "secret" or "public".
        expected: &'static str,
        /// The first word that kind of file starts with ([`SECRET_PREFIX`] or
        /// [`PUBLIC_PREFIX`]).
        prefix: &'static str,
        /// What is wrong with the text, for people.
        reason: String,
    },
    /// The 32 bytes are not a usable Ed25519 public key: not a curve point, or a weak
    /// (small-order) key that would verify forged signatures.
    #[error("{origin} does not hold a usable Ed25519 public key: {reason}")]
    InvalidKey {
        /// Where the key came from: its file's path, the caller's name for it, or "the
        /// key".
        origin: String,
        /// What is wrong with it, for people.
        reason: String,
    },
    /// The operating system gave no randomness to generate a key with; holds its error.
    #[error("cannot get randomness from the operating system: {0}")]
    Random(String),
    /// A secret key file that users other than its owner may read or write: whoever can
    /// read it can sign as its owner, so it is not used.
    #[error("secret key file {path} is not private: {why}")]
    Exposed {
        /// The file's path.
        path: String,
        /// Who else may use it, and how to fix it.
        why: String,
    },
    /// A key id is not 16 hex digits; holds the text (its first 40 characters when its
    /// length is wrong).
    #[error("invalid key id {0:?}: expected 16 hex digits")]
    KeyId(String),
}

/// A short, stable name for a public key: the first 8 bytes of its SHA-256, shown in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    /// The id of a 32-byte Ed25519 public key.
    pub fn of(public: &[u8; 32]) -> Self {
        let digest = Sha256::digest(public);
        let mut id = [0; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut id = [0; 8];
        if s.len() != 16 {
            return Err(KeyError::KeyId(s.chars().take(40).collect()));
        }
        hex::decode_to_slice(s, &mut id).map_err(|_| KeyError::KeyId(s.to_string()))?;
        Ok(Self(id))
    }
}

/// An Ed25519 public key that can verify bundle signatures.
#[derive(Clone)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// The key with these 32 bytes (its compressed Edwards point).
    ///
    /// # Errors
    ///
    /// When the bytes are not a valid curve point, or are a weak (small-order) key, for
    /// which signatures prove nothing.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        Self::checked(bytes, "the key")
    }

    fn checked(bytes: &[u8; 32], origin: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|e| KeyError::InvalidKey {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        if key.is_weak() {
            return Err(KeyError::InvalidKey {
                origin: origin.to_string(),
                reason: "it is a weak (small-order) key".into(),
            });
        }
        Ok(Self {
            key,
            id: KeyId::of(bytes),
        })
    }

    /// The key's 32 bytes, as in its key file.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key's id ([`KeyId::of`] its bytes).
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The public key file's content: one line, with its newline.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_PREFIX} {}\n", BASE64.encode(self.key.as_bytes()))
    }

    /// Parses a public key file's content; `origin` names it in errors.
    ///
    /// # Errors
    ///
    /// When the text is not one `collector-ed25519-public <base64>` line holding a
    /// usable key.
    pub fn from_line(origin: &str, text: &str) -> Result<Self, KeyError> {
        let bytes = decode_line(origin, text, KeyKind::Public)?;
        Self::checked(&bytes, origin)
    }

    /// Reads a public key file (`KEY.pub`).
    ///
    /// # Errors
    ///
    /// When the file cannot be read or does not hold a public key.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = read_key_file(path, KeyKind::Public)?;
        Self::from_line(&path.display().to_string(), &text)
    }

    /// Whether `signature` is this key's signature over `message`. Uses strict
    /// verification, which refuses non-canonical signatures.
    pub fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.key.as_bytes() == other.key.as_bytes()
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

/// An Ed25519 signing key. Its bytes are wiped from memory when it is dropped, and it
/// never prints them.
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// A new key from the operating system's random generator.
    ///
    /// # Errors
    ///
    /// When the operating system provides no randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_seed(&seed))
    }

    /// The key for a 32-byte seed (deterministic; tests use it).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The public half of this key: what verifies its signatures.
    pub fn public_key(&self) -> PublicKey {
        let key = self.key.verifying_key();
        PublicKey {
            id: KeyId::of(key.as_bytes()),
            key,
        }
    }

    /// The id of its public key, which its signatures claim.
    pub fn id(&self) -> KeyId {
        self.public_key().id()
    }

    /// Signs `message`, labelled with this key's id.
    pub fn sign(&self, message: &[u8]) -> SignatureEntry {
        SignatureEntry {
            key_id: self.id(),
            signature: self.key.sign(message).to_bytes(),
        }
    }

    /// Reads a secret key file.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, does not hold a secret key (a public key file is
    /// named as such), or others than its owner may read or write it
    /// ([`KeyError::Exposed`]).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = Zeroizing::new(read_key_file(path, KeyKind::Secret)?);
        let seed = decode_line(&path.display().to_string(), &text, KeyKind::Secret)?;
        refuse_if_exposed(path)?;
        Ok(Self::from_seed(&seed))
    }

    /// Where the public half of the secret key file `path` goes: `path` + `.pub`.
    pub fn public_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".pub");
        PathBuf::from(p)
    }

    /// Writes the secret key to `path` (readable by its owner only) and the public key to
    /// `path.pub`. Neither file is written when either exists, unless `force`.
    ///
    /// # Errors
    ///
    /// When a file exists and `force` is false, or a file cannot be written.
    pub fn write_pair(&self, path: &Path, force: bool) -> Result<PathBuf, KeyError> {
        let public = Self::public_path(path);
        if !force {
            for p in [path, public.as_path()] {
                if p.symlink_metadata().is_ok() {
                    return Err(KeyError::Exists {
                        path: p.display().to_string(),
                    });
                }
            }
        }
        let secret = Zeroizing::new(format!(
            "{SECRET_PREFIX} {}\n",
            BASE64.encode(self.key.as_bytes())
        ));
        write_key_file(path, secret.as_bytes(), 0o600, force)?;
        write_key_file(
            &public,
            self.public_key().to_line().as_bytes(),
            0o644,
            force,
        )?;
        Ok(public)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Secret,
    Public,
}

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Secret => SECRET_PREFIX,
            Self::Public => PUBLIC_PREFIX,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::Public => "public",
        }
    }
}

fn read_key_file(path: &Path, kind: KeyKind) -> Result<String, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.display().to_string(),
        source,
    };
    let bytes = super::format::read_bounded(path, MAX_KEY_FILE_LEN).map_err(|e| match e {
        super::format::ReadProblem::Io(source) => read_err(source),
        other => read_err(std::io::Error::other(other.to_string())),
    })?;
    String::from_utf8(bytes).map_err(|_| KeyError::Format {
        origin: path.display().to_string(),
        expected: kind.name(),
        prefix: kind.prefix(),
        reason: "it is not text".into(),
    })
}

/// The 32 bytes of a one-line key file of the given kind.
fn decode_line(origin: &str, text: &str, kind: KeyKind) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let fail = |reason: String| KeyError::Format {
        origin: origin.to_string(),
        expected: kind.name(),
        prefix: kind.prefix(),
        reason,
    };
    let line = text.trim_end_matches(['\n', '\r']);
    if line.contains('\n') {
        return Err(fail("it has more than one line".into()));
    }
    let (prefix, body) = line.split_once(' ').unwrap_or((line, ""));
    if prefix != kind.prefix() {
        let other = match kind {
            KeyKind::Secret => KeyKind::Public,
            KeyKind::Public => KeyKind::Secret,
        };
        let reason = if prefix == other.prefix() {
            match kind {
                KeyKind::Public => {
                    "this is a secret key file; pass the public key file (KEY.pub)".to_string()
                }
                KeyKind::Secret => {
                    "this is a public key file; signing needs the secret key file".to_string()
                }
            }
        } else {
            "it does not start with the expected prefix".to_string()
        };
        return Err(fail(reason));
    }
    let bytes = Zeroizing::new(
        BASE64
            .decode(body.trim().as_bytes())
            .map_err(|e| fail(format!("the key is not base64: {e}")))?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != key.len() {
        return Err(fail(format!(
            "the key is {} bytes, an Ed25519 key is 32",
            bytes.len()
        )));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Creates a key file with `mode`; with `force`, replaces an existing one (removed first,
/// so the new file gets `mode` rather than keeping the old file's permissions).
fn write_key_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.display().to_string(),
        source,
    };
    if force {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(e)),
        }
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.display().to_string(),
            }
        } else {
            write_err(e)
        }
    })?;
    // Unix has the mode from the start; elsewhere the file is made private before any
    // byte of the key is written.
    #[cfg(not(unix))]
    if mode & 0o077 == 0 {
        collector_fsutil::private::restrict(path).map_err(write_err)?;
    }
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

fn refuse_if_exposed(path: &Path) -> Result<(), KeyError> {
    match collector_fsutil::private::exposure(path) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(KeyError::Exposed {
            path: path.display().to_string(),
            why,
        }),
        Err(source) => Err(KeyError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Why a trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// No public key was given.
    #[error("no trusted key given")]
    NoKeys,
    /// The threshold is 0, which would accept unsigned bundles.
    #[error("a threshold of 0 would accept unsigned bundles; it must be at least 1")]
    ZeroThreshold,
    /// The threshold is above the number of distinct keys given.
    #[error(
        "threshold {threshold} can never be met: only {keys} distinct trusted key(s) given \
         (the same key given twice counts once)"
    )]
    Unreachable {
        /// The threshold asked for.
        threshold: usize,
        /// How many distinct keys were given.
        keys: usize,
    },
    /// A public key file could not be read or does not hold a usable public key.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The public keys an agent trusts, and how many of them must have signed a bundle.
///
/// Built from `--trust` key files ([`TrustStore::new`]: any key may sign any module, and
/// the store never expires) or from a trust root ([`crate::TrustRoot::store`]: a key may
/// be limited to some module names, revoked keys are named when they sign, and the root's
/// expiry ends the store's use for new bundles).
#[derive(Debug, Clone)]
pub struct TrustStore {
    keys: Vec<PublicKey>,
    threshold: usize,
    /// Per key (same order): the module names it may sign; `None` for any.
    scopes: Vec<Option<Vec<String>>>,
    revoked: Vec<KeyId>,
    version: u64,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl TrustStore {
    /// Keys given more than once are kept once.
    ///
    /// # Errors
    ///
    /// When there is no key, the threshold is 0, or it exceeds the number of distinct
    /// keys.
    pub fn new(
        keys: impl IntoIterator<Item = PublicKey>,
        threshold: usize,
    ) -> Result<Self, TrustError> {
        let mut distinct: Vec<PublicKey> = Vec::new();
        for key in keys {
            if !distinct.contains(&key) {
                distinct.push(key);
            }
        }
        if distinct.is_empty() {
            return Err(TrustError::NoKeys);
        }
        if threshold == 0 {
            return Err(TrustError::ZeroThreshold);
        }
        if threshold > distinct.len() {
            return Err(TrustError::Unreachable {
                threshold,
                keys: distinct.len(),
            });
        }
        Ok(Self {
            scopes: vec![None; distinct.len()],
            keys: distinct,
            threshold,
            revoked: Vec::new(),
            version: 0,
            expires_at: None,
        })
    }

    /// The store a trust root describes: its signing keys with their module scopes,
    /// its revoked keys, version and expiry. Keys given twice are kept once (their
    /// scopes are the first's).
    pub(crate) fn of_root(
        keys: Vec<(PublicKey, Option<Vec<String>>)>,
        threshold: usize,
        revoked: Vec<KeyId>,
        version: u64,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, TrustError> {
        let mut store = Self::new(keys.iter().map(|(k, _)| k.clone()), threshold)?;
        store.scopes = store
            .keys
            .iter()
            .map(|k| {
                keys.iter()
                    .find(|(key, _)| key == k)
                    .and_then(|(_, scope)| scope.clone())
            })
            .collect();
        store.revoked = revoked;
        store.version = version;
        store.expires_at = Some(expires_at);
        Ok(store)
    }

    /// The trust root version this store comes from; 0 for `--trust` key files.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the trust root this store comes from expires: bundles are refused from then
    /// on ([`crate::verify`]). `None` for `--trust` key files.
    pub fn expires_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.expires_at
    }

    /// The same store without its expiry: for a module that already ran here (a
    /// last-known-good reloaded at start), which an expired root does not stop.
    pub fn ignoring_expiry(&self) -> Self {
        Self {
            expires_at: None,
            ..self.clone()
        }
    }

    /// Whether key `id` was revoked by the trust root.
    pub fn is_revoked(&self, id: KeyId) -> bool {
        self.revoked.contains(&id)
    }

    /// Whether `key` (a key of this store) may sign module `name`.
    pub fn may_sign(&self, key: &PublicKey, name: &str) -> bool {
        self.keys
            .iter()
            .position(|k| k == key)
            .is_some_and(|i| match &self.scopes[i] {
                None => true,
                Some(patterns) => patterns.iter().any(|p| scope_matches(p, name)),
            })
    }

    /// The module names `key` may sign, when it is limited to some.
    pub fn scope_of(&self, key: &PublicKey) -> Option<&[String]> {
        let i = self.keys.iter().position(|k| k == key)?;
        self.scopes[i].as_deref()
    }

    /// Reads public key files (`KEY.pub`) into a trust store.
    ///
    /// # Errors
    ///
    /// As [`TrustStore::new`], and when a file cannot be read as a public key.
    pub fn from_files<P: AsRef<Path>>(paths: &[P], threshold: usize) -> Result<Self, TrustError> {
        let keys = paths
            .iter()
            .map(|p| PublicKey::read(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys, threshold)
    }

    /// The distinct trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// How many distinct trusted keys must have signed a bundle.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether some trusted key has this id.
    pub fn knows(&self, id: KeyId) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// The trusted key under which `signature` verifies over `message`, if any. Every key
    /// is tried, so the key id a signature claims cannot steer the result.
    pub fn signer_of(&self, message: &[u8], signature: &[u8; 64]) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.verifies(message, signature))
    }
}

/// Whether module `name` matches a scope pattern: a module name, or a prefix followed by
/// `*` (`team-a-*`).
pub fn scope_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_short_stable_hex_of_the_public_key() {
        let key = SecretKey::from_seed(&[1; 32]);
        let id = key.id().to_string();
        assert_eq!(id.len(), 16);
        assert_eq!(
            id,
            hex::encode(&Sha256::digest(key.public_key().to_bytes())[..8])
        );
        assert_eq!(id.parse::<KeyId>().unwrap(), key.id());
        assert!("abc".parse::<KeyId>().is_err());
        assert!("zz11223344556677".parse::<KeyId>().is_err());
    }

    #[test]
    fn signatures_verify_under_their_key_only() {
        let a = SecretKey::from_seed(&[1; 32]);
        let b = SecretKey::from_seed(&[2; 32]);
        let sig = a.sign(b"manifest");
        assert_eq!(sig.key_id, a.id());
        assert!(a.public_key().verifies(b"manifest", &sig.signature));
        assert!(!a.public_key().verifies(b"manifesT", &sig.signature));
        assert!(!b.public_key().verifies(b"manifest", &sig.signature));
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
    }

    #[test]
    fn key_files_round_trip_with_owner_only_secret_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signer");
        let key = SecretKey::from_seed(&[3; 32]);
        let public = key.write_pair(&path, false).unwrap();
        assert_eq!(public, dir.path().join("signer.pub"));
        assert_eq!(SecretKey::read(&path).unwrap().id(), key.id());
        assert_eq!(PublicKey::read(&public).unwrap(), key.public_key());
        let text = std::fs::read_to_string(&public).unwrap();
        assert!(text.starts_with("collector-ed25519-public "), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let other = SecretKey::from_seed(&[4; 32]);
        let err = other.write_pair(&path, false).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(SecretKey::read(&path).unwrap().id(), key.id(), "untouched");
        // Only the public file existing also blocks, so a pair is never half replaced.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            other.write_pair(&path, false),
            Err(KeyError::Exists { .. })
        ));
        assert!(!path.exists());

        other.write_pair(&path, true).unwrap();
        assert_eq!(SecretKey::read(&path).unwrap().id(), other.id());
        assert_eq!(PublicKey::read(&public).unwrap(), other.public_key());
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signer");
        SecretKey::from_seed(&[6; 32])
            .write_pair(&path, false)
            .unwrap();
        SecretKey::read(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::read(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exposed { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("signer") && text.contains("not private"),
            "{text}"
        );
    }

    #[test]
    fn swapped_or_damaged_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SecretKey::from_seed(&[5; 32])
            .write_pair(&path, false)
            .unwrap();
        let err = PublicKey::read(&path).unwrap_err().to_string();
        assert!(err.contains("this is a secret key file"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let err = SecretKey::read(&SecretKey::public_path(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("this is a public key file"), "{err}");

        let bad = dir.path().join("bad.pub");
        for (text, expected) in [
            ("ssh-ed25519 AAAA", "expected prefix"),
            ("collector-ed25519-public !!", "not base64"),
            ("collector-ed25519-public AAAA", "3 bytes"),
            ("collector-ed25519-public AAAA\nmore", "more than one line"),
        ] {
            std::fs::write(&bad, text).unwrap();
            let err = PublicKey::read(&bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("bad.pub"), "{err}");
        }
    }

    #[test]
    fn weak_public_keys_are_refused() {
        // The identity point: every signature "verifies" under small-order keys.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            PublicKey::from_bytes(&identity),
            Err(KeyError::InvalidKey { .. })
        ));
    }

    #[test]
    fn trust_store_counts_distinct_keys_and_checks_the_threshold() {
        let a = SecretKey::from_seed(&[1; 32]).public_key();
        let b = SecretKey::from_seed(&[2; 32]).public_key();
        let store = TrustStore::new([a.clone(), a.clone(), b.clone()], 2).unwrap();
        assert_eq!(store.keys().len(), 2);
        assert!(matches!(
            TrustStore::new([a.clone(), a.clone()], 2),
            Err(TrustError::Unreachable {
                threshold: 2,
                keys: 1
            })
        ));
        assert!(matches!(
            TrustStore::new([a], 0),
            Err(TrustError::ZeroThreshold)
        ));
        assert!(matches!(
            TrustStore::new(Vec::new(), 1),
            Err(TrustError::NoKeys)
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_that_blocks_or_never_ends_is_an_error_at_once() {
        use collector_fsutil::hostile;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("team.pub");
        hostile::each(&path, |what| {
            let p = path.clone();
            let err = hostile::promptly(what, move || PublicKey::read(&p).err())
                .unwrap_or_else(|| panic!("{what} accepted as a key"));
            assert!(matches!(err, KeyError::Read { .. }), "{what}: {err}");
            let p = path.clone();
            let err = hostile::promptly(what, move || SecretKey::read(&p).err())
                .unwrap_or_else(|| panic!("{what} accepted as a key"));
            assert!(matches!(err, KeyError::Read { .. }), "{what}: {err}");
        });
    }
}
