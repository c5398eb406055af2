//! Wire types of the kanade endpoint-management protocol that a collector must speak:
//! per-PC configuration and its layered resolution, the `ProcessPerf` message and subjects.
//!
//! This crate does no I/O and reads no clock: it is compiled into guests (wasm32-wasip2)
//! as well as into the native runtime, and both must agree on every byte.
//!
//! It holds pure wire types, so it must not depend on tokio, async-nats, wasmtime,
//! sysinfo, clap or any other collector crate (the layering of ARCHITECTURE.md, checked
//! by `cargo xtask test`).

pub mod config;
pub mod perf;
pub mod scope;
pub mod subject;

pub use config::{ConfigError, ConfigScope, EffectiveConfig, FieldConflict, Resolved};
pub use perf::{ProcessPerf, ProcessSnapshot};
