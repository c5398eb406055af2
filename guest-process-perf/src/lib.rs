//! The default collector guest: the kanade process-perf loop (top CPU consumers with
//! per-PID disk rates) as a WebAssembly component of `collector:api@0.2.0`. [`logic`]
//! holds every decision and [`message`] writes the wire format; this file only adapts
//! them to the WIT world.
//!
//! # Fault injection (test builds only)
//!
//! Three cargo features, none on by default, build misbehaving variants of this guest for
//! testing staged rollouts: a rollout's health gates must catch a module that goes bad
//! after its probation. They are test builds, never shipped: `cargo xtask build-guest
//! --fault trap|silent|cpu` builds one into `target/guests/process-perf-fault-<fault>.wasm`
//! (in a target directory of its own), and the normal build enables none. They act in
//! the adapter below only; [`logic`] stays the pure loop.
//!
//! - `fault-trap`: from the 6th tick of an instance on, every tick traps (a panic, which
//!   aborts), on machines where `fnv1a_32(pc_id) % 100 < 30` only. A fresh instance
//!   counts its ticks from 0 again.
//! - `fault-silent`: the loop runs as usual, logs included, but nothing is published.
//! - `fault-cpu`: after each tick, a busy spin for 9x the tick's own elapsed time (at
//!   least 2 ms), so that a tick costs about 10x the CPU. This runtime's clocks stand
//!   still during a call (a guest reads the tick's time), so there the spin is a fixed
//!   amount of work instead, calibrated to about that cost.

