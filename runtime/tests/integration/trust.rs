//! Trust roots across a fleet, through the real binary and nats-server: agents installed
//! once with a first root follow rotations published in the `collector_trust` bucket
//! (live, or after sleeping through several), never take a root back, refuse roots that
//! break the chain (too few signatures, new keys only, revoked keys, older versions,
//! expired ones) without changing anything, and act on a revocation: the revoked key's
//! bundles are refused from the fleet, from `--modules` and as the last-known-good at
//! start, and a module running on one is replaced by an earlier good version.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::Utc;
use collector_bundle::{KeyId, RootDoc, RootSigningKey, SignedRoot};
use collector_fleet::TRUST_BUCKET;
use collector_fleet::status::{
    AgentStatus, KIND_REVOKED, KIND_TRUST_EXPIRY, KIND_TRUST_ROOT, ObsEvent,
};

use crate::common::*;
use crate::fleet::{Fleet, enable, process_perf, runs};

const CONVERGE: Duration = Duration::from_secs(20);
/// The signing key of `fleet::process_perf` bundles.
const A: u8 = 1;
/// A second signing key, the one revoked.
const B: u8 = 60;

fn public_keys(seeds: &[u8]) -> Vec<collector_bundle::PublicKey> {
    seeds.iter().map(|n| key(*n).public_key()).collect()
}

fn id(seed: u8) -> KeyId {
    key(seed).id()
}

/// Version 1: root keys 50, 51, 52 (two must sign), signing keys A and B (one must).
fn first_doc() -> RootDoc {
    let now = Utc::now();
    RootDoc {
        version: 1,
        issued_at: now - chrono::Duration::days(1),
        expires_at: now + chrono::Duration::days(365),
        root_keys: public_keys(&[50, 51, 52]),
        root_threshold: 2,
        signing_keys: [A, B]
            .iter()
            .map(|n| RootSigningKey {
                key: key(*n).public_key(),
                modules: None,
            })
            .collect(),
        signing_threshold: 1,
        revoked: Vec::new(),
    }
}

/// The version after `doc`, changed by `edit`.
fn next(doc: &RootDoc, edit: impl FnOnce(&mut RootDoc)) -> RootDoc {
    let mut d = doc.next(Utc::now(), Some(chrono::Duration::days(365)));
    edit(&mut d);
    d
}

/// `doc` signed by the keys of these seeds, as a root file.
fn signed_root(doc: &RootDoc, by: &[u8]) -> Vec<u8> {
    let mut s = SignedRoot::new(doc).unwrap();
    for n in by {
        s.sign(&key(*n)).unwrap();
    }
    s.to_bytes()
}

fn create_trust_bucket(fleet: &Fleet) {
    fleet
        .rt
        .block_on(fleet.js.create_key_value(kv::Config {
            bucket: TRUST_BUCKET.into(),
            history: 1,
            ..Default::default()
        }))
        .unwrap();
}

