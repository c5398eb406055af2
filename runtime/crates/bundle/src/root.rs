//! Trust roots: the document that says which keys sign bundles, so that a security team
//! can rotate or revoke signing keys across a fleet without touching an agent.
//!
//! A root has a version, an expiry, its **root keys** and their threshold, the **signing
//! keys** (each optionally limited to some module names) and the threshold a bundle
//! needs, and the keys it **revokes**. An agent is installed once with a first root
//! ([`TrustRoot::install`]) and from then on takes a root only if it is the next version
//! and is signed both by the threshold of the root keys of the version it holds and by
//! the threshold of its own root keys ([`TrustRoot::follow`]): a thief holding old keys,
//! or fewer than the threshold, cannot forge a root, and new keys alone cannot take
//! over. Signatures by a key the new root revokes never count. An agent that missed
//! versions catches up by following each in turn ([`TrustRoot::advance`]); only the last
//! one must not have expired.
//!
//! `--trust KEY.pub` files keep working as version 0 ([`TrustRoot::from_keys`]): those
//! keys are its root keys as well as its signing keys, so a fleet installed with them
//! moves to a root signed by them without a reinstall.
//!
//! # The root file
//!
//! UTF-8 JSON, at most [`MAX_ROOT_LEN`] (64 KiB):
//!
//! ```json
//! {"signed": "<the root document, a JSON text>",
//!  "signatures": [{"key_id": "<16 hex>", "signature": "<base64>"}]}
//! ```
//!
//! Signatures cover the exact bytes of `signed` (never a re-serialization), like a
//! bundle's manifest. The document ([`RootDoc`]) is strict: unknown fields, duplicate
//! fields and anything but whitespace after either document are refused. Signatures
//! are not covered by themselves, so they can be gathered one by one, on separate
//! machines, and merged.

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};

use super::format::{MAX_SIGNATURES, SignatureEntry};
use super::keys::{KeyId, PublicKey, SecretKey, TrustError, TrustStore};
use super::manifest::{check_module_name, sha256_hex};

/// The `format` of root documents this crate reads and writes.
pub const ROOT_FORMAT: &str = "collector-trust-root/1";
/// Largest root file read.
pub const MAX_ROOT_LEN: usize = 64 * 1024;
/// Most root keys, and most signing keys, a root may list.
pub const MAX_ROOT_KEYS: usize = 64;
/// Most revoked keys a root may list.
pub const MAX_REVOKED: usize = 1024;
/// Most module patterns per signing key.
pub const MAX_SCOPE_PATTERNS: usize = 64;
/// The usual extension of root files (`v3.root`); the `--modules` directory's watcher
/// takes files with it as roots.
pub const ROOT_EXTENSION: &str = "root";

/// A signing key of a root, and which modules it may sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSigningKey {
    /// The key.
    pub key: PublicKey,
    /// Module names (or `prefix*` patterns) it may sign; `None` for any module.
    pub modules: Option<Vec<String>>,
}

