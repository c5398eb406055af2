//! Per-PC configuration as kanade stores and resolves it: sparse `ConfigScope` layers
//! (global, groups, PC) resolved over built-in defaults into one `EffectiveConfig`.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Interval used when `host_perf_interval` is unparsable (or zero, which would spin).
pub const FALLBACK_HOST_PERF_INTERVAL: Duration = Duration::from_secs(60);

/// The resolved configuration of one PC. Every non-optional field must be present when
/// decoding; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveConfig {
    /// The most local jobs the PC runs at once; `None`: no limit. Default: `None`.
    #[serde(default)]
    pub max_local_concurrent: Option<NonZeroU32>,
    /// The agent version this PC should run, when pinned. Default: `None`.
    pub target_version: Option<String>,
    /// Humantime duration.
    pub target_version_jitter: String,
    /// Humantime duration.
    pub heartbeat_interval: String,
    /// Humantime duration; also the cadence of the process loop.
    pub host_perf_interval: String,
    /// Whether the per-process loop (`ProcessPerf` messages) is on. Default: false.
    pub process_perf_enabled: bool,
    /// When the per-process loop switches itself off (exclusive); `None`: never.
    pub process_perf_expires_at: Option<DateTime<Utc>>,
    /// How many processes a `ProcessPerf` message carries at most. Default: 20.
    pub process_perf_top_n: u32,
    /// The PC's display name, when set. Default: `None`.
    pub client_display_name: Option<String>,
}

impl Default for EffectiveConfig {
    /// The built-in defaults every resolution starts from.
    fn default() -> Self {
        Self {
            max_local_concurrent: None,
            target_version: None,
            target_version_jitter: "10m".into(),
            heartbeat_interval: "30s".into(),
            host_perf_interval: "60s".into(),
            process_perf_enabled: false,
            process_perf_expires_at: None,
            process_perf_top_n: 20,
            client_display_name: None,
        }
    }
}

impl EffectiveConfig {
    /// Whether the per-process loop should publish at `now`: enabled, and either no
    /// expiry or `now` strictly before it.
    pub fn process_perf_active_at(&self, now: DateTime<Utc>) -> bool {
        self.process_perf_enabled && self.process_perf_expires_at.is_none_or(|exp| now < exp)
    }

    /// The host-wide (and per-process) cadence. An unparsable value falls back to
    /// [`FALLBACK_HOST_PERF_INTERVAL`]; so does zero, which no ticker can honour.
    pub fn host_perf_duration(&self) -> Duration {
        match humantime::parse_duration(&self.host_perf_interval) {
            Ok(d) if !d.is_zero() => d,
            _ => FALLBACK_HOST_PERF_INTERVAL,
        }
    }
}

/// One layer of configuration (global, a group or a PC): every field optional, absent
/// when unset. `{}` is an empty scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigScope {
    /// Sets [`EffectiveConfig::max_local_concurrent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_local_concurrent: Option<NonZeroU32>,
    /// Sets [`EffectiveConfig::target_version`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Sets [`EffectiveConfig::target_version_jitter`]; humantime text, checked only by
    /// [`ConfigScope::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version_jitter: Option<String>,
    /// Sets [`EffectiveConfig::heartbeat_interval`]; humantime text, checked only by
    /// [`ConfigScope::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<String>,
    /// Sets [`EffectiveConfig::host_perf_interval`]; humantime text, checked only by
    /// [`ConfigScope::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_perf_interval: Option<String>,
    /// Sets [`EffectiveConfig::process_perf_enabled`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_perf_enabled: Option<bool>,
    /// Sets [`EffectiveConfig::process_perf_expires_at`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_perf_expires_at: Option<DateTime<Utc>>,
    /// Sets [`EffectiveConfig::process_perf_top_n`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_perf_top_n: Option<u32>,
    /// Sets [`EffectiveConfig::client_display_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_display_name: Option<String>,
}