/// An agent installed with the root file `root`, following the fleet's assignments.
fn agent(fleet: &Fleet, pc_id: &str, root: &Path, extra: &[&str]) -> AgentProcess {
    let state = fleet.state_dir(pc_id);
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--nats-url"),
        OsStr::new(&fleet.server.url),
        OsStr::new("--trust-root"),
        root.as_os_str(),
        OsStr::new("--state-dir"),
        state.as_os_str(),
        OsStr::new("--health-ticks"),
        OsStr::new("2"),
        OsStr::new("--status-interval"),
        OsStr::new("1s"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    AgentProcess::start_as(pc_id, &args)
}

fn root_version(s: &AgentStatus) -> Option<u64> {
    s.trust.as_ref().map(|t| t.version)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The next event of `kind` on `sub` within `limit`.
fn event_of(
    fleet: &Fleet,
    sub: &mut async_nats::Subscriber,
    kind: &str,
    limit: Duration,
) -> ObsEvent {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let bytes = fleet
            .next(sub, left)
            .unwrap_or_else(|| panic!("no {kind} event within {limit:?}"));
        let event: ObsEvent = serde_json::from_slice(&bytes).unwrap();
        if event.kind == kind {
            return event;
        }
    }
}

#[test]
fn an_agent_that_slept_through_three_rotations_catches_up_and_never_goes_back() {
    let fleet = Fleet::start();
    create_trust_bucket(&fleet);
    let d1 = first_doc();
    let v1 = write(fleet.dir.path(), "v1.root", &signed_root(&d1, &[50, 51]));
    fleet.put_module("process-perf", 1, &process_perf(1));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let mut events = fleet.subscribe("obs.pc-a");
    let a = agent(&fleet, "pc-a", &v1, &[]);
    fleet.wait_status("pc-a", CONVERGE, "v1 under root 1", |s| {
        runs(s, "process-perf", 1) && root_version(s) == Some(1)
    });

    // Live: version 2 replaces root key 52 by 53; signed by 50 and 51, root keys of both.
    let d2 = next(&d1, |d| d.root_keys = public_keys(&[50, 51, 53]));
    fleet.put(TRUST_BUCKET, "v2", &signed_root(&d2, &[50, 51]));
    fleet.wait_status("pc-a", CONVERGE, "root 2 taken", |s| {
        root_version(s) == Some(2)
    });
    let e = event_of(&fleet, &mut events, KIND_TRUST_ROOT, CONVERGE);
    assert_eq!(e.payload["from"], 1, "{e:?}");
    assert_eq!(e.payload["to"], 2, "{e:?}");
    a.stop();

    // Asleep through three more: root keys 50, 51 → 54, 55 (signed by the old and the
    // new), a second signing key C, then three of 53, 54, 55 for roots from then on.
    let d3 = next(&d2, |d| d.root_keys = public_keys(&[53, 54, 55]));
    let d4 = next(&d3, |d| {
        d.signing_keys.push(RootSigningKey {
            key: key(61).public_key(),
            modules: Some(vec!["process-*".into()]),
        })
    });
    let d5 = next(&d4, |d| d.root_threshold = 3);
    fleet.put(TRUST_BUCKET, "v3", &signed_root(&d3, &[50, 51, 54, 55]));
    fleet.put(TRUST_BUCKET, "v4", &signed_root(&d4, &[53, 54]));
    fleet.put(TRUST_BUCKET, "v5", &signed_root(&d5, &[53, 54, 55]));
    let a = agent(&fleet, "pc-a", &v1, &[]);
    let s = fleet.wait_status("pc-a", CONVERGE, "root 5 taken after the sleep", |s| {
        root_version(s) == Some(5)
    });
    assert!(
        s.modules.iter().any(|m| m.name == "process-perf"),
        "the module went on: {s:#?}"
    );
    let saved = fleet.state_dir("pc-a").join("trust-roots");
    for v in 2..=5 {
        assert!(
            saved.join(format!("v{v}.root")).is_file(),
            "v{v} saved in {}",
            saved.display()
        );
    }
    a.stop();

    // Restarted with the root it was installed with, it starts where it was; a root
    // planted in its state directory (not signed by version 5's root keys) counts for
    // nothing.
    let planted = next(&d5, |d| {
        d.signing_keys = vec![RootSigningKey {
            key: key(72).public_key(),
            modules: None,
        }]
    });
    write(&saved, "v6.root", &signed_root(&planted, &[50, 51, 52]));
    let a = agent(&fleet, "pc-a", &v1, &[]);
    let held = a.stderr_line_containing("trust root held");
    assert!(held.contains("version=5"), "{held}");
    a.stop();

    // A new agent installed with version 1 follows the whole chain at once.
    let _b = agent(&fleet, "pc-b", &v1, &[]);
    fleet.wait_status("pc-b", CONVERGE, "root 5 from version 1", |s| {
        root_version(s) == Some(5)
    });
}

#[test]
fn roots_that_break_the_chain_are_refused_and_change_nothing() {
    let fleet = Fleet::start();
    create_trust_bucket(&fleet);
    let d1 = first_doc();
    let v1 = write(fleet.dir.path(), "v1.root", &signed_root(&d1, &[50, 51]));
    let _a = agent(&fleet, "pc-a", &v1, &[]);
    fleet.wait_status("pc-a", CONVERGE, "root 1", |s| root_version(s) == Some(1));

    let d2 = next(&d1, |_| {});
    // An attacker's root: new root keys and a signing key of theirs.
    let takeover = next(&d1, |d| {
        d.root_keys = public_keys(&[70, 71]);
        d.signing_keys = vec![RootSigningKey {
            key: key(72).public_key(),
            modules: None,
        }];
    });
    // Revokes root key 52 and is signed with it: 52 does not count.
    let revoking = next(&d1, |d| {
        d.revoke(id(52));
    });
    // Another version 1, as a replay under the next key.
    let fork = {
        let mut d = d1.clone();
        d.expires_at += chrono::Duration::days(1);
        d
    };
    let expired = d1.next(Utc::now(), Some(chrono::Duration::seconds(1)));
    let expired = signed_root(&expired, &[50, 51]);
    std::thread::sleep(Duration::from_millis(1500));
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "fewer than the threshold",
            signed_root(&d2, &[50]),
            "of the root keys of version 1, 2 required".into(),
        ),
        (
            "new keys only",
            signed_root(&takeover, &[70, 71]),
            "signed by none of the root keys of version 1".into(),
        ),
        (
            "a revoked root key",
            signed_root(&revoking, &[50, 52]),
            format!("revoked key(s) {}", id(52)),
        ),
        (
            "a lower version",
            signed_root(&fork, &[50, 51]),
            "version 1 is not newer than version 1".into(),
        ),
        ("past its expiry", expired, "expired at".into()),
        (
            "not a root",
            b"{\"signed\": 1}".to_vec(),
            "not a trust root file".into(),
        ),
    ];
    for (what, bytes, expected) in cases {
        fleet.put(TRUST_BUCKET, "v2", &bytes);
        let s = fleet.wait_status("pc-a", CONVERGE, what, |s| {
            s.trust
                .as_ref()
                .and_then(|t| t.refused.as_ref())
                .is_some_and(|r| r.reason.contains(&expected))
        });
        assert_eq!(root_version(&s), Some(1), "{what}: {s:#?}");
        let refused = s.trust.unwrap().refused.unwrap();
        assert!(
            refused.reason.contains("collector_trust v2"),
            "{what}: the source is named: {refused:?}"
        );
    }
    assert!(
        !fleet
            .state_dir("pc-a")
            .join("trust-roots")
            .join("v2.root")
            .exists(),
        "nothing refused was saved"
    );
    // The chain is not wedged: the genuine version 2 is taken.
    fleet.put(TRUST_BUCKET, "v2", &signed_root(&d2, &[51, 52]));
    let s = fleet.wait_status("pc-a", CONVERGE, "root 2", |s| root_version(s) == Some(2));
    assert!(s.trust.unwrap().refused.is_none());
}