pub mod logic;
pub mod message;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;
    use std::time::Duration;

    use crate::logic::{Config, Disk, Host, Level, ProcessPerfLoop, Sample};
    use crate::message::WallTime;

    wit_bindgen::generate!({
        path: "../wit/v0.2.0",
        world: "collector",
    });

    use collector::api::processes::{self, Fields, SampleError};
    use collector::api::publish::{self, PublishError};
    use collector::api::types::{Datetime, Level as WitLevel, Settings, TickTime};
    use collector::api::{identity, log};
    use exports::collector::api::guest::Guest;

    thread_local! {
        static LOOP: RefCell<ProcessPerfLoop> = RefCell::new(ProcessPerfLoop::default());
    }

    /// The host's imports, seen through the [`Host`] trait.
    struct Imports;

    fn sample_error(e: SampleError) -> String {
        match e {
            SampleError::NotGranted => "process sampling not granted".to_string(),
            SampleError::Failed(msg) => msg,
        }
    }

    fn wall(at: Datetime) -> WallTime {
        WallTime {
            seconds: at.seconds,
            nanoseconds: at.nanoseconds,
        }
    }

    impl Host for Imports {
        fn sample(&mut self, disk: bool) -> Result<Sample, String> {
            // CPU and memory for everyone; disk counters for everyone only on a small
            // table (otherwise they come for the top-N through `disk`).
            let fields = if disk {
                Fields::CPU | Fields::MEMORY | Fields::DISK
            } else {
                Fields::CPU | Fields::MEMORY
            };
            let s = processes::sample(fields).map_err(sample_error)?;
            Ok(Sample {
                pids: s.pids,
                cpu_pct: s.cpu_pct,
                rss_bytes: s.rss_bytes,
                read_bytes: s.disk_read_bytes,
                written_bytes: s.disk_written_bytes,
                cpu_primed: s.cpu_primed,
            })
        }

        fn disk(&mut self, pids: &[u32]) -> Result<Disk, String> {
            let s = processes::sample_pids(pids, Fields::DISK).map_err(sample_error)?;
            Ok(Disk {
                pids: s.pids,
                read_bytes: s.disk_read_bytes,
                written_bytes: s.disk_written_bytes,
            })
        }

        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            processes::names(pids)
        }

        fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String> {
            if cfg!(feature = "fault-silent") {
                // Fault injection: the message is dropped, and the loop goes on as if sent.
                return Ok(());
            }
            publish::publish(subject, payload).map_err(|e| match e {
                PublishError::NotGranted => format!("subject {subject} not granted"),
                PublishError::TooLarge(limit) => format!("payload over the {limit}-byte limit"),
                PublishError::RateLimited => "rate limited".to_string(),
                PublishError::Failed(msg) => msg,
            })
        }

        fn log(&mut self, level: Level, message: &str) {
            let level = match level {
                Level::Debug => WitLevel::Debug,
                Level::Info => WitLevel::Info,
                Level::Warn => WitLevel::Warn,
            };
            log::log(level, message);
        }

        fn pc_id(&mut self) -> String {
            identity::pc_id()
        }
    }

    struct Component;

    impl Guest for Component {
        fn configure(settings: Settings) -> Result<(), String> {
            let config = Config {
                enabled: settings.process_perf_enabled,
                expires_at: settings.process_perf_expires_at.map(wall),
                top_n: settings.process_perf_top_n,
                interval: settings.host_perf_interval.map(Duration::from_nanos),
            };
            LOOP.with_borrow_mut(|l| l.configure(config));
            Ok(())
        }

        fn interval() -> u64 {
            LOOP.with_borrow(|l| u64::try_from(l.interval().as_nanos()).unwrap_or(u64::MAX))
        }

        fn tick(now: TickTime) -> Result<(), String> {
            #[cfg(feature = "fault-trap")]
            fault::trap_when_due();
            // Spins when dropped, once the loop's tick has returned.
            #[cfg(feature = "fault-cpu")]
            let _spin = fault::SpinAfterTick::start();
            let mono = Duration::from_nanos(now.monotonic);
            LOOP.with_borrow_mut(|l| l.tick(wall(now.wall), mono, &mut Imports))
        }

        fn save_state() -> Option<Vec<u8>> {
            Some(LOOP.with_borrow(|l| l.save_state()))
        }

        fn restore_state(state: Vec<u8>) -> Result<(), String> {
            LOOP.with_borrow_mut(|l| l.restore_state(&state))
        }
    }

    export!(Component);

    /// The fault injection of the `fault-*` features (see the crate documentation).
    #[cfg(any(feature = "fault-trap", feature = "fault-cpu"))]
    mod fault {
        #[cfg(feature = "fault-trap")]
        pub(super) use trap::trap_when_due;

        #[cfg(feature = "fault-cpu")]
        pub(super) use cpu::SpinAfterTick;

        #[cfg(feature = "fault-trap")]
        mod trap {
            use std::cell::Cell;

            use super::super::identity;

            /// The share of machines that trap, in percent of `fnv1a_32(pc_id) % 100`.
            const TRAP_PERCENT: u32 = 30;
            /// The first tick of an instance that traps (counting from 1); every later
            /// one does too. After the default probation of 3 ticks.
            const TRAP_FROM_TICK: u32 = 6;

            thread_local! {
                /// Ticks of this instance, this one included.
                static TICKS: Cell<u32> = const { Cell::new(0) };
                /// Whether this machine traps, once known.
                static TRAPS_HERE: Cell<Option<bool>> = const { Cell::new(None) };
            }

            /// FNV-1a, 32 bits.
            fn fnv1a_32(bytes: &[u8]) -> u32 {
                bytes.iter().fold(2_166_136_261, |hash, &b| {
                    (hash ^ u32::from(b)).wrapping_mul(16_777_619)
                })
            }

            /// Counts a tick and traps if a trap is due on this machine. The machine's
            /// identity is asked only once a trap is due, so the first ticks make the
            /// host calls a normal build makes.
            pub(in super::super) fn trap_when_due() {
                let tick = TICKS.get().saturating_add(1);
                TICKS.set(tick);
                if tick < TRAP_FROM_TICK {
                    return;
                }
                let traps = TRAPS_HERE.get().unwrap_or_else(|| {
                    let traps = fnv1a_32(identity::pc_id().as_bytes()) % 100 < TRAP_PERCENT;
                    TRAPS_HERE.set(Some(traps));
                    traps
                });
                if traps {
                    panic!("fault-trap: injected trap at tick {tick} of this instance");
                }
            }
        }

        #[cfg(feature = "fault-cpu")]
        mod cpu {
            use std::hint::black_box;
            use std::time::{Duration, Instant};

            /// The spin lasts this many times the tick's own elapsed time...
            const SPIN_FACTOR: u32 = 9;
            /// ... and at least this long.
            const MIN_SPIN: Duration = Duration::from_millis(2);
            /// Iterations of one round of spinning, between two readings of the clock.
            const ROUND: u32 = 1024;
            /// Rounds spun when the clock stood still during the tick, as this runtime's
            /// clocks do (a guest reads the tick's time, whatever the host's), so that
            /// the tick's time cannot be measured: about 12.5 ms (a round took 1.5 µs
            /// under `collector test` when this was calibrated), 9x the 1.4 ms of a
            /// whole tick in BENCHMARKS.md.
            const FROZEN_CLOCK_SPIN_ROUNDS: u32 = 8_500;

            /// Started before a tick; spins when dropped, after it.
            pub(in super::super) struct SpinAfterTick {
                started: Instant,
            }

            impl SpinAfterTick {
                pub(in super::super) fn start() -> Self {
                    Self {
                        started: Instant::now(),
                    }
                }
            }

            /// Work the optimizer cannot remove: a linear congruential step through
            /// `black_box`.
            fn round(state: &mut u64) {
                for _ in 0..ROUND {
                    *state = black_box(
                        state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407),
                    );
                }
            }

            impl Drop for SpinAfterTick {
                fn drop(&mut self) {
                    let elapsed = self.started.elapsed();
                    let mut state = 1;
                    if elapsed.is_zero() {
                        for _ in 0..FROZEN_CLOCK_SPIN_ROUNDS {
                            round(&mut state);
                        }
                    } else {
                        let deadline = Instant::now() + (elapsed * SPIN_FACTOR).max(MIN_SPIN);
                        while Instant::now() < deadline {
                            round(&mut state);
                        }
                    }
                    black_box(state);
                }
            }
        }
    }
}
