//! `collector:api/log`, and guest stdout/stderr: guest lines into the agent's `tracing`
//! log, tagged with the module's name. Both paths share one per-call line budget and the
//! same length cap, so neither can flood the agent's log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::collector::api::log::Host;
use super::{HostState, HostStats, Level, LogBook, LogLine};

/// Longest log line kept; longer ones are cut (at a character boundary).
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// Where a guest's lines go, shared by its `log` import and its output streams.
pub(crate) struct GuestLogger {
    guest: Arc<str>,
    book: Option<LogBook>,
    stats: Arc<HostStats>,
    /// Lines still allowed in the current call.
    remaining: AtomicU32,
    /// Lines refused in the current call.
    dropped: AtomicU32,
}

impl GuestLogger {
    pub(crate) fn new(guest: Arc<str>, book: Option<LogBook>, stats: Arc<HostStats>) -> Self {
        Self {
            guest,
            book,
            stats,
            remaining: AtomicU32::new(0),
            dropped: AtomicU32::new(0),
        }
    }

    /// Starts the budget of a new call.
    pub(crate) fn begin_call(&self, lines: u32) {
        self.remaining.store(lines, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
    }

    /// Lines refused since the call began.
    pub(crate) fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes one line, within the budget and the length cap.
    pub(crate) fn line(&self, level: Level, message: &str, stream: Option<&'static str>) {
        let granted = self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !granted {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        HostStats::bump(&self.stats.log_lines, 1);
        let message = truncate(message, MAX_LINE_BYTES);
        if let Some(book) = &self.book {
            book.lock().expect("log book lock").push(LogLine {
                level,
                message: message.to_string(),
            });
        }
        let guest = &*self.guest;
        let stream = stream.unwrap_or("log");
        match level {
            Level::Trace => tracing::trace!(target: "guest", guest, stream, "{message}"),
            Level::Debug => tracing::debug!(target: "guest", guest, stream, "{message}"),
            Level::Info => tracing::info!(target: "guest", guest, stream, "{message}"),
            Level::Warn => tracing::warn!(target: "guest", guest, stream, "{message}"),
            Level::Error => tracing::error!(target: "guest", guest, stream, "{message}"),
        }
    }
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.logger.line(level, &message, None);
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn lines_over_the_budget_are_counted_and_dropped() {
        let book = LogBook::default();
        let logger = GuestLogger::new("g".into(), Some(book.clone()), Arc::default());
        logger.begin_call(2);
        for _ in 0..5 {
            logger.line(Level::Info, &"x".repeat(10_000), None);
        }
        assert_eq!(logger.dropped(), 3);
        let lines = book.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].message.len(), MAX_LINE_BYTES);
    }
}