#[test]
fn a_revoked_keys_module_is_replaced_by_an_earlier_good_version_and_refused_from_the_fleet() {
    let fleet = Fleet::start();
    create_trust_bucket(&fleet);
    let d1 = first_doc();
    let v1 = write(fleet.dir.path(), "v1.root", &signed_root(&d1, &[50, 51]));
    let wasm = std::fs::read(guest_wasm()).unwrap();
    fleet.put_module("process-perf", 1, &process_perf(1));
    fleet.put_module(
        "process-perf",
        2,
        &signed("process-perf", 2, &wasm, &[&key(B)]),
    );
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let mut events = fleet.subscribe("obs.pc-a");
    let _a = agent(&fleet, "pc-a", &v1, &[]);
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });
    fleet.assign("global", &[("process-perf", 2)]);
    fleet.wait_status("pc-a", CONVERGE, "v2 (signed by B) healthy", |s| {
        runs(s, "process-perf", 2)
    });
    let state_file = fleet.state_dir("pc-a").join("agent-state.json");
    assert!(
        wait_for(CONVERGE, || std::fs::read_to_string(&state_file)
            .is_ok_and(|t| t.contains("\"earlier_good\""))),
        "v2 became the last-known-good, v1 the earlier good version"
    );

    // B leaks: version 2 of the root revokes it.
    let d2 = next(&d1, |d| {
        d.revoke(id(B));
    });
    fleet.put(TRUST_BUCKET, "v2", &signed_root(&d2, &[50, 51]));
    let s = fleet.wait_status("pc-a", CONVERGE, "v2 replaced by v1", |s| {
        runs(s, "process-perf", 1) && root_version(s) == Some(2)
    });
    let revoked = s
        .revoked
        .iter()
        .find(|r| r.name == "process-perf" && r.version == 2)
        .unwrap_or_else(|| panic!("the status names the revoked module: {s:#?}"));
    assert!(
        revoked.reason.contains(&id(B).to_string()) && revoked.reason.contains("revoked"),
        "{revoked:?}"
    );
    let e = event_of(&fleet, &mut events, KIND_REVOKED, CONVERGE);
    assert_eq!(e.payload["module"], "process-perf", "{e:?}");
    assert_eq!(e.payload["version"], 2, "{e:?}");
    assert_eq!(e.payload["to"], 1, "{e:?}");
    // The assignment still says v2: fetched again, refused, and shown as pending.
    let s = fleet.wait_status("pc-a", CONVERGE, "v2 pending, refused", |s| {
        s.pending
            .iter()
            .any(|p| p.version == 2 && p.why.contains("revoked"))
    });
    assert!(runs(&s, "process-perf", 1), "{s:#?}");

    // A new version signed by B is refused as it arrives; one signed by A runs.
    fleet.put_module(
        "process-perf",
        3,
        &signed("process-perf", 3, &wasm, &[&key(B)]),
    );
    fleet.assign("global", &[("process-perf", 3)]);
    fleet.wait_status("pc-a", CONVERGE, "v3 refused", |s| {
        s.last_refusal
            .as_ref()
            .is_some_and(|r| r.version == 3 && r.reason.contains("revoked"))
    });
    fleet.put_module("process-perf", 4, &process_perf(4));
    fleet.assign("global", &[("process-perf", 4)]);
    fleet.wait_status("pc-a", CONVERGE, "v4 (signed by A) runs", |s| {
        runs(s, "process-perf", 4)
    });
}

