//! `collector trust` as a security team meets it, through the real binary: a first root
//! prepared and signed k-of-n on separate machines, a revocation that agents follow,
//! module scopes, the refusals (takeover by new keys, tampering, expiry, bad flags), and
//! publishing a chain of roots into a real nats-server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, kv::Operation};
use collector_bundle::SignedRoot;

use crate::bundle_cli::{collector, fails, ok, s};
use crate::common::{NatsServer, guest_wasm};
use crate::fleet_cli::{fails as nats_fails, ok as nats_ok};

/// A key pair made by `collector module keygen`.
struct Key {
    secret: PathBuf,
    public: String,
    id: String,
}

fn keygen(dir: &Path, name: &str) -> Key {
    let secret = dir.join(name);
    let out = ok(&["module", "keygen", "--out", s(&secret)]);
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("key id "))
        .unwrap_or_else(|| panic!("no key id printed:\n{out}"))
        .to_string();
    Key {
        public: format!("{}.pub", s(&secret)),
        secret,
        id,
    }
}

/// `collector trust sign ROOT --key ...` with every key given.
fn sign(root: &Path, keys: &[&Key]) -> String {
    let mut args = vec!["trust", "sign", s(root)];
    for k in keys {
        args.extend(["--key", s(&k.secret)]);
    }
    ok(&args)
}

/// The real guest signed into a bundle by `key`.
fn bundle(dir: &Path, file: &str, key: &Key) -> PathBuf {
    let out = dir.join(file);
    ok(&[
        "module",
        "sign",
        "--key",
        s(&key.secret),
        "--name",
        "process-perf",
        "--version",
        "1",
        s(&guest_wasm()),
        "--out",
        s(&out),
    ]);
    out
}

fn digest_of(path: &Path) -> String {
    SignedRoot::parse(&std::fs::read(path).unwrap())
        .unwrap()
        .digest()
}

