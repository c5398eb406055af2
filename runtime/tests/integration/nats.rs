//! End to end over a real nats-server: the `collector` binary publishes, a subscriber
//! on `process_perf.<pc_id>` receives messages that decode as ProcessPerf.

use std::process::{Command, Stdio};
use std::time::Duration;

use collector_shared::ProcessPerf;
use futures_util::StreamExt;

use crate::common::*;

#[test]
fn a_subscriber_receives_process_perf_messages() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.json");
    std::fs::write(
        &cfg,
        r#"{"process_perf_enabled": true, "host_perf_interval": "200ms", "process_perf_top_n": 4}"#,
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async_nats::connect(&server.url)).unwrap();
    let mut sub = rt
        .block_on(client.subscribe(format!("process_perf.{PC_ID}")))
        .unwrap();
    rt.block_on(client.flush()).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args([
            "run",
            "--insecure-allow-unsigned",
            "--pc-id",
            PC_ID,
            "--min-interval",
            "10ms",
        ])
        .arg("--guest")
        .arg(guest_wasm())
        .arg("--config")
        .arg(&cfg)
        .args(["--nats-url", &server.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let received: Vec<ProcessPerf> = rt.block_on(async {
        let mut out = Vec::new();
        while out.len() < 2 {
            let msg = tokio::time::timeout(Duration::from_secs(15), sub.next())
                .await
                .expect("a message within 15 s")
                .expect("subscription open");
            out.push(serde_json::from_slice(&msg.payload).unwrap());
        }
        out
    });
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.stdout.is_empty(),
        "with --nats-url nothing goes to stdout"
    );
    for m in &received {
        assert_eq!(m.pc_id, PC_ID);
        assert!(!m.processes.is_empty() && m.processes.len() <= 4);
    }
    assert!(received[1].at > received[0].at);
}