/// The content of a trust root: what its signatures vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDoc {
    /// 1 for the first root; each next root is exactly one more.
    pub version: u64,
    /// When it was made.
    pub issued_at: DateTime<Utc>,
    /// When it expires: from then on no new bundle is accepted under it.
    pub expires_at: DateTime<Utc>,
    /// The keys that sign roots.
    pub root_keys: Vec<PublicKey>,
    /// How many distinct root keys must sign a root (this one, and the next one).
    pub root_threshold: usize,
    /// The keys that sign bundles.
    pub signing_keys: Vec<RootSigningKey>,
    /// How many distinct signing keys must sign a bundle.
    pub signing_threshold: usize,
    /// Keys that no longer count for anything, bundles or roots.
    pub revoked: Vec<KeyId>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootJson {
    format: String,
    version: u64,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    root_keys: Vec<String>,
    root_threshold: usize,
    signing_keys: Vec<SigningKeyJson>,
    signing_threshold: usize,
    #[serde(default)]
    revoked: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningKeyJson {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modules: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeJson {
    signed: String,
    signatures: Vec<SignatureJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureJson {
    key_id: String,
    signature: String,
}

/// Why a root file or document is not a valid root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The file is over [`MAX_ROOT_LEN`].
    #[error("a root file is at most {max} bytes, this one is {len}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// [`MAX_ROOT_LEN`].
        max: usize,
    },
    /// The file is not the JSON envelope `{"signed": ..., "signatures": [...]}`.
    #[error("not a trust root file: {0}")]
    Envelope(String),
    /// A signature entry does not decode.
    #[error("signature {index}: {reason}")]
    Signature {
        /// Its position, counting from 1.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The root document is not the JSON of a root.
    #[error("root document: at `{path}`: {message}")]
    Json {
        /// Where in the document.
        path: String,
        /// What serde said.
        message: String,
    },
    /// A field holds a value no valid root has.
    #[error("root document field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RootError {
    RootError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn decode_key(field: &str, text: &str) -> Result<PublicKey, RootError> {
    let text = text
        .strip_prefix(super::keys::PUBLIC_PREFIX)
        .map_or(text, str::trim_start);
    let bytes = BASE64
        .decode(text.as_bytes())
        .map_err(|e| invalid(field, format!("not base64: {e}")))?;
    let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        invalid(
            field,
            format!("{} bytes, an Ed25519 key is 32", bytes.len()),
        )
    })?;
    PublicKey::from_bytes(&bytes).map_err(|e| invalid(field, e.to_string()))
}

fn encode_key(key: &PublicKey) -> String {
    BASE64.encode(key.to_bytes())
}

/// Checks a module scope pattern: a module name, or a prefix of one followed by `*`.
///
/// # Errors
///
/// Describes what is wrong, for people.
pub fn check_scope_pattern(pattern: &str) -> Result<(), String> {
    match pattern.strip_suffix('*') {
        Some("") => Err("`*` alone means any module: leave `modules` out instead".into()),
        Some(prefix) => check_module_name(prefix).map_err(|e| format!("{pattern:?}: {e}")),
        None => check_module_name(pattern).map_err(|e| format!("{pattern:?}: {e}")),
    }
}

impl RootDoc {
    /// Parses and checks a root document (the bytes its signatures cover).
    ///
    /// # Errors
    ///
    /// When it is not the strict JSON of a root, or a value is invalid
    /// ([`RootDoc::validate`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, RootError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let json: RootJson =
            serde_path_to_error::deserialize(&mut *de).map_err(|e| RootError::Json {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        de.end().map_err(|e| RootError::Json {
            path: ".".into(),
            message: format!("data after the root document: {e}"),
        })?;
        if json.format != ROOT_FORMAT {
            return Err(invalid(
                "format",
                format!("{:?}, this agent reads {ROOT_FORMAT:?}", json.format),
            ));
        }
        for (what, len) in [
            ("root_keys", json.root_keys.len()),
            ("signing_keys", json.signing_keys.len()),
        ] {
            if len > MAX_ROOT_KEYS {
                return Err(invalid(
                    what,
                    format!("{len} keys, at most {MAX_ROOT_KEYS}"),
                ));
            }
        }
        if json.revoked.len() > MAX_REVOKED {
            return Err(invalid(
                "revoked",
                format!("{} keys, at most {MAX_REVOKED}", json.revoked.len()),
            ));
        }
        let root_keys = json
            .root_keys
            .iter()
            .enumerate()
            .map(|(i, k)| decode_key(&format!("root_keys[{i}]"), k))
            .collect::<Result<Vec<_>, _>>()?;
        let signing_keys = json
            .signing_keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                Ok(RootSigningKey {
                    key: decode_key(&format!("signing_keys[{i}].key"), &k.key)?,
                    modules: k.modules,
                })
            })
            .collect::<Result<Vec<_>, RootError>>()?;
        let revoked = json
            .revoked
            .iter()
            .enumerate()
            .map(|(i, id)| {
                id.parse::<KeyId>()
                    .map_err(|e| invalid(format!("revoked[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let doc = Self {
            version: json.version,
            issued_at: json.issued_at,
            expires_at: json.expires_at,
            root_keys,
            root_threshold: json.root_threshold,
            signing_keys,
            signing_threshold: json.signing_threshold,
            revoked,
        };
        doc.validate()?;
        Ok(doc)
    }

    /// Checks what the JSON shape alone does not: a version of at least 1, an expiry
    /// after the issue, distinct keys, thresholds that can be met, module patterns, and
    /// no key both used and revoked.
    ///
    /// # Errors
    ///
    /// The first field holding an unacceptable value.
    pub fn validate(&self) -> Result<(), RootError> {
        if self.version == 0 {
            return Err(invalid(
                "version",
                "0 is the implicit root of --trust keys; roots start at 1",
            ));
        }
        if self.expires_at <= self.issued_at {
            return Err(invalid("expires_at", "not after `issued_at`"));
        }
        let revoked: BTreeSet<KeyId> = self.revoked.iter().copied().collect();
        if revoked.len() != self.revoked.len() {
            return Err(invalid("revoked", "a key is listed twice"));
        }
        for (field, keys, threshold) in [
            ("root", self.root_keys.clone(), self.root_threshold),
            (
                "signing",
                self.signing_keys.iter().map(|k| k.key.clone()).collect(),
                self.signing_threshold,
            ),
        ] {
            if keys.is_empty() {
                return Err(invalid(format!("{field}_keys"), "no key"));
            }
            for (i, key) in keys.iter().enumerate() {
                if keys[..i].contains(key) {
                    return Err(invalid(
                        format!("{field}_keys[{i}]"),
                        format!("key {} is listed twice", key.id()),
                    ));
                }
                if revoked.contains(&key.id()) {
                    return Err(invalid(
                        format!("{field}_keys[{i}]"),
                        format!(
                            "key {} is also revoked; a revoked key signs nothing \
                             (`collector trust revoke` removes it)",
                            key.id()
                        ),
                    ));
                }
            }
            if threshold == 0 || threshold > keys.len() {
                return Err(invalid(
                    format!("{field}_threshold"),
                    format!(
                        "{threshold} can never be met safely: it must be from 1 to the {} \
                         {field} key(s)",
                        keys.len()
                    ),
                ));
            }
        }
        for (i, key) in self.signing_keys.iter().enumerate() {
            if let Some(patterns) = &key.modules {
                let field = format!("signing_keys[{i}].modules");
                if patterns.is_empty() {
                    return Err(invalid(
                        field,
                        "an empty list lets the key sign nothing; leave it out for any module",
                    ));
                }
                if patterns.len() > MAX_SCOPE_PATTERNS {
                    return Err(invalid(
                        field,
                        format!("{} patterns, at most {MAX_SCOPE_PATTERNS}", patterns.len()),
                    ));
                }
                for p in patterns {
                    check_scope_pattern(p).map_err(|e| invalid(field.clone(), e))?;
                }
            }
        }
        Ok(())
    }

    /// The document's bytes: pretty JSON, what signatures cover.
    pub fn to_bytes(&self) -> Vec<u8> {
        let json = RootJson {
            format: ROOT_FORMAT.into(),
            version: self.version,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            root_keys: self.root_keys.iter().map(encode_key).collect(),
            root_threshold: self.root_threshold,
            signing_keys: self
                .signing_keys
                .iter()
                .map(|k| SigningKeyJson {
                    key: encode_key(&k.key),
                    modules: k.modules.clone(),
                })
                .collect(),
            signing_threshold: self.signing_threshold,
            revoked: self.revoked.iter().map(KeyId::to_string).collect(),
        };
        serde_json::to_vec_pretty(&json).expect("a root document serializes")
    }

    /// The next version of this root, issued at `now` and expiring after `valid_for`
    /// (by default as long after `now` as this one was valid), with the same keys.
    pub fn next(&self, now: DateTime<Utc>, valid_for: Option<chrono::Duration>) -> Self {
        let valid_for = valid_for.unwrap_or(self.expires_at - self.issued_at);
        let now = now.trunc_subsecs(0);
        Self {
            version: self.version + 1,
            issued_at: now,
            expires_at: now + valid_for,
            ..self.clone()
        }
    }

    /// Revokes `id`: the key leaves the root and signing keys and joins `revoked`.
    /// Returns whether the key was one of this root's keys.
    pub fn revoke(&mut self, id: KeyId) -> bool {
        let before = self.root_keys.len() + self.signing_keys.len();
        self.root_keys.retain(|k| k.id() != id);
        self.signing_keys.retain(|k| k.key.id() != id);
        if !self.revoked.contains(&id) {
            self.revoked.push(id);
        }
        before != self.root_keys.len() + self.signing_keys.len()
    }

    /// The bundle trust store this root describes.
    ///
    /// # Errors
    ///
    /// Never for a validated document.
    pub fn trust_store(&self) -> Result<TrustStore, TrustError> {
        TrustStore::of_root(
            self.signing_keys
                .iter()
                .map(|k| (k.key.clone(), k.modules.clone()))
                .collect(),
            self.signing_threshold,
            self.revoked.clone(),
            self.version,
            self.expires_at,
        )
    }
}

/// A root file: the document, the exact bytes signed, and the signatures (not checked
/// yet; [`TrustRoot`] checks them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRoot {
    doc: RootDoc,
    signed: Vec<u8>,
    signatures: Vec<SignatureEntry>,
}

impl SignedRoot {
    /// Parses a root file.
    ///
    /// # Errors
    ///
    /// When it is too large, not the envelope, a signature does not decode, or the
    /// document is not a valid root.
    pub fn parse(bytes: &[u8]) -> Result<Self, RootError> {
        if bytes.len() > MAX_ROOT_LEN {
            return Err(RootError::TooLarge {
                len: bytes.len(),
                max: MAX_ROOT_LEN,
            });
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let envelope: EnvelopeJson = serde_path_to_error::deserialize(&mut *de)
            .map_err(|e| RootError::Envelope(format!("at `{}`: {}", e.path(), e.inner())))?;
        de.end()
            .map_err(|e| RootError::Envelope(format!("data after the root file: {e}")))?;
        if envelope.signatures.len() > MAX_SIGNATURES {
            return Err(RootError::Envelope(format!(
                "{} signatures, at most {MAX_SIGNATURES}",
                envelope.signatures.len()
            )));
        }
        let signatures = envelope
            .signatures
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let index = i + 1;
                let fail = |reason: String| RootError::Signature { index, reason };
                let key_id = s.key_id.parse::<KeyId>().map_err(|e| fail(e.to_string()))?;
                let bytes = BASE64
                    .decode(s.signature.as_bytes())
                    .map_err(|e| fail(format!("not base64: {e}")))?;
                let signature: [u8; 64] = bytes.as_slice().try_into().map_err(|_| {
                    fail(format!("{} bytes, an Ed25519 signature is 64", bytes.len()))
                })?;
                Ok(SignatureEntry { key_id, signature })
            })
            .collect::<Result<Vec<_>, RootError>>()?;
        let signed = envelope.signed.into_bytes();
        let doc = RootDoc::parse(&signed)?;
        Ok(Self {
            doc,
            signed,
            signatures,
        })
    }

    /// An unsigned root file holding `doc`.
    ///
    /// # Errors
    ///
    /// When the document is invalid.
    pub fn new(doc: &RootDoc) -> Result<Self, RootError> {
        doc.validate()?;
        let signed = doc.to_bytes();
        if signed.len() > MAX_ROOT_LEN / 2 {
            return Err(invalid(
                ".",
                format!("the document is {} bytes, too large", signed.len()),
            ));
        }
        Ok(Self {
            doc: doc.clone(),
            signed,
            signatures: Vec::new(),
        })
    }

    /// The document.
    pub fn doc(&self) -> &RootDoc {
        &self.doc
    }

    /// The exact bytes the signatures cover.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed
    }

    /// The signatures, in file order.
    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// SHA-256 of the signed bytes, lowercase hex: two files with the same digest hold
    /// the same root (whatever signatures they carry).
    pub fn digest(&self) -> String {
        sha256_hex(&self.signed)
    }

    /// The root file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let envelope = EnvelopeJson {
            signed: String::from_utf8(self.signed.clone()).expect("the signed bytes are UTF-8"),
            signatures: self
                .signatures
                .iter()
                .map(|s| SignatureJson {
                    key_id: s.key_id.to_string(),
                    signature: BASE64.encode(s.signature),
                })
                .collect(),
        };
        let mut out = serde_json::to_vec_pretty(&envelope).expect("a root file serializes");
        out.push(b'\n');
        out
    }

    /// Adds `key`'s signature. Returns false (and changes nothing) when the file already
    /// carries a valid signature by that key.
    ///
    /// # Errors
    ///
    /// When the file already holds [`MAX_SIGNATURES`] signatures.
    pub fn sign(&mut self, key: &SecretKey) -> Result<bool, RootError> {
        let public = key.public_key();
        if self
            .signatures
            .iter()
            .any(|s| public.verifies(&self.signed, &s.signature))
        {
            return Ok(false);
        }
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(RootError::Envelope(format!(
                "already {MAX_SIGNATURES} signatures, the most a root file holds"
            )));
        }
        self.signatures.push(key.sign(&self.signed));
        Ok(true)
    }

    /// Adds the signatures of `other` (a copy of the same root signed elsewhere) that
    /// this file lacks; returns how many were added.
    ///
    /// # Errors
    ///
    /// When `other` holds another document, or the signatures would be too many.
    pub fn merge(&mut self, other: &SignedRoot) -> Result<usize, RootError> {
        if other.signed != self.signed {
            return Err(RootError::Envelope(format!(
                "holds another root document (version {}, digest {}) than this one \
                 (version {}, digest {}); only copies of one root can be merged",
                other.doc.version,
                &other.digest()[..16],
                self.doc.version,
                &self.digest()[..16]
            )));
        }
        let mut added = 0;
        for s in &other.signatures {
            if self.signatures.iter().any(|m| m.signature == s.signature) {
                continue;
            }
            if self.signatures.len() >= MAX_SIGNATURES {
                return Err(RootError::Envelope(format!(
                    "more than {MAX_SIGNATURES} signatures, the most a root file holds"
                )));
            }
            self.signatures.push(s.clone());
            added += 1;
        }
        Ok(added)
    }

    /// The distinct keys of `keys`, not in `revoked`, with a valid signature here.
    pub fn signers_among(&self, keys: &[PublicKey], revoked: &[KeyId]) -> Vec<KeyId> {
        let mut out = Vec::new();
        for s in &self.signatures {
            if let Some(k) = keys
                .iter()
                .find(|k| !revoked.contains(&k.id()) && k.verifies(&self.signed, &s.signature))
                && !out.contains(&k.id())
            {
                out.push(k.id());
            }
        }
        out
    }

    /// The keys of `keys` that signed here but are in `revoked` (their signatures do
    /// not count).
    fn revoked_signers(&self, keys: &[PublicKey], revoked: &[KeyId]) -> Vec<KeyId> {
        let mut out = Vec::new();
        for s in &self.signatures {
            if let Some(k) = keys
                .iter()
                .find(|k| revoked.contains(&k.id()) && k.verifies(&self.signed, &s.signature))
                && !out.contains(&k.id())
            {
                out.push(k.id());
            }
        }
        out
    }
}

