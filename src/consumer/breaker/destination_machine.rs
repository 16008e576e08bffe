//! The breakers of destinations (delivery rule 19 in the crate docs): one small state
//! machine per destination with failures, in one bounded map. The settings and the states
//! are documented on [`Destinations`](super::Destinations); the worker's side (waiting
//! without a slot) is `work::destination`.
//!
//! A destination is tracked from its first counted failure until it closes again (a success
//! while closed, a successful probe), or until it is idle past the expiry. Records ask
//! [`DestinationBreakers::try_admit`] before each attempt: a pass, or how to wait (until the
//! open interval ends, or until the destination's [`Notify`] says something changed).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::destinations::{Destination, DestinationRules};
use super::machine::Caller;
use super::status::BreakerState;
use crate::clock;
use crate::handler::{FailureKind, HandlerError};
use crate::log_throttle::LogThrottle;
use crate::metrics::ConsumerMetrics;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_out: bool },
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// One tracked destination.
struct Entry {
    name: Box<str>,
    phase: Phase,
    /// Failures in a row while closed, the record of the first, and whether another record
    /// failed in the run too.
    consecutive: u32,
    first: Option<Caller>,
    mixed: bool,
    failed_probes: u32,
    /// When it last failed or changed state (for the idle expiry).
    touched: Instant,
    /// Since when it is not closed.
    since: SystemTime,
    opened: u64,
    held_failures: u64,
    /// Records waiting for it now.
    waiting: usize,
    changed: Arc<Notify>,
    /// Changes since it was tracked: a pass remembers the epoch it was given in, so a
    /// straggler's result does not move a destination that changed since.
    epoch: u64,
}

struct State {
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    /// Destinations open or half-open now.
    open: usize,
    untracked: u64,
    /// The last time expired entries were looked for.
    swept: Instant,
}

/// The breakers of one consumer's destinations: see the module docs.
pub(crate) struct DestinationBreakers {
    rules: DestinationRules,
    state: Mutex<State>,
    metrics: Arc<ConsumerMetrics>,
    throttle: LogThrottle,
}

impl fmt::Debug for DestinationBreakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("DestinationBreakers")
            .field("rules", &self.rules)
            .field("tracked", &s.entries.len())
            .field("open", &s.open)
            .finish_non_exhaustive()
    }
}

/// Leave for one attempt of a record of a tracked-or-not destination. Report its result with
/// [`DestinationPass::succeeded`] or [`DestinationPass::failed`]; dropped unreported, a
/// probe passes to the next record.
pub(crate) struct DestinationPass<'a> {
    breakers: Option<&'a DestinationBreakers>,
    id: u64,
    epoch: u64,
    probe: bool,
}

/// How a record waits for its destination.
pub(crate) struct DestinationWait {
    /// When to look again (`None`: when woken).
    pub(crate) until: Option<Instant>,
    pub(crate) changed: Arc<Notify>,
}

/// What a record remembers of its destination between attempts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DestinationMemo {
    /// Probes of its destination it failed (its bound: `probes_per_record`).
    pub(crate) failed_probes: u32,
}

/// Before a sweep for expired entries when the map is full, at least this long passes
/// since the last one (a sweep walks every entry).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Destinations listed in the snapshot, at most.
pub(crate) const TOP: usize = 10;

impl DestinationBreakers {
    pub(crate) fn new(
        rules: DestinationRules,
        metrics: Arc<ConsumerMetrics>,
        log_interval: Duration,
    ) -> Self {
        DestinationBreakers {
            rules,
            state: Mutex::new(State {
                entries: HashMap::default(),
                open: 0,
                untracked: 0,
                swept: Instant::now(),
            }),
            metrics,
            throttle: LogThrottle::new(log_interval),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pass for the next attempt of a record of `destination`, or how to wait for it.
    pub(crate) fn try_admit(
        &self,
        destination: &Destination,
    ) -> Result<DestinationPass<'_>, DestinationWait> {
        let mut s = self.lock();
        let Some(e) = s.entries.get_mut(&destination.id) else {
            return Ok(self.pass(destination.id, 0, false));
        };
        let now = Instant::now();
        match e.phase {
            Phase::Closed => Ok(self.pass(destination.id, e.epoch, false)),
            Phase::Open { until } if now < until => Err(DestinationWait {
                until: Some(until),
                changed: e.changed.clone(),
            }),
            Phase::Open { .. } | Phase::HalfOpen { probe_out: false } => {
                if matches!(e.phase, Phase::Open { .. }) {
                    e.epoch += 1;
                    self.log_transition(
                        e,
                        BreakerState::HalfOpen,
                        "destination half-open: one probe record goes through",
                    );
                }
                e.phase = Phase::HalfOpen { probe_out: true };
                e.touched = now;
                Ok(self.pass(destination.id, e.epoch, true))
            }
            Phase::HalfOpen { probe_out: true } => Err(DestinationWait {
                until: None,
                changed: e.changed.clone(),
            }),
        }
    }

    fn pass(&self, id: u64, epoch: u64, probe: bool) -> DestinationPass<'_> {
        DestinationPass {
            breakers: Some(self),
            id,
            epoch,
            probe,
        }
    }

