//! Where process samples come from: the [`ProcessSource`] trait, and its production
//! implementation over sysinfo. Tests, the mock host and benchmarks script their own.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The measurements a sample should contain (mirrors the WIT `fields` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields {
    /// CPU usage ([`ProcessTable::cpu_pct`]).
    pub cpu: bool,
    /// Resident memory ([`ProcessTable::rss_bytes`]).
    pub memory: bool,
    /// Disk I/O counters ([`ProcessTable::disk_read_bytes`] and
    /// [`ProcessTable::disk_written_bytes`]).
    pub disk: bool,
}

impl Fields {
    /// Every measurement.
    pub const ALL: Fields = Fields {
        cpu: true,
        memory: true,
        disk: true,
    };

    /// CPU alone: what priming the CPU baseline takes.
    pub const CPU_ONLY: Fields = Fields {
        cpu: true,
        memory: false,
        disk: false,
    };
}

/// One enumeration in columns; entry `i` of every non-empty column is the same process.
/// Columns that were not requested are empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessTable {
    /// Process ids; always filled, one per row.
    pub pids: Vec<u32>,
    /// CPU usage since the previous CPU reading, in percent of one core (two busy cores
    /// read about 200); 0 on a first reading, and may be NaN on some platforms.
    pub cpu_pct: Vec<f32>,
    /// Resident set size, in bytes.
    pub rss_bytes: Vec<u64>,
    /// Bytes read from disk since the process started (cumulative).
    pub disk_read_bytes: Vec<u64>,
    /// Bytes written to disk since the process started (cumulative).
    pub disk_written_bytes: Vec<u64>,
}

impl ProcessTable {
    /// Number of processes.
    pub fn len(&self) -> usize {
        self.pids.len()
    }

    /// Whether the table holds no process.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// The rows of `pids` that are in the table, in the order of `pids` (a PID asked
    /// twice gives two rows). Columns that are empty stay empty.
    pub fn select(&self, pids: &[u32]) -> ProcessTable {
        // Tables are usually in PID order (scripted ones, /proc's): then a binary search
        // per PID asked is all it takes; otherwise an index of the whole table.
        let rows: Vec<usize> = if self.pids.is_sorted() {
            pids.iter()
                .filter_map(|p| self.pids.binary_search(p).ok())
                .collect()
        } else {
            let index: HashMap<u32, usize> = self
                .pids
                .iter()
                .enumerate()
                .map(|(i, &pid)| (pid, i))
                .collect();
            pids.iter().filter_map(|p| index.get(p).copied()).collect()
        };
        let pick_f32 = |col: &[f32]| -> Vec<f32> {
            if col.is_empty() {
                Vec::new()
            } else {
                rows.iter().map(|&i| col[i]).collect()
            }
        };
        let pick_u64 = |col: &[u64]| -> Vec<u64> {
            if col.is_empty() {
                Vec::new()
            } else {
                rows.iter().map(|&i| col[i]).collect()
            }
        };
        ProcessTable {
            pids: rows.iter().map(|&i| self.pids[i]).collect(),
            cpu_pct: pick_f32(&self.cpu_pct),
            rss_bytes: pick_u64(&self.rss_bytes),
            disk_read_bytes: pick_u64(&self.disk_read_bytes),
            disk_written_bytes: pick_u64(&self.disk_written_bytes),
        }
    }

    /// Empties the columns that `fields` did not ask for.
    pub fn retain_fields(&mut self, fields: Fields) {
        if !fields.cpu {
            self.cpu_pct = Vec::new();
        }
        if !fields.memory {
            self.rss_bytes = Vec::new();
        }
        if !fields.disk {
            self.disk_read_bytes = Vec::new();
            self.disk_written_bytes = Vec::new();
        }
    }
}

/// A source of process samples for the host functions `sample` and `names`.
pub trait ProcessSource: Send {
    /// Enumerates every process now.
    ///
    /// # Errors
    ///
    /// A message for the guest when enumeration fails.
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String>;

    /// Names of `pids` as of the last sample, in order; empty strings for unknown PIDs.
    fn names(&mut self, pids: &[u32]) -> Vec<String>;

    /// Refreshes `pids` only, and returns the rows of those that still exist, in the
    /// order asked. The default takes a whole sample and keeps the rows asked for, which
    /// is right for scripted sources; real ones refresh only these processes.
    ///
    /// # Errors
    ///
    /// A message for the guest when enumeration fails.
    fn sample_pids(&mut self, pids: &[u32], fields: Fields) -> Result<ProcessTable, String> {
        let table = self.sample(fields)?;
        Ok(table.select(pids))
    }

