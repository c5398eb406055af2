//! The manifest: what a bundle's signers vouch for. Parsed strictly (unknown or duplicate
//! fields refused) because a signed statement must mean exactly what it says.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::grant::{DEFAULT_GRANT, Grant, PatternError};
use crate::wit::{WIT_PACKAGE, WIT_VERSION, WIT_VERSIONS};

/// The `format` of manifests this host understands.
pub const FORMAT: &str = "collector-bundle/1";

/// Longest module name, in bytes; names become keys of the version store and appear in
/// every log.
pub const MAX_NAME_LEN: usize = 64;

/// The newest `wit` target this host runs, such as `collector:api@0.2.0`.
pub fn wit_target() -> String {
    format!("{WIT_PACKAGE}@{WIT_VERSION}")
}

/// Every `wit` target this host runs, oldest first.
pub fn wit_targets() -> Vec<String> {
    WIT_VERSIONS
        .iter()
        .map(|v| format!("{WIT_PACKAGE}@{v}"))
        .collect()
}

/// The `wit` target a component declares, read from the name of the `guest` interface
/// it exports (`collector:api/guest@0.1.0`), which a component holds as plain text. No
/// WebAssembly is parsed, so that signing needs no sandbox; the agent checks the
/// declaration against the compiled component before running it. Bytes that name no
/// version this host runs get the newest target.
pub fn wit_target_of(component: &[u8]) -> String {
    let marker = format!("{WIT_PACKAGE}/guest@");
    let marker = marker.as_bytes();
    component
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .find_map(|(at, _)| {
            let rest = &component[at + marker.len()..];
            let end = rest
                .iter()
                .position(|b| !(b.is_ascii_digit() || *b == b'.'))
                .unwrap_or(rest.len());
            let version = std::str::from_utf8(&rest[..end]).ok()?;
            WIT_VERSIONS
                .contains(&version)
                .then(|| format!("{WIT_PACKAGE}@{version}"))
        })
        .unwrap_or_else(wit_target)
}

/// A string that is not a module name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a module name: expected 1 to {max} letters, digits, `.`, `_` or `-`, with no `.` at either end or two in a row",
    max = MAX_NAME_LEN
)]
pub struct NameError(pub String);

/// Whether `c` may appear in a module name. No path separator is among them, so a name
/// can never take a file named after it out of its directory.
pub fn is_module_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks a module name: the rule for names in manifests, which are read from the
/// network, and for names read back from the state directory, which the agent wrote but
/// anyone with access to the directory could have edited.
///
/// # Errors
///
/// When `name` is empty, longer than 64 bytes, holds any other character than ASCII
/// letters, digits, `.`, `_` and `-`, or has a `.` at either end or two in a row (so
/// that neither `.` nor `..` is a name).
pub fn check_module_name(name: &str) -> Result<(), NameError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.chars().all(is_module_name_char)
        || name.starts_with('.')
        || name.ends_with('.')
        || name.contains("..")
    {
        return Err(NameError(name.to_string()));
    }
    Ok(())
}

/// Lowercase hex SHA-256 of `bytes`, as stored in manifests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A bundle's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`] for this version of the format.
    pub format: String,
    /// The module's name: letters, digits, `.`, `_` and `-`, at most 64 characters.
    pub name: String,
    /// Only ever grows for a given name; agents refuse to go back (anti-rollback), except
    /// down to `rollback_floor`.
    pub version: u64,
    /// The lowest version agents may return to once they accepted this one, so that an
    /// operator can roll the fleet back by assignment without new signatures. `None`:
    /// none lower than `version`. Agents never lower a floor they have seen: a version
    /// signed with a higher floor (say, after a security fix) closes the way back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_floor: Option<u64>,
    /// Lowercase hex SHA-256 of the component bytes.
    pub sha256: String,
    /// Length of the component bytes.
    pub length: u64,
    /// The WIT package and version the component targets, such as `collector:api@0.1.0`.
    pub wit: String,
    /// What the module may do outside its sandbox.
    pub grants: Grants,
    /// Resource limits for the module; absent in the JSON: none set.
    #[serde(default)]
    pub limits: Limits,
    /// When the bundle was made; `expires_at` must be after it.
    pub issued_at: DateTime<Utc>,
    /// After this instant the bundle is refused. `None`: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// What the module may do outside its sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Subject patterns the module may publish to (see [`crate::grant`]).
    pub publish: Vec<String>,
}