    /// A record starts (`true`) or stops waiting for `id`.
    pub(crate) fn waiting(&self, id: u64, starts: bool) {
        let mut s = self.lock();
        if let Some(e) = s.entries.get_mut(&id) {
            if starts {
                e.waiting += 1;
            } else {
                e.waiting = e.waiting.saturating_sub(1);
            }
        }
    }

    fn on_success(&self, id: u64, epoch: u64, probe: bool) {
        let mut s = self.lock();
        let Some(e) = s.entries.get(&id) else {
            return;
        };
        let closes = match e.phase {
            Phase::Closed => true,
            Phase::HalfOpen { .. } => probe && e.epoch == epoch,
            Phase::Open { .. } => false,
        };
        if !closes {
            return;
        }
        let Some(e) = s.entries.remove(&id) else {
            return;
        };
        if e.phase != Phase::Closed {
            s.open -= 1;
            drop(s);
            self.metrics
                .destination_transition(BreakerState::Closed.gauge(), -1);
            self.log_transition(
                &e,
                BreakerState::Closed,
                "destination closed: the probe succeeded; its records run again",
            );
        }
        // Waiters find no entry: they go.
        e.changed.notify_waiters();
    }

    /// Counts a failed call; returns whether the record is held (waits for its
    /// destination, its attempt not counted) rather than left to its retry policy.
    fn on_failure(
        &self,
        destination: &Destination,
        pass: (u64, bool),
        caller: Caller,
        error: &HandlerError,
        memo: &mut DestinationMemo,
    ) -> bool {
        let (epoch, probe) = pass;
        let unavailable = error.kind() == FailureKind::Unavailable;
        let mut s = self.lock();
        let now = Instant::now();
        if !s.entries.contains_key(&destination.id) && !self.make_room(&mut s, now) {
            s.untracked += 1;
            drop(s);
            self.metrics.destination_untracked();
            if let Some(suppressed) = self.throttle.admit("destinations full") {
                warn!(
                    max_tracked = self.rules.max_tracked,
                    suppressed,
                    "as many destinations are tracked as allowed: a destination failing for the first time is not isolated (its failures take the retry policy)"
                );
            }
            return false;
        }
        let rules = self.rules;
        let State { entries, open, .. } = &mut *s;
        let e = entries.entry(destination.id).or_insert_with(|| Entry {
            name: destination.display_name(),
            phase: Phase::Closed,
            consecutive: 0,
            first: None,
            mixed: false,
            failed_probes: 0,
            touched: now,
            since: SystemTime::now(),
            opened: 0,
            held_failures: 0,
            waiting: 0,
            changed: Arc::new(Notify::new()),
            epoch,
        });
        e.touched = now;
        let held = match e.phase {
            Phase::Closed => {
                e.consecutive = e.consecutive.saturating_add(1);
                match e.first {
                    None => e.first = Some(caller),
                    Some(first) if first != caller => e.mixed = true,
                    Some(_) => {}
                }
                if unavailable || (e.mixed && e.consecutive >= rules.consecutive) {
                    *open += 1;
                    self.open(e, error, "destination opened: its records wait (no attempts used, nothing dead-lettered) until a probe succeeds; other destinations run");
                    true
                } else {
                    false
                }
            }
            Phase::HalfOpen { .. } if probe && e.epoch == epoch => {
                e.failed_probes = e.failed_probes.saturating_add(1);
                self.open(e, error, "destination re-opened: the probe failed");
                // A record failing its share of probes takes its normal path: one record
                // failing on its own cannot hold its destination open forever.
                memo.failed_probes = memo.failed_probes.saturating_add(u32::from(!unavailable));
                memo.failed_probes < rules.probes_per_record
            }
            // A call that started before the destination opened: it is down, so the record
            // waits for it like the others.
            Phase::Open { .. } | Phase::HalfOpen { .. } => true,
        };
        if held {
            e.held_failures += 1;
        }
        held
    }

