//! Deciding whether a bundle may run here, and making bundles. The checks run in a fixed
//! order, cheapest and least trusting first, so that nothing an attacker controls is
//! acted upon before the signatures vouch for it.

use std::fmt;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};

use super::format::{Bundle, FormatError, MAX_BUNDLE_LEN, ReadProblem, read_bounded};
use super::keys::{KeyId, PublicKey, SecretKey, TrustStore};
use super::manifest::{FORMAT, Manifest, ManifestError, sha256_hex, wit_targets};
use super::versions::{RollbackError, VersionStore};

/// A bundle that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest, parsed and checked.
    pub manifest: Manifest,
    /// The component bytes, whose length and hash match the manifest.
    pub component: Vec<u8>,
    /// The distinct trusted keys whose signatures verified, in signature order.
    pub signers: Vec<KeyId>,
}

/// A refused bundle: which bundle, and why.
#[derive(Debug, thiserror::Error)]
#[error("bundle {bundle}: {refusal}")]
pub struct VerifyError {
    /// The bundle as the caller named it (usually its path).
    pub bundle: String,
    /// Why it was refused.
    pub refusal: Refusal,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The bundle file could not be read, is not a regular file, or is larger than
    /// [`MAX_BUNDLE_LEN`] ([`verify_file`] only).
    #[error(transparent)]
    Read(#[from] ReadProblem),
    /// The bytes are not a well-formed bundle container.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The manifest does not parse, or holds a value no valid manifest has.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Fewer distinct trusted keys signed the manifest than the trust store requires.
    #[error("{}", threshold_message(signers, *required, problems))]
    Threshold {
        /// The distinct trusted keys whose signatures verified.
        signers: Vec<KeyId>,
        /// The trust store's threshold.
        required: usize,
        /// Why each signature that did not count did not, in signature order.
        problems: Vec<SignatureProblem>,
    },
    /// The trust root the store comes from expired: no new bundle is accepted until a
    /// renewed root arrives (modules already running go on).
    #[error(
        "the trust root (version {version}) expired at {}, it is now {}; no new bundle is \
         accepted until a renewed root arrives (`collector trust renew`)",
        expires_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        now.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    )]
    RootExpired {
        /// The root's version.
        version: u64,
        /// The root's `expires_at`.
        expires_at: DateTime<Utc>,
        /// The instant the bundle was checked at.
        now: DateTime<Utc>,
    },
    /// The manifest's `format` is not [`FORMAT`].
    #[error("manifest format is {found:?}, this host reads {expected:?}")]
    WrongFormat {
        /// The manifest's `format`.
        found: String,
        /// [`FORMAT`].
        expected: &'static str,
    },
    /// The manifest's `wit` target is none of those this host implements.
    #[error("the component targets WIT {found:?}, this host implements {expected:?}")]
    WrongWit {
        /// The manifest's `wit`.
        found: String,
        /// Every target this host implements, joined with " or ".
        expected: String,
    },
    /// The manifest's `expires_at` is at or before `now`.
    #[error(
        "the bundle expired at {}, it is now {}",
        expires_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        now.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    )]
    Expired {
        /// The manifest's `expires_at`.
        expires_at: DateTime<Utc>,
        /// The instant the bundle was checked at, as the caller gave it.
        now: DateTime<Utc>,
    },
    /// The component's length is not the manifest's `length`: bytes were added or removed
    /// after signing.
    #[error(
        "the component is {actual} bytes, the manifest says {declared} (bytes were added or \
         removed after signing)"
    )]
    LengthMismatch {
        /// The manifest's `length`, in bytes.
        declared: u64,
        /// The component's length, in bytes.
        actual: u64,
    },
    /// The component's SHA-256 is not the manifest's `sha256`: it was altered after
    /// signing.
    #[error(
        "the component's sha256 is {actual}, the manifest says {declared} (the component was \
         altered after signing)"
    )]
    HashMismatch {
        /// The manifest's `sha256`, lowercase hex.
        declared: String,
        /// The component's SHA-256, lowercase hex.
        actual: String,
    },
    /// The bundle would take its module back to a version this agent no longer accepts.
    #[error(transparent)]
    Rollback(#[from] RollbackError),
}

