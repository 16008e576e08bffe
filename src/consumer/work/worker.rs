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

#[cfg(test)]
use super::waits::KeepSlot;
use super::waits::{AtDrain, InfraWait, Slot, back_off};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

use super::destination::{Admitted, DestinationGate};
use super::outcome::{OutcomeObserver, RecordOutcome};
use crate::codec::Codec;
use crate::consumer::breaker::{
    Caller, Destination, DestinationMemo, DestinationPass, Held, OutageGate, Pass, ProbeMemo,
    Verdict, caller_of,
};
use crate::consumer::dedup::{Dedup, DedupKeys};
use crate::consumer::dedup::{HeldClaim, keep_renewed};
use crate::consumer::schedule::{JobEnd, Stop};
use crate::consumer::transaction::Transactions;
use crate::dead_letter::{DeadLetterReason, DeadLetterSink};
use crate::error::error_chain;
pub(crate) use crate::guard::{guarded, guarded_async};
use crate::handler::{FailureKind, Handler, HandlerError, sealed::Lane};
use crate::message::Message;
use crate::metrics::{ConsumerMetrics, RecordMetrics};
use crate::record::RawRecord;
use crate::retry::{RetryDecision, RetryPolicy};
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
    /// The breakers of destinations (if any): asked before every attempt, told every
    /// result.
    pub(crate) destinations: Option<DestinationGate<H::Event>>,
    /// Transactional output (if on): a successful attempt's staged outputs are kept there
    /// until the record finishes.
    pub(crate) transactions: Option<Arc<Transactions>>,
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
    /// Its destination, when the consumer isolates destinations and it names one.
    pub(crate) destination: Option<Destination>,
}

/// What a record's attempts carry from one to the next.
struct Tries {
    /// Who the breaker counts the record as (its event; 0 without a breaker or
    /// destinations, which alone count it).
    caller: Caller,
    /// The key-order ledger must still admit the record.
    admit: bool,
    /// The next claim is the record's first (it may take a claim fetched ahead).
    first_claim: bool,
    /// When the record started running, before it was read and claimed (moved on by
    /// outages: they do not count toward `max_elapsed`).
    started: Instant,
    first_failure: Option<SystemTime>,
    made: u32,
    lost_claims: u32,
    /// Failures held for an outage (not counted as attempts), and when the last began.
    holds: u32,
    held_since: Option<Instant>,
    /// Whether (and how often) this record failed a probe: it lets others probe first.
    probed: ProbeMemo,
    /// How often it failed a probe of its destination.
    destination_probes: DestinationMemo,
    /// When it first waited for its destination (toward `park_after`).
    destination_wait: Option<Instant>,
}

impl Tries {
    fn new(caller: Caller, admit: bool, started: Instant) -> Self {
        Tries {
            caller,
            admit,
            first_claim: true,
            started,
            first_failure: None,
            made: 0,
            lost_claims: 0,
            holds: 0,
            held_since: None,
            probed: ProbeMemo::default(),
            destination_probes: DestinationMemo::default(),
            destination_wait: None,
        }
    }
}

/// One record's run: what every step of its path needs.
pub(super) struct RecordRun<'a> {
    pub(super) record: &'a Arc<RawRecord>,
    pub(super) at: Option<&'a Located>,
    pub(super) metrics: &'a RecordMetrics<'a>,
    pub(super) stop: &'a Stop,
    pub(super) slot: &'a dyn Slot,
}

/// How reading a record ended it before any try.
enum Ending {
    RecordOutcome(RecordOutcome),
    /// Given up at once (dead-lettered or forwarded) with this failure.
    GiveUp(Failure),
}

