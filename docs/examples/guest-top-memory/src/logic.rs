//! Every decision of the top-memory guest, in plain Rust so it can be unit-tested on the
//! native target: whether to collect (the `process_perf` gate), how often, which
//! processes to keep, and the message. Everything it needs from the outside world goes
//! through [`Host`], which the wasm build maps to the WIT imports.

use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_shared::EffectiveConfig;
use serde::Serialize;

/// The resident memory of every process, as two columns of equal length: entry `i` of
/// each describes the same process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemorySample {
    /// Process ids.
    pub pids: Vec<u32>,
    /// Resident set size in bytes.
    pub rss_bytes: Vec<u64>,
}

/// What this guest needs from its host, and nothing more.
pub trait Host {
    /// Enumerates every process with its resident memory (only memory: the host then
    /// skips reading CPU and disk counters).
    fn sample_memory(&mut self) -> Result<MemorySample, String>;
    /// Names of `pids` as of the last sample, in order; empty when a process is gone.
    fn names(&mut self, pids: &[u32]) -> Vec<String>;
    /// Publishes one message.
    fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String>;
    /// Writes a warning to the agent's log.
    fn warn(&mut self, message: &str);
    /// This machine's id.
    fn pc_id(&mut self) -> String;
}

/// The message published on [`subject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopMemory {
    /// The machine the snapshot comes from.
    pub pc_id: String,
    /// Wall-clock time of the tick (RFC 3339, UTC).
    pub at: DateTime<Utc>,
    /// Largest resident memory first, at most `process_perf_top_n` entries.
    pub processes: Vec<ProcessMemory>,
}

/// One process in a [`TopMemory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    pub pid: u32,
    /// Empty when the process exited between the sample and the name look-up.
    pub name: String,
    pub rss_bytes: u64,
}

/// The subject this guest publishes on. The host's default grant (`*.{pc_id}`) covers it.
pub fn subject(pc_id: &str) -> String {
    format!("process_mem.{pc_id}")
}

/// The guest's whole state: the configuration it was last given. Nothing here is worth
/// carrying into a successor module, so the guest saves no state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopMemoryGuest {
    config: EffectiveConfig,
}

impl TopMemoryGuest {
    /// Parses and applies a configuration in the kanade `EffectiveConfig` JSON encoding.
    ///
    /// # Errors
    ///
    /// The decoding error; the previous configuration stays in force.
    pub fn configure_json(&mut self, json: &str) -> Result<(), String> {
        self.config = serde_json::from_str(json).map_err(|e| format!("bad config: {e}"))?;
        Ok(())
    }

    /// The cadence this guest wants: the same `host_perf_interval` as the default guest.
    pub fn interval(&self) -> Duration {
        self.config.host_perf_duration()
    }

    /// One tick at wall-clock time `now`.
    pub fn tick(&self, now: DateTime<Utc>, host: &mut impl Host) {
        // An inactive tick must stay cheap: the gate is checked before any host call.
        if !self.config.process_perf_active_at(now) {
            return;
        }
        let sample = match host.sample_memory() {
            Ok(sample) => sample,
            Err(e) => return host.warn(&format!("process sampling failed: {e}")),
        };
        if sample.rss_bytes.len() != sample.pids.len() {
            // A column that does not line up would pair the wrong memory with a pid.
            return host.warn(&format!(
                "sample has {} pids but {} memory readings; skipping this tick",
                sample.pids.len(),
                sample.rss_bytes.len()
            ));
        }

        let top_n = self.config.process_perf_top_n.max(1) as usize;
        let top = top_by_memory(&sample.rss_bytes, top_n);
        // Names cross the sandbox boundary slowly, so only the kept processes get one.
        let pids: Vec<u32> = top.iter().map(|&i| sample.pids[i]).collect();
        let names = host.names(&pids);
        let processes = top
            .iter()
            .zip(names)
            .map(|(&i, name)| ProcessMemory {
                pid: sample.pids[i],
                name,
                rss_bytes: sample.rss_bytes[i],
            })
            .collect();

        let message = TopMemory {
            pc_id: host.pc_id(),
            at: now,
            processes,
        };
        let payload = serde_json::to_vec(&message).expect("TopMemory serializes to JSON");
        // A lost message is not worth failing the tick over: the next one carries fresh data.
        if let Err(e) = host.publish(&subject(&message.pc_id), &payload) {
            host.warn(&format!("publish {}: {e}", subject(&message.pc_id)));
        }
    }
}

