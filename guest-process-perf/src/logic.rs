//! The decisions of the process-perf loop, in plain Rust so they can be unit-tested on the
//! native target: gating (S1, S2, S11), cadence (S3), sorting and top-N (S5, S6), per-PID
//! disk rates and their baseline (S7–S10), the message (S12, S14) and error handling (S13).
//! Everything the loop needs from the outside world goes through [`Host`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_shared::perf::clamp_rss;
use collector_shared::{EffectiveConfig, ProcessPerf, ProcessSnapshot, subject};
use serde::{Deserialize, Serialize};

/// Columns of one process enumeration, as the host hands them over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub pids: Vec<u32>,
    pub cpu_pct: Vec<f32>,
    pub rss_bytes: Vec<u64>,
    pub disk_read_bytes: Vec<u64>,
    pub disk_written_bytes: Vec<u64>,
}

/// Log levels the host understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// What the loop needs from its host. The wasm build maps it to the WIT imports; tests
/// implement it with scripted data.
pub trait Host {
    /// Enumerates every process with CPU, memory and disk counters.
    fn sample(&mut self) -> Result<Sample, String>;
    /// Names of `pids` as of the last sample, in order; empty when unknown.
    fn names(&mut self, pids: &[u32]) -> Vec<String>;
    /// Publishes one message.
    fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String>;
    /// Writes one log line.
    fn log(&mut self, level: Level, message: &str);
    /// This machine's id.
    fn pc_id(&mut self) -> String;
}

/// Cumulative disk counters of one PID at the previous published tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Baseline {
    read: u64,
    written: u64,
}

/// The loop's state between ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessPerfLoop {
    config: EffectiveConfig,
    interval: Duration,
    /// Disk counters of the PIDs in the last published top-N (S10), sorted by PID. A
    /// sorted vector rather than a hash map: it holds top-N entries only, and keeps the
    /// component small and free of the random-seed import a `HashMap` brings.
    baseline: Vec<(u32, Baseline)>,
    /// Monotonic time of the previous active tick; `None` after a reset.
    last_tick: Option<Duration>,
    /// Set while inactive and on cadence changes: the next active tick publishes no
    /// rates and starts a fresh baseline (S9).
    needs_reset: bool,
    /// The publish subject and this machine's id, asked of the host once.
    identity: Option<(String, String)>,
}

impl Default for ProcessPerfLoop {
    fn default() -> Self {
        let config = EffectiveConfig::default();
        Self {
            interval: config.host_perf_duration(),
            config,
            baseline: Vec::new(),
            last_tick: None,
            needs_reset: true,
            identity: None,
        }
    }
}

/// Below this, elapsed time is too short for a meaningful rate (S8).
const MIN_RATE_WINDOW: f64 = 0.001;

/// Version tag of [`SavedState`]; bump when its meaning changes.
const STATE_FORMAT: &str = "process-perf/1";

/// What a successor inherits across a hot swap: the rate baseline and its clock.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    format: String,
    interval_ns: u64,
    last_tick_ns: Option<u64>,
    needs_reset: bool,
    baseline: Vec<(u32, Baseline)>,
}

impl ProcessPerfLoop {
    /// Takes a new effective configuration (S15: used from the next tick on). A new
    /// cadence resets the baseline (S9).
    pub fn configure(&mut self, config: EffectiveConfig) {
        let interval = config.host_perf_duration();
        if interval != self.interval {
            self.interval = interval;
            self.needs_reset = true;
            self.last_tick = None;
        }
        self.config = config;
    }

    /// Parses and applies a configuration in the kanade `EffectiveConfig` JSON encoding.
    ///
    /// # Errors
    ///
    /// The decoding error; the previous configuration stays.
    pub fn configure_json(&mut self, json: &str) -> Result<(), String> {
        let config = serde_json::from_str(json).map_err(|e| format!("bad config: {e}"))?;
        self.configure(config);
        Ok(())
    }

