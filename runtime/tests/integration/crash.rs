//! Crash consistency through the `collector` binary: an agent fed new bundle versions
//! as fast as it swaps them is killed with SIGKILL at random points (during swaps,
//! last-known-good saves, anti-rollback writes and start-up), over and over. After every kill the
//! state directory must open, its version floor must not have gone back nor lost what
//! the agent reported, the last-known-good it names must verify, nothing half-written may
//! pile up, and the agent restarted on it must publish again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use collector_bundle::{TrustRoot, TrustStore, VERSIONS_FILE, VersionStore};
use collector_deploy::{AGENT_STATE_FILE, Deployer, LKG_DIR, ModuleId, Policy, StateDir};
use collector_sandbox::engine::Sandbox;
use collector_sandbox::host::Limits;

use crate::common::*;

const MODULE: &str = "process-perf";
/// Iterations in the default run, a kill each (and a quarter of them a second kill while
/// the agent starts): about 25 s on a 2-core machine. More with
/// `COLLECTOR_CRASH_ITERATIONS=N`.
const DEFAULT_ITERATIONS: u64 = 60;
/// Longest a restarted agent may take to publish its first line.
const RESTART_BOUND: Duration = Duration::from_secs(10);
/// Bundle files kept in the modules directory: a few older than the newest, so the
/// watcher also meets files it has already seen.
const KEEP_BUNDLES: usize = 3;

/// splitmix64: a seeded generator, so that a failing run can be replayed exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// The version `marker` names in log lines such as `... to=process-perf v7`.
fn versions_after(lines: &[String], marker: &str) -> Option<u64> {
    lines
        .iter()
        .filter_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(
                    path.strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// What the state directory looked like after a kill, checked offline.
struct Checked {
    floor: u64,
    last_known_good: Option<ModuleId>,
    /// Whether the kill left a temporary or a second last-known-good file: it fell
    /// inside a write.
    mid_write: bool,
}

/// Opens the state as a restarting agent would and checks everything that must hold
/// whatever instant the agent died at.
fn check_state(
    state: &Path,
    deployer_for: &dyn Fn(StateDir) -> std::sync::Arc<Deployer>,
    what: &str,
) -> Checked {
    let files = files_under(state);
    // Only files the agent writes, and write_atomic's temporaries (`.NAME.tmp`), which
    // the next write of NAME removes first. In the last-known-good directory a crash
    // leaves at most one entry besides the current bundle: the next bundle being
    // written, or the previous one not yet removed. More would mean they pile up.
    for f in &files {
        let name = Path::new(f).file_name().unwrap().to_string_lossy();
        let known = matches!(
            f.as_str(),
            VERSIONS_FILE | AGENT_STATE_FILE | "cache/cache.key"
        ) || (f.starts_with("cache/")
            && (f.ends_with(".cwasm") || f.ends_with(".mac")))
            || (f.starts_with(&format!("{LKG_DIR}/")) && f.ends_with(".bundle"))
            || (name.starts_with('.') && name.ends_with(".tmp"));
        assert!(known, "{what}: unexpected file {f} in the state: {files:?}");
    }
    let lkg_entries = files
        .iter()
        .filter(|f| f.starts_with(&format!("{LKG_DIR}/")))
        .count();
    // The bundles the state points to: the last-known-good and the earlier good
    // versions kept for a revocation.
    let referenced = std::fs::read(state.join(AGENT_STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map_or(0, |v| {
            let count = |field: &str| {
                v[field].as_object().map_or(0, |m| {
                    m.values()
                        .map(|e| e.as_array().map_or(1, Vec::len))
                        .sum::<usize>()
                })
            };
            count("last_known_good") + count("earlier_good")
        });
    assert!(
        lkg_entries <= referenced + 1,
        "{what}: last-known-good files pile up ({referenced} referenced): {files:?}"
    );

    let versions = VersionStore::open(state)
        .unwrap_or_else(|e| panic!("{what}: {VERSIONS_FILE} does not open: {e}"));
    let floor = versions
        .accepted(MODULE)
        .unwrap_or_else(|| panic!("{what}: no version floor recorded: {files:?}"))
        .version;
    let dir =
        StateDir::open(state).unwrap_or_else(|e| panic!("{what}: the state does not open: {e:#}"));
    let last_known_good = dir.last_known_good(MODULE).cloned();
    if let Some(id) = &last_known_good {
        assert!(
            id.version <= floor,
            "{what}: last-known-good {id} above the version floor {floor}"
        );
    }
    let deployer = deployer_for(dir);
    let loaded = deployer
        .load_last_known_good(Some(MODULE))
        .unwrap_or_else(|e| panic!("{what}: the last-known-good does not load: {e}"));
    assert_eq!(
        loaded.map(|a| a.id),
        last_known_good,
        "{what}: the last-known-good loaded is not the one recorded"
    );
    Checked {
        floor,
        last_known_good,
        mid_write: lkg_entries > referenced || files.iter().any(|f| f.ends_with(".tmp")),
    }
}

/// Collects log lines until the agent reports which module it loaded.
fn startup_log(agent: &AgentProcess, what: &str) -> Vec<String> {
    let deadline = Instant::now() + RESTART_BOUND;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.stderr.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("module loaded");
                lines.push(line);
                if done {
                    return lines;
                }
            }
            Err(e) => panic!(
                "{what}: the agent did not load a module ({e}); log:\n{}",
                lines.join("\n")
            ),
        }
    }
}

/// Kills the agent with SIGKILL and returns what it logged before dying.
fn kill(agent: AgentProcess, mut log: Vec<String>) -> Vec<String> {
    // SAFETY: kill(2) with the pid of a child this test started and has not reaped
    // (reaped when `agent` drops below).
    let rc = unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {}", agent.pid());
    // The reader thread ends at end of file, once the dead agent's pipe is drained.
    loop {
        match agent.stderr.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => log.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("the killed agent's log did not end"),
        }
    }
    drop(agent);
    log
}

