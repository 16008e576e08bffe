//! The breakers of destinations (delivery rule 19 in the crate docs): one small state
//! machine per destination, in one bounded map. The settings and the states are documented
//! on [`Destinations`](super::Destinations); the worker's side (waiting without a slot) is
//! `work::destination`.
//!
//! Without limits, a destination is tracked from its first counted failure until it closes
//! again (a success while closed, a successful probe), or until it is idle past the expiry;
//! with a per-destination concurrency cap or rate limit, every destination with records
//! running is tracked (until it is idle again). Records ask
//! [`DestinationBreakers::try_admit`] before each attempt: a pass, or how to wait (until the
//! open interval ends, a token is due, or the destination's [`Notify`] says something
//! changed), or that the destination is gone.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

use super::destinations::{Destination, DestinationRules, GoneRecords};
use super::machine::Caller;
use super::status::BreakerState;
use crate::clock;
use crate::handler::{FailureKind, HandlerError};
use crate::log_throttle::LogThrottle;
use crate::metrics::ConsumerMetrics;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        probe_out: bool,
    },
    /// The handler said the destination is gone: until `until` its records are given up.
    Gone {
        until: Instant,
    },
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } | Phase::Gone { .. } => BreakerState::Open,
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
    /// What the handler said when it called the destination gone (while it is).
    gone: Option<Arc<str>>,
    /// When it last failed or changed state (for the idle expiry).
    touched: Instant,
    /// Since when it is not closed.
    since: SystemTime,
    opened: u64,
    held_failures: u64,
    /// Records waiting for it now.
    waiting: usize,
    /// A record of it was parked in a retry tier since it opened.
    parking: bool,
    /// Attempts running now (counted with a concurrency cap or a rate limit only).
    running: u32,
    /// With a concurrency cap: its places, handed to waiting records first come, first
    /// served (a freed place goes to the record that has waited longest, which alone is
    /// woken).
    places: Option<Arc<Semaphore>>,
    /// The rate limit's bucket: tokens left, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    changed: Arc<Notify>,
    /// Changes since it was tracked: a pass remembers the epoch it was given in, so a
    /// straggler's result does not move a destination that changed since.
    epoch: u64,
}

impl Entry {
    fn new(name: Box<str>, now: Instant, tokens: f64, cap: Option<u32>) -> Self {
        Entry {
            name,
            phase: Phase::Closed,
            consecutive: 0,
            first: None,
            mixed: false,
            failed_probes: 0,
            gone: None,
            touched: now,
            since: SystemTime::now(),
            opened: 0,
            held_failures: 0,
            waiting: 0,
            parking: false,
            running: 0,
            places: cap.map(|n| Arc::new(Semaphore::new(n as usize))),
            tokens,
            refilled: now,
            changed: Arc::new(Notify::new()),
            epoch: 0,
        }
    }
}

struct State {
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    /// Destinations open, half-open or gone now.
    open: usize,
    untracked: u64,
    parked: u64,
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

/// Leave for one attempt of a record of a destination. Report its result with
/// [`DestinationPass::succeeded`] or [`DestinationPass::failed`]; dropped unreported, a
/// probe passes to the next record.
pub(crate) struct DestinationPass<'a> {
    breakers: Option<&'a DestinationBreakers>,
    id: u64,
    epoch: u64,
    probe: bool,
    /// The attempt counts toward the destination's running attempts (a cap or a rate
    /// limit is set and the destination is tracked).
    counted: bool,
    /// Its place under the destination's cap: freed (handed to the next waiting record)
    /// when the pass is dropped, after its result is counted.
    _place: Option<OwnedSemaphorePermit>,
}

/// Why a record may not make its attempt now.
pub(crate) enum Denied {
    /// Wait: until `until` (`None`: until woken), or until `changed` says something changed.
    /// `down`: the destination is open (or its probe is out), not merely at its cap or out
    /// of tokens; `parking`: and a record of it was parked since it opened (its next
    /// records are parked at once rather than each waiting its own `park_after`).
    Wait {
        until: Option<Instant>,
        changed: Arc<Notify>,
        down: bool,
        parking: bool,
    },
    /// The destination is gone (the handler said so, with this message): the record is
    /// given up.
    Gone(Arc<str>),
    /// Every place under the destination's cap is taken: wait for one from these (in
    /// turn), then ask again with it.
    Place(Arc<Semaphore>),
}

