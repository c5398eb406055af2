//! Staged rollouts at fleet scale: `collector rollout start` with waves and a bake time,
//! a controller (`collector rollout run`, the real binary) moving it, and the agents of
//! the simulation placing themselves and reporting health. One scenario per version
//! rolled out: a good one (completes), and bad ones built with a fault (`trap`: traps a
//! few ticks after probation on 30% of machines; `silent`: stops publishing; `cpu`:
//! spends about 10x the CPU per tick), each of which must be halted in the first wave
//! that holds a failing agent and sent back within 10 s. A scenario can kill the
//! controller at a random moment and start another: the outcome must not change.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use collector_fleet::rollout::{Phase, ROLLOUTS_BUCKET, Rollout, parse_plan};

use super::{Operator, Result, Statuses, with_marker};

/// The plan every scenario uses.
pub const WAVES: &str = "1%,10%,50%,100%";
/// How long a halted scenario's agents may take to be back on the old version.
const REVERT_LIMIT: f64 = 10.0;
/// Slack on top of the bakes for a good rollout to complete.
const COMPLETE_SLACK: f64 = 10.0;

/// What a scenario rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The default guest, unchanged.
    Good,
    /// A fault build of it (`trap`, `silent`, `cpu`).
    Bad(&'static str),
}

impl Kind {
    /// Parses `good`, `trap`, `silent` or `cpu`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "good" => Some(Self::Good),
            "trap" => Some(Self::Bad("trap")),
            "silent" => Some(Self::Bad("silent")),
            "cpu" => Some(Self::Bad("cpu")),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Bad(k) => k,
        }
    }

    /// The gate that must halt it.
    fn gate(self) -> Option<&'static str> {
        match self {
            Self::Good => None,
            Self::Bad("trap") => Some("failures"),
            Self::Bad("silent") => Some("data-plane"),
            Self::Bad(_) => Some("cpu"),
        }
    }

    /// Whether `pc` misbehaves on this version (the fault builds' own rule).
    fn fails_on(self, pc: &str) -> bool {
        match self {
            Self::Good => false,
            Self::Bad("trap") => fnv1a(pc.as_bytes()) % 100 < 30,
            Self::Bad(_) => true,
        }
    }
}

/// FNV-1a, 32 bits: how the `fault-trap` build picks its machines.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(16_777_619)
    })
}

/// One scenario's outcome.
pub struct Scenario {
    pub name: String,
    pub kind: Kind,
    pub phase: String,
    pub gate: Option<String>,
    /// The wave it halted (or completed) in, 1-based, and that wave's label.
    pub wave: usize,
    pub wave_label: String,
    /// The first wave holding an agent the fault hits, 1-based (bad versions).
    pub expected_wave: Option<usize>,
    /// Agents the halting wave placed on the new version.
    pub wave_size: usize,
    /// Agents that ran the new version at any time.
    pub ran_new: usize,
    /// Seconds from `rollout start` returning to completion or halt.
    pub seconds: f64,
    /// Sum of the bakes plus the slack (good versions).
    pub budget: f64,
    /// Seconds from the first agent running the new version to the halt.
    pub to_halt: Option<f64>,
    /// Seconds from the halt until the last agent that ran it is back on `from`.
    pub to_revert: Option<f64>,
    pub stuck: Vec<String>,
    /// When the controller was killed (seconds after the start), if it was.
    pub killed_at: Option<f64>,
    /// Agents on the new version over time (seconds since the start, count).
    pub curve: Vec<(f64, usize)>,
    pub failures: Vec<String>,
}

/// A controller process, killed on drop.
struct Controller(Child);

impl Controller {
    fn start(operator: &Operator) -> Result<Self> {
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["rollout", "run"])
            .env("NATS_URL", &operator.urls)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Self)
            .map_err(|e| format!("cannot start the controller: {e}"))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a scenario needs of the simulation.
pub struct Env<'a> {
    pub operator: &'a Operator,
    pub runtime: &'a tokio::runtime::Runtime,
    pub observer: &'a async_nats::Client,
    pub statuses: &'a Arc<Mutex<Statuses>>,
    pub pcs: &'a [String],
    pub work: &'a Path,
    pub bake: Duration,
    pub timeout: Duration,
}

fn read_rollout(env: &Env<'_>) -> Option<Rollout> {
    env.runtime.block_on(async {
        let js = async_nats::jetstream::new(env.observer.clone());
        let kv = js.get_key_value(ROLLOUTS_BUCKET).await.ok()?;
        let bytes = kv.get("process-perf").await.ok()??;
        Rollout::from_json(&bytes).ok()
    })
}

