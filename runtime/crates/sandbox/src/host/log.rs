//! `collector:api/log`, and guest stdout/stderr: guest lines into the agent's `tracing`
//! log, tagged with the module's name. Both paths share one per-call line budget and the
//! same length cap, so neither can flood the agent's log; so do the host's own warnings
//! about what a guest did (refused publishes and samples), which a guest could otherwise
//! provoke in a loop. Every guest-supplied string goes through [`quote`] before it reaches
//! the log, so no guest can forge a line that looks like the agent's own.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::collector::api::log::Host;
use super::{HostState, HostStats, Level, LogBook, LogLine};

/// Longest guest log line kept (before escaping); the rest is replaced by a marker.
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// Longest guest-supplied text (an error, a refusal reason, a subject) quoted in one of
/// the host's own log lines.
pub const MAX_QUOTED_BYTES: usize = 512;

/// `s` made safe for a log line: control characters (newlines among them), line and
/// paragraph separators and bidirectional overrides escaped as `\n`, `\u{1b}`..., and
/// only the first `max` bytes of `s` kept, followed by `… (N bytes)` with the full
/// length when it was cut. Reads no more of `s` than it keeps, so a huge input costs no
/// more than a short one.
pub fn quote(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    let mut kept = 0;
    for c in s.chars() {
        if kept + c.len_utf8() > max {
            let _ = write!(out, "… ({} bytes)", s.len());
            return out;
        }
        kept += c.len_utf8();
        if needs_escape(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Where a guest's lines go, shared by its `log` import and its output streams.
pub(crate) struct GuestLogger {
    guest: Arc<str>,
    book: Option<LogBook>,
    stats: Arc<HostStats>,
    /// Lines still allowed in the current call (guest lines and host warnings alike).
    remaining: AtomicU32,
    /// Guest lines refused in the current call.
    dropped: AtomicU32,
    /// Host warnings about the guest suppressed in the current call.
    suppressed: AtomicU32,
}

/// What the budget refused during one call, for the call's summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub lines: u32,
    pub warnings: u32,
}

impl GuestLogger {
    pub(crate) fn new(guest: Arc<str>, book: Option<LogBook>, stats: Arc<HostStats>) -> Self {
        Self {
            guest,
            book,
            stats,
            remaining: AtomicU32::new(0),
            dropped: AtomicU32::new(0),
            suppressed: AtomicU32::new(0),
        }
    }

    /// Starts the budget of a new call.
    pub(crate) fn begin_call(&self, lines: u32) {
        self.remaining.store(lines, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
        self.suppressed.store(0, Ordering::Relaxed);
    }

    /// Guest lines refused since the call began.
    pub(crate) fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// What was refused since the call began; `None` when nothing was.
    pub(crate) fn refused(&self) -> Option<Refused> {
        let refused = Refused {
            lines: self.dropped(),
            warnings: self.suppressed.load(Ordering::Relaxed),
        };
        (refused.lines > 0 || refused.warnings > 0).then_some(refused)
    }

    fn take_one(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Whether the host may log one more warning caused by this guest in this call. A
    /// refusal is counted for the call's summary line instead.
    pub(crate) fn admit_warning(&self) -> bool {
        if self.take_one() {
            return true;
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        HostStats::bump(&self.stats.log_dropped, 1);
        false
    }

    /// Writes one line, within the budget, capped and escaped.
    pub(crate) fn line(&self, level: Level, message: &str, stream: Option<&'static str>) {
        if !self.take_one() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            HostStats::bump(&self.stats.log_dropped, 1);
            return;
        }
        HostStats::bump(&self.stats.log_lines, 1);
        let message = quote(message, MAX_LINE_BYTES);
        let guest = &*self.guest;
        let stream = stream.unwrap_or("log");
        match level {
            Level::Trace => tracing::trace!(target: "guest", guest, stream, "{message}"),
            Level::Debug => tracing::debug!(target: "guest", guest, stream, "{message}"),
            Level::Info => tracing::info!(target: "guest", guest, stream, "{message}"),
            Level::Warn => tracing::warn!(target: "guest", guest, stream, "{message}"),
            Level::Error => tracing::error!(target: "guest", guest, stream, "{message}"),
        }
        if let Some(book) = &self.book {
            book.lock()
                .expect("log book lock")
                .push(LogLine { level, message });
        }
    }
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.logger.line(level, &message, None);
    }
}

impl super::v0_2::collector::api::log::Host for HostState {
    fn log(&mut self, level: super::v0_2::collector::api::types::Level, message: String) {
        use super::v0_2::collector::api::types::Level as V2;
        let level = match level {
            V2::Trace => Level::Trace,
            V2::Debug => Level::Debug,
            V2::Info => Level::Info,
            V2::Warn => Level::Warn,
            V2::Error => Level::Error,
        };
        self.logger.line(level, &message, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_line_breaks_and_controls() {
        assert_eq!(
            quote("ok\nINFO saved as the last-known-good\r\x1b[2J", 100),
            "ok\\nINFO saved as the last-known-good\\r\\u{1b}[2J"
        );
        assert_eq!(quote("a\u{2028}b\u{202e}c", 100), "a\\u{2028}b\\u{202e}c");
        assert_eq!(quote("héllo wörld", 100), "héllo wörld");
    }

    #[test]
    fn quoting_cuts_at_a_char_boundary_and_says_how_long_the_text_was() {
        assert_eq!(quote("héllo", 2), "h… (6 bytes)");
        assert_eq!(quote("héllo", 3), "hé… (6 bytes)");
        assert_eq!(quote("abc", 3), "abc");
        let huge = "x".repeat(10_000_000);
        let quoted = quote(&huge, MAX_QUOTED_BYTES);
        assert_eq!(quoted.len(), MAX_QUOTED_BYTES + "… (10000000 bytes)".len());
    }

    #[test]
    fn lines_over_the_budget_are_counted_and_dropped() {
        let book = LogBook::default();
        let stats = Arc::new(HostStats::default());
        let logger = GuestLogger::new("g".into(), Some(book.clone()), stats.clone());
        logger.begin_call(2);
        for _ in 0..5 {
            logger.line(Level::Info, &"x".repeat(10_000), None);
        }
        assert_eq!(logger.dropped(), 3);
        assert_eq!(HostStats::get(&stats.log_dropped), 3);
        let lines = book.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0].message,
            format!("{}… (10000 bytes)", "x".repeat(MAX_LINE_BYTES))
        );
    }

    #[test]
    fn host_warnings_share_the_guest_budget() {
        let logger = GuestLogger::new("g".into(), None, Arc::default());
        logger.begin_call(3);
        logger.line(Level::Info, "one", None);
        assert!(logger.admit_warning());
        assert!(logger.admit_warning());
        assert!(!logger.admit_warning(), "the budget is spent");
        logger.line(Level::Info, "dropped", None);
        assert_eq!(
            logger.refused(),
            Some(Refused {
                lines: 1,
                warnings: 1
            })
        );
        logger.begin_call(3);
        assert_eq!(logger.refused(), None);
    }
}