#[test]
fn a_root_is_signed_k_of_n_offline_and_agents_follow_its_revocations_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [r1, r2, r3] = ["r1", "r2", "r3"].map(|n| keygen(d, n));
    let s1 = keygen(d, "s1");
    let scoped = keygen(d, "scoped");
    let v1 = d.join("v1.root");

    let out = ok(&[
        "trust",
        "init",
        "--root-key",
        &r1.public,
        "--root-key",
        &r2.public,
        "--root-key",
        &r3.public,
        "--root-threshold",
        "2",
        "--signing-key",
        &s1.public,
        "--signing-key",
        &format!("{}=other-module", scoped.public),
        "--out",
        s(&v1),
    ]);
    assert!(out.contains("trust root version 1, unsigned"), "{out}");
    assert!(
        out.contains(&format!(
            "2 of its root keys: {}, {}, {}",
            r1.id, r2.id, r3.id
        )),
        "{out}"
    );

    // Unsigned: refused, naming every key that could sign it.
    let err = fails(
        &["trust", "verify", s(&v1)],
        &["signed by none of its own root keys, 2 required", "2 more"],
    );
    for k in [&r1, &r2, &r3] {
        assert!(err.contains(&k.id), "{err}");
    }

    // Another machine gets a copy of the unsigned root.
    let machine_b = d.join("machine-b");
    std::fs::create_dir(&machine_b).unwrap();
    let copy = machine_b.join("v1.root");
    std::fs::copy(&v1, &copy).unwrap();

    let out = sign(&v1, &[&r1]);
    assert!(
        out.contains(&format!("signed by {}: root key of this version", r1.id)),
        "{out}"
    );
    let err = fails(&["trust", "verify", s(&v1)], &["1 more signature"]);
    assert!(
        err.contains(&format!("could still sign: {}, {}", r2.id, r3.id)),
        "{err}"
    );

    // A signing key signs too: allowed, but it is told it does not count here.
    let signed_b = collector(&[
        "trust",
        "sign",
        s(&copy),
        "--key",
        s(&r2.secret),
        "--key",
        s(&s1.secret),
    ]);
    assert!(signed_b.status.success());
    let stdout = String::from_utf8_lossy(&signed_b.stdout);
    assert!(
        stdout.contains(&format!(
            "signed by {}: not a root key of this version",
            s1.id
        )),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&signed_b.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains(&s1.id),
        "{stderr}"
    );

    // Merged into the file that holds the first signature, without naming it as a
    // copy: its own signature is kept.
    let out = ok(&["trust", "merge", "--out", s(&v1), s(&copy)]);
    assert!(out.contains("1 signature(s) added of 1"), "{out}");
    let out = ok(&["trust", "verify", s(&v1)]);
    assert!(out.starts_with("valid:"), "{out}");
    assert!(out.contains(&r1.id) && out.contains(&r2.id), "{out}");

    let show = ok(&["trust", "show", s(&v1)]);
    for expected in [
        "version:  1",
        "2 of 3 must sign a root",
        &r3.id,
        &format!("{} (may sign: any module)", s1.id),
        &format!("{} (may sign: other-module)", scoped.id),
        &format!("key {}: valid, root key of this version", r1.id),
        &format!("key {}: valid, root key of this version", r2.id),
        &format!(
            "key {}: valid, a signing key of this version but not a root key",
            s1.id
        ),
        "expires in 36",
        &format!("digest: sha256 {}", digest_of(&v1)),
    ] {
        assert!(show.contains(expected), "show lacks {expected:?}:\n{show}");
    }

    // Version 2 revokes s1.
    let v2 = d.join("v2.root");
    let out = ok(&[
        "trust",
        "revoke",
        s(&v1),
        "--key",
        &s1.public,
        "--out",
        s(&v2),
    ]);
    assert!(
        out.contains(&format!(
            "key {} revoked (it was a signing key of version 1)",
            s1.id
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "2 of the root keys of version 1: {}, {}, {}",
            r1.id, r2.id, r3.id
        )),
        "{out}"
    );
    let previous = ["--previous", s(&v1)];
    fails(
        &[&["trust", "verify", s(&v2)][..], &previous].concat(),
        &["signed by none of the root keys of version 1, 2 required"],
    );
    sign(&v2, &[&r3]);
    fails(
        &[&["trust", "verify", s(&v2)][..], &previous].concat(),
        &[&format!(
            "signed by 1 ({}) of the root keys of version 1",
            r3.id
        )],
    );
    sign(&v2, &[&r1]);
    let out = ok(&[&["trust", "verify", s(&v2)][..], &previous].concat());
    assert!(out.contains("an agent holding version 1 takes it"), "{out}");
    let show = ok(&["trust", "show", s(&v2)]);
    assert!(show.contains(&format!("revoked:  {}", s1.id)), "{show}");

    // A merge never replaces another root's signatures.
    let before = std::fs::read(&v1).unwrap();
    fails(
        &["trust", "merge", "--out", s(&v1), s(&v2)],
        &["--out", "holds another root", "would be lost"],
    );
    assert_eq!(std::fs::read(&v1).unwrap(), before, "v1 untouched");

    // Copies of different roots do not merge.
    fails(
        &[
            "trust",
            "merge",
            "--out",
            s(&d.join("m.root")),
            s(&v1),
            s(&v2),
        ],
        &["v2.root", "another root document"],
    );

    // A bundle signed by s1: good under version 1, refused under version 2, which names
    // the revoked key; the --trust key files still work as before.
    let by_s1 = bundle(d, "s1.bundle", &s1);
    let out = ok(&["module", "verify", "--trust-root", s(&v1), s(&by_s1)]);
    assert!(out.contains("trust root version 1"), "{out}");
    ok(&["module", "verify", "--trust", &s1.public, s(&by_s1)]);
    fails(
        &["module", "verify", "--trust-root", s(&v2), s(&by_s1)],
        &[&s1.id, "revoked"],
    );
    let inspected = ok(&["module", "inspect", "--trust-root", s(&v2), s(&by_s1)]);
    assert!(
        inspected.contains(&format!("key id {}: REVOKED", s1.id)),
        "{inspected}"
    );
    assert!(inspected.contains("verdict: refused"), "{inspected}");
    fails(
        &[
            "module",
            "verify",
            "--trust",
            &s1.public,
            "--trust-root",
            s(&v1),
            s(&by_s1),
        ],
        &["--trust-root"],
    );

    // A key limited to other-module does not sign process-perf.
    let by_scoped = bundle(d, "scoped.bundle", &scoped);
    fails(
        &["module", "verify", "--trust-root", s(&v1), s(&by_scoped)],
        &[&scoped.id, "other-module only", "process-perf"],
    );
}

