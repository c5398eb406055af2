//! The decisions of the process-perf loop, in plain Rust so they can be unit-tested on the
//! native target: gating (S1, S2, S11), cadence (S3), sorting and top-N (S5, S6), per-PID
//! disk rates and their baseline (S7–S10), the message (S12, S14), error handling (S13),
//! and priming the CPU baseline so the first message has real CPU figures.
//! Everything the loop needs from the outside world goes through [`Host`].

use std::time::Duration;

use crate::message::{self, Row, WallTime};

/// The configuration the loop acts on: kanade's `EffectiveConfig` fields it uses, as the
/// host decoded them.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `process_perf_enabled`.
    pub enabled: bool,
    /// `process_perf_expires_at`.
    pub expires_at: Option<WallTime>,
    /// `process_perf_top_n`.
    pub top_n: u32,
    /// `host_perf_interval`, `None` when its text is not a duration.
    pub interval: Option<Duration>,
}

impl Default for Config {
    /// kanade's defaults: off, no expiry, top 20, every 60 s.
    fn default() -> Self {
        Self {
            enabled: false,
            expires_at: None,
            top_n: 20,
            interval: Some(FALLBACK_INTERVAL),
        }
    }
}

/// Cadence when `host_perf_interval` is unparsable, or zero, which no ticker honours (S3).
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(60);

/// How long after a first CPU reading the loop samples again to publish: long enough for
/// CPU figures to mean something (the kernel counts CPU time in 10 ms steps), short
/// enough that turning the loop on is answered at once.
pub const PRIME_LEAD: Duration = Duration::from_secs(1);

impl Config {
    /// S2: enabled, and either no expiry or `now` strictly before it.
    pub fn active_at(&self, now: WallTime) -> bool {
        self.enabled && self.expires_at.is_none_or(|exp| now < exp)
    }

    /// S3: the cadence, with the fallback for unparsable and zero intervals.
    pub fn cadence(&self) -> Duration {
        self.interval
            .filter(|d| !d.is_zero())
            .unwrap_or(FALLBACK_INTERVAL)
    }
}

/// Tables of at most this many processes are sampled in one call, disk counters
/// included, instead of a sample of everyone and a second one of the top-N's disk
/// counters. On a small table, reading every process's io file costs less than a second
/// enumeration (another pass over /proc and, in the agent, another hand-off to its
/// enumeration thread); on a large one, the io files of processes never published
/// would dominate. Decided from the previous sample's size.
pub const ONE_SAMPLE_MAX: usize = 128;

/// CPU and memory of every process, as the host hands them over, and their disk
/// counters when they were asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub pids: Vec<u32>,
    pub cpu_pct: Vec<f32>,
    pub rss_bytes: Vec<u64>,
    /// Cumulative disk counters of every process; empty when not asked for.
    pub read_bytes: Vec<u64>,
    pub written_bytes: Vec<u64>,
    /// Whether `cpu_pct` was measured over a span (false on the host's first reading).
    pub cpu_primed: bool,
}

/// Cumulative disk counters of some processes: those of the PIDs asked for that still
/// exist, in the order asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Disk {
    pub pids: Vec<u32>,
    pub read_bytes: Vec<u64>,
    pub written_bytes: Vec<u64>,
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
    /// Enumerates every process with CPU and memory, and disk counters when `disk`.
    fn sample(&mut self, disk: bool) -> Result<Sample, String>;
    /// Disk counters of `pids` only.
    fn disk(&mut self, pids: &[u32]) -> Result<Disk, String>;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Baseline {
    read: u64,
    written: u64,
}

/// The loop's state between ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessPerfLoop {
    config: Config,
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
    /// The last sample was the host's first CPU reading: publish at the next tick, which
    /// comes [`PRIME_LEAD`] later.
    priming: bool,
    /// The publish subject and this machine's id, asked of the host once.
    identity: Option<(String, String)>,
    /// Buffers reused across ticks: the message and the top-N selection.
    payload: Vec<u8>,
    order: Vec<usize>,
    /// Processes in the last sample (0 before the first): whether the next is taken in
    /// one call, with disk counters ([`ONE_SAMPLE_MAX`]).
    last_len: usize,
    /// [`ONE_SAMPLE_MAX`], lowered by tests of the two-call path.
    one_sample_max: usize,
}

