//! The default collector guest: the kanade process-perf loop (top CPU consumers with
//! per-PID disk rates) as a WebAssembly component. [`logic`] holds every decision; this
//! file only adapts it to the `collector:api` WIT world.

pub mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;
    use std::time::Duration;

    use chrono::DateTime;

    use crate::logic::{Host, Level, ProcessPerfLoop, Sample};

    wit_bindgen::generate!({
        path: "../wit",
        world: "collector",
    });

    use collector::api::processes::{self, Fields, SampleError};
    use collector::api::publish::{self, PublishError};
    use collector::api::types::{Level as WitLevel, TickTime};
    use collector::api::{identity, log};
    use exports::collector::api::guest::Guest;

    thread_local! {
        static LOOP: RefCell<ProcessPerfLoop> = RefCell::new(ProcessPerfLoop::default());
    }

    /// The host's imports, seen through the [`Host`] trait.
    struct Imports;

    impl Host for Imports {
        fn sample(&mut self) -> Result<Sample, String> {
            let s = processes::sample(Fields::CPU | Fields::MEMORY | Fields::DISK).map_err(
                |e| match e {
                    SampleError::NotGranted => "process sampling not granted".to_string(),
                    SampleError::Failed(msg) => msg,
                },
            )?;
            Ok(Sample {
                pids: s.pids,
                cpu_pct: s.cpu_pct,
                rss_bytes: s.rss_bytes,
                disk_read_bytes: s.disk_read_bytes,
                disk_written_bytes: s.disk_written_bytes,
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
        fn configure(config: String) -> Result<(), String> {
            LOOP.with_borrow_mut(|l| l.configure_json(&config))
        }

        fn interval() -> u64 {
            LOOP.with_borrow(|l| u64::try_from(l.interval().as_nanos()).unwrap_or(u64::MAX))
        }

        fn tick(now: TickTime) -> Result<(), String> {
            let wall = DateTime::from_timestamp(now.wall.seconds, now.wall.nanoseconds)
                .ok_or_else(|| format!("wall time out of range: {}s", now.wall.seconds))?;
            let mono = Duration::from_nanos(now.monotonic);
            LOOP.with_borrow_mut(|l| l.tick(wall, mono, &mut Imports));
            Ok(())
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