/// Resource limits the signers set for the module; unset ones are left to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory cap of the module's instance, in MiB (at least 1); the agent's own cap
    /// still applies when it is lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Time budget of each call into the module, in milliseconds (at least 1); the
    /// agent's own budget still applies when it is shorter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_timeout_ms: Option<u64>,
}

impl Limits {
    /// [`Limits::call_timeout_ms`] as a duration.
    pub fn call_timeout(&self) -> Option<Duration> {
        self.call_timeout_ms.map(Duration::from_millis)
    }
}

/// Why manifest bytes are not an acceptable manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not UTF-8 JSON of the manifest's shape (unknown, duplicate, missing
    /// or mistyped field), or something other than whitespace follows the document.
    #[error("the manifest is not valid JSON of the expected shape, at `{path}`: {message}")]
    Json {
        /// Where in the document the error is, such as `limits.memory_mib`; `.` for the
        /// document as a whole.
        path: String,
        /// The JSON parser's message, with line and column.
        message: String,
    },
    /// A field is well-typed but holds a value no valid manifest has (see
    /// [`Manifest::validate`]).
    #[error("manifest field `{field}`: {reason}")]
    Invalid {
        /// The field, such as `name` or `grants.publish`.
        field: &'static str,
        /// What is wrong with its value, for people.
        reason: String,
    },
}

impl Manifest {
    /// A manifest describing `component`, with this host's format and the WIT target the
    /// component declares ([`wit_target_of`]),
    /// the default grant, no limits and no expiry.
    pub fn describe(name: &str, version: u64, component: &[u8], issued_at: DateTime<Utc>) -> Self {
        Self {
            format: FORMAT.to_string(),
            name: name.to_string(),
            version,
            rollback_floor: None,
            sha256: sha256_hex(component),
            length: component.len() as u64,
            wit: wit_target_of(component),
            grants: Grants {
                publish: vec![DEFAULT_GRANT.to_string()],
            },
            limits: Limits::default(),
            issued_at,
            expires_at: None,
        }
    }

