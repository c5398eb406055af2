//! The compile cache serves verified artifacts only: a tampered entry is recompiled and
//! overwritten, never loaded.

use std::path::Path;
use std::time::Instant;

use collector_sandbox::cache::{CacheOutcome, CompileCache};
use collector_sandbox::guest::{GuestModule, Supervisor};
use collector_sandbox::host::Limits;
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::{Fields, ProcessSource, SysinfoSource};
use std::sync::Arc;

use crate::common::*;

fn entry(dir: &Path, ext: &str) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension() == Some(ext.as_ref()))
        .unwrap_or_else(|| panic!("no .{ext} entry in {}", dir.display()))
}

/// The component still runs: it publishes a message on a tick.
fn runs(component: &wasmtime::component::Component) {
    let module = GuestModule::from_component(&sandbox(), "cached", component).unwrap();
    let sink = MemorySink::default();
    let mut source = SysinfoSource::new().unwrap();
    // Primed, so that the guest publishes on its first tick.
    source.sample(Fields::CPU_ONLY).unwrap();
    let mut sup = Supervisor::new(
        Arc::new(module),
        services(Box::new(source), sink.clone(), Limits::default()),
    );
    sup.configure(&enabled("60s", 3)).unwrap();
    sup.tick(now(Instant::now())).unwrap();
    assert_eq!(sink.len(), 1);
}

#[test]
fn cache_hits_verified_entries_and_recompiles_tampered_ones() {
    let dir = tempfile::tempdir().unwrap();
    let engine = sandbox().engine().clone();
    let cache = CompileCache::open(dir.path(), &engine).unwrap();
    let bytes = std::fs::read(guest_wasm()).unwrap();

    let (_, outcome) = cache.load(&engine, &bytes).unwrap();
    assert_eq!(outcome, CacheOutcome::Miss);
    let (component, outcome) = cache.load(&engine, &bytes).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    runs(&component);

    // Flip one byte of the compiled code.
    let artifact = entry(dir.path(), "cwasm");
    let mut code = std::fs::read(&artifact).unwrap();
    let mid = code.len() / 2;
    code[mid] ^= 0x40;
    std::fs::write(&artifact, &code).unwrap();
    let (component, outcome) = cache.load(&engine, &bytes).unwrap();
    assert!(
        matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("MAC")),
        "{outcome:?}"
    );
    runs(&component);
    let (_, outcome) = cache.load(&engine, &bytes).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit, "the entry was rewritten");

    // A forged MAC (someone without the key) is refused too; so is a missing one.
    std::fs::write(entry(dir.path(), "mac"), [0u8; 32]).unwrap();
    let (_, outcome) = cache.load(&engine, &bytes).unwrap();
    assert!(matches!(outcome, CacheOutcome::Rejected(_)), "{outcome:?}");
    std::fs::remove_file(entry(dir.path(), "mac")).unwrap();
    let (_, outcome) = cache.load(&engine, &bytes).unwrap();
    assert!(matches!(outcome, CacheOutcome::Rejected(_)), "{outcome:?}");

    // A cache opened later (an agent restart) reuses the same key.
    let reopened = CompileCache::open(dir.path(), &engine).unwrap();
    let (_, outcome) = reopened.load(&engine, &bytes).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
}
