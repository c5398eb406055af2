//! WASI for guests, without capabilities: the standard library of a `wasm32-wasip2` guest
//! imports some of WASI (I/O streams, CLI environment, random), and the runtimes of other
//! languages (JavaScript's StarlingMonkey, CPython) import more (clocks, filesystem), so the
//! host links those, each made safe:
//!
//! - clocks read the time of the guest's tick, never the host's: time stands still during a
//!   call, which keeps a guest deterministic under the mock host, and a timer is ready at
//!   once, so no `wasi:io/poll` ever blocks beyond the reach of the time budget (which
//!   interrupts guest code, not host calls);
//! - the filesystem has no preopened directory, so no descriptor can ever exist;
//! - randomness comes from a generator of the instance's own (seeded from the OS in the
//!   agent, from the instance count under the mock host);
//! - no arguments, no environment variables; stdout and stderr become log lines tagged
//!   with the module's name, under the same per-call line budget and length cap as the
//!   `log` import.
//!
//! Sockets and HTTP are not linked: a component importing them is refused before it runs.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::clocks::{monotonic_clock, wall_clock};
use wasmtime_wasi::p2::bindings::{self as wasi, sync as wasi_sync};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};

use super::log::{GuestLogger, MAX_LINE_BYTES};
use super::{Datetime, HostState, Level, TickTime};

/// WASI interfaces a guest may import (by `namespace:package/interface` prefix). Anything
/// else from the `wasi` namespace is refused before instantiation.
pub const ALLOWED_WASI: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Why a WASI import outside [`ALLOWED_WASI`] is refused, for the load error that names it.
pub fn refusal(package: &str) -> Option<&'static str> {
    Some(match package {
        "wasi:sockets" | "wasi:http" => "guests get no network access",
        "wasi:filesystem" => {
            "guests get no filesystem beyond `types` and `preopens`, which have nothing to open"
        }
        "wasi:clocks" => {
            "of the clocks guests get only `wall-clock` and `monotonic-clock`, which read the tick's time"
        }
        "wasi:cli" | "wasi:io" | "wasi:random" => "this host does not offer that interface",
        _ => return None,
    })
}

struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// Links exactly the interfaces of [`ALLOWED_WASI`].
pub(crate) fn add_to_linker(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    type T = HostState;
    fn table(t: &mut T) -> &mut ResourceTable {
        t.ctx().table
    }
    wasi::io::error::add_to_linker::<T, HasTable>(l, table)?;
    wasi_sync::io::poll::add_to_linker::<T, HasTable>(l, table)?;
    wasi_sync::io::streams::add_to_linker::<T, HasTable>(l, table)?;
    wasi::cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    wasi::random::random::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    // No preopened directory is ever added to a guest's context (see `context`), so
    // `get-directories` is empty and no descriptor can be opened: these only satisfy
    // runtimes whose C library imports them.
    wasi::filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    wasi_sync::filesystem::types::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    wall_clock::add_to_linker::<T, TickClocks>(l, TickClocks::view)?;
    monotonic_clock::add_to_linker::<T, TickClocks>(l, TickClocks::view)?;
    Ok(())
}

/// The clocks a guest reads: the time of the tick in progress, or of the latest tick
/// outside one (zero before the first), set by the supervisor before every call.
struct TickClocks;

/// A view of the clock time and the resource table, for the WASI clocks.
pub(crate) struct TickClocksView<'a> {
    now: &'a TickTime,
    table: &'a mut ResourceTable,
}

impl HasData for TickClocks {
    type Data<'a> = TickClocksView<'a>;
}

impl TickClocks {
    fn view(t: &mut HostState) -> TickClocksView<'_> {
        TickClocksView {
            now: &t.clock,
            table: &mut t.table,
        }
    }
}

/// The time of no tick yet: the Unix epoch, monotonic zero.
pub(crate) const BEFORE_FIRST_TICK: TickTime = TickTime {
    wall: Datetime {
        seconds: 0,
        nanoseconds: 0,
    },
    monotonic: 0,
};

impl wall_clock::Host for TickClocksView<'_> {
    fn now(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        Ok(wall_clock::Datetime {
            // WASI's wall clock cannot say "before 1970"; a tick's time never is.
            seconds: u64::try_from(self.now.wall.seconds).unwrap_or(0),
            nanoseconds: self.now.wall.nanoseconds,
        })
    }

    fn resolution(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        Ok(wall_clock::Datetime {
            seconds: 0,
            nanoseconds: 1,
        })
    }
}

