//! Guests written as an attacker would (a careless or compromised signer): each test
//! drives one class of host-side abuse and checks the bound that stops it. Host time:
//! sampling in a loop. Host memory: oversize name lists, subjects and random-byte
//! requests, measured with a per-thread allocation counter. Successors: an oversize or
//! poisonous saved state. The log: floods of refusals, huge error strings and forged
//! lines.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use collector_sandbox::guest::{GuestFault, GuestModule, Supervisor, TickError};
use collector_sandbox::host::{HostStats, Limits};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::{Fields, ProcessSource, ProcessTable, StaticSource};

use crate::common::*;

/// Counts the bytes this thread asks the allocator for, so a test can measure what one
/// guest call makes the host allocate. Guest calls run on the caller's thread; other
/// tests, on other threads, do not disturb the count.
struct CountingAllocator;

thread_local! {
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|c| c.set(c.get() + bytes as u64));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Bytes this thread allocated while running `f`.
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

/// The bodies of a hostile guest's exports (WAT instructions). In them, `$sample`,
/// `$names`, `$publish` and `$log` are the host functions, lowered (see [`hostile_wat`]).
struct Bodies<'a> {
    tick: &'a str,
    save: &'a str,
    restore: &'a str,
    /// Initial linear memory, in 64 KiB pages.
    pages: u32,
    /// Data segments (WAT `(data ...)` forms) below address 4096.
    data: &'a str,
}

impl Default for Bodies<'_> {
    fn default() -> Self {
        Self {
            tick: "(i32.const 0)",
            save: "(i32.const 0)",
            restore: "(i32.const 0)",
            pages: 1,
            data: "",
        }
    }
}

/// A component of the `collector` world that imports the host functions. Lowered into
/// core functions, they take (all i32):
/// - `$sample`: fields, result pointer;
/// - `$names`: pids pointer, count, result pointer;
/// - `$publish`: subject pointer, length, payload pointer, length, result pointer;
/// - `$log`: level (0 trace .. 4 error), message pointer, length.
///
/// Address 0 holds zeros: returned as a `result<_, string>`, it means `ok`. The guest's
/// allocator bumps from address 4096 and wraps around when memory is full.
fn hostile_wat(b: &Bodies) -> String {
    let Bodies {
        tick,
        save,
        restore,
        pages,
        data,
    } = b;
    let exports = guest_exports("$guest", "$memory", "$realloc");
    format!(
        r#"(component
  (import "collector:api/processes@0.1.0" (instance $processes
    (type $f (flags "cpu" "memory" "disk"))
    (export "fields" (type $fields (eq $f)))
    (type $s (record (field "pids" (list u32)) (field "cpu-pct" (list f32))
      (field "rss-bytes" (list u64)) (field "disk-read-bytes" (list u64))
      (field "disk-written-bytes" (list u64))))
    (export "process-sample" (type $sample (eq $s)))
    (type $e (variant (case "not-granted") (case "failed" string)))
    (export "sample-error" (type $error (eq $e)))
    (export "sample" (func (param "fields" $fields) (result (result $sample (error $error)))))
    (export "names" (func (param "pids" (list u32)) (result (list string))))))
  (import "collector:api/publish@0.1.0" (instance $publish
    (type $e (variant (case "not-granted") (case "too-large" u32) (case "rate-limited")
      (case "failed" string)))
    (export "publish-error" (type $error (eq $e)))
    (export "publish" (func (param "subject" string) (param "payload" (list u8))
      (result (result (error $error)))))))
  (import "collector:api/log@0.1.0" (instance $log
    (type $l (enum "trace" "debug" "info" "warn" "error"))
    (export "level" (type $level (eq $l)))
    (export "log" (func (param "level" $level) (param "message" string)))))
  (core module $Memory
    (memory (export "memory") {pages})
    (global $heap (mut i32) (i32.const 4096))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
      (if (i32.gt_u (i32.add (local.get $p) (local.get 3))
                    (i32.mul (memory.size) (i32.const 65536)))
        (then (local.set $p (i32.const 4096))))
      (global.set $heap (i32.add (local.get $p) (local.get 3)))
      (local.get $p)))
  (core instance $mem (instantiate $Memory))
  (alias core export $mem "memory" (core memory $memory))
  (alias core export $mem "realloc" (core func $realloc))
  (core func $sample (canon lower (func $processes "sample") (memory $memory) (realloc $realloc)))
  (core func $names (canon lower (func $processes "names") (memory $memory) (realloc $realloc)))
  (core func $publish (canon lower (func $publish "publish") (memory $memory) (realloc $realloc)))
  (core func $log (canon lower (func $log "log") (memory $memory)))
  (core module $Guest
    (import "env" "memory" (memory 1))
    (import "host" "sample" (func $sample (param i32 i32)))
    (import "host" "names" (func $names (param i32 i32 i32)))
    (import "host" "publish" (func $publish (param i32 i32 i32 i32 i32)))
    (import "host" "log" (func $log (param i32 i32 i32)))
    (global $ticks (mut i32) (i32.const 0))
    (global $i (mut i32) (i32.const 0))
    {data}
    (func (export "configure") (param i32 i32) (result i32) (i32.const 0))
    (func (export "interval") (result i64) (i64.const 100000000))
    (func (export "tick") (param i64 i32 i64) (result i32)
      (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
      {tick})
    (func (export "save-state") (result i32) {save})
    (func (export "restore-state") (param i32 i32) (result i32) {restore}))
  (core instance $guest (instantiate $Guest
    (with "env" (instance (export "memory" (memory $memory))))
    (with "host" (instance
      (export "sample" (func $sample))
      (export "names" (func $names))
      (export "publish" (func $publish))
      (export "log" (func $log))))))
{exports}"#
    )
}

