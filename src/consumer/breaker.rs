//! The outage breaker (DESIGN rule 16): when the downstream a handler calls is down, records
//! wait instead of using up their attempts and filling the dead-letter topic.
//!
//! One breaker per consumer, shared by the scheduler (which holds dispatch while it is not
//! closed) and the workers (which ask it before every attempt and report every result):
//!
//! ```text
//!            failures cross a threshold              open interval passed
//!  Closed ─────────────────────────────────► Open ─────────────────────────► HalfOpen
//!    ▲                                        ▲   (interval doubles, capped)   │ one probe
//!    │            probe succeeded             │         probe failed           │ record
//!    └────────────────────────────────────────┼────────────────────────────────┘
//!                                             └────────────────────────────────┘
//! ```
//!
//! - **Closed**: records run; every transient or unavailable failure and every success goes
//!   into a sliding window of the last calls and a consecutive-failure count.
//! - **Open**: the scheduler dispatches nothing new (the poll thread keeps polling; flow
//!   control pauses partitions as their buffers fill). A record whose attempt fails
//!   transiently now, or that is about to start an attempt, waits in its worker: its lane
//!   stays blocked (order holds), its claim is released, the failure uses up no attempt and
//!   is never dead-lettered. A revoke or a shutdown gives a waiting record up at once.
//! - **HalfOpen**: one record — a waiting one, else the next one dispatched — is the probe.
//!   Success closes the breaker (everyone goes at full speed); a transient failure opens it
//!   again with twice the interval. A probe that ends otherwise (permanent failure,
//!   duplicate, given up) hands the probe to the next record.
//!
//! Results of calls that started before the breaker opened (stragglers) do not move it.
//! Permanent failures and panics say nothing about the downstream: they are not counted.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::stop::Stop;
use crate::error::ConfigError;
use crate::handler::{FailureKind, HandlerError};
use crate::metrics::ConsumerMetrics;
use crate::retry::infra_backoff;

/// When the consumer's outage breaker opens and how it probes: the setting of
/// [`RetryingConsumerBuilder::breaker`](crate::RetryingConsumerBuilder::breaker).
///
/// The breaker opens when **either** trigger fires (each can be turned off, not both):
///
/// - **failure rate**: at least `rate` of the last `window` calls failed, counted once at
///   least `min_calls` calls are in the window (default: 50 % of the last 20, from 10 calls);
/// - **consecutive failures**: `n` calls in a row failed (default 3).
///
/// A *call* is one handler attempt; it *failed* when it returned a transient or
/// [unavailable](crate::HandlerError::unavailable) failure (or timed out). Permanent failures
/// and panics are not counted either way.
///
/// Once open, it stays open for the open interval (default 5 s), then lets one probe record
/// through; each failed probe doubles the interval, up to the maximum (default 60 s).
///
/// Keep `consecutive_failures` below the retry policy's attempts: in partition order with
/// one partition, a lone record then opens the breaker before it uses up its attempts.
///
/// # Why one breaker per consumer
///
/// Keyed breakers (one per downstream, chosen from the message) are not offered: the
/// scheduler holds dispatch *before* a record is decoded, so it cannot know which downstream
/// a held record would call; a keyed breaker could only park records in workers, where they
/// hold `max_in_flight` slots that other downstreams' records need (rule 16). One consumer
/// per downstream (its own group, or a topic per downstream) gives the same isolation
/// cleanly.
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
    rate: Option<RateTrigger>,
    consecutive: Option<u32>,
    open_interval: Duration,
    max_open_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct RateTrigger {
    rate: f64,
    window: u32,
    min_calls: u32,
}

impl Default for BreakerPolicy {
    /// Opens at 50 % failures over the last 20 calls (from 10 calls) or 3 consecutive
    /// failures; probes after 5 s, doubling to 60 s.
    fn default() -> Self {
        BreakerPolicy {
            rate: Some(RateTrigger {
                rate: 0.5,
                window: 20,
                min_calls: 10,
            }),
            consecutive: Some(3),
            open_interval: Duration::from_secs(5),
            max_open_interval: Duration::from_secs(60),
        }
    }
}

