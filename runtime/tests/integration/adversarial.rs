//! The adversarial suite: a running agent is offered bundles an attacker (or an accident)
//! could produce. Each one is refused with its reason logged, and the running module
//! keeps publishing. The last case is a valid bundle whose guest publishes outside its
//! grant: it runs, and every such publish is refused and logged. A file that turns into a
//! FIFO under the watcher's feet does not stop it either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{Duration as ChronoDuration, Utc};
use collector_bundle::{Bundle, Manifest, sign};

use crate::common::*;

/// A component that imports `import` (an instance) on top of the guest world.
fn importing(import: &str) -> Vec<u8> {
    let wat = wat_guest("(i32.const 0)").replacen(
        "(component",
        &format!("(component\n  (import \"{import}\" (instance))"),
        1,
    );
    wat::parse_str(wat).unwrap()
}

#[test]
fn every_bad_bundle_is_refused_and_the_running_module_keeps_running() {
    let Deployment {
        dir,
        modules,
        state,
        config: cfg,
    } = Deployment::new();
    let (k1, k2, stranger) = (key(1), key(2), key(9));
    let pub1 = write_public(dir.path(), "k1", &k1);
    let pub2 = write_public(dir.path(), "k2", &k2);

    let guest = std::fs::read(guest_wasm()).unwrap();
    drop_file(
        &modules,
        "v2.bundle",
        &signed("process-perf", 2, &guest, &[&k1, &k2]),
    );
    let agent = AgentProcess::start(&[
        "--trust".as_ref(),
        pub1.as_os_str(),
        "--trust".as_ref(),
        pub2.as_os_str(),
        "--threshold".as_ref(),
        "2".as_ref(),
        "--modules".as_ref(),
        modules.as_os_str(),
        "--modules-poll".as_ref(),
        "50ms".as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]);
    agent.stderr_line_containing("process-perf v2");
    agent.next_message();

    let v3 = |component: &[u8]| Manifest::describe("process-perf", 3, component, Utc::now());
    let json = |m: &Manifest| m.to_json();
    let good_v3 = signed("process-perf", 3, &guest, &[&k1, &k2]);

    let mut flipped = good_v3.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x01;

    let mut custom = guest.clone();
    // A custom section (id 0) named "x" with a 3-byte payload, appended.
    custom.extend_from_slice(&[0, 5, 1, b'x', 1, 2, 3]);
    let custom_section = craft(&json(&v3(&guest)), &[&k1, &k2], &custom);

    let other = wat::parse_str(wat_guest("(i32.const 0)")).unwrap();
    let other_bundle = signed("process-perf", 3, &other, &[&k1, &k2]);
    let copied_signatures = {
        let manifest = json(&v3(&guest));
        let theirs = Bundle::parse(&other_bundle).unwrap();
        Bundle {
            manifest: &manifest,
            signatures: theirs.signatures.clone(),
            component: &guest,
        }
        .encode()
        .unwrap()
    };
    let same_key_twice = {
        let manifest = json(&v3(&guest));
        let mut twice = vec![k1.sign(&manifest), k1.sign(&manifest)];
        twice[1].key_id = k2.id();
        Bundle {
            manifest: &manifest,
            signatures: twice,
            component: &guest,
        }
        .encode()
        .unwrap()
    };
    let expired = {
        let mut m = v3(&guest);
        m.issued_at = Utc::now() - ChronoDuration::hours(2);
        m.expires_at = Some(Utc::now() - ChronoDuration::hours(1));
        craft(&json(&m), &[&k1, &k2], &guest)
    };
    let lower = signed("process-perf", 1, &guest, &[&k1, &k2]);
    let same_version_other_bytes = signed("process-perf", 2, &other, &[&k1, &k2]);
    let same_version_wider_grant = {
        let mut m = Manifest::describe("process-perf", 2, &guest, Utc::now());
        m.grants.publish = vec![">".into()];
        sign(&m, &guest, &[&k1, &k2]).unwrap()
    };
    let longer = {
        let mut m = v3(&guest);
        m.length += 100;
        craft(&json(&m), &[&k1, &k2], &guest)
    };
    let huge_length = {
        let mut b = b"CBUNDLE1".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(b"{}");
        b
    };
    let core = wat::parse_str("(module)").unwrap();
    // Correctly signed: only the host's own check can refuse it.
    let core_module = craft(&json(&v3(&core)), &[&k1, &k2], &core);
    let web = importing("wasi:http/outgoing-handler@0.2.0");
    let http = craft(&json(&v3(&web)), &[&k1, &k2], &web);
    let net = importing("wasi:sockets/tcp-create-socket@0.2.0");
    let sockets = craft(&json(&v3(&net)), &[&k1, &k2], &net);
    let other_wit = {
        let mut m = v3(&guest);
        m.wit = "someone:else@1.0.0".into();
        craft(&json(&m), &[&k1, &k2], &guest)
    };

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("flipped.bundle", flipped, "altered after signing"),
        (
            "custom-section.bundle",
            custom_section,
            "bytes were added or removed",
        ),
        (
            "unknown-key.bundle",
            signed("process-perf", 3, &guest, &[&k1, &stranger]),
            "which is not trusted",
        ),
        (
            "copied-signatures.bundle",
            copied_signatures,
            "copied from another bundle",
        ),
        (
            "threshold.bundle",
            signed("process-perf", 3, &guest, &[&k1]),
            "2 required",
        ),
        ("same-key-twice.bundle", same_key_twice, "counts once"),
        ("expired.bundle", expired, "expired"),
        ("lower-version.bundle", lower, "anti-rollback"),
        (
            "same-version-other-bytes.bundle",
            same_version_other_bytes,
            "already accepted with a different component",
        ),
        (
            "same-version-wider-grant.bundle",
            same_version_wider_grant,
            "already accepted with a different manifest",
        ),
        ("longer.bundle", longer, "bytes were added or removed"),
        ("huge-length.bundle", huge_length, "more than the maximum"),
        ("core-module.bundle", core_module, "core WebAssembly module"),
        ("http.bundle", http, "wasi:http"),
        ("sockets.bundle", sockets, "wasi:sockets"),
        ("other-wit.bundle", other_wit, "someone:else@1.0.0"),
    ];
    for (file, bytes, reason) in cases {
        drop_file(&modules, file, &bytes);
        let line = agent.stderr_line_containing(file);
        assert!(line.contains("module refused"), "{file}: {line}");
        assert!(
            line.contains(reason),
            "{file}: the reason should mention {reason:?}: {line}"
        );
        let msg = agent.fresh_message();
        assert_eq!(
            msg.pc_id, PC_ID,
            "{file}: the running module keeps publishing"
        );
    }

    // Valid and signed, but granted another subject than the one it publishes to.
    let mut narrow = v3(&guest);
    narrow.grants.publish = vec!["host_perf.{pc_id}".into()];
    drop_file(
        &modules,
        "narrow-grant.bundle",
        &sign(&narrow, &guest, &[&k1, &k2]).unwrap(),
    );
    agent.stderr_line_containing("process-perf v3");
    let line = agent.stderr_line_containing("publish refused");
    assert!(line.contains("not granted"), "{line}");
    assert!(line.contains(&format!("process_perf.{PC_ID}")), "{line}");
    let line = agent.stderr_line_containing("publish refused");
    assert!(
        line.contains("not granted"),
        "the module keeps running: {line}"
    );
}

