//! The breaker's policy: when it opens and how it probes ([`BreakerPolicy`], the setting of
//! [`RetryingConsumerBuilder::breaker`](crate::RetryingConsumerBuilder::breaker)).

use std::time::Duration;

use crate::error::ConfigError;

/// When the consumer's outage breaker opens and how it probes: the setting of
/// [`RetryingConsumerBuilder::breaker`](crate::RetryingConsumerBuilder::breaker).
///
/// The breaker opens when **either** trigger fires (each can be turned off, not both):
///
/// - **failure rate**: at least `rate` of the last `window` calls failed, counted once at
///   least `min_calls` calls are in the window (default: 50 % of the last 20, from 3 calls);
/// - **consecutive failures**: `n` calls in a row failed, `n` ≥ 2 (off by default: at a few percent
///   of records failing on their own, a busy consumer sees three failures in a row every
///   few thousand calls, and each would pause it for the open interval).
///
/// A *call* is one handler attempt; it *failed* when it returned a transient or
/// [unavailable](crate::HandlerError::unavailable) failure (or timed out). Permanent failures
/// and panics are not counted either way.
///
/// Once open, it stays open for the open interval (default 5 s), then lets one probe record
/// through; each failed probe doubles the interval, up to the maximum (default 60 s). Both
/// are at most [`MAX_OPEN_INTERVAL`](Self::MAX_OPEN_INTERVAL), a day.
///
/// At low traffic, transient failures open the breaker only once a second record fails: in
/// an outage, a lone first record may use up its attempts before. A handler that knows the
/// downstream is down should say so with
/// [`HandlerError::unavailable`](crate::HandlerError::unavailable): such a failure counts
/// on its own and never uses up an attempt, breaker or not.
///
/// # Records that fail on their own
///
/// A record whose failure is its own (not the downstream's) never opens the breaker alone:
/// both triggers need transient failures of at least two records (an
/// [unavailable](crate::HandlerError::unavailable) failure needs no second record: it is the
/// handler's word), so its retry policy dead-letters it as without a breaker. Several such records may open it, but cannot keep it open:
/// records that have not failed in this outage probe first (a waiting one, else a fresh one
/// the scheduler dispatches), the first success closes the breaker, and failures of records
/// it held no longer move it (their retry policy decides). Only when every record that can
/// run has failed in this outage do they probe themselves, their failures still held (the
/// breaker cannot tell them from a downstream that is down); the next record that can run
/// settles it. That wait is bounded: after [`probes_per_record`](Self::with_probes_per_record)
/// (default 10) such probes fail in a row the breaker closes, and every record takes its
/// normal path (their failures count as attempts again and, as records it held, do not open
/// it again; other records' failures do). A record that transiently failed
/// `probes_per_record` probes of its own takes its normal path too.
///
/// Records are counted by event: copies of one event (a redelivery after a crash, its
/// retry-tier copies, a second publish with the same dedup key) are one record, so the
/// copies of one failing event never open the breaker between them. The event is its dedup
/// key when idempotency is on, else its source record (for a tier copy, the source record
/// its headers name).
///
/// # Many destinations
///
/// One breaker per consumer fits one downstream (an SMTP relay). For a handler that delivers
/// to many destinations (webhook endpoints, tenants' APIs), add
/// [`destinations`](crate::RetryingConsumerBuilder::destinations): each destination gets a
/// breaker of its own, and this one counts failures by destination and opens only when
/// they span [`min_destinations`](Self::with_min_destinations) of them (a downstream down as
/// a whole), its failure rate counted once its window is full (not from `min_calls`). An
/// `unavailable` failure then opens its destination's breaker, not this one.
///
/// ```
/// use std::time::Duration;
/// use kourier::BreakerPolicy;
///
/// let breaker = BreakerPolicy::default()
///     .with_failure_rate(0.5, 50, 20)
///     .with_consecutive_failures(5)
///     .with_open_interval(Duration::from_secs(2), Duration::from_secs(30));
/// assert_eq!(breaker.open_interval(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub(super) rate: Option<RateTrigger>,
    pub(super) consecutive: Option<u32>,
    open_interval: Duration,
    max_open_interval: Duration,
    probes_per_record: u32,
    min_destinations: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RateTrigger {
    pub(super) rate: f64,
    pub(super) window: u32,
    pub(super) min_calls: u32,
}

impl Default for BreakerPolicy {
    /// Opens at 50 % failures over the last 20 calls (from 3 calls); probes after 5 s,
    /// doubling to 60 s.
    fn default() -> Self {
        BreakerPolicy {
            rate: Some(RateTrigger {
                rate: 0.5,
                window: 20,
                min_calls: 3,
            }),
            consecutive: None,
            open_interval: Duration::from_secs(5),
            max_open_interval: Duration::from_secs(60),
            probes_per_record: DEFAULT_PROBES_PER_RECORD,
            min_destinations: 3,
        }
    }
}

/// [`BreakerPolicy::with_probes_per_record`]'s default.
const DEFAULT_PROBES_PER_RECORD: u32 = 10;

impl BreakerPolicy {
    /// The longest the breaker stays open before a probe: one day. Longer open intervals are
    /// taken as a day (delivery rule 17 in the crate docs), and so is a handler's
    /// [`retry_after`](crate::HandlerError::retry_after) hint that keeps an opening breaker
    /// open (hints are capped at [`HandlerError::MAX_RETRY_AFTER`](crate::HandlerError::MAX_RETRY_AFTER), also a day).
    pub const MAX_OPEN_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