impl BreakerPolicy {
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

    /// Opens after `n` (at least 1) failed calls in a row.
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
    /// stays open after failed probes (each doubles it).
    #[must_use]
    pub fn with_open_interval(mut self, initial: Duration, max: Duration) -> Self {
        self.open_interval = initial;
        self.max_open_interval = max;
        self
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
        if self.consecutive == Some(0) {
            return invalid("consecutive_failures must be at least 1".into());
        }
        if self.open_interval.is_zero() {
            return invalid("the open interval must be longer than zero".into());
        }
        if self.max_open_interval < self.open_interval {
            return invalid(format!(
                "the maximum open interval ({:?}) must be at least the initial one ({:?})",
                self.max_open_interval, self.open_interval
            ));
        }
        Ok(())
    }

    /// The open interval after `failed_probes` failed probes.
    fn interval(&self, failed_probes: u32) -> Duration {
        let factor = 2u32.saturating_pow(failed_probes.min(30));
        self.open_interval
            .saturating_mul(factor)
            .min(self.max_open_interval)
    }
}

/// The state of a consumer's outage breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Records run at full speed.
    Closed,
    /// The downstream is down: nothing new is dispatched, failing records wait.
    Open,
    /// One probe record is being (or about to be) tried.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`: the `state` label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of the breaker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerTransition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// When it changed.
    pub at: SystemTime,
}

/// The breaker's state in a [`ConsumerSnapshot`](crate::ConsumerSnapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// The state now.
    pub state: BreakerState,
    /// Since when it holds.
    pub since: SystemTime,
    /// Times it opened (re-opening after a failed probe included).
    pub opened: u64,
    /// Probes let through (each half-open period lets one).
    pub probes: u64,
    /// Failed calls the breaker absorbed: they used up no attempt and dead-lettered nothing.
    pub held_failures: u64,
    /// Records waiting in workers for the breaker now.
    pub waiting: usize,
    /// How long the breaker stays open next time it opens (or now, if open).
    pub open_interval: Duration,
    /// The last transitions, oldest first (at most [`BreakerStatus::RECENT`]).
    pub recent: Vec<BreakerTransition>,
}

impl BreakerStatus {
    /// How many transitions [`recent`](Self::recent) keeps.
    pub const RECENT: usize = 32;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    since: SystemTime,
    /// Closes, opens, half-opens so far: calls remember the epoch they started in, so that
    /// a straggler's result does not move a breaker that changed since.
    epoch: u64,
    /// The last calls, `true` = failed.
    window: VecDeque<bool>,
    failures_in_window: u32,
    consecutive: u32,
    /// Failed probes since the breaker last closed.
    failed_probes: u32,
    /// Half-open: a record holds the probe.
    probe_out: bool,
    /// Half-open: the scheduler dispatched a record to become the probe.
    probe_dispatched: bool,
    waiting: usize,
    opened: u64,
    probes: u64,
    held_failures: u64,
    recent: VecDeque<BreakerTransition>,
}

/// A consumer's breaker: see the module docs.
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
    /// Woken on every change that may let a waiting record go.
    changed: Notify,
    metrics: Arc<ConsumerMetrics>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("policy", &self.policy)
            .field("state", &self.lock().phase.state())
            .finish_non_exhaustive()
    }
}

/// What the worker does with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The usual path: the retry policy decides (retry or dead-letter).
    Policy,
    /// Not the record's fault: wait this long (cancellable), then go back to the breaker,
    /// without counting the attempt.
    Hold(Duration),
}

/// Leave to make one attempt, from [`OutageGate::admit`]. Report its result with
/// [`Pass::succeeded`] or [`Pass::failed`]; dropped unreported (the attempt was given up, or
/// none was made), a probe passes to the next record.
pub(crate) struct Pass<'a> {
    breaker: Option<&'a Breaker>,
    epoch: u64,
    probe: bool,
}