    /// Parses and checks manifest bytes. Unknown and duplicate fields are refused, and so
    /// is anything but JSON whitespace after the document: signed bytes holding a second
    /// document would mean one thing to this parser (the first document) and another to a
    /// tool that reads the last one. Trailing whitespace is accepted, since every JSON
    /// reader skips it alike (and [`Manifest::to_json`] ends with a newline).
    ///
    /// # Errors
    ///
    /// When the bytes are not UTF-8 JSON of the manifest's shape with nothing after it,
    /// or a field holds a value no valid manifest has (see [`Manifest::validate`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let manifest: Self =
            serde_path_to_error::deserialize(&mut *de).map_err(|e| ManifestError::Json {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        de.end().map_err(|e| ManifestError::Json {
            path: ".".into(),
            message: format!("data after the manifest document: {e}"),
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the values that the JSON shape alone does not: the name's characters, the
    /// hash's form, the grant patterns, non-zero limits and the expiry's order. Whether
    /// the format and WIT target suit this host is checked later, after the signatures.
    ///
    /// # Errors
    ///
    /// The first field holding an unacceptable value.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |field, reason: String| Err(ManifestError::Invalid { field, reason });
        if let Err(e) = check_module_name(&self.name) {
            return invalid("name", e.to_string());
        }
        if let Some(floor) = self.rollback_floor
            && floor > self.version
        {
            return invalid(
                "rollback_floor",
                format!("{floor} is above the version {}", self.version),
            );
        }
        let hash_ok = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hash_ok {
            return invalid(
                "sha256",
                format!("{:?} is not 64 lowercase hex digits", self.sha256),
            );
        }
        if let Err(PatternError { pattern, reason }) = Grant::new(&self.grants.publish, "pc-id") {
            return invalid(
                "grants.publish",
                format!("invalid subject pattern {pattern:?}: {reason}"),
            );
        }
        if self.limits.memory_mib == Some(0) {
            return invalid("limits.memory_mib", "must be at least 1".into());
        }
        if self.limits.call_timeout_ms == Some(0) {
            return invalid("limits.call_timeout_ms", "must be at least 1".into());
        }
        if let Some(expires) = self.expires_at
            && expires <= self.issued_at
        {
            return invalid(
                "expires_at",
                format!(
                    "{} is not after issued_at {}",
                    expires.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    self.issued_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                ),
            );
        }
        Ok(())
    }

    /// The bytes to store and sign: pretty JSON, so a person reading a bundle reads
    /// exactly what was signed.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifests serialize");
        bytes.push(b'\n');
        bytes
    }

    /// The publish grant with `{pc_id}` bound to this machine.
    ///
    /// # Errors
    ///
    /// Never for a validated manifest; otherwise the first invalid pattern.
    pub fn grant(&self, pc_id: &str) -> Result<Grant, PatternError> {
        Grant::new(&self.grants.publish, pc_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest::describe(
            "process-perf",
            3,
            b"\0asm\x0d\0\x01\0",
            "2025-01-01T00:00:00Z".parse().unwrap(),
        )
    }

    #[test]
    fn the_wit_target_is_read_from_the_exported_guest_interface() {
        let v1 = b"\0asm..\x19collector:api/guest@0.1.0\x00..".as_slice();
        assert_eq!(wit_target_of(v1), "collector:api@0.1.0");
        let v2 = b"..collector:api/log@0.1.0..collector:api/guest@0.2.0".as_slice();
        assert_eq!(wit_target_of(v2), "collector:api@0.2.0");
        let unknown = b"collector:api/guest@9.9.9 and nothing else".as_slice();
        assert_eq!(
            wit_target_of(unknown),
            wit_target(),
            "the newest by default"
        );
        assert_eq!(
            wit_targets(),
            ["collector:api@0.1.0", "collector:api@0.2.0"]
        );
    }

    #[test]
    fn round_trips_through_its_json() {
        let mut m = sample();
        m.limits.memory_mib = Some(32);
        m.expires_at = Some("2026-01-01T00:00:00Z".parse().unwrap());
        let json = m.to_json();
        assert_eq!(Manifest::parse(&json).unwrap(), m);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains(r#""wit": "collector:api@0.2.0""#), "{text}");
        assert!(text.contains(r#""publish": ["#), "{text}");
        assert_eq!(m.grants.publish, [DEFAULT_GRANT]);
    }

    #[test]
    fn unknown_and_duplicate_fields_are_refused() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["run_as_root"] = true.into();
        let err = Manifest::parse(value.to_string().as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `run_as_root`"),
            "{err}"
        );

        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["limits"]["cpu"] = 1.into();
        let err = Manifest::parse(value.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("limits"), "{err}");

        let text = String::from_utf8(sample().to_json()).unwrap();
        let doubled = text.replacen("\"version\": 3,", "\"version\": 3, \"version\": 9,", 1);
        let err = Manifest::parse(doubled.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("duplicate field `version`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        type Spoil = fn(&mut Manifest);
        let cases: Vec<(Spoil, &str)> = vec![
            (|m| m.name = "../etc".into(), "`name`"),
            (|m| m.name = String::new(), "`name`"),
            (|m| m.sha256 = "ABC".into(), "`sha256`"),
            (
                |m| m.grants.publish = vec!["a..b".into()],
                "`grants.publish`",
            ),
            (|m| m.limits.memory_mib = Some(0), "`limits.memory_mib`"),
            (
                |m| m.limits.call_timeout_ms = Some(0),
                "`limits.call_timeout_ms`",
            ),
            (|m| m.expires_at = Some(m.issued_at), "`expires_at`"),
        ];
        for (spoil, field) in cases {
            let mut m = sample();
            spoil(&mut m);
            let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let err = Manifest::parse(br#"{"format": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`format`"), "{err}");
        assert!(Manifest::parse(b"\xff").is_err());
    }

    #[test]
    fn anything_but_whitespace_after_the_document_is_refused() {
        let json = sample().to_json();
        assert!(json.ends_with(b"\n"), "to_json ends with a newline");
        let mut spaced = json.clone();
        spaced.extend_from_slice(b" \t\r\n");
        assert_eq!(Manifest::parse(&spaced).unwrap(), sample());
        let mut other = sample();
        other.grants.publish = vec![">".into()];
        for tail in [
            other.to_json(),
            b"{}".to_vec(),
            b"x".to_vec(),
            b"\0".to_vec(),
        ] {
            let mut two = json.clone();
            two.extend_from_slice(&tail);
            let err = Manifest::parse(&two).unwrap_err().to_string();
            assert!(err.contains("trailing"), "{err}");
        }
    }
}
