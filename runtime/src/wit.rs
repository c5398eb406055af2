//! The WIT package this host implements, named once for the sandbox (which checks a
//! component's imports and exports against it) and for bundles (whose manifests name it).

/// The WIT package guests are written against.
pub const WIT_PACKAGE: &str = "collector:api";
/// The version of that package this host implements.
pub const WIT_VERSION: &str = "0.1.0";