/// Expands `$body` once per scope field, with the field's name bound to `$f`, so that the
/// field list lives in one place.
macro_rules! for_each_field {
    ($m:ident) => {
        $m!(
            max_local_concurrent,
            target_version,
            target_version_jitter,
            heartbeat_interval,
            host_perf_interval,
            process_perf_enabled,
            process_perf_expires_at,
            process_perf_top_n,
            client_display_name
        )
    };
}

/// Fields whose value is a humantime duration.
const DURATION_FIELDS: [&str; 3] = [
    "target_version_jitter",
    "heartbeat_interval",
    "host_perf_interval",
];

impl ConfigScope {
    /// The names of every field a scope may set, in wire order.
    pub const FIELDS: &'static [&'static str] = {
        macro_rules! names {
            ($($f:ident),*) => { &[$(stringify!($f)),*] };
        }
        for_each_field!(names)
    };

    /// Names of the fields this scope sets.
    pub fn set_fields(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        macro_rules! collect {
            ($($f:ident),*) => { $( if self.$f.is_some() { set.push(stringify!($f)); } )* };
        }
        for_each_field!(collect);
        set
    }

    /// Overlays the fields this scope sets onto `config`.
    pub fn apply_to(&self, config: &mut EffectiveConfig) {
        // Optional effective fields take the scope's `Option` as is; the others unwrap it.
        macro_rules! apply {
            ($($f:ident),*) => { $( self.$f.clone().assign(&mut config.$f); )* };
        }
        for_each_field!(apply);
    }

    /// Parses a scope from JSON text, reporting the failing field and position.
    /// Durations are not checked here (a KV may hold anything, and the effective config
    /// falls back on garbage); call [`ConfigScope::validate`] on operator input.
    ///
    /// Unknown fields are tolerated (the wire contract requires it) and returned so the
    /// caller can warn about likely typos.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field and what was expected.
    pub fn from_json(text: &str) -> Result<(ConfigScope, Vec<String>), ConfigError> {
        // Objects only: serde would also accept a struct written as a JSON array.
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| ConfigError {
                field: None,
                message: match e.classify() {
                    serde_json::error::Category::Data => {
                        format!("expected a JSON object of config fields ({e})")
                    }
                    _ => e.to_string(),
                },
            })?;
        let de = &mut serde_json::Deserializer::from_str(text);
        let scope: ConfigScope = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError {
                field: (path != "." && path != "?").then_some(path),
                message: e.into_inner().to_string(),
            }
        })?;
        let unknown = map
            .keys()
            .filter(|k| !Self::FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok((scope, unknown))
    }

    /// Checks values that are well-typed JSON but still wrong.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            &self.target_version_jitter,
            &self.heartbeat_interval,
            &self.host_perf_interval,
        ];
        for (field, value) in DURATION_FIELDS.iter().zip(durations) {
            if let Some(v) = value {
                humantime::parse_duration(v).map_err(|e| ConfigError {
                    field: Some((*field).to_string()),
                    message: format!(
                        "expected a duration such as \"60s\" or \"1m 30s\", got {v:?}: {e}"
                    ),
                })?;
            }
        }
        Ok(())
    }
}

/// Assigns a scope value to an effective field of either shape.
trait Assign<T> {
    fn assign(self, target: &mut T);
}

impl<T> Assign<T> for Option<T> {
    fn assign(self, target: &mut T) {
        if let Some(v) = self {
            *target = v;
        }
    }
}

impl<T> Assign<Option<T>> for Option<T> {
    fn assign(self, target: &mut Option<T>) {
        if self.is_some() {
            *target = self;
        }
    }
}

/// A field set by more than one group of the same PC: the alphabetically last group wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConflict {
    /// The name of the field, as in [`ConfigScope::FIELDS`].
    pub field: &'static str,
    /// The groups that set it, in resolution order.
    pub groups: Vec<String>,
}

impl fmt::Display for FieldConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field `{}` is set by groups {} (the last one wins)",
            self.field,
            self.groups.join(", ")
        )
    }
}