    /// Whether the CPU figures of the last [`ProcessSource::sample`] were measured over a
    /// span since an earlier reading (`false` on a first reading, when they are all 0).
    /// Scripted sources give their figures as measured: the default is `true`.
    fn cpu_primed(&self) -> bool {
        true
    }
}

/// Real processes, read with sysinfo. One `System` lives across samples: CPU usage is a
/// difference between two refreshes, and reuse avoids re-reading static data.
pub struct SysinfoSource {
    system: System,
    /// Samples with CPU so far, up to 2: CPU usage is measured from the second on.
    cpu_readings: u8,
    /// Whether the last sample's CPU figures were measured over a span.
    cpu_primed: bool,
}

impl SysinfoSource {
    /// # Errors
    ///
    /// When sysinfo cannot be initialised on this platform.
    pub fn new() -> anyhow::Result<Self> {
        let system =
            System::new().map_err(|e| anyhow::anyhow!("cannot read process information: {e}"))?;
        Ok(Self {
            system,
            cpu_readings: 0,
            cpu_primed: true,
        })
    }

    fn refresh_kind(fields: Fields) -> ProcessRefreshKind {
        // `without_tasks`: per-thread task directories are not needed and cost ~13%.
        let mut kind = ProcessRefreshKind::nothing().without_tasks();
        if fields.cpu {
            kind = kind.with_cpu();
        }
        if fields.memory {
            kind = kind.with_memory();
        }
        if fields.disk {
            kind = kind.with_disk_usage();
        }
        kind
    }
}

impl SysinfoSource {
    /// Empty columns with room for `n` rows of the fields asked for.
    fn table(n: usize, fields: Fields) -> ProcessTable {
        let cap = |wanted: bool| if wanted { n } else { 0 };
        ProcessTable {
            pids: Vec::with_capacity(n),
            cpu_pct: Vec::with_capacity(cap(fields.cpu)),
            rss_bytes: Vec::with_capacity(cap(fields.memory)),
            disk_read_bytes: Vec::with_capacity(cap(fields.disk)),
            disk_written_bytes: Vec::with_capacity(cap(fields.disk)),
        }
    }

    fn push_row(table: &mut ProcessTable, fields: Fields, pid: u32, p: &sysinfo::Process) {
        table.pids.push(pid);
        if fields.cpu {
            table.cpu_pct.push(p.cpu_usage());
        }
        if fields.memory {
            table.rss_bytes.push(p.memory());
        }
        if fields.disk {
            let d = p.disk_usage();
            table.disk_read_bytes.push(d.total_read_bytes);
            table.disk_written_bytes.push(d.total_written_bytes);
        }
    }
}

