//! The per-record pipeline: decode → claim → handle → retry → dead-letter → complete/release.
//!
//! Every call into a plug-in (codec, dedup-key function, handler, idempotency store,
//! dead-letter sink) goes through [`guarded`] or [`guarded_async`], so that a panic in one
//! becomes a defined failure of that plug-in (delivery rule 14 in the crate docs):
//!
//! | panics in | becomes |
//! |---|---|
//! | codec | a poison pill: dead-lettered at once as `decode` |
//! | dedup-key function | dead-lettered at once as `panic` (it would panic again) |
//! | handler | a failure of kind `panic`: retried like a transient one (unless `panic_policy(PanicPolicy::DeadLetter)`), dead-lettered as `panic` when given up |
//! | store | a store error: the record waits and retries (never skipped) |
//! | sink | a failed dead-letter write: retried, the partition waits |
//!
//! What still escapes (a bug in kourier itself) is caught by the worker task's settle guard
//! (`retrying_consumer.rs`), which releases the record's slot and lane.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::outcome::{OutcomeObserver, RecordOutcome};
use crate::codec::Codec;
use crate::consumer::breaker::{Caller, OutageGate, Pass, ProbeMemo, Verdict, caller_of};
use crate::consumer::dedup::{Answer, CLAIM_AHEAD, LaneKeys, Taken};
use crate::consumer::dedup::{Dedup, DedupKeys};
use crate::consumer::dedup::{HeldClaim, keep_renewed};
use crate::consumer::schedule::{JobEnd, Stop};
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterSink};
use crate::error::error_chain;
pub(crate) use crate::guard::{guarded, guarded_async, store_call};
use crate::handler::{FailureKind, Handler, HandlerError};
use crate::idempotency::{Claim, StoreError};
use crate::message::Message;
use crate::metrics::{ConsumerMetrics, RecordMetrics, StoreOperation};
use crate::record::RawRecord;
use crate::retry::{RetryDecision, RetryPolicy, infra_backoff};
use crate::tiers::SourceId;
use crate::tiers::runtime::{Located, Tiers};
use crate::trace_context::TraceContext;

/// Everything a worker needs, shared by all workers of a consumer.
pub(crate) struct WorkerContext<H: Handler> {
    pub(crate) handler: Arc<H>,
    pub(crate) codec: Arc<dyn Codec<H::Event>>,
    pub(crate) policy: RetryPolicy,
    pub(crate) sink: Arc<dyn DeadLetterSink>,
    pub(crate) dedup: Option<Dedup<H::Event>>,
    pub(crate) group_id: String,
    pub(crate) handler_timeout: Option<Duration>,
    /// Handler panics are retried like transient failures (else dead-lettered at once).
    pub(crate) retry_panics: bool,
    /// A record in flight longer than this is logged once and counted as stalled.
    pub(crate) stall_threshold: Duration,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    /// Told how each record ended (the builder's `on_outcome`).
    pub(crate) observer: Option<OutcomeObserver>,
    /// The outage breaker (if any): asked before every attempt, told every result.
    pub(crate) outage: OutageGate,
    /// Retry tiers (if any): where records go after their in-place attempts.
    pub(crate) tiers: Option<Arc<Tiers>>,
}

/// Back-off for infrastructure waits (store outage, busy claims, dead-letter writes):
/// 100 ms doubling to 5 s, with jitter.
pub(crate) fn infra_delay(failures: u32) -> Duration {
    infra_backoff(Duration::from_millis(100), Duration::from_secs(5), failures)
}

/// Sleeps unless cancelled first; returns whether the full delay passed.
pub(crate) async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

/// The worker's in-flight slot, which a record gives up while it waits out a retry back-off
/// (its lane stays taken: nothing of its key or partition overtakes it).
pub(crate) trait Slot: Send + Sync {
    /// Gives the slot up; the freed slot's next job starts on a new worker.
    fn park(&self);
    /// Takes a slot back: `Ok` at once, or a receiver that fires when one is handed over.
    fn resume(&self) -> Result<(), oneshot::Receiver<()>>;
    /// Takes the slot back at once, over the limit if need be (unless one was handed over
    /// already): the record is being given up while it waits.
    fn resume_now(&self);
    /// The record's outcome is decided and only needs writing down (marking its key done,
    /// its dead letter's acknowledgement): its slot and lane are freed for the lane's next
    /// record, while its offset stays uncommitted until its job ends. Called after the last
    /// [`Slot::park`]; calls after the first change nothing.
    fn release(&self);
    /// The next records queued in the record's lane (at most `max`), in order, with their
    /// partition's stop signals: whose claims may be fetched ahead. `None` when the record
    /// has no ordered lane (unordered mode, unit tests).
    fn lane_ahead(&self, _max: usize) -> Option<(Arc<Stop>, Vec<Arc<RawRecord>>)> {
        None
    }
}

/// A slot that is never given up: the record keeps it while it waits (unit tests).
#[cfg(test)]
pub(crate) struct KeepSlot;

#[cfg(test)]
impl Slot for KeepSlot {
    fn park(&self) {}
    fn resume(&self) -> Result<(), oneshot::Receiver<()>> {
        Ok(())
    }
    fn resume_now(&self) {}
    fn release(&self) {}
}

