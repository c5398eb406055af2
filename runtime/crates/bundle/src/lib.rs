//! Signed guest bundles: how a guest component travels from the team that approves it to
//! the agents that run it, so that an agent runs only modules signed by keys it trusts.
//!
//! # The bundle file
//!
//! One file holds the component, a manifest describing it, and one or more Ed25519
//! signatures over the manifest:
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `CBUNDLE1` |
//! | 4 | manifest length `M`, `u32` little-endian, at most [`MAX_MANIFEST_LEN`] (64 KiB) |
//! | `M` | the manifest: UTF-8 JSON ([`Manifest`]) |
//! | 4 | signatures length `S`, `u32` little-endian, at most [`MAX_SIGNATURES_LEN`] (64 KiB) |
//! | `S` | the signatures: UTF-8 JSON `[{"key_id": "<16 hex>", "signature": "<base64>"}]`, at most [`MAX_SIGNATURES`] entries |
//! | rest | the component bytes, to the end of the file |
//!
//! A whole bundle is at most [`MAX_BUNDLE_LEN`] (32 MiB). Every declared length is checked
//! against the bytes that actually remain before anything is sliced, and no buffer is ever
//! sized from a length read out of the file.
//!
//! Signatures cover the **exact manifest bytes** as stored in the file, never a
//! re-serialization, so what was signed is exactly what is parsed. The manifest in turn
//! pins the component by `length` and `sha256`; the signatures section itself is not
//! signed (adding a signature must not invalidate the others).
//!
//! A key id is the first 8 bytes of the SHA-256 of the 32-byte public key, in hex. It is a
//! hint for people and error messages only: a signature counts for the trusted key it
//! verifies under, whatever key id it claims, and each trusted key counts once.
//!
//! # Verification
//!
//! [`verify`] (or [`verify_file`]) checks, in this order, stopping at the first refusal:
//! the container (bounded parsing), the manifest (strict JSON, unknown fields and anything
//! but whitespace after the document refused),
//! the signatures against a [`TrustStore`] and its threshold, the format and WIT target
//! against this host, the expiry against the `now` it is given, the component's length
//! then its hash (before any WebAssembly parsing), and finally anti-rollback against a
//! [`VersionStore`]. Recording the accepted version ([`VersionStore::record`]) is left to
//! the caller, once the module has really been accepted.
//!
//! # Trust roots
//!
//! Which keys sign bundles can change without touching an agent: a [`TrustRoot`] lists
//! them (each optionally limited to some module names), their threshold, the keys it
//! revokes and its expiry, and is followed from version to version, each signed by the
//! previous version's root keys (see the `root` module's documentation on
//! [`TrustRoot`]). [`TrustRoot::store`] is the [`TrustStore`] bundles are verified
//! against.
//!
//! # Dependencies
//!
//! A signing machine needs only this crate, so it must not depend on tokio, async-nats,
//! wasmtime, sysinfo, clap, or the fleet and sandbox crates (the layering of
//! ARCHITECTURE.md, checked by `cargo xtask test`).

mod format;
pub mod grant;
mod keys;
mod manifest;
mod root;
mod verify;
mod versions;
pub mod wit;

pub use format::{
    Bundle, FormatError, MAGIC, MAX_BUNDLE_LEN, MAX_MANIFEST_LEN, MAX_SIGNATURES,
    MAX_SIGNATURES_LEN, ReadProblem, SignatureEntry, read_bounded,
};
pub use keys::{
    KeyError, KeyId, PUBLIC_PREFIX, PublicKey, SECRET_PREFIX, SecretKey, TrustError, TrustStore,
    scope_matches,
};
pub use manifest::{
    FORMAT, Grants, Limits, MAX_NAME_LEN, Manifest, ManifestError, NameError, check_module_name,
    is_module_name_char, sha256_hex, wit_target, wit_target_of, wit_targets,
};
pub use root::{
    MAX_REVOKED, MAX_ROOT_KEYS, MAX_ROOT_LEN, MAX_SCOPE_PATTERNS, ROOT_EXTENSION, ROOT_FORMAT,
    RootDoc, RootError, RootRefusal, RootSigningKey, SignedRoot, TrustRoot, check_scope_pattern,
};
pub use verify::{
    Refusal, SignError, SignatureProblem, Verified, VerifyError, check_component, sign, verify,
    verify_file,
};
pub use versions::{AcceptedVersion, RollbackError, StoreError, VERSIONS_FILE, VersionStore};