impl Default for ProcessPerfLoop {
    fn default() -> Self {
        let config = Config::default();
        Self {
            interval: config.cadence(),
            config,
            baseline: Vec::new(),
            last_tick: None,
            needs_reset: true,
            priming: false,
            identity: None,
            payload: Vec::new(),
            order: Vec::new(),
            last_len: 0,
            one_sample_max: ONE_SAMPLE_MAX,
        }
    }
}

/// Below this, elapsed time is too short for a meaningful rate (S8).
const MIN_RATE_WINDOW: f64 = 0.001;

/// Leads [`ProcessPerfLoop::save_state`]'s bytes; bump when their meaning changes.
const STATE_MAGIC: &[u8; 16] = b"process-perf/2\0\0";

impl ProcessPerfLoop {
    /// Takes a new configuration (S15: used from the next tick on). A new cadence resets
    /// the baseline (S9).
    pub fn configure(&mut self, config: Config) {
        let interval = config.cadence();
        if interval != self.interval {
            self.interval = interval;
            self.needs_reset = true;
            self.last_tick = None;
        }
        self.config = config;
    }

    /// The cadence the loop wants (S3); once, after a first CPU reading, the short
    /// [`PRIME_LEAD`] instead.
    pub fn interval(&self) -> Duration {
        if self.priming {
            self.interval.min(PRIME_LEAD)
        } else {
            self.interval
        }
    }

