//! An example collector guest, written to be read: it publishes the top memory consumers
//! of a machine on `process_mem.{pc_id}`. [`logic`] holds every decision; this file only
//! adapts it to the `collector:api` WIT world. `docs/writing-a-guest.md` walks through it.

pub mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use chrono::DateTime;

    use crate::logic::{Host, MemorySample, TopMemoryGuest};

    wit_bindgen::generate!({
        path: "../../../wit",
        world: "collector",
    });

    use collector::api::processes::{self, Fields, SampleError};
    use collector::api::publish::{self, PublishError};
    use collector::api::types::{Level, TickTime};
    use collector::api::{identity, log};
    use exports::collector::api::guest::Guest;

    thread_local! {
        // The host never calls a guest concurrently: one instance, one state.
        static GUEST: RefCell<TopMemoryGuest> = RefCell::new(TopMemoryGuest::default());
    }

    /// The host's imports, seen through the [`Host`] trait.
    struct Imports;

    impl Host for Imports {
        fn sample_memory(&mut self) -> Result<MemorySample, String> {
            let s = processes::sample(Fields::MEMORY).map_err(|e| match e {
                SampleError::NotGranted => "process sampling not granted".to_string(),
                SampleError::Failed(msg) => msg,
            })?;
            Ok(MemorySample {
                pids: s.pids,
                rss_bytes: s.rss_bytes,
            })
        }

        fn names(&mut self, pids: &[u32]) -> Vec<String> {
            processes::names(pids)
        }

        fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String> {
            publish::publish(subject, payload).map_err(|e| match e {
                PublishError::NotGranted => "subject not granted".to_string(),
                PublishError::TooLarge(limit) => format!("payload over the {limit}-byte limit"),
                PublishError::RateLimited => "rate limited".to_string(),
                PublishError::Failed(msg) => msg,
            })
        }

        fn warn(&mut self, message: &str) {
            log::log(Level::Warn, message);
        }

        fn pc_id(&mut self) -> String {
            identity::pc_id()
        }
    }

    struct Component;

    impl Guest for Component {
        fn configure(config: String) -> Result<(), String> {
            GUEST.with_borrow_mut(|g| g.configure_json(&config))
        }

        fn interval() -> u64 {
            GUEST.with_borrow(|g| u64::try_from(g.interval().as_nanos()).unwrap_or(u64::MAX))
        }

        fn tick(now: TickTime) -> Result<(), String> {
            let wall = DateTime::from_timestamp(now.wall.seconds, now.wall.nanoseconds)
                .ok_or_else(|| format!("wall time out of range: {}s", now.wall.seconds))?;
            GUEST.with_borrow(|g| g.tick(wall, &mut Imports));
            Ok(())
        }

        fn save_state() -> Option<Vec<u8>> {
            None
        }

        fn restore_state(_state: Vec<u8>) -> Result<(), String> {
            // Nothing is carried, so a predecessor's state (whatever it is) changes
            // nothing: accepting it is the same as starting fresh, without a warning.
            Ok(())
        }
    }

    export!(Component);
}
