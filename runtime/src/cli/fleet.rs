//! `collector fleet`: what the agents of a fleet report about themselves, read from
//! their records in the `collector_status` KV, summarised for an operator deciding
//! whether a rollout may go on; and `fleet init`, which creates the buckets up front so
//! that agents never need the right to create one (docs/securing-a-deployment.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use futures_util::{StreamExt as _, TryStreamExt as _};

use super::ops::{self, NatsArgs};
use collector_fleet::rollout::ROLLOUTS_BUCKET;
use collector_fleet::status::AgentStatus;
use collector_fleet::{
    ASSIGNMENTS_BUCKET, CONFIG_BUCKET, GROUPS_BUCKET, MODULES_STORE, MODULES_STREAM, STATUS_BUCKET,
    TRUST_BUCKET, kv, names,
};

/// How many status records are fetched at once.
const PARALLEL_READS: usize = 64;
/// Longest refusal reason shown in the table (`--details` and `--json` show it whole).
const SHORT_REASON: usize = 48;

/// Watch the fleet: what each agent runs and how it is doing.
#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    Status(StatusArgs),
    Init(InitArgs),
    Credentials(super::credentials::CredentialsArgs),
}

/// Create the fleet's buckets that do not exist yet: the KV buckets agent_config,
/// agent_groups, collector_config, collector_status and collector_rollouts, and the
/// object store collector_modules.
///
/// Agents create the status bucket themselves when it is missing, which needs a right a
/// least-privilege agent does not have; run this once, as the operator, before the first
/// agent joins. Existing buckets keep their history and replicas; on each, direct gets
/// are turned on (agents read their keys with nothing else), and on collector_status,
/// rollup headers are refused and records capped at 64 KiB. With a NATS cluster,
/// --replicas 3 stores each bucket on three servers, so that the fleet loses nothing and
/// carries on when one server goes away.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// How many servers of a NATS cluster store each bucket (1 to 5, at most the number
    /// of servers). Buckets that exist keep their own setting.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: u8,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Show every agent's status record (the `collector_status` KV).
///
/// First a summary: how many agents, how many run each module version, how many are in
/// each health state. Health is `stale` when an agent has not written its record for
/// --stale-after, else `degraded` when an assigned module is pending (refused, not
/// downloaded...), else `probation` when a module is in its first health ticks, else
/// `ok`. Then one line per agent: its modules and versions (`*` marks probation), health,
/// its last refusal, and how long ago it was seen.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this agent.
    #[arg(long, value_name = "ID")]
    pc: Option<String>,

    /// Also list, per agent, the versions it rolled back and the modules pending.
    #[arg(long)]
    details: bool,

    /// Print the status records as a JSON array (sorted by PC id) instead.
    #[arg(long)]
    json: bool,

    /// How long without a new record before an agent counts as stale (for instance
    /// `90s`, `10m`).
    #[arg(long, value_name = "DURATION", default_value = "3m", value_parser = humantime::parse_duration)]
    stale_after: Duration,

    #[command(flatten)]
    nats: NatsArgs,
}

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    match args.command {
        FleetCommand::Status(args) => status(args),
        FleetCommand::Init(args) => init(args),
        FleetCommand::Credentials(args) => super::credentials::run(&args),
    }
}

/// The buckets `fleet init` creates, with the history each keeps: kanade's own as
/// kanade creates them, assignments with a few revisions to look back at, status with
/// only the latest record.
fn buckets() -> [(&'static str, i64); 6] {
    [
        (CONFIG_BUCKET, super::config::KANADE_HISTORY),
        (GROUPS_BUCKET, super::config::KANADE_HISTORY),
        (ASSIGNMENTS_BUCKET, super::module_fleet::ASSIGNMENTS_HISTORY),
        (STATUS_BUCKET, 1),
        (ROLLOUTS_BUCKET, super::rollout::ROLLOUTS_HISTORY),
        (TRUST_BUCKET, 1),
    ]
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let replicas = usize::from(args.replicas);
        for (bucket, history) in buckets() {
            let stream = format!("KV_{bucket}");
            match kv::stream_replicas(&js, &stream).await? {
                Some(n) => println!("{bucket}: already there ({})", copies(n)),
                None => {
                    kv::create_kv(&js, bucket, history, replicas).await?;
                    println!(
                        "{bucket}: created (history {history}, {})",
                        copies(replicas)
                    );
                }
            }
            match kv::harden(&js, bucket).await {
                Ok(changes) => {
                    for change in changes {
                        println!("{bucket}: {change}");
                    }
                }
                // The bucket works as it is; agents under the least-privilege template
                // need what this would have set, so say so and go on.
                Err(e) => eprintln!(
                    "warning: {bucket}: {e:#}; agents under docs/nats-server.conf need direct gets on it{}",
                    if bucket == STATUS_BUCKET {
                        ", and rollup headers refused"
                    } else {
                        ""
                    }
                ),
            }
        }
        match kv::stream_replicas(&js, MODULES_STREAM).await? {
            Some(n) => println!("{MODULES_STORE}: already there ({})", copies(n)),
            None => {
                kv::create_objects(&js, MODULES_STORE, replicas).await?;
                println!(
                    "{MODULES_STORE}: created (object store, {})",
                    copies(replicas)
                );
            }
        }
        Ok(())
    })
}