/// What a wait does when its partition starts draining (a revoke or a shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtDrain {
    /// Go on if the wait ends before the drain's deadline: a retry back-off or a due time.
    /// Given up, the record would hold back the commit point of every record after it that
    /// already settled, and all of them would be handled again.
    FinishIfBefore,
    /// Give the record up at once: it is waiting for its claim or the key-order ledger,
    /// nothing of it has run, and the wait may last as long as an outage does.
    GiveUp,
}

/// Waits `delay` without holding a slot; returns whether the record goes on (`false`: it
/// is given up, holding its slot again, because its partition is draining — see
/// [`AtDrain`] — or its work is abandoned).
pub(crate) async fn back_off(delay: Duration, slot: &dyn Slot, stop: &Stop, at: AtDrain) -> bool {
    slot.park();
    let end = crate::clock::deadline_in(delay);
    let waited = tokio::select! {
        () = tokio::time::sleep_until(end) => true,
        () = stop.abandon.cancelled() => false,
        () = stop.drain.cancelled() => match stop.deadline() {
            Some(deadline) if at == AtDrain::FinishIfBefore && end <= deadline => tokio::select! {
                () = tokio::time::sleep_until(end) => true,
                () = stop.abandon.cancelled() => false,
            },
            _ => false,
        },
    };
    if !waited {
        slot.resume_now();
        return false;
    }
    match slot.resume() {
        Ok(()) => true,
        Err(handed) => {
            let resumed = tokio::select! {
                handed = handed => handed.is_ok(),
                () = stop.abandon.cancelled() => false,
            };
            if !resumed {
                slot.resume_now();
            }
            resumed
        }
    }
}

/// How a wait for the infrastructure (the store, the key-order ledger, the dead-letter
/// sink, a retry tier) ends early.
#[derive(Clone, Copy)]
pub(crate) enum InfraWait<'a> {
    /// Only when the record is given up (the revoke timeout or the shutdown deadline): the
    /// record's outcome is decided and is being written down.
    UntilAbandoned(&'a CancellationToken),
    /// Nothing of the record ran yet: it waits without its slot, and a drain gives it up
    /// at once ([`AtDrain::GiveUp`]).
    BeforeRunning(&'a Stop, &'a dyn Slot),
}

impl InfraWait<'_> {
    /// Waits before try number `failures + 1`; returns whether to try again.
    pub(crate) async fn wait(self, failures: u32) -> bool {
        match self {
            InfraWait::UntilAbandoned(cancel) => {
                sleep_or_cancel(infra_delay(failures), cancel).await
            }
            InfraWait::BeforeRunning(stop, slot) => {
                back_off(infra_delay(failures), slot, stop, AtDrain::GiveUp).await
            }
        }
    }
}

/// How a record's processing ended.
pub(crate) enum Outcome {
    Handled,
    Duplicate,
    DeadLettered(DeadLetterReason),
    /// Forwarded to this retry tier (acknowledged).
    Forwarded(u32),
    Abandoned,
    /// A tier record given up at a drain while it was only waiting for its due time.
    LeftForLater,
}

pub(crate) struct Failure {
    pub(crate) reason: DeadLetterReason,
    pub(crate) error: String,
    pub(crate) attempts: u32,
    pub(crate) first: SystemTime,
    pub(crate) last: SystemTime,
}

impl Failure {
    /// A failure found before any attempt ran (decode, dedup key).
    fn at_once(reason: DeadLetterReason, error: String) -> Self {
        let now = SystemTime::now();
        Failure {
            reason,
            error,
            attempts: 0,
            first: now,
            last: now,
        }
    }
}

/// The retry tiers' side of a record (see `tiers.rs`, which runs these steps).
/// A record the ledger holds: released when it is settled.
pub(crate) struct Tracked {
    pub(crate) topic: String,
    pub(crate) key: Vec<u8>,
    pub(crate) id: SourceId,
}

/// What the key-order ledger says about a record about to run.
pub(crate) enum Admit {
    /// Run it (`Some`: the ledger holds it, to be released once it is settled).
    Run(Option<Tracked>),
    /// An earlier record of its key is in a tier: forward it to this tier instead.
    Defer(u32),
    /// Given up while the ledger did not answer (its partition is draining).
    GaveUp,
}

/// What a record holds while it runs: its dedup keys, the claim of its delivery's key (while
/// an attempt runs, and from the last failed attempt until its dead letter or forward is
/// written), and its entry in the key-order ledger.
#[derive(Default)]
pub(crate) struct Holding {
    pub(crate) keys: Option<DedupKeys>,
    pub(crate) claim: Option<HeldClaim>,
    pub(crate) tracked: Option<Tracked>,
}

/// What a record's attempts carry from one to the next.
struct Tries {
    /// When the first attempt started (moved on by outages: they do not count toward
    /// `max_elapsed`).
    started: Instant,
    first_failure: Option<SystemTime>,
    made: u32,
    lost_claims: u32,
    /// Failures held for an outage (not counted as attempts), and when the last began.
    holds: u32,
    held_since: Option<Instant>,
    /// Whether (and how often) this record failed a probe: it lets others probe first.
    probed: ProbeMemo,
}

/// What follows a failed attempt.
enum Next {
    /// Not the record's fault (an outage): wait this long, no attempt used.
    Hold(Duration),
    /// Retry after this back-off.
    Retry(Duration),
    /// Given up: dead-letter (or forward to the next tier).
    GiveUp(Failure),
}

/// How one attempt went.
enum Attempted {
    Done(Result<(), HandlerError>),
    /// The claim was lost while it ran: the attempt does not count.
    ClaimLost,
    Abandoned,
}

