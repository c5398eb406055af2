//! The bodies of the fuzz targets, as plain functions, so that libFuzzer (`runtime/fuzz`,
//! `cargo xtask fuzz`) and the ordinary test suite
//! (`runtime/crates/fuzzing/tests/fuzz_smoke.rs`) run the very same code: the smoke test
//! needs no instrumented build and no nightly flags.
//!
//! Every target takes arbitrary bytes and has one contract: it never panics, never
//! allocates from a length it did not check (see [`CappedAlloc`]), and returns an error
//! for garbage. Where a parser accepts its input, the target also checks what acceptance
//! promises (a parsed value survives its own serialization, a well-signed bundle
//! verifies), so a fuzzer finds wrong answers as well as crashes. Not part of the API.
//!
//! It must not depend on `collector-reference` or on the command line (clap, the
//! `collector` crate). `cargo xtask test` checks this layering.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use collector_shared::ConfigScope;

use collector_bundle::{
    Bundle, FORMAT, Grants, Limits, Manifest, RootDoc, RootSigningKey, SecretKey, SignedRoot,
    TrustRoot, TrustStore, sign, verify, wit_target,
};
use collector_fleet::assignment::{Agent, AssignmentScope, resolve};
use collector_testkit::scenario::Scenario;

/// A fuzz target: arbitrary bytes in, a panic (or an abort) on a broken contract.
pub type Target = fn(&[u8]);

/// Every target by the name `cargo xtask fuzz` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("bundle", bundle),
    ("bundle_signed", bundle_signed),
    ("manifest", manifest),
    ("scenario", scenario),
    ("config", config),
    ("assignment", assignment),
    ("trust_root", trust_root),
];

/// Largest single allocation a target may make. Inputs are at most a few MiB (libFuzzer's
/// `-max_len`), so anything larger was sized from a length read out of the input.
pub const MAX_ALLOCATION: usize = 64 * 1024 * 1024;

/// The system allocator, refusing any allocation over [`MAX_ALLOCATION`]: the refusal
/// aborts the process (`memory allocation of N bytes failed`), which libFuzzer records as
/// a crash and the smoke test as a failure. Sanitizer-free, so it also holds in the
/// uninstrumented smoke test and in `cargo xtask fuzz`, which builds without ASan.
pub struct CappedAlloc;

// SAFETY: every call is forwarded unchanged to `System`, except over-cap requests, which
// return null as the `GlobalAlloc` contract allows for a failed allocation.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The instant every target verifies at: fixed, so a finding replays the same way.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000, 0).expect("a valid timestamp")
}

/// The signing keys of the fuzz targets (fixed seeds: nothing here is secret) and the
/// trust store that trusts both with a threshold of one.
pub fn keys() -> &'static (SecretKey, SecretKey, TrustStore) {
    static KEYS: OnceLock<(SecretKey, SecretKey, TrustStore)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let a = SecretKey::from_seed(&[0x5e; 32]);
        let b = SecretKey::from_seed(&[0xb0; 32]);
        let trust = TrustStore::new([a.public_key(), b.public_key()], 1).expect("two keys");
        (a, b, trust)
    })
}

/// A bundle file: the container, the manifest inside it, then the whole of `verify`
/// against the fixed trust store. A container that parses must come back the same from
/// its own encoding.
pub fn bundle(data: &[u8]) {
    if let Ok(parsed) = Bundle::parse(data) {
        if let Ok(encoded) = parsed.encode() {
            let again = Bundle::parse(&encoded).expect("an encoded bundle parses");
            assert_eq!(again, parsed, "a bundle changed through encode and parse");
        }
        let _ = Manifest::parse(parsed.manifest);
    }
    let _ = verify("fuzz.bundle", data, &keys().2, now(), None);
}

/// Manifest bytes as a bundle carries them. An accepted manifest must survive its own
/// JSON (the bytes `collector module sign` signs) and give a grant.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    let back = Manifest::parse(&m.to_json()).expect("a parsed manifest's JSON parses");
    assert_eq!(back, m, "a manifest changed through its own JSON");
    m.grant("pc-1").expect("a validated manifest has a grant");
}

/// A scenario file as `collector test` reads it. Text only: `Scenario::load` refuses
/// anything that is not UTF-8 before parsing.
pub fn scenario(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Scenario::parse(Path::new("fuzz.toml"), text) {
        Ok(s) => assert!(!s.steps.is_empty(), "a scenario without steps was accepted"),
        Err(e) => assert!(e.file == "fuzz.toml", "the error names another file"),
    }
}