fn hostile(name: &str, bodies: &Bodies) -> Arc<GuestModule> {
    wat_module(name, &hostile_wat(bodies))
}

fn supervisor(
    module: Arc<GuestModule>,
    source: impl ProcessSource + 'static,
    limits: Limits,
) -> Supervisor {
    Supervisor::new(
        module,
        services(Box::new(source), MemorySink::default(), limits),
    )
}

/// Runs `f` on its own thread and waits at most `limit` for it; `None` when it is still
/// running then (the thread is left behind: the test fails anyway).
fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A process table that takes `delay` to enumerate, as a busy machine's would.
struct SlowSource {
    delay: Duration,
}

impl ProcessSource for SlowSource {
    fn sample(&mut self, _fields: Fields) -> Result<ProcessTable, String> {
        std::thread::sleep(self.delay);
        Ok(ProcessTable {
            pids: vec![1, 2, 3],
            ..ProcessTable::default()
        })
    }

    fn names(&mut self, pids: &[u32]) -> Vec<String> {
        vec![String::new(); pids.len()]
    }
}

/// `tick`: samples in an endless loop, ignoring every answer.
const SAMPLE_FOREVER: &str = "(loop $l (call $sample (i32.const 7) (i32.const 64)) (br $l)) \
                              (i32.const 0)";

// ---- 1. Host work escapes the time budget ----

#[test]
fn a_guest_sampling_in_a_loop_is_stopped_near_its_budget() {
    let limits = Limits {
        call_budget: Duration::from_millis(200),
        ..Limits::default()
    };
    let max_samples = u64::from(limits.max_samples_per_call);
    let mut sup = supervisor(
        hostile(
            "sampler",
            &Bodies {
                tick: SAMPLE_FOREVER,
                ..Bodies::default()
            },
        ),
        SlowSource {
            delay: Duration::from_millis(5),
        },
        limits,
    );
    let stats = sup.stats();
    // Before the fix every sample was free for the budget: ~40,000 samples of 5 ms.
    let result = within(Duration::from_secs(10), move || {
        sup.tick(now(Instant::now()))
    })
    .expect("the tick ended within 10 s");
    assert!(
        matches!(
            result,
            Err(TickError::Fault(GuestFault::Timeout { call: "tick", .. }))
        ),
        "{result:?}"
    );
    assert_eq!(HostStats::get(&stats.samples), max_samples);
    assert!(HostStats::get(&stats.samples_refused) > 0);
}