    /// Opens `e` (again) for its interval, at least the error's hint (a day at most).
    fn open(&self, e: &mut Entry, error: &HandlerError, line: &str) {
        let open_for = self.rules.interval(e.failed_probes).max(
            error
                .retry_after_hint()
                .unwrap_or_default()
                .min(HandlerError::MAX_RETRY_AFTER),
        );
        let from_closed = e.phase == Phase::Closed;
        e.phase = Phase::Open {
            until: clock::deadline_in(open_for),
        };
        e.epoch += 1;
        e.opened += 1;
        if from_closed {
            e.since = SystemTime::now();
        }
        e.consecutive = 0;
        e.first = None;
        e.mixed = false;
        self.metrics
            .destination_transition(BreakerState::Open.gauge(), i64::from(from_closed));
        if let Some(suppressed) = self.throttle.admit(&format!("open {}", e.name)) {
            warn!(destination = %e.name, ?open_for, error = %error, suppressed, "{line}");
        }
        e.changed.notify_waiters();
    }

    fn log_transition(&self, e: &Entry, to: BreakerState, line: &str) {
        if to == BreakerState::HalfOpen {
            self.metrics.destination_transition(to.gauge(), 0);
        }
        if let Some(suppressed) = self.throttle.admit(&format!("{} {}", to.as_str(), e.name)) {
            info!(destination = %e.name, waiting = e.waiting, suppressed, "{line}");
        }
    }

    /// A probe left unreported (its record ended otherwise): the next record may probe.
    fn return_probe(&self, id: u64, epoch: u64) {
        let mut s = self.lock();
        if let Some(e) = s.entries.get_mut(&id)
            && e.epoch == epoch
            && e.phase == (Phase::HalfOpen { probe_out: true })
        {
            e.phase = Phase::HalfOpen { probe_out: false };
            e.changed.notify_waiters();
        }
    }

    /// Whether a new destination may be tracked: forgets expired ones first (at most once
    /// per [`SWEEP_EVERY`]) when the map is full.
    fn make_room(&self, s: &mut State, now: Instant) -> bool {
        if s.entries.len() < self.rules.max_tracked {
            return true;
        }
        if now.saturating_duration_since(s.swept) < SWEEP_EVERY {
            return false;
        }
        s.swept = now;
        let idle = self.rules.idle_expiry;
        let mut forgot_open = 0;
        s.entries.retain(|_, e| {
            let expired = e.waiting == 0
                && match e.phase {
                    Phase::Closed => now.saturating_duration_since(e.touched) >= idle,
                    Phase::Open { until } => now.saturating_duration_since(until) >= idle,
                    Phase::HalfOpen { probe_out } => {
                        !probe_out && now.saturating_duration_since(e.touched) >= idle
                    }
                };
            if expired && e.phase != Phase::Closed {
                forgot_open += 1;
            }
            !expired
        });
        s.open -= forgot_open;
        if forgot_open > 0 {
            self.metrics.destination_forgotten(forgot_open);
        }
        s.entries.len() < self.rules.max_tracked
    }

    /// For the monitor.
    pub(crate) fn status(&self) -> DestinationsStatus {
        let s = self.lock();
        let mut top: Vec<DestinationStatus> = s
            .entries
            .values()
            .filter(|e| e.phase != Phase::Closed)
            .map(|e| DestinationStatus {
                name: e.name.to_string(),
                state: e.phase.state(),
                since: e.since,
                opened: e.opened,
                held_failures: e.held_failures,
                waiting: e.waiting,
            })
            .collect();
        top.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.name.cmp(&b.name)));
        top.truncate(TOP);
        DestinationsStatus {
            tracked: s.entries.len(),
            open: s.open,
            untracked: s.untracked,
            top,
        }
    }
}

impl DestinationPass<'_> {
    /// The attempt succeeded.
    pub(crate) fn succeeded(mut self) {
        if let Some(b) = self.breakers.take() {
            b.on_success(self.id, self.epoch, self.probe);
        }
    }

    /// The attempt failed with `error`: returns whether the record is held for its
    /// destination (its attempt not counted; it waits for the destination before the next).
    pub(crate) fn failed(
        mut self,
        destination: &Destination,
        caller: Caller,
        error: &HandlerError,
        memo: &mut DestinationMemo,
    ) -> bool {
        let Some(b) = self.breakers.take() else {
            return false;
        };
        let counted = matches!(
            error.kind(),
            FailureKind::Transient | FailureKind::Unavailable
        );
        if !counted {
            if self.probe {
                b.return_probe(self.id, self.epoch);
            }
            return false;
        }
        b.on_failure(destination, (self.epoch, self.probe), caller, error, memo)
    }
}