/// Signs `component` as process-perf `version` (rollback floor `floor`) and publishes it.
fn publish(env: &Env<'_>, component: &[u8], version: u64, floor: u64) -> Result<()> {
    let v = version.to_string();
    let f = floor.to_string();
    let file = format!("process-perf-{version}.wasm");
    std::fs::write(env.work.join(&file), with_marker(component, version))
        .map_err(|e| e.to_string())?;
    let bundle = format!("process-perf-{version}.bundle");
    env.operator.run(&[
        "module",
        "sign",
        "--key",
        "signer",
        "--name",
        "process-perf",
        "--version",
        &v,
        &file,
        "--out",
        &bundle,
        "--rollback-floor",
        &f,
    ])?;
    env.operator
        .run(&["module", "publish", "--trust", "signer.pub", &bundle])?;
    Ok(())
}

/// Rolls `component` out as `to` over agents on `from`; `kill_at` kills the controller
/// that long after the start and starts another a second later.
pub fn run(
    env: &Env<'_>,
    kind: Kind,
    component: &[u8],
    from: u64,
    to: u64,
    kill_at: Option<Duration>,
) -> Result<Scenario> {
    let name = match kill_at {
        Some(_) => format!("{} v{to}, controller killed", kind.label()),
        None => format!("{} v{to}", kind.label()),
    };
    eprintln!("fleet-sim: staged rollout: {name}");
    publish(env, component, to, from)?;
    let mut controller = Some(Controller::start(env.operator)?);
    let bake = format!("{}ms", env.bake.as_millis());
    let v = to.to_string();
    env.operator.run(&[
        "rollout",
        "start",
        "process-perf",
        &v,
        "--global",
        "--waves",
        WAVES,
        "--bake",
        &bake,
    ])?;
    let t0 = Instant::now();
    let waves = parse_plan(WAVES).expect("the plan parses");
    let budget = env.bake.as_secs_f64() * waves.len() as f64 + COMPLETE_SLACK;
    let deadline = t0 + env.timeout + Duration::from_secs_f64(budget);
    let mut curve = Vec::new();
    let mut killed_at = None;
    let on = |s: &Statuses, pc: &str, v: u64| {
        s.now
            .get(pc)
            .and_then(|m| m.get("process-perf"))
            .is_some_and(|x| *x == v)
    };
    let (r, ended) = loop {
        let count = {
            let s = env.statuses.lock().unwrap();
            env.pcs.iter().filter(|pc| on(&s, pc, to)).count()
        };
        curve.push((t0.elapsed().as_secs_f64(), count));
        if let Some(after) = kill_at
            && killed_at.is_none()
            && t0.elapsed() >= after
        {
            drop(controller.take());
            killed_at = Some(t0.elapsed().as_secs_f64());
            eprintln!(
                "fleet-sim: controller killed {:.1} s into the rollout",
                t0.elapsed().as_secs_f64()
            );
            std::thread::sleep(Duration::from_secs(1));
            controller = Some(Controller::start(env.operator)?);
        }
        let r = read_rollout(env).filter(|r| r.to == to);
        if let Some(r) = r.filter(|r| !r.phase.active()) {
            break (r, Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: the rollout neither completed nor halted in time"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = ended.duration_since(t0).as_secs_f64();
    // Agents that ran the new version, from every record stored since the start.
    let ran: BTreeSet<String> = {
        let s = env.statuses.lock().unwrap();
        s.changes
            .iter()
            .filter(|(at, _, m)| *at >= t0 && m.get("process-perf") == Some(&to))
            .map(|(_, pc, _)| pc.clone())
            .collect()
    };
    let first_on_new = {
        let s = env.statuses.lock().unwrap();
        s.changes
            .iter()
            .filter(|(at, _, m)| *at >= t0 && m.get("process-perf") == Some(&to))
            .map(|(at, _, _)| *at)
            .min()
    };
    let mut failures = Vec::new();
    let halted = r.phase == Phase::Halted;
    let placed = |wave: usize| -> BTreeSet<String> {
        let mut at = r.clone();
        at.wave = wave;
        let p = at.placement();
        env.pcs
            .iter()
            .filter(|pc| p.places(pc, &[]))
            .cloned()
            .collect()
    };
    let expected_wave = (kind != Kind::Good).then(|| {
        (0..waves.len())
            .find(|w| placed(*w).iter().any(|pc| kind.fails_on(pc)))
            .map_or(waves.len(), |w| w + 1)
    });
    let wave_size = placed(r.wave).len();
    let mut to_revert = None;
    let mut stuck = Vec::new();
    if halted {
        // Every agent that ran it back on `from`, within the limit.
        let limit = Instant::now() + Duration::from_secs_f64(REVERT_LIMIT * 3.0);
        loop {
            let s = env.statuses.lock().unwrap();
            let left: Vec<String> = ran.iter().filter(|pc| !on(&s, pc, from)).cloned().collect();
            drop(s);
            if left.is_empty() {
                to_revert = Some(ended.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > limit {
                stuck = left;
                break;
            }
            let count = {
                let s = env.statuses.lock().unwrap();
                env.pcs.iter().filter(|pc| on(&s, pc, to)).count()
            };
            curve.push((t0.elapsed().as_secs_f64(), count));
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        let limit = Instant::now() + env.timeout;
        loop {
            let s = env.statuses.lock().unwrap();
            let left: Vec<String> = env
                .pcs
                .iter()
                .filter(|pc| !on(&s, pc, to))
                .cloned()
                .collect();
            drop(s);
            if left.is_empty() || Instant::now() > limit {
                stuck = left;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(controller);
    let gate = r.halt.as_ref().map(|h| h.gate.clone());
    match kind {
        Kind::Good => {
            if r.phase != Phase::Completed {
                failures.push(format!(
                    "{name}: {:?}, not completed: {}",
                    r.phase,
                    r.halt.as_ref().map_or("", |h| h.reason.as_str())
                ));
            }
            if seconds > budget {
                failures.push(format!(
                    "{name}: took {seconds:.1} s, over the {budget:.0} s of its bakes plus {COMPLETE_SLACK} s"
                ));
            }
        }
        Kind::Bad(_) => {
            if !halted {
                failures.push(format!("{name}: not halted ({:?})", r.phase));
            }
            if gate.as_deref() != kind.gate() {
                failures.push(format!(
                    "{name}: halted by {gate:?}, expected the {} gate",
                    kind.gate().unwrap_or_default()
                ));
            }
            if Some(r.wave + 1) != expected_wave {
                failures.push(format!(
                    "{name}: halted in wave {}, expected wave {} (the first that holds a failing agent)",
                    r.wave + 1,
                    expected_wave.unwrap_or_default()
                ));
            }
            if ran.len() > wave_size {
                failures.push(format!(
                    "{name}: {} agents ran it, more than the {wave_size} of the halting wave",
                    ran.len()
                ));
            }
            if to_revert.is_none_or(|t| t > REVERT_LIMIT) {
                failures.push(format!(
                    "{name}: agents back on v{from} after {:?} s (at most {REVERT_LIMIT} s)",
                    to_revert
                ));
            }
        }
    }
    if !stuck.is_empty() {
        failures.push(format!(
            "{name}: {} agents stuck (first: {})",
            stuck.len(),
            stuck.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(Scenario {
        name,
        kind,
        phase: format!("{:?}", r.phase).to_lowercase(),
        gate,
        wave: r.wave + 1,
        wave_label: r.waves[r.wave].to_string(),
        expected_wave,
        wave_size,
        ran_new: ran.len(),
        seconds,
        budget,
        to_halt: halted
            .then(|| first_on_new.map(|f| ended.saturating_duration_since(f).as_secs_f64()))
            .flatten(),
        to_revert,
        stuck,
        killed_at,
        curve,
        failures,
    })
}

/// The scenarios as a Markdown table.
pub fn table(scenarios: &[Scenario], agents: usize, bake: Duration) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{agents} agents, waves {WAVES}, {} s bake per wave, default gates; times in seconds.\n",
        bake.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "| scenario | outcome | wave | agents that ran it (wave size) | start to end | first agent on it to halt | halt to all back | stuck |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for s in scenarios {
        let outcome = match &s.gate {
            Some(g) => format!("halted by the {g} gate"),
            None => s.phase.clone(),
        };
        let budget = if s.kind == Kind::Good {
            format!(" (budget {:.0})", s.budget)
        } else {
            String::new()
        };
        let killed = s
            .killed_at
            .map(|k| format!(", controller killed at {k:.1} s"))
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "| {}{killed} | {outcome} | {} ({}){} | {} ({}) | {:.1}{budget} | {} | {} | {} |",
            s.name,
            s.wave,
            s.wave_label,
            s.expected_wave
                .map(|w| format!(", first failing: {w}"))
                .unwrap_or_default(),
            s.ran_new,
            s.wave_size,
            s.seconds,
            s.to_halt.map_or("-".into(), |x| format!("{x:.1}")),
            s.to_revert.map_or("-".into(), |x| format!("{x:.1}")),
            s.stuck.len()
        );
    }
    t
}

/// Agents on the new version over time, one line per scenario, as an SVG.
pub fn plot(scenarios: &[Scenario], agents: usize) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 60.0, 50.0, 30.0, 260.0);
    let xmax = scenarios
        .iter()
        .flat_map(|s| s.curve.iter().map(|p| p.0))
        .fold(10.0f64, f64::max)
        .ceil();
    let x = |s: f64| left + (w - left - right) * s / xmax;
    let y = |n: usize| h - bottom - (h - bottom - top) * n as f64 / agents.max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\">Staged rollouts ({WAVES}): agents on the new version</text>\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let n = agents * i / 4;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{n}</text>",
            left - 6.0,
            y(n) + 4.0
        );
        let s = xmax * f64::from(i as u32) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{s:.0} s</text>",
            x(s),
            h - bottom + 18.0
        );
    }
    let colors = ["#1b7837", "#d73027", "#4575b4", "#fdae61", "#762a83"];
    for (i, s) in scenarios.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<String> = s
            .curve
            .iter()
            .map(|(t, n)| format!("{:.1},{:.1}", x(*t), y(*n)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            w - right + 10.0,
            top + 16.0 * (i as f64 + 1.0),
            s.name
        );
    }
    svg.push_str("</svg>\n");
    svg
}
