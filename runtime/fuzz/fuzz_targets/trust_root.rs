//! libFuzzer entry point of the `trust_root` target; the body is `collector_fuzzing::trust_root`.
#![no_main]

#[global_allocator]
static ALLOC: collector_fuzzing::CappedAlloc = collector_fuzzing::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| collector_fuzzing::trust_root(data));