impl Pass<'_> {
    /// The attempt succeeded.
    pub(crate) fn succeeded(mut self) {
        if let Some(b) = self.breaker.take() {
            b.on_success(self.epoch, self.probe);
        }
    }

    /// The attempt failed with `error`; `holds` is how many times this record was held
    /// already (for the back-off of an unavailable downstream while the breaker is closed).
    pub(crate) fn failed(mut self, error: &HandlerError, holds: u32) -> Verdict {
        let unavailable = error.kind() == FailureKind::Unavailable;
        let counted = unavailable || error.kind() == FailureKind::Transient;
        let closed = match self.breaker.take() {
            Some(b) if counted => b.on_failure(self.epoch, self.probe, error.retry_after_hint()),
            Some(b) => {
                b.return_probe(self.probe);
                true
            }
            None => true,
        };
        if !closed && counted {
            Verdict::Hold(Duration::ZERO)
        } else if unavailable {
            let backoff = infra_backoff(Duration::from_millis(100), Duration::from_secs(5), holds);
            Verdict::Hold(backoff.max(error.retry_after_hint().unwrap_or_default()))
        } else {
            Verdict::Policy
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.return_probe(self.probe);
        }
    }
}

/// The worker's side of the breaker; without one, only [`HandlerError::unavailable`] is
/// special (the record waits with back-off instead of using up attempts).
#[derive(Debug, Clone, Default)]
pub(crate) struct OutageGate(pub(crate) Option<Arc<Breaker>>);

impl OutageGate {
    /// Waits until the breaker lets an attempt go; `None` when `stop` gives the record up
    /// first (a revoke or shutdown: nothing of the record runs while it waits).
    pub(crate) async fn admit(&self, stop: &Stop) -> Option<Pass<'_>> {
        let Some(b) = self.0.as_deref() else {
            return Some(Pass {
                breaker: None,
                epoch: 0,
                probe: false,
            });
        };
        // The fast path (closed): one lock, no waiter registered.
        if let Ok(pass) = b.try_admit() {
            return Some(pass);
        }
        let mut counted = WaitingGuard(None);
        loop {
            let notified = b.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after registering, so a change in between wakes this waiter.
            let wake_at = match b.try_admit() {
                Ok(pass) => return Some(pass),
                Err(wake_at) => wake_at,
            };
            if counted.0.is_none() {
                b.lock().waiting += 1;
                counted.0 = Some(b);
            }
            let until_probe = async {
                match wake_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = until_probe => {}
                () = stop.drain.cancelled() => return None,
                () = stop.abandon.cancelled() => return None,
            }
        }
    }
}

