//! The outage breaker (delivery rule 16 in the crate docs): when the downstream a handler calls is down, records
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
//!   into a sliding window of the last calls and a consecutive-failure count. Either trigger
//!   needs failures of two records at least: one record failing alone is its retry
//!   policy's business.
//! - **Open**: the scheduler dispatches nothing new (the poll thread keeps polling; flow
//!   control pauses partitions as their buffers fill). A record whose attempt fails
//!   transiently now, or that is about to start an attempt, waits in its worker: its lane
//!   stays blocked (order holds), its claim is released, the failure uses up no attempt and
//!   is never dead-lettered. A revoke or a shutdown gives a waiting record up at once.
//! - **HalfOpen**: one record is the probe. Success closes the breaker (everyone goes at full
//!   speed); a transient failure opens it again with twice the interval. A probe that ends
//!   otherwise (permanent failure, duplicate, given up) hands the probe to the next record.
//!   Who probes: a waiting record that has not failed in this outage; else a record the
//!   scheduler dispatches fresh; only when the scheduler has none to dispatch (or dispatched
//!   none within half a second), a waiting record that failed in this outage. So records
//!   that fail on their own (not because of the downstream) cannot keep the breaker open:
//!   other records probe, one succeeds, the breaker closes. When only such records are
//!   left, nothing tells them from a downstream that is down: after `probes_per_record`
//!   failed probes in a row by them (a failed probe by any other record, or one the
//!   handler calls unavailable, starts the count again) the breaker closes and they take
//!   their normal path. The bound is per outage, not per record: a hundred such records
//!   do not probe ten times each, one after another.
//!
//! Results of calls that started before the breaker opened (stragglers) do not move it, nor
//! do failures (while closed) of records that waited for it before: the downstream answered
//! others since, so such a record may be failing on its own, and a burst of them retrying
//! when the breaker closes must not open it again at once. The retry policy decides on
//! them as on any record.
//! Permanent failures and panics say nothing about the downstream: they are not counted.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::policy::BreakerPolicy;
use super::status::{BreakerState, BreakerStatus, BreakerTransition};
use crate::clock;
use crate::handler::HandlerError;
use crate::metrics::ConsumerMetrics;

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
    /// The last calls: the record whose call failed, `None` for a success.
    window: VecDeque<Option<Caller>>,
    failures_in_window: u32,
    consecutive: u32,
    /// The record of the first failure in the current run of failures, and whether another
    /// record failed in it too.
    /// The distinct callers of the current run of failures (at most `min_callers`).
    consecutive_callers: Vec<Caller>,
    /// Unavailable failures so far: each counts as a record of its own.
    unavailable_calls: u64,
    /// Failed probes since the breaker last closed.
    failed_probes: u32,
    /// Failed probes in a row in this outage, each by a record that had failed in it
    /// already (no other record was there to probe): at the policy's `probes_per_record`
    /// the breaker closes (see the module docs).
    suspect_failed_probes: u32,
    /// Half-open: a record holds the probe.
    probe_out: bool,
    /// Half-open: the scheduler dispatched a record to become the probe.
    probe_dispatched: bool,
    /// Half-open: the scheduler had no record to dispatch as the probe, so a waiting record
    /// that failed a probe already may take it.
    nothing_fresh: bool,
    /// Outages so far (closed → open): a record remembers the outage it failed a probe in.
    outage: u64,
    /// When the breaker last went half-open.
    half_open_at: Instant,
    waiting: usize,
    /// Waiting records that have not failed a probe in this outage.
    fresh_waiting: usize,
    opened: u64,
    probes: u64,
    held_failures: u64,
    recent: VecDeque<BreakerTransition>,
}

/// Leave to make one attempt, from [`OutageGate::admit`]. Report its result with
/// [`Pass::succeeded`] or [`Pass::failed`]; dropped unreported (the attempt was given up, or
/// none was made), a probe passes to the next record.
pub(crate) struct Pass<'a> {
    pub(super) breaker: Option<&'a Breaker>,
    pub(super) epoch: u64,
    pub(super) probe: bool,
    /// The record making the call (with destinations: its destination).
    pub(super) caller: Caller,
    /// The caller is the record's destination: an unavailable failure counts for it, not
    /// as a caller of its own.
    pub(super) isolated: bool,
}

/// A failed call, for [`Breaker::on_failure`].
pub(super) struct Failure {
    /// Who failed: `None` for an unavailable failure, which counts as a record of its own.
    pub(super) caller: Option<Caller>,
    /// The handler's `retry_after` hint.
    pub(super) hint: Option<Duration>,
    /// The outage in which the open breaker held a failure of this record before, if any.
    /// Such a record's failures while closed say nothing new about the downstream (others
    /// succeeded since it was held: it may well be failing on its own), so they do not
    /// count toward opening; its failed probes in that same outage are suspect.
    pub(super) held_in: Option<u64>,
    /// The handler said the downstream is unavailable: its word, never suspect.
    pub(super) unavailable: bool,
    /// The record failed its share of probes (`probes_per_record`): its retry policy
    /// decides, the failure is not held.
    pub(super) spent: bool,
}