/// Why one signature of a bundle did not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureProblem {
    /// It claims a key id that is not trusted and verifies under no trusted key.
    UnknownKey {
        /// The signature's position in the bundle, counting from 1.
        index: usize,
        /// The key id it claims.
        key_id: KeyId,
    },
    /// It claims a trusted key id but verifies under no trusted key: the manifest was
    /// altered, or the signature was taken from another bundle.
    Invalid {
        /// The signature's position in the bundle, counting from 1.
        index: usize,
        /// The trusted key id it claims.
        key_id: KeyId,
    },
    /// It claims a key the trust root revoked (and verifies under no trusted key).
    Revoked {
        /// The signature's position in the bundle, counting from 1.
        index: usize,
        /// The revoked key id it claims.
        key_id: KeyId,
    },
    /// It verifies under a trusted key that the trust root limits to other modules.
    OutOfScope {
        /// The signature's position in the bundle, counting from 1.
        index: usize,
        /// The trusted key it verifies under.
        signer: KeyId,
        /// The bundle's module name.
        module: String,
        /// The module names (or `prefix*` patterns) the key may sign.
        allowed: Vec<String>,
    },
    /// It verifies under a trusted key that an earlier signature already counted for.
    Duplicate {
        /// The signature's position in the bundle, counting from 1.
        index: usize,
        /// The trusted key it verifies under.
        signer: KeyId,
    },
}

impl fmt::Display for SignatureProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey { index, key_id } => write!(
                f,
                "signature {index} is by key {key_id}, which is not trusted"
            ),
            Self::Invalid { index, key_id } => write!(
                f,
                "signature {index} claims trusted key {key_id} but does not verify over this \
                 manifest (altered, or copied from another bundle)"
            ),
            Self::Revoked { index, key_id } => write!(
                f,
                "signature {index} is by key {key_id}, which the trust root revoked"
            ),
            Self::OutOfScope {
                index,
                signer,
                module,
                allowed,
            } => write!(
                f,
                "signature {index} is by key {signer}, which the trust root allows to sign \
                 {} only, not {module:?}",
                allowed.join(", ")
            ),
            Self::Duplicate { index, signer } => write!(
                f,
                "signature {index} is another signature by key {signer}, which counts once"
            ),
        }
    }
}

fn threshold_message(signers: &[KeyId], required: usize, problems: &[SignatureProblem]) -> String {
    let mut out = match signers.len() {
        0 => format!("signed by no trusted key, {required} required"),
        n => {
            let ids: Vec<String> = signers.iter().map(KeyId::to_string).collect();
            format!(
                "signed by {n} distinct trusted key(s) ({}), {required} required",
                ids.join(", ")
            )
        }
    };
    if problems.is_empty() && signers.is_empty() {
        out.push_str(" (the bundle carries no signature)");
    }
    for p in problems {
        out.push_str("; ");
        out.push_str(&p.to_string());
    }
    out
}

/// Checks a bundle held in memory; `bundle` names it in errors. `now` decides expiry.
/// With `versions`, a bundle that would take its module back is refused; nothing is
/// recorded.
///
/// # Errors
///
/// The first check that fails, in this order: container, manifest, the trust root's
/// expiry (when the store comes from one), signatures and threshold (each signer within
/// its module scope), format and WIT target, expiry, component length, component hash,
/// anti-rollback.
pub fn verify(
    bundle: &str,
    bytes: &[u8],
    trust: &TrustStore,
    now: DateTime<Utc>,
    versions: Option<&VersionStore>,
) -> Result<Verified, VerifyError> {
    verify_inner(bytes, trust, now, versions).map_err(|refusal| VerifyError {
        bundle: bundle.to_string(),
        refusal,
    })
}

/// Reads (at most [`MAX_BUNDLE_LEN`] bytes) and checks a bundle file, as [`verify`].
///
/// # Errors
///
/// As [`verify`], and when the file cannot be read or is too large.
pub fn verify_file(
    path: &Path,
    trust: &TrustStore,
    now: DateTime<Utc>,
    versions: Option<&VersionStore>,
) -> Result<Verified, VerifyError> {
    let name = path.display().to_string();
    let bytes = read_bounded(path, MAX_BUNDLE_LEN).map_err(|e| VerifyError {
        bundle: name.clone(),
        refusal: e.into(),
    })?;
    verify(&name, &bytes, trust, now, versions)
}

