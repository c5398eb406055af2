//! `collector fleet credentials`: the least-privilege broker layout of
//! docs/nats-server.conf, written for a list of PCs, with an nkey generated for every
//! user. The public keys go into the server configuration; each seed goes into a file of
//! its own, readable by its owner only, for the machine that signs in with it. Run again
//! with more PCs (or none) to add them: existing seeds are kept, never replaced.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use collector_fleet::rollout::{EVENTS_PC_ID, ROLLOUTS_BUCKET};
use collector_fleet::{
    ASSIGNMENTS_BUCKET, CONFIG_BUCKET, GROUPS_BUCKET, MODULES_STREAM, STATUS_BUCKET, TRUST_BUCKET,
    names, obs_subject,
};
use collector_fsutil::{Links, read_regular, write_atomic};

/// Longest seed file read back.
const MAX_SEED_FILE: u64 = 1024;

/// Write a ready broker configuration and an nkey per user, for a list of PCs.
///
/// Writes DIR/nats-server.conf, the layout of docs/nats-server.conf: agents in an account
/// of their own with no JetStream, each allowed its own data subjects, its own status key
/// and reads of its own keys only; the operator, the publisher and kanade's backend in
/// the account that holds the buckets. Every user signs in with an nkey: the public keys
/// are in the configuration, the seeds in DIR/operator.nk, DIR/publisher.nk,
/// DIR/kanade.nk and DIR/agents/<PC>.nk (mode 600; give each to its machine only, and
/// pass it with --nats-nkey).
///
/// Run it again with more --pc to add PCs: existing seeds are kept and every PC with a
/// seed in DIR/agents stays in the configuration. Then reload the server
/// (`nats-server --signal reload`).
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// Where to write the configuration and the seeds (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// A PC to give credentials to (its pc_id); repeat for more.
    #[arg(long = "pc", value_name = "ID")]
    pcs: Vec<String>,

    /// A file with one PC id per line (blank lines and `#` comments skipped).
    #[arg(long, value_name = "FILE")]
    pcs_file: Option<PathBuf>,

    /// Subjects agents publish module data on, as `<prefix>.<pc_id>`; repeat for each
    /// module's grant. `obs` (kanade's events) is always allowed.
    #[arg(
        long = "data-subject",
        value_name = "PREFIX",
        default_value = "process_perf"
    )]
    data_subjects: Vec<String>,

    /// The address the server listens on.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:4222")]
    listen: String,

    /// JetStream's store directory on the server.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/nats/jetstream")]
    store_dir: String,
}