#[test]
fn a_revoked_keys_bundles_are_refused_from_the_modules_directory_and_the_last_known_good() {
    let fleet = Fleet::start();
    let work = tempfile::tempdir().unwrap();
    let modules = work.path().join("modules");
    std::fs::create_dir(&modules).unwrap();
    let d1 = first_doc();
    let v1 = write(work.path(), "v1.root", &signed_root(&d1, &[50, 51]));
    let wasm = std::fs::read(guest_wasm()).unwrap();
    enable(&fleet, "global", "200ms");
    drop_file(&modules, "pp-1.bundle", &process_perf(1));
    let start = || {
        agent(
            &fleet,
            "pc-a",
            &v1,
            &[
                "--modules",
                modules.to_str().unwrap(),
                "--modules-poll",
                "200ms",
            ],
        )
    };
    let a = start();
    fleet.wait_status("pc-a", CONVERGE, "v1 healthy", |s| {
        runs(s, "process-perf", 1)
    });
    drop_file(
        &modules,
        "pp-2.bundle",
        &signed("process-perf", 2, &wasm, &[&key(B)]),
    );
    fleet.wait_status("pc-a", CONVERGE, "v2 (signed by B) healthy", |s| {
        runs(s, "process-perf", 2)
    });
    let state_file = fleet.state_dir("pc-a").join("agent-state.json");
    assert!(
        wait_for(CONVERGE, || std::fs::read_to_string(&state_file)
            .is_ok_and(|t| t.contains("\"earlier_good\""))),
        "v2 became the last-known-good"
    );
    a.stop();

    // While the agent is down, the root revoking B lands next to the bundles, with a
    // newer bundle signed by B.
    let d2 = next(&d1, |d| {
        d.revoke(id(B));
    });
    drop_file(&modules, "v2.root", &signed_root(&d2, &[50, 51]));
    drop_file(
        &modules,
        "pp-3.bundle",
        &signed("process-perf", 3, &wasm, &[&key(B)]),
    );
    let a = start();
    let refused = a.stderr_line_containing("pp-3.bundle");
    assert!(
        refused.contains("refused") && refused.contains("revoked"),
        "{refused}"
    );
    let s = fleet.wait_status(
        "pc-a",
        CONVERGE,
        "v1, the earlier good version, runs",
        |s| {
            s.modules
                .iter()
                .any(|m| m.name == "process-perf" && m.version == 1)
                && root_version(s) == Some(2)
        },
    );
    assert!(
        !s.modules.iter().any(|m| m.version >= 2),
        "nothing signed by B runs: {s:#?}"
    );
}