    /// Opens when at least `rate` (in `(0, 1]`) of the last `window` calls failed, once at
    /// least `min_calls` (`1..=window`) calls are counted.
    #[must_use]
    pub fn with_failure_rate(mut self, rate: f64, window: u32, min_calls: u32) -> Self {
        self.rate = Some(RateTrigger {
            rate,
            window,
            min_calls,
        });
        self
    }

    /// Turns the failure-rate trigger off.
    #[must_use]
    pub fn without_failure_rate(mut self) -> Self {
        self.rate = None;
        self
    }

    /// Opens after `n` (at least 2) failed calls in a row, of two records at least.
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive = Some(n);
        self
    }

    /// Turns the consecutive-failures trigger off.
    #[must_use]
    pub fn without_consecutive_failures(mut self) -> Self {
        self.consecutive = None;
        self
    }

    /// How long the breaker stays open before its first probe (`initial`), and the most it
    /// stays open after failed probes (each doubles it). Either above
    /// [`MAX_OPEN_INTERVAL`](Self::MAX_OPEN_INTERVAL) (a day) is taken as a day, so
    /// `with_open_interval(Duration::MAX, Duration::MAX)` probes once a day. `build()`
    /// refuses a zero `initial` and a `max` below `initial`.
    #[must_use]
    pub fn with_open_interval(mut self, initial: Duration, max: Duration) -> Self {
        self.open_interval = initial.min(Self::MAX_OPEN_INTERVAL);
        self.max_open_interval = max.min(Self::MAX_OPEN_INTERVAL);
        self
    }

    /// How many probes one record may fail *transiently* before its failures count as
    /// attempts again, and how many probes in a row the breaker lets fail by records that
    /// failed in this outage already before it closes (at least 1; default 10). See
    /// *Records that fail on their own* above: records that keep failing probes while no
    /// other record can run may be failing on their own, so after `n` such failed probes
    /// (in all, not `n` each) the breaker closes and their retry policies decide again
    /// (retried with their back-off, forwarded to a retry tier, dead-lettered when their
    /// attempts are used up). With the default intervals (5 s doubling to 60 s) that is
    /// about seven minutes of probing, however many such records wait; so it is for records
    /// whose downstream is down longer than that while nothing else can run. Failures the
    /// handler calls [unavailable](crate::HandlerError::unavailable) are its word that the
    /// downstream is down: they never count toward this bound.
    #[must_use]
    pub fn with_probes_per_record(mut self, n: u32) -> Self {
        self.probes_per_record = n;
        self
    }

    /// With [destinations](crate::RetryingConsumerBuilder::destinations): the breaker opens
    /// only when the failures of a trigger (the window's, or the run of consecutive ones)
    /// span at least `n` distinct destinations (2 to 1,000; default 3). A few destinations
    /// that are down are their own breakers' business; a downstream down as a whole fails
    /// for every destination and still opens it. Without destinations it is not used:
    /// failures of two records open it, as documented above.
    #[must_use]
    pub fn with_min_destinations(mut self, n: u32) -> Self {
        self.min_destinations = n;
        self
    }

    /// With destinations: how many distinct destinations the failures must span.
    pub fn min_destinations(&self) -> u32 {
        self.min_destinations
    }

    /// How many probes one record may fail before its failures count as attempts again.
    pub fn probes_per_record(&self) -> u32 {
        self.probes_per_record
    }

    /// How long the breaker stays open before its first probe.
    pub fn open_interval(&self) -> Duration {
        self.open_interval
    }

    /// The longest the breaker stays open between probes.
    pub fn max_open_interval(&self) -> Duration {
        self.max_open_interval
    }

    /// Checks the settings (called by `build()`).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| Err(ConfigError::invalid("breaker", reason));
        if self.rate.is_none() && self.consecutive.is_none() {
            return invalid("needs a failure rate or a consecutive-failures trigger".into());
        }
        if let Some(r) = self.rate {
            if !(r.rate > 0.0 && r.rate <= 1.0) {
                return invalid(format!("failure rate {} must be in (0, 1]", r.rate));
            }
            if r.window == 0 || r.min_calls == 0 || r.min_calls > r.window {
                return invalid(format!(
                    "min_calls ({}) must be in 1..=window ({})",
                    r.min_calls, r.window
                ));
            }
        }
        if self.consecutive.is_some_and(|n| n < 2) {
            return invalid(
                "consecutive_failures must be at least 2 (failures of two records)".into(),
            );
        }
        check_open_interval(self.open_interval, self.max_open_interval).or_else(invalid)?;
        if self.probes_per_record == 0 {
            return invalid("probes_per_record must be at least 1".into());
        }
        if !(2..=1000).contains(&self.min_destinations) {
            return invalid(format!(
                "min_destinations ({}) must be in 2..=1000",
                self.min_destinations
            ));
        }
        Ok(())
    }

    /// The open interval after `failed_probes` failed probes.
    pub(super) fn interval(&self, failed_probes: u32) -> Duration {
        doubled(self.open_interval, self.max_open_interval, failed_probes)
    }
}

/// `initial` doubled `failed_probes` times, at most `max`: a breaker's open interval.
pub(super) fn doubled(initial: Duration, max: Duration, failed_probes: u32) -> Duration {
    let factor = 2u32.saturating_pow(failed_probes.min(30));
    initial.saturating_mul(factor).min(max)
}

/// Why an open interval is refused, if it is: zero, or a maximum below the initial one.
pub(super) fn check_open_interval(initial: Duration, max: Duration) -> Result<(), String> {
    if initial.is_zero() {
        return Err("the open interval must be longer than zero".into());
    }
    if max < initial {
        return Err(format!(
            "the maximum open interval ({max:?}) must be at least the initial one ({initial:?})"
        ));
    }
    Ok(())
}
