//! The WIT package this host implements, named once for the sandbox (which checks a
//! component's imports and exports against it) and for bundles (whose manifests name it).

/// The WIT package guests are written against.
pub const WIT_PACKAGE: &str = "collector:api";
/// The newest version of that package this host implements: what new guests target.
pub const WIT_VERSION: &str = "0.2.0";
/// Every version of the package this host implements, oldest first. A guest built
/// against any of them runs unchanged.
pub const WIT_VERSIONS: &[&str] = &["0.1.0", "0.2.0"];
