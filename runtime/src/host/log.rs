//! `collector:api/log`: guest log lines into the agent's `tracing` log, tagged with the
//! module's name and bounded per call.

use super::collector::api::log::Host;
use super::{HostState, HostStats, Level, LogLine};

/// Longest log line kept; longer ones are cut (at a character boundary).
const MAX_LINE_BYTES: usize = 4096;

impl HostState {
    /// Writes one guest line at `level`, within the per-call line budget.
    pub(crate) fn guest_log(&mut self, level: Level, message: &str) {
        if self.call.log_lines >= self.services.limits.max_log_lines_per_call {
            self.call.dropped_log_lines += 1;
            return;
        }
        self.call.log_lines += 1;
        HostStats::bump(&self.services.stats.log_lines, 1);
        let message = truncate(message, MAX_LINE_BYTES);
        if let Some(book) = &self.services.log_book {
            book.lock().expect("log book lock").push(LogLine {
                level,
                message: message.to_string(),
            });
        }
        let guest = &*self.guest_name;
        match level {
            Level::Trace => tracing::trace!(target: "guest", guest, "{message}"),
            Level::Debug => tracing::debug!(target: "guest", guest, "{message}"),
            Level::Info => tracing::info!(target: "guest", guest, "{message}"),
            Level::Warn => tracing::warn!(target: "guest", guest, "{message}"),
            Level::Error => tracing::error!(target: "guest", guest, "{message}"),
        }
    }
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.guest_log(level, &message);
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
    use super::truncate;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
