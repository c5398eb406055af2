//! libFuzzer entry point of the `bundle` target; the body is `collector_runtime::fuzzing::bundle`.
#![no_main]

#[global_allocator]
static ALLOC: collector_runtime::fuzzing::CappedAlloc = collector_runtime::fuzzing::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| collector_runtime::fuzzing::bundle(data));
