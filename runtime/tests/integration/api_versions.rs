//! Both versions of `collector:api` on one host: the default guest as built against 0.1.0
//! (the frozen fixture crate) and as built against 0.2.0 run side by side, sign and
//! deploy as what they are, swap into each other, and publish the same bytes. Also the
//! one behaviour 0.2.0 adds to the default guest: a first CPU reading is a baseline, not
//! a message of zeros.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use collector_bundle::{Manifest, SecretKey, TrustRoot, TrustStore};
use collector_deploy::{Deployer, Policy};
use collector_sandbox::guest::{GuestModule, Supervisor};
use collector_sandbox::host::{HostStats, Limits};
use collector_sandbox::sink::MemorySink;
use collector_sandbox::source::SysinfoSource;
use collector_shared::{ConfigScope, EffectiveConfig};
use collector_testkit::{MockHost, MockOptions, MockProcess};

use crate::common::*;

fn v0_1_module() -> Arc<GuestModule> {
    Arc::new(GuestModule::from_file(&sandbox(), &guest_v0_1_wasm()).unwrap())
}

#[test]
fn each_guest_is_run_with_the_version_it_exports() {
    let old = v0_1_module();
    let new = process_perf_module();
    assert_eq!(old.api_version(), "0.1.0");
    assert_eq!(new.api_version(), "0.2.0");
    assert!(
        old.imports().iter().all(|i| !i.contains("@0.2.0")),
        "{:?}",
        old.imports()
    );
    assert!(
        new.imports()
            .iter()
            .any(|i| i == "collector:api/processes@0.2.0"),
        "{:?}",
        new.imports()
    );
}

#[test]
fn a_0_1_0_guest_and_a_0_2_0_guest_publish_the_same_bytes_side_by_side() {
    let mut old = MockHost::with_module(v0_1_module(), MockOptions::default()).unwrap();
    let mut new = MockHost::with_module(process_perf_module(), MockOptions::default()).unwrap();
    let scope = ConfigScope {
        process_perf_enabled: Some(true),
        process_perf_top_n: Some(3),
        host_perf_interval: Some("2s".into()),
        ..Default::default()
    };
    for host in [&mut old, &mut new] {
        host.configure(&scope).unwrap();
    }
    let mut published = 0;
    for round in 0..6u64 {
        let processes: Vec<MockProcess> = (1..=6u32)
            .map(|pid| {
                let cpu = match (pid + round as u32) % 4 {
                    0 => f32::NAN,
                    k => k as f32 * 12.345,
                };
                MockProcess::new(pid, &format!("p\"{pid}\t"))
                    .cpu(cpu)
                    .rss(u64::from(pid) << 40)
                    .disk(round * 1_000 * u64::from(pid), round * 7)
            })
            .collect();
        for host in [&mut old, &mut new] {
            host.set_processes(processes.clone());
            host.advance(Duration::from_millis(1_999));
            host.tick().unwrap();
        }
        let (a, b) = (old.take_published(), new.take_published());
        assert_eq!(a.len(), 1, "round {round}");
        assert_eq!(
            String::from_utf8_lossy(&a[0].payload),
            String::from_utf8_lossy(&b[0].payload),
            "round {round}"
        );
        assert_eq!(a[0].subject, b[0].subject);
        published += 1;
    }
    assert_eq!(published, 6);
    assert_eq!(
        HostStats::get(&new.stats().samples),
        6,
        "one enumeration of everyone per tick"
    );
    // Six processes are a small table: after the first tick, whose sample size the guest
    // did not know yet, the disk counters come with the one sample.
    assert_eq!(
        HostStats::get(&new.stats().pid_samples),
        1,
        "one sample of the top-N's disk counters, on the first tick only"
    );
}