fn verify_inner(
    bytes: &[u8],
    trust: &TrustStore,
    now: DateTime<Utc>,
    versions: Option<&VersionStore>,
) -> Result<Verified, Refusal> {
    let bundle = Bundle::parse(bytes)?;
    let manifest = Manifest::parse(bundle.manifest)?;
    if let Some(expires_at) = trust.expires_at()
        && now >= expires_at
    {
        return Err(Refusal::RootExpired {
            version: trust.version(),
            expires_at,
            now,
        });
    }

    let mut signers: Vec<&PublicKey> = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in bundle.signatures.iter().enumerate() {
        let index = i + 1;
        match trust.signer_of(bundle.manifest, &entry.signature) {
            Some(key) if !trust.may_sign(key, &manifest.name) => {
                problems.push(SignatureProblem::OutOfScope {
                    index,
                    signer: key.id(),
                    module: manifest.name.clone(),
                    allowed: trust.scope_of(key).unwrap_or_default().to_vec(),
                });
            }
            Some(key) if signers.contains(&key) => problems.push(SignatureProblem::Duplicate {
                index,
                signer: key.id(),
            }),
            Some(key) => signers.push(key),
            None if trust.is_revoked(entry.key_id) => problems.push(SignatureProblem::Revoked {
                index,
                key_id: entry.key_id,
            }),
            None if trust.knows(entry.key_id) => problems.push(SignatureProblem::Invalid {
                index,
                key_id: entry.key_id,
            }),
            None => problems.push(SignatureProblem::UnknownKey {
                index,
                key_id: entry.key_id,
            }),
        }
    }
    let signers: Vec<KeyId> = signers.iter().map(|k| k.id()).collect();
    if signers.len() < trust.threshold() {
        return Err(Refusal::Threshold {
            signers,
            required: trust.threshold(),
            problems,
        });
    }

    if manifest.format != FORMAT {
        return Err(Refusal::WrongFormat {
            found: manifest.format,
            expected: FORMAT,
        });
    }
    let supported = wit_targets();
    if !supported.contains(&manifest.wit) {
        return Err(Refusal::WrongWit {
            found: manifest.wit,
            expected: supported.join(" or "),
        });
    }
    if let Some(expires_at) = manifest.expires_at
        && now >= expires_at
    {
        return Err(Refusal::Expired { expires_at, now });
    }
    check_component(&manifest, bundle.component)?;
    if let Some(versions) = versions {
        versions.check(&manifest)?;
    }
    Ok(Verified {
        manifest,
        component: bundle.component.to_vec(),
        signers,
    })
}