/// Why a root was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootRefusal {
    /// The version is not the one after the version held.
    #[error("{}", not_next(*held, *offered))]
    NotNext {
        /// The version held.
        held: u64,
        /// The version offered.
        offered: u64,
    },
    /// Too few of the held root's root keys signed it.
    #[error(
        "version {version} is signed by {} of the root keys of version {held}, {required} \
         required{}",
        count(signers),
        revoked_note(revoked)
    )]
    HeldThreshold {
        /// The version offered.
        version: u64,
        /// The version held.
        held: u64,
        /// The held root's root keys that signed it (revoked ones left out).
        signers: Vec<KeyId>,
        /// The held root's root threshold.
        required: usize,
        /// Held root keys that signed it but are revoked (by either root).
        revoked: Vec<KeyId>,
    },
    /// Too few of its own root keys signed it.
    #[error(
        "version {version} is signed by {} of its own root keys, {required} required{}",
        count(signers),
        revoked_note(revoked)
    )]
    OwnThreshold {
        /// The version offered.
        version: u64,
        /// Its root keys that signed it.
        signers: Vec<KeyId>,
        /// Its root threshold.
        required: usize,
        /// Always empty (its own root keys cannot be revoked by itself); kept for a
        /// uniform message.
        revoked: Vec<KeyId>,
    },
    /// The newest root offered has expired.
    #[error(
        "version {version} expired at {}, it is now {} (a root must be renewed before it \
         expires)",
        expires_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        now.to_rfc3339_opts(SecondsFormat::Secs, true)
    )]
    Expired {
        /// Its version.
        version: u64,
        /// Its expiry.
        expires_at: DateTime<Utc>,
        /// The time it was checked at.
        now: DateTime<Utc>,
    },
    /// The file is not a valid root; holds the reason.
    #[error("{0}")]
    Invalid(String),
}