#[test]
fn sigkill_at_random_points_of_swaps_and_saves_always_leaves_a_state_that_restarts() {
    let iterations = std::env::var("COLLECTOR_CRASH_ITERATIONS")
        .ok()
        .map_or(DEFAULT_ITERATIONS, |n| {
            n.parse().expect("COLLECTOR_CRASH_ITERATIONS is a number")
        });
    let seed = 0x00c0_11ec_7000_u64;
    let Deployment {
        dir,
        modules,
        state,
        config,
    } = Deployment::new();
    // Ticks every 20 ms and one health tick: a swap is followed by a last-known-good save
    // within about a tick, so kills spread over a few hundred ms hit every step.
    std::fs::write(
        &config,
        r#"{"process_perf_enabled": true, "host_perf_interval": "20ms", "process_perf_top_n": 2}"#,
    )
    .unwrap();
    let k = key(9);
    let trust = write_public(dir.path(), "team", &k);
    let guest = std::fs::read(guest_wasm()).unwrap();
    let args: Vec<&OsStr> = vec![
        "--trust".as_ref(),
        trust.as_os_str(),
        "--modules".as_ref(),
        modules.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
        "--health-ticks".as_ref(),
        "1".as_ref(),
        "--modules-poll".as_ref(),
        "10ms".as_ref(),
    ];
    // The offline checks compile the last-known-good with a cache of their own, never
    // the agent's.
    let sandbox = Sandbox::with_cache(&dir.path().join("check-cache")).unwrap();
    let deployer_for = |state: StateDir| {
        Deployer::new(
            sandbox.clone(),
            Policy {
                trust: Some(TrustRoot::from_keys(
                    TrustStore::new([k.public_key()], 1).unwrap(),
                )),
                allow_unsigned: false,
                unsigned_grants: Vec::new(),
                ceilings: Limits::default(),
                pc_id: PC_ID.into(),
            },
            Some(state),
        )
    };

    let mut dropped: Vec<PathBuf> = Vec::new();
    let mut next_version = 1u64;
    let mut drop_next = |dropped: &mut Vec<PathBuf>| {
        let name = format!("{MODULE}-{next_version:05}.bundle");
        let bundle = signed(MODULE, next_version, &guest, &[&k]);
        dropped.push(drop_file(&modules, &name, &bundle));
        next_version += 1;
        if dropped.len() > KEEP_BUNDLES {
            std::fs::remove_file(dropped.remove(0)).unwrap();
        }
        next_version - 1
    };
    drop_next(&mut dropped);

    let mut seen = Seen::default();
    let mut slowest_restart = Duration::ZERO;
    let started = Instant::now();
    for i in 0..iterations {
        let mut rng = Rng(seed.wrapping_add(i));
        let what = format!("iteration {i} (seed {seed:#x}+{i})");
        if i > 0 && rng.next().is_multiple_of(4) {
            // Killed while starting: loading the last-known-good, filling the compile
            // cache, taking the newest bundle of the directory.
            let highest_dropped = drop_next(&mut dropped);
            let agent = AgentProcess::start(&args);
            std::thread::sleep(rng.millis(0, 400));
            let log = kill(agent, Vec::new());
            let what = format!("{what}, killed while starting");
            seen.after_kill(&state, &deployer_for, &log, highest_dropped, &what);
        }
        let restart = Instant::now();
        let agent = AgentProcess::start(&args);
        let log = startup_log(&agent, &what);
        if seen.lkg_version > 0 {
            assert!(
                log.iter()
                    .any(|l| l.contains("starting with the last-known-good module")),
                "{what}: the recorded last-known-good was not used; log:\n{}",
                log.join("\n")
            );
        }
        agent
            .stdout
            .recv_timeout(RESTART_BOUND)
            .unwrap_or_else(|e| panic!("{what}: no ProcessPerf line after the restart ({e})"));
        slowest_restart = slowest_restart.max(restart.elapsed());

        // New versions at random gaps, the kill at a random instant among them: the
        // window covers the watcher's poll, verification, the anti-rollback write, the
        // swap, the health tick and the last-known-good save.
        let kill_after = rng.millis(0, 250);
        let feeding = Instant::now();
        let mut highest_dropped = drop_next(&mut dropped);
        loop {
            let gap = rng.millis(5, 60);
            let left = kill_after.saturating_sub(feeding.elapsed());
            if gap >= left {
                std::thread::sleep(left);
                break;
            }
            std::thread::sleep(gap);
            highest_dropped = drop_next(&mut dropped);
        }
        let log = kill(agent, log);
        seen.after_kill(&state, &deployer_for, &log, highest_dropped, &what);
    }
    let Seen {
        kills,
        floor,
        lkg_version,
        on_probation,
        mid_write,
        logged_floor,
        logged_lkg,
    } = seen;
    eprintln!(
        "crash: {kills} kills in {iterations} iterations, {:.1?}; final floor v{floor}, \
         last-known-good v{lkg_version}; {on_probation} kills with a module on probation, \
         {mid_write} inside a write; slowest restart {slowest_restart:.1?}",
        started.elapsed()
    );
    assert!(
        lkg_version > 1 && floor > 1 && logged_lkg > 1 && logged_floor > 1,
        "swaps and saves happened between kills, and the log reported them: floor v{floor} \
         (logged v{logged_floor}), last-known-good v{lkg_version} (logged v{logged_lkg})"
    );
}

