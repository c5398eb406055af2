//! The agent loop in real time: gating, expiry, re-enabling, cadence changes, and a
//! configuration source that goes away.

use std::time::Duration;

use chrono::Utc;
use collector_sandbox::host::HostStats;
use collector_sandbox::sink::MemorySink;
use collector_shared::{EffectiveConfig, ProcessPerf};

use crate::common::*;

fn start(config: EffectiveConfig) -> (ThreadAgent, MemorySink) {
    let (sup, sink) = real_supervisor();
    (ThreadAgent::spawn(sup, 3, config), sink)
}

fn has_rates(m: &ProcessPerf) -> bool {
    m.processes
        .iter()
        .any(|p| p.disk_read_bytes_per_sec.is_some())
}

#[test]
fn disabled_or_expired_publishes_nothing_and_enumerates_nothing() {
    let disabled = EffectiveConfig {
        process_perf_enabled: false,
        ..enabled("50ms", 5)
    };
    let expired = EffectiveConfig {
        process_perf_expires_at: Some(Utc::now() - chrono::Duration::seconds(1)),
        ..enabled("50ms", 5)
    };
    for config in [disabled, expired] {
        let (agent, sink) = start(config);
        let stats = agent.stats.clone();
        assert!(wait_for(Duration::from_secs(5), || HostStats::get(
            &stats.ticks
        ) >= 4));
        agent.stop();
        assert_eq!(sink.len(), 0);
        assert_eq!(
            HostStats::get(&stats.samples),
            0,
            "S1: no enumeration while gated off"
        );
    }
}

#[test]
fn expiry_passing_stops_output_and_re_enabling_starts_without_rates() {
    let expires = Utc::now() + chrono::Duration::milliseconds(600);
    let config = EffectiveConfig {
        process_perf_expires_at: Some(expires),
        ..enabled("50ms", 1_000_000)
    };
    let (agent, sink) = start(config);
    let (handle, stats) = (agent.handle.clone(), agent.stats.clone());
    assert!(wait_for(Duration::from_secs(5), || Utc::now()
        > expires + chrono::Duration::milliseconds(300)));
    let before = decode_all(sink.take());
    assert!(before.len() >= 2, "published while active");
    assert!(
        before.iter().all(|m| m.at < expires),
        "nothing at or after expiry"
    );
    assert!(has_rates(before.last().unwrap()));
    let samples = HostStats::get(&stats.samples);
    let ticks = HostStats::get(&stats.ticks);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.len(), 0, "S2: stopped although still enabled");
    assert_eq!(HostStats::get(&stats.samples), samples);
    assert!(HostStats::get(&stats.ticks) > ticks, "the loop still ticks");

    handle.configure(enabled("50ms", 1_000_000));
    assert!(wait_for(Duration::from_secs(5), || sink.len() >= 2));
    let after = decode_all(sink.take());
    assert!(
        !has_rates(&after[0]),
        "S9: the baseline was reset while inactive"
    );
    assert!(has_rates(&after[1]));
    agent.stop();
}

#[test]
fn cadence_change_reschedules_the_ticker_and_resets_the_baseline() {
    let (agent, sink) = start(enabled("30s", 1_000_000));
    let handle = agent.handle.clone();
    assert!(
        wait_for(Duration::from_secs(5), || sink.len() == 1),
        "first tick is immediate"
    );
    let first = decode_all(sink.take());
    // Without a reschedule, the next tick would be 30 s away.
    handle.configure(enabled("100ms", 1_000_000));
    assert!(
        wait_for(Duration::from_secs(3), || sink.len() >= 5),
        "ticks at the new cadence"
    );
    let after = decode_all(sink.take());
    assert!(
        !has_rates(&after[0]),
        "S9: no rate right after a cadence change"
    );
    assert!(has_rates(&after[1]));
    let gap = (after[2].at - after[1].at).num_milliseconds();
    assert!(
        (50..1000).contains(&gap),
        "ticks ~100 ms apart, got {gap} ms"
    );
    assert!(after[0].at > first[0].at);
    agent.stop();
}

#[test]
fn a_closed_config_source_neither_stops_nor_spins_the_loop() {
    let (agent, sink) = start(enabled("100ms", 3));
    let (handle, stats) = (agent.handle.clone(), agent.stats.clone());
    // The configuration source delivers once, then goes away.
    let source = handle.clone();
    std::thread::spawn(move || source.configure(enabled("100ms", 2)))
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let ticks = HostStats::get(&stats.ticks);
    // A spinning loop would tick thousands of times; a stopped one not at all.
    assert!(
        (2..=20).contains(&ticks),
        "S15: ~10 ticks in 1 s, got {ticks}"
    );
    let msgs = decode_all(sink.take());
    assert_eq!(
        msgs.last().unwrap().processes.len(),
        2,
        "the last config is in force"
    );
    agent.stop();
}