/// A config scope as kanade's KV and `--config` hold it: `ConfigScope::from_json` and
/// `validate`, then `config_file::parse`, which must agree with them. An accepted scope
/// must survive its own JSON.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let scope = ConfigScope::from_json(text);
    let file = collector_deploy::config_file::parse(Path::new("fuzz.json"), text);
    let Ok((scope, _unknown)) = scope else {
        assert!(file.is_err(), "config_file accepted what from_json refused");
        return;
    };
    assert_eq!(
        file.is_ok(),
        scope.validate().is_ok(),
        "config_file and ConfigScope::validate disagree"
    );
    let json = serde_json::to_string(&scope).expect("a scope serializes");
    let (back, unknown) = ConfigScope::from_json(&json).expect("a scope's own JSON parses");
    assert_eq!(back, scope, "a scope changed through its own JSON");
    assert!(unknown.is_empty(), "a scope's own JSON has unknown fields");
    if let Ok(config) = file {
        config.host_perf_duration();
        config.process_perf_active_at(now());
    }
}

/// A module assignment as the `collector_config` KV holds it. An accepted one must
/// survive its own JSON and resolve in every layer.
pub fn assignment(data: &[u8]) {
    let Ok(scope) = AssignmentScope::from_json(data) else {
        return;
    };
    let back = AssignmentScope::from_json(&scope.to_json()).expect("its own JSON parses");
    assert_eq!(back, scope, "an assignment changed through its own JSON");
    let groups = ["g".to_string()];
    let agent = Agent {
        pc_id: "pc-a",
        groups: &groups,
    };
    let resolved = resolve(Some(&scope), [("g", &scope)], Some(&scope), agent);
    assert!(
        resolved.conflicts.is_empty(),
        "one scope conflicts with itself"
    );
    // A module runs the version its entry sets, or the one its rollout moves it to.
    for (name, version) in &resolved.modules {
        let m = &scope.modules[name];
        assert!(
            m.version == Some(*version) || m.rollout.as_ref().is_some_and(|r| r.to == *version),
            "{name} resolved to v{version}, which its entry does not name"
        );
    }
}

/// The root of version 1 the `trust_root` target follows from: root keys A and B (one
/// must sign), signing key A. Its seeds are version 2 roots signed by A.
pub fn held_root() -> &'static (RootDoc, TrustRoot) {
    static ROOT: OnceLock<(RootDoc, TrustRoot)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let (a, b, _) = keys();
        let doc = RootDoc {
            version: 1,
            issued_at: now() - chrono::Duration::days(30),
            expires_at: now() + chrono::Duration::days(365),
            root_keys: vec![a.public_key(), b.public_key()],
            root_threshold: 1,
            signing_keys: vec![RootSigningKey {
                key: a.public_key(),
                modules: None,
            }],
            signing_threshold: 1,
            revoked: Vec::new(),
        };
        let mut signed = SignedRoot::new(&doc).expect("a valid root");
        signed.sign(a).expect("room for a signature");
        let root = TrustRoot::install(signed).expect("signed by its root key");
        (doc, root)
    })
}

/// A trust root file as agents read it from the fleet, `--modules` and their state
/// directory. One that parses must come back the same through its own bytes, its
/// document must parse alone to the same value and give a trust store; and if the held
/// root follows it, it is the next version and its own root keys signed it.
pub fn trust_root(data: &[u8]) {
    let Ok(root) = SignedRoot::parse(data) else {
        return;
    };
    let again = SignedRoot::parse(&root.to_bytes()).expect("a root file's own bytes parse");
    assert_eq!(again, root, "a root changed through its own bytes");
    let doc = RootDoc::parse(root.signed_bytes()).expect("an accepted document parses alone");
    assert_eq!(&doc, root.doc(), "the document parsed two ways");
    doc.trust_store()
        .expect("a validated root gives a trust store");
    let _ = TrustRoot::install(root.clone());
    let (_, held) = held_root();
    if let Ok(next) = held.follow(&root) {
        assert_eq!(
            next.version(),
            held.version() + 1,
            "followed a non-next version"
        );
        let own = root.signers_among(&doc.root_keys, &doc.revoked);
        assert!(
            own.len() >= doc.root_threshold,
            "followed without its own threshold"
        );
        let _ = held.advance([&root], now());
    }
}

/// Structure-aware bundles: the input describes a manifest and a component, which are
/// signed with the fixed keys before `verify` sees them, so the fuzzer gets past the
/// signature check (which random bytes never do) to the format, WIT, expiry, length and
/// hash checks. The first byte picks a mode:
///
/// - even: the rest is split into manifest bytes and a component; the manifest bytes are
///   signed as they are, so `Manifest::parse` meets arbitrary *signed* text;
/// - odd: a `Manifest` is built field by field from the rest, signed by `sign` (which
///   must refuse exactly the invalid ones) and verified, and the verdict must be the one
///   the manifest's fields call for.
pub fn bundle_signed(data: &[u8]) {
    bundle_signed_verdict(data);
}