/// What a try says to do next.
enum Step<'r> {
    /// Try again (after a back-off, an outage's wait or a lost claim).
    Again,
    /// The record ended here.
    Ended(RecordOutcome),
    /// Its claim said it is settled already (a duplicate), or it was given up waiting.
    Skipped(RecordOutcome),
    /// The key-order ledger deferred it behind an earlier record of its key.
    Deferred(u32, &'r Located),
    Succeeded,
    GaveUp(Failure),
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
        cancel: &tokio_util::sync::CancellationToken,
    ) -> JobEnd {
        let stop = Stop {
            abandon: crate::consumer::stop::Signal::watching(cancel.clone()),
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
        // The record's futures are built where they are polled and instrumented through a
        // pinned reference: `instrument` takes a future by value, and moving one copies it
        // (`run_watched`'s is kilobytes: its two copies per record, 5.5 KB, were most of what
        // the workers' `memcpy` moved).
        let due = pin!(self.wait_until_due(at.as_ref(), &record, stop, slot));
        let outcome = if due.instrument(span.clone()).await {
            let watched = pin!(self.run_watched(&record, at.as_ref(), &metrics, stop, slot));
            watched.instrument(span.clone()).await
        } else {
            debug!(parent: &span, coordinates = %record.coordinates(), "left for later while waiting for its due time: the partition is draining");
            RecordOutcome::LeftForLater
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
    ) -> RecordOutcome {
        // Most records end at their first poll (no I/O, or none that waits): the stall
        // timer is set only for those that do not, from the record's start (a timer per
        // record costs two timer-wheel updates). The same reading of the clock starts the
        // record's retries' elapsed time (`max_elapsed`).
        let started = Instant::now();
        let run = self.run(record.clone(), at, metrics, stop, slot, started);
        tokio::pin!(run);
        let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => {
                slot.waits();
                tokio::select! {
                outcome = &mut run => outcome,
                () = tokio::time::sleep_until(crate::clock::after(started, self.stall_threshold)) => {
                    warn!(coordinates = %record.coordinates(), threshold = ?self.stall_threshold, "record stalled: in flight longer than the stall threshold");
                    metrics.stalled();
                    run.await
                }
                }
            }
        }
    }

    /// Tells the observer, the span and the metrics how the record ended; what the
    /// scheduler is told.
    async fn report(
        &self,
        record: &Arc<RawRecord>,
        outcome: RecordOutcome,
        metrics: &RecordMetrics<'_>,
        span: &tracing::Span,
    ) -> JobEnd {
        let reported = outcome;
        let end = match outcome {
            RecordOutcome::Handled
            | RecordOutcome::Duplicate
            | RecordOutcome::DeadLettered(_)
            | RecordOutcome::Forwarded(_) => JobEnd::Settled,
            RecordOutcome::Abandoned => {
                metrics.abandoned();
                JobEnd::Abandoned
            }
            RecordOutcome::LeftForLater => JobEnd::LeftForLater,
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

    /// A record's path: read it (decode, dedup keys), then try it — breaker, claim,
    /// admission, attempt — until it is handled, a duplicate, dead-lettered or forwarded
    /// (or given up at a revoke or shutdown).
    async fn run(
        &self,
        record: Arc<RawRecord>,
        at: Option<&Located>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
        started: Instant,
    ) -> RecordOutcome {
        let r = RecordRun {
            record: &record,
            at,
            metrics,
            stop,
            slot,
        };
        let (mut message, mut holding) = match self.read(&r).await {
            Ok(read) => read,
            Err(Ending::RecordOutcome(outcome)) => return outcome,
            Err(Ending::GiveUp(failure)) => {
                let holding = Holding::default();
                // Rare paths are boxed: the future of every record stays small.
                return Box::pin(self.give_up(record, at, failure, holding, metrics, stop, slot))
                    .await;
            }
        };
        let admit = self.keeps_key_order(at);
        let mut tries = Tries::new(self.caller(&record, at, &holding), admit, started);
        loop {
            match self
                .try_once(&r, &mut message, &mut holding, &mut tries)
                .await
            {
                Step::Again => {}
                Step::Ended(outcome) => return outcome,
                Step::Skipped(outcome) => {
                    return self.end_early(outcome, holding, &record, stop).await;
                }
                Step::Deferred(target, at) => {
                    return Box::pin(
                        self.tier_defer(&record, at, target, holding, metrics, stop, slot),
                    )
                    .await;
                }
                Step::Succeeded => {
                    return self.succeeded(&record, holding, metrics, stop, slot).await;
                }
                // The claim stays held until the dead letter or forward is written and the
                // delivery is marked settled (delivery rule 18).
                Step::GaveUp(failure) => {
                    return Box::pin(
                        self.give_up(record, at, failure, holding, metrics, stop, slot),
                    )
                    .await;
                }
            }
        }
    }

    /// Who the breakers count the record as; without a breaker, no one: the record's
    /// identity is not hashed (the hash reads the topic name, whose cache line the poll
    /// thread writes for every record it reads).
    fn caller(&self, record: &RawRecord, at: Option<&Located>, holding: &Holding) -> Caller {
        if self.outage.0.is_none() && self.destinations.is_none() {
            return 0;
        }
        caller_of_record(record, at, holding.keys.as_ref())
    }

    /// Whether the key-order ledger must admit this record (tiers with `with_key_order`).
    fn keeps_key_order(&self, at: Option<&Located>) -> bool {
        at.is_some() && self.tiers.as_ref().is_some_and(|t| t.keeps_key_order())
    }

    /// Reads the record: a tier record whose headers do not hold and a record that cannot
    /// be decoded are poison pills; a panicking dedup-key function gives it up at once.
    async fn read(&self, r: &RecordRun<'_>) -> Result<(Message<H::Event>, Holding), Ending> {
        let record = r.record;
        if let Some(reason) = r.at.and_then(|at| at.invalid.clone()) {
            // A tier record whose headers do not hold (delivery rule 17): a record kourier
            // cannot read, dead-lettered as it is, never forwarded or waited for.
            return Err(Ending::RecordOutcome(
                Box::pin(self.poison_pill(r, reason)).await,
            ));
        }
        let event = match self.decode(record, r.metrics) {
            Ok(event) => event,
            Err(error) => {
                return Err(Ending::RecordOutcome(
                    Box::pin(self.poison_pill(r, error)).await,
                ));
            }
        };
        let message = Message::new(record.clone(), 1, event);
        let keys = self
            .dedup_keys(&message, r.metrics)
            .map_err(Ending::GiveUp)?;
        let destination = self
            .destination_of(&message, r.metrics)
            .map_err(Ending::GiveUp)?;
        let holding = Holding {
            keys,
            destination,
            ..Holding::default()
        };
        Ok((message, holding))
    }

    /// One try: the breaker, the claim, the ledger's admission (once), the attempt, and
    /// what its result says to do next.
    async fn try_once<'r>(
        &self,
        r: &RecordRun<'r>,
        message: &mut Message<H::Event>,
        holding: &mut Holding,
        tries: &mut Tries,
    ) -> Step<'r> {
        let (record, stop) = (r.record, r.stop);
        if stop.abandon.is_cancelled() {
            return Step::Ended(RecordOutcome::Abandoned);
        }
        // The record's destination: waits (without its slot, holding no claim) while it is
        // down; then the breaker: waits (cancellable, holding no claim) while the
        // downstream is down.
        let destination_pass = match (&self.destinations, &holding.destination) {
            (Some(gate), Some(destination)) => match gate
                .admit(destination, stop, r.slot, &mut tries.destination_wait)
                .await
            {
                Admitted::Pass(pass) => Some(pass),
                Admitted::GaveUp => {
                    debug!(coordinates = %record.coordinates(), "abandoned while waiting for its destination: the partition is draining");
                    return Step::Ended(RecordOutcome::Abandoned);
                }
                Admitted::Gone(said) => {
                    return Box::pin(self.destination_gone(&said, holding, tries, r)).await;
                }
                Admitted::Park => return Box::pin(self.park(holding, tries, r)).await,
            },
            _ => None,
        };
        // With destinations the breaker counts failures by destination (delivery rule 19).
        let (caller, isolated) = match &holding.destination {
            Some(destination) => (destination.id, true),
            None => (tries.caller, false),
        };
        let admitted = self.outage.admit_as(stop, tries.probed, caller, isolated);
        let Some(pass) = admitted.await else {
            debug!(coordinates = %record.coordinates(), "abandoned while waiting for the breaker: the partition is draining");
            return Step::Ended(RecordOutcome::Abandoned);
        };
        if let Some(since) = tries.held_since.take() {
            tries.started += since.elapsed(); // an outage does not count toward max_elapsed
        }
        // Claim before every attempt (a failed attempt released its claim).
        let first = std::mem::take(&mut tries.first_claim);
        if let Some(ended) = self.claim_for_attempt(holding, r, first).await {
            return Step::Skipped(ended);
        }
        // With `with_key_order`, the ledger admits the record once, after its first claim
        // (a stale copy whose position is settled is skipped before it touches the ledger).
        if std::mem::take(&mut tries.admit)
            && let Some(at) = r.at
        {
            match self.tier_admit(at, record, stop, r.slot).await {
                Admit::Run(tracked) => holding.tracked = tracked,
                Admit::Defer(target) => return Step::Deferred(target, at),
                Admit::GaveUp => {
                    self.abandon_claim(holding);
                    return Step::Ended(RecordOutcome::Abandoned);
                }
            }
        }
        // The batch adapter may take the lane's next records into this attempt's batch.
        let lane = self.offers_lane(r.at, &pass).then_some(r.slot);
        match self
            .attempt(message, holding, tries, record, r.metrics, stop, lane)
            .await
        {
            Attempted::Done(Ok(())) => {
                pass.succeeded();
                if let Some(d) = destination_pass {
                    d.succeeded();
                }
                Step::Succeeded
            }
            Attempted::Done(Err(error)) => {
                let passes = (pass, destination_pass);
                self.next_after(&error, passes, holding, tries, r).await
            }
            Attempted::Abandoned => Step::Ended(RecordOutcome::Abandoned),
            Attempted::ClaimLost => Box::pin(self.after_lost_claim(tries, r)).await,
        }
    }

    /// The record's destination is gone (the handler said so for a record of it): it is
    /// given up without an attempt, holding its claim like any record given up (a copy
    /// whose event is done already is skipped as a duplicate).
    async fn destination_gone<'r>(
        &self,
        said: &str,
        holding: &mut Holding,
        tries: &mut Tries,
        r: &RecordRun<'r>,
    ) -> Step<'r> {
        let first = std::mem::take(&mut tries.first_claim);
        if let Some(ended) = self.claim_for_attempt(holding, r, first).await {
            return Step::Skipped(ended);
        }
        let now = SystemTime::now();
        warn!(coordinates = %r.record.coordinates(), said, "giving up on record, dead-lettering: its destination is gone");
        Step::GaveUp(Failure {
            reason: DeadLetterReason::Permanent,
            error: format!("destination gone: {said}"),
            attempts: tries.made,
            first: tries.first_failure.unwrap_or(now),
            last: now,
        })
    }

    /// The record waited long enough for its open destination: it is parked in a retry tier
    /// (delivery rule 19 in the crate docs), a deferred forward like the key-order ledger's
    /// (no attempt used, no stage counted), so its partition's commit point moves on. It
    /// goes to its first tier (a source record) or round its own tier again, or further
    /// behind an earlier record of its key. Claimed first like any record given up (a copy
    /// whose event is done already is skipped as a duplicate).
    async fn park<'r>(
        &self,
        holding: &mut Holding,
        tries: &mut Tries,
        r: &RecordRun<'r>,
    ) -> Step<'r> {
        let (Some(tiers), Some(at)) = (&self.tiers, r.at) else {
            // The builder parks only with tiers: a record without them goes on waiting (its
            // wait starts again, so it is not told to park at once, again and again).
            tries.destination_wait = None;
            return Step::Again;
        };
        let first = std::mem::take(&mut tries.first_claim);
        if let Some(ended) = self.claim_for_attempt(holding, r, first).await {
            return Step::Skipped(ended);
        }
        let mut target = at.tier.clamp(1, tiers.count());
        if std::mem::take(&mut tries.admit) {
            match self.tier_admit(at, r.record, r.stop, r.slot).await {
                Admit::Run(_) => {}
                Admit::Defer(behind) => target = target.max(behind),
                Admit::GaveUp => {
                    self.abandon_claim(holding);
                    return Step::Ended(RecordOutcome::Abandoned);
                }
            }
        }
        // Its ledger entry (if any) stays: the forward places it at its new tier.
        holding.tracked = None;
        if let (Some(gate), Some(destination)) = (&self.destinations, &holding.destination) {
            gate.breakers.parked(destination.id);
        }
        debug!(coordinates = %r.record.coordinates(), tier = target, "parked in a retry tier: its destination is still down");
        Step::Deferred(target, at)
    }

    /// The claim was lost while the attempt ran: the attempt was dropped and does not count.
    /// The record claims again (busy: waits; done: a duplicate), unless its partition is
    /// going. The pause keeps a store that keeps losing claims from spinning the record.
    async fn after_lost_claim<'r>(&self, tries: &mut Tries, r: &RecordRun<'r>) -> Step<'r> {
        let stop = r.stop;
        if stop.drain.is_cancelled() || stop.lost.is_cancelled() {
            debug!(coordinates = %r.record.coordinates(), "abandoned: its claim was lost while the partition is draining");
            return Step::Ended(RecordOutcome::Abandoned);
        }
        if !InfraWait::UntilAbandoned(&stop.abandon)
            .wait(tries.lost_claims)
            .await
        {
            return Step::Ended(RecordOutcome::Abandoned);
        }
        tries.lost_claims = tries.lost_claims.saturating_add(1);
        Step::Again
    }

    /// After a failed attempt: wait for an outage (no attempt used) or a retry back-off
    /// without the claim and the slot, or give the record up holding its claim.
    async fn next_after<'r>(
        &self,
        error: &HandlerError,
        passes: (Pass<'_>, Option<DestinationPass<'_>>),
        holding: &mut Holding,
        tries: &mut Tries,
        r: &RecordRun<'r>,
    ) -> Step<'r> {
        let (record, stop) = (r.record, r.stop);
        let (pass, destination_pass) = passes;
        // The destination first: a record its destination holds uses no attempt.
        let destination_held = match (destination_pass, &holding.destination) {
            (Some(d), Some(destination)) => d.failed(
                destination,
                tries.caller,
                error,
                &mut tries.destination_probes,
            ),
            _ => Held::No,
        };
        let delay = match self.after_failure(error, pass, destination_held, tries, record) {
            Next::GiveUp(failure) => return Step::GaveUp(failure),
            Next::Hold(delay) => delay,
            Next::Retry(delay) => {
                r.metrics.retried(tries.made);
                delay
            }
        };
        self.release(holding, record, r.metrics).await;
        // Nothing of the record runs while it waits: it holds no slot, and a revoke or a
        // shutdown gives it up at once rather than waiting (unless the wait ends first).
        if !delay.is_zero() && !back_off(delay, r.slot, stop, AtDrain::FinishIfBefore).await {
            debug!(coordinates = %record.coordinates(), "abandoned while waiting to try again: the partition is draining");
            return Step::Ended(RecordOutcome::Abandoned);
        }
        Step::Again
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

    /// The record's destination (`None`: destinations are not isolated, or it names none); a
    /// panicking destination function is a failure of its own (it would panic again):
    /// dead-lettered at once as `panic`.
    fn destination_of(
        &self,
        message: &Message<H::Event>,
        metrics: &RecordMetrics<'_>,
    ) -> Result<Option<Destination>, Failure> {
        let Some(gate) = &self.destinations else {
            return Ok(None);
        };
        guarded(|| gate.destination_of(message)).map_err(|panic| {
            metrics.panicked();
            let error = format!("destination function panicked: {panic}");
            error!(coordinates = %message.raw().coordinates(), %error, "dead-lettering: the destination cannot be computed");
            Failure::at_once(DeadLetterReason::Panic, error)
        })
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
    async fn poison_pill(&self, r: &RecordRun<'_>, error: String) -> RecordOutcome {
        let record = r.record;
        warn!(coordinates = %record.coordinates(), %error, "poison pill: record cannot be decoded, dead-lettering");
        let mut holding = Holding {
            keys: self
                .dedup
                .as_ref()
                .and_then(|d| guarded(|| d.keys_ahead(record, || None)).ok().flatten()),
            ..Holding::default()
        };
        // First: a claim fetched ahead for it (a header key needs no decoding) is its own.
        if let Some(ended) = self.claim_for_attempt(&mut holding, r, true).await {
            return self.end_early(ended, holding, record, r.stop).await;
        }
        let failure = Failure::at_once(DeadLetterReason::Decode, error);
        self.give_up(
            record.clone(),
            r.at,
            failure,
            holding,
            r.metrics,
            r.stop,
            r.slot,
        )
        .await
    }

    /// Whether the handler may be told the records queued next in the record's lane, to run
    /// them ahead of their turn (the batch adapter does: see `batch.rs`'s module docs). With
    /// an idempotency store only records whose claims were fetched ahead and are held for
    /// them are offered (see [`Self::lane_ahead`]): an effect run ahead never runs unclaimed.
    /// Not offered when running a record ahead would skip a step its turn takes:
    ///
    /// - transactional output: its outputs are staged for its own transaction, at its turn;
    /// - destinations: it would skip its destination's breaker (delivery rule 19);
    /// - retry tiers with key order: the ledger may defer it to a tier rather than run it;
    ///   a record read from a tier topic waits for its due time, and so would its lane's;
    /// - the breaker's probe: one record tells whether the downstream is back.
    ///
    /// Unordered lanes hold one record, and a draining partition's lane offers none (see
    /// [`WorkerContext::lane_ahead`]).
    fn offers_lane(&self, at: Option<&Located>, pass: &Pass<'_>) -> bool {
        self.transactions.is_none()
            && self.destinations.is_none()
            && !self.keeps_key_order(at)
            && at.is_none_or(|at| at.tier == 0 && at.invalid.is_none())
            && !pass.is_probe()
    }

    /// Up to `max` records queued next in the record's lane, in order, decoded: up to the
    /// first that cannot be decoded (it is dead-lettered at its turn). None while the
    /// partition drains. With an idempotency store, only those before the first whose claim
    /// is not held for it (see [`Self::lent_claims`]).
    fn lane_ahead(&self, slot: &dyn Slot, stop: &Stop, max: usize) -> Vec<Message<H::Event>> {
        if stop.drain.is_cancelled() {
            return Vec::new();
        }
        let Some((lane_stop, records)) = slot.lane_ahead(max) else {
            return Vec::new();
        };
        if lane_stop.drain.is_cancelled() {
            return Vec::new();
        }
        let next = records.into_iter().map_while(|r| {
            let event = guarded(|| self.codec.decode(&r)).ok()?.ok()?;
            Some(Message::new(r, 1, event))
        });
        match &self.dedup {
            None => next.collect(),
            Some(d) => self.lent_claims(d, &lane_stop, next.collect()),
        }
    }

    /// One handler attempt, with its claim renewed while it runs; `lane`: the record's slot,
    /// when the handler may be told its lane's next records (see [`Self::offers_lane`]).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        message: &mut Message<H::Event>,
        holding: &mut Holding,
        tries: &mut Tries,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        lane: Option<&dyn Slot>,
    ) -> Attempted {
        tries.made += 1;
        let attempt = tries.made;
        message.set_attempt(attempt);
        message.set_claim_token(holding.claim.as_ref().map(|h| h.token.clone()));
        if self.transactions.is_some() {
            // Each attempt stages its own outputs: a failed attempt's are dropped.
            message.set_outputs(Some(crate::transactional::Staged::new()));
        }
        tracing::Span::current().record("attempt", attempt);
        let message_ref = &*message;
        // Inside the guard: what the handler does before its future (the batch adapter's
        // look-up of the lane) is caught like the rest of it.
        // Built in place, and awaited through pinned references: moving a future copies it.
        let mut call = pin!(guarded_async(async move {
            let call = match lane {
                Some(slot) => {
                    let ahead = |max: usize| self.lane_ahead(slot, stop, max);
                    self.handler.handle_in_lane(message_ref, Lane::new(&ahead))
                }
                None => self.handler.handle(message_ref),
            };
            call.await
        }));
        let attempt_started = Instant::now();
        let mut timed = pin!(async {
            match self.handler_timeout {
                Some(limit) => tokio::time::timeout(limit, call.as_mut())
                    .await
                    .map_err(|_| limit),
                None => Ok(call.as_mut().await),
            }
        });
        // Whether the claim (if one is renewed) still holds by the local clock: the renewal's
        // first look, made here without registering its timers.
        let lease_holds = match (&self.dedup, &holding.keys, &holding.claim) {
            (Some(d), Some(_), Some(h)) => tokio::time::Instant::now() < h.held_until(d.lease),
            _ => true,
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
        let abandoned = || {
            warn!(coordinates = %record.coordinates(), attempt, "handler attempt given up: the partition was revoked or the shutdown deadline passed");
            Attempted::Abandoned
        };
        if stop.abandon.is_cancelled() {
            return abandoned();
        }
        // The stop, and the claim's lease, are what the select below looks at before the
        // attempt's first poll: an attempt that ends at that poll (most do) ends without the
        // select (no waiter registered on the stop, no renewal timer set, none dropped).
        let first = if !lease_holds {
            None
        } else {
            match std::future::poll_fn(|cx| Poll::Ready(timed.as_mut().poll(cx))).await {
                Poll::Ready(outcome) => Some(outcome),
                Poll::Pending => None,
            }
        };
        let outcome = match first {
            Some(outcome) => outcome,
            None => tokio::select! {
                biased;
                () = stop.abandon.cancelled() => return abandoned(),
                () = renewal => {
                    tries.made -= 1;
                    holding.claim = None;
                    return Attempted::ClaimLost;
                }
                outcome = &mut timed => outcome,
            },
        };
        metrics.handler_duration(attempt_started.elapsed());
        if let (Some(t), Ok(Ok(Ok(())))) = (&self.transactions, &outcome) {
            // Produced when the record finishes, in the transaction open then.
            t.stage(message.raw(), message.take_outputs());
        }
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
        destination_held: Held,
        tries: &mut Tries,
        record: &RawRecord,
    ) -> Next {
        let now = SystemTime::now();
        let first = *tries.first_failure.get_or_insert(now);
        let attempt = tries.made;
        let verdict = if destination_held == Held::AlreadyDown {
            // A destination known down failed again: its failure alone (rule 19). The
            // consumer-wide breaker does not count it; dropping the pass hands its probe on.
            drop(pass);
            Verdict::Hold(Duration::ZERO)
        } else {
            match pass.failed(error, tries.holds, &mut tries.probed) {
                // Its destination is down: the record waits for it (at its next admission,
                // for the destination's open interval), not for a back-off of its own.
                _ if destination_held.is_held() => Verdict::Hold(Duration::ZERO),
                verdict => verdict,
            }
        };
        if let Verdict::Hold(delay) = verdict {
            // Not the record's fault: no attempt used, never dead-lettered for it.
            debug!(coordinates = %record.coordinates(), attempt, ?delay, error = %error, "the downstream looks unavailable: the record waits for it (attempt not counted)");
            tries.made -= 1;
            tries.holds = tries.holds.saturating_add(1);
            tries.held_since = Some(Instant::now());
            return Next::Hold(delay);
        }
        let (retry, given_up) = match error.kind() {
            FailureKind::Permanent | FailureKind::DestinationGone => {
                (false, DeadLetterReason::Permanent)
            }
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
        if self.tiers.is_some() && given_up == DeadLetterReason::RetriesExhausted {
            // Forwarded to the next retry tier, if there is one (`settle.rs` decides and
            // logs a dead letter after the last).
            debug!(coordinates = %record.coordinates(), attempt, error = %error, "in-place attempts used up: on to the next retry tier");
        } else {
            warn!(coordinates = %record.coordinates(), attempt, reason = given_up.as_str(), error = %error, "giving up on record, dead-lettering");
        }
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
        mut holding: Holding,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> RecordOutcome {
        // Before the lane moves on: the key's next record must not find this one still in
        // the ledger (it would be deferred round a tier for nothing).
        if let Some(tracked) = holding.tracked.take()
            && !self.ledger_settle(tracked, record, stop).await
        {
            return RecordOutcome::Abandoned;
        }
        // With transactional output the outputs and the offset commit together, after the
        // job's end: the key is marked done once they did.
        let in_transaction = self.transactions.is_some();
        if !self
            .mark_done(holding, in_transaction, record, metrics, stop, slot)
            .await
        {
            // Cut short (revoke timeout, shutdown deadline): not settled, so its offset
            // is not committed and it is delivered again.
            return RecordOutcome::Abandoned;
        }
        metrics.handled();
        RecordOutcome::Handled
    }
}

/// The breaker's caller for a record: its event's dedup key, else its source record (a
/// tier copy's source, from its headers), so that copies of one event count as one.
fn caller_of_record(record: &RawRecord, at: Option<&Located>, keys: Option<&DedupKeys>) -> Caller {
    match (keys, at) {
        (Some(keys), _) => keys.event_caller,
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

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