impl ProcessSource for SysinfoSource {
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            Self::refresh_kind(fields),
        );
        if fields.cpu {
            self.cpu_readings = self.cpu_readings.saturating_add(1).min(2);
        }
        self.cpu_primed = !fields.cpu || self.cpu_readings >= 2;
        let procs = self.system.processes();
        let mut table = Self::table(procs.len(), fields);
        for (pid, p) in procs {
            Self::push_row(&mut table, fields, pid.as_u32(), p);
        }
        Ok(table)
    }

    fn sample_pids(&mut self, pids: &[u32], fields: Fields) -> Result<ProcessTable, String> {
        let wanted: Vec<Pid> = pids.iter().map(|&p| Pid::from_u32(p)).collect();
        // `true` removes the asked-for processes that have exited, and only those.
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&wanted),
            true,
            Self::refresh_kind(fields),
        );
        let mut table = Self::table(pids.len(), fields);
        for &pid in pids {
            if let Some(p) = self.system.process(Pid::from_u32(pid)) {
                Self::push_row(&mut table, fields, pid, p);
            }
        }
        Ok(table)
    }

    fn cpu_primed(&self) -> bool {
        self.cpu_primed
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        pids.iter()
            .map(|&pid| {
                self.system
                    .process(Pid::from_u32(pid))
                    .map(|p| p.name().to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// Runs another source's enumerations on a worker thread and gives up waiting after a
/// timeout, so that a stuck enumeration (a hung `/proc` read, a huge process table) costs
/// the guest an error instead of stalling the agent. A timed-out enumeration keeps running
/// on the worker; until it finishes, further samples are refused rather than queued. Name
/// look-ups are quick reads of the last sample and happen on the caller's thread.
pub struct TimeBoxed {
    inner: Arc<Mutex<Box<dyn ProcessSource>>>,
    requests: mpsc::Sender<Request>,
    replies: mpsc::Receiver<Reply>,
    timeout: Duration,
    /// A sample timed out and its reply has not been drained yet.
    pending: bool,
    /// [`ProcessSource::cpu_primed`] of the last sample that came back.
    cpu_primed: bool,
}

/// Work for the worker thread of [`TimeBoxed`].
enum Request {
    All(Fields),
    Pids(Vec<u32>, Fields),
}

/// A table, and whether its CPU figures were measured over a span.
type Reply = (Result<ProcessTable, String>, bool);

impl TimeBoxed {
    /// Moves `inner`'s enumerations to a worker thread.
    pub fn new(inner: Box<dyn ProcessSource>, timeout: Duration) -> Self {
        let inner = Arc::new(Mutex::new(inner));
        let (requests, work) = mpsc::channel::<Request>();
        let (done, replies) = mpsc::channel();
        let worker_source = inner.clone();
        std::thread::Builder::new()
            .name("process-source".into())
            .spawn(move || {
                for request in work {
                    let reply = worker_source.lock().map_or_else(
                        |_| (Err("the process source failed earlier".to_string()), true),
                        |mut s| {
                            let table = match request {
                                Request::All(fields) => s.sample(fields),
                                Request::Pids(pids, fields) => s.sample_pids(&pids, fields),
                            };
                            (table, s.cpu_primed())
                        },
                    );
                    if done.send(reply).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the process source thread");
        Self {
            inner,
            requests,
            replies,
            timeout,
            pending: false,
            cpu_primed: true,
        }
    }

    /// Runs `request` on the worker and waits for it, at most the timeout.
    fn ask(&mut self, request: Request) -> Result<ProcessTable, String> {
        if self.pending {
            if self.replies.try_recv().is_err() {
                return Err(format!(
                    "a process enumeration that exceeded {:?} is still running",
                    self.timeout
                ));
            }
            self.pending = false;
        }
        self.requests
            .send(request)
            .map_err(|_| "the process source thread has stopped".to_string())?;
        match self.replies.recv_timeout(self.timeout) {
            Ok((table, primed)) => {
                self.cpu_primed = primed;
                table
            }
            Err(_) => {
                self.pending = true;
                Err(format!(
                    "process enumeration took longer than {:?}",
                    self.timeout
                ))
            }
        }
    }
}

impl ProcessSource for TimeBoxed {
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
        self.ask(Request::All(fields))
    }

    fn sample_pids(&mut self, pids: &[u32], fields: Fields) -> Result<ProcessTable, String> {
        self.ask(Request::Pids(pids.to_vec(), fields))
    }

    fn cpu_primed(&self) -> bool {
        self.cpu_primed
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        match self.inner.try_lock() {
            Ok(mut source) => source.names(pids),
            // Best effort: while an enumeration runs, names are unknown (empty).
            Err(_) => vec![String::new(); pids.len()],
        }
    }
}

/// A scripted process table: what tests, the mock host and benchmarks feed a guest.
#[derive(Debug, Clone, Default)]
pub struct StaticSource {
    /// What every sample returns, less the columns not asked for.
    pub table: ProcessTable,
    /// Process names by PID; a PID missing here has the empty name.
    pub names: HashMap<u32, String>,
}

impl ProcessSource for StaticSource {
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
        let mut table = self.table.clone();
        table.retain_fields(fields);
        Ok(table)
    }

    fn sample_pids(&mut self, pids: &[u32], fields: Fields) -> Result<ProcessTable, String> {
        // The rows asked for, without copying the whole table first: benchmarks compare
        // guests that ask for a few rows with loops that take everything.
        let mut table = self.table.select(pids);
        table.retain_fields(fields);
        Ok(table)
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        pids.iter()
            .map(|p| self.names.get(p).cloned().unwrap_or_default())
            .collect()
    }
}

/// One process source shared by every module of an agent: when modules sample within
/// `window` of each other (their ticks fall in the same instant), the enumeration is done
/// once and its table handed to each. Every sample asks for the union of the fields
/// modules have asked for, so that one enumeration serves them all.
#[derive(Clone)]
pub struct SharedSource {
    inner: Arc<Mutex<SharedInner>>,
    /// Whether the CPU figures of the last table this handle served were measured over
    /// a span (one handle per module, so each module hears about its own last sample).
    cpu_primed: bool,
}

struct SharedInner {
    source: Box<dyn ProcessSource>,
    window: Duration,
    /// Union of the fields asked for so far.
    wanted: Fields,
    /// The last enumeration: when, its table, and whether its CPU figures were primed.
    last: Option<(std::time::Instant, ProcessTable, bool)>,
    enumerations: u64,
    served: u64,
}

impl SharedSource {
    /// Shares `source`; samples closer than `window` to the previous one reuse it.
    pub fn new(source: Box<dyn ProcessSource>, window: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(SharedInner {
                source,
                window,
                wanted: Fields::default(),
                last: None,
                enumerations: 0,
                served: 0,
            })),
            cpu_primed: true,
        }
    }

    /// Enumerations actually run, and samples served (run or reused).
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.inner.lock().expect("shared source lock");
        (inner.enumerations, inner.served)
    }
}

impl ProcessSource for SharedSource {
    fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| "the process source failed earlier".to_string())?;
        inner.served += 1;
        let covered = |have: Fields| {
            (have.cpu || !fields.cpu)
                && (have.memory || !fields.memory)
                && (have.disk || !fields.disk)
        };
        let wanted = inner.wanted;
        if let Some((at, table, primed)) = &inner.last
            && at.elapsed() < inner.window
            && covered(wanted)
        {
            let mut table = table.clone();
            table.retain_fields(fields);
            self.cpu_primed = *primed;
            return Ok(table);
        }
        let wanted = Fields {
            cpu: wanted.cpu || fields.cpu,
            memory: wanted.memory || fields.memory,
            disk: wanted.disk || fields.disk,
        };
        inner.wanted = wanted;
        inner.enumerations += 1;
        let table = inner.source.sample(wanted)?;
        let primed = inner.source.cpu_primed();
        inner.last = Some((std::time::Instant::now(), table.clone(), primed));
        drop(inner);
        self.cpu_primed = primed;
        let mut table = table;
        table.retain_fields(fields);
        Ok(table)
    }

    fn sample_pids(&mut self, pids: &[u32], fields: Fields) -> Result<ProcessTable, String> {
        // A few processes, asked by one module: nothing worth sharing.
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| "the process source failed earlier".to_string())?;
        inner.source.sample_pids(pids, fields)
    }

    fn cpu_primed(&self) -> bool {
        self.cpu_primed
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        match self.inner.lock() {
            Ok(mut inner) => inner.source.names(pids),
            Err(_) => vec![String::new(); pids.len()],
        }
    }
}

