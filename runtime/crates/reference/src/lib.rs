//! The native reference implementation of the kanade process-perf loop: the same logic as
//! the default guest, written from the specification with the seed's own structure (a
//! config-changed branch and a tick branch around one mutable state), in plain Rust.
//!
//! It exists for two reasons. The differential test runs it side by side with the guest
//! on random inputs and requires byte-identical messages; and the benchmarks use it as
//! the native baseline the sandboxed guest is measured against. It shares no logic with
//! the guest on purpose: a shared module would make the comparison test only the compiler.
//!
//! The one deliberate difference from the seed (S5): a NaN (or infinite) CPU reading is
//! treated as 0.0 for sorting and in the JSON, because JSON has neither.
//!
//! It must not depend on a NATS client (async-nats), `collector-fleet`,
//! `collector-deploy`, `collector-testkit`, or the command line (clap, the `collector`
//! crate): it needs only the shared types and the sandbox's process source.
//! `cargo xtask test` checks this layering.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_shared::{EffectiveConfig, ProcessPerf, ProcessSnapshot, subject};

use collector_sandbox::source::{Fields, ProcessSource};

/// Cumulative disk counters of one PID at the previous tick.
#[derive(Clone, Copy)]
struct PidIo {
    cumulative_read: u64,
    cumulative_written: u64,
}

/// The loop's state, as the seed keeps it in local variables.
pub struct ReferenceLoop {
    pc_id: String,
    cfg: EffectiveConfig,
    current_dur: Duration,
    pid_io: HashMap<u32, PidIo>,
    last_tick_at: Option<Duration>,
    needs_baseline_reset: bool,
}

impl ReferenceLoop {
    /// The loop as scheduled at start-up with `cfg`.
    pub fn new(pc_id: &str, cfg: EffectiveConfig) -> Self {
        Self {
            pc_id: pc_id.to_string(),
            current_dur: cfg.host_perf_duration(),
            cfg,
            pid_io: HashMap::new(),
            last_tick_at: None,
            needs_baseline_reset: true,
        }
    }

    /// The cadence the loop ticks at.
    pub fn interval(&self) -> Duration {
        self.current_dur
    }

    /// The seed's config-changed branch. Returns whether the cadence changed (the ticker
    /// is then rescheduled).
    pub fn config_changed(&mut self, cfg: EffectiveConfig) -> bool {
        let new_dur = cfg.host_perf_duration();
        self.cfg = cfg;
        if new_dur != self.current_dur {
            self.current_dur = new_dur;
            self.needs_baseline_reset = true;
            self.last_tick_at = None;
            return true;
        }
        false
    }

    /// The seed's tick branch at wall time `now_utc` and monotonic time `now`. Returns
    /// the message it publishes, as (subject, JSON payload), if any.
    pub fn tick(
        &mut self,
        now_utc: DateTime<Utc>,
        now: Duration,
        source: &mut dyn ProcessSource,
    ) -> Option<(String, Vec<u8>)> {
        if !self.cfg.process_perf_active_at(now_utc) {
            if !self.pid_io.is_empty() {
                self.pid_io.clear();
                self.pid_io.shrink_to_fit();
            }
            self.last_tick_at = None;
            self.needs_baseline_reset = true;
            return None;
        }

        // A failed enumeration leaves the previous sample as the baseline, time included.
        let table = source.sample(Fields::ALL).ok()?;
        let elapsed = match self.last_tick_at {
            Some(prev) => now.saturating_sub(prev).as_secs_f64(),
            None => 0.0,
        };
        self.last_tick_at = Some(now);

        let mut all: Vec<(u32, f32, u64, u64, u64)> = (0..table.len())
            .map(|i| {
                let cpu = table.cpu_pct[i];
                (
                    table.pids[i],
                    if cpu.is_finite() { cpu } else { 0.0 },
                    table.rss_bytes[i],
                    table.disk_read_bytes[i],
                    table.disk_written_bytes[i],
                )
            })
            .collect();
        // Descending by CPU%; non-finite readings were replaced above, so `total_cmp` is a total order and
        // the stable sort keeps ties in enumeration order.
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top_n = self.cfg.process_perf_top_n.max(1) as usize;
        all.truncate(top_n);

        let live_pids: HashSet<u32> = all.iter().map(|(pid, ..)| *pid).collect();
        let pids: Vec<u32> = all.iter().map(|(pid, ..)| *pid).collect();
        let names = source.names(&pids);
        let processes: Vec<ProcessSnapshot> = all
            .iter()
            .zip(names)
            .map(|(&(pid, cpu, mem, total_read, total_written), name)| {
                let (read_rate, write_rate) = if self.needs_baseline_reset || elapsed < 0.001 {
                    (None, None)
                } else {
                    match self.pid_io.get(&pid) {
                        Some(prev) => (
                            Some(total_read.saturating_sub(prev.cumulative_read) as f64 / elapsed),
                            Some(
                                total_written.saturating_sub(prev.cumulative_written) as f64
                                    / elapsed,
                            ),
                        ),
                        None => (None, None),
                    }
                };
                self.pid_io.insert(
                    pid,
                    PidIo {
                        cumulative_read: total_read,
                        cumulative_written: total_written,
                    },
                );
                ProcessSnapshot {
                    pid,
                    name,
                    cpu_pct: f64::from(cpu),
                    rss_bytes: mem.min(i64::MAX as u64) as i64,
                    disk_read_bytes_per_sec: read_rate,
                    disk_written_bytes_per_sec: write_rate,
                }
            })
            .collect();
        self.pid_io.retain(|pid, _| live_pids.contains(pid));
        self.needs_baseline_reset = false;

        let snapshot = ProcessPerf {
            pc_id: self.pc_id.clone(),
            at: now_utc,
            processes,
        };
        let payload = serde_json::to_vec(&snapshot).ok()?;
        Some((subject::process_perf(&self.pc_id), payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use collector_sandbox::source::{ProcessTable, StaticSource};

    #[test]
    fn publishes_top_n_with_rates_from_the_second_tick() {
        let mut source = StaticSource {
            table: ProcessTable {
                pids: vec![1, 2, 3],
                cpu_pct: vec![f32::NAN, 5.0, 9.0],
                rss_bytes: vec![1, u64::MAX, 3],
                disk_read_bytes: vec![0, 100, 0],
                disk_written_bytes: vec![0, 0, 0],
            },
            names: [(2, "two".to_string())].into(),
        };
        let cfg = EffectiveConfig {
            process_perf_enabled: true,
            process_perf_top_n: 2,
            ..Default::default()
        };
        let mut l = ReferenceLoop::new("pc", cfg);
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let (subject, first) = l.tick(t0, Duration::ZERO, &mut source).unwrap();
        assert_eq!(subject, "process_perf.pc");
        let first: ProcessPerf = serde_json::from_slice(&first).unwrap();
        let pids: Vec<u32> = first.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [3, 2]);
        assert_eq!(first.processes[1].rss_bytes, i64::MAX);
        assert_eq!(first.processes[1].name, "two");
        source.table.disk_read_bytes[1] = 300;
        let (_, second) = l.tick(t0, Duration::from_secs(2), &mut source).unwrap();
        let second: ProcessPerf = serde_json::from_slice(&second).unwrap();
        assert_eq!(second.processes[1].disk_read_bytes_per_sec, Some(100.0));
    }
}
