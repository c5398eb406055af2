//! Differential test: the guest component on the mock host and the native reference
//! implementation get the same random inputs (churning process tables, NaN and tied CPU
//! readings, counters going backwards, config flips, expiries, cadence changes, clock
//! steps) and must publish the same messages, byte for byte, in the same order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use collector_reference::ReferenceLoop;
use collector_sandbox::source::{ProcessTable, StaticSource};
use collector_shared::ConfigScope;
use collector_testkit::{MockHost, MockOptions, MockProcess};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use crate::common::*;

#[derive(Debug, Clone)]
enum Op {
    Table(Vec<MockProcess>),
    Config(ConfigScope),
    Advance(Duration),
    WallJump(i64),
    Tick,
}

fn cpu() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0f32),
        Just(-0.0f32),
        Just(5.0f32),
        Just(12.5f32),
        0.0f32..400.0,
    ]
}

fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5_000, Just(u64::MAX), any::<u64>()]
}

fn table() -> impl Strategy<Value = Vec<MockProcess>> {
    // PIDs from a small range so that processes come, go and come back.
    proptest::collection::btree_map(1u32..24, (cpu(), any::<u64>(), counter(), counter()), 0..14)
        .prop_map(|m| {
            m.into_iter()
                .map(|(pid, (cpu, rss, r, w))| {
                    MockProcess::new(pid, &format!("p{pid}"))
                        .cpu(cpu)
                        .rss(rss)
                        .disk(r, w)
                })
                .collect()
        })
}

fn scope() -> impl Strategy<Value = ConfigScope> {
    (
        proptest::option::of(any::<bool>()),
        proptest::option::of(prop_oneof![Just(None), (-120i64..600).prop_map(Some)]),
        proptest::option::of(0u32..8),
        proptest::option::of(prop_oneof![
            Just("1s"),
            Just("2s"),
            Just("500ms"),
            Just("60s"),
            Just("0s"),
            Just("1m 30s"),
        ]),
    )
        .prop_map(|(enabled, expiry, top_n, interval)| ConfigScope {
            process_perf_enabled: enabled,
            // Relative to the default start; `Some(None)` cannot be expressed by a scope,
            // so "no expiry" is written as a far-away one.
            process_perf_expires_at: expiry.map(|e| {
                let base = collector_testkit::default_start();
                match e {
                    Some(secs) => base + chrono::Duration::seconds(secs),
                    None => base + chrono::Duration::days(3650),
                }
            }),
            process_perf_top_n: top_n,
            host_perf_interval: interval.map(str::to_string),
            ..Default::default()
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => table().prop_map(Op::Table),
        2 => scope().prop_map(Op::Config),
        3 => prop_oneof![0u64..3, 0u64..2_000, 0u64..120_000]
            .prop_map(|ms| Op::Advance(Duration::from_micros(ms * 700))),
        1 => (-90i64..90).prop_map(Op::WallJump),
        5 => Just(Op::Tick),
    ]
}

fn source_of(procs: &[MockProcess]) -> StaticSource {
    StaticSource {
        table: ProcessTable {
            pids: procs.iter().map(|p| p.pid).collect(),
            cpu_pct: procs.iter().map(|p| p.cpu_pct).collect(),
            rss_bytes: procs.iter().map(|p| p.rss_bytes).collect(),
            disk_read_bytes: procs.iter().map(|p| p.disk_read_bytes).collect(),
            disk_written_bytes: procs.iter().map(|p| p.disk_written_bytes).collect(),
        },
        names: procs.iter().map(|p| (p.pid, p.name.clone())).collect(),
    }
}

fn run_both(ops: &[Op]) -> Result<usize, TestCaseError> {
    let mut guest = MockHost::with_module(process_perf_module(), MockOptions::default())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut reference =
        ReferenceLoop::new(collector_testkit::DEFAULT_PC_ID, guest.config().clone());
    let mut source = StaticSource::default();
    let mut compared = 0;
    let mut configured = false;
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Table(procs) => {
                guest.set_processes(procs.clone());
                source = source_of(procs);
            }
            Op::Config(scope) => {
                let guest_changed = guest
                    .configure(scope)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let ref_changed = reference.config_changed(guest.config().clone());
                // The very first configuration always counts as a change for the host
                // (it had no interval before); the reference was built with a config.
                if configured {
                    prop_assert_eq!(guest_changed, ref_changed, "cadence change at op {}", i);
                }
                configured = true;
                prop_assert_eq!(guest.interval(), Some(reference.interval()));
            }
            Op::Advance(d) => guest.advance(*d),
            Op::WallJump(secs) => {
                let wall: DateTime<Utc> = guest.wall() + chrono::Duration::seconds(*secs);
                guest.set_wall(wall);
            }
            Op::Tick => {
                guest
                    .tick()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want = reference.tick(guest.wall(), guest.monotonic(), &mut source);
                let got: Vec<(String, Vec<u8>)> = guest
                    .take_published()
                    .into_iter()
                    .map(|p| (p.subject, p.payload))
                    .collect();
                let want: Vec<(String, Vec<u8>)> = want.into_iter().collect();
                prop_assert_eq!(
                    got.iter()
                        .map(|(s, p)| (s.clone(), String::from_utf8_lossy(p).into_owned()))
                        .collect::<Vec<_>>(),
                    want.iter()
                        .map(|(s, p)| (s.clone(), String::from_utf8_lossy(p).into_owned()))
                        .collect::<Vec<_>>(),
                    "tick at op {}",
                    i
                );
                compared += got.len();
            }
        }
    }
    Ok(compared)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn guest_and_reference_publish_identical_messages(
        first in table(),
        enable in scope(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut all = vec![Op::Table(first), Op::Config(ConfigScope { process_perf_enabled: Some(true), ..enable }), Op::Tick];
        all.extend(ops);
        run_both(&all)?;
    }
}

/// The random walk must actually exercise publishing, rates and gating; a generator that
/// drifted into "always off" would make the property vacuous.
#[test]
fn the_generator_reaches_published_messages_with_rates() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec(op(), 20..60);
    let mut messages = 0;
    for _ in 0..20 {
        let mut ops = vec![
            Op::Table(vec![MockProcess::new(1, "a").cpu(1.0).disk(10, 10)]),
            Op::Config(ConfigScope {
                process_perf_enabled: Some(true),
                ..Default::default()
            }),
        ];
        ops.extend(strategy.new_tree(&mut runner).unwrap().current());
        messages += run_both(&ops).unwrap();
    }
    assert!(messages > 50, "only {messages} messages compared");
}
