//! Trust roots at fleet scale. Every agent runs the root follower next to its watch, as
//! `collector run` does, and holds version 0 (its `--trust signer.pub` key). The
//! security team, through the real `collector` binary, makes two root keys and a second
//! signing key, writes root v1 (root keys root1 and root2, 2 of 2; signing keys signer
//! and signer2), signs it with root1, root2 and signer (the root key of version 0) and
//! publishes it: every agent must hold v1 soon after. Once the version each agent runs
//! has passed its probation (so it is its last-known-good), a process-perf version
//! signed by signer2 alone runs everywhere, off probation too, and root v2 revokes
//! signer2: every agent must stop that version, list it as revoked and run the version
//! it ran before (the earlier good one) instead. Last, the operator assigns that
//! version again, which every agent must take without a pending refusal left.
//!
//! Times run from the publishing command's return to the moment the server stored the
//! status record that says so (the record's own timestamp, as for the steps).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Operator, Result, Statuses, percentile, wait_for, with_marker};

/// The module whose signer is revoked.
const MODULE: &str = "process-perf";
/// Every agent on root v1 within this, at p99.
const ADOPT_P99: f64 = 5.0;
/// The revoked key's version gone from every agent within this.
const REVOKE_MAX: f64 = 10.0;

/// What the scenario needs of the simulation.
pub struct Env<'a> {
    pub operator: &'a Operator,
    pub statuses: &'a Arc<Mutex<Statuses>>,
    pub pcs: &'a [String],
    pub work: &'a Path,
    /// How long a step may take before its laggards count as stuck.
    pub timeout: Duration,
    /// A full run: a missed target fails it (in smoke mode only stuck agents do).
    pub full: bool,
    /// Set process_perf to every second first (the staged rollouts did not).
    pub fast_ticks: bool,
}

/// What a row is held to.
#[derive(Debug, Clone, Copy)]
enum Target {
    P99(f64),
    Max(f64),
}

/// One measured step.
pub struct Row {
    name: String,
    /// Agents measured.
    agents: usize,
    /// Seconds from the operator's command returning to each agent's record, and the
    /// agent, sorted by time ([`Row::finish`]).
    samples: Vec<(f64, String)>,
    /// The seconds alone, sorted.
    times: Vec<f64>,
    target: Option<Target>,
    stuck: Vec<String>,
}

impl Row {
    fn quantile(&self, p: f64) -> String {
        percentile(&self.times, p).map_or("-".into(), |v| format!("{v:.2} s"))
    }

    fn target_text(&self) -> String {
        match self.target {
            Some(Target::P99(s)) => format!("p99 ≤ {s:.0} s"),
            Some(Target::Max(s)) => format!("all ≤ {s:.0} s"),
            None => "-".into(),
        }
    }

    /// Whether it met its target (none when it has none): every agent there, in time.
    fn met(&self) -> Option<bool> {
        let (p, limit) = match self.target? {
            Target::P99(s) => (99.0, s),
            Target::Max(s) => (100.0, s),
        };
        Some(self.stuck.is_empty() && percentile(&self.times, p).is_some_and(|v| v <= limit))
    }

    /// Sorts what was measured.
    fn finish(&mut self) {
        self.samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.times = self.samples.iter().map(|(t, _)| *t).collect();
    }

    /// The agents over the target's limit: how many, and the slowest few.
    fn late(&self) -> String {
        let limit = match self.target {
            Some(Target::P99(s) | Target::Max(s)) => s,
            None => return String::new(),
        };
        let over = self.samples.iter().filter(|(t, _)| *t > limit).count();
        let slowest: Vec<String> = self
            .samples
            .iter()
            .rev()
            .take(5)
            .map(|(t, pc)| format!("{pc} {t:.2} s"))
            .collect();
        format!(
            "{over} agents over {limit:.0} s; slowest: {}",
            slowest.join(", ")
        )
    }

    fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.name,
            self.agents,
            self.quantile(50.0),
            self.quantile(90.0),
            self.quantile(99.0),
            self.quantile(100.0),
            self.target_text(),
            self.met().map_or("-", |m| if m { "yes" } else { "NO" }),
            self.stuck.len()
        )
    }
}

/// The scenario's outcome.
#[derive(Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// The version signed by the revoked key.
    revoked_version: Option<u64>,
    /// Agents whose record lists that version among its revoked modules.
    listed: usize,
    /// What replaced it (none: the module stopped) → agents.
    replaced_by: BTreeMap<Option<u64>, usize>,
    /// Agents where it was replaced by the version they ran before it.
    replaced_as_expected: usize,
    /// Seconds the whole scenario took.
    seconds: f64,
    pub failures: Vec<String>,
}

/// Runs the scenario: `component` (the default guest) is signed by the second signing
/// key as process-perf `version`, with a rollback floor at `current`, the version every
/// agent runs. Errors of the operator's commands end it early, as failures.
pub fn run(env: &Env<'_>, component: &[u8], current: u64, version: u64) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome::default();
    eprintln!("fleet-sim: trust roots");
    if let Err(e) = scenario(env, component, current, version, &mut out) {
        out.failures.push(format!("trust roots: {e}"));
    }
    out.seconds = started.elapsed().as_secs_f64();
    for row in &out.rows {
        if !row.stuck.is_empty() {
            out.failures.push(format!(
                "trust roots, {}: {} agents stuck (first: {})",
                row.name,
                row.stuck.len(),
                row.stuck
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else if env.full && row.met() == Some(false) {
            out.failures.push(format!(
                "trust roots, {}: target missed ({}; p99 {}, max {}; {})",
                row.name,
                row.target_text(),
                row.quantile(99.0),
                row.quantile(100.0),
                row.late()
            ));
        }
    }
    out
}

fn scenario(
    env: &Env<'_>,
    component: &[u8],
    current: u64,
    version: u64,
    out: &mut Outcome,
) -> Result<()> {
    let op = env.operator;
    // The security team's keys: `signer` (version 0, the agents' --trust key) exists.
    for key in ["root1", "root2", "signer2"] {
        op.run(&["module", "keygen", "--out", key])?;
    }
    op.run(&[
        "trust",
        "init",
        "--root-key",
        "root1.pub",
        "--root-key",
        "root2.pub",
        "--root-threshold",
        "2",
        "--signing-key",
        "signer.pub",
        "--signing-key",
        "signer2.pub",
        "--out",
        "v1.root",
    ])?;
    op.run(&[
        "trust", "sign", "v1.root", "--key", "root1", "--key", "root2", "--key", "signer",
    ])?;

    // 1. Adoption: every agent from version 0 to root v1.
    let all: BTreeSet<String> = env.pcs.iter().cloned().collect();
    let holds = |s: &Statuses, pc: &str, v: u64| s.trust.get(pc).copied().flatten() >= Some(v);
    let begun = Instant::now();
    op.run(&["trust", "publish", "v1.root"])?;
    let t0 = Instant::now();
    let _ = wait_for(env.statuses, env.timeout, |s| {
        all.iter().all(|pc| holds(s, pc, 1))
    });
    out.rows.push(trust_row(
        env,
        "root v1 taken (from version 0)",
        (begun, t0),
        1,
        Some(Target::P99(ADOPT_P99)),
    ));

    // 2. A version signed by signer2 alone, everywhere and off probation: it is then each
    // agent's last-known-good, the version it ran before an earlier good one.
    if env.fast_ticks {
        op.run(&["config", "set", "host_perf_interval=1s"])?;
    }
    // What each agent runs must have passed its probation first (after the steps'
    // rollback by assignment or a halted rollout's revert it may not have yet): then it
    // is the agent's last-known-good, the earlier good version the revocation brings
    // back, and not the one before it.
    let off_probation = |s: &Statuses, pc: &str, v: u64| {
        s.records.get(pc).is_some_and(|r| {
            r.modules
                .iter()
                .any(|m| m.name == MODULE && m.version == v && !m.probation)
        })
    };
    if wait_for(env.statuses, env.timeout, |s| {
        all.iter().all(|pc| off_probation(s, pc, current))
    })
    .is_err()
    {
        let s = env.statuses.lock().unwrap();
        let left: Vec<&String> = all
            .iter()
            .filter(|pc| !off_probation(&s, pc, current))
            .collect();
        return Err(format!(
            "{} agents not running v{current} off probation before the version signed by \
             signer2 (first: {:?})",
            left.len(),
            left.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let v = version.to_string();
    let floor = current.to_string();
    let file = format!("{MODULE}-{version}.wasm");
    std::fs::write(env.work.join(&file), with_marker(component, version))
        .map_err(|e| format!("{file}: {e}"))?;
    let bundle = format!("{MODULE}-{version}.bundle");
    op.run(&[
        "module",
        "sign",
        "--key",
        "signer2",
        "--name",
        MODULE,
        "--version",
        &v,
        &file,
        "--out",
        &bundle,
        "--rollback-floor",
        &floor,
    ])?;
    // Checked against the key that signed it: the agents check it against root v1.
    op.run(&["module", "publish", "--trust", "signer2.pub", &bundle])?;
    let before: BTreeMap<String, Option<u64>> = {
        let s = env.statuses.lock().unwrap();
        env.pcs
            .iter()
            .map(|pc| (pc.clone(), running(&s, pc)))
            .collect()
    };
    let settled = |s: &Statuses, pc: &str| off_probation(s, pc, version);
    let begun = Instant::now();
    op.run(&["module", "rollout", MODULE, &v, "--global"])?;
    let t0 = Instant::now();
    let _ = wait_for(env.statuses, env.timeout, |s| {
        all.iter().all(|pc| settled(s, pc))
    });
    let row = {
        let s = env.statuses.lock().unwrap();
        let mut row = Row {
            name: format!("v{version} signed by signer2 everywhere (then off probation)"),
            agents: env.pcs.len(),
            samples: Vec::new(),
            times: Vec::new(),
            target: None,
            stuck: Vec::new(),
        };
        for pc in env.pcs {
            let first = s
                .changes
                .iter()
                .find(|(at, who, m)| *at >= begun && who == pc && m.get(MODULE) == Some(&version));
            match first {
                Some((at, _, _)) if settled(&s, pc) => row
                    .samples
                    .push((at.saturating_duration_since(t0).as_secs_f64(), pc.clone())),
                _ => row.stuck.push(pc.clone()),
            }
        }
        row.finish();
        row
    };
    report(&row);
    let rolled_out = row.stuck.is_empty();
    out.rows.push(row);
    if !rolled_out {
        return Err(format!(
            "v{version} did not reach every agent: its revocation is not measured"
        ));
    }

    // 3. Revocation: root v2 revokes signer2; its version must go from every agent.
    op.run(&[
        "trust",
        "revoke",
        "v1.root",
        "--key",
        "signer2.pub",
        "--out",
        "v2.root",
    ])?;
    op.run(&[
        "trust", "sign", "v2.root", "--key", "root1", "--key", "root2",
    ])?;
    let begun = Instant::now();
    op.run(&["trust", "publish", "v2.root"])?;
    let t0 = Instant::now();
    let gone = |s: &Statuses, pc: &str| holds(s, pc, 2) && running(s, pc) != Some(version);
    let _ = wait_for(env.statuses, env.timeout, |s| {
        all.iter().all(|pc| gone(s, pc))
    });
    // The record that stops it may come a moment after the one that takes the root.
    out.rows.push(trust_row(
        env,
        "root v2 taken (revokes signer2)",
        (begun, t0),
        2,
        None,
    ));
    let row = {
        let s = env.statuses.lock().unwrap();
        let mut row = Row {
            name: format!("v{version} gone (signer2 revoked)"),
            agents: env.pcs.len(),
            samples: Vec::new(),
            times: Vec::new(),
            target: Some(Target::Max(REVOKE_MAX)),
            stuck: Vec::new(),
        };
        for pc in env.pcs {
            let first = s
                .changes
                .iter()
                .find(|(at, who, m)| *at >= begun && who == pc && m.get(MODULE) != Some(&version));
            match first {
                Some((at, _, _)) if running(&s, pc) != Some(version) => row
                    .samples
                    .push((at.saturating_duration_since(t0).as_secs_f64(), pc.clone())),
                _ => row.stuck.push(pc.clone()),
            }
        }
        row.finish();
        row
    };
    report(&row);
    out.rows.push(row);

    // What each agent says of it: listed as revoked, replaced by the version it ran
    // before (its earlier good version).
    out.revoked_version = Some(version);
    let s = env.statuses.lock().unwrap();
    let mut unlisted = Vec::new();
    let mut unexpected = Vec::new();
    for pc in env.pcs {
        let listed = s.records.get(pc).is_some_and(|r| {
            r.revoked
                .iter()
                .any(|m| m.name == MODULE && m.version == version)
        });
        if listed {
            out.listed += 1;
        } else {
            unlisted.push(pc.clone());
        }
        let now = running(&s, pc);
        *out.replaced_by.entry(now).or_default() += 1;
        let expected = before.get(pc).copied().flatten();
        if now == expected {
            out.replaced_as_expected += 1;
        } else {
            unexpected.push(format!(
                "{pc} runs {}, ran v{} before",
                now.map_or("nothing".into(), |v| format!("v{v}")),
                expected.map_or("-".into(), |v| v.to_string())
            ));
        }
    }
    drop(s);
    if !unlisted.is_empty() {
        out.failures.push(format!(
            "trust roots: {} agents do not list {MODULE} v{version} as revoked (first: {})",
            unlisted.len(),
            unlisted
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !unexpected.is_empty() {
        out.failures.push(format!(
            "trust roots: {} agents did not go back to the version they ran before v{version} (first: {})",
            unexpected.len(),
            unexpected
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }

    // 4. The operator assigns the earlier good version again: the revoked one stays
    // assigned, refused by every agent (pending, so `degraded`) until then.
    op.run(&["module", "rollout", MODULE, &floor, "--global"])?;
    let clear = |s: &Statuses, pc: &str| {
        running(s, pc) == Some(current)
            && s.records
                .get(pc)
                .is_some_and(|r| r.pending.iter().all(|p| p.name != MODULE))
    };
    if wait_for(env.statuses, env.timeout, |s| {
        all.iter().all(|pc| clear(s, pc))
    })
    .is_err()
    {
        let s = env.statuses.lock().unwrap();
        let left: Vec<&String> = all.iter().filter(|pc| !clear(&s, pc)).collect();
        out.failures.push(format!(
            "trust roots: {} agents still list {MODULE} as pending (or do not run v{current}) \
             after its assignment went back to v{current} (first: {:?})",
            left.len(),
            left.iter().take(5).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

/// The version of [`MODULE`] `pc` runs, as last reported.
fn running(s: &Statuses, pc: &str) -> Option<u64> {
    s.now.get(pc).and_then(|m| m.get(MODULE)).copied()
}

/// Each agent's time to report root `version` (or a later one), from `t0`, counting the
/// records stored since `begun`; those that do not hold it now are stuck.
fn trust_row(
    env: &Env<'_>,
    name: &str,
    (begun, t0): (Instant, Instant),
    version: u64,
    target: Option<Target>,
) -> Row {
    let s = env.statuses.lock().unwrap();
    let mut row = Row {
        name: name.into(),
        agents: env.pcs.len(),
        samples: Vec::new(),
        times: Vec::new(),
        target,
        stuck: Vec::new(),
    };
    for pc in env.pcs {
        let first = s
            .trust_changes
            .iter()
            .find(|(at, who, v)| *at >= begun && who == pc && *v >= Some(version));
        let holds = s.trust.get(pc).copied().flatten() >= Some(version);
        match first {
            Some((at, _, _)) if holds => row
                .samples
                .push((at.saturating_duration_since(t0).as_secs_f64(), pc.clone())),
            _ => row.stuck.push(pc.clone()),
        }
    }
    row.finish();
    drop(s);
    report(&row);
    row
}

/// A row, as measured, on stderr.
fn report(row: &Row) {
    eprintln!(
        "fleet-sim: trust roots: {}: {} agents, p50 {}, p90 {}, p99 {}, max {}, {} stuck",
        row.name,
        row.agents,
        row.quantile(50.0),
        row.quantile(90.0),
        row.quantile(99.0),
        row.quantile(100.0),
        row.stuck.len()
    );
}

/// The rows as a Markdown table, and what the agents said of the revoked version.
pub fn table(o: &Outcome, agents: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{agents} agents; times from the command's return (`collector trust publish`, or \
         `collector module rollout` for the version signed by signer2) to the stored \
         status record; scenario {:.1} s.\n",
        o.seconds
    );
    let _ = writeln!(
        t,
        "| step | agents | p50 | p90 | p99 | max | target | met | stuck |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---|---|---:|");
    for row in &o.rows {
        let _ = writeln!(t, "{}", row.line());
    }
    if let Some(version) = o.revoked_version {
        let replaced: Vec<String> = o
            .replaced_by
            .iter()
            .map(|(v, n)| match v {
                Some(v) => format!("v{v} on {n}"),
                None => format!("stopped on {n}"),
            })
            .collect();
        let _ = writeln!(
            t,
            "\nAfter the revocation, {} of {agents} agents list {MODULE} v{version} among \
             their revoked modules; it was replaced by {} ({} agents back on the version \
             they ran before it, their earlier good version).",
            o.listed,
            replaced.join(", "),
            o.replaced_as_expected
        );
    }
    for f in &o.failures {
        let _ = writeln!(t, "\nFAILED: {f}");
    }
    t
}

/// The BENCHMARKS.md section, without its heading.
pub fn section(o: &Outcome, agents: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "`cargo xtask cluster up && cargo xtask fleet-sim --agents {agents} --write` \
         (release build), after the staged rollouts (`--trust-roots off` skips it); \
         `cargo xtask test` runs a smoke version (20 agents). Every agent follows the \
         fleet's trust roots (`collector_trust`) as `collector run` does, from version 0: \
         the `--trust signer.pub` key it was started with. The security team makes root \
         keys root1 and root2 and a second signing key signer2 (`collector module \
         keygen`), writes root v1 (`collector trust init`: root keys root1 and root2, 2 \
         of 2 to sign a root; signing keys signer and signer2), signs it with root1, \
         root2 and signer (version 0's root key) and publishes it (`collector trust \
         publish`): target, every agent on v1 within {ADOPT_P99:.0} s at p99. Once the \
         version each agent runs has passed its probation, a new {MODULE} version signed \
         by signer2 alone is rolled out everywhere and left to pass its own; root v2 (`collector trust revoke v1.root --key \
         signer2.pub`, signed by root1 and root2) revokes signer2: target, that version \
         gone from every agent within {REVOKE_MAX:.0} s, each listing it as revoked and \
         running the version it ran before (its earlier good version); an agent's record \
         that takes root v2 is the one that stops it. Times run from the publishing \
         command's return until the server stored the status record saying so. Last, the \
         assignment goes back to the earlier good version, as an operator would, and \
         every agent must stop listing the refused one as pending. A stuck agent fails the \
         run, and in a full run so does a missed target.\n"
    );
    s.push_str(&table(o, agents));
    s
}
