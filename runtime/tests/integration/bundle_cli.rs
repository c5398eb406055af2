//! `collector module` as a signer and an operator meet it: keygen, sign the real guest,
//! verify with the right and a wrong key, inspect, and the refusals they must see.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::guest_wasm;

pub(crate) fn collector(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

pub(crate) fn ok(args: &[&str]) -> String {
    let out = collector(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its standard error.
pub(crate) fn fails(args: &[&str], expected: &[&str]) -> String {
    let out = collector(args);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for e in expected {
        assert!(
            stderr.contains(e),
            "stderr of {args:?} lacks {e:?}:\n{stderr}"
        );
    }
    stderr
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn key_id(keygen_stdout: &str) -> String {
    let id = keygen_stdout
        .lines()
        .find_map(|l| l.strip_prefix("key id "))
        .unwrap_or_else(|| panic!("no key id printed:\n{keygen_stdout}"))
        .to_string();
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    id
}

#[test]
fn keygen_sign_verify_inspect_with_the_real_guest() {
    let dir = tempfile::tempdir().unwrap();
    let signer = dir.path().join("signer");
    let stranger = dir.path().join("stranger");
    let signer_id = key_id(&ok(&["module", "keygen", "--out", s(&signer)]));
    let stranger_id = key_id(&ok(&["module", "keygen", "--out", s(&stranger)]));
    assert_ne!(signer_id, stranger_id);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&signer).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the secret key is owner-only");
    }
    let before = std::fs::read(&signer).unwrap();
    fails(
        &["module", "keygen", "--out", s(&signer)],
        &["signer", "already exists", "--force"],
    );
    assert_eq!(std::fs::read(&signer).unwrap(), before, "not overwritten");

    let guest = guest_wasm();
    let bundle = dir.path().join("process-perf.bundle");
    let signed = ok(&[
        "module",
        "sign",
        "--key",
        s(&signer),
        "--name",
        "process-perf",
        "--version",
        "3",
        "--expires-in",
        "1day",
        "--grant",
        "process_perf.{pc_id}",
        "--memory-mib",
        "32",
        "--call-timeout",
        "500ms",
        s(&guest),
        "--out",
        s(&bundle),
    ]);
    assert!(signed.contains(&signer_id), "{signed}");

    let pub_key = format!("{}.pub", s(&signer));
    let valid = ok(&["module", "verify", "--trust", &pub_key, s(&bundle)]);
    for expected in [
        "process-perf version 3",
        signer_id.as_str(),
        "process_perf.{pc_id}",
        "memory 32 MiB",
        "call timeout 500 ms",
        "collector:api@0.2.0",
    ] {
        assert!(
            valid.contains(expected),
            "verify lacks {expected:?}:\n{valid}"
        );
    }

    let wrong = format!("{}.pub", s(&stranger));
    fails(
        &["module", "verify", "--trust", &wrong, s(&bundle)],
        &["process-perf.bundle", &signer_id, "not trusted"],
    );
    fails(
        &[
            "module",
            "verify",
            "--trust",
            &pub_key,
            "--trust",
            &pub_key,
            "--threshold",
            "2",
            s(&bundle),
        ],
        &["--trust", "threshold 2 can never be met"],
    );

    let shown = ok(&["module", "inspect", s(&bundle)]);
    for expected in [
        r#""name": "process-perf""#,
        r#""call_timeout_ms": 500"#,
        signer_id.as_str(),
        "matches the manifest",
        "collector:api/processes@0.2.0",
        "collector:api/publish@0.2.0",
        "this host would load the component",
    ] {
        assert!(
            shown.contains(expected),
            "inspect lacks {expected:?}:\n{shown}"
        );
    }
}

#[test]
fn tampering_rollback_and_unsignable_input_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let signer = dir.path().join("signer");
    ok(&["module", "keygen", "--out", s(&signer)]);
    let pub_key = format!("{}.pub", s(&signer));
    let bundle = dir.path().join("pp.bundle");
    let guest = guest_wasm();
    let sign = |version: &str, out: &Path| {
        ok(&[
            "module",
            "sign",
            "--key",
            s(&signer),
            "--name",
            "process-perf",
            "--version",
            version,
            s(&guest),
            "--out",
            s(out),
        ])
    };
    sign("3", &bundle);

    // One byte of the component flipped.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let tampered = dir.path().join("tampered.bundle");
    std::fs::write(&tampered, &bytes).unwrap();
    fails(
        &["module", "verify", "--trust", &pub_key, s(&tampered)],
        &["tampered.bundle", "sha256", "altered after signing"],
    );
    let out = collector(&["module", "inspect", s(&tampered)]);
    assert!(
        !out.status.success(),
        "inspect reports damage by its exit code"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("DOES NOT MATCH THE MANIFEST"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An agent that already accepted version 5 refuses version 3.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(
        state.join("bundle-versions.json"),
        r#"{"format": "collector-versions/1", "modules": {"process-perf": {"version": 5, "sha256": "00"}}}"#,
    )
    .unwrap();
    fails(
        &[
            "module",
            "verify",
            "--trust",
            &pub_key,
            "--state-dir",
            s(&state),
            s(&bundle),
        ],
        &["pp.bundle", "version 3 is older than version 5"],
    );

    // Unless a bundle it accepted was signed with a rollback floor at or below 3: then
    // going back to 3 is allowed, with the bytes 3 was accepted with only.
    let floored = dir.path().join("floored.bundle");
    let signed = ok(&[
        "module",
        "sign",
        "--key",
        s(&signer),
        "--name",
        "process-perf",
        "--version",
        "5",
        "--rollback-floor",
        "3",
        s(&guest),
        "--out",
        s(&floored),
    ]);
    assert!(
        signed.contains("agents may go back to version 3"),
        "{signed}"
    );
    std::fs::write(
        state.join("bundle-versions.json"),
        format!(
            r#"{{"format": "collector-versions/1", "modules": {{"process-perf": {{"version": 5, "sha256": "{}", "floor": 3}}}}}}"#,
            collector_bundle::sha256_hex(&std::fs::read(&guest).unwrap())
        ),
    )
    .unwrap();
    let verify_against_state = |bundle: &Path| {
        collector(&[
            "module",
            "verify",
            "--trust",
            &pub_key,
            "--state-dir",
            s(&state),
            s(bundle),
        ])
    };
    assert!(verify_against_state(&bundle).status.success());
    let older = dir.path().join("v2.bundle");
    sign("2", &older);
    let out = verify_against_state(&older);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("allow going back only to version 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails(
        &[
            "module",
            "sign",
            "--key",
            s(&signer),
            "--name",
            "process-perf",
            "--version",
            "2",
            "--rollback-floor",
            "3",
            s(&guest),
            "--out",
            s(&older),
        ],
        &["--rollback-floor 3", "at most the version (2)"],
    );

    // A bare component is not a bundle, and garbage is never signed.
    fails(
        &["module", "verify", "--trust", &pub_key, s(&guest)],
        &["process-perf.wasm", "not a signed bundle"],
    );
    let notes = dir.path().join("notes.wasm");
    std::fs::write(&notes, "hello").unwrap();
    let out_path = dir.path().join("notes.bundle");
    fails(
        &[
            "module",
            "sign",
            "--key",
            s(&signer),
            "--name",
            "notes",
            "--version",
            "1",
            s(&notes),
            "--out",
            s(&out_path),
        ],
        &["notes.wasm", "not a WebAssembly file"],
    );
    assert!(!out_path.exists(), "nothing written for refused input");
    fails(
        &[
            "module",
            "sign",
            "--key",
            &pub_key,
            "--name",
            "process-perf",
            "--version",
            "1",
            s(&guest),
            "--out",
            s(&out_path),
        ],
        &["--key", "signer.pub", "this is a public key file"],
    );
}

#[test]
fn help_explains_every_module_flag() {
    for (command, flags) in [
        ("keygen", &["--out", "--force"][..]),
        (
            "sign",
            &[
                "--key",
                "--name",
                "--version",
                "--expires-in",
                "--grant",
                "--memory-mib",
                "--call-timeout",
                "--out",
                "GUEST.wasm",
            ][..],
        ),
        ("verify", &["--trust", "--threshold", "--state-dir"][..]),
        ("inspect", &["BUNDLE"][..]),
    ] {
        let help = ok(&["module", command, "--help"]);
        for flag in flags {
            assert!(help.contains(flag), "{command} help lacks {flag}:\n{help}");
        }
    }
}