struct WaitingGuard<'a>(Option<&'a Breaker>);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0 {
            b.lock().waiting -= 1;
        }
    }
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy, metrics: Arc<ConsumerMetrics>) -> Self {
        Breaker {
            policy,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                since: SystemTime::now(),
                epoch: 0,
                window: VecDeque::new(),
                failures_in_window: 0,
                consecutive: 0,
                failed_probes: 0,
                probe_out: false,
                probe_dispatched: false,
                waiting: 0,
                opened: 0,
                probes: 0,
                held_failures: 0,
                recent: VecDeque::new(),
            }),
            changed: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For the scheduler: may a new record be dispatched now? Closed: yes. Half-open with
    /// nobody waiting to probe: one record, once. Otherwise no.
    pub(crate) fn dispatch_allowed(&self) -> bool {
        let mut s = self.lock();
        self.expire(&mut s);
        match s.phase {
            Phase::Closed => true,
            Phase::HalfOpen if !s.probe_out && !s.probe_dispatched && s.waiting == 0 => {
                s.probe_dispatched = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the breaker holds dispatch now (no probe is reserved by asking).
    pub(crate) fn holds_dispatch(&self) -> bool {
        self.lock().phase != Phase::Closed
    }

    /// A pass, or when to look again (`None`: when woken).
    fn try_admit(&self) -> Result<Pass<'_>, Option<Instant>> {
        let mut s = self.lock();
        self.expire(&mut s);
        match s.phase {
            Phase::Closed => Ok(Pass {
                breaker: Some(self),
                epoch: s.epoch,
                probe: false,
            }),
            Phase::HalfOpen if !s.probe_out => {
                s.probe_out = true;
                s.probes += 1;
                Ok(Pass {
                    breaker: Some(self),
                    epoch: s.epoch,
                    probe: true,
                })
            }
            Phase::HalfOpen => Err(None),
            Phase::Open { until } => Err(Some(until)),
        }
    }

    /// Open → half-open once the open interval has passed.
    fn expire(&self, s: &mut Inner) {
        if let Phase::Open { until } = s.phase
            && Instant::now() >= until
        {
            self.transition(s, Phase::HalfOpen);
            info!(
                waiting = s.waiting,
                "breaker half-open: one probe record goes through"
            );
        }
    }

    fn on_success(&self, epoch: u64, probe: bool) {
        let mut s = self.lock();
        if epoch != s.epoch {
            return;
        }
        match s.phase {
            Phase::Closed => self.record(&mut s, false),
            Phase::HalfOpen if probe => {
                self.transition(&mut s, Phase::Closed);
                info!(
                    waiting = s.waiting,
                    "breaker closed: the probe succeeded; records run at full speed again"
                );
            }
            _ => {}
        }
    }

    /// Counts a failed call; returns whether the breaker is closed afterwards.
    fn on_failure(&self, epoch: u64, probe: bool, hint: Option<Duration>) -> bool {
        let mut s = self.lock();
        if epoch == s.epoch {
            match s.phase {
                Phase::Closed => {
                    self.record(&mut s, true);
                    if let Some(why) = self.tripped(&s) {
                        let open_for = self.open(&mut s, hint);
                        warn!(
                            reason = %why,
                            ?open_for,
                            "breaker opened: the downstream looks unavailable; records wait (no attempts used, nothing dead-lettered) until a probe succeeds"
                        );
                    }
                }
                Phase::HalfOpen if probe => {
                    s.failed_probes = s.failed_probes.saturating_add(1);
                    let open_for = self.open(&mut s, hint);
                    warn!(
                        ?open_for,
                        failed_probes = s.failed_probes,
                        "breaker re-opened: the probe failed"
                    );
                }
                _ => {}
            }
        }
        let closed = s.phase == Phase::Closed;
        if !closed {
            s.held_failures += 1;
            drop(s);
            self.metrics.breaker_held_failure();
        }
        closed
    }

    /// A probe that ended without a verdict (permanent failure, duplicate, given up): the
    /// next record may probe.
    fn return_probe(&self, probe: bool) {
        if !probe {
            return;
        }
        let mut s = self.lock();
        if s.phase == Phase::HalfOpen && s.probe_out {
            s.probe_out = false;
            s.probe_dispatched = false;
            drop(s);
            self.changed.notify_waiters();
        }
    }

    fn record(&self, s: &mut Inner, failed: bool) {
        if failed {
            s.consecutive = s.consecutive.saturating_add(1);
        } else {
            s.consecutive = 0;
        }
        if let Some(r) = self.policy.rate {
            s.window.push_back(failed);
            s.failures_in_window += u32::from(failed);
            while s.window.len() > r.window as usize {
                if s.window.pop_front() == Some(true) {
                    s.failures_in_window -= 1;
                }
            }
        }
    }

    /// Why the breaker must open now, if it must.
    fn tripped(&self, s: &Inner) -> Option<String> {
        if let Some(n) = self.policy.consecutive
            && s.consecutive >= n
        {
            return Some(format!("{} consecutive failed calls", s.consecutive));
        }
        let r = self.policy.rate?;
        let calls = s.window.len() as u32;
        (calls >= r.min_calls && f64::from(s.failures_in_window) >= r.rate * f64::from(calls))
            .then(|| format!("{} of the last {calls} calls failed", s.failures_in_window))
    }

    /// Opens (or re-opens) for the current interval, at least `hint`; returns the interval.
    fn open(&self, s: &mut Inner, hint: Option<Duration>) -> Duration {
        let open_for = self
            .policy
            .interval(s.failed_probes)
            .max(hint.unwrap_or_default());
        s.opened += 1;
        self.transition(
            s,
            Phase::Open {
                until: Instant::now() + open_for,
            },
        );
        open_for
    }

    fn transition(&self, s: &mut Inner, to: Phase) {
        let from = s.phase.state();
        s.phase = to;
        s.since = SystemTime::now();
        s.epoch += 1;
        s.probe_out = false;
        s.probe_dispatched = false;
        if to == Phase::Closed {
            s.window.clear();
            s.failures_in_window = 0;
            s.consecutive = 0;
            s.failed_probes = 0;
        }
        if s.recent.len() == BreakerStatus::RECENT {
            s.recent.pop_front();
        }
        s.recent.push_back(BreakerTransition {
            from,
            to: to.state(),
            at: s.since,
        });
        self.metrics.breaker_transition(to.state());
        self.changed.notify_waiters();
    }

    /// For the monitor.
    pub(crate) fn status(&self) -> BreakerStatus {
        let mut s = self.lock();
        self.expire(&mut s);
        BreakerStatus {
            state: s.phase.state(),
            since: s.since,
            opened: s.opened,
            probes: s.probes,
            held_failures: s.held_failures,
            waiting: s.waiting,
            open_interval: self.policy.interval(s.failed_probes),
            recent: s.recent.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(policy: BreakerPolicy) -> Breaker {
        Breaker::new(
            policy,
            Arc::new(ConsumerMetrics::new("g", &["t".to_owned()])),
        )
    }

    fn transient() -> HandlerError {
        HandlerError::transient("connection refused")
    }

    async fn pass(b: &Breaker) -> Pass<'_> {
        // Never called on a closed-over gate: a direct admission for the unit tests.
        match b.try_admit() {
            Ok(p) => p,
            Err(_) => panic!("expected a pass in state {}", b.status().state),
        }
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        for p in [
            BreakerPolicy::default()
                .without_failure_rate()
                .without_consecutive_failures(),
            BreakerPolicy::default().with_failure_rate(0.0, 10, 5),
            BreakerPolicy::default().with_failure_rate(f64::NAN, 10, 5),
            BreakerPolicy::default().with_failure_rate(0.5, 10, 11),
            BreakerPolicy::default().with_consecutive_failures(0),
            BreakerPolicy::default().with_open_interval(Duration::ZERO, Duration::from_secs(1)),
            BreakerPolicy::default()
                .with_open_interval(Duration::from_secs(2), Duration::from_secs(1)),
        ] {
            assert!(
                matches!(
                    p.validate(),
                    Err(ConfigError::Invalid {
                        setting: "breaker",
                        ..
                    })
                ),
                "{p:?}"
            );
        }
        assert!(BreakerPolicy::default().validate().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_then_a_probe_closes() {
        let b = breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(8)),
        );
        assert_eq!(pass(&b).await.failed(&transient(), 0), Verdict::Policy);
        assert_eq!(pass(&b).await.failed(&transient(), 0), Verdict::Policy);
        assert_eq!(
            pass(&b).await.failed(&transient(), 0),
            Verdict::Hold(Duration::ZERO),
            "the third opens it; that record waits"
        );
        assert_eq!(b.status().state, BreakerState::Open);
        assert!(!b.dispatch_allowed());
        assert!(b.try_admit().is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Half-open: one probe; nobody else.
        let probe = pass(&b).await;
        assert_eq!(b.status().state, BreakerState::HalfOpen);
        assert!(b.try_admit().is_err());
        assert!(!b.dispatch_allowed(), "the probe is out");
        probe.succeeded();
        assert_eq!(b.status().state, BreakerState::Closed);
        assert!(b.dispatch_allowed());
        let s = b.status();
        assert_eq!((s.opened, s.probes, s.held_failures), (1, 1, 1));
        let states: Vec<_> = s.recent.iter().map(|t| t.to).collect();
        assert_eq!(
            states,
            [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_with_a_longer_interval_capped() {
        let b = breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(1)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(3)),
        );
        pass(&b).await.failed(&transient(), 0);
        let mut waited = Vec::new();
        for _ in 0..4 {
            let t0 = Instant::now();
            let probe = loop {
                match b.try_admit() {
                    Ok(p) => break p,
                    Err(_) => tokio::time::advance(Duration::from_millis(100)).await,
                }
            };
            waited.push(t0.elapsed().as_millis());
            assert_eq!(probe.failed(&transient(), 0), Verdict::Hold(Duration::ZERO));
        }
        assert_eq!(waited, [1000, 2000, 3000, 3000]);
        assert_eq!(b.status().opened, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_needs_min_calls() {
        let b = breaker(
            BreakerPolicy::default()
                .without_consecutive_failures()
                .with_failure_rate(0.5, 10, 6),
        );
        for i in 0..5 {
            pass(&b).await.failed(&transient(), 0);
            assert_eq!(b.status().state, BreakerState::Closed, "after {i}");
        }
        // 6 calls, all failed: min_calls is reached.
        let _ = pass(&b).await.failed(&transient(), 0);
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        pass(&b).await.succeeded();
        // Closing empties the window: 5 failures of 6 calls are needed again.
        for _ in 0..4 {
            pass(&b).await.failed(&transient(), 0);
        }
        pass(&b).await.succeeded();
        assert_eq!(
            b.status().state,
            BreakerState::Closed,
            "4 of 5 calls: below min_calls"
        );
        let _ = pass(&b).await.failed(&transient(), 0);
        assert_eq!(b.status().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_do_not_count_and_stragglers_do_not_move_it() {
        let b = breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(2),
        );
        for _ in 0..5 {
            assert_eq!(
                pass(&b)
                    .await
                    .failed(&HandlerError::permanent("bad address"), 0),
                Verdict::Policy
            );
        }
        assert_eq!(b.status().state, BreakerState::Closed);
        let straggler = pass(&b).await;
        pass(&b).await.failed(&transient(), 0);
        pass(&b).await.failed(&transient(), 0);
        assert_eq!(b.status().state, BreakerState::Open);
        straggler.succeeded();
        assert_eq!(
            b.status().state,
            BreakerState::Open,
            "started before it opened"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_holds_even_while_closed_and_a_hint_lengthens_the_open_interval() {
        let b = breaker(BreakerPolicy::default().with_consecutive_failures(2));
        let down = || HandlerError::unavailable("refused").retry_after(Duration::from_secs(30));
        assert_eq!(
            pass(&b).await.failed(&down(), 0),
            Verdict::Hold(Duration::from_secs(30))
        );
        assert_eq!(
            pass(&b).await.failed(&down(), 0),
            Verdict::Hold(Duration::ZERO)
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(b.try_admit().is_err(), "open for the hint's 30 s, not 5 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit().is_ok());
        // Without a breaker, unavailable backs off and never uses the policy.
        let gate = OutageGate::default();
        let p = gate.admit(&Stop::default()).await.unwrap();
        assert!(matches!(
            p.failed(&HandlerError::unavailable("refused"), 3),
            Verdict::Hold(d) if d > Duration::ZERO
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_dispatches_one_record_only_when_nobody_waits() {
        let b = Arc::new(breaker(
            BreakerPolicy::default()
                .with_consecutive_failures(1)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(1)),
        ));
        pass(&b).await.failed(&transient(), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.dispatch_allowed(), "nobody waits: a new record probes");
        assert!(!b.dispatch_allowed(), "one only");
        // The dispatched record turns out a duplicate: its unused probe goes back.
        let probe = pass(&b).await;
        drop(probe);
        assert!(b.dispatch_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_record_wakes_for_the_probe_and_a_drain_cancels_the_wait() {
        let b = Arc::new(breaker(
            BreakerPolicy::default()
                .with_consecutive_failures(1)
                .with_open_interval(Duration::from_secs(2), Duration::from_secs(2)),
        ));
        pass(&b).await.failed(&transient(), 0);
        let gate = OutageGate(Some(b.clone()));
        let t0 = Instant::now();
        let p = gate.admit(&Stop::default()).await.expect("admitted");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(2),
            "woken when the probe is due"
        );
        assert_eq!(b.status().waiting, 0);
        p.failed(&transient(), 0);
        let stop = Stop::default();
        let drain = stop.drain.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drain.cancel();
        });
        assert!(gate.admit(&stop).await.is_none());
        assert_eq!(t0.elapsed(), Duration::from_millis(2500));
        assert_eq!(b.status().waiting, 0);
        cancel.await.unwrap();
    }
}
