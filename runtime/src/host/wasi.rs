//! WASI for guests, without capabilities: the standard library of a `wasm32-wasip2` guest
//! imports some of WASI (I/O streams, CLI environment, random), so the host must link
//! those. It links nothing else: no filesystem, no sockets, no HTTP; no arguments, no
//! environment variables, no preopened directories. No clocks either: a guest gets time
//! from `tick`, and a clock's timers would let it block in `wasi:io/poll` beyond the
//! reach of its time budget (which interrupts guest code, not host calls). Guest stdout
//! and stderr become log lines tagged with the module's name, under the same per-call line
//! budget and length cap as the `log` import.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::p2::bindings::{self as wasi, sync as wasi_sync};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};

use super::HostState;
use super::Level;
use super::log::{GuestLogger, MAX_LINE_BYTES};

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
];

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
    Ok(())
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
