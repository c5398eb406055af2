//! The real guest component over real sysinfo data, ticked directly.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use collector_sandbox::host::HostStats;

use crate::common::*;

#[test]
fn publishes_kanade_json_sorted_and_cut_to_top_n() {
    let (mut sup, sink) = real_supervisor();
    sup.configure(&enabled("60s", 5)).unwrap();
    let origin = Instant::now();
    sup.tick(now(origin)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sup.tick(now(origin)).unwrap();

    let raw = sink.take();
    assert_eq!(raw.len(), 2);
    let allowed: HashSet<&str> = [
        "pid",
        "name",
        "cpu_pct",
        "rss_bytes",
        "disk_read_bytes_per_sec",
        "disk_written_bytes_per_sec",
    ]
    .into();
    for (_, payload) in &raw {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["pc_id", "at", "processes"], "wire order");
        assert_eq!(v["pc_id"], PC_ID);
        chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap()).unwrap();
        for p in v["processes"].as_array().unwrap() {
            for k in p.as_object().unwrap().keys() {
                assert!(allowed.contains(k.as_str()), "unexpected field {k}");
            }
        }
    }
    let msgs = decode_all(raw);
    for m in &msgs {
        assert!(!m.processes.is_empty() && m.processes.len() <= 5);
        let cpus: Vec<f64> = m.processes.iter().map(|p| p.cpu_pct).collect();
        assert!(
            cpus.windows(2).all(|w| w[0] >= w[1]),
            "not sorted by cpu_pct descending: {cpus:?}"
        );
        assert!(m.processes.iter().all(|p| p.rss_bytes >= 0));
    }
    let stats = sup.stats();
    assert_eq!(HostStats::get(&stats.samples), 2);
    assert!(
        HostStats::get(&stats.names_looked_up) <= 10,
        "names are looked up only for published processes"
    );
    assert!(HostStats::get(&stats.processes_sampled) > 10);
}

#[test]
fn rates_absent_on_first_tick_and_present_for_pids_that_stayed() {
    let (mut sup, sink) = real_supervisor();
    // A top-N larger than the machine: every process is published and kept.
    sup.configure(&enabled("60s", 1_000_000)).unwrap();
    let origin = Instant::now();
    sup.tick(now(origin)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sup.tick(now(origin)).unwrap();
    let msgs = decode_all(sink.take());
    let first = &msgs[0];
    assert!(first.processes.iter().all(|p| {
        p.disk_read_bytes_per_sec.is_none() && p.disk_written_bytes_per_sec.is_none()
    }));
    let before: HashSet<u32> = first.processes.iter().map(|p| p.pid).collect();
    let second = &msgs[1];
    let mut stayed = 0;
    for p in &second.processes {
        let has_rate = p.disk_read_bytes_per_sec.is_some();
        assert_eq!(has_rate, p.disk_written_bytes_per_sec.is_some());
        assert_eq!(has_rate, before.contains(&p.pid), "pid {}", p.pid);
        if has_rate {
            stayed += 1;
            assert!(p.disk_read_bytes_per_sec.unwrap() >= 0.0);
        }
    }
    assert!(stayed > 5, "most processes outlive 100 ms");
}

#[test]
fn state_survives_a_trip_between_two_instances() {
    let (mut old, sink) = real_supervisor();
    old.configure(&enabled("60s", 1_000_000)).unwrap();
    let origin = Instant::now();
    old.tick(now(origin)).unwrap();
    let state = old
        .save_state()
        .unwrap()
        .expect("the default guest saves state");

    let (mut new, new_sink) = real_supervisor();
    new.restore_state(&state).unwrap().unwrap();
    new.configure(&enabled("60s", 1_000_000)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    new.tick(now(origin)).unwrap();
    let msg = &decode_all(new_sink.take())[0];
    assert!(
        msg.processes
            .iter()
            .any(|p| p.disk_read_bytes_per_sec.is_some()),
        "the successor computes rates against the inherited baseline"
    );
    drop(sink);
}