impl monotonic_clock::Host for TickClocksView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(self.now.monotonic)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1)
    }

    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        subscribe_elapsed(self.table)
    }

    fn subscribe_duration(
        &mut self,
        _when: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        subscribe_elapsed(self.table)
    }
}

/// A timer, ready at once whatever its deadline. Time stands still during a call, so a
/// timer that waited for its deadline would wait forever, in a host call where the time
/// budget cannot stop it. Ready at once, a guest's sleep returns immediately with the
/// clock unchanged, and a guest that waits for the clock to move spins in its own code
/// until the budget stops it.
struct Elapsed;

#[wasmtime_wasi::async_trait]
impl Pollable for Elapsed {
    async fn ready(&mut self) {}
}

fn subscribe_elapsed(table: &mut ResourceTable) -> wasmtime::Result<Resource<DynPollable>> {
    let timer = table.push(Elapsed)?;
    wasmtime_wasi::p2::subscribe(table, timer)
}

/// Largest `get-random-bytes` request: the host allocates the bytes before they are
/// copied into the guest, so WASI's own default (64 MiB) would let a guest make the agent
/// allocate beyond the guest's memory cap. A guest seeds a generator with a few bytes.
pub const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// A WASI context with no capabilities whose stdout and stderr go to `logger`.
/// `customize` may replace the randomness (the mock host makes it deterministic).
pub(crate) fn context(
    logger: &Arc<GuestLogger>,
    customize: impl FnOnce(&mut WasiCtxBuilder),
) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    builder
        .max_random_size(MAX_RANDOM_BYTES)
        .stdout(LogStream::new(logger.clone(), "stdout", Level::Info))
        .stderr(LogStream::new(logger.clone(), "stderr", Level::Warn));
    customize(&mut builder);
    builder.build()
}

/// Bytes in the cycle of each deterministic generator: far more than a guest seeds
/// itself with, cheap to derive at each instantiation.
const DETERMINISTIC_CYCLE: usize = 4096;

/// Makes the randomness of a context deterministic, derived from `instance` (the mock
/// host numbers its instances): `random`, `insecure` and `insecure-seed` each get their
/// own stream. In the agent the default generators are seeded from the OS per instance.
pub fn deterministic_random(builder: &mut WasiCtxBuilder, instance: u64) {
    use sha2::{Digest, Sha256};
    let stream = |name: &str| {
        let mut bytes = Vec::with_capacity(DETERMINISTIC_CYCLE);
        for block in 0u64.. {
            if bytes.len() >= DETERMINISTIC_CYCLE {
                break;
            }
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            h.update(instance.to_le_bytes());
            h.update(block.to_le_bytes());
            bytes.extend_from_slice(&h.finalize());
        }
        bytes
    };
    let seed = stream("insecure-seed");
    let seed = u128::from_le_bytes(seed[..16].try_into().expect("16 bytes"));
    builder
        .secure_random(wasmtime_wasi::Deterministic::new(stream("random")))
        .insecure_random(wasmtime_wasi::Deterministic::new(stream("insecure")))
        .insecure_random_seed(seed);
}

/// Largest write a guest may make at once (what `check-write` permits), and the longest
/// partial line buffered before it is logged anyway.
const MAX_PENDING: usize = MAX_LINE_BYTES;

/// A guest output stream that turns each line into a log line.
#[derive(Clone)]
struct LogStream {
    logger: Arc<GuestLogger>,
    stream: &'static str,
    level: Level,
    pending: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    fn new(logger: Arc<GuestLogger>, stream: &'static str, level: Level) -> Self {
        Self {
            logger,
            stream,
            level,
            pending: Arc::default(),
        }
    }

    /// Logs every complete line in one pass; keeps the unterminated rest (cut at
    /// [`MAX_PENDING`]) for the next write.
    fn take(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().expect("log stream lock");
        pending.extend_from_slice(bytes);
        let Some(last_nl) = pending.iter().rposition(|&b| b == b'\n') else {
            if pending.len() >= MAX_PENDING {
                let line = std::mem::take(&mut *pending);
                self.emit(&line);
            }
            return;
        };
        let rest = pending.split_off(last_nl + 1);
        for line in pending.split(|&b| b == b'\n') {
            self.emit(line);
        }
        *pending = rest;
    }

