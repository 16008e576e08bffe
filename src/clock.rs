//! Durations meet clocks here, and only here (delivery rule 17).
//!
//! `Instant + Duration` panics when the sum does not fit (`Duration::MAX` is a natural way to
//! say "never" in a setting, and a handler's hint or a header can hold anything). Every place
//! in the crate that computes a deadline or a due time calls [`after`], which caps the
//! duration at [`LONGEST`] and never panics.

use std::time::{Duration, SystemTime};

/// The longest duration kourier acts on: one year. Settings and hints above it are taken as
/// this long ("never", for a consumer), as each setting's docs say.
pub(crate) const LONGEST: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The longest a handler's retry-after hint waits: one day (`HandlerError::MAX_RETRY_AFTER`).
/// A hint is untrusted input (it often comes from a downstream's reply).
pub(crate) const LONGEST_HINT: Duration = Duration::from_secs(24 * 60 * 60);

/// `d`, capped at [`LONGEST`].
pub(crate) fn bounded(d: Duration) -> Duration {
    d.min(LONGEST)
}

/// A point in time a duration can be added to without panicking.
pub(crate) trait Clock: Copy {
    /// `self + d`, or `None` when it does not fit.
    fn checked_after(self, d: Duration) -> Option<Self>;
}

impl Clock for std::time::Instant {
    fn checked_after(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

impl Clock for tokio::time::Instant {
    fn checked_after(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

impl Clock for SystemTime {
    fn checked_after(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

/// `at + d`, with `d` capped at [`LONGEST`]; never panics (if even that does not fit, which
/// no real clock reaches, `at` itself).
pub(crate) fn after<C: Clock>(at: C, d: Duration) -> C {
    at.checked_after(bounded(d)).unwrap_or(at)
}

/// `d` from now on the runtime's clock (paused in tests), capped like [`after`].
pub(crate) fn deadline_in(d: Duration) -> tokio::time::Instant {
    after(tokio::time::Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_durations_never_panic_and_are_capped() {
        let now = std::time::Instant::now();
        assert_eq!(after(now, Duration::MAX), after(now, LONGEST));
        assert_eq!(
            after(now, Duration::from_nanos(1)),
            now + Duration::from_nanos(1)
        );
        assert_eq!(after(now, Duration::ZERO), now);
        let wall = SystemTime::UNIX_EPOCH;
        assert_eq!(after(wall, Duration::MAX), wall + LONGEST);
        let t = tokio::time::Instant::now();
        assert_eq!(after(t, Duration::MAX) - t, LONGEST);
        assert_eq!(bounded(Duration::MAX), LONGEST);
        assert_eq!(bounded(Duration::from_secs(5)), Duration::from_secs(5));
    }
}