#[test]
fn host_time_is_bounded_even_within_the_sample_count() {
    let limits = Limits {
        call_budget: Duration::from_millis(300),
        host_budget: Duration::from_millis(100),
        max_samples_per_call: 1000,
        ..Limits::default()
    };
    let mut sup = supervisor(
        hostile(
            "slow-sampler",
            &Bodies {
                tick: SAMPLE_FOREVER,
                ..Bodies::default()
            },
        ),
        SlowSource {
            delay: Duration::from_millis(30),
        },
        limits,
    );
    let stats = sup.stats();
    let result = within(Duration::from_secs(10), move || {
        sup.tick(now(Instant::now()))
    })
    .expect("the tick ended within 10 s");
    assert!(result.is_err(), "the spinning guest is stopped: {result:?}");
    // 30 ms each against a 100 ms host budget: the fourth sample is the last.
    let samples = HostStats::get(&stats.samples);
    assert!((3..=4).contains(&samples), "{samples} samples");
}

#[test]
fn an_agent_running_a_sampling_loop_still_shuts_down() {
    let limits = Limits {
        call_budget: Duration::from_millis(200),
        ..Limits::default()
    };
    let sup = supervisor(
        hostile(
            "sampler",
            &Bodies {
                tick: SAMPLE_FOREVER,
                ..Bodies::default()
            },
        ),
        SlowSource {
            delay: Duration::from_millis(5),
        },
        limits,
    );
    let agent = ThreadAgent::spawn(sup, 3, enabled("100ms", 5));
    let stats = agent.stats.clone();
    assert!(
        wait_for(Duration::from_secs(10), || HostStats::get(&stats.samples)
            > 0),
        "the first tick started"
    );
    within(Duration::from_secs(10), move || agent.stop())
        .expect("the agent stopped within 10 s of the shutdown");
}

// ---- 2. Host memory amplification ----

/// Pids handed to `names` by [`NAMES_FLOOD`]: 4 MB of them, at address 65536.
const FLOOD_PIDS: usize = 1_000_000;
const NAMES_FLOOD: &str = "(call $names (i32.const 65536) (i32.const 1000000) (i32.const 64)) \
                           (i32.const 0)";