/// What a record remembers of its destination between attempts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DestinationMemo {
    /// Probes of its destination it failed (its bound: `probes_per_record`).
    pub(crate) failed_probes: u32,
}

/// Whether a failed record is held for its destination, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Not held: its retry policy decides.
    No,
    /// Held: this failure opened the destination (or marked it gone with its records
    /// waiting). It counts for the consumer-wide breaker as one failure of the destination.
    Opened,
    /// Held: the destination was known down already (a failed probe, a call that started
    /// before it opened). The failure is the destination's alone: the consumer-wide breaker
    /// does not count it (and hands its probe on, if the record held it), so a destination
    /// that stays down cannot keep the consumer's breaker open.
    AlreadyDown,
}

impl Held {
    /// Whether the record waits for its destination.
    pub(crate) fn is_held(self) -> bool {
        self != Held::No
    }
}

/// How an attempt ended, for its destination.
enum Ended<'e> {
    Succeeded,
    Failed {
        destination: &'e Destination,
        caller: Caller,
        error: &'e HandlerError,
        memo: &'e mut DestinationMemo,
    },
    /// Given up before or during its attempt (nothing said about the destination).
    Dropped,
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
                parked: 0,
                swept: Instant::now(),
            }),
            metrics,
            throttle: LogThrottle::new(log_interval),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every destination with records running is tracked (a cap or a rate limit).
    fn limited(&self) -> bool {
        self.rules.max_in_flight.is_some() || self.rules.rate.is_some()
    }

    /// A full bucket.
    fn full_bucket(&self) -> f64 {
        self.rules.rate.map_or(0.0, |(calls, _)| f64::from(calls))
    }

    /// A pass for the next attempt of a record of `destination`, or why not now.
    #[cfg(test)]
    pub(crate) fn try_admit(
        &self,
        destination: &Destination,
    ) -> Result<DestinationPass<'_>, Denied> {
        self.try_admit_with(destination, &mut None)
    }

    /// A pass for the next attempt of a record of `destination`, or why not now. `place`:
    /// a place under the destination's cap the record waited for ([`Denied::Place`]); the
    /// pass takes it, a destination that went down meanwhile frees it, and a wait for a
    /// token keeps it.
    pub(crate) fn try_admit_with(
        &self,
        destination: &Destination,
        place: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<DestinationPass<'_>, Denied> {
        let mut s = self.lock();
        let now = Instant::now();
        if !s.entries.contains_key(&destination.id) {
            if !self.limited() {
                // The fast path: a destination without failures is not tracked.
                return Ok(self.pass(destination.id, 0, false, false));
            }
            if !self.make_room(&mut s, now) {
                self.untracked(&mut s);
                return Ok(self.pass(destination.id, 0, false, false));
            }
            let tokens = self.full_bucket();
            s.entries.insert(
                destination.id,
                Entry::new(
                    destination.display_name(),
                    now,
                    tokens,
                    self.rules.max_in_flight,
                ),
            );
        }
        let limited = self.limited();
        let Some(e) = s.entries.get_mut(&destination.id) else {
            unreachable!("inserted above");
        };
        let changed = e.changed.clone();
        let parking = e.parking;
        let wait = |until, down| Denied::Wait {
            until,
            changed: changed.clone(),
            down,
            parking: down && parking,
        };
        let down = match e.phase {
            Phase::Closed => Ok(false),
            Phase::Open { until } if now < until => Err(wait(Some(until), true)),
            Phase::Gone { until } if now < until => Err(Denied::Gone(
                e.gone.clone().unwrap_or_else(|| Arc::from("gone")),
            )),
            Phase::Open { .. } | Phase::Gone { .. } | Phase::HalfOpen { probe_out: false } => {
                Ok(true)
            }
            Phase::HalfOpen { probe_out: true } => Err(wait(None, true)),
        };
        let probe = match down {
            Ok(probe) => probe,
            Err(denied) => {
                // Down: a place it waited for goes to the next waiting record.
                drop(place.take());
                return Err(denied);
            }
        };
        let mut taken = None;
        if limited {
            if let Some((calls, per)) = self.rules.rate {
                let rate = f64::from(calls) / per.as_secs_f64();
                let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
                e.tokens = (e.tokens + elapsed * rate).min(f64::from(calls));
                e.refilled = now;
                if e.tokens < 1.0 {
                    // A place it holds is kept: the records behind it need a token too.
                    let due = Duration::from_secs_f64(((1.0 - e.tokens) / rate).min(86_400.0));
                    return Err(wait(Some(clock::after(now, due)), false));
                }
            }
            if let Some(places) = &e.places {
                taken = match place.take() {
                    Some(held) => Some(held),
                    None => match Arc::clone(places).try_acquire_owned() {
                        Ok(free) => Some(free),
                        Err(_) => return Err(Denied::Place(Arc::clone(places))),
                    },
                };
            }
            if self.rules.rate.is_some() {
                e.tokens -= 1.0;
            }
            e.running += 1;
        }
        if probe {
            if !matches!(e.phase, Phase::HalfOpen { .. }) {
                e.epoch += 1;
                self.log_transition(
                    e,
                    BreakerState::HalfOpen,
                    "destination half-open: one probe record goes through",
                );
            }
            e.phase = Phase::HalfOpen { probe_out: true };
            e.touched = now;
        }
        let mut pass = self.pass(destination.id, e.epoch, probe, limited);
        pass._place = taken;
        Ok(pass)
    }

    fn pass(&self, id: u64, epoch: u64, probe: bool, counted: bool) -> DestinationPass<'_> {
        DestinationPass {
            breakers: Some(self),
            id,
            epoch,
            probe,
            counted,
            _place: None,
        }
    }

    /// A destination could not be tracked (as many are as allowed): counted, logged
    /// (throttled).
    fn untracked(&self, s: &mut State) {
        s.untracked += 1;
        self.metrics.destination_untracked();
        if let Some(suppressed) = self.throttle.admit("destinations full") {
            warn!(
                max_tracked = self.rules.max_tracked,
                suppressed,
                "as many destinations are tracked as allowed: a destination not tracked yet is not isolated (its failures take the retry policy; no cap or rate limit holds it)"
            );
        }
    }

    /// A record waiting for destination `id` was parked in a retry tier: so are its next
    /// records that find it down, until it closes.
    pub(crate) fn parked(&self, id: u64) {
        let mut s = self.lock();
        s.parked += 1;
        if let Some(e) = s.entries.get_mut(&id) {
            e.parking = true;
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

    /// An attempt with `pass` ended; says whether the record is held (it waits for its
    /// destination, its attempt not counted) rather than left to its retry policy.
    fn end(&self, pass: &DestinationPass<'_>, ended: Ended<'_>) -> Held {
        let mut s = self.lock();
        let now = Instant::now();
        if pass.counted
            && let Some(e) = s.entries.get_mut(&pass.id)
        {
            // Its place (if any) is handed to the longest waiting record when the pass is
            // dropped, right after this.
            e.running = e.running.saturating_sub(1);
        }
        let held = match ended {
            Ended::Succeeded => {
                self.succeeded(&mut s, pass);
                Held::No
            }
            Ended::Failed {
                destination,
                caller,
                error,
                memo,
            } => self.failed(&mut s, pass, destination, caller, error, memo, now),
            Ended::Dropped => {
                hand_probe_on(s.entries.get_mut(&pass.id), pass);
                Held::No
            }
        };
        self.forget_if_clean(&mut s, pass.id, now);
        held
    }

    fn succeeded(&self, s: &mut State, pass: &DestinationPass<'_>) {
        let Some(e) = s.entries.get_mut(&pass.id) else {
            return;
        };
        match e.phase {
            Phase::Closed => {
                e.consecutive = 0;
                e.first = None;
                e.mixed = false;
            }
            Phase::HalfOpen { .. } if pass.probe && e.epoch == pass.epoch => {
                s.open -= 1;
                e.phase = Phase::Closed;
                e.epoch += 1;
                e.failed_probes = 0;
                e.consecutive = 0;
                e.first = None;
                e.mixed = false;
                e.gone = None;
                e.parking = false;
                self.metrics
                    .destination_transition(BreakerState::Closed.gauge(), -1);
                self.log_transition(
                    e,
                    BreakerState::Closed,
                    "destination closed: the probe succeeded; its records run again",
                );
                // Waiters find it closed: they go.
                e.changed.notify_waiters();
            }
            _ => {}
        }
    }

    /// Counts a failed call; says whether the record is held.
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &self,
        s: &mut State,
        pass: &DestinationPass<'_>,
        destination: &Destination,
        caller: Caller,
        error: &HandlerError,
        memo: &mut DestinationMemo,
        now: Instant,
    ) -> Held {
        let kind = error.kind();
        let gone = kind == FailureKind::DestinationGone;
        if !matches!(kind, FailureKind::Transient | FailureKind::Unavailable) && !gone {
            // Permanent failures and panics say nothing about the destination; a probe
            // that ends so hands the probe on.
            hand_probe_on(s.entries.get_mut(&pass.id), pass);
            return Held::No;
        }
        if !s.entries.contains_key(&destination.id) {
            if !self.make_room(s, now) {
                self.untracked(s);
                return Held::No;
            }
            let mut e = Entry::new(
                destination.display_name(),
                now,
                self.full_bucket(),
                self.rules.max_in_flight,
            );
            e.epoch = pass.epoch;
            s.entries.insert(destination.id, e);
        }
        let rules = self.rules;
        let State { entries, open, .. } = s;
        let Some(e) = entries.get_mut(&destination.id) else {
            unreachable!("inserted above");
        };
        e.touched = now;
        let unavailable = kind == FailureKind::Unavailable;
        let was_closed = e.phase == Phase::Closed;
        let held = if gone {
            *open += usize::from(was_closed);
            self.mark_gone(e, error);
            // The record itself: dead-lettered with the others, or waiting with them.
            if rules.gone == GoneRecords::Wait {
                Held::Opened
            } else {
                Held::No
            }
        } else {
            match e.phase {
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
                        Held::Opened
                    } else {
                        Held::No
                    }
                }
                Phase::HalfOpen { .. } if pass.probe && e.epoch == pass.epoch => {
                    e.failed_probes = e.failed_probes.saturating_add(1);
                    self.open(e, error, "destination re-opened: the probe failed");
                    // A record failing its share of probes takes its normal path: one
                    // record failing on its own cannot hold its destination open forever.
                    memo.failed_probes = memo.failed_probes.saturating_add(u32::from(!unavailable));
                    if memo.failed_probes < rules.probes_per_record {
                        Held::AlreadyDown
                    } else {
                        Held::No
                    }
                }
                // A call that started before the destination opened (or went): it is down,
                // so the record waits for it like the others (or, gone, is given up then).
                Phase::Open { .. } | Phase::HalfOpen { .. } | Phase::Gone { .. } => {
                    Held::AlreadyDown
                }
            }
        };
        if held.is_held() {
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
        self.enter(
            e,
            Phase::Open {
                until: clock::deadline_in(open_for),
            },
        );
        if let Some(suppressed) = self.throttle.admit(&format!("open {}", e.name)) {
            warn!(destination = %e.name, ?open_for, error = %error, suppressed, "{line}");
        }
    }

    /// The handler said `e` is gone: its records are given up (or wait) for `gone_for`.
    fn mark_gone(&self, e: &mut Entry, error: &HandlerError) {
        let gone_for = self.rules.gone_for.max(
            error
                .retry_after_hint()
                .unwrap_or_default()
                .min(HandlerError::MAX_RETRY_AFTER),
        );
        let until = clock::deadline_in(gone_for);
        e.gone = Some(Arc::from(error.message()));
        self.enter(
            e,
            match self.rules.gone {
                GoneRecords::DeadLetter => Phase::Gone { until },
                GoneRecords::Wait => Phase::Open { until },
            },
        );
        if let Some(suppressed) = self.throttle.admit(&format!("gone {}", e.name)) {
            warn!(destination = %e.name, ?gone_for, error = %error, records = ?self.rules.gone, suppressed, "destination gone: its records are given up (or wait, as configured) until it is probed again");
        }
    }

    /// `e` enters `phase` (open or gone), from whatever it was.
    fn enter(&self, e: &mut Entry, phase: Phase) {
        let from_closed = e.phase == Phase::Closed;
        e.phase = phase;
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

    /// Forgets `id` when nothing about it needs remembering: closed, no failures in a row,
    /// nothing running or waiting, its bucket full again.
    fn forget_if_clean(&self, s: &mut State, id: u64, now: Instant) {
        let Some(e) = s.entries.get(&id) else {
            return;
        };
        if self.is_clean(e, now) {
            s.entries.remove(&id);
        }
    }

    fn is_clean(&self, e: &Entry, now: Instant) -> bool {
        e.phase == Phase::Closed
            && e.consecutive == 0
            && e.running == 0
            && e.waiting == 0
            && self.rules.rate.is_none_or(|(calls, per)| {
                let rate = f64::from(calls) / per.as_secs_f64();
                let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
                e.tokens + elapsed * rate >= f64::from(calls)
            })
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
                && e.running == 0
                && match e.phase {
                    Phase::Closed => {
                        now.saturating_duration_since(e.touched) >= idle || self.is_clean(e, now)
                    }
                    Phase::Open { until } | Phase::Gone { until } => {
                        now.saturating_duration_since(until) >= idle
                    }
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
                gone: e.gone.as_deref().map(str::to_owned),
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
            parked: s.parked,
            top,
        }
    }
}

