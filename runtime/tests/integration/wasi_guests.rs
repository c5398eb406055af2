//! The WASI that runtimes of other languages import (clocks, filesystem), offered without
//! giving up an invariant: clocks read the tick's time under the mock host, a timer never
//! makes a guest wait past its budget, and what cannot be made safe (sockets, HTTP) is
//! refused before the guest runs, with the import named.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use collector_sandbox::guest::{GuestFault, GuestModule, Supervisor, TickError};
use collector_sandbox::host::{Limits, Services};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::StaticSource;
use collector_testkit::{MockHost, MockOptions};

use crate::common::{enabled, guest_exports, now, sandbox, wat_module};

/// A guest that imports the WASI clocks and `wasi:io/poll` and runs `tick_body` as its
/// `tick` (parameters `$s`, `$ns`, `$mono`: the tick's wall seconds, nanoseconds and
/// monotonic time; a local `$p` for a pollable). `$fail` returns an error whose message is
/// the `len` bytes at `msg`: "wall" at 256 (4 bytes), "monotonic" at 320 (9 bytes).
fn clock_guest(tick_body: &str) -> String {
    let exports = guest_exports("$i", "$memory", r#"(core func $i "realloc")"#);
    format!(
        r#"(component $root
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow 0))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $mono
    (alias outer $root $pollable (type $p))
    (export "pollable" (type $p2 (eq $p)))
    (export "now" (func (result u64)))
    (export "subscribe-duration" (func (param "when" u64) (result (own $p2))))))
  (type $wall-datetime (record (field "seconds" u64) (field "nanoseconds" u32)))
  (import "wasi:clocks/wall-clock@0.2.0" (instance $wall
    (alias outer $root $wall-datetime (type $dt))
    (export "datetime" (type $dt2 (eq $dt)))
    (export "now" (func (result $dt2)))))
  (core module $Memory (memory (export "mem") 1))
  (core instance $mem (instantiate $Memory))
  (alias core export $mem "mem" (core memory $memory))
  (core func $mono_now (canon lower (func $mono "now")))
  (core func $subscribe (canon lower (func $mono "subscribe-duration")))
  (core func $wall_now (canon lower (func $wall "now") (memory $memory)))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $drop (canon resource.drop $pollable))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "wasi" "mono-now" (func $mono_now (result i64)))
    (import "wasi" "subscribe" (func $subscribe (param i64) (result i32)))
    (import "wasi" "wall-now" (func $wall_now (param i32)))
    (import "wasi" "block" (func $block (param i32)))
    (import "wasi" "drop" (func $drop (param i32)))
    (data (i32.const 256) "wall")
    (data (i32.const 320) "monotonic")
    (func $fail (param $msg i32) (param $len i32) (result i32)
      (i32.store (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (local.get $msg))
      (i32.store (i32.const 24) (local.get $len))
      (i32.const 16))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "configure") (param i32 i32) (result i32) (i32.const 0))
    (func (export "interval") (result i64) (i64.const 1000000000))
    (func (export "tick") (param $s i64) (param $ns i32) (param $mono i64) (result i32)
      (local $p i32)
      {tick_body})
    (func (export "save-state") (result i32) (i32.const 0))
    (func (export "restore-state") (param i32 i32) (result i32) (i32.const 0)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "wasi" (instance
      (export "mono-now" (func $mono_now))
      (export "subscribe" (func $subscribe))
      (export "wall-now" (func $wall_now))
      (export "block" (func $block))
      (export "drop" (func $drop))))))
{exports}"#
    )
}

/// Fails the tick unless both clocks read exactly the tick's time.
const CHECK_CLOCKS: &str = "
      (call $wall_now (i32.const 64))
      (if (i64.ne (i64.load (i32.const 64)) (local.get $s))
        (then (return (call $fail (i32.const 256) (i32.const 4)))))
      (if (i32.ne (i32.load (i32.const 72)) (local.get $ns))
        (then (return (call $fail (i32.const 256) (i32.const 4)))))
      (if (i64.ne (call $mono_now) (local.get $mono))
        (then (return (call $fail (i32.const 320) (i32.const 9)))))
      (i32.const 0)";

/// Sleeps for an hour: subscribes to a one-hour timer and blocks on it.
const SLEEP_AN_HOUR: &str = "
      (local.set $p (call $subscribe (i64.const 3600000000000)))
      (call $block (local.get $p))
      (call $drop (local.get $p))
      (i32.const 0)";