/// What the kills so far left, to check that the next one never goes back.
#[derive(Default)]
struct Seen {
    kills: u32,
    floor: u64,
    lkg_version: u64,
    /// Where the kills fell, to show they spread over the windows that matter.
    on_probation: u32,
    mid_write: u32,
    /// The highest versions the agent's log reported, to show the log checks bite.
    logged_floor: u64,
    logged_lkg: u64,
}

impl Seen {
    /// Checks the state a kill left, against what came before and what the killed
    /// agent had logged (all of it written before it died).
    fn after_kill(
        &mut self,
        state: &Path,
        deployer_for: &dyn Fn(StateDir) -> std::sync::Arc<Deployer>,
        log: &[String],
        highest_dropped: u64,
        what: &str,
    ) {
        let checked = check_state(state, deployer_for, what);
        let reported_floor = versions_after(log, &format!("to={MODULE} v")).unwrap_or(0);
        let saves: Vec<String> = log
            .iter()
            .filter(|l| l.contains("saved as the last-known-good module"))
            .cloned()
            .collect();
        let reported_lkg = versions_after(&saves, &format!("module={MODULE} v")).unwrap_or(0);
        assert!(
            checked.floor >= self.floor,
            "{what}: the version floor went back from {} to {}",
            self.floor,
            checked.floor
        );
        assert!(
            checked.floor >= reported_floor,
            "{what}: the agent swapped to v{reported_floor} but the floor is {}",
            checked.floor
        );
        assert!(
            checked.floor <= highest_dropped,
            "{what}: floor {} above any version dropped",
            checked.floor
        );
        let lkg_now = checked.last_known_good.as_ref().map_or(0, |id| id.version);
        assert!(
            lkg_now >= self.lkg_version && lkg_now >= reported_lkg,
            "{what}: the last-known-good went back to v{lkg_now} (was v{}, logged saved: \
             v{reported_lkg})",
            self.lkg_version
        );
        self.kills += 1;
        self.logged_floor = self.logged_floor.max(reported_floor);
        self.logged_lkg = self.logged_lkg.max(reported_lkg);
        self.on_probation += u32::from(checked.floor > lkg_now);
        self.mid_write += u32::from(checked.mid_write);
        self.floor = checked.floor;
        self.lkg_version = lkg_now;
    }
}