#[test]
fn takeovers_tampering_expiry_and_bad_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [r1, r2, r3] = ["r1", "r2", "r3"].map(|n| keygen(d, n));
    let [n1, n2] = ["n1", "n2"].map(|n| keygen(d, n));
    let signer = keygen(d, "signer");
    let v1 = d.join("v1.root");
    let init = |threshold: &str, signing: &str, out: &Path| {
        collector(&[
            "trust",
            "init",
            "--root-key",
            &r1.public,
            "--root-key",
            &r2.public,
            "--root-key",
            &r3.public,
            "--root-threshold",
            threshold,
            "--signing-key",
            signing,
            "--out",
            s(out),
        ])
    };
    assert!(init("2", &signer.public, &v1).status.success());
    sign(&v1, &[&r1, &r2]);
    let previous = ["--previous", s(&v1)];

    // New root keys replacing every old one, signed by the new keys only: it carries its
    // own threshold, but an agent holding version 1 does not take it.
    let take = d.join("takeover.root");
    let out = ok(&[
        "trust",
        "rotate",
        s(&v1),
        "--add-root-key",
        &n1.public,
        "--add-root-key",
        &n2.public,
        "--remove-root-key",
        &r1.public,
        "--remove-root-key",
        &r2.id,
        "--remove-root-key",
        &r3.public,
        "--out",
        s(&take),
    ]);
    assert!(out.contains(&format!("root key {} added", n1.id)), "{out}");
    assert!(
        out.contains(&format!("root key {} retired", r2.id)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "2 of the root keys of version 2: {}, {}",
            n1.id, n2.id
        )),
        "{out}"
    );
    sign(&take, &[&n1, &n2]);
    ok(&["trust", "verify", s(&take)]);
    fails(
        &[&["trust", "verify", s(&take)][..], &previous].concat(),
        &[
            "signed by none of the root keys of version 1, 2 required",
            &r1.id,
        ],
    );

    // A root whose signed text was changed after signing.
    let v2 = d.join("v2.root");
    ok(&["trust", "renew", s(&v1), "--out", s(&v2)]);
    sign(&v2, &[&r1, &r2]);
    ok(&[&["trust", "verify", s(&v2)][..], &previous].concat());
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&v2).unwrap()).unwrap();
    let text = file["signed"].as_str().unwrap().to_string();
    let changed = text.replace("\"root_threshold\": 2", "\"root_threshold\": 1");
    assert_ne!(changed, text);
    file["signed"] = changed.into();
    let tampered = d.join("tampered.root");
    std::fs::write(&tampered, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    fails(
        &[&["trust", "verify", s(&tampered)][..], &previous].concat(),
        &["not taken", "signed by none of the root keys of version 1"],
    );
    fails(&["trust", "verify", s(&tampered)], &["not taken"]);
    let show = ok(&["trust", "show", s(&tampered)]);
    assert!(show.contains(&format!("key {}: INVALID", r1.id)), "{show}");

    // An expired root: refused even though well signed.
    let expired = d.join("expired.root");
    ok(&[
        "trust",
        "renew",
        s(&v1),
        "--expires-in",
        "1s",
        "--out",
        s(&expired),
    ]);
    sign(&expired, &[&r1, &r2]);
    std::thread::sleep(Duration::from_secs(2));
    fails(
        &[&["trust", "verify", s(&expired)][..], &previous].concat(),
        &["expired at", "collector trust renew"],
    );
    assert!(ok(&["trust", "show", s(&expired)]).contains("(EXPIRED)"));

    // Bad flags name themselves.
    let bad = d.join("bad.root");
    let err = init("5", &signer.public, &bad);
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("--root-threshold from 1 to 3"), "{stderr}");
    let err = init("2", "x.pub=a/b", &bad);
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("--signing-key x.pub=a/b") && stderr.contains("\"a/b\""),
        "{stderr}"
    );
    assert!(!bad.exists(), "nothing is written on a refusal");
    fails(
        &[
            "trust",
            "revoke",
            s(&v1),
            "--key",
            "nonsense",
            "--out",
            s(&bad),
        ],
        &["--key nonsense", "16 hex digits"],
    );
    fails(
        &["trust", "renew", s(&v1), "--out", s(&v1)],
        &["--out", "the input root"],
    );
    fails(
        &["trust", "renew", s(&v1), "--out", s(&v2)],
        &["--out", "already exists", "--force"],
    );
    fails(
        &[
            "trust",
            "remove-key",
            s(&v1),
            "--key",
            &r1.public,
            "--out",
            s(&bad),
        ],
        &["not a signing key of version 1", "--remove-root-key"],
    );
    // Revoking two of the three root keys leaves too few to sign for version 1.
    fails(
        &[
            "trust",
            "revoke",
            s(&v1),
            "--key",
            &r1.id,
            "--key",
            &r2.id,
            "--out",
            s(&bad),
        ],
        &["could never be taken"],
    );
    // Revoking a key the root does not hold is allowed, with a note.
    let stranger = "0123456789abcdef";
    let out = collector(&[
        "trust",
        "revoke",
        s(&v1),
        "--key",
        stranger,
        "--out",
        s(&bad),
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("key {stranger} is not a key of version 1")),
        "{stderr}"
    );
}