/// A probe that ended without a word about its destination (given up, or a failure of
/// its own): the next record may probe.
fn hand_probe_on(e: Option<&mut Entry>, pass: &DestinationPass<'_>) {
    if pass.probe
        && let Some(e) = e
        && e.epoch == pass.epoch
        && e.phase == (Phase::HalfOpen { probe_out: true })
    {
        e.phase = Phase::HalfOpen { probe_out: false };
        e.changed.notify_waiters();
    }
}

impl DestinationPass<'_> {
    /// The attempt succeeded.
    pub(crate) fn succeeded(mut self) {
        if let Some(b) = self.breakers.take() {
            b.end(&self, Ended::Succeeded);
        }
    }

    /// The attempt failed with `error`: says whether the record is held for its destination
    /// (its attempt not counted; it waits for the destination before the next).
    pub(crate) fn failed(
        mut self,
        destination: &Destination,
        caller: Caller,
        error: &HandlerError,
        memo: &mut DestinationMemo,
    ) -> Held {
        let Some(b) = self.breakers.take() else {
            return Held::No;
        };
        b.end(
            &self,
            Ended::Failed {
                destination,
                caller,
                error,
                memo,
            },
        )
    }
}

impl Drop for DestinationPass<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breakers.take() {
            b.end(self, Ended::Dropped);
        }
    }
}

