//! Retry policies: *whether* and *when* to try a failed record again.
//!
//! A policy only decides; the consumer does the waiting (an async timer, while it keeps
//! polling Kafka), so a long back-off never pushes the consumer out of its group.

use std::time::Duration;

use crate::clock;
use crate::error::ConfigError;

/// What a [`RetryPolicy`] says after a failed attempt.
///
/// `#[non_exhaustive]`: code that matches on it needs a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop retrying: the record is dead-lettered as `retries-exhausted`.
    GiveUp,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backoff {
    Fixed(Duration),
    Exponential {
        initial: Duration,
        factor: f64,
        max: Duration,
    },
}

/// How often and how long to retry a transiently failing record.
///
/// Counts are explicit: **attempts** include the first try, **retries** do not.
/// [`RetryPolicy::fixed`]`(500 ms, 3)` — the starting design's `FixedBackOff(500, 3)` and
/// this type's `Default` — makes 3 retries, so 4 attempts in all.
///
/// ```
/// use std::time::Duration;
/// use kourier::RetryPolicy;
///
/// let starting_design = RetryPolicy::fixed(Duration::from_millis(500), 3);
/// assert_eq!(starting_design.max_attempts(), 4);
///
/// let exponential = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(10))
///     .with_max_attempts(8)
///     .with_jitter(0.5)
///     .with_max_elapsed(Duration::from_secs(60));
/// assert_eq!(exponential.max_attempts(), 8);
/// ```
///
/// # Durations
///
/// Every delay it is given (`fixed`, `exponential`'s initial and maximum delay,
/// `with_max_elapsed`) above one year is taken as one year, and a delay that grows past its
/// cap (or past what a `Duration` holds) stays at the cap: `RetryPolicy::fixed(Duration::MAX,
/// 1)` waits a year before its retry (a revoke or shutdown gives the waiting record up at
/// once). A handler's [`retry_after`](crate::HandlerError::retry_after) hint counts up to
/// [`HandlerError::MAX_RETRY_AFTER`](crate::HandlerError::MAX_RETRY_AFTER) (a day). Deciding never panics, whatever the numbers
/// (delivery rule 17 in the crate docs).
///
/// ```
/// use std::time::Duration;
/// use kourier::{RetryDecision, RetryPolicy};
///
/// let never = RetryPolicy::fixed(Duration::MAX, 1);
/// let year = Duration::from_secs(365 * 24 * 3600);
/// assert_eq!(never.decide(1, Duration::ZERO, None), RetryDecision::RetryAfter(year));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    jitter: f64,
    max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 500 ms fixed back-off, 3 retries (4 attempts): the starting design's policy.
    fn default() -> Self {
        RetryPolicy::fixed(Duration::from_millis(500), 3)
    }
}

impl RetryPolicy {
    /// A fixed `delay` between attempts and `retries` retries after the first attempt. A
    /// delay above one year is taken as one year.
    pub fn fixed(delay: Duration, retries: u32) -> Self {
        RetryPolicy {
            max_attempts: retries.saturating_add(1),
            backoff: Backoff::Fixed(clock::bounded(delay)),
            jitter: 0.0,
            max_elapsed: None,
        }
    }