    /// One tick at wall time `now` and monotonic time `mono`.
    ///
    /// # Errors
    ///
    /// When `now` is outside the range of times the message can carry.
    pub fn tick(
        &mut self,
        now: WallTime,
        mono: Duration,
        host: &mut impl Host,
    ) -> Result<(), String> {
        if !now.in_range() {
            return Err(format!("wall time out of range: {}s", now.seconds));
        }
        if !self.config.active_at(now) {
            // S1/S11: the gate check is all the work an inactive tick does.
            if !self.baseline.is_empty() {
                host.log(Level::Debug, "inactive: clearing the PID baseline");
                self.baseline = Vec::new();
            }
            self.last_tick = None;
            self.needs_reset = true;
            self.priming = false;
            return Ok(());
        }

        // The first sample of a loop is its CPU baseline, which publishes nothing: it
        // never pays for disk counters.
        let one_sample = (1..=self.one_sample_max).contains(&self.last_len);
        let sample = match host.sample(one_sample) {
            Ok(sample) => sample,
            Err(e) => {
                // The baseline and its time stay those of the last good sample, so the
                // next rate spans both and stays correct.
                host.log(Level::Warn, &format!("process sampling failed: {e}"));
                return Ok(());
            }
        };
        self.last_len = sample.pids.len();
        if !sample.cpu_primed {
            // Every CPU figure is 0 on a first reading: a message now would rank
            // processes in arbitrary order. This reading is the baseline; the next
            // tick, `PRIME_LEAD` from now, publishes real figures.
            host.log(
                Level::Debug,
                "first CPU reading: publishing from the next tick",
            );
            self.priming = true;
            return Ok(());
        }
        self.priming = false;

        let n = self.config.top_n.max(1) as usize;
        top_by_cpu(&sample.cpu_pct, n, &mut self.order);
        let top_pids: Vec<u32> = self.order.iter().map(|&i| sample.pids[i]).collect();
        // S4: disk counters and names only for the processes that are published (on a
        // small table, the sample already holds everyone's counters).
        let sampled_disk = one_sample
            && sample.read_bytes.len() == sample.pids.len()
            && sample.written_bytes.len() == sample.pids.len();
        let disk = if sampled_disk {
            Disk {
                pids: top_pids.clone(),
                read_bytes: self.order.iter().map(|&i| sample.read_bytes[i]).collect(),
                written_bytes: self
                    .order
                    .iter()
                    .map(|&i| sample.written_bytes[i])
                    .collect(),
            }
        } else {
            match host.disk(&top_pids) {
                Ok(disk) => disk,
                Err(e) => {
                    host.log(Level::Warn, &format!("disk counters failed: {e}"));
                    return Ok(());
                }
            }
        };
        let names = host.names(&top_pids);
        let elapsed = self
            .last_tick
            .map_or(0.0, |prev| mono.saturating_sub(prev).as_secs_f64());
        self.last_tick = Some(mono);
        let rates_known = !self.needs_reset && elapsed >= MIN_RATE_WINDOW;

        let identity = self.identity.get_or_insert_with(|| {
            let pc_id = host.pc_id();
            (format!("process_perf.{pc_id}"), pc_id)
        });
        let mut payload = std::mem::take(&mut self.payload);
        message::begin(&mut payload, &identity.1, now);
        let mut next_baseline = Vec::with_capacity(top_pids.len());
        // `disk` holds the asked PIDs that still exist, in the order asked.
        let mut d = 0;
        for (k, (&i, &pid)) in self.order.iter().zip(&top_pids).enumerate() {
            let counters = (disk.pids.get(d) == Some(&pid)).then(|| {
                d += 1;
                Baseline {
                    read: disk.read_bytes[d - 1],
                    written: disk.written_bytes[d - 1],
                }
            });
            let prev = counters
                .filter(|_| rates_known)
                .and_then(|_| self.baseline.binary_search_by_key(&pid, |(p, _)| *p).ok())
                .map(|at| self.baseline[at].1);
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / elapsed;
            let (read_rate, written_rate) = match (counters, prev) {
                (Some(c), Some(p)) => {
                    (Some(rate(c.read, p.read)), Some(rate(c.written, p.written)))
                }
                _ => (None, None),
            };
            if let Some(c) = counters {
                next_baseline.push((pid, c));
            }
            message::row(
                &mut payload,
                k == 0,
                &Row {
                    pid,
                    name: names.get(k).map_or("", String::as_str),
                    cpu_pct: f64::from(sanitize(sample.cpu_pct[i])),
                    rss_bytes: clamp_rss(sample.rss_bytes[i]),
                    disk_read_bytes_per_sec: read_rate,
                    disk_written_bytes_per_sec: written_rate,
                },
            );
        }
        message::end(&mut payload);
        next_baseline.sort_unstable_by_key(|(pid, _)| *pid);
        self.baseline = next_baseline;
        self.needs_reset = false;

        // S13: a failure does not stop the loop.
        if let Err(e) = host.publish(&identity.0, &payload) {
            host.log(Level::Warn, &format!("publish process_perf: {e}"));
        }
        self.payload = payload;
        Ok(())
    }

    /// Serializes the rate baseline for a successor module: [`STATE_MAGIC`], the
    /// interval and last tick in nanoseconds (`u64::MAX`: none), the reset flag, the
    /// count of entries, then PID, read and written counters per entry; little-endian.
    pub fn save_state(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 8 + 8 + 1 + 4 + 20 * self.baseline.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&duration_ns(self.interval).to_le_bytes());
        let last = self.last_tick.map_or(u64::MAX, duration_ns);
        out.extend_from_slice(&last.to_le_bytes());
        out.push(u8::from(self.needs_reset));
        out.extend_from_slice(&(self.baseline.len() as u32).to_le_bytes());
        for (pid, b) in &self.baseline {
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&b.read.to_le_bytes());
            out.extend_from_slice(&b.written.to_le_bytes());
        }
        out
    }

    /// Takes over the baseline saved by a predecessor.
    ///
    /// # Errors
    ///
    /// When the bytes are not a state this version of the guest writes (the JSON state of
    /// the 0.1.0 build included: the loop then starts fresh, and its first message has
    /// no disk rates).
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut r = Reader(bytes);
        if r.take(STATE_MAGIC.len()) != Some(STATE_MAGIC.as_slice()) {
            return Err("unrecognised state: expected one saved by process-perf/2".into());
        }
        let truncated = || "state truncated".to_string();
        let interval = r.u64().ok_or_else(truncated)?;
        let last_tick = r.u64().ok_or_else(truncated)?;
        let needs_reset = r.take(1).ok_or_else(truncated)?[0] != 0;
        let count = r.u32().ok_or_else(truncated)? as usize;
        if r.0.len() != count.saturating_mul(20) {
            return Err(format!(
                "state of {count} baseline entries holds {} bytes for them, expected {}",
                r.0.len(),
                count.saturating_mul(20)
            ));
        }
        let mut baseline = Vec::with_capacity(count);
        for _ in 0..count {
            let pid = r.u32().ok_or_else(truncated)?;
            let read = r.u64().ok_or_else(truncated)?;
            let written = r.u64().ok_or_else(truncated)?;
            baseline.push((pid, Baseline { read, written }));
        }
        baseline.sort_unstable_by_key(|(pid, _)| *pid);
        baseline.dedup_by_key(|(pid, _)| *pid);
        self.interval = Duration::from_nanos(interval);
        self.last_tick = (last_tick != u64::MAX).then(|| Duration::from_nanos(last_tick));
        self.needs_reset = needs_reset;
        self.baseline = baseline;
        Ok(())
    }
}

