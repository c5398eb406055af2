//! The other ways in: a token, mutual TLS, and a credentials file (the JWT model), each
//! through a real nats-server configured for it. The agent publishes with the flags an
//! operator would give it; a wrong secret is refused with a message that says so.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt as _;

use crate::common::{AgentProcess, NatsServer, PC_ID, guest_wasm};

/// Settings that make the default guest publish every 200 ms.
fn settings(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("agent.json");
    std::fs::write(
        &cfg,
        r#"{"process_perf_enabled": true, "host_perf_interval": "200ms", "process_perf_top_n": 2}"#,
    )
    .unwrap();
    cfg
}

/// An agent running the local guest, publishing over NATS with `auth` flags.
fn agent(url: &str, dir: &Path, auth: &[&str]) -> AgentProcess {
    let cfg = settings(dir);
    let guest = guest_wasm();
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--insecure-allow-unsigned"),
        OsStr::new("--guest"),
        guest.as_os_str(),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--nats-url"),
        OsStr::new(url),
    ];
    args.extend(auth.iter().map(OsStr::new));
    AgentProcess::start_as(PC_ID, &args)
}

/// The first `process_perf.<PC_ID>` message a client made by `opts` receives.
fn receives(url: &str, opts: async_nats::ConnectOptions) -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = opts.connect(url).await.expect("the listener connects");
        let mut sub = client
            .subscribe(format!("process_perf.{PC_ID}"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .is_ok_and(|m| m.is_some())
    })
}

/// An operator command with `auth`, expected to be refused for its credentials.
fn refused(url: &str, auth: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(["fleet", "status", "--nats-url", url])
        .args(auth)
        .env_remove("NATS_TOKEN")
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{auth:?} accepted");
    String::from_utf8_lossy(&out.stderr).to_lowercase()
}

#[test]
fn a_token_signs_the_agent_in() {
    let server = NatsServer::start_with_config(
        "listen: 127.0.0.1:{{PORT}}\nauthorization { token: $FLEET_TOKEN }\n",
        &[("FLEET_TOKEN", "t0ken-for-the-fleet")],
    );
    let dir = tempfile::tempdir().unwrap();
    let _agent = agent(
        &server.url,
        dir.path(),
        &["--nats-token", "t0ken-for-the-fleet"],
    );
    assert!(receives(
        &server.url,
        async_nats::ConnectOptions::with_token("t0ken-for-the-fleet".into())
    ));
    let said = refused(&server.url, &["--nats-token", "wrong"]);
    assert!(said.contains("authorization"), "{said}");
}

#[test]
fn mutual_tls_signs_the_agent_in_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A CA, a server certificate for the loopback, and a client certificate.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleet test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let issue = |names: Vec<String>, file: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(d.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
    };
    issue(vec!["localhost".into(), "127.0.0.1".into()], "server");
    issue(vec!["pc-a.fleet.test".into()], "client");
    issue(vec!["listener.fleet.test".into()], "listener");
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let conf = format!(
        "listen: 127.0.0.1:{{{{PORT}}}}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
        p("server.pem"),
        p("server-key.pem"),
        p("ca.pem")
    );
    let server = NatsServer::start_with_config(&conf, &[]);
    let url = server.url.replace("nats://", "tls://");
    let _agent = agent(
        &url,
        d,
        &[
            "--tls-ca",
            &p("ca.pem"),
            "--tls-cert",
            &p("client.pem"),
            "--tls-key",
            &p("client-key.pem"),
        ],
    );
    let listener = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(d.join("ca.pem"))
        .add_client_certificate(d.join("listener.pem"), d.join("listener-key.pem"));
    assert!(receives(&url, listener));
    // Without a client certificate the server refuses the handshake.
    let said = refused(&url, &["--tls-ca", &p("ca.pem")]);
    assert!(
        said.contains("tls") || said.contains("certificate"),
        "{said}"
    );
}

/// A JWT for `claims`, signed by `key` (the nats-server JWT format: an ed25519-nkey
/// signature over the base64url header and claims).
fn jwt(key: &nkeys::KeyPair, claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let half = format!("{header}.{body}");
    let sig = URL_SAFE_NO_PAD.encode(key.sign(half.as_bytes()).unwrap());
    format!("{half}.{sig}")
}

/// A credentials file for a user of `account`, as `nsc generate creds` writes it.
fn creds(account: &nkeys::KeyPair, name: &str, allow_pub: &[&str], allow_sub: &[&str]) -> String {
    let user = nkeys::KeyPair::new_user();
    let mut token = nats_jwt::Token::new_user(account.public_key(), user.public_key()).name(name);
    for s in allow_pub {
        token = token.allow_publish(*s);
    }
    for s in allow_sub {
        token = token.allow_subscribe(*s);
    }
    let jwt = token.sign(account);
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

#[test]
fn a_credentials_file_signs_the_agent_in_with_its_own_rights() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let now = chrono::Utc::now().timestamp();
    let operator_jwt = jwt(
        &operator,
        serde_json::json!({
            "jti": "OPERATORJWT", "iat": now, "iss": operator.public_key(),
            "sub": operator.public_key(), "name": "fleet-operator",
            "nats": { "type": "operator", "version": 2 }
        }),
    );
    let account_jwt = nats_jwt::Token::new_account(account.public_key())
        .name("fleet")
        .sign(&operator);
    let conf = format!(
        "listen: 127.0.0.1:{{{{PORT}}}}\noperator: {operator_jwt}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {}: {account_jwt}\n}}\n",
        account.public_key()
    );
    let server = NatsServer::start_with_config(&conf, &[]);
    let dir = tempfile::tempdir().unwrap();
    let agent_creds = dir.path().join("pc-a.creds");
    std::fs::write(
        &agent_creds,
        creds(
            &account,
            PC_ID,
            &[
                &format!("process_perf.{PC_ID}"),
                &format!("obs.{PC_ID}"),
                "$KV.collector_status.>",
            ],
            &["_INBOX.>"],
        ),
    )
    .unwrap();
    let listener_creds = dir.path().join("listener.creds");
    std::fs::write(
        &listener_creds,
        creds(&account, "listener", &[], &["process_perf.>"]),
    )
    .unwrap();
    let _agent = agent(
        &server.url,
        dir.path(),
        &["--nats-creds", agent_creds.to_str().unwrap()],
    );
    let listener = async_nats::ConnectOptions::new();
    let listener = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(listener.credentials_file(&listener_creds))
        .unwrap();
    assert!(receives(&server.url, listener));
    // A credentials file of a key the account never signed is refused.
    let stranger = nkeys::KeyPair::new_account();
    let forged = dir.path().join("forged.creds");
    std::fs::write(&forged, creds(&stranger, "forged", &[], &[])).unwrap();
    let said = refused(&server.url, &["--nats-creds", forged.to_str().unwrap()]);
    assert!(said.contains("authorization"), "{said}");
}
