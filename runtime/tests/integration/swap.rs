//! Hot swap in the running agent: the successor takes over at a tick boundary with no
//! tick skipped or doubled and inherits the rate baseline; a successor that traps on its
//! first ticks, or cannot start, is rolled back to the last healthy module.

use std::time::Duration;

use collector_sandbox::agent::ModuleSpec;
use collector_sandbox::host::HostStats;
use collector_sandbox::sink::MemorySink;
use collector_shared::ProcessPerf;

use crate::common::*;

fn start(health_ticks: u32) -> (ThreadAgent, MemorySink) {
    let (sup, sink) = real_supervisor();
    let agent = ThreadAgent::spawn(sup, health_ticks, enabled("200ms", 1_000_000));
    (agent, sink)
}

/// A successor whose `configure` traps, so it can never start.
fn cannot_start(outcome: &Outcome) -> ModuleSpec {
    spec(
        wat_module("bad-init", &wat_guest_with("unreachable", "(i32.const 0)")),
        "bad-init v2",
        outcome,
    )
}

fn has_rates(m: &ProcessPerf) -> bool {
    m.processes
        .iter()
        .any(|p| p.disk_read_bytes_per_sec.is_some())
}

/// Gaps between consecutive messages, in milliseconds.
fn gaps(msgs: &[ProcessPerf]) -> Vec<i64> {
    msgs.windows(2)
        .map(|w| (w[1].at - w[0].at).num_milliseconds())
        .collect()
}

#[test]
fn a_swap_keeps_the_cadence_and_carries_the_baseline_over() {
    let (agent, sink) = start(2);
    let (handle, stats) = (agent.handle.clone(), agent.stats.clone());
    assert!(wait_for(Duration::from_secs(10), || sink.len() >= 3));
    let outcome = Outcome::default();
    let swapped_at_tick = HostStats::get(&stats.ticks);
    handle.swap(spec(process_perf_module(), "process-perf v2", &outcome));
    assert!(wait_for(Duration::from_secs(10), || sink.len() >= 8));
    agent.stop();

    let msgs = decode_all(sink.take());
    let after_swap = &msgs[swapped_at_tick as usize];
    assert!(
        has_rates(after_swap),
        "the first tick of the successor computes rates from the inherited baseline"
    );
    for gap in gaps(&msgs) {
        assert!(
            (100..=300).contains(&gap),
            "a tick was skipped or doubled around the swap: gaps {:?} ms",
            gaps(&msgs)
        );
    }
    assert_eq!(outcome.events(), ["healthy"]);
    assert_eq!(HostStats::get(&stats.traps), 0);
}

#[test]
fn a_successor_that_traps_on_its_second_tick_is_rolled_back_with_the_old_state() {
    let (agent, sink) = start(3);
    let (handle, stats) = (agent.handle.clone(), agent.stats.clone());
    assert!(wait_for(Duration::from_secs(10), || sink.len() >= 2));
    let outcome = Outcome::default();
    let trap_on_second =
        "(if (i32.eq (global.get $ticks) (i32.const 2)) (then unreachable)) (i32.const 0)";
    handle.swap(spec(
        wat_module("trap-on-second", &wat_guest(trap_on_second)),
        "trap-on-second v2",
        &outcome,
    ));
    assert!(wait_for(Duration::from_secs(10), || HostStats::get(
        &stats.traps
    ) >= 1));
    let before_rollback = sink.take().len();
    assert!(
        wait_for(Duration::from_secs(10), || sink.len() >= 2),
        "the old module publishes again"
    );
    agent.stop();

    let events = outcome.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].starts_with("rolled back: trapped in `tick`"),
        "{events:?}"
    );
    let resumed = decode_all(sink.take());
    assert!(before_rollback >= 2);
    assert!(
        has_rates(&resumed[0]),
        "the restored module computes rates from the state it had before the swap"
    );
}

#[test]
fn a_successor_that_cannot_start_is_rolled_back_at_once() {
    let (agent, sink) = start(3);
    let (handle, _stats) = (agent.handle.clone(), agent.stats.clone());
    assert!(wait_for(Duration::from_secs(10), || !sink.is_empty()));
    let outcome = Outcome::default();
    handle.swap(cannot_start(&outcome));
    assert!(wait_for(Duration::from_secs(5), || !outcome
        .events()
        .is_empty()));
    sink.take();
    assert!(
        wait_for(Duration::from_secs(10), || !sink.is_empty()),
        "the old module keeps publishing"
    );
    agent.stop();
    let events = outcome.events();
    assert!(events[0].contains("failed to start"), "{events:?}");
    assert!(events[0].contains("configure"), "{events:?}");
}

#[test]
fn a_first_module_rolled_back_to_still_becomes_the_last_known_good() {
    let (sup, sink) = real_supervisor();
    let first = Outcome::default();
    let hook = first.clone();
    let agent = ThreadAgent::spawn_with(sup, 3, enabled("100ms", 5), |agent| {
        agent.on_first_healthy(Box::new(move || {
            hook.0.lock().unwrap().push("healthy".into())
        }))
    });
    let (handle, stats) = (agent.handle.clone(), agent.stats.clone());
    // Swapped out before it completed its probation, by a module that cannot start.
    assert!(wait_for(Duration::from_secs(10), || !sink.is_empty()));
    let bad = Outcome::default();
    handle.swap(cannot_start(&bad));
    assert!(wait_for(Duration::from_secs(10), || !bad
        .events()
        .is_empty()));
    assert!(
        wait_for(Duration::from_secs(10), || first.events() == ["healthy"]),
        "the first module went back on probation and passed it: {:?}",
        first.events()
    );
    agent.stop();
    assert!(HostStats::get(&stats.ticks) >= 3);
}
