//! The effective configuration as `collector:api@0.2.0` guests get it: the typed
//! `settings` record, decoded here once so that no guest carries a JSON or date parser.
//! 0.1.0 guests still get the kanade JSON text; both come from the same
//! [`EffectiveConfig`], so they mean the same thing.

use collector_shared::EffectiveConfig;

use super::v0_2::collector::api::types::{Datetime, Settings};

/// A humantime text as nanoseconds; `None` when it does not parse (the guest decides
/// what that means, as it did when it parsed the text itself).
fn duration_ns(text: &str) -> Option<u64> {
    humantime::parse_duration(text)
        .ok()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The `settings` record of `config`.
pub fn settings(config: &EffectiveConfig) -> Settings {
    Settings {
        process_perf_enabled: config.process_perf_enabled,
        process_perf_expires_at: config.process_perf_expires_at.map(|at| Datetime {
            seconds: at.timestamp(),
            nanoseconds: at.timestamp_subsec_nanos(),
        }),
        process_perf_top_n: config.process_perf_top_n,
        host_perf_interval: duration_ns(&config.host_perf_interval),
        host_perf_interval_text: config.host_perf_interval.clone(),
        heartbeat_interval: duration_ns(&config.heartbeat_interval),
        target_version: config.target_version.clone(),
        target_version_jitter: duration_ns(&config.target_version_jitter),
        max_local_concurrent: config.max_local_concurrent.map(|n| n.get()),
        client_display_name: config.client_display_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kanade_defaults_and_unparsable_durations() {
        let s = settings(&EffectiveConfig::default());
        assert!(!s.process_perf_enabled);
        assert_eq!(s.process_perf_top_n, 20);
        assert_eq!(s.host_perf_interval, Some(60_000_000_000));
        assert_eq!(s.heartbeat_interval, Some(30_000_000_000));
        assert_eq!(s.target_version_jitter, Some(600_000_000_000));
        assert!(s.process_perf_expires_at.is_none());

        let config = EffectiveConfig {
            host_perf_interval: "soon".into(),
            process_perf_expires_at: Some("2026-01-02T03:04:05.5Z".parse().unwrap()),
            ..Default::default()
        };
        let s = settings(&config);
        assert_eq!(s.host_perf_interval, None, "unparsable: the guest decides");
        assert_eq!(s.host_perf_interval_text, "soon");
        let at = s.process_perf_expires_at.unwrap();
        assert_eq!((at.seconds, at.nanoseconds), (1_767_323_045, 500_000_000));
    }
}
