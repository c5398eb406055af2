//! Guests that trap or never return: the host logs with the guest's name, discards the
//! instance, starts a fresh one for the next tick, and never panics or stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use collector_sandbox::guest::{GuestFault, Supervisor, TickError};
use collector_sandbox::host::{HostStats, Limits};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::StaticSource;

use crate::common::*;

fn supervisor(name: &str, tick_body: &str, limits: Limits) -> Supervisor {
    Supervisor::new(
        wat_module(name, &wat_guest(tick_body)),
        services(
            Box::new(StaticSource::default()),
            MemorySink::default(),
            limits,
        ),
    )
}

#[test]
fn a_trapping_guest_is_logged_by_name_and_replaced_by_a_fresh_instance() {
    let mut sup = supervisor("trap-on-second", TRAP_ON_SECOND_TICK, Limits::default());
    let origin = Instant::now();
    let (results, logs) =
        with_captured_logs(|| (0..4).map(|_| sup.tick(now(origin))).collect::<Vec<_>>());
    assert!(results[0].is_ok());
    match &results[1] {
        Err(TickError::Fault(GuestFault::Trap { call, message })) => {
            assert_eq!(*call, "tick");
            assert!(message.contains("unreachable"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    // The fresh instance counts from one again: its second tick is the fourth overall.
    assert!(results[2].is_ok());
    assert!(results[3].is_err());
    let stats = sup.stats();
    assert_eq!(HostStats::get(&stats.instantiations), 2);
    assert_eq!(HostStats::get(&stats.traps), 2);
    assert!(logs.contains("trap-on-second"), "{logs}");
    assert!(logs.contains("trapped in `tick`"), "{logs}");
}

const TRAP_ON_SECOND_TICK: &str =
    "(if (i32.eq (global.get $ticks) (i32.const 2)) (then unreachable)) (i32.const 0)";

#[test]
fn a_guest_that_never_returns_is_stopped_at_its_budget() {
    let limits = Limits {
        call_budget: Duration::from_millis(100),
        ..Limits::default()
    };
    let mut sup = supervisor("spin", "(loop $l (br $l)) (i32.const 0)", limits);
    let origin = Instant::now();
    let started = Instant::now();
    let result = sup.tick(now(origin));
    assert!(
        matches!(
            result,
            Err(TickError::Fault(GuestFault::Timeout { call: "tick", .. }))
        ),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the loop was interrupted"
    );
    assert!(!sup.is_live(), "the interrupted instance is discarded");
    // And again: each call gets a fresh instance and a fresh budget.
    assert!(sup.tick(now(origin)).is_err());
    assert_eq!(HostStats::get(&sup.stats().instantiations), 2);
}

#[test]
fn the_agent_keeps_running_a_guest_that_always_traps() {
    let sup = supervisor("always-traps", "unreachable", Limits::default());
    let agent = ThreadAgent::spawn(sup, 3, enabled("100ms", 5));
    let stats = agent.stats.clone();
    assert!(wait_for(Duration::from_secs(10), || HostStats::get(
        &stats.traps
    ) >= 3));
    agent.stop();
    assert!(HostStats::get(&stats.instantiations) >= 3);
}

#[test]
fn the_time_budget_holds_after_the_sandbox_is_dropped() {
    let module = {
        // A library user who keeps only the module (as the mock host does).
        let sandbox = collector_sandbox::engine::Sandbox::new().unwrap();
        let component = wasmtime::component::Component::new(
            sandbox.engine(),
            wat_guest("(loop $l (br $l)) (i32.const 0)"),
        )
        .unwrap();
        Arc::new(
            collector_sandbox::guest::GuestModule::from_component(&sandbox, "spin", &component)
                .unwrap(),
        )
    };
    let limits = Limits {
        call_budget: Duration::from_millis(100),
        ..Limits::default()
    };
    let mut sup = Supervisor::new(
        module,
        services(
            Box::new(StaticSource::default()),
            MemorySink::default(),
            limits,
        ),
    );
    let result = sup.tick(now(Instant::now()));
    assert!(
        matches!(result, Err(TickError::Fault(GuestFault::Timeout { .. }))),
        "{result:?}"
    );
}

#[test]
fn tables_cannot_grow_around_the_memory_cap() {
    // 50 million table entries would be hundreds of MB of host memory.
    let grow = "(if (i32.ne (table.grow $t (ref.null func) (i32.const 50000000)) (i32.const -1)) \
                (then unreachable)) (i32.const 0)";
    let mut sup = supervisor("table-grower", grow, Limits::default());
    sup.tick(now(Instant::now()))
        .expect("the grow is refused (it returns -1), so the guest does not trap");
}

#[test]
fn guests_that_import_the_network_are_refused_before_they_run() {
    let wat = wat_guest("(i32.const 0)").replacen(
        "(component",
        "(component\n  (import \"wasi:sockets/tcp-create-socket@0.2.0\" (instance))",
        1,
    );
    let sandbox = sandbox();
    let component = wasmtime::component::Component::new(sandbox.engine(), wat).unwrap();
    let err = collector_sandbox::guest::GuestModule::from_component(&sandbox, "net", &component)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("wasi:sockets/tcp-create-socket"), "{err}");
    assert!(err.contains("no network access"), "{err}");
}