    fn emit(&self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        self.logger.line(self.level, line, Some(self.stream));
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if bytes.len() > MAX_PENDING {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "write of {} bytes to {}, more than the {MAX_PENDING} permitted",
                bytes.len(),
                self.stream
            )));
        }
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_PENDING)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(MAX_PENDING);
        self.take(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        // The last clone flushes a final unterminated line.
        if Arc::strong_count(&self.pending) == 1 {
            let rest = std::mem::take(&mut *self.pending.lock().expect("log stream lock"));
            if !rest.is_empty() {
                self.emit(&rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LogBook;

    fn stream(budget: u32) -> (LogStream, Arc<GuestLogger>, LogBook) {
        let book = LogBook::default();
        let logger = Arc::new(GuestLogger::new(
            "g".into(),
            Some(book.clone()),
            Arc::default(),
        ));
        logger.begin_call(budget);
        (
            LogStream::new(logger.clone(), "stdout", Level::Info),
            logger,
            book,
        )
    }

    fn random_bytes(customize: impl FnOnce(&mut WasiCtxBuilder)) -> (Vec<u8>, Vec<u8>, u64) {
        use wasi::random::{insecure::Host as _, insecure_seed::Host as _, random::Host as _};
        let (_, logger, _) = stream(10);
        let mut ctx = context(&logger, customize);
        let random = ctx.random();
        (
            random.get_random_bytes(32).unwrap(),
            random.get_insecure_random_bytes(32).unwrap(),
            random.insecure_seed().unwrap().0,
        )
    }

    #[test]
    fn randomness_is_deterministic_per_instance_under_the_mock_host() {
        let first = random_bytes(|b| deterministic_random(b, 0));
        assert_eq!(first, random_bytes(|b| deterministic_random(b, 0)));
        let second = random_bytes(|b| deterministic_random(b, 1));
        assert_ne!(first.0, second.0, "another instance, another stream");
        assert_ne!(first.1, second.1);
        assert_ne!(first.2, second.2);
        assert_ne!(first.0, first.1, "random and insecure are separate streams");
        assert!(first.0.iter().any(|&b| b != first.0[0]), "{:?}", first.0);
    }

    #[test]
    fn randomness_differs_per_instance_in_the_agent() {
        let (a, b) = (random_bytes(|_| {}), random_bytes(|_| {}));
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
        assert_ne!(a.2, b.2);
    }

    #[test]
    fn clocks_read_the_tick_time_and_timers_are_ready_at_once() {
        let now = TickTime {
            wall: Datetime {
                seconds: 1_800_000_000,
                nanoseconds: 123,
            },
            monotonic: 42_000,
        };
        let mut table = ResourceTable::new();
        let mut view = TickClocksView {
            now: &now,
            table: &mut table,
        };
        let wall = wall_clock::Host::now(&mut view).unwrap();
        assert_eq!((wall.seconds, wall.nanoseconds), (1_800_000_000, 123));
        assert_eq!(monotonic_clock::Host::now(&mut view).unwrap(), 42_000);
        // An hour from now, and the latest instant there is.
        let timers = [
            monotonic_clock::Host::subscribe_duration(&mut view, 3_600_000_000_000).unwrap(),
            monotonic_clock::Host::subscribe_instant(&mut view, u64::MAX).unwrap(),
        ];
        for timer in timers {
            use futures_util::FutureExt as _;
            use wasi::io::poll::HostPollable as _;
            let ready = table
                .ready(Resource::new_borrow(timer.rep()))
                .now_or_never();
            assert!(
                matches!(ready, Some(Ok(true))),
                "a timer must never wait: {ready:?}"
            );
        }
        let before = TickTime {
            wall: Datetime {
                seconds: -5,
                nanoseconds: 0,
            },
            monotonic: 0,
        };
        let mut view = TickClocksView {
            now: &before,
            table: &mut table,
        };
        assert_eq!(wall_clock::Host::now(&mut view).unwrap().seconds, 0);
    }

    #[test]
    fn output_lines_share_the_log_budget() {
        let (mut out, logger, book) = stream(3);
        out.write(Bytes::from_static(b"a\nb\nc\nd\ne\npart"))
            .unwrap();
        out.write(Bytes::from_static(b"ial\n")).unwrap();
        let lines: Vec<String> = book
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.message.clone())
            .collect();
        assert_eq!(lines, ["a", "b", "c"]);
        assert_eq!(logger.dropped(), 3, "d, e and partial were over budget");
    }

    #[test]
    fn writes_beyond_the_permit_trap_and_long_lines_are_cut() {
        let (mut out, _logger, book) = stream(10);
        assert!(out.write(Bytes::from(vec![b'x'; MAX_PENDING + 1])).is_err());
        out.write(Bytes::from(vec![b'y'; MAX_PENDING])).unwrap();
        let lines = book.lock().unwrap();
        assert_eq!(
            lines.len(),
            1,
            "a full buffer without a newline is logged anyway"
        );
        assert_eq!(lines[0].message.len(), MAX_PENDING);
    }
}
