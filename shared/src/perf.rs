//! The `ProcessPerf` message published on `process_perf.{pc_id}`, exactly as the kanade
//! backend decodes it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One snapshot of the top CPU consumers of a PC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessPerf {
    /// The PC the snapshot comes from.
    pub pc_id: String,
    /// Wall-clock time of the tick that took the snapshot (RFC 3339, UTC).
    pub at: DateTime<Utc>,
    /// Sorted by `cpu_pct` descending and cut to the configured top-N.
    pub processes: Vec<ProcessSnapshot>,
}

/// One process in a [`ProcessPerf`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    /// The operating system's process id.
    pub pid: u32,
    /// Empty when unknown.
    pub name: String,
    /// Percent of one core: a process busy on two cores reports about 200.
    pub cpu_pct: f64,
    /// Resident memory, clamped to `i64::MAX`.
    pub rss_bytes: i64,
    /// Omitted when there is no baseline to compute a rate from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_read_bytes_per_sec: Option<f64>,
    /// Omitted when there is no baseline to compute a rate from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_written_bytes_per_sec: Option<f64>,
}

/// Converts an unsigned byte count to the wire's `i64`, saturating at `i64::MAX`.
pub fn clamp_rss(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_kanade_field_names_and_omits_unknown_rates() {
        let msg = ProcessPerf {
            pc_id: "minipc".into(),
            at: "2026-11-25T10:00:00Z".parse().unwrap(),
            processes: vec![
                ProcessSnapshot {
                    pid: 42,
                    name: "postgres".into(),
                    cpu_pct: 150.5,
                    rss_bytes: 1024,
                    disk_read_bytes_per_sec: Some(10.0),
                    disk_written_bytes_per_sec: Some(0.5),
                },
                ProcessSnapshot {
                    pid: 7,
                    name: String::new(),
                    cpu_pct: 0.0,
                    rss_bytes: 0,
                    disk_read_bytes_per_sec: None,
                    disk_written_bytes_per_sec: None,
                },
            ],
        };
        assert_eq!(
            serde_json::to_string(&msg).unwrap(),
            r#"{"pc_id":"minipc","at":"2026-11-25T10:00:00Z","processes":[{"pid":42,"name":"postgres","cpu_pct":150.5,"rss_bytes":1024,"disk_read_bytes_per_sec":10.0,"disk_written_bytes_per_sec":0.5},{"pid":7,"name":"","cpu_pct":0.0,"rss_bytes":0}]}"#
        );
    }

    #[test]
    fn decodes_backend_json_with_missing_rates_and_fractional_seconds() {
        let msg: ProcessPerf = serde_json::from_str(
            r#"{"pc_id":"pc-1","at":"2026-11-25T10:00:00.123456789Z",
                "processes":[{"pid":1,"name":"init","cpu_pct":2.5,"rss_bytes":9223372036854775807}]}"#,
        )
        .unwrap();
        assert_eq!(msg.at.timestamp_subsec_nanos(), 123_456_789);
        assert_eq!(msg.processes[0].rss_bytes, i64::MAX);
        assert_eq!(msg.processes[0].disk_read_bytes_per_sec, None);
        assert_eq!(msg.processes[0].disk_written_bytes_per_sec, None);
    }

    #[test]
    fn at_is_written_as_rfc3339_utc_with_nanoseconds_when_present() {
        let msg = ProcessPerf {
            pc_id: "a".into(),
            at: "2026-01-02T03:04:05.000000042+02:00".parse().unwrap(),
            processes: vec![],
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            json,
            r#"{"pc_id":"a","at":"2026-01-02T01:04:05.000000042Z","processes":[]}"#
        );
    }

    #[test]
    fn rss_is_clamped_to_i64_max() {
        assert_eq!(clamp_rss(u64::MAX), i64::MAX);
        assert_eq!(clamp_rss(i64::MAX as u64 + 1), i64::MAX);
        assert_eq!(clamp_rss(12), 12);
    }
}