/// Each key's value in `collector_trust` (`None`: absent).
fn stored(nats: &NatsServer, keys: &[&str]) -> Vec<Option<Vec<u8>>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = async_nats::connect(&nats.url).await.unwrap();
            let store = jetstream::new(client)
                .get_key_value("collector_trust")
                .await
                .unwrap();
            let mut out = Vec::new();
            for key in keys {
                out.push(match store.entry(*key).await.unwrap() {
                    Some(e) if e.operation == Operation::Put => Some(e.value.to_vec()),
                    _ => None,
                });
            }
            out
        })
}

#[test]
fn publish_follows_the_chain_and_never_replaces_a_version() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [r1, r2, r3] = ["r1", "r2", "r3"].map(|n| keygen(d, n));
    let [s1, s2] = ["s1", "s2"].map(|n| keygen(d, n));
    let path = |v: &str| d.join(format!("{v}.root"));
    let (v1, v2, v3) = (path("v1"), path("v2"), path("v3"));

    ok(&[
        "trust",
        "init",
        "--root-key",
        &r1.public,
        "--root-key",
        &r2.public,
        "--root-key",
        &r3.public,
        "--root-threshold",
        "2",
        "--signing-key",
        &s1.public,
        "--out",
        s(&v1),
    ]);
    sign(&v1, &[&r1, &r2]);
    ok(&[
        "trust",
        "add-key",
        s(&v1),
        "--signing-key",
        &s2.public,
        "--out",
        s(&v2),
    ]);
    sign(&v2, &[&r1, &r3]);
    ok(&["trust", "revoke", s(&v2), "--key", &s1.id, "--out", s(&v3)]);
    sign(&v3, &[&r2, &r3]);

    nats_fails(
        &nats,
        &["trust", "publish", s(&v1)],
        &["collector_trust", "collector fleet init"],
    );
    nats_ok(&nats, &["fleet", "init"]);

    let out = nats_ok(&nats, &["trust", "publish", s(&v1)]);
    assert!(
        out.contains("published collector_trust v1: version 1"),
        "{out}"
    );
    // Given out of order, published in version order.
    let out = nats_ok(&nats, &["trust", "publish", s(&v3), s(&v2)]);
    let (at2, at3) = (
        out.find("published collector_trust v2").expect(&out),
        out.find("published collector_trust v3").expect(&out),
    );
    assert!(at2 < at3, "{out}");

    let out = nats_ok(&nats, &["trust", "publish", s(&v3)]);
    assert!(
        out.contains("already published: collector_trust v3"),
        "{out}"
    );

    // Another root of version 3 (renewed from version 2): refused, v3 is kept.
    let other = path("v3-other");
    ok(&["trust", "renew", s(&v2), "--out", s(&other)]);
    sign(&other, &[&r1, &r2]);
    nats_fails(
        &nats,
        &["trust", "publish", s(&other)],
        &["already holds another root of version 3", "never replaced"],
    );

    // Version 4 signed by one root key only: refused, naming who could still sign.
    let v4 = path("v4");
    ok(&["trust", "renew", s(&v3), "--out", s(&v4)]);
    sign(&v4, &[&r1]);
    nats_fails(
        &nats,
        &["trust", "publish", s(&v4)],
        &["not taken", "root keys of version 3", &r2.id],
    );

    // An expired version 4 is refused.
    let expired = path("v4-expired");
    ok(&[
        "trust",
        "renew",
        s(&v3),
        "--expires-in",
        "1s",
        "--out",
        s(&expired),
    ]);
    sign(&expired, &[&r1, &r2]);
    std::thread::sleep(Duration::from_secs(2));
    nats_fails(
        &nats,
        &["trust", "publish", s(&expired)],
        &["expired", "not published"],
    );

    // Version 5 without version 4: refused, naming the gap.
    sign(&v4, &[&r2]);
    let v5 = path("v5");
    ok(&["trust", "renew", s(&v4), "--out", s(&v5)]);
    sign(&v5, &[&r1, &r2]);
    nats_fails(
        &nats,
        &["trust", "publish", s(&v5)],
        &["version 4", "pass the earlier root files too"],
    );

    // The bucket holds exactly what was published.
    let values = stored(&nats, &["v1", "v2", "v3", "v4", "v5"]);
    for (value, file) in values.iter().zip([&v1, &v2, &v3]) {
        let value = value.as_ref().expect("published");
        let root = SignedRoot::parse(value).unwrap();
        assert_eq!(root.digest(), digest_of(file), "{}", file.display());
        assert_eq!(value, &std::fs::read(file).unwrap(), "{}", file.display());
    }
    assert_eq!(values[3], None, "v4 was never published");
    assert_eq!(values[4], None, "v5 was never published");

    // With version 4 given too, both go.
    let out = nats_ok(&nats, &["trust", "publish", s(&v5), s(&v4)]);
    assert!(
        out.contains("published collector_trust v4")
            && out.contains("published collector_trust v5"),
        "{out}"
    );
}