    /// The cadence the loop wants (S3).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One tick at wall time `now` and monotonic time `mono`.
    pub fn tick(&mut self, now: DateTime<Utc>, mono: Duration, host: &mut impl Host) {
        if !self.config.process_perf_active_at(now) {
            // S1/S11: the gate check is all the work an inactive tick does.
            if !self.baseline.is_empty() {
                host.log(Level::Debug, "inactive: clearing the PID baseline");
                self.baseline = Vec::new();
            }
            self.last_tick = None;
            self.needs_reset = true;
            return;
        }

        let sample = match host.sample() {
            Ok(sample) => sample,
            Err(e) => {
                // The baseline and its time stay those of the last good sample, so the
                // next rate spans both and stays correct.
                host.log(Level::Warn, &format!("process sampling failed: {e}"));
                return;
            }
        };
        let elapsed = self
            .last_tick
            .map_or(0.0, |prev| mono.saturating_sub(prev).as_secs_f64());
        self.last_tick = Some(mono);
        let top = top_by_cpu(&sample, self.config.process_perf_top_n.max(1) as usize);
        let top_pids: Vec<u32> = top.iter().map(|&i| sample.pids[i]).collect();
        let names = host.names(&top_pids);

        let rates_known = !self.needs_reset && elapsed >= MIN_RATE_WINDOW;
        let mut next_baseline = Vec::with_capacity(top.len());
        let processes = top
            .iter()
            .zip(names)
            .map(|(&i, name)| {
                let pid = sample.pids[i];
                let now_io = Baseline {
                    read: sample.disk_read_bytes[i],
                    written: sample.disk_written_bytes[i],
                };
                let prev = rates_known
                    .then(|| self.baseline.binary_search_by_key(&pid, |(p, _)| *p).ok())
                    .flatten()
                    .map(|i| self.baseline[i].1);
                next_baseline.push((pid, now_io));
                ProcessSnapshot {
                    pid,
                    name,
                    cpu_pct: f64::from(sanitize(sample.cpu_pct[i])),
                    rss_bytes: clamp_rss(sample.rss_bytes[i]),
                    disk_read_bytes_per_sec: prev
                        .map(|p| now_io.read.saturating_sub(p.read) as f64 / elapsed),
                    disk_written_bytes_per_sec: prev
                        .map(|p| now_io.written.saturating_sub(p.written) as f64 / elapsed),
                }
            })
            .collect();
        next_baseline.sort_unstable_by_key(|(pid, _)| *pid);
        self.baseline = next_baseline;
        self.needs_reset = false;

        let identity = self.identity.get_or_insert_with(|| {
            let pc_id = host.pc_id();
            (subject::process_perf(&pc_id), pc_id)
        });
        let message = ProcessPerf {
            pc_id: identity.1.clone(),
            at: now,
            processes,
        };
        // Sized for the usual message, so the buffer is not regrown (and copied) mid-way.
        let mut payload = Vec::with_capacity(128 + 192 * message.processes.len());
        // S13: neither failure stops the loop.
        match serde_json::to_writer(&mut payload, &message) {
            Ok(()) => {
                if let Err(e) = host.publish(&identity.0, &payload) {
                    host.log(Level::Warn, &format!("publish process_perf: {e}"));
                }
            }
            Err(e) => host.log(Level::Warn, &format!("serialize ProcessPerf: {e}")),
        }
    }

    /// Serializes the rate baseline for a successor module.
    pub fn save_state(&self) -> Vec<u8> {
        let baseline = self.baseline.clone();
        let state = SavedState {
            format: STATE_FORMAT.into(),
            interval_ns: duration_ns(self.interval),
            last_tick_ns: self.last_tick.map(duration_ns),
            needs_reset: self.needs_reset,
            baseline,
        };
        serde_json::to_vec(&state).expect("saved state is plain data")
    }

