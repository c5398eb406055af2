//! The default collector guest: the kanade process-perf loop (top CPU consumers with
//! per-PID disk rates) as a WebAssembly component of `collector:api@0.2.0`. [`logic`]
//! holds every decision and [`message`] writes the wire format; this file only adapts
//! them to the WIT world.

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
}