/// Reads the little-endian fields of a saved state.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// S14: the wire's `rss_bytes` is an `i64`.
fn clamp_rss(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// S5: JSON has no NaN (serde_json writes `null`, which the backend cannot decode as
/// f64) and a NaN must not poison the order, so it counts as 0. Infinities have the same
/// JSON problem and are no more a real reading, so they count as 0 too.
fn sanitize(cpu: f32) -> f32 {
    if cpu.is_finite() { cpu } else { 0.0 }
}

/// Fills `order` with the indices of the `n` processes with the highest CPU, highest
/// first; ties keep sample order (S5, S6). Equivalent to a stable sort then truncate, but
/// linear in the sample size: only the kept entries are sorted.
fn top_by_cpu(cpu: &[f32], n: usize, order: &mut Vec<usize>) {
    // Descending CPU, then ascending index: a total order, so unstable selection is exact.
    let by = |a: &usize, b: &usize| {
        sanitize(cpu[*b])
            .total_cmp(&sanitize(cpu[*a]))
            .then(a.cmp(b))
    };
    order.clear();
    order.extend(0..cpu.len());
    if order.len() > n {
        order.select_nth_unstable_by(n - 1, by);
        order.truncate(n);
    }
    order.sort_unstable_by(by);
}

#[cfg(test)]
mod tests {
    use super::*;
    use collector_shared::ProcessPerf;

    /// One scripted process: PID, CPU, RSS, read and written counters.
    type Proc = (u32, f32, u64, u64, u64);

    #[derive(Default)]
    struct FakeHost {
        table: Vec<Proc>,
        unprimed: bool,
        samples: usize,
        /// Samples that asked for everyone's disk counters.
        disk_samples: usize,
        disk_lookups: usize,
        name_lookups: usize,
        published: Vec<(String, ProcessPerf)>,
        logs: Vec<(Level, String)>,
        fail_publish: bool,
        fail_sample: bool,
        /// PIDs that exit between the sample and the disk look-up.
        exiting: Vec<u32>,
    }

    impl FakeHost {
        fn set(&mut self, rows: &[Proc]) {
            self.table = rows.to_vec();
        }
        fn last(&self) -> &ProcessPerf {
            &self.published.last().expect("a publish").1
        }
    }

    impl Host for FakeHost {
        fn sample(&mut self, disk: bool) -> Result<Sample, String> {
            self.samples += 1;
            if self.fail_sample {
                return Err("enumeration failed".into());
            }
            self.disk_samples += usize::from(disk);
            let column = |f: fn(&Proc) -> u64| -> Vec<u64> {
                if disk {
                    self.table.iter().map(f).collect()
                } else {
                    Vec::new()
                }
            };
            Ok(Sample {
                pids: self.table.iter().map(|r| r.0).collect(),
                cpu_pct: self.table.iter().map(|r| r.1).collect(),
                rss_bytes: self.table.iter().map(|r| r.2).collect(),
                read_bytes: column(|r| r.3),
                written_bytes: column(|r| r.4),
                cpu_primed: !std::mem::take(&mut self.unprimed),
            })
        }
        fn disk(&mut self, pids: &[u32]) -> Result<Disk, String> {
            self.disk_lookups += pids.len();
            let rows: Vec<&Proc> = pids
                .iter()
                .filter(|p| !self.exiting.contains(p))
                .filter_map(|p| self.table.iter().find(|r| r.0 == *p))
                .collect();
            Ok(Disk {
                pids: rows.iter().map(|r| r.0).collect(),
                read_bytes: rows.iter().map(|r| r.3).collect(),
                written_bytes: rows.iter().map(|r| r.4).collect(),
            })
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

    fn enabled(top_n: u32, interval_secs: u64) -> Config {
        Config {
            enabled: true,
            top_n,
            interval: Some(Duration::from_secs(interval_secs)),
            ..Default::default()
        }
    }

    fn t(secs: i64) -> WallTime {
        WallTime {
            seconds: 1_800_000_000 + secs,
            nanoseconds: 0,
        }
    }

    fn mono(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn disabled_does_not_sample_or_publish() {
        let mut l = ProcessPerfLoop::default();
        let mut h = FakeHost::default();
        h.set(&[(1, 1.0, 1, 1, 1)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        assert_eq!((h.samples, h.published.len()), (0, 0));
    }

    #[test]
    fn expiry_is_exclusive_and_unparsable_or_zero_intervals_fall_back() {
        let mut c = enabled(5, 2);
        c.expires_at = Some(t(10));
        assert!(c.active_at(t(9)));
        assert!(!c.active_at(t(10)));
        c.interval = None;
        assert_eq!(c.cadence(), FALLBACK_INTERVAL);
        c.interval = Some(Duration::ZERO);
        assert_eq!(c.cadence(), FALLBACK_INTERVAL);
    }

    #[test]
    fn sorted_top_n_with_nan_as_zero_and_stable_ties() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(4, 60));
        let mut h = FakeHost::default();
        h.set(&[
            (10, f32::NAN, 1, 0, 0),
            (11, 5.0, 1, 0, 0),
            (12, 50.0, 1, 0, 0),
            (13, 5.0, 1, 0, 0),
            (14, 0.0, 1, 0, 0),
            (15, 5.0, 1, 0, 0),
        ]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        let msg = h.last();
        let got: Vec<(u32, f64)> = msg.processes.iter().map(|p| (p.pid, p.cpu_pct)).collect();
        assert_eq!(got, vec![(12, 50.0), (11, 5.0), (13, 5.0), (15, 5.0)]);
        assert_eq!(h.name_lookups, 4, "names only for the published processes");
        assert_eq!(
            h.disk_lookups, 4,
            "disk counters only for the published ones"
        );

        l.configure(enabled(10, 60));
        l.tick(t(60), mono(60.0), &mut h).unwrap();
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
        l.configure(enabled(0, 60));
        let mut h = FakeHost::default();
        h.set(&[(1, 1.0, 1, 0, 0), (2, 2.0, 1, 0, 0)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        assert_eq!(h.last().processes.len(), 1);
        assert_eq!(h.last().processes[0].pid, 2);
    }

    #[test]
    fn rates_from_the_second_tick_for_pids_that_stayed() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 1000), (2, 8.0, 1, 0, 0)]);
        l.tick(t(0), mono(10.0), &mut h).unwrap();
        assert!(
            h.last()
                .processes
                .iter()
                .all(|p| p.disk_read_bytes_per_sec.is_none())
        );
        // PID 2 vanished, PID 3 is new, PID 1's write counter went backwards.
        h.set(&[(1, 9.0, 1, 300, 500), (3, 1.0, 1, 50, 50)]);
        l.tick(t(2), mono(12.0), &mut h).unwrap();
        let p = &h.last().processes;
        assert_eq!(p[0].disk_read_bytes_per_sec, Some(100.0));
        assert_eq!(p[0].disk_written_bytes_per_sec, Some(0.0));
        assert_eq!(p[1].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn a_small_table_is_sampled_once_with_disk_counters_and_a_large_one_twice() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(2, 2));
        let mut h = FakeHost::default();
        h.set(&[
            (1, 9.0, 1, 100, 10),
            (2, 8.0, 1, 100, 10),
            (3, 1.0, 1, 0, 0),
        ]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        assert_eq!(
            (h.samples, h.disk_samples, h.disk_lookups),
            (1, 0, 2),
            "the first sample's size is not known yet: the top-N's counters asked apart"
        );
        h.set(&[
            (1, 9.0, 1, 300, 30),
            (2, 8.0, 1, 500, 10),
            (3, 1.0, 1, 0, 0),
        ]);
        l.tick(t(2), mono(2.0), &mut h).unwrap();
        assert_eq!(
            (h.samples, h.disk_samples, h.disk_lookups),
            (2, 1, 2),
            "one call on a small table"
        );
        let p = &h.last().processes;
        assert_eq!(
            p.iter()
                .map(|p| (
                    p.pid,
                    p.disk_read_bytes_per_sec,
                    p.disk_written_bytes_per_sec
                ))
                .collect::<Vec<_>>(),
            vec![(1, Some(100.0), Some(10.0)), (2, Some(200.0), Some(0.0))],
            "rates from the sampled counters of the published processes"
        );

        let big: Vec<Proc> = (1..=ONE_SAMPLE_MAX as u32 + 1)
            .map(|pid| (pid, pid as f32, 1, 0, 0))
            .collect();
        h.set(&big);
        l.tick(t(4), mono(4.0), &mut h).unwrap();
        assert_eq!(
            h.disk_samples, 2,
            "decided from the previous, small, sample"
        );
        l.tick(t(6), mono(6.0), &mut h).unwrap();
        assert_eq!(
            (h.samples, h.disk_samples, h.disk_lookups),
            (4, 2, 4),
            "a large table: everyone for CPU and memory, the top-N for disk counters"
        );
    }

    #[test]
    fn a_process_gone_before_its_disk_counters_is_published_without_rates() {
        // Two calls, so that the process can be gone between them.
        let mut l = ProcessPerfLoop {
            one_sample_max: 0,
            ..Default::default()
        };
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100), (2, 8.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        h.set(&[(1, 9.0, 1, 300, 300), (2, 8.0, 1, 300, 300)]);
        h.exiting = vec![1];
        l.tick(t(2), mono(2.0), &mut h).unwrap();
        let p = &h.last().processes;
        assert_eq!((p[0].pid, p[0].disk_read_bytes_per_sec), (1, None));
        assert_eq!((p[1].pid, p[1].disk_read_bytes_per_sec), (2, Some(100.0)));
        assert_eq!(l.baseline.len(), 1, "no baseline without counters");
    }

    #[test]
    fn a_first_cpu_reading_is_a_baseline_and_the_message_follows_shortly() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 60));
        let mut h = FakeHost {
            unprimed: true,
            ..Default::default()
        };
        h.set(&[(1, 0.0, 1, 0, 0), (2, 0.0, 1, 0, 0)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        assert!(h.published.is_empty(), "all-zero CPU figures are not sent");
        assert_eq!((h.disk_lookups, h.name_lookups), (0, 0));
        assert_eq!(l.interval(), PRIME_LEAD, "the next tick comes soon");
        h.set(&[(1, 3.0, 1, 0, 0), (2, 7.0, 1, 0, 0)]);
        l.tick(t(1), mono(1.0), &mut h).unwrap();
        let got: Vec<(u32, f64)> = h
            .last()
            .processes
            .iter()
            .map(|p| (p.pid, p.cpu_pct))
            .collect();
        assert_eq!(got, vec![(2, 7.0), (1, 3.0)]);
        assert_eq!(l.interval(), Duration::from_secs(60), "then the cadence");

        let mut fast = ProcessPerfLoop::default();
        fast.configure(Config {
            interval: Some(Duration::from_millis(200)),
            ..enabled(5, 0)
        });
        h.unprimed = true;
        fast.tick(t(0), mono(0.0), &mut h).unwrap();
        assert_eq!(fast.interval(), Duration::from_millis(200), "never slower");
    }

    #[test]
    fn cadence_change_and_reactivation_reset_the_baseline() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        l.configure(enabled(5, 5));
        assert_eq!(l.interval(), Duration::from_secs(5));
        l.tick(t(5), mono(5.0), &mut h).unwrap();
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
        l.tick(t(10), mono(10.0), &mut h).unwrap();
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, Some(0.0));

        let mut off = enabled(5, 5);
        off.enabled = false;
        l.configure(off);
        l.tick(t(15), mono(15.0), &mut h).unwrap();
        assert!(
            l.baseline.is_empty(),
            "S11: baseline released while inactive"
        );
        l.configure(enabled(5, 5));
        l.tick(t(20), mono(20.0), &mut h).unwrap();
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn under_a_millisecond_gives_no_rate() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(1.0), &mut h).unwrap();
        l.tick(t(0), mono(1.0005), &mut h).unwrap();
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, None);
    }

    #[test]
    fn publish_failure_is_logged_and_the_loop_goes_on() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost {
            fail_publish: true,
            ..Default::default()
        };
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        assert!(
            h.logs
                .iter()
                .any(|(lvl, m)| *lvl == Level::Warn && m.contains("broker down"))
        );
        h.fail_publish = false;
        l.tick(t(2), mono(2.0), &mut h).unwrap();
        assert_eq!(h.published.len(), 1);
        assert_eq!(h.published[0].0, "process_perf.pc-1");
    }

    #[test]
    fn a_failed_sample_keeps_the_baseline_and_its_time() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        h.fail_sample = true;
        l.tick(t(2), mono(2.0), &mut h).unwrap();
        assert!(h.logs.iter().any(|(_, m)| m.contains("enumeration failed")));
        h.fail_sample = false;
        h.set(&[(1, 9.0, 1, 500, 100)]);
        l.tick(t(4), mono(4.0), &mut h).unwrap();
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
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, f32::INFINITY, 1, 0, 0), (2, 1.0, 1, 0, 0)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        let got: Vec<(u32, f64)> = h
            .last()
            .processes
            .iter()
            .map(|p| (p.pid, p.cpu_pct))
            .collect();
        assert_eq!(got, vec![(2, 1.0), (1, 0.0)]);
    }

    #[test]
    fn a_wall_time_past_what_the_message_can_carry_is_an_error() {
        let mut l = ProcessPerfLoop::default();
        let mut h = FakeHost::default();
        let far = WallTime {
            seconds: i64::MAX,
            nanoseconds: 0,
        };
        let err = l.tick(far, mono(0.0), &mut h).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn state_round_trips_and_foreign_state_is_refused() {
        let mut l = ProcessPerfLoop::default();
        l.configure(enabled(5, 2));
        let mut h = FakeHost::default();
        h.set(&[(1, 9.0, 1, 100, 100)]);
        l.tick(t(0), mono(0.0), &mut h).unwrap();
        let mut next = ProcessPerfLoop::default();
        next.restore_state(&l.save_state()).unwrap();
        next.configure(enabled(5, 2));
        h.set(&[(1, 9.0, 1, 300, 100)]);
        next.tick(t(2), mono(2.0), &mut h).unwrap();
        assert_eq!(h.last().processes[0].disk_read_bytes_per_sec, Some(100.0));

        let v1 = br#"{"format":"process-perf/1","interval_ns":1,"last_tick_ns":null,"needs_reset":true,"baseline":[]}"#;
        assert!(next.restore_state(v1).is_err());
        assert!(next.restore_state(b"garbage").is_err());
        let mut cut = l.save_state();
        cut.pop();
        assert!(next.restore_state(&cut).is_err());
        let mut huge = l.save_state();
        huge[16 + 17..16 + 21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            next.restore_state(&huge).is_err(),
            "no allocation from a count"
        );
    }
}
