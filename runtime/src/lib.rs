//! The collector runtime: a wasmtime host that runs a telemetry guest component in a
//! sandbox, feeds it real process data and configuration, and publishes what it decides
//! to publish. The `collector` binary is a thin layer over this library ([`cli`]).

pub mod agent;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod config_file;
pub mod deploy;
pub mod engine;
pub mod fleet;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod grant;
pub mod guest;
pub mod host;
pub mod reconcile;
pub mod reference;
pub mod sink;
pub mod source;
pub mod testkit;
pub mod ticker;
