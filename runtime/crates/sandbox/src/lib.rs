//! The collector's sandbox: everything that runs a guest component safely on one machine.
//!
//! - [`engine`]: the wasmtime engine (epoch interruption, one compile thread) and the
//!   epoch thread; [`cache`]: compiled components, authenticated under the agent's key.
//! - [`guest`]: loading and checking a component, and the [`guest::Supervisor`] that calls
//!   it under a time budget, contains traps and swaps modules.
//! - [`host`]: the host functions of every `collector:api` version, and their limits.
//! - [`source`]: process tables from sysinfo (shared, time-boxed); [`sink`]: where
//!   publishes go (standard output, memory); [`ticker`]: when the next tick is due.
//! - [`agent`]: the real-time loop of one module: ticks, configuration, swaps,
//!   probation and rollback.
//!
//! It must not depend on `async-nats`, on the `collector-fleet`, `collector-deploy` or
//! `collector-testkit` crates, or on the command line (`clap`, the `collector` crate);
//! `cargo xtask test` checks this (`xtask/src/layers.rs`). It runs a guest on one machine:
//! where publishes go is the caller's [`sink::Sink`], and where modules come from is
//! `collector-deploy`'s business. The mock host for guest authors (`collector-testkit`)
//! is built on it, so a guest author's tests never pull in a broker client.

pub mod agent;
pub mod cache;
pub mod engine;
pub mod guest;
pub mod host;
pub mod sink;
pub mod source;
pub mod ticker;