fn not_next(held: u64, offered: u64) -> String {
    if offered <= held {
        format!(
            "version {offered} is not newer than version {held}, which this agent holds \
             (a root is never taken back)"
        )
    } else {
        format!(
            "version {offered} does not follow version {held}: version {} must come first",
            held + 1
        )
    }
}

fn count(signers: &[KeyId]) -> String {
    match signers.len() {
        0 => "none".into(),
        n => format!(
            "{n} ({})",
            signers
                .iter()
                .map(KeyId::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn revoked_note(revoked: &[KeyId]) -> String {
    if revoked.is_empty() {
        String::new()
    } else {
        format!(
            "; signatures by revoked key(s) {} do not count",
            revoked
                .iter()
                .map(KeyId::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// A root this agent holds: verified, from its installation or along the chain.
#[derive(Debug, Clone)]
pub struct TrustRoot {
    version: u64,
    expires_at: Option<DateTime<Utc>>,
    root_keys: Vec<PublicKey>,
    root_threshold: usize,
    revoked: Vec<KeyId>,
    store: TrustStore,
    signed: Option<SignedRoot>,
}

impl TrustRoot {
    /// Version 0: `--trust` key files. Their keys sign bundles and, with the same
    /// threshold, the first root.
    pub fn from_keys(store: TrustStore) -> Self {
        Self {
            version: 0,
            expires_at: None,
            root_keys: store.keys().to_vec(),
            root_threshold: store.threshold(),
            revoked: Vec::new(),
            store,
            signed: None,
        }
    }

    /// The root an agent is installed with. It must carry the threshold of its own root
    /// keys (a damaged or unsigned file is refused); its expiry is not checked here
    /// (bundles are refused under an expired root, [`crate::verify`]).
    ///
    /// # Errors
    ///
    /// [`RootRefusal::OwnThreshold`] when too few of its root keys signed it.
    pub fn install(signed: SignedRoot) -> Result<Self, RootRefusal> {
        let doc = signed.doc();
        let signers = signed.signers_among(&doc.root_keys, &doc.revoked);
        if signers.len() < doc.root_threshold {
            return Err(RootRefusal::OwnThreshold {
                version: doc.version,
                signers,
                required: doc.root_threshold,
                revoked: Vec::new(),
            });
        }
        Self::of(signed)
    }

    fn of(signed: SignedRoot) -> Result<Self, RootRefusal> {
        let doc = signed.doc();
        let store = doc
            .trust_store()
            .map_err(|e| RootRefusal::Invalid(e.to_string()))?;
        Ok(Self {
            version: doc.version,
            expires_at: Some(doc.expires_at),
            root_keys: doc.root_keys.clone(),
            root_threshold: doc.root_threshold,
            revoked: doc.revoked.clone(),
            store,
            signed: Some(signed),
        })
    }

    /// The root after this one, if `next` is it: exactly the next version, signed by
    /// the threshold of this root's root keys and by the threshold of its own, counting
    /// no key that either root revokes. Expiry is not checked ([`TrustRoot::advance`]
    /// checks the last of a chain).
    ///
    /// # Errors
    ///
    /// The first check that fails.
    pub fn follow(&self, next: &SignedRoot) -> Result<Self, RootRefusal> {
        let doc = next.doc();
        if doc.version != self.version + 1 {
            return Err(RootRefusal::NotNext {
                held: self.version,
                offered: doc.version,
            });
        }
        let revoked: Vec<KeyId> = self.revoked.iter().chain(&doc.revoked).copied().collect();
        let signers = next.signers_among(&self.root_keys, &revoked);
        if signers.len() < self.root_threshold {
            return Err(RootRefusal::HeldThreshold {
                version: doc.version,
                held: self.version,
                signers,
                required: self.root_threshold,
                revoked: next.revoked_signers(&self.root_keys, &revoked),
            });
        }
        let own = next.signers_among(&doc.root_keys, &doc.revoked);
        if own.len() < doc.root_threshold {
            return Err(RootRefusal::OwnThreshold {
                version: doc.version,
                signers: own,
                required: doc.root_threshold,
                revoked: Vec::new(),
            });
        }
        Self::of(next.clone())
    }

    /// Follows `chain` (consecutive versions after this one, in order) to its end; the
    /// last root must not have expired at `now` (the ones before it may have: an agent
    /// that slept through them still follows the chain).
    ///
    /// # Errors
    ///
    /// The first refusal; nothing is taken then.
    pub fn advance<'a>(
        &self,
        chain: impl IntoIterator<Item = &'a SignedRoot>,
        now: DateTime<Utc>,
    ) -> Result<Self, RootRefusal> {
        let mut held = self.clone();
        for next in chain {
            held = held.follow(next)?;
        }
        if let Some(expires_at) = held.expires_at
            && held.version != self.version
            && now >= expires_at
        {
            return Err(RootRefusal::Expired {
                version: held.version,
                expires_at,
                now,
            });
        }
        Ok(held)
    }

    /// Its version; 0 for `--trust` key files.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When it expires; `None` for `--trust` key files.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    /// The store bundles are checked against.
    pub fn store(&self) -> &TrustStore {
        &self.store
    }

    /// Its root keys.
    pub fn root_keys(&self) -> &[PublicKey] {
        &self.root_keys
    }

    /// How many of its root keys must sign the next root.
    pub fn root_threshold(&self) -> usize {
        self.root_threshold
    }

    /// The root file, for roots from a file (not version 0).
    pub fn signed(&self) -> Option<&SignedRoot> {
        self.signed.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn now() -> DateTime<Utc> {
        at("2027-01-01T00:00:00Z")
    }

    /// Version 1: root keys 1, 2, 3 (threshold 2), signing key 10.
    fn first() -> RootDoc {
        RootDoc {
            version: 1,
            issued_at: at("2026-12-01T00:00:00Z"),
            expires_at: at("2027-12-01T00:00:00Z"),
            root_keys: vec![
                key(1).public_key(),
                key(2).public_key(),
                key(3).public_key(),
            ],
            root_threshold: 2,
            signing_keys: vec![RootSigningKey {
                key: key(10).public_key(),
                modules: None,
            }],
            signing_threshold: 1,
            revoked: Vec::new(),
        }
    }

    fn signed(doc: &RootDoc, by: &[u8]) -> SignedRoot {
        let mut s = SignedRoot::new(doc).unwrap();
        for n in by {
            s.sign(&key(*n)).unwrap();
        }
        s
    }

    #[test]
    fn root_files_round_trip_and_refuse_trailing_or_unknown_data() {
        let s = signed(&first(), &[1, 2]);
        let bytes = s.to_bytes();
        assert_eq!(SignedRoot::parse(&bytes).unwrap(), s);
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"{}");
        let err = SignedRoot::parse(&trailing).unwrap_err().to_string();
        assert!(err.contains("data after the root file"), "{err}");
        let text = String::from_utf8(bytes).unwrap();
        let extra = text.replacen("{", "{\"extra\": 1,", 1);
        assert!(SignedRoot::parse(extra.as_bytes()).is_err());
        // Inside the signed document too.
        let doc = String::from_utf8(first().to_bytes()).unwrap();
        let doc = doc.replacen("{", "{\"extra\": 1,", 1);
        let err = RootDoc::parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("extra"), "{err}");
        let err = RootDoc::parse(
            format!("{} x", String::from_utf8(first().to_bytes()).unwrap()).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("data after the root document"), "{err}");
    }

    #[test]
    fn invalid_documents_name_their_field() {
        type Edit = Box<dyn Fn(&mut RootDoc)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|d| d.version = 0), "version"),
            (Box::new(|d| d.expires_at = d.issued_at), "expires_at"),
            (Box::new(|d| d.root_threshold = 4), "root_threshold"),
            (Box::new(|d| d.root_threshold = 0), "root_threshold"),
            (Box::new(|d| d.signing_threshold = 2), "signing_threshold"),
            (
                Box::new(|d| d.root_keys.push(key(1).public_key())),
                "root_keys[3]",
            ),
            (Box::new(|d| d.revoked.push(key(2).id())), "root_keys[1]"),
            (
                Box::new(|d| d.signing_keys[0].modules = Some(vec![])),
                "signing_keys[0].modules",
            ),
            (
                Box::new(|d| d.signing_keys[0].modules = Some(vec!["*".into()])),
                "signing_keys[0].modules",
            ),
            (
                Box::new(|d| d.signing_keys[0].modules = Some(vec!["a/b".into()])),
                "signing_keys[0].modules",
            ),
        ];
        for (edit, field) in cases {
            let mut d = first();
            edit(&mut d);
            let err = d.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
    }

    #[test]
    fn a_chain_of_rotations_is_followed_step_by_step() {
        let v1 = signed(&first(), &[1, 2]);
        let held = TrustRoot::install(v1.clone()).unwrap();
        // v2: root key 3 replaced by 4; signed by 1+2 of v1 and 1+4 of its own.
        let mut d2 = first().next(at("2026-12-02T00:00:00Z"), None);
        d2.root_keys = vec![
            key(1).public_key(),
            key(2).public_key(),
            key(4).public_key(),
        ];
        let v2 = signed(&d2, &[1, 2, 4]);
        // v3: signing key 10 → 11.
        let mut d3 = d2.next(at("2026-12-03T00:00:00Z"), None);
        d3.signing_keys[0].key = key(11).public_key();
        let v3 = signed(&d3, &[2, 4]);
        let end = held.advance([&v2, &v3], now()).unwrap();
        assert_eq!(end.version(), 3);
        assert_eq!(end.store().keys(), &[key(11).public_key()]);
        // Skipping a version is refused, as is going back.
        let err = held.follow(&v3).unwrap_err();
        assert!(
            matches!(
                err,
                RootRefusal::NotNext {
                    held: 1,
                    offered: 3
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("version 2 must come first"),
            "{err}"
        );
        let err = end.follow(&v2).unwrap_err();
        assert!(err.to_string().contains("never taken back"), "{err}");
    }

    #[test]
    fn a_root_needs_both_thresholds_and_revoked_keys_do_not_count() {
        let held = TrustRoot::install(signed(&first(), &[1, 2])).unwrap();
        let d2 = first().next(at("2026-12-02T00:00:00Z"), None);
        // One held root key: below the threshold.
        let err = held.follow(&signed(&d2, &[1])).unwrap_err();
        assert!(
            matches!(err, RootRefusal::HeldThreshold { required: 2, .. }),
            "{err}"
        );
        // New root keys only: the held ones did not vouch for them.
        let mut takeover = d2.clone();
        takeover.root_keys = vec![key(20).public_key(), key(21).public_key()];
        let err = held.follow(&signed(&takeover, &[20, 21])).unwrap_err();
        assert!(matches!(err, RootRefusal::HeldThreshold { .. }), "{err}");
        // Held keys, but not its own: refused too.
        let err = held.follow(&signed(&takeover, &[1, 2])).unwrap_err();
        assert!(matches!(err, RootRefusal::OwnThreshold { .. }), "{err}");
        // Signed by 1 and 3 where the root revokes 3: 3 does not count.
        let mut revoking = d2.clone();
        revoking.revoke(key(3).id());
        revoking.root_threshold = 2;
        let err = held.follow(&signed(&revoking, &[1, 3])).unwrap_err();
        assert!(err.to_string().contains("revoked key(s)"), "{err}");
        held.follow(&signed(&revoking, &[1, 2])).unwrap();
    }

    #[test]
    fn only_the_last_root_of_a_chain_must_be_unexpired() {
        let held = TrustRoot::install(signed(&first(), &[1, 2])).unwrap();
        let d2 = first().next(at("2026-12-02T00:00:00Z"), Some(chrono::Duration::days(1)));
        let v2 = signed(&d2, &[1, 2]);
        let err = held.advance([&v2], now()).unwrap_err();
        assert!(
            matches!(err, RootRefusal::Expired { version: 2, .. }),
            "{err}"
        );
        let d3 = d2.next(at("2026-12-30T00:00:00Z"), Some(chrono::Duration::days(90)));
        let v3 = signed(&d3, &[1, 2]);
        assert_eq!(held.advance([&v2, &v3], now()).unwrap().version(), 3);
    }

    #[test]
    fn version_zero_keys_sign_the_first_root() {
        let store = TrustStore::new([key(10).public_key()], 1).unwrap();
        let zero = TrustRoot::from_keys(store);
        let v1 = signed(&first(), &[1, 2]);
        assert!(matches!(
            zero.follow(&v1),
            Err(RootRefusal::HeldThreshold { .. })
        ));
        let v1 = signed(&first(), &[1, 2, 10]);
        assert_eq!(zero.follow(&v1).unwrap().version(), 1);
    }

    #[test]
    fn merging_gathers_signatures_of_one_document_only() {
        let mut a = signed(&first(), &[1]);
        let b = signed(&first(), &[2]);
        assert_eq!(a.merge(&b).unwrap(), 1);
        assert_eq!(a.merge(&b).unwrap(), 0);
        assert!(
            !a.sign(&key(1)).unwrap(),
            "a second signature by one key is not added"
        );
        let other = signed(&first().next(now(), None), &[3]);
        assert!(a.merge(&other).is_err());
        assert_eq!(TrustRoot::install(a).unwrap().version(), 1);
    }
}