impl<H: Handler> WorkerContext<H> {
    /// Runs one record to its end, stopping early only when `cancel` fires (for the unit
    /// tests).
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) async fn process(
        &self,
        record: Arc<RawRecord>,
        cancel: &CancellationToken,
    ) -> JobEnd {
        let stop = Stop {
            abandon: cancel.clone(),
            ..Stop::default()
        };
        self.run_job(record, &stop, &KeepSlot).await
    }

    /// Runs one record to its end; `slot` is given up while it waits out retry back-offs.
    pub(crate) async fn run_job(
        &self,
        record: Arc<RawRecord>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> JobEnd {
        let span = info_span!(
            "kourier.record",
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            key = %KeyField(record.key.as_deref()),
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        trace_record_span(&span, &record);
        let metrics = self.metrics.record(&record.topic);
        let at = self.tiers.as_ref().map(|tiers| tiers.locate(&record));
        let outcome = if self
            .wait_until_due(at.as_ref(), &record, stop, slot)
            .instrument(span.clone())
            .await
        {
            self.run_watched(&record, at.as_ref(), &metrics, stop, slot)
                .instrument(span.clone())
                .await
        } else {
            debug!(parent: &span, coordinates = %record.coordinates(), "left for later while waiting for its due time: the partition is draining");
            Outcome::LeftForLater
        };
        self.report(&record, outcome, &metrics, &span).await
    }

    /// Runs the record, logging it once as stalled if it is still running after the stall
    /// threshold.
    async fn run_watched(
        &self,
        record: &Arc<RawRecord>,
        at: Option<&Located>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        let run = self.run(record.clone(), at, metrics, stop, slot);
        tokio::pin!(run);
        // Most records end at their first poll (no I/O, or none that waits): the stall
        // timer is set only for those that do not, from the record's start (a timer per
        // record costs two timer-wheel updates).
        let started = Instant::now();
        let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => tokio::select! {
                outcome = &mut run => outcome,
                () = tokio::time::sleep_until(crate::clock::after(started, self.stall_threshold)) => {
                    warn!(coordinates = %record.coordinates(), threshold = ?self.stall_threshold, "record stalled: in flight longer than the stall threshold");
                    metrics.stalled();
                    run.await
                }
            },
        }
    }

    /// Tells the observer, the span and the metrics how the record ended; what the
    /// scheduler is told.
    async fn report(
        &self,
        record: &Arc<RawRecord>,
        outcome: Outcome,
        metrics: &RecordMetrics<'_>,
        span: &tracing::Span,
    ) -> JobEnd {
        let (reported, end) = match outcome {
            Outcome::Handled => (RecordOutcome::Handled, JobEnd::Settled),
            Outcome::Duplicate => (RecordOutcome::Duplicate, JobEnd::Settled),
            Outcome::DeadLettered(reason) => (RecordOutcome::DeadLettered(reason), JobEnd::Settled),
            Outcome::Forwarded(tier) => (RecordOutcome::Forwarded(tier), JobEnd::Settled),
            Outcome::Abandoned => {
                metrics.abandoned();
                (RecordOutcome::Abandoned, JobEnd::Abandoned)
            }
            Outcome::LeftForLater => (RecordOutcome::LeftForLater, JobEnd::LeftForLater),
        };
        if let Some(d) = &self.dedup {
            // A claim fetched ahead for it and never taken (deferred, given up before it
            // claimed): released now, not left for the sweeper.
            d.ahead.forget(record).await;
        }
        span.record("outcome", reported.as_str());
        if let Some(observer) = &self.observer {
            // Guarded like every plug-in: a panicking observer is logged and counted, and
            // the record keeps the outcome it has (it is settled either way).
            if let Err(panic) = guarded(|| observer(record, reported)) {
                metrics.panicked();
                error!(coordinates = %record.coordinates(), outcome = %reported, %panic, "outcome observer panicked; the record keeps its outcome");
            }
        }
        end
    }

    /// A record's path: decode, dedup key, then attempts until it is handled, a duplicate,
    /// dead-lettered or forwarded (or given up at a revoke or shutdown).
    async fn run(
        &self,
        record: Arc<RawRecord>,
        at: Option<&Located>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        if let Some(reason) = at.and_then(|at| at.invalid.clone()) {
            // A tier record whose headers do not hold (delivery rule 17): a record kourier
            // cannot read, dead-lettered as it is, never forwarded or waited for.
            return self
                .poison_pill(record, at, reason, metrics, stop, slot)
                .await;
        }
        let event = match self.decode(&record, metrics) {
            Ok(event) => event,
            Err(error) => {
                return self
                    .poison_pill(record, at, error, metrics, stop, slot)
                    .await;
            }
        };
        let mut message = Message::new(record.clone(), 1, event);
        let keys = match self.dedup_keys(&message, metrics) {
            Ok(keys) => keys,
            Err(failure) => {
                let holding = Holding::default();
                return self
                    .give_up(record, at, failure, holding, metrics, stop, slot)
                    .await;
            }
        };
        let caller = caller_of_record(&record, at, keys.as_ref());
        let mut holding = Holding {
            keys,
            ..Holding::default()
        };
        let mut tries = Tries {
            started: Instant::now(),
            first_failure: None,
            made: 0,
            lost_claims: 0,
            holds: 0,
            held_since: None,
            probed: ProbeMemo::default(),
        };
        // With `with_key_order`, the ledger admits the record once, after its first claim
        // (a stale copy whose position is settled is skipped before it touches the ledger).
        let mut admit = at.is_some() && self.tiers.as_ref().is_some_and(|t| t.keeps_key_order());
        let mut first_claim = true;
        loop {
            if stop.abandon.is_cancelled() {
                return Outcome::Abandoned;
            }
            // The breaker: waits (cancellable, holding no claim) while the downstream is down.
            let Some(pass) = self.outage.admit(stop, tries.probed, caller).await else {
                debug!(coordinates = %record.coordinates(), "abandoned while waiting for the breaker: the partition is draining");
                return Outcome::Abandoned;
            };
            if let Some(since) = tries.held_since.take() {
                tries.started += since.elapsed(); // an outage does not count toward max_elapsed
            }
            // Claim before every attempt (a failed attempt released its claim).
            let first = std::mem::take(&mut first_claim);
            if let Some(ended) = self
                .claim_for_attempt(&mut holding, &record, metrics, stop, slot, first)
                .await
            {
                return self.end_early(ended, holding, &record, stop).await;
            }
            if std::mem::take(&mut admit)
                && let Some(at) = at
            {
                match self.tier_admit(at, &record, stop, slot).await {
                    Admit::Run(tracked) => holding.tracked = tracked,
                    Admit::Defer(target) => {
                        drop(pass);
                        return self
                            .tier_defer(&record, at, target, holding, metrics, stop, slot)
                            .await;
                    }
                    Admit::GaveUp => {
                        self.abandon_claim(&mut holding);
                        return Outcome::Abandoned;
                    }
                }
            }
            let result = match self
                .attempt(
                    &mut message,
                    &mut holding,
                    &mut tries,
                    &record,
                    metrics,
                    stop,
                )
                .await
            {
                Attempted::Done(result) => result,
                Attempted::Abandoned => return Outcome::Abandoned,
                Attempted::ClaimLost => {
                    // The claim is someone else's now: the attempt was dropped and does not
                    // count. The record claims again (busy: waits; done: a duplicate), unless
                    // its partition is going. The pause keeps a store that keeps losing
                    // claims from spinning the record.
                    if stop.drain.is_cancelled() || stop.lost.is_cancelled() {
                        debug!(coordinates = %record.coordinates(), "abandoned: its claim was lost while the partition is draining");
                        return Outcome::Abandoned;
                    }
                    if !InfraWait::UntilAbandoned(&stop.abandon)
                        .wait(tries.lost_claims)
                        .await
                    {
                        return Outcome::Abandoned;
                    }
                    tries.lost_claims = tries.lost_claims.saturating_add(1);
                    continue;
                }
            };
            let error = match result {
                Ok(()) => {
                    pass.succeeded();
                    return self.succeeded(&record, holding, metrics, stop, slot).await;
                }
                Err(error) => error,
            };
            match self.after_failure(&error, pass, &mut tries, &record) {
                Next::Hold(delay) => {
                    self.release(&mut holding, &record, metrics).await;
                    if !delay.is_zero()
                        && !back_off(delay, slot, stop, AtDrain::FinishIfBefore).await
                    {
                        return Outcome::Abandoned;
                    }
                }
                Next::Retry(delay) => {
                    self.release(&mut holding, &record, metrics).await;
                    metrics.retried(tries.made);
                    // Nothing of the record runs while it waits: it holds no slot, and a
                    // revoke or a shutdown gives it up at once rather than waiting.
                    if !back_off(delay, slot, stop, AtDrain::FinishIfBefore).await {
                        debug!(coordinates = %record.coordinates(), "abandoned during its retry back-off: the partition is draining");
                        return Outcome::Abandoned;
                    }
                }
                Next::GiveUp(failure) => {
                    // The claim stays held until the dead letter or forward is written and
                    // the delivery is marked settled (delivery rule 18).
                    return self
                        .give_up(record, at, failure, holding, metrics, stop, slot)
                        .await;
                }
            }
        }
    }

    /// Decodes the record, a codec panic included (a poison pill either way).
    fn decode(&self, record: &RawRecord, metrics: &RecordMetrics<'_>) -> Result<H::Event, String> {
        match guarded(|| self.codec.decode(record)) {
            Ok(decoded) => decoded.map_err(|e| error_chain(&e)),
            Err(panic) => {
                metrics.panicked();
                Err(format!("codec panicked: {panic}"))
            }
        }
    }

    /// The record's dedup keys (`None`: no idempotency, or no key); a panicking key function
    /// is a failure of its own (it would panic again): dead-lettered at once as `panic`.
    fn dedup_keys(
        &self,
        message: &Message<H::Event>,
        metrics: &RecordMetrics<'_>,
    ) -> Result<Option<DedupKeys>, Failure> {
        let Some(d) = &self.dedup else {
            return Ok(None);
        };
        match guarded(|| d.keys_of(message)) {
            Ok(Some(keys)) => Ok(Some(keys)),
            Ok(None) => {
                debug!(coordinates = %message.raw().coordinates(), "record has no dedup key: handled without idempotency");
                Ok(None)
            }
            Err(panic) => {
                metrics.panicked();
                let error = format!("dedup key function panicked: {panic}");
                error!(coordinates = %message.raw().coordinates(), %error, "dead-lettering: the dedup key cannot be computed");
                Err(Failure::at_once(DeadLetterReason::Panic, error))
            }
        }
    }

    /// A record that cannot be decoded: dead-lettered at once with its raw bytes. With a
    /// dedup key that needs no decoding (a header), its delivery is claimed first and marked
    /// settled after, like any record's: a redelivery is not dead-lettered twice.
    async fn poison_pill(
        &self,
        record: Arc<RawRecord>,
        at: Option<&Located>,
        error: String,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        warn!(coordinates = %record.coordinates(), %error, "poison pill: record cannot be decoded, dead-lettering");
        let mut holding = Holding {
            keys: self
                .dedup
                .as_ref()
                .and_then(|d| guarded(|| d.keys_ahead(&record, || None)).ok().flatten()),
            ..Holding::default()
        };
        // First: a claim fetched ahead for it (a header key needs no decoding) is its own.
        if let Some(ended) = self
            .claim_for_attempt(&mut holding, &record, metrics, stop, slot, true)
            .await
        {
            return self.end_early(ended, holding, &record, stop).await;
        }
        let failure = Failure::at_once(DeadLetterReason::Decode, error);
        self.give_up(record, at, failure, holding, metrics, stop, slot)
            .await
    }

    /// Claims the record's delivery key for its next attempt; `Some` when the record ends
    /// here instead (a duplicate, or given up while waiting).
    async fn claim_for_attempt(
        &self,
        holding: &mut Holding,
        record: &Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
        first: bool,
    ) -> Option<Outcome> {
        let (Some(d), Some(keys)) = (&self.dedup, &holding.keys) else {
            return None;
        };
        match self
            .claim(d, &keys.delivery, record, metrics, stop, slot, first)
            .await
        {
            ClaimOutcome::Run(held) => {
                holding.claim = held;
                None
            }
            ClaimOutcome::Duplicate => {
                debug!(coordinates = %record.coordinates(), "duplicate: already done, skipped");
                metrics.duplicate();
                Some(Outcome::Duplicate)
            }
            ClaimOutcome::Cancelled => Some(Outcome::Abandoned),
        }
    }

    /// The record ends before an attempt (a duplicate, given up): a record the key-order
    /// ledger holds is removed from it when it is settled.
    async fn end_early(
        &self,
        outcome: Outcome,
        holding: Holding,
        record: &RawRecord,
        stop: &Stop,
    ) -> Outcome {
        match (outcome, holding.tracked) {
            (Outcome::Duplicate, Some(tracked)) => {
                if self.ledger_settle(tracked, record, stop).await {
                    Outcome::Duplicate
                } else {
                    Outcome::Abandoned
                }
            }
            (outcome, _) => outcome,
        }
    }

    /// One handler attempt, with its claim renewed while it runs.
    async fn attempt(
        &self,
        message: &mut Message<H::Event>,
        holding: &mut Holding,
        tries: &mut Tries,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
    ) -> Attempted {
        tries.made += 1;
        let attempt = tries.made;
        message.set_attempt(attempt);
        message.set_claim_token(holding.claim.as_ref().map(|h| h.token.clone()));
        tracing::Span::current().record("attempt", attempt);
        let call = guarded_async(self.handler.handle(message));
        let attempt_started = Instant::now();
        let timed = async {
            match self.handler_timeout {
                Some(limit) => tokio::time::timeout(limit, call).await.map_err(|_| limit),
                None => Ok(call.await),
            }
        };
        // The claim is renewed while the attempt runs (delivery rule 15).
        let renewal = async {
            match (&self.dedup, &holding.keys, holding.claim.as_mut()) {
                (Some(d), Some(k), Some(h)) => {
                    keep_renewed(
                        &*d.store,
                        &k.delivery,
                        d.lease,
                        h,
                        &stop.lost,
                        record,
                        metrics,
                    )
                    .await;
                }
                _ => std::future::pending().await,
            }
        };
        // Past the revoke timeout or the shutdown deadline the attempt is dropped at its
        // next `.await` and the record given up unsettled. Its claim is left to expire:
        // the attempt may have started its effect.
        // Biased: whenever the task wakes, the stop and the lease are looked at before the
        // attempt is polled again (a resumed frozen process must not run a step of an
        // attempt whose claim ran out).
        let outcome = tokio::select! {
            biased;
            () = stop.abandon.cancelled() => {
                warn!(coordinates = %record.coordinates(), attempt, "handler attempt given up: the partition was revoked or the shutdown deadline passed");
                return Attempted::Abandoned;
            }
            () = renewal => {
                tries.made -= 1;
                holding.claim = None;
                return Attempted::ClaimLost;
            }
            outcome = timed => outcome,
        };
        metrics.handler_duration(attempt_started.elapsed());
        Attempted::Done(match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => {
                metrics.panicked();
                error!(coordinates = %record.coordinates(), attempt, panic = %panic, "handler panicked");
                Err(HandlerError::panic(format!("handler panicked: {panic}")))
            }
            Err(limit) => Err(HandlerError::transient(format!(
                "handler timed out after {limit:?}"
            ))),
        })
    }

    /// Decides what follows a failed attempt: the breaker first (an outage uses no
    /// attempt), then the error's kind and the retry policy.
    fn after_failure(
        &self,
        error: &HandlerError,
        pass: Pass<'_>,
        tries: &mut Tries,
        record: &RawRecord,
    ) -> Next {
        let now = SystemTime::now();
        let first = *tries.first_failure.get_or_insert(now);
        let attempt = tries.made;
        if let Verdict::Hold(delay) = pass.failed(error, tries.holds, &mut tries.probed) {
            // Not the record's fault: no attempt used, never dead-lettered for it.
            debug!(coordinates = %record.coordinates(), attempt, ?delay, error = %error, "the downstream looks unavailable: the record waits for it (attempt not counted)");
            tries.made -= 1;
            tries.holds = tries.holds.saturating_add(1);
            tries.held_since = Some(Instant::now());
            return Next::Hold(delay);
        }
        let (retry, given_up) = match error.kind() {
            FailureKind::Permanent => (false, DeadLetterReason::Permanent),
            FailureKind::Panic => (self.retry_panics, DeadLetterReason::Panic),
            _ => (true, DeadLetterReason::RetriesExhausted),
        };
        let decision = if retry {
            self.policy
                .decide(attempt, tries.started.elapsed(), error.retry_after_hint())
        } else {
            RetryDecision::GiveUp
        };
        if let RetryDecision::RetryAfter(delay) = decision {
            debug!(coordinates = %record.coordinates(), attempt, ?delay, error = %error, "failed, retrying");
            return Next::Retry(delay);
        }
        warn!(coordinates = %record.coordinates(), attempt, reason = given_up.as_str(), error = %error, "giving up on record, dead-lettering");
        Next::GiveUp(Failure {
            reason: given_up,
            error: error.message(),
            attempts: attempt,
            first,
            last: now,
        })
    }

    /// The handler succeeded: the ledger lets the key's next records go, the lane is freed
    /// for the next record, and the delivery is marked done (its offset waits for that).
    async fn succeeded(
        &self,
        record: &RawRecord,
        holding: Holding,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        // Before the lane moves on: the key's next record must not find this one still in
        // the ledger (it would be deferred round a tier for nothing).
        if let Some(tracked) = holding.tracked
            && !self.ledger_settle(tracked, record, stop).await
        {
            return Outcome::Abandoned;
        }
        if let (Some(d), Some(keys), Some(claim)) = (&self.dedup, &holding.keys, &holding.claim) {
            // Off the lane's critical path: the next record starts while the key is marked
            // done; the offset waits for it.
            slot.release();
            if !self
                .complete(d, &keys.delivery, claim, record, metrics, &stop.abandon)
                .await
            {
                // Cut short (revoke timeout, shutdown deadline): not settled, so its offset
                // is not committed and it is delivered again.
                return Outcome::Abandoned;
            }
        }
        metrics.handled();
        Outcome::Handled
    }

    /// The record is given up: dead-lettered, or forwarded to the next retry tier. Its
    /// claim (if any) is kept alive meanwhile and its delivery marked settled once the
    /// letter or forward is acknowledged, so that a redelivery of it is skipped (at most
    /// one dead letter per event, as far as the store can tell: delivery rule 18).
    #[allow(clippy::too_many_arguments)]
    async fn give_up(
        &self,
        record: Arc<RawRecord>,
        at: Option<&Located>,
        failure: Failure,
        mut holding: Holding,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        let cancel = &stop.abandon;
        // A record the ledger holds keeps its lane until the ledger let it go.
        let pipelined = holding.tracked.is_none();
        let coordinates = record.clone();
        let write = async {
            let (record, failure) = match (&self.tiers, at) {
                (Some(tiers), Some(at)) => {
                    match self
                        .tier_give_up(tiers, at, record, failure, metrics, cancel)
                        .await
                    {
                        Ok(forwarded) => return forwarded,
                        Err(dead_letter) => dead_letter,
                    }
                }
                _ => (record, failure),
            };
            self.dead_letter(record, failure, metrics, cancel, slot, pipelined)
                .await
        };
        let outcome = self
            .renewing(write, &mut holding, &coordinates, stop, metrics)
            .await;
        match outcome {
            Outcome::DeadLettered(_) => {
                if let Some(tracked) = holding.tracked.take()
                    && !self.ledger_settle(tracked, &coordinates, stop).await
                {
                    return Outcome::Abandoned;
                }
            }
            Outcome::Forwarded(_) => {}
            other => {
                self.abandon_claim(&mut holding);
                return other;
            }
        }
        slot.release();
        self.mark_settled(holding, outcome, &coordinates, metrics, stop)
            .await
    }

    /// Marks the delivery's key done after its dead letter or forward was acknowledged
    /// (best effort within the lease, like a completion).
    pub(crate) async fn mark_settled(
        &self,
        holding: Holding,
        outcome: Outcome,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
    ) -> Outcome {
        if let (Some(d), Some(keys), Some(claim)) = (&self.dedup, &holding.keys, &holding.claim)
            && !self
                .complete(d, &keys.delivery, claim, record, metrics, &stop.abandon)
                .await
        {
            return Outcome::Abandoned;
        }
        outcome
    }

    /// Runs `work` (writing a dead letter or a forward) with the record's claim renewed
    /// meanwhile; a claim found lost is dropped from `holding` (not marked done after).
    pub(crate) async fn renewing<F: Future<Output = Outcome>>(
        &self,
        work: F,
        holding: &mut Holding,
        record: &RawRecord,
        stop: &Stop,
        metrics: &RecordMetrics<'_>,
    ) -> Outcome {
        let (Some(d), Some(keys), Some(claim)) = (&self.dedup, &holding.keys, &mut holding.claim)
        else {
            return work.await;
        };
        tokio::pin!(work);
        let renewal = keep_renewed(
            &*d.store,
            &keys.delivery,
            d.lease,
            claim,
            &stop.lost,
            record,
            metrics,
        );
        let lost = tokio::select! {
            biased;
            outcome = &mut work => return outcome,
            () = renewal => true,
        };
        if lost {
            holding.claim = None;
        }
        work.await
    }

    /// Claims `key` for `record`. On its first claim the record takes the claim fetched
    /// ahead for it, if one waits; else the claims of its lane's next records are fetched
    /// in the same batch call as its own (see [`claim_ahead`]). While the key is busy or
    /// the store does not answer, the record waits without its slot, and a drain gives it
    /// up at once (nothing of it ran).
    ///
    /// [`claim_ahead`]: crate::consumer::dedup::claim_ahead
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        d: &Dedup<H::Event>,
        key: &str,
        record: &Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
        first: bool,
    ) -> ClaimOutcome {
        let mut ahead = None;
        if first {
            match d.ahead.take(record, key).await {
                Some(Taken::Held(held)) => return ClaimOutcome::Run(Some(held)),
                Some(Taken::Done) => return ClaimOutcome::Duplicate,
                None => ahead = self.keys_ahead(d, slot),
            }
        }
        let mut waits = 0u32;
        loop {
            let sent = Instant::now();
            let answer = match ahead.take() {
                None => store_call("claim", d.claim(key)).await,
                Some((stop, next)) => {
                    let keys = std::iter::once(key.to_owned())
                        .chain(next.iter().map(|(_, k)| k.clone()))
                        .collect();
                    let mut answers = d.claim_all(keys).await.into_iter();
                    let own = answers.next().unwrap_or_else(|| {
                        Err(StoreError::Unavailable {
                            operation: "claim",
                            source: "no answer for the record's own key".into(),
                        })
                    });
                    let kept = next
                        .into_iter()
                        .zip(answers)
                        .filter_map(|((r, k), a)| match a {
                            Ok(Claim::Acquired(token)) => Some((r, k, Answer::Acquired(token))),
                            Ok(Claim::Done) => Some((r, k, Answer::Done)),
                            Ok(Claim::Busy) | Err(_) => None,
                        });
                    d.ahead.keep(&stop, sent, kept);
                    own
                }
            };
            match answer {
                Ok(Claim::Acquired(token)) => {
                    return ClaimOutcome::Run(Some(HeldClaim::new(token, sent)));
                }
                Ok(Claim::Done) => return ClaimOutcome::Duplicate,
                Ok(Claim::Busy) => {
                    debug!(coordinates = %record.coordinates(), key, "dedup key busy: another worker holds it, waiting");
                }
                Err(e) if d.run_without_store_on_outage => {
                    d.ahead.store_failed();
                    metrics.store_error(StoreOperation::Claim);
                    warn!(coordinates = %record.coordinates(), error = %e, "idempotency store unavailable: handling without dedup (opted in)");
                    return ClaimOutcome::Run(None);
                }
                Err(e) => {
                    d.ahead.store_failed();
                    metrics.store_error(StoreOperation::Claim);
                    warn!(coordinates = %record.coordinates(), error = %e, "idempotency store unavailable: waiting (the record is not skipped)");
                }
            }
            if !InfraWait::BeforeRunning(stop, slot).wait(waits).await {
                debug!(coordinates = %record.coordinates(), "given up while waiting for its claim: the partition is draining");
                return ClaimOutcome::Cancelled;
            }
            waits = waits.saturating_add(1);
        }
    }

    /// The lane's next records that have a dedup key and no claim fetched for them yet,
    /// with their keys (computed without side effects: a record whose key cannot be computed
    /// now claims at its turn, and reports why then).
    fn keys_ahead(&self, d: &Dedup<H::Event>, slot: &dyn Slot) -> Option<LaneKeys> {
        let (stop, records) = slot.lane_ahead(CLAIM_AHEAD)?;
        let keyed: Vec<_> = records
            .into_iter()
            .filter(|r| !d.ahead.holds(r))
            .filter_map(|r| {
                let decode = || {
                    let event = self.codec.decode(&r).ok()?;
                    Some(Message::new(r.clone(), 1, event))
                };
                let keys = guarded(|| d.keys_ahead(&r, decode)).ok().flatten()?;
                Some((r, keys.delivery))
            })
            .collect();
        (!keyed.is_empty()).then_some((stop, keyed))
    }

    async fn complete(
        &self,
        d: &Dedup<H::Event>,
        key: &str,
        held: &HeldClaim,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
    ) -> bool {
        // Returns false only when cancelled while retrying: the record is then given up
        // unsettled. The work is done; marking it is best effort within the lease (counted from the
        // claim or its last renewal): afterwards another worker may claim it anyway, so a
        // duplicate is possible but nothing is lost.
        let deadline = held.held_until(d.lease);
        let token = &held.token;
        let mut failures = 0u32;
        loop {
            match store_call("complete", d.complete(key, token)).await {
                Ok(()) => return true,
                Err(e) if e.is_lease_lost() => {
                    warn!(coordinates = %record.coordinates(), key, "lease expired before completion: the record may be handled again elsewhere");
                    return true;
                }
                Err(e) => {
                    d.ahead.store_failed();
                    metrics.store_error(StoreOperation::Complete);
                    // With the outage opt-in, the consumer must keep moving: do not hold the
                    // partition (or key) for the rest of the lease.
                    if d.run_without_store_on_outage || Instant::now() >= deadline {
                        error!(coordinates = %record.coordinates(), key, error = %e, "could not mark record done: a redelivery may handle it again");
                        return true;
                    }
                    warn!(coordinates = %record.coordinates(), error = %e, "could not mark record done yet, retrying");
                }
            }
            if !InfraWait::UntilAbandoned(cancel).wait(failures).await {
                return false;
            }
            failures = failures.saturating_add(1);
        }
    }

    /// Releases the record's claim after a failed attempt, so its retry (here or, after a
    /// crash, elsewhere) can claim it.
    async fn release(
        &self,
        holding: &mut Holding,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
    ) {
        let (Some(d), Some(keys), Some(held)) = (&self.dedup, &holding.keys, holding.claim.take())
        else {
            return;
        };
        // Best effort: if it fails, the lease expires and the retry claims it then.
        if let Err(e) = store_call("release", d.store.release(&keys.delivery, &held.token)).await
            && !e.is_lease_lost()
        {
            metrics.store_error(StoreOperation::Release);
            warn!(coordinates = %record.coordinates(), error = %e, "could not release claim; the retry waits for the lease to expire");
        }
    }

    /// The record is given up unsettled while holding a claim that no attempt is using:
    /// released in the background, so the next delivery need not wait for the lease.
    pub(crate) fn abandon_claim(&self, holding: &mut Holding) {
        let (Some(d), Some(keys), Some(held)) = (&self.dedup, &holding.keys, holding.claim.take())
        else {
            return;
        };
        let (store, key) = (d.store.clone(), keys.delivery.clone());
        tokio::spawn(async move {
            let _ = store_call("release", store.release(&key, &held.token)).await;
        });
    }

    /// Writes the dead letter; `pipelined`: the lane's next record may start once the letter
    /// is queued (else the lane is freed by the caller).
    async fn dead_letter(
        &self,
        record: Arc<RawRecord>,
        failure: Failure,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
        slot: &dyn Slot,
        pipelined: bool,
    ) -> Outcome {
        let letter = DeadLetter {
            record,
            reason: failure.reason,
            error: failure.error,
            attempts: failure.attempts,
            first_failure: failure.first,
            last_failure: failure.last,
            group_id: self.group_id.clone(),
        };
        let release = || {
            if pipelined {
                slot.release();
            }
        };
        let mut failures = 0u32;
        loop {
            // Pipelined: once the letter is queued, the lane's next record starts while it is
            // written (and retried, never dropped); the offset waits for the acknowledgement.
            let sent = guarded_async(async {
                let pending = self.sink.enqueue(&letter).await;
                release();
                pending.await
            })
            .await
            .unwrap_or_else(|panic| {
                Err(DeadLetterError {
                    coordinates: letter.record.coordinates(),
                    destination: "the dead-letter sink".into(),
                    source: format!("the sink panicked: {panic}").into(),
                })
            });
            release(); // also when the sink panicked before it queued
            match sent {
                Ok(receipt) => {
                    debug!(coordinates = %letter.record.coordinates(), dlt = %receipt.topic, partition = ?receipt.partition, offset = ?receipt.offset, "dead-lettered");
                    metrics.dead_lettered(letter.reason);
                    return Outcome::DeadLettered(letter.reason);
                }
                Err(e) => {
                    metrics.dead_letter_write_failed();
                    error!(coordinates = %letter.record.coordinates(), error = %error_chain(&e), failures, "dead-letter write failed; retrying, the partition waits");
                }
            }
            if !InfraWait::UntilAbandoned(cancel).wait(failures).await {
                return Outcome::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
    }
}

/// The breaker's caller for a record: its event's dedup key, else its source record (a
/// tier copy's source, from its headers), so that copies of one event count as one.
fn caller_of_record(record: &RawRecord, at: Option<&Located>, keys: Option<&DedupKeys>) -> Caller {
    match (keys, at) {
        (Some(keys), _) => caller_of(&keys.event),
        (None, Some(at)) => caller_of((&at.origin.topic, at.origin.partition, at.origin.offset)),
        (None, None) => caller_of((&*record.topic, record.partition, record.offset)),
    }
}

/// Records the record's trace id on its span and, with the `opentelemetry` feature, makes the
/// span a child of the record's trace context. Records without a valid `traceparent` header
/// cost one header scan.
fn trace_record_span(span: &tracing::Span, record: &RawRecord) {
    if span.is_disabled() {
        return;
    }
    #[cfg(not(feature = "opentelemetry"))]
    let context = record
        .headers
        .get(TraceContext::TRACEPARENT)
        .and_then(|v| TraceContext::parse_bytes(v.trim_ascii()));
    #[cfg(feature = "opentelemetry")]
    let context = TraceContext::from_headers(&record.headers);
    if let Some(tc) = context {
        span.record("trace_id", tracing::field::display(tc.trace_id_display()));
        #[cfg(feature = "opentelemetry")]
        crate::trace_context::set_parent(span, &tc);
    }
}

/// A record key for logs: its first 64 bytes, lossily as UTF-8. Formatted only when a
/// subscriber records the span, so a disabled span costs no allocation.
struct KeyField<'a>(Option<&'a [u8]>);

impl fmt::Display for KeyField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(k) => f.write_str(&String::from_utf8_lossy(&k[..k.len().min(64)])),
            None => Ok(()),
        }
    }
}

enum ClaimOutcome {
    Run(Option<HeldClaim>),
    Duplicate,
    Cancelled,
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
