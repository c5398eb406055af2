//! The fuzz targets' smoke run, part of every `cargo test`: the committed seed corpus
//! (`runtime/fuzz/corpus/<target>/seed-*`), every input a fuzzer ever crashed on
//! (`runtime/fuzz/regressions/<target>/`), and a fixed batch of mutated and generated
//! inputs go through each target of `collector_fuzzing`, the same bodies
//! `cargo xtask fuzz` runs under libFuzzer, without its instrumented build. Its own test
//! binary because of the capped allocator: an allocation sized from an unchecked length
//! aborts it.
//!
//! `COLLECTOR_FUZZ_MUTATIONS=N` runs N mutations of each seed instead of the default.
//! `COLLECTOR_FUZZ_BLESS=1` rewrites the generated seeds (after a change to the bundle
//! format or the fuzzing keys).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use collector_bundle::{Bundle, Manifest, sign, verify};
use collector_fuzzing::{self as fuzzing, CappedAlloc, TARGETS, Target};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Mutations tried per seed file and target: enough to leave the seeds' happy paths,
/// few enough that the whole file stays around a second in a debug build.
/// `COLLECTOR_FUZZ_MUTATIONS=N` asks for more (a long uninstrumented run).
const MUTATIONS_PER_SEED: usize = 24;

fn mutations_per_seed() -> usize {
    std::env::var("COLLECTOR_FUZZ_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MUTATIONS_PER_SEED)
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir` (sorted, so failures replay in one order) whose names pass `keep`.
fn files(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| keep(&n.to_string_lossy())))
        .map(|p| {
            let bytes = std::fs::read(&p).expect("a readable corpus file");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// The committed seeds of a target (the fuzzer's own finds, not committed, are skipped).
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    files(&fuzz_dir().join("corpus").join(target), |n| {
        n.starts_with("seed-")
    })
}

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    files(&fuzz_dir().join("regressions").join(target), |n| {
        !n.starts_with('.')
    })
}

/// Runs one input, naming it if the target panics.
fn run(name: &str, target: Target, what: &str, data: &[u8]) {
    let outcome = std::panic::catch_unwind(|| target(data));
    if let Err(panic) = outcome {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default();
        panic!(
            "target `{name}` panicked on {what} ({} bytes): {message}",
            data.len()
        );
    }
}

#[test]
fn every_target_has_seeds_and_every_corpus_directory_a_target() {
    for (name, _) in TARGETS {
        assert!(
            !seeds(name).is_empty(),
            "no seed corpus for target `{name}`"
        );
    }
    // Each target is a libFuzzer binary too: a file in fuzz_targets/ and a [[bin]].
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let mut entries: Vec<String> = files(&fuzz_dir().join("fuzz_targets"), |_| true)
        .into_iter()
        .map(|(p, _)| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_string()).collect();
    names.sort();
    assert_eq!(entries, names, "fuzz_targets/ and fuzzing::TARGETS differ");
    for name in &names {
        let bin = format!("name = \"{name}\"\npath = \"fuzz_targets/{name}.rs\"");
        assert!(
            manifest.contains(&bin),
            "runtime/fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
    for kind in ["corpus", "regressions"] {
        let Ok(dirs) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for dir in dirs {
            let name = dir.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "{kind}/{name} belongs to no target"
            );
        }
    }
}

#[test]
fn the_seed_corpus_and_every_regression_replay_without_a_crash() {
    for (name, target) in TARGETS {
        for (path, bytes) in seeds(name).into_iter().chain(regressions(name)) {
            run(name, *target, &path.display().to_string(), &bytes);
        }
    }
}

/// A small xorshift generator: the mutations are the same on every run, so a failure
/// names an input that can be rebuilt.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// libFuzzer's cheapest mutations: flip, overwrite with an interesting byte, insert,
/// delete, truncate, duplicate a slice, splice a length-like value.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => {
                out[at] = *[0u8, 0xff, b'"', b'{', b'}', b'[', b'\\', b'\n', b'=']
                    .get(rng.below(9))
                    .unwrap()
            }
            2 => out.insert(at, rng.next() as u8),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            5 => {
                let end = (at + rng.below(16)).min(out.len());
                let copy = out[at..end].to_vec();
                let to = rng.below(out.len() + 1);
                out.splice(to..to, copy);
            }
            _ => {
                let value = [u32::MAX, 0x8000_0000, 65_536, 65_537, 0][rng.below(5)];
                let end = (at + 4).min(out.len());
                out.splice(at..end, value.to_le_bytes());
            }
        }
    }
    out
}

#[test]
fn mutated_seeds_do_not_crash() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (name, target) in TARGETS {
        for (path, seed) in seeds(name) {
            for i in 0..mutations_per_seed() {
                let input = mutate(&mut rng, &seed);
                run(
                    name,
                    *target,
                    &format!("mutation {i} of {}", path.display()),
                    &input,
                );
            }
        }
    }
}

/// A JSON value of the kinds the config and assignment parsers meet, nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[0-9]{0,20}(ns|ms|s|m|h|d|y| )?".prop_map(serde_json::Value::from),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Object keys: the fields the parsers know, and a few they do not.
fn key() -> impl Strategy<Value = String> {
    let mut known: Vec<&'static str> = collector_shared::ConfigScope::FIELDS.to_vec();
    known.extend(["modules", "version", "enabled", "process-perf", "x", ""]);
    prop::sample::select(known).prop_map(str::to_string)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_do_not_crash_any_target(data in prop::collection::vec(any::<u8>(), 0..512)) {
        for (name, target) in TARGETS {
            run(name, *target, "random bytes", &data);
        }
    }

    #[test]
    fn generated_json_objects_do_not_crash_the_json_targets(
        fields in prop::collection::btree_map(key(), json_value(), 0..6),
    ) {
        let object = serde_json::Value::Object(fields.into_iter().collect());
        let text = object.to_string();
        fuzzing::config(text.as_bytes());
        fuzzing::assignment(text.as_bytes());
        let wrapped = serde_json::json!({ "modules": object }).to_string();
        fuzzing::assignment(wrapped.as_bytes());
    }
}

/// The generated seeds: what the fuzzer starts from, so it begins past the signature
/// check (a bundle the fuzzing keys signed) and inside the structure-aware encoding.
fn generated_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let (a, b, _) = fuzzing::keys();
    let component = b"\0asm\x0d\0\x01\0 a component the fuzzer starts from".as_slice();
    let issued = "2026-01-01T00:00:00Z".parse().unwrap();
    let mut m = Manifest::describe("process-perf", 7, component, issued);
    let valid = sign(&m, component, &[a]).unwrap();
    let two = sign(&m, component, &[a, b]).unwrap();
    m.limits.memory_mib = Some(32);
    m.limits.call_timeout_ms = Some(500);
    m.expires_at = Some("2027-01-01T00:00:00Z".parse().unwrap());
    let full = m.to_json();

    // bundle_signed, even mode: the manifest bytes, signed as they are.
    let mut raw = vec![0u8];
    raw.extend_from_slice(&u16::try_from(full.len()).unwrap().to_le_bytes());
    raw.extend_from_slice(&full);
    raw.extend_from_slice(component);
    // Odd mode: fields (flags 4|8|16: both limits and an expiry), in `Input` order.
    let mut fields = vec![1u8, 4 | 8 | 16];
    push_bytes(&mut fields, component);
    push_bytes(&mut fields, b"process-perf");
    fields.extend_from_slice(&7u64.to_le_bytes());
    fields.push(1);
    push_bytes(&mut fields, b"process_perf.{pc_id}");
    // Times are seconds past chrono's earliest instant, then nanoseconds.
    let since_min = |t: i64| (t - DateTime::<Utc>::MIN_UTC.timestamp()) as u64;
    let year = 365 * 86_400;
    for n in [
        32,
        500,
        since_min(1_767_225_600),
        0,
        since_min(1_767_225_600 + year),
        0,
    ] {
        fields.extend_from_slice(&n.to_le_bytes());
    }

    vec![
        ("bundle", "seed-valid.bundle", valid.clone()),
        ("bundle", "seed-two-signatures.bundle", two),
        ("bundle", "seed-bare.wasm", component.to_vec()),
        (
            "manifest",
            "seed-minimal.json",
            Bundle::parse(&valid).unwrap().manifest.to_vec(),
        ),
        ("manifest", "seed-full.json", full),
        ("bundle_signed", "seed-raw-manifest", raw),
        ("bundle_signed", "seed-fields", fields),
        ("trust_root", "seed-next.root", next_root(None, &[a])),
        (
            "trust_root",
            "seed-scoped-revoking.root",
            next_root(Some(b), &[a, b]),
        ),
    ]
}

/// A version 2 after the fuzzing's held root, signed by `signers`: with `revoke`, one
/// that revokes that key and limits a new signing key to `process-*` modules.
fn next_root(
    revoke: Option<&collector_bundle::SecretKey>,
    signers: &[&collector_bundle::SecretKey],
) -> Vec<u8> {
    let (held, _) = fuzzing::held_root();
    let mut doc = held.next(fuzzing::now(), Some(chrono::Duration::days(90)));
    if let Some(key) = revoke {
        doc.revoke(key.id());
        doc.signing_keys.push(collector_bundle::RootSigningKey {
            key: collector_bundle::SecretKey::from_seed(&[9; 32]).public_key(),
            modules: Some(vec!["process-*".into(), "disk-perf".into()]),
        });
    }
    let mut root = collector_bundle::SignedRoot::new(&doc).unwrap();
    for key in signers {
        root.sign(key).unwrap();
    }
    root.to_bytes()
}

/// A length byte, then the bytes: how `fuzzing::Input` reads a string.
fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap());
    out.extend_from_slice(bytes);
}

#[test]
fn the_generated_seeds_are_committed_and_the_bundles_verify() {
    let bless = std::env::var_os("COLLECTOR_FUZZ_BLESS").is_some();
    for (target, file, bytes) in generated_seeds() {
        let path = fuzz_dir().join("corpus").join(target).join(file);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is not what the fuzzing keys make; rerun with COLLECTOR_FUZZ_BLESS=1",
            path.display()
        );
    }
    let (_, _, trust) = fuzzing::keys();
    for file in ["seed-valid.bundle", "seed-two-signatures.bundle"] {
        let bytes = std::fs::read(fuzz_dir().join("corpus/bundle").join(file)).unwrap();
        let verified = verify(file, &bytes, trust, fuzzing::now(), None);
        assert!(verified.is_ok(), "{file}: {:?}", verified.err());
    }
    for file in ["seed-raw-manifest", "seed-fields"] {
        let bytes = std::fs::read(fuzz_dir().join("corpus/bundle_signed").join(file)).unwrap();
        assert!(
            fuzzing::bundle_signed_verdict(&bytes),
            "{file} does not describe a bundle that verifies"
        );
    }
}