pub fn run(args: &CredentialsArgs) -> anyhow::Result<()> {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for pc in &args.pcs {
        names::pc_id(pc).map_err(|e| anyhow!("--pc: {e}"))?;
        wanted.insert(pc.clone());
    }
    if let Some(file) = &args.pcs_file {
        let bytes = read_regular(file, 16 << 20, Links::Follow)
            .map_err(|e| anyhow!("--pcs-file {}: {e}", file.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow!("--pcs-file {}: not UTF-8 text", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let pc = line.split('#').next().unwrap_or("").trim();
            if pc.is_empty() {
                continue;
            }
            names::pc_id(pc)
                .map_err(|e| anyhow!("--pcs-file {} line {}: {e}", file.display(), n + 1))?;
            wanted.insert(pc.to_string());
        }
    }
    for prefix in &args.data_subjects {
        names::pc_id(prefix).map_err(|e| anyhow!("--data-subject: {e}"))?;
    }
    check_plain("--listen", &args.listen)?;
    check_plain("--store-dir", &args.store_dir)?;
    let agents_dir = args.dir.join("agents");
    create_private_dir(&args.dir)?;
    create_private_dir(&agents_dir)?;

    // Every PC that already has a seed stays.
    let mut pcs = wanted.clone();
    for entry in std::fs::read_dir(&agents_dir)
        .with_context(|| format!("cannot list {}", agents_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(pc) = name.strip_suffix(".nk")
            && names::pc_id(pc).is_ok()
        {
            pcs.insert(pc.to_string());
        }
    }
    if pcs.is_empty() {
        bail!("no PC: give at least one with --pc or --pcs-file");
    }

    let mut created = Vec::new();
    let mut key = |path: PathBuf| -> anyhow::Result<String> {
        let (public, new) = user_key(&path)?;
        if new {
            created.push(path);
        }
        Ok(public)
    };
    let operator = key(args.dir.join("operator.nk"))?;
    let publisher = key(args.dir.join("publisher.nk"))?;
    let kanade = key(args.dir.join("kanade.nk"))?;
    let mut agents = Vec::new();
    for pc in &pcs {
        agents.push((pc.clone(), key(agents_dir.join(format!("{pc}.nk")))?));
    }
    let conf = server_config(args, &operator, &publisher, &kanade, &agents);
    let conf_path = args.dir.join("nats-server.conf");
    write_atomic(&conf_path, conf.as_bytes(), Some(0o644))
        .with_context(|| format!("cannot write {}", conf_path.display()))?;

    println!(
        "wrote {} ({} PC{})",
        conf_path.display(),
        pcs.len(),
        if pcs.len() == 1 { "" } else { "s" }
    );
    if created.is_empty() {
        println!("no new seed: every user already had one");
    } else {
        println!("new seeds (mode 600; give each to its machine only):");
        for path in &created {
            println!("  {}", path.display());
        }
    }
    let example = wanted
        .iter()
        .next()
        .or_else(|| pcs.iter().next())
        .expect("at least one");
    println!("next:");
    println!(
        "  nats-server -c {}   (or `nats-server --signal reload` if it runs)",
        conf_path.display()
    );
    println!(
        "  collector fleet init --nats-url nats://HOST:PORT --nats-nkey {}",
        args.dir.join("operator.nk").display()
    );
    println!(
        "  collector run --pc-id {example} --nats-url nats://HOST:PORT --nats-nkey {} --nats-inbox-prefix _INBOX_{example} ...",
        agents_dir.join(format!("{example}.nk")).display()
    );
    Ok(())
}

/// A value written into the configuration as a quoted string: no quote, backslash,
/// newline or other control character that could end it.
fn check_plain(flag: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        bail!(
            "{flag} {value:?}: expected a plain value, without quotes, backslashes or control characters"
        );
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(())
}

/// The public key of the user seed in `path`, generated (and written, owner-only) when
/// the file does not exist; `true` when it was.
fn user_key(path: &Path) -> anyhow::Result<(String, bool)> {
    match read_regular(path, MAX_SEED_FILE, Links::Refuse) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{}: not an nkey seed (not text)", path.display()))?;
            let pair = nkeys::KeyPair::from_seed(text.trim()).map_err(|e| {
                anyhow!(
                    "{}: not an nkey seed ({e}); move it away to make a new one",
                    path.display()
                )
            })?;
            if !pair.public_key().starts_with('U') {
                bail!(
                    "{}: holds a seed of another kind than a user's",
                    path.display()
                );
            }
            Ok((pair.public_key(), false))
        }
        Err(e) if e.is_not_found() => {
            let pair = nkeys::KeyPair::new_user();
            let seed = pair
                .seed()
                .map_err(|e| anyhow!("cannot encode a new seed: {e}"))?;
            write_atomic(path, format!("{seed}\n").as_bytes(), Some(0o600))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok((pair.public_key(), true))
        }
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// The broker configuration: docs/nats-server.conf's layout, with nkeys.
fn server_config(
    args: &CredentialsArgs,
    operator: &str,
    publisher: &str,
    kanade: &str,
    agents: &[(String, String)],
) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# Written by `collector fleet credentials`: the layout of docs/nats-server.conf\n\
         # (read it for why each line is there), with an nkey per user. Regenerated when\n\
         # PCs are added: edit the command's flags, not this file.\n"
    );
    let _ = writeln!(w, "listen: \"{}\"\n", args.listen);
    let _ = writeln!(w, "jetstream {{\n  store_dir: \"{}\"\n}}\n", args.store_dir);
    let _ = writeln!(
        w,
        "accounts {{\n  FLEET {{\n    jetstream: enabled\n    exports: ["
    );
    let agent_reads = [CONFIG_BUCKET, GROUPS_BUCKET, ASSIGNMENTS_BUCKET];
    let shared = shared_with_agents();
    for (kind, subject) in &shared {
        let _ = writeln!(w, "      {{ {kind}: \"{subject}\", accounts: [AGENTS] }}");
    }
    let _ = writeln!(w, "    ]\n    imports: [");
    for prefix in data_prefixes(args) {
        let _ = writeln!(
            w,
            "      {{ stream: {{ account: AGENTS, subject: \"{prefix}.>\" }} }}"
        );
    }
    let _ = writeln!(w, "    ]\n    users: [");
    let buckets = [
        CONFIG_BUCKET,
        GROUPS_BUCKET,
        ASSIGNMENTS_BUCKET,
        STATUS_BUCKET,
        ROLLOUTS_BUCKET,
    ];
    let mut operator_allow: Vec<String> = Vec::new();
    for b in buckets {
        operator_allow.extend(read_api(&format!("KV_{b}")));
        operator_allow.push(format!("$JS.API.STREAM.CREATE.KV_{b}"));
        operator_allow.push(format!("$JS.API.STREAM.UPDATE.KV_{b}"));
    }
    for b in agent_reads.iter().chain([&ROLLOUTS_BUCKET]) {
        operator_allow.push(format!("$KV.{b}.>"));
    }
    // The rollout controller's events on kanade's timeline.
    operator_allow.push(obs_subject(EVENTS_PC_ID));
    operator_allow.extend(read_api(MODULES_STREAM));
    // `rollout start` reads a bundle's manifest (its rollback floor) as agents download:
    // chunks by sequence.
    operator_allow.push(format!("$JS.API.DIRECT.GET.{MODULES_STREAM}"));
    operator_allow.push(format!("$JS.API.STREAM.CREATE.{MODULES_STREAM}"));
    operator_allow.push("$JS.API.INFO".to_string());
    // Trust roots: the operator creates their bucket (`fleet init`) and reads it; only
    // the release publisher writes roots (`collector trust publish`).
    operator_allow.extend(read_api(&format!("KV_{TRUST_BUCKET}")));
    operator_allow.push(format!("$JS.API.STREAM.CREATE.KV_{TRUST_BUCKET}"));
    operator_allow.push(format!("$JS.API.STREAM.UPDATE.KV_{TRUST_BUCKET}"));
    user(
        w,
        "operator",
        operator,
        &operator_allow,
        &[],
        &["_INBOX.>".into()],
    );
    let mut publisher_allow: Vec<String> = vec![
        "$O.collector_modules.>".into(),
        "$JS.API.INFO".into(),
        format!("$JS.API.STREAM.CREATE.{MODULES_STREAM}"),
        format!("$KV.{TRUST_BUCKET}.>"),
    ];
    publisher_allow.extend(read_api(MODULES_STREAM));
    publisher_allow.extend(read_api(&format!("KV_{TRUST_BUCKET}")));
    user(
        w,
        "publisher",
        publisher,
        &publisher_allow,
        &[],
        &["_INBOX.>".into()],
    );
    let kanade_deny: Vec<String> = vec![
        "$O.collector_modules.>".into(),
        "$JS.API.INFO".into(),
        format!("$JS.API.STREAM.CREATE.{MODULES_STREAM}"),
        format!("$JS.API.STREAM.UPDATE.{MODULES_STREAM}"),
        format!("$JS.API.STREAM.DELETE.{MODULES_STREAM}"),
        format!("$JS.API.STREAM.PURGE.{MODULES_STREAM}"),
        format!("$JS.API.STREAM.MSG.DELETE.{MODULES_STREAM}"),
        format!("$KV.{TRUST_BUCKET}.>"),
        format!("$JS.API.STREAM.UPDATE.KV_{TRUST_BUCKET}"),
        format!("$JS.API.STREAM.DELETE.KV_{TRUST_BUCKET}"),
        format!("$JS.API.STREAM.PURGE.KV_{TRUST_BUCKET}"),
        format!("$JS.API.STREAM.MSG.DELETE.KV_{TRUST_BUCKET}"),
    ];
    user(
        w,
        "kanade's backend",
        kanade,
        &[">".into()],
        &kanade_deny,
        &[">".into()],
    );
    let _ = writeln!(w, "    ]\n  }}\n\n  AGENTS {{\n    imports: [");
    for (kind, subject) in &shared {
        let _ = writeln!(
            w,
            "      {{ {kind}: {{ account: FLEET, subject: \"{subject}\" }} }}"
        );
    }
    let _ = writeln!(w, "    ]\n    exports: [");
    for prefix in data_prefixes(args) {
        let _ = writeln!(w, "      {{ stream: \"{prefix}.>\", accounts: [FLEET] }}");
    }
    let _ = writeln!(w, "    ]\n    users: [");
    for (pc, public) in agents {
        let mut allow = Vec::new();
        let mut ears = vec![format!("_INBOX_{pc}.>")];
        for bucket in [CONFIG_BUCKET, ASSIGNMENTS_BUCKET] {
            for key in ["global".to_string(), "groups.>".into(), format!("pcs.{pc}")] {
                allow.push(format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"));
                ears.push(format!("$KV.{bucket}.{key}"));
            }
        }
        allow.push(format!(
            "$JS.API.DIRECT.GET.KV_{GROUPS_BUCKET}.$KV.{GROUPS_BUCKET}.{pc}"
        ));
        ears.push(format!("$KV.{GROUPS_BUCKET}.{pc}"));
        allow.push(format!("$JS.API.DIRECT.GET.{MODULES_STREAM}"));
        allow.push(format!("$JS.API.DIRECT.GET.{MODULES_STREAM}.>"));
        // Trust roots are public: every version, to every agent.
        allow.push(format!(
            "$JS.API.DIRECT.GET.KV_{TRUST_BUCKET}.$KV.{TRUST_BUCKET}.>"
        ));
        ears.push(format!("$KV.{TRUST_BUCKET}.>"));
        allow.push(format!("$KV.{STATUS_BUCKET}.{pc}"));
        for prefix in data_prefixes(args) {
            allow.push(format!("{prefix}.{pc}"));
        }
        user(w, &format!("agent {pc}"), public, &allow, &[], &ears);
    }
    let _ = writeln!(w, "    ]\n  }}\n}}");
    out
}

/// What FLEET shares with AGENTS, as (kind, subject): exported by one, imported by the
/// other. Services: key-scoped reads, bundle reads and status puts, each answered to the
/// asking agent only. Streams: the put subjects of the buckets agents follow.
fn shared_with_agents() -> Vec<(&'static str, String)> {
    let reads = [CONFIG_BUCKET, GROUPS_BUCKET, ASSIGNMENTS_BUCKET];
    let mut out: Vec<(&str, String)> = reads
        .iter()
        .map(|b| ("service", format!("$JS.API.DIRECT.GET.KV_{b}.>")))
        .collect();
    out.push(("service", format!("$JS.API.DIRECT.GET.{MODULES_STREAM}")));
    out.push(("service", format!("$JS.API.DIRECT.GET.{MODULES_STREAM}.>")));
    out.push(("service", format!("$JS.API.DIRECT.GET.KV_{TRUST_BUCKET}.>")));
    out.push(("service", format!("$KV.{STATUS_BUCKET}.*")));
    out.extend(reads.iter().map(|b| ("stream", format!("$KV.{b}.>"))));
    out.push(("stream", format!("$KV.{TRUST_BUCKET}.>")));
    out
}

/// The read-only JetStream API on `stream`: its info, direct and message gets, consumers
/// (to watch or list) and their flow control.
fn read_api(stream: &str) -> [String; 6] {
    [
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ]
}

/// The data subjects' prefixes, `obs` included, without duplicates.
fn data_prefixes(args: &CredentialsArgs) -> Vec<String> {
    let mut out: BTreeSet<String> = args.data_subjects.iter().cloned().collect();
    out.insert("obs".into());
    out.into_iter().collect()
}

/// One nkey user with its publish allow (and deny) list and subscribe allow list.
fn user(
    w: &mut String,
    who: &str,
    public: &str,
    allow: &[String],
    deny: &[String],
    subscribe: &[String],
) {
    let quoted = |list: &[String]| {
        list.iter()
            .map(|s| format!("          \"{s}\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let _ = writeln!(w, "      # {who}");
    let _ = writeln!(
        w,
        "      {{\n        nkey: {public}\n        permissions: {{\n          publish: {{\n            allow: ["
    );
    let _ = writeln!(
        w,
        "{}",
        quoted(allow).replace("          \"", "              \"")
    );
    let _ = write!(w, "            ]");
    if !deny.is_empty() {
        let _ = write!(
            w,
            "\n            deny: [\n{}\n            ]",
            quoted(deny).replace("          \"", "              \"")
        );
    }
    let _ = writeln!(
        w,
        "\n          }}\n          subscribe: {{ allow: [{}] }}\n        }}\n      }}",
        subscribe
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