/// Waits, a millisecond at a time, for the monotonic clock to pass the tick's by a second.
const WAIT_FOR_THE_CLOCK: &str = "
      (block $done
        (loop $wait
          (local.set $p (call $subscribe (i64.const 1000000)))
          (call $block (local.get $p))
          (call $drop (local.get $p))
          (br_if $done (i64.ge_u (call $mono_now)
            (i64.add (local.get $mono) (i64.const 1000000000))))
          (br $wait)))
      (i32.const 0)";

fn supervisor(module: Arc<GuestModule>, budget: Duration) -> Supervisor {
    let mut services = Services::new(
        Box::new(StaticSource::default()),
        Arc::new(MemorySink::default()),
        "pc-1",
    );
    services.limits = Limits {
        call_budget: budget,
        ..Limits::default()
    };
    Supervisor::new(module, services)
}

#[test]
fn clocks_read_the_tick_time_under_the_mock_host() {
    let module = wat_module("clocks", &clock_guest(CHECK_CLOCKS));
    let start = Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 0).unwrap();
    let mut mock = MockHost::with_module(
        module,
        MockOptions {
            start,
            ..MockOptions::default()
        },
    )
    .unwrap();
    mock.tick().expect("the clocks read the first tick's time");
    mock.advance(Duration::from_millis(1_500));
    mock.tick().expect("and the next tick's, 1.5 s later");
    mock.set_wall(Utc.with_ymd_and_hms(2031, 1, 1, 0, 0, 0).unwrap());
    mock.tick().expect("and a wall clock that jumped");
    let (ticks, errors) = mock.run_for(Duration::from_secs(10));
    assert!(ticks >= 5, "{ticks} ticks in 10 s at a 1 s interval");
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn a_timer_far_in_the_future_does_not_make_the_guest_wait() {
    let module = wat_module("sleeper", &clock_guest(SLEEP_AN_HOUR));
    let mut sup = supervisor(module, Duration::from_secs(5));
    sup.configure(&enabled("1s", 1)).unwrap();
    let start = Instant::now();
    sup.tick(now(Instant::now()))
        .expect("a one-hour sleep returns at once");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the sleep took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_guest_waiting_for_the_clock_to_move_is_stopped_at_its_budget() {
    let module = wat_module("waiter", &clock_guest(WAIT_FOR_THE_CLOCK));
    let budget = Duration::from_millis(200);
    let mut sup = supervisor(module, budget);
    sup.configure(&enabled("1s", 1)).unwrap();
    let start = Instant::now();
    let result = sup.tick(now(Instant::now()));
    let took = start.elapsed();
    assert!(
        matches!(result, Err(TickError::Fault(GuestFault::Timeout { .. }))),
        "{result:?}"
    );
    assert!(
        took >= budget && took < budget + Duration::from_secs(2),
        "stopped after {took:?}, budget {budget:?}"
    );
}

#[test]
fn imports_that_cannot_be_made_safe_are_refused_with_their_name() {
    let sandbox = sandbox();
    for (import, reason) in [
        ("wasi:sockets/tcp@0.2.0", "no network access"),
        ("wasi:sockets/instance-network@0.2.3", "no network access"),
        ("wasi:sockets/ip-name-lookup@0.2.0", "no network access"),
        ("wasi:http/outgoing-handler@0.2.0", "no network access"),
        ("wasi:clocks/timezone@0.2.0", "read the tick's time"),
        ("wasi:cli/run@0.2.0", "does not offer"),
    ] {
        let wat = clock_guest("(i32.const 0)").replacen(
            "(component $root",
            &format!("(component $root\n  (import \"{import}\" (instance))"),
            1,
        );
        let component = wasmtime::component::Component::new(sandbox.engine(), wat).unwrap();
        let err = GuestModule::from_component(&sandbox, "net", &component)
            .err()
            .unwrap_or_else(|| panic!("{import} was accepted"))
            .to_string();
        assert!(err.contains(import), "{err}");
        assert!(err.contains(reason), "{import}: {err}");
    }
}

#[test]
fn the_filesystem_has_nothing_to_open() {
    // `wasi:filesystem` is linked for runtimes whose C library imports it; with no
    // preopened directory, `get-directories` is empty.
    let wat = [
        r#"(component
  (import "wasi:filesystem/types@0.2.0" (instance $types
    (export "descriptor" (type (sub resource)))))
  (alias export $types "descriptor" (type $descriptor))
  (import "wasi:filesystem/preopens@0.2.0" (instance $preopens
    (alias outer 1 $descriptor (type $d))
    (export "descriptor" (type $d2 (eq $d)))
    (export "get-directories" (func (result (list (tuple (own $d2) string)))))))
  (core module $Memory
    (memory (export "mem") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024)))
  (core instance $mem (instantiate $Memory))
  (alias core export $mem "mem" (core memory $memory))
  (alias core export $mem "realloc" (core func $realloc))
  (core func $dirs (canon lower (func $preopens "get-directories") (memory $memory) (realloc $realloc)))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "wasi" "dirs" (func $dirs (param i32)))
    (func (export "configure") (param i32 i32) (result i32) (i32.const 0))
    (func (export "interval") (result i64) (i64.const 1000000000))
    (func (export "tick") (param i64 i32 i64) (result i32)
      (call $dirs (i32.const 64))
      ;; A non-empty list is an error: `(result (error string))` at 16.
      (if (i32.ne (i32.load (i32.const 68)) (i32.const 0))
        (then
          (i32.store (i32.const 16) (i32.const 1))
          (i32.store (i32.const 20) (i32.const 512))
          (i32.store (i32.const 24) (i32.const 0))
          (return (i32.const 16))))
      (i32.const 0))
    (func (export "save-state") (result i32) (i32.const 0))
    (func (export "restore-state") (param i32 i32) (result i32) (i32.const 0)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "wasi" (instance (export "dirs" (func $dirs))))))
