//! Last-known-good and rollback through the `collector` binary: the first module becomes
//! the last-known-good once healthy; a successor that traps on its second tick is rolled
//! back and remembered as failed; a restart with nothing else to run comes back on the
//! last-known-good, and never retries the failed module.

use std::ffi::OsStr;

use crate::common::*;

#[test]
fn rollback_then_restart_comes_back_on_the_last_known_good() {
    let Deployment {
        dir,
        modules,
        state,
        config: cfg,
    } = Deployment::new();
    let k = key(3);
    let trust = write_public(dir.path(), "team", &k);
    let common: Vec<&OsStr> = vec![
        "--trust".as_ref(),
        trust.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--health-ticks".as_ref(),
        "2".as_ref(),
        "--modules-poll".as_ref(),
        "50ms".as_ref(),
    ];
    let mut with_modules = common.clone();
    with_modules.extend(["--modules".as_ref(), modules.as_os_str()]);

    let guest = std::fs::read(guest_wasm()).unwrap();
    drop_file(
        &modules,
        "v1.bundle",
        &signed("process-perf", 1, &guest, &[&k]),
    );
    let agent = AgentProcess::start(&with_modules);
    let line = agent.stderr_line_containing("saved as the last-known-good module");
    assert!(line.contains("process-perf v1"), "{line}");

    let trap_on_second = wat::parse_str(wat_guest(
        "(if (i32.eq (global.get $ticks) (i32.const 2)) (then unreachable)) (i32.const 0)",
    ))
    .unwrap();
    drop_file(
        &modules,
        "v2.bundle",
        &signed("process-perf", 2, &trap_on_second, &[&k]),
    );
    agent.stderr_line_containing("swapping modules at a tick boundary");
    let line = agent.stderr_line_containing("rolling back to the previous module");
    assert!(
        line.contains("process-perf v2") && line.contains("process-perf v1"),
        "{line}"
    );
    assert!(
        line.contains("trapped in `tick`"),
        "the reason is logged: {line}"
    );
    assert_eq!(agent.fresh_message().pc_id, PC_ID, "v1 publishes again");
    agent.stop();

    let recorded = std::fs::read_to_string(state.join("agent-state.json")).unwrap();
    assert!(
        recorded.contains("\"version\": 2") && recorded.contains("trapped"),
        "{recorded}"
    );

    // Nothing else available: the last-known-good runs.
    let agent = AgentProcess::start(&common);
    let line = agent.stderr_line_containing("starting with the last-known-good module");
    assert!(line.contains("process-perf v1"), "{line}");
    agent.next_message();
    agent.stop();

    // The failed bundle is still in the directory: it is not tried again.
    let agent = AgentProcess::start(&with_modules);
    agent.stderr_line_containing("starting with the last-known-good module");
    let line = agent.stderr_line_containing("v2.bundle");
    assert!(
        line.contains("module refused") && line.contains("was rolled back"),
        "{line}"
    );
    agent.next_message();
}