/// [`bundle_signed`], telling whether `verify` accepted the bundle the input described
/// (the seeds must be accepted, so that mutations start from the deepest path).
pub fn bundle_signed_verdict(data: &[u8]) -> bool {
    let (a, b, trust) = keys();
    let mut input = Input(data);
    let mode = input.byte();
    if mode % 2 == 0 {
        let split = usize::from(input.u16()).min(input.0.len());
        let (manifest_bytes, component) = input.0.split_at(split);
        let signatures = match mode % 6 {
            0 => vec![a.sign(manifest_bytes)],
            2 => vec![a.sign(manifest_bytes), b.sign(manifest_bytes)],
            _ => vec![b.sign(manifest_bytes), a.sign(manifest_bytes)],
        };
        let Ok(bytes) = (Bundle {
            manifest: manifest_bytes,
            signatures,
            component,
        })
        .encode() else {
            return false;
        };
        let Ok(v) = verify("fuzz.bundle", &bytes, trust, now(), None) else {
            return false;
        };
        assert_eq!(v.component, component, "verify returned another component");
        let parsed = Manifest::parse(manifest_bytes).expect("a verified manifest parses");
        assert_eq!(v.manifest, parsed, "verify returned another manifest");
        return true;
    }

    let flags = input.byte();
    let component = input.bytes();
    let mut m = Manifest {
        format: if flags & 1 == 0 {
            FORMAT.to_string()
        } else {
            input.string()
        },
        name: input.string(),
        version: input.u64(),
        rollback_floor: None,
        sha256: collector_bundle::sha256_hex(component),
        length: component.len() as u64,
        wit: if flags & 2 == 0 {
            wit_target()
        } else {
            input.string()
        },
        grants: Grants {
            publish: (0..input.byte() % 4).map(|_| input.string()).collect(),
        },
        limits: Limits {
            memory_mib: (flags & 4 != 0).then(|| input.u64()),
            call_timeout_ms: (flags & 8 != 0).then(|| input.u64()),
        },
        issued_at: input.time(),
        expires_at: (flags & 16 != 0).then(|| input.time()),
    };
    if flags & 128 != 0 {
        // Read last, so that inputs without it decode as they always did.
        m.rollback_floor = Some(input.u64());
    }
    if flags & 32 != 0 {
        // A manifest that does not describe the component: `sign` must refuse it.
        m.length ^= 1;
    }
    let signers: Vec<&SecretKey> = if flags & 64 == 0 { vec![a] } else { vec![a, b] };
    let signed = sign(&m, component, &signers);
    let Ok(bytes) = signed else {
        assert!(
            m.validate().is_err() || flags & 32 != 0,
            "sign refused a valid manifest: {:?}",
            signed.err()
        );
        return false;
    };
    assert!(m.validate().is_ok(), "sign accepted an invalid manifest");
    assert!(
        flags & 32 == 0,
        "sign accepted a manifest of another component"
    );
    let expected = m.format == FORMAT
        && m.wit == wit_target()
        && m.expires_at.is_none_or(|expires| now() < expires);
    match verify("fuzz.bundle", &bytes, trust, now(), None) {
        Ok(v) => {
            assert!(expected, "verify accepted {m:?}");
            assert_eq!(
                v.manifest, m,
                "the manifest changed through sign and verify"
            );
            assert_eq!(v.component, component, "verify returned another component");
            assert_eq!(v.signers.len(), signers.len(), "a signer was not counted");
            true
        }
        Err(e) => {
            assert!(!expected, "verify refused a good bundle: {e}");
            false
        }
    }
}

/// A cursor over fuzz input that never fails: past the end it reads zeros and empty
/// strings, so every input describes some manifest.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        first
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        let mut le = [0u8; 8];
        le.iter_mut().for_each(|b| *b = self.byte());
        u64::from_le_bytes(le)
    }

    /// Up to 255 bytes, as declared by a length byte and bounded by what remains.
    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    /// Any instant chrono can represent, from the earliest to the latest.
    fn time(&mut self) -> DateTime<Utc> {
        let secs = self.u64() as i64;
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        let span = (max - min) as u64;
        let secs = min + (secs as u64 % span) as i64;
        let nanos = self.u64() as u32 % 1_000_000_000;
        DateTime::from_timestamp(secs, nanos).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}
