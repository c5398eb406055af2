//! The collector runtime: a wasmtime host that runs a telemetry guest component in a
//! sandbox, feeds it real process data and configuration, and publishes what it decides
//! to publish. The `collector` binary is a thin layer over this library ([`cli`]).
//!
//! The default feature `sandbox` brings the agent (wasmtime, WASI, sysinfo). Without it
//! the library keeps bundles, keys, grants and the fleet's operator side: what a signing
//! or operator machine needs.

#[cfg(feature = "sandbox")]
pub mod agent;
pub mod bundle;
#[cfg(feature = "sandbox")]
pub mod cache;
pub mod cli;
#[cfg(feature = "sandbox")]
pub mod config_file;
#[cfg(feature = "sandbox")]
pub mod deploy;
#[cfg(feature = "sandbox")]
pub mod engine;
pub mod fleet;
pub mod fsutil;
#[cfg(feature = "sandbox")]
#[doc(hidden)]
pub mod fuzzing;
pub mod grant;
#[cfg(feature = "sandbox")]
pub mod guest;
#[cfg(feature = "sandbox")]
pub mod host;
#[cfg(feature = "sandbox")]
pub mod reconcile;
#[cfg(feature = "sandbox")]
pub mod reference;
pub mod sink;
#[cfg(feature = "sandbox")]
pub mod source;
#[cfg(feature = "sandbox")]
pub mod testkit;
pub mod ticker;
pub mod wit;