/// Which event made a call: the breaker opens only on failures of at least two, so that a
/// lone event failing on its own never opens it. Copies of one event — a redelivery after a
/// crash, its retry-tier copies, a second publish with the same dedup key — are one caller
/// (delivery rule 18): see [`caller_of`].
pub(crate) type Caller = u64;

/// The caller of an event known by `identity` (its dedup key, else its source record's
/// topic, partition and offset).
pub(crate) fn caller_of(identity: impl std::hash::Hash) -> Caller {
    use std::hash::BuildHasher;
    // Fixed seed: the same identity is the same caller for the process's whole life.
    // foldhash, not std's SipHash: this runs once per record, breaker or not.
    foldhash::fast::FixedState::default().hash_one(identity)
}

/// What a record remembers between attempts: the outage in which a failure of its was held,
/// so that it lets other records probe before it tries again (see the module docs), and
/// how many probes it failed itself (its bound: [`BreakerPolicy::with_probes_per_record`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProbeMemo {
    pub(super) outage: Option<u64>,
    pub(super) failed_probes: u32,
}

impl ProbeMemo {
    /// Whether the record failed a probe in outage `outage`.
    pub(super) fn failed_in(self, outage: u64) -> bool {
        self.outage == Some(outage)
    }
}

/// A consumer's breaker: see the module docs.
pub(crate) struct Breaker {
    pub(super) policy: BreakerPolicy,
    /// Failures must come from this many distinct callers to open it: 2 (events), or with
    /// destinations the policy's `min_destinations` (destinations).
    min_callers: usize,
    /// The failure rate counts only once the window is full (with destinations), not from
    /// the policy's `min_calls`.
    full_window: bool,
    inner: Mutex<Inner>,
    /// Woken on every change that may let a waiting record go.
    pub(super) changed: Notify,
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

/// How long a half-open breaker keeps its probe for a fresh record before a waiting record
/// that failed a probe already takes it (when the scheduler does not say sooner that it has
/// none to dispatch).
const PROBE_GRACE: Duration = Duration::from_millis(500);

/// What the scheduler may do, from [`Breaker::dispatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dispatch {
    /// Closed: start records.
    Go,
    /// Half-open: start one record, to be the probe (in this epoch).
    Probe(u64),
    /// Open, or the probe is taken: start nothing.
    Held,
}

impl Breaker {
    /// A record starts waiting for the breaker; returns whether it counts as *fresh* (it
    /// has not failed a probe in this outage).
    pub(super) fn begin_waiting(&self, memo: ProbeMemo) -> bool {
        let mut s = self.lock();
        let fresh = !memo.failed_in(s.outage);
        s.waiting += 1;
        s.fresh_waiting += usize::from(fresh);
        fresh
    }