#[test]
fn a_names_call_over_the_limit_traps_before_any_lookup() {
    let mut sup = supervisor(
        hostile(
            "names-flood",
            &Bodies {
                tick: NAMES_FLOOD,
                pages: 80,
                ..Bodies::default()
            },
        ),
        StaticSource::default(),
        Limits::default(),
    );
    sup.configure(&enabled("1s", 1)).unwrap(); // instantiates, outside the count
    let (result, allocated) = allocated_by(|| sup.tick(now(Instant::now())));
    match &result {
        Err(TickError::Fault(GuestFault::Trap {
            call: "tick",
            message,
        })) => {
            assert!(message.contains("the limit is 65536"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    let stats = sup.stats();
    assert_eq!(HostStats::get(&stats.names_looked_up), 0);
    // The lifted list itself (4 bytes a pid) is all it may cost; before the fix a
    // `String` per pid came on top (24 bytes each).
    let lifted = (FLOOD_PIDS * 4) as u64;
    assert!(
        allocated < lifted + (1 << 20),
        "{allocated} bytes allocated for {lifted} bytes of pids"
    );
}

/// `tick`: writes a subject of `len` bytes (`a.a.a...`) at address 65536 and publishes
/// it once, with an empty payload.
fn publish_long_subject(len: u32) -> String {
    format!(
        "(global.set $i (i32.const 0))
         (loop $fill
           (i32.store8 (i32.add (i32.const 65536) (global.get $i))
             (select (i32.const 46) (i32.const 97) (i32.and (global.get $i) (i32.const 1))))
           (global.set $i (i32.add (global.get $i) (i32.const 1)))
           (br_if $fill (i32.lt_u (global.get $i) (i32.const {len}))))
         (call $publish (i32.const 65536) (i32.const {len}) (i32.const 0) (i32.const 0)
           (i32.const 64))
         (i32.const 0)"
    )
}

#[test]
fn a_huge_subject_is_refused_without_being_copied_matched_or_logged() {
    const LEN: u32 = 4 << 20;
    let mut sup = supervisor(
        hostile(
            "long-subject",
            &Bodies {
                tick: &publish_long_subject(LEN),
                pages: 80,
                ..Bodies::default()
            },
        ),
        StaticSource::default(),
        Limits::default(),
    );
    sup.configure(&enabled("1s", 1)).unwrap(); // instantiates, outside the count
    let ((result, allocated), logs) =
        with_captured_logs(|| allocated_by(|| sup.tick(now(Instant::now()))));
    result.expect("a refusal is an error value, not a trap");
    assert_eq!(HostStats::get(&sup.stats().publish_denied), 1);
    // Lifting the subject costs its length once; before the fix, matching it against
    // the grant cost ~13 times that (a `String` per token), and logging it as much again.
    assert!(
        allocated < u64::from(LEN) + (1 << 20),
        "{allocated} bytes allocated for a {LEN}-byte subject"
    );
    assert!(logs.contains("publish refused"), "{logs}");
    assert!(logs.len() < 4096, "{} bytes of log", logs.len());
}

/// A guest whose `tick` asks WASI for `len` random bytes (through `get-random-bytes`,
/// the host allocates them before copying them into the guest).
fn random_bytes_guest(len: u64) -> String {
    wat_guest("(call $random (i64.const LEN) (i32.const 64)) (i32.const 0)")
        .replace("LEN", &len.to_string())
        .replacen(
            "(component",
            r#"(component
  (import "wasi:random/random@0.2.0" (instance $random
    (export "get-random-bytes" (func (param "len" u64) (result (list u8))))))
  (core module $Memory
    (memory (export "mem") 256)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024)))
  (core instance $mem (instantiate $Memory))
  (alias core export $mem "mem" (core memory $memory))
  (alias core export $mem "realloc" (core func $realloc))
  (core func $random (canon lower (func $random "get-random-bytes") (memory $memory)
    (realloc $realloc)))"#,
            1,
        )
        .replace(
            "(core module $m
    (memory (export \"mem\") 1)",
            "(core module $m
    (import \"env\" \"mem\" (memory 1))
    \
             (import \"wasi\" \"random\" (func $random (param i64 i32)))
    \
             (export \"mem\" (memory 0))",
        )
        .replace(
            "(core instance $i (instantiate $m))",
            "(core instance $i (instantiate $m (with \"env\" (instance $mem))
    \
             (with \"wasi\" (instance (export \"random\" (func $random))))))",
        )
}

#[test]
fn random_bytes_are_capped_before_the_host_allocates_them() {
    // 8 MiB: it would fit in this guest's 16 MiB, and WASI's own cap is 64 MiB.
    const LEN: u64 = 8 << 20;
    let mut sup = supervisor(
        wat_module("random-hog", &random_bytes_guest(LEN)),
        StaticSource::default(),
        Limits::default(),
    );
    sup.configure(&enabled("1s", 1)).unwrap(); // instantiates, outside the count
    let (result, allocated) = allocated_by(|| sup.tick(now(Instant::now())));
    match &result {
        Err(TickError::Fault(GuestFault::Trap { message, .. })) => {
            assert!(message.contains("exceeds limit"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");
}

// ---- 3. A predecessor can poison its successors ----

/// `save-state`: `some` of `len` zero bytes at address 65536.
fn save_state_of(len: u32) -> String {
    format!(
        "(i32.store8 (i32.const 128) (i32.const 1))
         (i32.store (i32.const 132) (i32.const 65536))
         (i32.store (i32.const 136) (i32.const {len}))
         (i32.const 128)"
    )
}

/// Runs `predecessor`, swaps `successor` in, and returns what its hooks reported.
fn swap_after(predecessor: Arc<GuestModule>, successor: Arc<GuestModule>) -> (Vec<String>, u64) {
    let sup = supervisor(predecessor, StaticSource::default(), Limits::default());
    let agent = ThreadAgent::spawn(sup, 2, enabled("100ms", 5));
    let stats = agent.stats.clone();
    assert!(wait_for(Duration::from_secs(10), || HostStats::get(
        &stats.ticks
    ) >= 1));
    let outcome = Outcome::default();
    agent.handle.swap(spec(successor, "successor v2", &outcome));
    assert!(
        wait_for(Duration::from_secs(10), || !outcome.events().is_empty()),
        "the successor was neither healthy nor rolled back"
    );
    agent.stop();
    (outcome.events(), HostStats::get(&stats.states_dropped))
}

#[test]
fn an_oversize_state_is_dropped_and_the_successor_starts_fresh() {
    // 2 MiB of state: more than any successor with a small memory can take (this one
    // has 64 KiB, and traps on it). Before the fix it was rolled back for it.
    let predecessor = hostile(
        "hoarder",
        &Bodies {
            save: &save_state_of(2 << 20),
            pages: 48,
            ..Bodies::default()
        },
    );
    let successor = wat_module("successor", &wat_guest("(i32.const 0)"));
    let (events, dropped) = swap_after(predecessor, successor);
    assert_eq!(events, ["healthy"]);
    assert_eq!(dropped, 1);
}

#[test]
fn a_successor_that_traps_on_its_predecessors_state_starts_fresh() {
    let predecessor = hostile(
        "poisoner",
        &Bodies {
            save: &save_state_of(100),
            pages: 2,
            ..Bodies::default()
        },
    );
    let successor = hostile(
        "fragile",
        &Bodies {
            restore: "unreachable",
            ..Bodies::default()
        },
    );
    let (events, dropped) = swap_after(predecessor, successor);
    assert_eq!(events, ["healthy"]);
    assert_eq!(dropped, 0, "the state was within the limit");
}

// ---- 4. Log flooding and forging ----

#[test]
fn refusals_in_a_loop_cost_one_log_line_each_within_the_budget_then_one_summary() {
    // 10,000 publishes to a subject outside the grant, in one tick.
    let tick = "(global.set $i (i32.const 0))
        (loop $l
          (call $publish (i32.const 16) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 64))
          (global.set $i (i32.add (global.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (global.get $i) (i32.const 10000))))
        (i32.const 0)";
    let limits = Limits::default();
    let budget = limits.max_log_lines_per_call as usize;
    let mut sup = supervisor(
        hostile(
            "refused",
            &Bodies {
                tick,
                data: r#"(data (i32.const 16) "nope.x")"#,
                ..Bodies::default()
            },
        ),
        StaticSource::default(),
        limits,
    );
    let (result, logs) = with_captured_logs(|| sup.tick(now(Instant::now())));
    result.unwrap();
    let stats = sup.stats();
    assert_eq!(HostStats::get(&stats.publish_denied), 10_000);
    assert_eq!(HostStats::get(&stats.log_dropped), (10_000 - budget) as u64);
    let refusals = logs
        .lines()
        .filter(|l| l.contains("publish refused"))
        .count();
    assert_eq!(refusals, budget, "one line each within the log budget");
    let summaries: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("log lines over the per-call limit were dropped"))
        .collect();
    assert_eq!(summaries.len(), 1, "one summary for the call");
    assert!(
        summaries[0].contains(&format!("host_warnings={}", 10_000 - budget)),
        "{}",
        summaries[0]
    );
    assert!(
        logs.lines().count() <= budget + 2,
        "nothing else per refusal"
    );
}

/// A line that, printed raw after a newline, would pass for the agent's own.
const FORGED: &str = "INFO collector_deploy: saved as the last-known-good module module=evil v9";

#[test]
fn guest_text_in_the_log_is_escaped_and_capped() {
    let message = format!("innocent\n{FORGED}");
    // `tick` logs the forged line, then returns an error of 1 MB that starts with it.
    let tick = format!(
        "(call $log (i32.const 2) (i32.const 16) (i32.const {len}))
         (i32.store8 (i32.const 1024) (i32.const 1))
         (i32.store (i32.const 1028) (i32.const 16))
         (i32.store (i32.const 1032) (i32.const {err_len}))
         (i32.const 1024)",
        len = message.len(),
        err_len = 1 << 20,
    );
    let data = format!("(data (i32.const 16) \"{}\")", message.replace('\n', "\\n"));
    let mut sup = supervisor(
        hostile(
            "forger",
            &Bodies {
                tick: &tick,
                data: &data,
                pages: 20,
                ..Bodies::default()
            },
        ),
        StaticSource::default(),
        Limits::default(),
    );
    let (result, logs) = with_captured_logs(|| sup.tick(now(Instant::now())));
    match result {
        Err(TickError::Guest(error)) => {
            assert!(error.starts_with("innocent\\nINFO"), "{error}");
            assert!(
                error.ends_with(&format!("… ({} bytes)", 1 << 20)),
                "{error}"
            );
        }
        other => panic!("expected the guest's error, got {other:?}"),
    }
    // Every line of the log is one the agent wrote: each starts with its timestamp.
    for line in logs.lines() {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()),
            "a forged line: {line}"
        );
    }
    assert!(logs.contains("innocent\\nINFO"), "{logs}");
    assert!(logs.len() < 8192, "{} bytes of log", logs.len());
}
