//! When the next tick is due, in one place for the real-time agent and the mock host's
//! virtual time, so that guests see the same cadence in tests as in production.
//!
//! Time is a monotonic offset (`Duration` since an origin). The first tick is immediate;
//! after an interval change the ticker restarts (one tick at once, then one per new
//! interval), as a freshly created `tokio::time::interval` would.

use std::time::Duration;

use collector_shared::config::FALLBACK_HOST_PERF_INTERVAL;

/// Deadline bookkeeping of a periodic tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticker {
    next: Duration,
    floor: Duration,
}

impl Ticker {
    /// A ticker whose first tick is due at `now`. Intervals below `floor` are raised to it.
    pub fn new(now: Duration, floor: Duration) -> Self {
        Self { next: now, floor }
    }

    /// When the next tick is due.
    pub fn next(&self) -> Duration {
        self.next
    }

    /// The period to use for a guest interval: floored, and the default cadence while
    /// the guest has not said (for instance while it cannot be instantiated).
    pub fn period(&self, guest_interval: Option<Duration>) -> Duration {
        guest_interval
            .unwrap_or(FALLBACK_HOST_PERF_INTERVAL)
            .max(self.floor)
    }

    /// The interval changed: tick at once, then at the new period.
    pub fn restart(&mut self, now: Duration) {
        self.next = now;
    }

    /// As [`Ticker::ticked`], but the next tick falls on the grid of multiples of the
    /// period (counted from the origin of `now`): tickers of one origin with the same
    /// period then tick in the same instant, so their modules can share one enumeration.
    pub fn ticked_on_grid(&mut self, now: Duration, guest_interval: Option<Duration>) {
        let period = self.period(guest_interval).max(Duration::from_nanos(1));
        let periods = now.as_nanos() / period.as_nanos() + 1;
        self.next = Duration::from_nanos(
            u64::try_from(periods.saturating_mul(period.as_nanos())).unwrap_or(u64::MAX),
        );
    }

    /// A tick due at [`Ticker::next`] ran and finished at `now`. Keeps the phase; after an
    /// overrun, skips the missed ticks rather than bursting to catch up.
    pub fn ticked(&mut self, now: Duration, guest_interval: Option<Duration>) {
        let period = self.period(guest_interval);
        self.next += period;
        if self.next <= now {
            self.next = now + period;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_tick_immediate_then_periodic_with_phase_kept() {
        let mut t = Ticker::new(Duration::ZERO, Duration::from_millis(10));
        assert_eq!(t.next(), Duration::ZERO);
        t.ticked(Duration::from_millis(30), Some(2 * S));
        assert_eq!(t.next(), 2 * S);
        t.ticked(2 * S + Duration::from_millis(500), Some(2 * S));
        assert_eq!(t.next(), 4 * S, "a slow tick does not shift the phase");
    }

    #[test]
    fn overruns_skip_missed_ticks_and_restart_is_immediate() {
        let mut t = Ticker::new(Duration::ZERO, Duration::ZERO);
        t.ticked(5 * S, Some(S));
        assert_eq!(t.next(), 6 * S);
        t.restart(5 * S + Duration::from_millis(1));
        assert_eq!(t.next(), 5 * S + Duration::from_millis(1));
    }

    #[test]
    fn grid_ticks_of_two_tickers_coincide_after_their_first_tick() {
        let ms = Duration::from_millis;
        let mut a = Ticker::new(ms(130), ms(10));
        let mut b = Ticker::new(ms(370), ms(10));
        a.ticked_on_grid(ms(131), Some(ms(250)));
        b.ticked_on_grid(ms(372), Some(ms(250)));
        assert_eq!((a.next(), b.next()), (ms(250), ms(500)));
        a.ticked_on_grid(ms(251), Some(ms(250)));
        assert_eq!(a.next(), b.next());
        a.ticked_on_grid(ms(1100), Some(ms(250)));
        assert_eq!(
            a.next(),
            ms(1250),
            "an overrun skips to the next grid point"
        );
    }

    #[test]
    fn period_is_floored_and_defaults_while_unknown() {
        let t = Ticker::new(Duration::ZERO, S);
        assert_eq!(t.period(Some(Duration::from_millis(1))), S);
        assert_eq!(t.period(None), FALLBACK_HOST_PERF_INTERVAL);
    }
}