fn copies(replicas: usize) -> String {
    match replicas {
        0 | 1 => "1 replica".into(),
        n => format!("{n} replicas"),
    }
}

/// The records with their keys, sorted by key, and the keys whose record could not be
/// read.
type Records = (Vec<(String, AgentStatus)>, Vec<String>);

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let stale_after = chrono::Duration::from_std(args.stale_after)
        .map_err(|_| anyhow!("--stale-after: expected a duration of at most a few centuries"))?;
    if let Some(pc) = &args.pc {
        ops::check_name("--pc", pc)?;
    }
    let (records, unreadable) = ops::block_on(read_records(&args))?;
    if let Some(pc) = &args.pc
        && records.is_empty()
        && unreadable.is_empty()
    {
        anyhow::bail!("--pc {pc}: no status record in {STATUS_BUCKET} (the agent never reported)");
    }
    for problem in &unreadable {
        eprintln!("warning: {}", names::printable(problem, 500));
    }
    if args.json {
        // Exact, as stored: JSON escapes what a terminal would act on.
        let exact: Vec<&AgentStatus> = records.iter().map(|(_, r)| r).collect();
        println!("{}", serde_json::to_string_pretty(&exact)?);
        return Ok(());
    }
    // A record is an agent's say: every string in it is shown escaped, and it is listed
    // under its key (which only that agent may write), whatever PC it claims to be.
    let shown: Vec<AgentStatus> = records
        .into_iter()
        .map(|(key, record)| {
            if record.pc_id != key {
                eprintln!(
                    "warning: {STATUS_BUCKET} key {key}: its record names PC {}; listed under its key",
                    names::printable(&record.pc_id, 80)
                );
            }
            printable_record(key, record)
        })
        .collect();
    if args.pc.is_none() {
        let rollouts = ops::block_on(async {
            let js = ops::jetstream(&args.nats).await?;
            Ok(super::rollout::summary_lines(&js).await)
        })
        .unwrap_or_default();
        for line in rollouts {
            println!("rollout: {line}");
        }
    }
    print!("{}", report(&shown, Utc::now(), stale_after, args.details));
    Ok(())
}

/// A record with every string made safe for a terminal, and `pc_id` set to its key.
fn printable_record(key: String, mut r: AgentStatus) -> AgentStatus {
    let p = |s: &mut String, max: usize| *s = names::printable(s, max);
    r.pc_id = names::printable(&key, 128);
    p(&mut r.agent_version, 64);
    for m in &mut r.modules {
        p(&mut m.name, 80);
        p(&mut m.sha256, 80);
    }
    for b in &mut r.rolled_back {
        p(&mut b.name, 80);
        p(&mut b.reason, 500);
    }
    for w in &mut r.pending {
        p(&mut w.name, 80);
        p(&mut w.why, 500);
    }
    if let Some(f) = &mut r.last_refusal {
        p(&mut f.name, 80);
        p(&mut f.source, 200);
        p(&mut f.reason, 500);
    }
    r.refused_values = std::mem::take(&mut r.refused_values)
        .into_iter()
        .map(|(k, mut v)| {
            p(&mut v.reason, 500);
            (names::printable(&k, 200), v)
        })
        .collect();
    r
}