/// The outcome of resolving layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The configuration that applies to the PC.
    pub config: EffectiveConfig,
    /// Fields set by more than one of the PC's groups, for a warning; empty when none.
    pub conflicts: Vec<FieldConflict>,
}

/// Resolves built-in defaults, then `global`, then each group in alphabetical order,
/// then the PC's own scope; later layers win.
pub fn resolve<'a>(
    global: Option<&ConfigScope>,
    groups: impl IntoIterator<Item = (&'a str, &'a ConfigScope)>,
    pc: Option<&ConfigScope>,
) -> Resolved {
    let mut config = EffectiveConfig::default();
    if let Some(g) = global {
        g.apply_to(&mut config);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    let mut setters: Vec<(&'static str, Vec<String>)> = Vec::new();
    for (name, scope) in &groups {
        scope.apply_to(&mut config);
        for field in scope.set_fields() {
            match setters.iter_mut().find(|(f, _)| *f == field) {
                Some((_, names)) => names.push((*name).to_string()),
                None => setters.push((field, vec![(*name).to_string()])),
            }
        }
    }
    if let Some(p) = pc {
        p.apply_to(&mut config);
    }
    let conflicts = setters
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(field, groups)| FieldConflict { field, groups })
        .collect();
    Resolved { config, conflicts }
}

/// A configuration that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending field, when the error is about one.
    pub field: Option<String>,
    /// What is wrong, for people; `Display` puts the field, if any, before it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn decodes_kanade_effective_config_and_tolerates_unknown_fields() {
        let cfg: EffectiveConfig = serde_json::from_str(
            r#"{"target_version":null,"target_version_jitter":"10m","heartbeat_interval":"30s",
                "host_perf_interval":"2s","process_perf_enabled":true,
                "process_perf_expires_at":"2026-11-25T12:00:00Z","process_perf_top_n":5,
                "client_display_name":"Front desk","some_future_field":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(cfg.max_local_concurrent, None);
        assert_eq!(cfg.host_perf_duration(), Duration::from_secs(2));
        assert_eq!(
            cfg.process_perf_expires_at,
            Some(at("2026-11-25T12:00:00Z"))
        );
        assert_eq!(cfg.process_perf_top_n, 5);
        assert_eq!(cfg.client_display_name.as_deref(), Some("Front desk"));
    }

    #[test]
    fn effective_config_requires_non_optional_fields() {
        let err = serde_json::from_str::<EffectiveConfig>(r#"{"process_perf_enabled":true}"#)
            .unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
    }

    #[test]
    fn effective_config_round_trips_with_every_field_present() {
        let json = serde_json::to_string(&EffectiveConfig::default()).unwrap();
        assert_eq!(
            json,
            r#"{"max_local_concurrent":null,"target_version":null,"target_version_jitter":"10m","heartbeat_interval":"30s","host_perf_interval":"60s","process_perf_enabled":false,"process_perf_expires_at":null,"process_perf_top_n":20,"client_display_name":null}"#
        );
        let back: EffectiveConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, EffectiveConfig::default());
    }

    #[test]
    fn active_iff_enabled_and_before_expiry() {
        let now = at("2026-11-25T10:00:00Z");
        let mut cfg = EffectiveConfig::default();
        assert!(!cfg.process_perf_active_at(now));
        cfg.process_perf_enabled = true;
        assert!(cfg.process_perf_active_at(now));
        cfg.process_perf_expires_at = Some(at("2026-11-25T10:00:01Z"));
        assert!(cfg.process_perf_active_at(now));
        cfg.process_perf_expires_at = Some(now);
        assert!(!cfg.process_perf_active_at(now), "expiry is exclusive");
        cfg.process_perf_enabled = false;
        cfg.process_perf_expires_at = Some(at("2030-01-01T00:00:00Z"));
        assert!(!cfg.process_perf_active_at(now));
    }

    #[test]
    fn host_perf_duration_falls_back_on_garbage_and_zero() {
        let mut cfg = EffectiveConfig::default();
        for (text, want) in [
            ("1m 30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("soon", FALLBACK_HOST_PERF_INTERVAL),
            ("", FALLBACK_HOST_PERF_INTERVAL),
            ("0s", FALLBACK_HOST_PERF_INTERVAL),
        ] {
            cfg.host_perf_interval = text.into();
            assert_eq!(cfg.host_perf_duration(), want, "{text:?}");
        }
    }

    #[test]
    fn empty_scope_is_empty_object_and_unset_fields_are_absent() {
        let (scope, unknown) = ConfigScope::from_json("{}").unwrap();
        assert_eq!(scope, ConfigScope::default());
        assert!(unknown.is_empty());
        assert_eq!(serde_json::to_string(&scope).unwrap(), "{}");
        let scope = ConfigScope {
            process_perf_top_n: Some(3),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&scope).unwrap(),
            r#"{"process_perf_top_n":3}"#
        );
    }

    #[test]
    fn layers_resolve_global_then_groups_alphabetically_then_pc() {
        let global = ConfigScope {
            host_perf_interval: Some("30s".into()),
            process_perf_top_n: Some(5),
            ..Default::default()
        };
        let zeta = ConfigScope {
            process_perf_top_n: Some(7),
            process_perf_enabled: Some(true),
            ..Default::default()
        };
        let alpha = ConfigScope {
            process_perf_top_n: Some(6),
            client_display_name: Some("alpha".into()),
            ..Default::default()
        };
        let pc = ConfigScope {
            client_display_name: Some("mine".into()),
            ..Default::default()
        };
        // Given out of order on purpose: resolution sorts groups by name.
        let resolved = resolve(
            Some(&global),
            [("zeta", &zeta), ("alpha", &alpha)],
            Some(&pc),
        );
        let cfg = resolved.config;
        assert_eq!(cfg.host_perf_interval, "30s");
        assert_eq!(cfg.process_perf_top_n, 7, "zeta sorts after alpha and wins");
        assert!(cfg.process_perf_enabled);
        assert_eq!(cfg.client_display_name.as_deref(), Some("mine"));
        assert_eq!(cfg.heartbeat_interval, "30s", "built-in default kept");
        assert_eq!(
            resolved.conflicts,
            vec![FieldConflict {
                field: "process_perf_top_n",
                groups: vec!["alpha".into(), "zeta".into()],
            }]
        );
    }

    #[test]
    fn scope_errors_name_the_field_and_position() {
        let err = ConfigScope::from_json("{\n  \"process_perf_top_n\": \"ten\"\n}").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("process_perf_top_n"));
        assert!(err.message.contains("expected u32"), "{err}");
        assert!(err.message.contains("line 2"), "{err}");

        let (scope, _) =
            ConfigScope::from_json(r#"{"host_perf_interval":"every now and then"}"#).unwrap();
        let err = scope.validate().unwrap_err();
        assert_eq!(err.field.as_deref(), Some("host_perf_interval"));
        assert!(err.to_string().contains("expected a duration"), "{err}");

        let err = ConfigScope::from_json(r#"{"process_perf_expires_at":"tomorrow"}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("process_perf_expires_at"));

        let err = ConfigScope::from_json("[1]").unwrap_err();
        assert_eq!(err.field, None);
        assert!(err.message.contains("expected a JSON object"), "{err}");

        let err = ConfigScope::from_json("{\"process_perf_top_n\": 3,").unwrap_err();
        assert_eq!(err.field, None);
        assert!(err.message.contains("line 1"), "{err}");
    }

    #[test]
    fn unknown_scope_fields_are_tolerated_and_reported() {
        let (scope, unknown) =
            ConfigScope::from_json(r#"{"process_perf_enabeld":true,"process_perf_top_n":2}"#)
                .unwrap();
        assert_eq!(scope.process_perf_top_n, Some(2));
        assert_eq!(unknown, vec!["process_perf_enabeld".to_string()]);
    }
}