    /// Exponential back-off starting at `initial`, doubling, capped at `max_delay`, with
    /// 5 attempts and 50 % jitter until changed. Delays above one year are taken as one year.
    pub fn exponential(initial: Duration, max_delay: Duration) -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential {
                initial: clock::bounded(initial),
                factor: 2.0,
                max: clock::bounded(max_delay),
            },
            jitter: 0.5,
            max_elapsed: None,
        }
    }

    /// Never retry: a transient failure is dead-lettered after its single attempt.
    pub fn no_retries() -> Self {
        RetryPolicy::fixed(Duration::ZERO, 0)
    }

    /// Sets the total number of attempts, the first try included. Must be at least 1.
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the number of retries after the first attempt (attempts = retries + 1).
    #[must_use]
    pub fn with_max_retries(mut self, retries: u32) -> Self {
        self.max_attempts = retries.saturating_add(1);
        self
    }

    /// Sets the growth factor of an exponential policy (ignored by fixed ones). Must be ≥ 1.
    #[must_use]
    pub fn with_factor(mut self, factor: f64) -> Self {
        if let Backoff::Exponential { factor: f, .. } = &mut self.backoff {
            *f = factor;
        }
        self
    }

    /// Randomises each delay down by up to this fraction (0.0 = none, 1.0 = anywhere in
    /// `0..=delay`), so that many consumers do not retry in lockstep.
    #[must_use]
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Gives up once the next attempt would start later than `max_elapsed` after the first.
    /// Above one year it is taken as one year.
    #[must_use]
    pub fn with_max_elapsed(mut self, max_elapsed: Duration) -> Self {
        self.max_elapsed = Some(clock::bounded(max_elapsed));
        self
    }

    /// Total attempts, the first try included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_attempts.saturating_sub(1)
    }

    /// The delay before retry number `retry` (1 = the first retry), before jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        match self.backoff {
            Backoff::Fixed(d) => d,
            Backoff::Exponential {
                initial,
                factor,
                max,
            } => {
                let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
                let secs = initial.as_secs_f64() * factor.powi(exp);
                // Past the cap, infinite or NaN (a factor `validate` refuses): the cap. A
                // negative one (idem): no delay. Never a panicking conversion.
                if secs.is_nan() || secs >= max.as_secs_f64() {
                    max
                } else {
                    Duration::try_from_secs_f64(secs.max(0.0)).map_or(max, |d| d.min(max))
                }
            }
        }
    }

    /// Decides after a failed attempt.
    ///
    /// `attempts_made` counts the attempts so far (1 after the first try), `elapsed` is the
    /// time since the first attempt started, `hint` a handler's retry-after hint.
    pub fn decide(
        &self,
        attempts_made: u32,
        elapsed: Duration,
        hint: Option<Duration>,
    ) -> RetryDecision {
        self.decide_with(attempts_made, elapsed, hint, fastrand::f64())
    }

    fn decide_with(
        &self,
        attempts_made: u32,
        elapsed: Duration,
        hint: Option<Duration>,
        random: f64,
    ) -> RetryDecision {
        if attempts_made >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        let base = self.base_delay(attempts_made);
        let jittered = scaled(
            base,
            1.0 - self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0),
        );
        // A hint is untrusted (delivery rule 17): at most a day, however it got here.
        let delay = hint.map_or(jittered, |h| h.min(clock::LONGEST_HINT).max(jittered));
        match self.max_elapsed {
            Some(limit) if elapsed.saturating_add(delay) > limit => RetryDecision::GiveUp,
            _ => RetryDecision::RetryAfter(delay),
        }
    }

    /// Checks the policy's numbers; `build()` calls this.
    ///
    /// # Errors
    /// A [`ConfigError`] for zero attempts, a factor below 1, jitter outside `0..=1`, or an
    /// exponential policy whose cap is below its initial delay.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "retry_policy",
                "max attempts must be at least 1 (the first try counts as an attempt)",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::invalid(
                "retry_policy",
                format!("jitter must be within 0.0..=1.0, got {}", self.jitter),
            ));
        }
        if let Backoff::Exponential {
            initial,
            factor,
            max,
        } = self.backoff
        {
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(ConfigError::invalid(
                    "retry_policy",
                    format!("exponential factor must be a finite number ≥ 1, got {factor}"),
                ));
            }
            if max < initial {
                return Err(ConfigError::invalid(
                    "retry_policy",
                    format!("max delay {max:?} is below the initial delay {initial:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Exponential back-off with equal jitter, for kourier's own infrastructure waits (a store
/// outage, a busy claim, a failed dead-letter write, a Redis reconnect) — not the user's
/// [`RetryPolicy`]. Wait `n` (0-based) is drawn uniformly from `[d/2, d]`, where
/// `d = min(base · 2ⁿ, max)`.
pub(crate) fn infra_backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let d = base.saturating_mul(1u32 << n.min(20)).min(max);
    let half = d / 2;
    half + scaled(half, fastrand::f64())
}

/// `d × fraction` for a fraction in `0..=1` (clamped; `d` itself when it is NaN), rounded
/// down to whole nanoseconds. Unlike `Duration::mul_f64`, it never panics.
fn scaled(d: Duration, fraction: f64) -> Duration {
    if fraction.is_nan() {
        return d;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * fraction.clamp(0.0, 1.0)).map_or(d, |s| s.min(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starting_design_is_four_attempts_of_500ms() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 4);
        assert_eq!(p.max_retries(), 3);
        for made in 1..=3 {
            assert_eq!(
                p.decide(made, Duration::ZERO, None),
                RetryDecision::RetryAfter(500 * MS)
            );
        }
        assert_eq!(p.decide(4, Duration::ZERO, None), RetryDecision::GiveUp);
    }

    #[test]
    fn exponential_grows_and_caps() {
        let p = RetryPolicy::exponential(100 * MS, 1000 * MS).with_max_attempts(10);
        let delays: Vec<_> = (1..=6).map(|r| p.base_delay(r)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(p.base_delay(u32::MAX), 1000 * MS);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = RetryPolicy::fixed(1000 * MS, 5).with_jitter(0.5);
        assert_eq!(
            p.decide_with(1, Duration::ZERO, None, 0.0),
            RetryDecision::RetryAfter(1000 * MS)
        );
        assert_eq!(
            p.decide_with(1, Duration::ZERO, None, 1.0),
            RetryDecision::RetryAfter(500 * MS)
        );
        for _ in 0..1000 {
            match p.decide(1, Duration::ZERO, None) {
                RetryDecision::RetryAfter(d) => assert!((500 * MS..=1000 * MS).contains(&d)),
                RetryDecision::GiveUp => panic!("gave up too early"),
            }
        }
    }

    #[test]
    fn max_elapsed_and_hint() {
        let p = RetryPolicy::fixed(100 * MS, 100).with_max_elapsed(Duration::from_secs(1));
        assert_eq!(
            p.decide(1, 850 * MS, None),
            RetryDecision::RetryAfter(100 * MS)
        );
        assert_eq!(p.decide(1, 950 * MS, None), RetryDecision::GiveUp);
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(300 * MS)),
            RetryDecision::RetryAfter(300 * MS)
        );
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(10 * MS)),
            RetryDecision::RetryAfter(100 * MS)
        );
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(
            RetryPolicy::default()
                .with_max_attempts(0)
                .validate()
                .is_err()
        );
        assert!(RetryPolicy::default().with_jitter(1.5).validate().is_err());
        assert!(
            RetryPolicy::exponential(MS, MS)
                .with_factor(0.5)
                .validate()
                .is_err()
        );
        assert!(RetryPolicy::exponential(10 * MS, MS).validate().is_err());
        assert!(RetryPolicy::no_retries().validate().is_ok());
        assert_eq!(RetryPolicy::no_retries().max_attempts(), 1);
    }

    #[test]
    fn infra_backoff_doubles_to_its_cap_with_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for n in 0..40 {
            let d = infra_backoff(base, max, n);
            let cap = (base * 2u32.pow(n.min(20))).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "{n}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);
    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    /// Delays of `Duration::MAX` (or growing past it) are capped at a year, a hint at a day;
    /// deciding never panics (`mul_f64` on `Duration::MAX` did).
    #[test]
    fn extreme_delays_are_capped_and_never_panic() {
        for p in [
            RetryPolicy::fixed(Duration::MAX, 1),
            RetryPolicy::fixed(Duration::MAX, 1).with_jitter(1.0),
            RetryPolicy::exponential(Duration::MAX, Duration::MAX),
            RetryPolicy::exponential(MS, Duration::MAX).with_max_attempts(u32::MAX),
            RetryPolicy::fixed(MS, 5).with_max_elapsed(Duration::MAX),
        ] {
            for made in [1, 2, 100, u32::MAX - 1] {
                if let RetryDecision::RetryAfter(d) = p.decide(made, Duration::MAX, None) {
                    assert!(d <= YEAR, "{p:?} after {made}: {d:?}");
                }
            }
        }
        assert_eq!(
            RetryPolicy::fixed(Duration::MAX, 1).decide(1, Duration::ZERO, None),
            RetryDecision::RetryAfter(YEAR)
        );
        assert_eq!(
            RetryPolicy::fixed(MS, 3).decide(1, Duration::ZERO, Some(Duration::MAX)),
            RetryDecision::RetryAfter(DAY),
            "a hint is capped at a day"
        );
    }

    fn extreme() -> impl proptest::strategy::Strategy<Value = Duration> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_nanos(1)),
            Just(MS),
            Just(YEAR),
            Just(Duration::MAX),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any policy (valid or not), any state, any hint: a decision, never a panic; a
        /// delay never above a year.
        #[test]
        fn deciding_never_panics(
            initial in extreme(),
            max in extreme(),
            factor in proptest::prelude::any::<f64>(),
            jitter in proptest::prelude::any::<f64>(),
            random in proptest::prelude::any::<f64>(),
            exponential in proptest::prelude::any::<bool>(),
            attempts in proptest::prelude::any::<u32>(),
            made in proptest::prelude::any::<u32>(),
            elapsed in extreme(),
            max_elapsed in proptest::option::of(extreme()),
            hint in proptest::option::of(extreme()),
        ) {
            let mut p = if exponential {
                RetryPolicy::exponential(initial, max).with_factor(factor)
            } else {
                RetryPolicy::fixed(initial, 3)
            }
            .with_jitter(jitter)
            .with_max_attempts(attempts);
            if let Some(limit) = max_elapsed {
                p = p.with_max_elapsed(limit);
            }
            let _ = p.base_delay(made);
            if let RetryDecision::RetryAfter(d) = p.decide_with(made, elapsed, hint, random) {
                proptest::prop_assert!(d <= YEAR, "{:?}", d);
            }
        }
    }
}