/// Indices of the `n` largest readings, largest first; equal readings keep sample order
/// (a stable sort), so the output is deterministic.
fn top_by_memory(rss_bytes: &[u64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rss_bytes.len()).collect();
    order.sort_by(|&a, &b| rss_bytes[b].cmp(&rss_bytes[a]));
    order.truncate(n);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted host that records what the guest asked of it.
    #[derive(Default)]
    struct FakeHost {
        sample: MemorySample,
        samples: usize,
        names_asked: Vec<u32>,
        published: Vec<(String, serde_json::Value)>,
        warnings: Vec<String>,
        fail_publish: bool,
    }

    impl FakeHost {
        fn with(rows: &[(u32, u64)]) -> Self {
            Self {
                sample: MemorySample {
                    pids: rows.iter().map(|r| r.0).collect(),
                    rss_bytes: rows.iter().map(|r| r.1).collect(),
                },
                ..Default::default()
            }
        }
    }

    impl Host for FakeHost {
        fn sample_memory(&mut self) -> Result<MemorySample, String> {
            self.samples += 1;
            Ok(self.sample.clone())
        }
        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            self.names_asked.extend(pids);
            pids.iter().map(|p| format!("proc-{p}")).collect()
        }
        fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String> {
            if self.fail_publish {
                return Err("broker down".into());
            }
            let json = serde_json::from_slice(payload).expect("JSON payload");
            self.published.push((subject.into(), json));
            Ok(())
        }
        fn warn(&mut self, message: &str) {
            self.warnings.push(message.into());
        }
        fn pc_id(&mut self) -> String {
            "pc-1".into()
        }
    }

    /// A guest configured with the defaults overlaid by the fields of `overrides`, in the
    /// JSON encoding the host sends.
    fn guest(overrides: &str) -> TopMemoryGuest {
        let mut config = serde_json::to_value(EffectiveConfig::default()).unwrap();
        let overrides: serde_json::Map<_, _> = serde_json::from_str(overrides).unwrap();
        config.as_object_mut().unwrap().extend(overrides);
        let mut g = TopMemoryGuest::default();
        g.configure_json(&config.to_string()).unwrap();
        g
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn off_by_default_touches_nothing() {
        let mut h = FakeHost::with(&[(1, 100)]);
        TopMemoryGuest::default().tick(t(0), &mut h);
        assert_eq!((h.samples, h.published.len()), (0, 0));
    }

    #[test]
    fn keeps_the_largest_first_with_ties_in_sample_order() {
        let g = guest(r#"{"process_perf_enabled": true, "process_perf_top_n": 3}"#);
        let mut h = FakeHost::with(&[(1, 10), (2, 500), (3, 70), (4, 500), (5, 900)]);
        g.tick(t(0), &mut h);
        let (subject, msg) = &h.published[0];
        assert_eq!(subject, "process_mem.pc-1");
        assert_eq!(
            msg,
            &serde_json::json!({
                "pc_id": "pc-1",
                "at": "2027-01-15T08:00:00Z",
                "processes": [
                    {"pid": 5, "name": "proc-5", "rss_bytes": 900},
                    {"pid": 2, "name": "proc-2", "rss_bytes": 500},
                    {"pid": 4, "name": "proc-4", "rss_bytes": 500},
                ],
            })
        );
        assert_eq!(h.names_asked, vec![5, 2, 4], "names only for the kept ones");
    }

    #[test]
    fn top_n_zero_means_one() {
        let g = guest(r#"{"process_perf_enabled": true, "process_perf_top_n": 0}"#);
        let mut h = FakeHost::with(&[(1, 10), (2, 20)]);
        g.tick(t(0), &mut h);
        assert_eq!(h.published[0].1["processes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn expiry_is_exclusive_and_stops_sampling() {
        let expiry = t(60).to_rfc3339();
        let g = guest(&format!(
            r#"{{"process_perf_enabled": true, "process_perf_expires_at": "{expiry}"}}"#
        ));
        let mut h = FakeHost::with(&[(1, 10)]);
        g.tick(t(59), &mut h);
        g.tick(t(60), &mut h);
        assert_eq!((h.samples, h.published.len()), (1, 1));
    }

    #[test]
    fn interval_follows_host_perf_interval() {
        assert_eq!(guest("{}").interval(), Duration::from_secs(60));
        let g = guest(r#"{"host_perf_interval": "1m 30s"}"#);
        assert_eq!(g.interval(), Duration::from_secs(90));
    }

    #[test]
    fn bad_config_keeps_the_previous_one() {
        let mut g = guest(r#"{"process_perf_enabled": true}"#);
        let err = g.configure_json(r#"{"process_perf_enabled": false}"#);
        assert!(err.unwrap_err().contains("missing field"));
        let mut h = FakeHost::with(&[(1, 10)]);
        g.tick(t(0), &mut h);
        assert_eq!(h.published.len(), 1);
    }

    #[test]
    fn failures_are_warnings_not_traps() {
        let g = guest(r#"{"process_perf_enabled": true}"#);
        let mut h = FakeHost::with(&[(1, 10)]);
        h.fail_publish = true;
        g.tick(t(0), &mut h);
        assert!(h.warnings[0].contains("broker down"), "{:?}", h.warnings);

        h.sample.rss_bytes.clear();
        g.tick(t(60), &mut h);
        assert!(h.warnings[1].contains("1 pids but 0 memory readings"));
        assert_eq!(h.names_asked.len(), 1, "no names for a skipped tick");
    }
}
