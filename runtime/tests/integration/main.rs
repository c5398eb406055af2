//! Integration tests of the runtime with real parts: the real guest component, real
//! sysinfo data, the `collector` binary, and a real nats-server started per test.
//! One test binary (with modules) keeps link time down.

mod common;

mod adversarial;
mod agent;
mod api_versions;
mod broken_guests;
mod broker;
mod bundle_cli;
mod cache;
mod cli;
mod crash;
mod credentials;
mod differential;
mod fetch;
mod fleet;
mod fleet_cli;
mod guest;
mod hostile_fleet;
mod hostile_guests;
mod last_known_good;
mod nats;
mod nats_auth;
mod rollout;
mod swap;
mod trust;
mod trust_cli;
mod wasi_guests;