impl Drop for DestinationPass<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breakers.take()
            && self.probe
        {
            b.return_probe(self.id, self.epoch);
        }
    }
}

/// The destinations' breakers in a [`ConsumerSnapshot`](crate::ConsumerSnapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationsStatus {
    /// Destinations tracked now (those with recent failures, and the open ones).
    pub tracked: usize,
    /// Destinations open or half-open now.
    pub open: usize,
    /// Failures of destinations that could not be tracked (the cap was reached), so far.
    pub untracked: u64,
    /// The destinations open or half-open longest, oldest first (at most 10).
    pub top: Vec<DestinationStatus>,
}

/// One destination that is not closed, in [`DestinationsStatus::top`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationStatus {
    /// Its name (cut at 96 characters; bytes that are not UTF-8 replaced).
    pub name: String,
    /// Open or half-open.
    pub state: BreakerState,
    /// Since when it is not closed (it opened, after its last close).
    pub since: SystemTime,
    /// Times it opened (re-opening after a failed probe included).
    pub opened: u64,
    /// Failed calls it absorbed: they used up no attempt and dead-lettered nothing.
    pub held_failures: u64,
    /// Records waiting for it now.
    pub waiting: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::breaker::Destinations;
    use crate::record::RecordBytes;

    fn rules() -> DestinationRules {
        Destinations::<()>::by_key()
            .with_open_interval(Duration::from_secs(1), Duration::from_secs(4))
            .rules()
    }

    fn breakers(rules: DestinationRules) -> DestinationBreakers {
        DestinationBreakers::new(
            rules,
            Arc::new(ConsumerMetrics::new("g", &["t".to_owned()])),
            Duration::from_secs(30),
        )
    }

    fn destination(id: u64) -> Destination {
        Destination {
            id,
            name: RecordBytes::from(format!("endpoint-{id}")),
        }
    }

    fn transient() -> HandlerError {
        HandlerError::transient("503")
    }

    /// One attempt of record `caller` to `d` failing with `error`: whether it is held.
    fn fails(
        b: &DestinationBreakers,
        d: &Destination,
        caller: Caller,
        error: &HandlerError,
    ) -> bool {
        let pass = b.try_admit(d).ok().expect("admitted");
        pass.failed(d, caller, error, &mut DestinationMemo::default())
    }

    fn state_of(b: &DestinationBreakers, id: u64) -> Option<BreakerState> {
        b.lock().entries.get(&id).map(|e| e.phase.state())
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_two_records_open_only_their_destination() {
        let b = breakers(rules());
        let (down, up) = (destination(1), destination(2));
        assert!(
            !fails(&b, &down, 10, &transient()),
            "1 failure: the policy decides"
        );
        assert!(!fails(&b, &down, 11, &transient()), "2 failures");
        assert!(
            fails(&b, &down, 10, &transient()),
            "the third, of two records, opens it"
        );
        assert_eq!(state_of(&b, 1), Some(BreakerState::Open));
        assert!(b.try_admit(&down).is_err(), "its records wait");
        assert!(b.try_admit(&up).is_ok(), "another destination runs");
        assert_eq!(
            state_of(&b, 2),
            None,
            "a destination without failures is not tracked"
        );
        let status = b.status();
        assert_eq!((status.tracked, status.open), (1, 1));
        assert_eq!(status.top[0].name, "endpoint-1");
        assert_eq!(status.top[0].held_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_record_failing_alone_never_opens_it_and_a_success_forgets_it() {
        let b = breakers(rules());
        let d = destination(1);
        for _ in 0..10 {
            assert!(!fails(&b, &d, 7, &transient()));
        }
        assert_eq!(state_of(&b, 1), Some(BreakerState::Closed));
        b.try_admit(&d).ok().expect("closed").succeeded();
        assert_eq!(state_of(&b, 1), None, "forgotten at its first success");
        // Permanent failures say nothing about the destination.
        for caller in 0..10 {
            assert!(!fails(&b, &d, caller, &HandlerError::permanent("400")));
        }
        assert_eq!(state_of(&b, 1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_opens_at_once_for_at_least_its_hint() {
        let b = breakers(rules());
        let d = destination(1);
        let gone = HandlerError::unavailable("429").retry_after(Duration::from_secs(3));
        assert!(fails(&b, &d, 1, &gone));
        let Err(wait) = b.try_admit(&d) else {
            panic!("open")
        };
        let until = wait.until.expect("open until");
        assert!(
            until >= Instant::now() + Duration::from_secs(3),
            "the hint, not the 1 s interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_per_open_interval_doubling_then_a_success_closes() {
        let b = breakers(rules());
        let d = destination(1);
        assert!(fails(&b, &d, 1, &HandlerError::unavailable("down")));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.try_admit(&d).is_err(), "open for 1 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.try_admit(&d).ok().expect("the probe");
        let Err(wait) = b.try_admit(&d) else {
            panic!("one probe at a time")
        };
        assert!(wait.until.is_none(), "woken when the probe ends");
        let mut memo = DestinationMemo::default();
        assert!(probe.failed(&d, 1, &transient(), &mut memo), "held again");
        assert_eq!(memo.failed_probes, 1);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(b.try_admit(&d).is_err(), "open for twice as long");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.try_admit(&d).ok().expect("the second probe");
        let changed = b.lock().entries[&1].changed.clone();
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        probe.succeeded();
        assert_eq!(state_of(&b, 1), None, "closed: forgotten");
        assert!(
            futures_util::FutureExt::now_or_never(woken).is_some(),
            "waiters are woken when it closes"
        );
        assert!(b.try_admit(&d).is_ok());
        assert_eq!(b.status().open, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_ends_otherwise_hands_the_probe_on() {
        let b = breakers(rules());
        let d = destination(1);
        assert!(fails(&b, &d, 1, &HandlerError::unavailable("down")));
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.try_admit(&d).ok().expect("the probe");
        assert!(!probe.failed(
            &d,
            2,
            &HandlerError::permanent("400"),
            &mut DestinationMemo::default()
        ));
        let probe = b.try_admit(&d).ok().expect("the next record probes");
        drop(probe); // given up before its attempt
        assert!(b.try_admit(&d).is_ok(), "and the next");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_failing_its_share_of_probes_takes_its_normal_path() {
        let b = breakers(DestinationRules {
            probes_per_record: 2,
            ..rules()
        });
        let d = destination(1);
        assert!(fails(&b, &d, 1, &HandlerError::unavailable("down")));
        let mut memo = DestinationMemo::default();
        for held in [true, false] {
            tokio::time::advance(Duration::from_secs(4)).await;
            let probe = b.try_admit(&d).ok().expect("the probe");
            assert_eq!(probe.failed(&d, 1, &transient(), &mut memo), held);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_new_destinations_are_not_tracked_until_idle_ones_expire() {
        let b = breakers(DestinationRules {
            max_tracked: 2,
            idle_expiry: Duration::from_secs(10),
            ..rules()
        });
        for id in [1, 2] {
            assert!(fails(
                &b,
                &destination(id),
                1,
                &HandlerError::unavailable("down")
            ));
        }
        let third = destination(3);
        assert!(
            !fails(&b, &third, 1, &HandlerError::unavailable("down")),
            "not isolated"
        );
        assert_eq!(state_of(&b, 3), None);
        assert_eq!(b.status().untracked, 1);
        // Open ones are forgotten once their interval ended the idle expiry ago, nobody
        // waiting; then there is room again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            fails(&b, &third, 1, &HandlerError::unavailable("down")),
            "tracked now"
        );
        let status = b.status();
        assert_eq!((status.tracked, status.open), (1, 1), "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_someone_waits_for_is_never_forgotten() {
        let b = breakers(DestinationRules {
            max_tracked: 1,
            idle_expiry: Duration::from_secs(1),
            ..rules()
        });
        let d = destination(1);
        assert!(fails(&b, &d, 1, &HandlerError::unavailable("down")));
        b.waiting(1, true);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!fails(
            &b,
            &destination(2),
            1,
            &HandlerError::unavailable("down")
        ));
        assert_eq!(state_of(&b, 1), Some(BreakerState::Open));
    }

    #[test]
    fn long_names_are_cut_and_bytes_escaped() {
        let long = Destination {
            id: 1,
            name: RecordBytes::from("é".repeat(200)),
        };
        assert_eq!(
            long.display_name().chars().count(),
            super::super::destinations::MAX_NAME_CHARS + 1
        );
        let bytes = Destination {
            id: 2,
            name: RecordBytes::from(vec![0xff, b'a']),
        };
        assert_eq!(&*bytes.display_name(), "\u{fffd}a");
    }
}