    /// A record stops waiting (admitted, or given up).
    pub(super) fn end_waiting(&self, fresh: bool) {
        let mut s = self.lock();
        s.waiting -= 1;
        s.fresh_waiting -= usize::from(fresh);
        let probe_free = s.phase == Phase::HalfOpen && !s.probe_out;
        drop(s);
        if fresh && probe_free {
            // The others may probe now.
            self.changed.notify_waiters();
        }
    }

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
                consecutive_callers: Vec::new(),
                unavailable_calls: 0,
                failed_probes: 0,
                suspect_failed_probes: 0,
                probe_out: false,
                probe_dispatched: false,
                nothing_fresh: false,
                outage: 0,
                half_open_at: Instant::now(),
                waiting: 0,
                fresh_waiting: 0,
                opened: 0,
                probes: 0,
                held_failures: 0,
                recent: VecDeque::new(),
            }),
            changed: Notify::new(),
            metrics,
            min_callers: 2,
            full_window: false,
        }
    }

    /// Counts failures by destination (the callers the workers give are destinations):
    /// it opens only on failures of the policy's `min_destinations` destinations, and its
    /// failure rate counts only once its window is full. (A destination that is down fails
    /// at once, while the others' first calls are still running: at a start, the first
    /// calls to end can all be failures of a few destinations, and a window of three calls
    /// would read that as an outage.)
    pub(crate) fn by_destination(mut self) -> Self {
        self.min_callers = self.policy.min_destinations() as usize;
        self.full_window = true;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For the scheduler: may a new record be dispatched now? Closed: yes. Half-open with
    /// nobody waiting to probe: one record, once. Otherwise no.
    /// Whether the scheduler may start a record now.
    pub(crate) fn dispatch(&self) -> Dispatch {
        let mut s = self.lock();
        self.expire(&mut s);
        match s.phase {
            Phase::Closed => Dispatch::Go,
            // Waiting records that have not failed a probe yet go first (they are older).
            Phase::HalfOpen if !s.probe_out && !s.probe_dispatched && s.fresh_waiting == 0 => {
                s.probe_dispatched = true;
                Dispatch::Probe(s.epoch)
            }
            _ => Dispatch::Held,
        }
    }

    /// A record dispatched as the probe in `epoch` ended: if it never took the probe (it
    /// ended before its first attempt), the probe is free again.
    pub(crate) fn dispatched_probe_ended(&self, epoch: u64) {
        let mut s = self.lock();
        if s.epoch == epoch && s.probe_dispatched && !s.probe_out {
            s.probe_dispatched = false;
            drop(s);
            self.changed.notify_waiters();
        }
    }

    /// The scheduler dispatched nothing: if the breaker is half-open with its probe free, a
    /// waiting record that failed a probe before may take it.
    pub(crate) fn nothing_dispatched(&self) {
        let mut s = self.lock();
        // Its open interval may have passed without anyone asking yet.
        self.expire(&mut s);
        if s.phase == Phase::HalfOpen && !s.probe_out && !s.probe_dispatched && !s.nothing_fresh {
            s.nothing_fresh = true;
            drop(s);
            self.changed.notify_waiters();
        }
    }

    /// Whether the breaker holds dispatch now (no probe is reserved by asking).
    pub(crate) fn holds_dispatch(&self) -> bool {
        self.lock().phase != Phase::Closed
    }

    /// A pass, or when to look again (`None`: when woken).
    pub(super) fn try_admit(
        &self,
        memo: ProbeMemo,
        caller: Caller,
    ) -> Result<Pass<'_>, Option<Instant>> {
        let mut s = self.lock();
        self.expire(&mut s);
        let suspect = memo.failed_in(s.outage);
        match s.phase {
            Phase::Closed => Ok(Pass {
                breaker: Some(self),
                epoch: s.epoch,
                probe: false,
                caller,
                isolated: false,
            }),
            // A record that failed in this outage probes only when no other record can: no
            // other one waits and the scheduler had none to dispatch (or did not dispatch
            // one within the grace period).
            Phase::HalfOpen
                if !s.probe_out
                    && (!suspect
                        || (s.fresh_waiting == 0
                            && !s.probe_dispatched
                            && (s.nothing_fresh
                                || Instant::now()
                                    >= clock::after(s.half_open_at, PROBE_GRACE)))) =>
            {
                s.probe_out = true;
                s.probes += 1;
                Ok(Pass {
                    breaker: Some(self),
                    epoch: s.epoch,
                    probe: true,
                    caller,
                    isolated: false,
                })
            }
            Phase::HalfOpen if s.probe_out || !suspect => Err(None),
            Phase::HalfOpen => Err(Some(clock::after(s.half_open_at, PROBE_GRACE))),
            Phase::Open { until } => Err(Some(until)),
        }
    }

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

    pub(super) fn on_success(&self, epoch: u64, probe: bool) {
        let mut s = self.lock();
        if epoch != s.epoch {
            return;
        }
        match s.phase {
            Phase::Closed => self.record(&mut s, None),
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

    /// Counts a failed call (see [`Failure`]); returns the outage holding the failure
    /// (`None`: closed, the retry policy decides).
    pub(super) fn on_failure(&self, epoch: u64, probe: bool, f: Failure) -> Option<u64> {
        let Failure {
            caller,
            hint,
            held_in,
            unavailable,
            spent,
        } = f;
        let mut s = self.lock();
        if epoch == s.epoch {
            match s.phase {
                Phase::Closed if held_in.is_some() => {}
                Phase::Closed => {
                    // Unavailable: a caller of its own, as if another record had failed.
                    let caller = caller.unwrap_or_else(|| {
                        s.unavailable_calls += 1;
                        caller_of(("unavailable", s.unavailable_calls))
                    });
                    self.record(&mut s, Some(caller));
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
                    // A record that failed in this outage probes only when no other can.
                    let suspect = !unavailable && held_in == Some(s.outage);
                    s.suspect_failed_probes = if suspect {
                        s.suspect_failed_probes.saturating_add(1)
                    } else {
                        0
                    };
                    if s.suspect_failed_probes >= self.policy.probes_per_record() {
                        self.transition(&mut s, Phase::Closed);
                        warn!(
                            failed_probes = s.failed_probes,
                            "breaker closed: its last probes failed, each by a record that had failed in this outage already, with no other record to probe; nothing tells a downstream that is down from records failing on their own, so records take their normal path (their retry policies decide; their failures do not open it again, other records' do)"
                        );
                    } else {
                        let open_for = self.open(&mut s, hint);
                        warn!(
                            ?open_for,
                            failed_probes = s.failed_probes,
                            "breaker re-opened: the probe failed"
                        );
                    }
                }
                _ => {}
            }
        }
        if s.phase == Phase::Closed || spent {
            return None;
        }
        s.held_failures += 1;
        let outage = s.outage;
        drop(s);
        self.metrics.breaker_held_failure();
        Some(outage)
    }

    pub(super) fn return_probe(&self, probe: bool) {
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

    /// Counts a call: `failed_by` is the record whose call failed (`None`: it succeeded).
    fn record(&self, s: &mut Inner, failed_by: Option<Caller>) {
        match failed_by {
            Some(caller) => {
                s.consecutive = s.consecutive.saturating_add(1);
                if s.consecutive_callers.len() < self.min_callers
                    && !s.consecutive_callers.contains(&caller)
                {
                    s.consecutive_callers.push(caller);
                }
            }
            None => {
                s.consecutive = 0;
                s.consecutive_callers.clear();
            }
        }
        if let Some(r) = self.policy.rate {
            s.window.push_back(failed_by);
            s.failures_in_window += u32::from(failed_by.is_some());
            while s.window.len() > r.window as usize {
                if s.window.pop_front().is_some_and(|c| c.is_some()) {
                    s.failures_in_window -= 1;
                }
            }
        }
    }

    /// Why the breaker must open now, if it must. Failures of one record alone never open
    /// it: that record may be failing on its own, and its retry policy bounds it.
    fn tripped(&self, s: &Inner) -> Option<String> {
        if let Some(n) = self.policy.consecutive
            && s.consecutive >= n
            && s.consecutive_callers.len() >= self.min_callers
        {
            return Some(format!("{} consecutive failed calls", s.consecutive));
        }
        let r = self.policy.rate?;
        let calls = s.window.len() as u32;
        let mut callers: Vec<Caller> = Vec::with_capacity(self.min_callers);
        for &caller in s.window.iter().flatten() {
            if !callers.contains(&caller) {
                callers.push(caller);
                if callers.len() >= self.min_callers {
                    break;
                }
            }
        }
        let min_calls = if self.full_window {
            r.window
        } else {
            r.min_calls
        };
        (callers.len() >= self.min_callers
            && calls >= min_calls
            && f64::from(s.failures_in_window) >= r.rate * f64::from(calls))
        .then(|| format!("{} of the last {calls} calls failed", s.failures_in_window))
    }

    /// Opens (or re-opens) for the current interval, at least `hint` (a day at most: hints
    /// are untrusted, rule 17); returns the interval.
    fn open(&self, s: &mut Inner, hint: Option<Duration>) -> Duration {
        let open_for = self
            .policy
            .interval(s.failed_probes)
            .max(hint.unwrap_or_default().min(HandlerError::MAX_RETRY_AFTER));
        s.opened += 1;
        self.transition(
            s,
            Phase::Open {
                until: clock::deadline_in(open_for),
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
        s.nothing_fresh = false;
        if from == BreakerState::Closed {
            s.outage += 1;
            s.suspect_failed_probes = 0;
        }
        if to == Phase::HalfOpen {
            s.half_open_at = Instant::now();
        }
        if to == Phase::Closed {
            s.window.clear();
            s.failures_in_window = 0;
            s.consecutive = 0;
            s.consecutive_callers.clear();
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
        self.metrics.breaker_transition(to.state().gauge());
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
    use super::super::gate::{OutageGate, Verdict};
    use super::*;
    use crate::consumer::stop::Stop;
    use crate::error::ConfigError;

    fn breaker(policy: BreakerPolicy) -> Breaker {
        Breaker::new(
            policy,
            Arc::new(ConsumerMetrics::new("g", &["t".to_owned()])),
        )
    }

    fn admitted<'a>(admission: Result<Pass<'a>, Option<Instant>>, what: &str) -> Pass<'a> {
        match admission {
            Ok(pass) => pass,
            Err(_) => panic!("not admitted: {what}"),
        }
    }

    /// A record of its own for every call (the breaker opens only on failures of two).
    fn next_caller() -> Caller {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The one record of a test that follows a record through several calls.
    const OWN: Caller = 9_000_000;

    /// Opens after two failed calls in a row (of two records), open `initial` doubling to `max`.
    fn two_in_a_row(initial: Duration, max: Duration) -> Breaker {
        breaker(
            BreakerPolicy::default()
                .with_consecutive_failures(2)
                .with_open_interval(initial, max),
        )
    }

    /// A fresh record's attempt fails transiently (the breaker closed or just closing).
    fn fresh_fails(b: &Breaker) -> Verdict {
        admitted(b.try_admit(ProbeMemo::default(), next_caller()), "closed").failed(
            &transient(),
            0,
            &mut ProbeMemo::default(),
        )
    }

    /// The test's own record ([`OWN`]) is admitted and fails transiently.
    fn own_fails(b: &Breaker, own: &mut ProbeMemo, holds: u32) -> Verdict {
        admitted(b.try_admit(*own, OWN), "closed").failed(&transient(), holds, own)
    }

    fn transient() -> HandlerError {
        HandlerError::transient("connection refused")
    }

    async fn pass(b: &Breaker) -> Pass<'_> {
        // Never called on a closed-over gate: a direct admission for the unit tests.
        match b.try_admit(ProbeMemo::default(), next_caller()) {
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
            BreakerPolicy::default().with_consecutive_failures(1),
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
                .with_consecutive_failures(3)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(8)),
        );
        assert_eq!(fresh_fails(&b), Verdict::Policy);
        assert_eq!(fresh_fails(&b), Verdict::Policy);
        assert_eq!(
            fresh_fails(&b),
            Verdict::Hold(Duration::ZERO),
            "the third opens it; that record waits"
        );
        assert_eq!(b.status().state, BreakerState::Open);
        assert!(b.dispatch() == Dispatch::Held);
        assert!(b.try_admit(ProbeMemo::default(), next_caller()).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Half-open: one probe; nobody else.
        let probe = pass(&b).await;
        assert_eq!(b.status().state, BreakerState::HalfOpen);
        assert!(b.try_admit(ProbeMemo::default(), next_caller()).is_err());
        assert!(b.dispatch() == Dispatch::Held, "the probe is out");
        probe.succeeded();
        assert_eq!(b.status().state, BreakerState::Closed);
        assert!(b.dispatch() == Dispatch::Go);
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
                .with_consecutive_failures(2)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(3)),
        );
        fresh_fails(&b);
        fresh_fails(&b);
        let mut waited = Vec::new();
        for _ in 0..4 {
            let t0 = Instant::now();
            let probe = loop {
                match b.try_admit(ProbeMemo::default(), next_caller()) {
                    Ok(p) => break p,
                    Err(_) => tokio::time::advance(Duration::from_millis(100)).await,
                }
            };
            waited.push(t0.elapsed().as_millis());
            assert_eq!(
                probe.failed(&transient(), 0, &mut ProbeMemo::default()),
                Verdict::Hold(Duration::ZERO)
            );
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
            fresh_fails(&b);
            assert_eq!(b.status().state, BreakerState::Closed, "after {i}");
        }
        // 6 calls, all failed: min_calls is reached.
        let _ = fresh_fails(&b);
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        pass(&b).await.succeeded();
        // Closing empties the window: 5 failures of 6 calls are needed again.
        for _ in 0..4 {
            fresh_fails(&b);
        }
        pass(&b).await.succeeded();
        assert_eq!(
            b.status().state,
            BreakerState::Closed,
            "4 of 5 calls: below min_calls"
        );
        let _ = fresh_fails(&b);
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
                pass(&b).await.failed(
                    &HandlerError::permanent("bad address"),
                    0,
                    &mut ProbeMemo::default()
                ),
                Verdict::Policy
            );
        }
        assert_eq!(b.status().state, BreakerState::Closed);
        let straggler = pass(&b).await;
        fresh_fails(&b);
        fresh_fails(&b);
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
            pass(&b).await.failed(&down(), 0, &mut ProbeMemo::default()),
            Verdict::Hold(Duration::from_secs(30))
        );
        assert_eq!(
            pass(&b).await.failed(&down(), 0, &mut ProbeMemo::default()),
            Verdict::Hold(Duration::ZERO)
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(
            b.try_admit(ProbeMemo::default(), next_caller()).is_err(),
            "open for the hint's 30 s, not 5 s"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit(ProbeMemo::default(), next_caller()).is_ok());
        // Without a breaker, unavailable backs off and never uses the policy.
        let gate = OutageGate::default();
        let p = gate
            .admit(&Stop::default(), ProbeMemo::default(), next_caller())
            .await
            .unwrap();
        assert!(matches!(
            p.failed(&HandlerError::unavailable("refused"), 3, &mut ProbeMemo::default()),
            Verdict::Hold(d) if d > Duration::ZERO
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_dispatches_one_record_only_when_nobody_waits() {
        let b = Arc::new(two_in_a_row(Duration::from_secs(1), Duration::from_secs(1)));
        fresh_fails(&b);
        fresh_fails(&b);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            matches!(b.dispatch(), Dispatch::Probe(_)),
            "nobody waits: a new record probes"
        );
        assert!(b.dispatch() == Dispatch::Held, "one only");
        // The dispatched record turns out a duplicate: its unused probe goes back.
        let probe = pass(&b).await;
        drop(probe);
        assert!(matches!(b.dispatch(), Dispatch::Probe(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_record_wakes_for_the_probe_and_a_drain_cancels_the_wait() {
        let b = Arc::new(two_in_a_row(Duration::from_secs(2), Duration::from_secs(2)));
        fresh_fails(&b);
        fresh_fails(&b);
        let gate = OutageGate(Some(b.clone()));
        let t0 = Instant::now();
        let p = gate
            .admit(&Stop::default(), ProbeMemo::default(), next_caller())
            .await
            .expect("admitted");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(2),
            "woken when the probe is due"
        );
        assert_eq!(b.status().waiting, 0);
        p.failed(&transient(), 0, &mut ProbeMemo::default());
        let stop = Stop::default();
        let drain = stop.drain.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drain.cancel();
        });
        assert!(
            gate.admit(&stop, ProbeMemo::default(), next_caller())
                .await
                .is_none()
        );
        assert_eq!(t0.elapsed(), Duration::from_millis(2500));
        assert_eq!(b.status().waiting, 0);
        cancel.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_failed_in_the_outage_lets_a_fresh_record_probe_first() {
        let b = two_in_a_row(Duration::from_secs(1), Duration::from_secs(8));
        // Records failing on their own open the breaker.
        let mut own = ProbeMemo::default();
        let _ = fresh_fails(&b);
        assert_eq!(own_fails(&b, &mut own, 0), Verdict::Hold(Duration::ZERO));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            b.try_admit(own, OWN).is_err(),
            "it failed in this outage: a fresh record goes first"
        );
        let Dispatch::Probe(_) = b.dispatch() else {
            panic!("the scheduler dispatches a fresh probe");
        };
        assert!(
            b.try_admit(own, OWN).is_err(),
            "the dispatched record holds the probe"
        );
        admitted(
            b.try_admit(ProbeMemo::default(), next_caller()),
            "the dispatched record probes",
        )
        .succeeded();
        assert_eq!(b.status().state, BreakerState::Closed);
        // Closed: its next failure is an attempt again, and does not open the breaker.
        assert_eq!(own_fails(&b, &mut own, 1), Verdict::Policy);
        assert_eq!(b.status().state, BreakerState::Closed);
        // A new outage (fresh records' failures): the old record may probe first again.
        let _ = fresh_fails(&b);
        let _ = fresh_fails(&b);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit(own, OWN).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_failed_in_the_outage_probes_when_no_other_can() {
        let b = two_in_a_row(Duration::from_secs(1), Duration::from_secs(1));
        let mut own = ProbeMemo::default();
        let _ = fresh_fails(&b);
        let _ = own_fails(&b, &mut own, 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit(own, OWN).is_err());
        // The scheduler has nothing to dispatch: it probes.
        b.nothing_dispatched();
        let probe = admitted(b.try_admit(own, OWN), "nobody else can: it probes");
        let held = b.status().held_failures;
        assert_eq!(
            probe.failed(&transient(), 1, &mut own),
            Verdict::Hold(Duration::ZERO),
            "the breaker cannot tell it from a downstream that is down: still held"
        );
        assert_eq!(b.status().held_failures, held + 1);
        assert_eq!(b.status().state, BreakerState::Open, "the probe failed");
        // Without word from the scheduler it probes after the grace period.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit(own, OWN).is_err());
        tokio::time::advance(PROBE_GRACE).await;
        admitted(b.try_admit(own, OWN), "probes after the grace period").succeeded();
        assert_eq!(b.status().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_record_failing_alone_never_opens_it() {
        let b = breaker(
            BreakerPolicy::default()
                .with_failure_rate(0.5, 20, 3)
                .with_consecutive_failures(2),
        );
        let mut own = ProbeMemo::default();
        for attempt in 0..10 {
            assert_eq!(
                own_fails(&b, &mut own, 0),
                Verdict::Policy,
                "attempt {attempt}: its retry policy decides"
            );
        }
        assert_eq!(b.status().state, BreakerState::Closed);
        // A second record failing too: that looks like the downstream.
        let _ = fresh_fails(&b);
        assert_eq!(b.status().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatched_probe_that_ends_before_its_attempt_frees_the_probe() {
        let b = two_in_a_row(Duration::from_secs(1), Duration::from_secs(1));
        fresh_fails(&b);
        fresh_fails(&b);
        tokio::time::advance(Duration::from_secs(1)).await;
        let Dispatch::Probe(epoch) = b.dispatch() else {
            panic!("a fresh probe");
        };
        assert!(b.dispatch() == Dispatch::Held);
        // A poison pill: dead-lettered before any attempt, it never asks for the probe.
        b.dispatched_probe_ended(epoch);
        assert!(
            matches!(b.dispatch(), Dispatch::Probe(_)),
            "the next record probes"
        );
        // A stale end (an earlier epoch) changes nothing.
        b.dispatched_probe_ended(epoch.wrapping_sub(1));
        assert!(b.dispatch() == Dispatch::Held);
    }

    #[tokio::test(start_paused = true)]
    async fn records_held_before_do_not_open_it_again_when_they_fail_after_it_closed() {
        let b = breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(2)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(1)),
        );
        let memo = &mut ProbeMemo::default();
        pass(&b).await.failed(&transient(), 0, memo);
        pass(&b).await.failed(&transient(), 0, memo);
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        pass(&b).await.succeeded();
        // The record it held (its memo says so) fails again, on its own: the policy decides.
        assert!(memo.outage.is_some());
        for _ in 0..5 {
            assert_eq!(
                pass(&b).await.failed(&transient(), 1, memo),
                Verdict::Policy
            );
        }
        assert_eq!(b.status().state, BreakerState::Closed);
        // Fresh records' failures still count.
        let fresh = &mut ProbeMemo::default();
        pass(&b).await.failed(&transient(), 0, fresh);
        pass(&b).await.failed(&transient(), 0, fresh);
        assert_eq!(b.status().state, BreakerState::Open);
    }

    /// A record of destination `d` is admitted (counted by its destination) and fails.
    fn destination_fails(b: &Breaker, d: Caller, error: &HandlerError) -> Verdict {
        let mut pass = admitted(b.try_admit(ProbeMemo::default(), d), "closed");
        pass.isolated = true;
        pass.failed(error, 0, &mut ProbeMemo::default())
    }

    #[tokio::test(start_paused = true)]
    async fn with_destinations_it_opens_only_on_failures_of_min_destinations() {
        let b = breaker(
            BreakerPolicy::default()
                .with_consecutive_failures(4)
                .with_min_destinations(3),
        )
        .by_destination();
        // Two destinations failing, and failing, and saying unavailable: their own
        // breakers' business, not the consumer's.
        for _ in 0..10 {
            for d in [1, 2] {
                destination_fails(&b, d, &transient());
                destination_fails(&b, d, &HandlerError::unavailable("503"));
            }
        }
        assert_eq!(b.status().state, BreakerState::Closed, "2 destinations");
        destination_fails(&b, 3, &transient());
        assert_eq!(b.status().state, BreakerState::Open, "the third opens it");
    }

    /// With destinations, the failure rate counts from a full window: three destinations
    /// failing first at a start (their calls end at once, the others' are still running) do
    /// not open it; a window of 20 calls with half of them failed, over 3 destinations, does.
    #[tokio::test(start_paused = true)]
    async fn with_destinations_the_failure_rate_counts_from_a_full_window() {
        let b = breaker(BreakerPolicy::default()).by_destination();
        for d in [1, 2, 3] {
            destination_fails(&b, d, &HandlerError::unavailable("connection refused"));
        }
        assert_eq!(b.status().state, BreakerState::Closed, "3 of 3 calls");
        for d in 100..116 {
            admitted(b.try_admit(ProbeMemo::default(), d), "closed").succeeded();
        }
        assert_eq!(b.status().state, BreakerState::Closed, "3 of 19 calls");
        let b = breaker(BreakerPolicy::default()).by_destination();
        for d in 0..20 {
            if d % 2 == 0 {
                admitted(b.try_admit(ProbeMemo::default(), 100 + d), "closed").succeeded();
            } else {
                destination_fails(&b, d, &HandlerError::unavailable("connection refused"));
            }
        }
        assert_eq!(
            b.status().state,
            BreakerState::Open,
            "10 of 20 calls, 10 destinations"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_record_saying_unavailable_opens_it_alone() {
        let b = breaker(BreakerPolicy::default());
        let mut own = ProbeMemo::default();
        let down = || HandlerError::unavailable("connection refused");
        for _ in 0..2 {
            admitted(b.try_admit(own, OWN), "closed").failed(&down(), 0, &mut own);
        }
        assert_eq!(
            b.status().state,
            BreakerState::Closed,
            "2 calls: below min_calls"
        );
        assert_eq!(
            admitted(b.try_admit(own, OWN), "closed").failed(&down(), 0, &mut own),
            Verdict::Hold(Duration::ZERO)
        );
        assert_eq!(
            b.status().state,
            BreakerState::Open,
            "the handler's word is enough"
        );
    }

    #[test]
    fn the_metrics_labels_match_the_states() {
        for state in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            assert_eq!(
                crate::metrics::BREAKER_STATES[state.gauge()],
                state.as_str()
            );
        }
    }

    /// Open intervals of `Duration::MAX` and a hint of `Duration::MAX` open the breaker (no
    /// panic: `Instant::now() + open_for` overflowed) for at most a day, after which it
    /// probes.
    #[tokio::test(start_paused = true)]
    async fn extreme_open_intervals_and_hints_open_for_a_day_at_most() {
        const DAY: Duration = Duration::from_secs(86_400);
        let b = two_in_a_row(Duration::MAX, Duration::MAX);
        fresh_fails(&b);
        assert_eq!(fresh_fails(&b), Verdict::Hold(Duration::ZERO));
        assert_eq!(b.status().state, BreakerState::Open);
        assert_eq!(b.status().open_interval, DAY);
        tokio::time::advance(DAY).await;
        let probe = pass(&b).await;
        assert_eq!(b.status().state, BreakerState::HalfOpen);
        // The probe fails with a hint of Duration::MAX: open again, a day at most.
        let hinted = HandlerError::unavailable("503").retry_after(Duration::MAX);
        assert_eq!(
            probe.failed(&hinted, 0, &mut ProbeMemo::default()),
            Verdict::Hold(Duration::ZERO)
        );
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(DAY - Duration::from_millis(1)).await;
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.status().state, BreakerState::HalfOpen);

        // A default breaker opened by failures hinting Duration::MAX.
        let b = two_in_a_row(Duration::from_secs(5), Duration::from_secs(60));
        let hinted = || HandlerError::transient("429").retry_after(Duration::MAX);
        for _ in 0..2 {
            let _ = admitted(b.try_admit(ProbeMemo::default(), next_caller()), "closed").failed(
                &hinted(),
                0,
                &mut ProbeMemo::default(),
            );
        }
        assert_eq!(b.status().state, BreakerState::Open);
        tokio::time::advance(DAY).await;
        assert_eq!(b.status().state, BreakerState::HalfOpen);
    }

    /// Records that failed in an outage and probe (nothing else can) close the breaker
    /// after `probes_per_record` failed probes in a row *in all*: three such records with a
    /// bound of 3 need three probes, not nine. A failed probe by another record starts the
    /// count again.
    #[tokio::test(start_paused = true)]
    async fn suspect_probes_close_it_after_probes_per_record_in_a_row_in_all() {
        let b = breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(2)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(1))
                .with_probes_per_record(3),
        );
        const A: Caller = 9_000_101;
        const B: Caller = 9_000_102;
        const C: Caller = 9_000_103;
        // Nothing fresh to dispatch: the next suspect record probes, after the interval.
        async fn probe_fails(b: &Breaker, memo: &mut ProbeMemo, caller: Caller) -> Verdict {
            tokio::time::advance(Duration::from_secs(1)).await;
            b.nothing_dispatched();
            let probe = admitted(b.try_admit(*memo, caller), "nobody else can: it probes");
            assert!(probe.is_probe());
            probe.failed(&transient(), 1, memo)
        }
        // A, B and C fail while a fresh record's failure opens the breaker: all three held.
        let (mut a, mut bm, mut c) = Default::default();
        let passes = [A, B, C].map(|c| admitted(b.try_admit(ProbeMemo::default(), c), "closed"));
        fresh_fails(&b);
        for (pass, memo) in passes.into_iter().zip([&mut a, &mut bm, &mut c]) {
            let _ = pass.failed(&transient(), 0, memo);
            assert!(memo.outage.is_some(), "held in the outage");
        }
        assert_eq!(b.status().state, BreakerState::Open);
        let (a, bb, c) = (&mut a, &mut bm, &mut c);
        assert_eq!(probe_fails(&b, a, A).await, Verdict::Hold(Duration::ZERO));
        assert_eq!(probe_fails(&b, bb, B).await, Verdict::Hold(Duration::ZERO));
        assert_eq!(b.status().state, BreakerState::Open);
        assert_eq!(
            probe_fails(&b, c, C).await,
            Verdict::Policy,
            "the third suspect probe in a row: its policy decides"
        );
        assert_eq!(
            b.status().state,
            BreakerState::Closed,
            "closed after 3 in all"
        );
        // Their failures now are attempts and do not open it again.
        for (memo, caller) in [(&mut *a, A), (&mut *bb, B)] {
            let v = admitted(b.try_admit(*memo, caller), "closed").failed(&transient(), 2, memo);
            assert_eq!(v, Verdict::Policy);
        }
        assert_eq!(b.status().state, BreakerState::Closed);

        // A new outage: D and E fail in it (held), so do fresh records. (New records: A
        // and B failed probes of their own already.)
        const D: Caller = 9_000_104;
        const E: Caller = 9_000_105;
        let (mut d, mut e) = <(ProbeMemo, ProbeMemo)>::default();
        let passes = [D, E].map(|caller| admitted(b.try_admit(d, caller), "closed"));
        fresh_fails(&b);
        fresh_fails(&b);
        assert_eq!(b.status().state, BreakerState::Open);
        let [pd, pe] = passes;
        let _ = pd.failed(&transient(), 0, &mut d);
        let _ = pe.failed(&transient(), 0, &mut e);
        assert!(
            d.outage.is_some_and(|o| Some(o) > a.outage),
            "held in the new outage"
        );
        assert_eq!(
            probe_fails(&b, &mut d, D).await,
            Verdict::Hold(Duration::ZERO)
        );
        // A fresh record the scheduler dispatches fails its probe: the count starts again.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(b.dispatch(), Dispatch::Probe(_)));
        let mut fresh = ProbeMemo::default();
        let probe = admitted(b.try_admit(fresh, next_caller()), "the dispatched probe");
        assert_eq!(
            probe.failed(&transient(), 0, &mut fresh),
            Verdict::Hold(Duration::ZERO)
        );
        assert_eq!(
            probe_fails(&b, &mut e, E).await,
            Verdict::Hold(Duration::ZERO)
        );
        assert_eq!(
            probe_fails(&b, &mut d, D).await,
            Verdict::Hold(Duration::ZERO)
        );
        assert_eq!(b.status().state, BreakerState::Open, "two in a row since");
        assert_eq!(probe_fails(&b, &mut e, E).await, Verdict::Policy);
        assert_eq!(b.status().state, BreakerState::Closed);
        assert_eq!(
            (d.failed_probes, e.failed_probes),
            (2, 2),
            "below their own bound"
        );
    }
}