"#,
        &guest_exports("$i", "$memory", "$realloc"),
    ]
    .concat();
    let mut sup = supervisor(wat_module("fs", &wat), Duration::from_secs(1));
    sup.configure(&enabled("1s", 1)).unwrap();
    sup.tick(now(Instant::now()))
        .expect("no preopened directory");
}

/// A guest whose `tick` reports `wasi:random/random.get-random-u64` as its error (16 hex
/// digits), and traps instead on an odd wall-clock second.
fn random_guest() -> String {
    [
        r#"(component
  (import "wasi:random/random@0.2.0" (instance $random
    (export "get-random-u64" (func (result u64)))))
  (core func $rand (canon lower (func $random "get-random-u64")))
  (core module $m
    (import "wasi" "rand" (func $rand (result i64)))
    (memory (export "mem") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "configure") (param i32 i32) (result i32) (i32.const 0))
    (func (export "interval") (result i64) (i64.const 1000000000))
    (func (export "tick") (param $s i64) (param i32 i64) (result i32)
      (local $v i64) (local $i i32) (local $d i32)
      (if (i64.eq (i64.rem_u (local.get $s) (i64.const 2)) (i64.const 1)) (then unreachable))
      (local.set $v (call $rand))
      (loop $digits
        (local.set $d (i32.wrap_i64 (i64.and (i64.shr_u (local.get $v)
          (i64.extend_i32_u (i32.sub (i32.const 60) (i32.mul (local.get $i) (i32.const 4)))))
          (i64.const 15))))
        (i32.store8 (i32.add (i32.const 256) (local.get $i))
          (i32.add (local.get $d)
            (select (i32.const 48) (i32.const 87) (i32.lt_u (local.get $d) (i32.const 10)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $digits (i32.lt_u (local.get $i) (i32.const 16))))
      (i32.store (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (i32.const 256))
      (i32.store (i32.const 24) (i32.const 16))
      (i32.const 16))
    (func (export "save-state") (result i32) (i32.const 0))
    (func (export "restore-state") (param i32 i32) (result i32) (i32.const 0)))
  (core instance $i (instantiate $m (with "wasi" (instance (export "rand" (func $rand))))))
"#,
        &guest_exports(
            "$i",
            r#"(core memory $i "mem")"#,
            r#"(core func $i "realloc")"#,
        ),
    ]
    .concat()
}

/// The random number a tick of the mock host's guest reported.
fn reported(mock: &mut MockHost) -> String {
    match mock.tick() {
        Err(TickError::Guest(hex)) if hex.len() == 16 => hex,
        other => panic!("expected 16 hex digits, got {other:?}"),
    }
}

#[test]
fn randomness_is_deterministic_under_the_mock_host_and_new_per_instance() {
    let module = wat_module("dice", &random_guest());
    let run = || {
        let mut mock = MockHost::with_module(module.clone(), MockOptions::default()).unwrap();
        let first = reported(&mut mock);
        let second = reported(&mut mock);
        mock.advance(Duration::from_secs(1));
        assert!(
            matches!(mock.tick(), Err(TickError::Fault(_))),
            "odd second"
        );
        mock.advance(Duration::from_secs(1));
        (first, second, reported(&mut mock))
    };
    let (first, second, after_trap) = run();
    assert_ne!(first, second, "one stream, not one value");
    assert_ne!(
        first, after_trap,
        "a fresh instance does not replay its predecessor"
    );
    assert_eq!(
        run(),
        (first, second, after_trap),
        "another mock host repeats it"
    );
}