#[test]
fn an_expiring_root_warns_and_an_expired_one_refuses_new_bundles_but_not_running_ones() {
    let fleet = Fleet::start();
    create_trust_bucket(&fleet);
    // Version 1 expires in a few seconds: within the warning period from the start.
    let mut d1 = first_doc();
    d1.issued_at = Utc::now();
    d1.expires_at = d1.issued_at + chrono::Duration::seconds(8);
    let v1 = write(fleet.dir.path(), "v1.root", &signed_root(&d1, &[50, 51]));
    fleet.put_module("process-perf", 1, &process_perf(1));
    fleet.put_module("process-perf", 2, &process_perf(2));
    enable(&fleet, "global", "200ms");
    fleet.assign("global", &[("process-perf", 1)]);
    let mut events = fleet.subscribe("obs.pc-a");
    let _a = agent(&fleet, "pc-a", &v1, &[]);
    let s = fleet.wait_status("pc-a", CONVERGE, "v1 runs, root expiring", |s| {
        runs(s, "process-perf", 1) && s.trust.as_ref().is_some_and(|t| t.state == "expiring")
    });
    assert_eq!(s.trust.unwrap().expires_at, Some(d1.expires_at));
    let e = event_of(&fleet, &mut events, KIND_TRUST_EXPIRY, CONVERGE);
    assert_eq!(e.payload["state"], "expiring", "{e:?}");

    let s = fleet.wait_status("pc-a", CONVERGE, "root expired", |s| {
        s.trust.as_ref().is_some_and(|t| t.state == "expired")
    });
    let ticks = s.modules[0].health.unwrap().ticks;
    // A new version is refused; the running one goes on.
    fleet.assign("global", &[("process-perf", 2)]);
    fleet.wait_status("pc-a", CONVERGE, "v2 refused under the expired root", |s| {
        s.last_refusal
            .as_ref()
            .is_some_and(|r| r.version == 2 && r.reason.contains("trust root (version 1) expired"))
    });
    fleet.wait_status("pc-a", CONVERGE, "the running module goes on", |s| {
        s.modules
            .iter()
            .any(|m| m.version == 1 && m.health.is_some_and(|h| h.ticks > ticks + 2))
            && s.trust.as_ref().is_some_and(|t| t.version == 1)
    });

    // The renewal arrives: v2 is fetched at once, without waiting for a recheck.
    let d2 = next(&d1, |_| {});
    fleet.put(TRUST_BUCKET, "v2", &signed_root(&d2, &[50, 51]));
    let s = fleet.wait_status(
        "pc-a",
        Duration::from_secs(15),
        "v2 runs under root 2",
        |s| runs(s, "process-perf", 2),
    );
    assert_eq!(s.trust.unwrap().state, "ok");
}