    /// Takes over the baseline saved by a predecessor.
    ///
    /// # Errors
    ///
    /// When the bytes are not a state this guest wrote.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let state: SavedState =
            serde_json::from_slice(bytes).map_err(|e| format!("unrecognised state: {e}"))?;
        if state.format != STATE_FORMAT {
            return Err(format!(
                "unrecognised state format {:?}, expected {STATE_FORMAT:?}",
                state.format
            ));
        }
        self.interval = Duration::from_nanos(state.interval_ns);
        self.last_tick = state.last_tick_ns.map(Duration::from_nanos);
        self.needs_reset = state.needs_reset;
        let mut baseline = state.baseline;
        baseline.sort_unstable_by_key(|(pid, _)| *pid);
        baseline.dedup_by_key(|(pid, _)| *pid);
        self.baseline = baseline;
        Ok(())
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// S5: JSON has no NaN (serde_json writes `null`, which the backend cannot decode as
/// f64) and a NaN must not poison the order, so it counts as 0. Infinities have the same
/// JSON problem and are no more a real reading, so they count as 0 too.
fn sanitize(cpu: f32) -> f32 {
    if cpu.is_finite() { cpu } else { 0.0 }
}

/// Indices of the `n` processes with the highest CPU, highest first; ties keep sample
/// order (S5, S6). Equivalent to a stable sort then truncate, but linear in the sample
/// size: only the kept entries are sorted.
fn top_by_cpu(sample: &Sample, n: usize) -> Vec<usize> {
    let cpu: Vec<f32> = sample.cpu_pct.iter().copied().map(sanitize).collect();
    // Descending CPU, then ascending index: a total order, so unstable selection is exact.
    let order = |a: &usize, b: &usize| cpu[*b].total_cmp(&cpu[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..sample.pids.len()).collect();
    if idx.len() > n {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_unstable_by(order);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeHost {
        table: Sample,
        samples: usize,
        name_lookups: usize,
        published: Vec<(String, ProcessPerf)>,
        logs: Vec<(Level, String)>,
        fail_publish: bool,
        fail_sample: bool,
    }

    impl FakeHost {
        fn set(&mut self, rows: &[(u32, f32, u64, u64, u64)]) {
            self.table = Sample {
                pids: rows.iter().map(|r| r.0).collect(),
                cpu_pct: rows.iter().map(|r| r.1).collect(),
                rss_bytes: rows.iter().map(|r| r.2).collect(),
                disk_read_bytes: rows.iter().map(|r| r.3).collect(),
                disk_written_bytes: rows.iter().map(|r| r.4).collect(),
            };
        }
        fn last(&self) -> &ProcessPerf {
            &self.published.last().expect("a publish").1
        }
    }

    impl Host for FakeHost {
        fn sample(&mut self) -> Result<Sample, String> {
            self.samples += 1;
            if self.fail_sample {
                return Err("enumeration failed".into());
            }
            Ok(self.table.clone())
        }
        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            self.name_lookups += pids.len();
            pids.iter().map(|p| format!("proc-{p}")).collect()
        }
        fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String> {
            if self.fail_publish {
                return Err("broker down".into());
            }
            self.published
                .push((subject.into(), serde_json::from_slice(payload).unwrap()));
            Ok(())
        }
        fn log(&mut self, level: Level, message: &str) {
            self.logs.push((level, message.into()));
        }
        fn pc_id(&mut self) -> String {
            "pc-1".into()
        }
    }

    fn enabled(top_n: u32, interval: &str) -> EffectiveConfig {
        EffectiveConfig {
            process_perf_enabled: true,
            process_perf_top_n: top_n,
            host_perf_interval: interval.into(),
            ..Default::default()
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn mono(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn disabled_does_not_sample_or_publish() {
        let mut l = ProcessPerfLoop::default();
        let mut h = FakeHost::default();
        h.set(&[(1, 1.0, 1, 1, 1)]);
        l.tick(t(0), mono(0.0), &mut h);
        assert_eq!((h.samples, h.published.len()), (0, 0));
    }

    #[test]
    fn sorted_top_n_with_nan_as_zero_and_stable_ties() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(4, "60s"));
        let mut h = FakeHost::default();
        h.set(&[
            (10, f32::NAN, 1, 0, 0),
            (11, 5.0, 1, 0, 0),
            (12, 50.0, 1, 0, 0),
            (13, 5.0, 1, 0, 0),
            (14, 0.0, 1, 0, 0),
            (15, 5.0, 1, 0, 0),
        ]);
        l.tick(t(0), mono(0.0), &mut h);
        let msg = h.last();
        let got: Vec<(u32, f64)> = msg.processes.iter().map(|p| (p.pid, p.cpu_pct)).collect();
        assert_eq!(got, vec![(12, 50.0), (11, 5.0), (13, 5.0), (15, 5.0)]);
        assert_eq!(h.name_lookups, 4, "names only for the published processes");

        l.configure(enabled(10, "60s"));
        l.tick(t(60), mono(60.0), &mut h);
        let tail: Vec<(u32, f64)> = h.last().processes[4..]
            .iter()
            .map(|p| (p.pid, p.cpu_pct))
            .collect();
        assert_eq!(
            tail,
            vec![(10, 0.0), (14, 0.0)],
            "NaN sorts as 0, in sample order"
        );
    }

    #[test]
    fn top_n_zero_means_one() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(0, "60s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 1.0, 1, 0, 0), (2, 2.0, 1, 0, 0)]);
        l.tick(t(0), mono(0.0), &mut h);
        assert_eq!(h.last().processes.len(), 1);
        assert_eq!(h.last().processes[0].pid, 2);
    }

    #[test]
    fn rates_from_the_second_tick_for_pids_that_stayed() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 1000), (2, 8.0, 1, 0, 0)]);
        l.tick(t(0), mono(10.0), &mut h);
        assert!(
            h.last()
                .processes
                .iter()
                .all(|p| p.disk_read_bytes_per_sec.is_none())
        );
        // PID 2 vanished, PID 3 is new, PID 1's write counter went backwards.
        h.set(&[(1, 9.0, 1, 300, 500), (3, 1.0, 1, 50, 50)]);
        l.tick(t(2), mono(12.0), &mut h);
        let p = &h.last().processes;
        assert_eq!(p[0].disk_read_bytes_per_sec, Some(100.0));
        assert_eq!(p[0].disk_written_bytes_per_sec, Some(0.0));
        assert_eq!(p[1].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn cadence_change_and_reactivation_reset_the_baseline() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h);
        l.configure(enabled(5, "5s"));
        assert_eq!(l.interval(), Duration::from_secs(5));
        l.tick(t(5), mono(5.0), &mut h);
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
        l.tick(t(10), mono(10.0), &mut h);
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, Some(0.0));

        let mut off = enabled(5, "5s");
        off.process_perf_enabled = false;
        l.configure(off);
        l.tick(t(15), mono(15.0), &mut h);
        assert!(
            l.baseline.is_empty(),
            "S11: baseline released while inactive"
        );
        l.configure(enabled(5, "5s"));
        l.tick(t(20), mono(20.0), &mut h);
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn under_a_millisecond_gives_no_rate() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(1.0), &mut h);
        l.tick(t(0), mono(1.0005), &mut h);
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn publish_failure_is_logged_and_the_loop_goes_on() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost {
            fail_publish: true,
            ..Default::default()
        };
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h);
        assert!(
            h.logs
                .iter()
                .any(|(lvl, m)| *lvl == Level::Warn && m.contains("broker down"))
        );
        h.fail_publish = false;
        l.tick(t(2), mono(2.0), &mut h);
        assert_eq!(h.published.len(), 1);
        assert_eq!(h.published[0].0, "process_perf.pc-1");
    }

    #[test]
    fn a_failed_sample_keeps_the_baseline_and_its_time() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h);
        h.fail_sample = true;
        l.tick(t(2), mono(2.0), &mut h);
        assert!(h.logs.iter().any(|(_, m)| m.contains("enumeration failed")));
        h.fail_sample = false;
        h.set(&[(1, 9.0, 1, 500, 100)]);
        l.tick(t(4), mono(4.0), &mut h);
        assert_eq!(h.published.len(), 2);
        assert_eq!(
            h.last().processes[0].disk_read_bytes_per_sec,
            Some(100.0),
            "400 bytes over the 4 s since the last good sample"
        );
    }

    #[test]
    fn infinite_cpu_counts_as_zero_so_the_json_stays_decodable() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, f32::INFINITY, 1, 0, 0), (2, 1.0, 1, 0, 0)]);
        l.tick(t(0), mono(0.0), &mut h);
        let got: Vec<(u32, f64)> = h
            .last()
            .processes
            .iter()
            .map(|p| (p.pid, p.cpu_pct))
            .collect();
        assert_eq!(got, vec![(2, 1.0), (1, 0.0)]);
    }

    #[test]
    fn state_round_trips_and_foreign_state_is_refused() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, "2s"));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h);
        let mut next = ProcessPerfLoop::default();
        next.restore_state(&l.save_state()).unwrap();
        next.configure(enabled(5, "2s"));
        h.set(&[(1, 9.0, 1, 300, 100)]);
        next.tick(t(2), mono(2.0), &mut h);
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, Some(100.0));

        assert!(next.restore_state(b"{\"format\":\"other/9\"}").is_err());
        assert!(next.restore_state(b"garbage").is_err());
    }
}
