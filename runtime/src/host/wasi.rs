//! WASI for guests, without capabilities: the standard library of a `wasm32-wasip2` guest
//! imports some of WASI (I/O streams, CLI environment, clocks, random), so the host must
//! link those. It links nothing else: no filesystem, no sockets, no HTTP; no arguments,
//! no environment variables, no preopened directories. Guest stdout and stderr become
//! log lines tagged with the module's name.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView as _};
use wasmtime_wasi::p2::bindings::{self as wasi, sync as wasi_sync};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};

use super::{HostState, Level, LogBook, LogLine};

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
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
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
    wasi::clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    wasi::clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    wasi::random::random::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    Ok(())
}

/// A WASI context with no capabilities whose stdout and stderr go to the log (and to
/// `book` when set). `customize` may replace clocks and randomness (the mock host makes
/// them virtual).
pub(crate) fn context(
    guest: &Arc<str>,
    book: Option<LogBook>,
    customize: impl FnOnce(&mut WasiCtxBuilder),
) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(LogStream::new(guest.clone(), "stdout", book.clone()))
        .stderr(LogStream::new(guest.clone(), "stderr", book));
    customize(&mut builder);
    builder.build()
}

/// Longest partial line buffered before it is logged anyway.
const MAX_PENDING: usize = 4096;

/// A guest output stream that turns each line into a log event.
#[derive(Clone)]
struct LogStream {
    guest: Arc<str>,
    stream: &'static str,
    pending: Arc<Mutex<Vec<u8>>>,
    book: Option<LogBook>,
}

impl LogStream {
    fn new(guest: Arc<str>, stream: &'static str, book: Option<LogBook>) -> Self {
        Self {
            guest,
            stream,
            pending: Arc::default(),
            book,
        }
    }

    fn take(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().expect("log stream lock");
        pending.extend_from_slice(bytes);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            self.emit(&line[..line.len() - 1]);
        }
        if pending.len() >= MAX_PENDING {
            let line = std::mem::take(&mut *pending);
            self.emit(&line);
        }
    }

    fn emit(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        let guest = &*self.guest;
        let stream = self.stream;
        let level = if stream == "stderr" {
            tracing::warn!(target: "guest", guest, stream, "{line}");
            Level::Warn
        } else {
            tracing::info!(target: "guest", guest, stream, "{line}");
            Level::Info
        };
        if let Some(book) = &self.book {
            book.lock().expect("log book lock").push(LogLine {
                level,
                message: line.to_string(),
            });
        }
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
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
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