/// The destinations' breakers in a [`ConsumerSnapshot`](crate::ConsumerSnapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationsStatus {
    /// Destinations tracked now (those with recent failures and the open ones; with a
    /// per-destination cap or rate limit, also those with records running).
    pub tracked: usize,
    /// Destinations open, half-open or gone now.
    pub open: usize,
    /// Destinations that could not be tracked (the cap was reached), counted at each
    /// failure or admission that found no room, so far.
    pub untracked: u64,
    /// Records parked in a retry tier after waiting
    /// [`park_after`](crate::Destinations::with_park_after) for their open destination, so
    /// far (each time: a record parked again from its tier counts again).
    pub parked: u64,
    /// The destinations not closed for longest, oldest first (at most 10).
    pub top: Vec<DestinationStatus>,
}

/// One destination that is not closed, in [`DestinationsStatus::top`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationStatus {
    /// Its name (cut at 96 characters; bytes that are not UTF-8 replaced).
    pub name: String,
    /// Open (or gone) or half-open.
    pub state: BreakerState,
    /// While the handler's last word was that it is
    /// [gone](crate::HandlerError::destination_gone): what it said.
    pub gone: Option<String>,
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
            .is_held()
    }

    /// `d`'s records must wait: until when (`None`: until woken, or for a place).
    fn wait_until(b: &DestinationBreakers, d: &Destination) -> Option<Instant> {
        match b.try_admit(d) {
            Err(Denied::Wait { until, .. }) => until,
            Err(Denied::Place(_)) => None,
            Err(Denied::Gone(said)) => panic!("gone: {said}"),
            Ok(_) => panic!("admitted"),
        }
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
        let until = wait_until(&b, &d).expect("open until");
        assert!(
            until >= clock::after(Instant::now(), Duration::from_secs(3)),
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
        assert_eq!(
            wait_until(&b, &d),
            None,
            "one probe at a time: woken when it ends"
        );
        let mut memo = DestinationMemo::default();
        assert_eq!(
            probe.failed(&d, 1, &transient(), &mut memo),
            Held::AlreadyDown,
            "held again"
        );
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
        let memo = &mut DestinationMemo::default();
        let permanent = HandlerError::permanent("400");
        assert_eq!(probe.failed(&d, 2, &permanent, memo), Held::No);
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
            assert_eq!(probe.failed(&d, 1, &transient(), &mut memo).is_held(), held);
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

    #[tokio::test(start_paused = true)]
    async fn a_destination_gone_gives_its_records_up_until_it_is_probed_again() {
        let b = breakers(DestinationRules {
            gone_for: Duration::from_secs(60),
            ..rules()
        });
        let d = destination(1);
        let gone = HandlerError::destination_gone("410 Gone");
        assert!(
            !fails(&b, &d, 1, &gone),
            "the record itself is dead-lettered"
        );
        let Err(Denied::Gone(said)) = b.try_admit(&d) else {
            panic!("its later records are given up")
        };
        assert_eq!(&*said, "410 Gone");
        let status = b.status();
        assert_eq!(status.open, 1);
        assert_eq!(status.top[0].gone.as_deref(), Some("410 Gone"));
        assert!(b.try_admit(&destination(2)).is_ok(), "others run");
        tokio::time::advance(Duration::from_secs(60)).await;
        b.try_admit(&d).ok().expect("probed again").succeeded();
        assert_eq!(state_of(&b, 1), None, "back: closed and forgotten");
        assert_eq!(b.status().open, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_gone_can_make_its_records_wait_instead() {
        let b = breakers(DestinationRules {
            gone: GoneRecords::Wait,
            gone_for: Duration::from_secs(60),
            ..rules()
        });
        let d = destination(1);
        assert!(
            fails(&b, &d, 1, &HandlerError::destination_gone("410")),
            "held"
        );
        assert!(
            wait_until(&b, &d)
                .is_some_and(|t| t >= clock::after(Instant::now(), Duration::from_secs(60)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_holds_a_destination_to_its_share_of_attempts() {
        let b = breakers(DestinationRules {
            max_in_flight: Some(2),
            ..rules()
        });
        let (hot, other) = (destination(1), destination(2));
        let first = b.try_admit(&hot).ok().expect("1 of 2");
        let second = b.try_admit(&hot).ok().expect("2 of 2");
        assert_eq!(wait_until(&b, &hot), None, "the third waits until one ends");
        let third_other = b.try_admit(&other).ok().expect("another destination runs");
        first.succeeded();
        let third = b.try_admit(&hot).ok().expect("a place is free");
        drop((second, third, third_other));
        assert_eq!(b.status().tracked, 0, "idle destinations are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_spaces_a_destinations_attempts() {
        let b = breakers(DestinationRules {
            rate: Some((2, Duration::from_secs(1))),
            ..rules()
        });
        let d = destination(1);
        for _ in 0..2 {
            b.try_admit(&d).ok().expect("a burst of 2").succeeded();
        }
        let due = wait_until(&b, &d).expect("the next token's time");
        assert_eq!(
            due,
            clock::after(Instant::now(), Duration::from_millis(500))
        );
        assert!(
            b.try_admit(&destination(2)).is_ok(),
            "others have their own bucket"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        b.try_admit(&d).ok().expect("a token").succeeded();
        assert!(b.try_admit(&d).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        b.try_admit(&d).ok().expect("refilled").succeeded();
    }

    /// The extreme settings `build()` accepts (durations clamped to a day) never panic or
    /// wrap in the state machine: a rate of billions per nanosecond, one per day, and hints
    /// of `Duration::MAX`.
    #[tokio::test(start_paused = true)]
    async fn extreme_settings_and_hints_never_panic() {
        let day = Duration::from_secs(86_400);
        for (calls, per) in [
            (u32::MAX, Duration::from_nanos(1)),
            (1, Duration::MAX.min(day)),
        ] {
            let b = breakers(
                Destinations::<()>::by_key()
                    .with_open_interval(Duration::from_nanos(1), Duration::MAX)
                    .with_rate_limit(calls, per)
                    .with_gone(GoneRecords::Wait, Duration::MAX)
                    .with_idle_expiry(Duration::from_nanos(1))
                    .with_max_tracked(1)
                    .rules(),
            );
            let d = destination(1);
            for _ in 0..3 {
                if let Ok(pass) = b.try_admit(&d) {
                    let hint = HandlerError::unavailable("x").retry_after(Duration::MAX);
                    pass.failed(&d, 1, &hint, &mut DestinationMemo::default());
                }
                let _ = b.try_admit(&destination(2));
                tokio::time::advance(day).await;
            }
            let gone = HandlerError::destination_gone("x").retry_after(Duration::MAX);
            if let Ok(pass) = b.try_admit(&d) {
                pass.failed(&d, 1, &gone, &mut DestinationMemo::default());
            }
            assert!(b.status().tracked <= 1);
        }
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