async fn read_records(args: &StatusArgs) -> anyhow::Result<Records> {
    let js = ops::jetstream(&args.nats).await?;
    let Some(store) = kv::open_kv(&js, STATUS_BUCKET).await? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let keys: Vec<String> = match &args.pc {
        Some(pc) => vec![pc.clone()],
        None => store
            .keys()
            .await
            .with_context(|| format!("cannot list the keys of {STATUS_BUCKET}"))?
            .try_collect()
            .await
            .with_context(|| format!("cannot list the keys of {STATUS_BUCKET}"))?,
    };
    // One request per record, a bounded number in flight: 1,000 agents cost a few
    // round trips of latency, not a thousand.
    let fetched: Vec<(String, anyhow::Result<Option<bytes::Bytes>>)> =
        futures_util::stream::iter(keys)
            .map(|key| {
                let store = &store;
                async move {
                    let value = store
                        .get(key.as_str())
                        .await
                        .with_context(|| format!("cannot read {STATUS_BUCKET} key {key}"));
                    (key, value)
                }
            })
            .buffer_unordered(PARALLEL_READS)
            .collect()
            .await;
    let mut records = Vec::with_capacity(fetched.len());
    let mut unreadable = Vec::new();
    for (key, value) in fetched {
        match value? {
            None => {}
            Some(bytes) => match record(&bytes) {
                Ok(record) => records.push((key, record)),
                Err(e) => unreadable.push(format!("{STATUS_BUCKET} key {key}: {e}; skipped")),
            },
        }
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    unreadable.sort();
    Ok((records, unreadable))
}

/// A status record, refused over [`kv::MAX_STATUS_RECORD`] bytes (what `fleet init`
/// caps the bucket at): an agent cannot make this command hold megabytes per record.
fn record(bytes: &[u8]) -> Result<AgentStatus, String> {
    let cap = usize::try_from(kv::MAX_STATUS_RECORD).unwrap_or(usize::MAX);
    if bytes.len() > cap {
        return Err(format!(
            "a record of {} bytes, over the {} KiB a status record may hold",
            bytes.len(),
            cap / 1024
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not a status record ({e})"))
}

/// The summary and the table.
fn report(
    records: &[AgentStatus],
    now: DateTime<Utc>,
    stale_after: chrono::Duration,
    details: bool,
) -> String {
    let mut out = String::new();
    if records.is_empty() {
        let _ = writeln!(out, "agents: 0 (no record in {STATUS_BUCKET})");
        return out;
    }
    let mut health: Vec<(&str, usize)> = ["ok", "probation", "degraded", "stale"]
        .into_iter()
        .map(|h| (h, 0))
        .collect();
    let mut versions: BTreeMap<(&str, u64), (usize, usize)> = BTreeMap::new();
    for r in records {
        let h = r.health(now, stale_after);
        match health.iter_mut().find(|(name, _)| *name == h) {
            Some((_, n)) => *n += 1,
            None => health.push((h, 1)),
        }
        for m in &r.modules {
            let count = versions.entry((&m.name, m.version)).or_default();
            count.0 += 1;
            count.1 += usize::from(m.probation);
        }
    }
    let health_line: Vec<String> = health.iter().map(|(h, n)| format!("{h} {n}")).collect();
    let _ = writeln!(
        out,
        "agents: {} ({})",
        records.len(),
        health_line.join(", ")
    );
    let _ = writeln!(out, "modules:");
    if versions.is_empty() {
        let _ = writeln!(out, "  none running");
    }
    for ((name, version), (n, probation)) in &versions {
        let on_probation = if *probation > 0 {
            format!(" ({probation} on probation)")
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {name} v{version}: {n}{on_probation}");
    }
    // Which trust root each agent holds: a rotation's progress, a forgotten renewal.
    let mut roots: BTreeMap<u64, (usize, usize, usize)> = BTreeMap::new();
    for t in records.iter().filter_map(|r| r.trust.as_ref()) {
        let count = roots.entry(t.version).or_default();
        count.0 += 1;
        count.1 += usize::from(t.state == "expiring");
        count.2 += usize::from(t.state == "expired");
    }
    if !roots.is_empty() {
        let _ = writeln!(out, "trust roots:");
        for (version, (n, expiring, expired)) in roots.iter().rev() {
            let mut notes = Vec::new();
            if *expiring > 0 {
                notes.push(format!("{expiring} expiring: publish a renewed root"));
            }
            if *expired > 0 {
                notes.push(format!("{expired} EXPIRED: new bundles refused"));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            };
            let _ = writeln!(out, "  v{version}: {n}{notes}");
        }
    }
    let _ = writeln!(out);

    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            let modules: Vec<String> = r
                .modules
                .iter()
                .map(|m| {
                    format!(
                        "{} v{}{}",
                        m.name,
                        m.version,
                        if m.probation { "*" } else { "" }
                    )
                })
                .collect();
            let refusal = r.last_refusal.as_ref().map_or_else(
                || "-".to_string(),
                |f| short(&format!("{} v{}: {}", f.name, f.version, f.reason)),
            );
            [
                r.pc_id.clone(),
                if modules.is_empty() {
                    "-".into()
                } else {
                    modules.join(", ")
                },
                r.health(now, stale_after).to_string(),
                r.trust.as_ref().map_or_else(
                    || "-".to_string(),
                    |t| match t.state.as_str() {
                        "ok" => format!("v{}", t.version),
                        "expired" => format!("v{} EXPIRED", t.version),
                        other => format!("v{} {other}", t.version),
                    },
                ),
                refusal,
                ops::age(now, r.last_seen),
            ]
        })
        .collect();
    let header = [
        "PC",
        "MODULES (* probation)",
        "HEALTH",
        "ROOT",
        "LAST REFUSAL",
        "LAST SEEN",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 5 {
                l.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                let _ = write!(l, "{cell}{}  ", " ".repeat(pad));
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(header));
    for (row, record) in rows.iter().zip(records) {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
        if details {
            for b in &record.rolled_back {
                let _ = writeln!(
                    out,
                    "    rolled back: {} v{} at {}: {}",
                    b.name,
                    b.version,
                    ops::rfc3339(b.at),
                    b.reason
                );
            }
            for b in &record.revoked {
                let _ = writeln!(
                    out,
                    "    revoked: {} v{} at {}: {}",
                    b.name,
                    b.version,
                    ops::rfc3339(b.at),
                    b.reason
                );
            }
            if let Some(t) = &record.trust {
                let expires = t.expires_at.map_or_else(
                    || "never expires".to_string(),
                    |at| format!("expires {}", ops::rfc3339(at)),
                );
                let _ = writeln!(
                    out,
                    "    trust root: v{} ({}, {expires})",
                    t.version, t.state
                );
                if let Some(f) = &t.refused {
                    let _ = writeln!(
                        out,
                        "    trust root refused at {}: {}",
                        ops::rfc3339(f.at),
                        f.reason
                    );
                }
            }
            for p in &record.pending {
                let _ = writeln!(out, "    pending: {} v{}: {}", p.name, p.version, p.why);
            }
            for (key, v) in &record.refused_values {
                let _ = writeln!(
                    out,
                    "    refused value: {key} revision {}: {} (the last good value stays)",
                    v.revision, v.reason
                );
            }
            if let Some(f) = &record.last_refusal {
                let _ = writeln!(
                    out,
                    "    last refusal: {} v{} from {} at {}: {}",
                    f.name,
                    f.version,
                    f.source,
                    ops::rfc3339(f.at),
                    f.reason
                );
            }
        }
    }
    out
}

/// `text` cut to [`SHORT_REASON`] characters on one line.
fn short(text: &str) -> String {
    let one_line = text.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= SHORT_REASON {
        one_line
    } else {
        let cut: String = one_line.chars().take(SHORT_REASON - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use collector_fleet::status::{ModuleStatus, Pending, Refusal};

    fn module(name: &str, version: u64, probation: bool, now: DateTime<Utc>) -> ModuleStatus {
        ModuleStatus {
            name: name.into(),
            version,
            sha256: "00".into(),
            since: now,
            probation,
            traps: 0,
            health: None,
            previous: None,
        }
    }

    #[test]
    fn the_report_summarises_then_lists_each_agent() {
        let now: DateTime<Utc> = "2026-11-27T12:00:00Z".parse().unwrap();
        let a = AgentStatus {
            pc_id: "pc-a".into(),
            last_seen: now - chrono::Duration::seconds(5),
            modules: vec![module("process-perf", 7, true, now)],
            ..Default::default()
        };
        let b = AgentStatus {
            pc_id: "pc-b".into(),
            last_seen: now - chrono::Duration::minutes(10),
            modules: vec![module("process-perf", 6, false, now)],
            last_refusal: Some(Refusal {
                name: "top-memory".into(),
                version: 3,
                source: "collector_modules/top-memory/3".into(),
                reason: "signed by no trusted key, 1 required (the bundle carries no signature)"
                    .into(),
                at: now,
            }),
            pending: vec![Pending {
                name: "top-memory".into(),
                version: 3,
                why: "refused".into(),
            }],
            ..Default::default()
        };
        let text = report(&[a, b], now, chrono::Duration::minutes(3), true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "agents: 2 (ok 0, probation 1, degraded 0, stale 1)"
        );
        assert_eq!(lines[2], "  process-perf v6: 1");
        assert_eq!(lines[3], "  process-perf v7: 1 (1 on probation)");
        assert!(
            lines[5].starts_with("PC    MODULES (* probation)"),
            "{text}"
        );
        assert!(lines[6].starts_with("pc-a  process-perf v7*"), "{text}");
        assert!(lines[6].ends_with("5s ago"), "{text}");
        assert!(lines[7].contains(" stale "), "{text}");
        assert!(
            lines[7].contains("top-memory v3: signed by no trusted key, 1 requ…"),
            "{text}"
        );
        assert!(
            text.contains("    pending: top-memory v3: refused\n"),
            "{text}"
        );
    }
}