/// Whether `component` is what `manifest` describes: its length first (cheap, and
/// catches appended data), then its SHA-256. Never parses the component.
///
/// # Errors
///
/// [`Refusal::LengthMismatch`] or [`Refusal::HashMismatch`].
pub fn check_component(manifest: &Manifest, component: &[u8]) -> Result<(), Refusal> {
    let actual = component.len() as u64;
    if actual != manifest.length {
        return Err(Refusal::LengthMismatch {
            declared: manifest.length,
            actual,
        });
    }
    let actual = sha256_hex(component);
    if actual != manifest.sha256 {
        return Err(Refusal::HashMismatch {
            declared: manifest.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// No signing key was given.
    #[error("no signing key given")]
    NoKey,
    /// The same key was given more than once; holds its id.
    #[error("key {0} is given twice; each signature must come from a different key")]
    DuplicateKey(KeyId),
    /// The manifest's `length` or `sha256` does not match the component
    /// ([`Refusal::LengthMismatch`] or [`Refusal::HashMismatch`]).
    #[error("the manifest does not describe the component: {0}")]
    Component(Refusal),
    /// The manifest holds a value no valid manifest has (see [`Manifest::validate`]).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest section or the whole bundle would be over its size cap.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Makes a bundle: serializes `manifest` once, signs those exact bytes with each key,
/// and packs them with `component`.
///
/// # Errors
///
/// When no key is given or a key is given twice, the manifest is invalid or does not
/// describe `component`, or the bundle would exceed a size cap.
pub fn sign(
    manifest: &Manifest,
    component: &[u8],
    keys: &[&SecretKey],
) -> Result<Vec<u8>, SignError> {
    if keys.is_empty() {
        return Err(SignError::NoKey);
    }
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].iter().any(|k| k.id() == key.id()) {
            return Err(SignError::DuplicateKey(key.id()));
        }
    }
    manifest.validate()?;
    check_component(manifest, component).map_err(SignError::Component)?;
    let manifest_bytes = manifest.to_json();
    let bundle = Bundle {
        manifest: &manifest_bytes,
        signatures: keys.iter().map(|k| k.sign(&manifest_bytes)).collect(),
        component,
    };
    Ok(bundle.encode()?)
}

#[cfg(test)]
mod tests {
    use super::super::format::MAX_MANIFEST_LEN;
    use super::*;

    const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0 pretend this is a component";

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        rfc3339.parse().unwrap()
    }

    fn now() -> DateTime<Utc> {
        at("2025-06-01T00:00:00Z")
    }

    fn manifest(version: u64, component: &[u8]) -> Manifest {
        let mut m = Manifest::describe(
            "process-perf",
            version,
            component,
            at("2025-01-01T00:00:00Z"),
        );
        m.expires_at = Some(at("2026-01-01T00:00:00Z"));
        m
    }

    fn trust(keys: &[&SecretKey], threshold: usize) -> TrustStore {
        TrustStore::new(keys.iter().map(|k| k.public_key()), threshold).unwrap()
    }

    fn signed(keys: &[&SecretKey]) -> Vec<u8> {
        sign(&manifest(3, COMPONENT), COMPONENT, keys).unwrap()
    }

    fn refusal(bytes: &[u8], trust: &TrustStore) -> Refusal {
        let err = verify("test.bundle", bytes, trust, now(), None).unwrap_err();
        assert_eq!(err.bundle, "test.bundle");
        assert!(err.to_string().starts_with("bundle test.bundle: "), "{err}");
        err.refusal
    }

    /// Re-packs a bundle after `edit` changes its parts; signatures are kept as they are.
    fn repack(bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> Vec<u8> {
        let b = Bundle::parse(bytes).unwrap();
        let mut manifest = b.manifest.to_vec();
        let mut component = b.component.to_vec();
        edit(&mut manifest, &mut component);
        Bundle {
            manifest: &manifest,
            signatures: b.signatures,
            component: &component,
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn a_well_signed_bundle_is_accepted_with_its_signers() {
        let (a, b) = (key(1), key(2));
        let bytes = signed(&[&a, &b]);
        let v = verify("ok", &bytes, &trust(&[&a, &b], 2), now(), None).unwrap();
        assert_eq!(v.component, COMPONENT);
        assert_eq!(v.signers, [a.id(), b.id()]);
        assert_eq!(v.manifest, manifest(3, COMPONENT));
    }

    #[test]
    fn one_byte_flipped_in_the_component_is_a_hash_mismatch() {
        let a = key(1);
        let mut bytes = signed(&[&a]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            refusal(&bytes, &trust(&[&a], 1)),
            Refusal::HashMismatch { .. }
        ));
    }

    #[test]
    fn appended_bytes_or_a_custom_section_are_a_length_mismatch() {
        let a = key(1);
        let bytes = signed(&[&a]);
        let mut appended = bytes.clone();
        appended.extend_from_slice(b"tail");
        assert!(matches!(
            refusal(&appended, &trust(&[&a], 1)),
            Refusal::LengthMismatch { declared, actual } if actual == declared + 4
        ));
        // A custom section (id 0, size 6, name "x", payload "evil") after the header.
        let with_section = repack(&bytes, |_, c| {
            c.splice(8..8, [0u8, 6, 1, b'x', b'e', b'v', b'i', b'l']);
        });
        assert!(matches!(
            refusal(&with_section, &trust(&[&a], 1)),
            Refusal::LengthMismatch { .. }
        ));
    }

    #[test]
    fn a_signed_manifest_of_two_documents_is_refused() {
        let a = key(1);
        let mut wider = manifest(3, COMPONENT);
        wider.grants.publish = vec![">".into()];
        let mut two = manifest(3, COMPONENT).to_json();
        two.extend_from_slice(&wider.to_json());
        // Signed as it is: the signers vouched for these exact bytes.
        let bytes = Bundle {
            manifest: &two,
            signatures: vec![a.sign(&two)],
            component: COMPONENT,
        }
        .encode()
        .unwrap();
        let err = refusal(&bytes, &trust(&[&a], 1));
        assert!(matches!(err, Refusal::Manifest(_)), "{err}");
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn a_component_swapped_for_one_of_the_same_length_is_a_hash_mismatch() {
        let a = key(1);
        let swapped = repack(&signed(&[&a]), |_, c| c.iter_mut().for_each(|b| *b = b'x'));
        let err = refusal(&swapped, &trust(&[&a], 1));
        assert!(matches!(err, Refusal::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("altered after signing"), "{err}");
    }

    #[test]
    fn an_edited_manifest_no_longer_verifies() {
        let a = key(1);
        let raised = repack(&signed(&[&a]), |m, _| {
            let text = String::from_utf8(m.clone()).unwrap();
            *m = text
                .replace("\"version\": 3", "\"version\": 4")
                .into_bytes();
        });
        let err = refusal(&raised, &trust(&[&a], 1));
        assert!(
            matches!(&err, Refusal::Threshold { problems, .. }
                if problems == &[SignatureProblem::Invalid { index: 1, key_id: a.id() }]),
            "{err}"
        );
    }

    #[test]
    fn a_signature_from_an_unknown_key_does_not_count() {
        let (a, stranger) = (key(1), key(9));
        let err = refusal(&signed(&[&stranger]), &trust(&[&a], 1));
        assert!(
            matches!(&err, Refusal::Threshold { signers, required: 1, problems }
                if signers.is_empty()
                && problems == &[SignatureProblem::UnknownKey { index: 1, key_id: stranger.id() }]),
            "{err}"
        );
        assert!(err.to_string().contains("not trusted"), "{err}");
    }

    #[test]
    fn a_signature_copied_from_another_bundle_fails() {
        let a = key(1);
        let other = sign(&manifest(9, b"other component"), b"other component", &[&a]).unwrap();
        let stolen = Bundle::parse(&other).unwrap().signatures;
        let bytes = signed(&[&key(2)]);
        let b = Bundle::parse(&bytes).unwrap();
        let forged = Bundle {
            signatures: stolen,
            ..b
        }
        .encode()
        .unwrap();
        let err = refusal(&forged, &trust(&[&a], 1));
        assert!(
            matches!(&err, Refusal::Threshold { problems, .. }
                if problems == &[SignatureProblem::Invalid { index: 1, key_id: a.id() }]),
            "{err}"
        );
        assert!(
            err.to_string().contains("copied from another bundle"),
            "{err}"
        );
    }

    #[test]
    fn the_threshold_counts_distinct_trusted_keys() {
        let (a, b, c) = (key(1), key(2), key(3));
        let store = trust(&[&a, &b, &c], 2);
        assert!(matches!(
            refusal(&signed(&[&a]), &store),
            Refusal::Threshold { required: 2, .. }
        ));
        assert!(verify("two", &signed(&[&a, &c]), &store, now(), None).is_ok());
        assert!(matches!(
            refusal(&unsigned(), &store),
            Refusal::Threshold { .. }
        ));
    }

    /// A bundle with a valid manifest and component but no signature at all.
    fn unsigned() -> Vec<u8> {
        let m = manifest(3, COMPONENT).to_json();
        Bundle {
            manifest: &m,
            signatures: vec![],
            component: COMPONENT,
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn the_same_key_under_two_key_ids_counts_once() {
        let (a, b) = (key(1), key(2));
        let bytes = signed(&[&a]);
        let parsed = Bundle::parse(&bytes).unwrap();
        let mut relabelled = parsed.signatures[0].clone();
        relabelled.key_id = b.id();
        let doubled = Bundle {
            signatures: vec![parsed.signatures[0].clone(), relabelled],
            ..parsed
        }
        .encode()
        .unwrap();
        let err = refusal(&doubled, &trust(&[&a, &b], 2));
        assert!(
            matches!(&err, Refusal::Threshold { signers, problems, .. }
                if signers == &[a.id()]
                && problems == &[SignatureProblem::Duplicate { index: 2, signer: a.id() }]),
            "{err}"
        );
        // Nor does the same key given twice to the trust store lower the bar.
        assert!(TrustStore::new([a.public_key(), a.public_key()], 2).is_err());
    }

    #[test]
    fn an_expired_bundle_is_refused_by_the_given_clock() {
        let a = key(1);
        let bytes = signed(&[&a]);
        let store = trust(&[&a], 1);
        assert!(verify("b", &bytes, &store, at("2025-12-31T23:59:59Z"), None).is_ok());
        let err = verify("b", &bytes, &store, at("2026-01-01T00:00:00Z"), None).unwrap_err();
        assert!(matches!(err.refusal, Refusal::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at 2026-01-01"), "{err}");
    }

    #[test]
    fn a_manifest_for_another_wit_package_or_format_is_refused() {
        let a = key(1);
        let store = trust(&[&a], 1);
        let mut m = manifest(3, COMPONENT);
        m.wit = "other:api@0.1.0".into();
        let err = refusal(&sign(&m, COMPONENT, &[&a]).unwrap(), &store);
        assert!(
            matches!(&err, Refusal::WrongWit { found, expected }
                if found == "other:api@0.1.0"
                    && expected == "collector:api@0.1.0 or collector:api@0.2.0"),
            "{err}"
        );
        m.wit = "collector:api@0.3.0".into();
        assert!(matches!(
            refusal(&sign(&m, COMPONENT, &[&a]).unwrap(), &store),
            Refusal::WrongWit { .. }
        ));
        let mut m = manifest(3, COMPONENT);
        m.format = "collector-bundle/2".into();
        assert!(matches!(
            refusal(&sign(&m, COMPONENT, &[&a]).unwrap(), &store),
            Refusal::WrongFormat { .. }
        ));
    }

    #[test]
    fn rollback_is_refused_through_the_version_store() {
        let a = key(1);
        let store = trust(&[&a], 1);
        let dir = tempfile::tempdir().unwrap();
        let mut versions = VersionStore::open(dir.path()).unwrap();
        let v3 = signed(&[&a]);
        let accepted = verify("v3", &v3, &store, now(), Some(&versions)).unwrap();
        versions.record(&accepted.manifest).unwrap();
        assert!(verify("v3 again", &v3, &store, now(), Some(&versions)).is_ok());

        let v2 = sign(&manifest(2, COMPONENT), COMPONENT, &[&a]).unwrap();
        let err = verify("v2", &v2, &store, now(), Some(&versions)).unwrap_err();
        assert!(
            matches!(
                err.refusal,
                Refusal::Rollback(RollbackError::Older {
                    offered: 2,
                    accepted: 3,
                    floor: 3,
                    ..
                })
            ),
            "{err}"
        );
        let other = b"\0asm\x0d\0\x01\0 a different component".as_slice();
        let v3b = sign(&manifest(3, other), other, &[&a]).unwrap();
        let err = verify("v3b", &v3b, &store, now(), Some(&versions)).unwrap_err();
        assert!(
            matches!(
                err.refusal,
                Refusal::Rollback(RollbackError::SameVersionOtherBytes { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn the_declared_component_length_larger_than_the_bytes_is_refused() {
        let a = key(1);
        let mut m = manifest(3, COMPONENT);
        m.length += 1000;
        let manifest_bytes = m.to_json();
        let bytes = Bundle {
            manifest: &manifest_bytes,
            signatures: vec![a.sign(&manifest_bytes)],
            component: COMPONENT,
        }
        .encode()
        .unwrap();
        assert!(matches!(
            refusal(&bytes, &trust(&[&a], 1)),
            Refusal::LengthMismatch { declared, actual } if declared == actual + 1000
        ));
    }

    #[test]
    fn container_damage_is_refused_before_anything_else() {
        let a = key(1);
        let store = trust(&[&a], 1);
        let mut bytes = MAGIC_HEADER.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"{}");
        assert!(matches!(
            refusal(&bytes, &store),
            Refusal::Format(FormatError::SectionTooLarge { .. })
        ));
        let mut bytes = MAGIC_HEADER.to_vec();
        bytes.extend_from_slice(&(MAX_MANIFEST_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(b"{}");
        assert!(matches!(
            refusal(&bytes, &store),
            Refusal::Format(FormatError::SectionPastEnd { .. })
        ));
        assert!(matches!(
            refusal(COMPONENT, &store),
            Refusal::Format(FormatError::BareWasm)
        ));
    }

    const MAGIC_HEADER: &[u8] = super::super::format::MAGIC;

    #[test]
    fn an_unknown_manifest_field_is_refused_even_when_signed() {
        let a = key(1);
        let mut value: serde_json::Value =
            serde_json::from_slice(&manifest(3, COMPONENT).to_json()).unwrap();
        value["grants"]["subscribe"] = serde_json::json!([">"]);
        let manifest_bytes = serde_json::to_vec(&value).unwrap();
        let bytes = Bundle {
            manifest: &manifest_bytes,
            signatures: vec![a.sign(&manifest_bytes)],
            component: COMPONENT,
        }
        .encode()
        .unwrap();
        let err = refusal(&bytes, &trust(&[&a], 1));
        assert!(matches!(err, Refusal::Manifest(_)), "{err}");
        assert!(err.to_string().contains("subscribe"), "{err}");
    }

    #[test]
    fn verify_file_reads_with_a_cap_and_names_the_file() {
        let a = key(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bundle");
        std::fs::write(&path, signed(&[&a])).unwrap();
        let v = verify_file(&path, &trust(&[&a], 1), now(), None).unwrap();
        assert_eq!(v.component, COMPONENT);
        let missing = dir.path().join("missing.bundle");
        let err = verify_file(&missing, &trust(&[&a], 1), now(), None).unwrap_err();
        assert!(err.to_string().contains("missing.bundle"), "{err}");
        assert!(matches!(err.refusal, Refusal::Read(_)));
    }

    #[test]
    fn sign_refuses_what_it_cannot_vouch_for() {
        let a = key(1);
        let m = manifest(3, COMPONENT);
        assert!(matches!(sign(&m, COMPONENT, &[]), Err(SignError::NoKey)));
        assert!(matches!(
            sign(&m, COMPONENT, &[&a, &key(1)]),
            Err(SignError::DuplicateKey(_))
        ));
        assert!(matches!(
            sign(&m, b"something else", &[&a]),
            Err(SignError::Component(_))
        ));
        let mut bad = m.clone();
        bad.name = "no spaces allowed".into();
        assert!(matches!(
            sign(&bad, COMPONENT, &[&a]),
            Err(SignError::Manifest(_))
        ));
    }

    /// A store from a root: key 1 may sign `process-*` only, key 2 any module, key 3 is
    /// revoked; the root expires at the end of 2025.
    fn root_store() -> TrustStore {
        let doc = crate::RootDoc {
            version: 4,
            issued_at: at("2025-01-01T00:00:00Z"),
            expires_at: at("2026-01-01T00:00:00Z"),
            root_keys: vec![key(9).public_key()],
            root_threshold: 1,
            signing_keys: vec![
                crate::RootSigningKey {
                    key: key(1).public_key(),
                    modules: Some(vec!["process-*".into()]),
                },
                crate::RootSigningKey {
                    key: key(2).public_key(),
                    modules: Some(vec!["disk-perf".into()]),
                },
            ],
            signing_threshold: 1,
            revoked: vec![key(3).id()],
        };
        doc.trust_store().unwrap()
    }

    #[test]
    fn a_root_store_checks_scopes_revocations_and_its_expiry() {
        let store = root_store();
        verify("b", &signed(&[&key(1)]), &store, now(), None).unwrap();
        // Key 2 may sign disk-perf only.
        match refusal(&signed(&[&key(2)]), &store) {
            Refusal::Threshold { problems, .. } => {
                assert!(matches!(
                    problems[..],
                    [SignatureProblem::OutOfScope { .. }]
                ));
                let text = problems[0].to_string();
                assert!(text.contains("disk-perf only"), "{text}");
            }
            other => panic!("{other}"),
        }
        // Key 3 is revoked: named as such.
        match refusal(&signed(&[&key(3)]), &store) {
            Refusal::Threshold { problems, .. } => {
                assert!(matches!(problems[..], [SignatureProblem::Revoked { .. }]));
            }
            other => panic!("{other}"),
        }
        // After the root's expiry nothing new is accepted, unless expiry is ignored
        // (a module that already ran here).
        let late = at("2026-02-01T00:00:00Z");
        let mut m = manifest(3, COMPONENT);
        m.expires_at = None;
        let bytes = sign(&m, COMPONENT, &[&key(1)]).unwrap();
        let err = verify("b", &bytes, &store, late, None).unwrap_err();
        assert!(
            matches!(err.refusal, Refusal::RootExpired { version: 4, .. }),
            "{err}"
        );
        verify("b", &bytes, &store.ignoring_expiry(), late, None).unwrap();
    }
}