/// This machine's host name, as the operating system reports it: the agent's default PC
/// id, so that it matches the one kanade's agent uses.
///
/// # Errors
///
/// When the operating system does not tell.
pub fn host_name() -> Result<String, sysinfo::Error> {
    sysinfo::System::host_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysinfo_sees_this_process_with_memory_and_a_name() {
        let mut source = SysinfoSource::new().unwrap();
        let table = source.sample(Fields::ALL).unwrap();
        let me = std::process::id();
        let i = table.pids.iter().position(|&p| p == me).expect("own pid");
        assert!(table.rss_bytes[i] > 0);
        assert_eq!(table.cpu_pct.len(), table.len());
        assert_eq!(table.disk_written_bytes.len(), table.len());
        let names = source.names(&[me, u32::MAX]);
        assert!(!names[0].is_empty());
        assert_eq!(names[1], "");
    }

    #[test]
    fn sysinfo_reads_chosen_pids_and_says_when_cpu_is_primed() {
        let mut source = SysinfoSource::new().unwrap();
        source.sample(Fields::CPU_ONLY).unwrap();
        assert!(!source.cpu_primed(), "a first CPU reading is not primed");
        let memory = Fields {
            memory: true,
            ..Fields::default()
        };
        source.sample(memory).unwrap();
        assert!(source.cpu_primed(), "no CPU asked, nothing to prime");
        source.sample(Fields::CPU_ONLY).unwrap();
        assert!(source.cpu_primed());

        let me = std::process::id();
        let disk = Fields {
            disk: true,
            ..Fields::default()
        };
        let rows = source.sample_pids(&[u32::MAX, me, me], disk).unwrap();
        assert_eq!(rows.pids, [me, me], "a PID that does not exist is left out");
        assert_eq!(rows.disk_read_bytes.len(), 2);
        assert!(rows.cpu_pct.is_empty() && rows.rss_bytes.is_empty());
    }

    #[test]
    fn select_keeps_the_order_asked_in_sorted_and_unsorted_tables() {
        for pids in [vec![1, 2, 3, 4], vec![4, 2, 1, 3]] {
            let table = ProcessTable {
                disk_read_bytes: pids.iter().map(|&p| u64::from(p) * 10).collect(),
                pids,
                ..ProcessTable::default()
            };
            let rows = table.select(&[3, 9, 1]);
            assert_eq!(rows.pids, [3, 1]);
            assert_eq!(rows.disk_read_bytes, [30, 10]);
            assert!(rows.cpu_pct.is_empty(), "an empty column stays empty");
        }
    }

    /// Sleeps through every sample, as a stuck enumeration would.
    struct Stuck(std::time::Duration);

    impl ProcessSource for Stuck {
        fn sample(&mut self, _fields: Fields) -> Result<ProcessTable, String> {
            std::thread::sleep(self.0);
            Ok(ProcessTable::default())
        }
        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            pids.iter().map(|p| p.to_string()).collect()
        }
    }

    #[test]
    fn a_stuck_enumeration_becomes_an_error_and_the_source_recovers() {
        use std::time::Instant;
        let mut source = TimeBoxed::new(
            Box::new(Stuck(Duration::from_millis(300))),
            Duration::from_millis(50),
        );
        let start = Instant::now();
        let err = source.sample(Fields::ALL).unwrap_err();
        assert!(err.contains("took longer than"), "{err}");
        assert!(
            start.elapsed() < Duration::from_millis(250),
            "the caller did not wait it out"
        );
        let err = source.sample(Fields::ALL).unwrap_err();
        assert!(err.contains("still running"), "{err}");
        assert_eq!(
            source.names(&[7]),
            vec![String::new()],
            "best effort while busy"
        );
        std::thread::sleep(Duration::from_millis(400));
        // The late reply is drained; the next request goes through (and times out again).
        assert!(
            source
                .sample(Fields::ALL)
                .unwrap_err()
                .contains("took longer than")
        );

        let mut quick = TimeBoxed::new(Box::new(StaticSource::default()), Duration::from_secs(5));
        assert!(quick.sample(Fields::ALL).unwrap().is_empty());
        assert_eq!(quick.names(&[1]), vec![String::new()]);
    }

    #[test]
    fn unrequested_columns_are_empty() {
        let mut source = SysinfoSource::new().unwrap();
        let table = source
            .sample(Fields {
                memory: true,
                ..Fields::default()
            })
            .unwrap();
        assert!(!table.is_empty());
        assert!(table.cpu_pct.is_empty() && table.disk_read_bytes.is_empty());
        assert_eq!(table.rss_bytes.len(), table.len());
    }

    /// Counts enumerations; every table holds one process.
    struct Counting(Arc<Mutex<u32>>);

    impl ProcessSource for Counting {
        fn sample(&mut self, fields: Fields) -> Result<ProcessTable, String> {
            *self.0.lock().unwrap() += 1;
            let mut t = ProcessTable {
                pids: vec![1],
                cpu_pct: vec![1.0],
                rss_bytes: vec![2],
                disk_read_bytes: vec![3],
                disk_written_bytes: vec![4],
            };
            t.retain_fields(fields);
            Ok(t)
        }
        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            pids.iter().map(|p| p.to_string()).collect()
        }
    }

    #[test]
    fn modules_sampling_in_the_same_instant_share_one_enumeration() {
        let count = Arc::new(Mutex::new(0));
        let shared = SharedSource::new(Box::new(Counting(count.clone())), Duration::from_secs(60));
        let (mut a, mut b) = (shared.clone(), shared.clone());
        let memory = Fields {
            memory: true,
            ..Fields::default()
        };
        let t = a.sample(Fields::ALL).unwrap();
        assert_eq!(t.disk_read_bytes, [3]);
        let t = b.sample(memory).unwrap();
        assert_eq!(
            (t.rss_bytes.len(), t.cpu_pct.len()),
            (1, 0),
            "only what was asked"
        );
        assert_eq!(*count.lock().unwrap(), 1);
        assert_eq!(shared.counts(), (1, 2));
        let apart = SharedSource::new(Box::new(Counting(count.clone())), Duration::ZERO);
        let (mut c, mut d) = (apart.clone(), apart.clone());
        c.sample(memory).unwrap();
        d.sample(memory).unwrap();
        assert_eq!(
            apart.counts(),
            (2, 2),
            "samples further apart than the window enumerate"
        );
    }
}