/// A name that is a regular file when the watcher lists the directory and a FIFO when it
/// opens it used to block the watcher in `open()` forever: no log, and no bundle dropped
/// later was ever picked up.
#[cfg(unix)]
#[test]
fn a_name_flipping_between_a_file_and_a_fifo_does_not_stop_the_watcher() {
    let Deployment {
        dir,
        modules,
        state,
        config: cfg,
    } = Deployment::new();
    let k = key(4);
    let trust = write_public(dir.path(), "team", &k);
    let guest = std::fs::read(guest_wasm()).unwrap();
    drop_file(
        &modules,
        "v1.bundle",
        &signed("process-perf", 1, &guest, &[&k]),
    );
    let agent = AgentProcess::start(&[
        "--trust".as_ref(),
        trust.as_os_str(),
        "--modules".as_ref(),
        modules.as_os_str(),
        "--modules-poll".as_ref(),
        "10ms".as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]);
    agent.stderr_line_containing("process-perf v1");
    agent.next_message();

    // Files listed before the flipping one widen the window between the watcher's
    // listing (where the name is a regular file) and its open (where it is a FIFO).
    for i in 0..300 {
        std::fs::write(modules.join(format!("a{i:03}.txt")), b"not a bundle").unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, modules) = (stop.clone(), modules.clone());
        std::thread::spawn(move || {
            let path = modules.join("zz-flip.bundle");
            let (file, pipe) = (modules.join(".file.tmp"), modules.join(".fifo.tmp"));
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Renamed into place, so the name is always one or the other. The file
                // starts like a bundle, so the watcher goes on to open it.
                std::fs::write(&file, b"CBUNDLE1").unwrap();
                std::fs::rename(&file, &path).unwrap();
                fifo(&pipe);
                std::fs::rename(&pipe, &path).unwrap();
                flips += 1;
            }
            std::fs::remove_file(&path).unwrap();
            flips
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(flips > 100, "only {flips} flips");

    drop_file(
        &modules,
        "v2.bundle",
        &signed("process-perf", 2, &guest, &[&k]),
    );
    let line = agent.stderr_line_containing("new module accepted");
    assert!(line.contains("process-perf v2"), "{line}");
    assert_eq!(agent.fresh_message().pc_id, PC_ID, "v2 publishes");
}