#[test]
fn swapping_across_versions_either_way_keeps_running() {
    let sink = MemorySink::default();
    let mut sup = Supervisor::new(
        v0_1_module(),
        services(
            Box::new(SysinfoSource::new().unwrap()),
            sink.clone(),
            Limits::default(),
        ),
    );
    let origin = Instant::now();
    sup.configure(&enabled("2s", 3)).unwrap();
    sup.tick(now(origin)).unwrap();
    assert_eq!(sink.take().len(), 1, "0.1.0 publishes on its first tick");

    // 0.1.0 saved JSON, which 0.2.0 does not read: it says so and starts fresh.
    let state = sup.save_state().unwrap();
    sup.swap_module(process_perf_module());
    let not_carried = sup.start(state.as_deref()).unwrap();
    assert!(
        not_carried
            .as_ref()
            .is_some_and(|why| why.to_string().contains("process-perf/2")),
        "{not_carried:?}"
    );
    sup.tick(now(origin)).unwrap();
    let sent = decode_all(sink.take());
    assert_eq!(sent.len(), 1, "the source was primed by 0.1.0's sample");
    assert!(
        sent[0]
            .processes
            .iter()
            .all(|p| p.disk_read_bytes_per_sec.is_none()),
        "a fresh start has no rates"
    );

    // And back: 0.1.0 refuses 0.2.0's binary state the same way.
    let state = sup.save_state().unwrap();
    sup.swap_module(v0_1_module());
    let not_carried = sup.start(state.as_deref()).unwrap();
    assert!(not_carried.is_some());
    sup.tick(now(origin)).unwrap();
    assert_eq!(sink.take().len(), 1);
}

#[test]
fn bundles_declare_the_version_they_target_and_the_agent_holds_them_to_it() {
    let key = SecretKey::from_seed(&[9; 32]);
    let deployer = Deployer::new(
        sandbox(),
        Policy {
            trust: Some(TrustRoot::from_keys(
                TrustStore::new([key.public_key()], 1).unwrap(),
            )),
            allow_unsigned: false,
            unsigned_grants: Vec::new(),
            ceilings: Limits::default(),
            pc_id: PC_ID.into(),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    for (wasm, wit) in [
        (guest_v0_1_wasm(), "collector:api@0.1.0"),
        (guest_wasm(), "collector:api@0.2.0"),
    ] {
        let component = std::fs::read(&wasm).unwrap();
        let manifest = Manifest::describe("process-perf", 1, &component, chrono::Utc::now());
        assert_eq!(manifest.wit, wit);
        let path = dir.path().join("ok.bundle");
        std::fs::write(
            &path,
            collector_bundle::sign(&manifest, &component, &[&key]).unwrap(),
        )
        .unwrap();
        let accepted = deployer.load_file(&path).unwrap();
        assert_eq!(
            format!("collector:api@{}", accepted.module.api_version()),
            wit
        );

        // Signers who say the component targets the other version are not believed.
        let mut lying = manifest.clone();
        lying.wit = if wit.ends_with("0.1.0") {
            "collector:api@0.2.0".into()
        } else {
            "collector:api@0.1.0".into()
        };
        let path = dir.path().join("lying.bundle");
        std::fs::write(
            &path,
            collector_bundle::sign(&lying, &component, &[&key]).unwrap(),
        )
        .unwrap();
        let Err(refused) = deployer.load_file(&path) else {
            panic!("a manifest naming {} was believed", lying.wit);
        };
        assert!(
            refused.reason.contains("manifest field `wit`"),
            "{}",
            refused.reason
        );
    }
}

#[test]
fn the_first_message_after_turning_on_has_real_cpu_figures() {
    let sink = MemorySink::default();
    let mut sup = Supervisor::new(
        process_perf_module(),
        services(
            Box::new(SysinfoSource::new().unwrap()),
            sink.clone(),
            Limits::default(),
        ),
    );
    let origin = Instant::now();
    sup.configure(&EffectiveConfig::default()).unwrap();
    for _ in 0..3 {
        sup.tick(now(origin)).unwrap();
    }
    let stats = sup.stats();
    assert_eq!(
        HostStats::get(&stats.samples),
        0,
        "nothing is enumerated while off"
    );

    // Something to measure: this thread spins until the message is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    sup.configure(&enabled("60s", 5)).unwrap();
    sup.tick(now(origin)).unwrap();
    assert!(
        sink.take().is_empty(),
        "a first CPU reading is not published"
    );
    assert_eq!(HostStats::get(&stats.samples), 1);
    let lead = sup.interval().unwrap();
    assert_eq!(
        lead,
        Duration::from_secs(1),
        "the guest asks to come back soon"
    );

    std::thread::sleep(lead);
    sup.tick(now(origin)).unwrap();
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    let sent = decode_all(sink.take());
    assert_eq!(sent.len(), 1);
    let top = &sent[0].processes[0];
    assert!(
        top.cpu_pct > 0.0,
        "the busiest process over the last second has CPU: {:?}",
        sent[0].processes
    );
    assert_eq!(
        sup.interval(),
        Some(Duration::from_secs(60)),
        "then the cadence"
    );
}
