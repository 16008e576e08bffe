//! The per-record pipeline: decode → claim → handle → retry → dead-letter → complete/release.
//!
//! Every call into a plug-in (codec, dedup-key function, handler, idempotency store,
//! dead-letter sink) goes through [`guarded`] or [`guarded_async`], so that a panic in one
//! becomes a defined failure of that plug-in (DESIGN rule 14):
//!
//! | panics in | becomes |
//! |---|---|
//! | codec | a poison pill: dead-lettered at once as `decode` |
//! | dedup-key function | dead-lettered at once as `panic` (it would panic again) |
//! | handler | a failure of kind `panic`: retried like a transient one (unless `retry_panics(false)`), dead-lettered as `panic` when given up |
//! | store | a store error: the record waits and retries (never skipped) |
//! | sink | a failed dead-letter write: retried, the partition waits |
//!
//! What still escapes (a bug in kourier itself) is caught by the worker task's settle guard
//! (`retrying_consumer.rs`), which releases the record's slot and lane.

use std::fmt;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::breaker::{OutageGate, ProbeMemo, Verdict};
use super::claim_ahead::{Answer, CLAIM_AHEAD, LaneKeys, Taken};
use super::dedup::Dedup;
use super::lease::{HeldClaim, keep_renewed};
use super::outcome::{OutcomeObserver, RecordOutcome};
use super::scheduler::{JobEnd, Stop};
use crate::codec::Codec;
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterSink};
use crate::error::error_chain;
pub(crate) use crate::guard::{guarded, guarded_async, store_call};
use crate::handler::{FailureKind, Handler, HandlerError};
use crate::idempotency::{Claim, StoreError};
use crate::message::Message;
use crate::metrics::{ConsumerMetrics, RecordMetrics, StoreOperation};
use crate::record::RawRecord;
use crate::retry::{RetryDecision, RetryPolicy, infra_backoff};
use crate::tiers::runtime::Tiers;
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

/// Waits out a retry back-off without holding a slot; returns whether the record goes on
/// (`false`: it is given up, holding its slot again, because its partition is draining or
/// its work is abandoned).
pub(crate) async fn back_off(delay: Duration, slot: &dyn Slot, stop: &Stop) -> bool {
    slot.park();
    let end = Instant::now() + delay;
    let waited = tokio::select! {
        () = tokio::time::sleep_until(end) => true,
        () = stop.abandon.cancelled() => false,
        // A drain (revoke, shutdown) lets the retry run if its back-off ends before the
        // drain's deadline: given up, the record would hold back the commit point of every
        // record after it that already settled, and all of them would be handled again.
        () = stop.drain.cancelled() => match stop.deadline() {
            Some(deadline) if end <= deadline => tokio::select! {
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

/// How a record's processing ended.
pub(crate) enum Outcome {
    Handled,
    Duplicate,
    DeadLettered(DeadLetterReason),
    /// Forwarded to this retry tier (acknowledged).
    Forwarded(u32),
    Abandoned,
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
    pub(super) fn at_once(reason: DeadLetterReason, error: String) -> Self {
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
        // Retry tiers: a tier record waits for its due time (without its slot), and with
        // `keep_key_order` the ledger may defer the record behind its key's earlier ones.
        let tracked = match &self.tiers {
            None => Ok(None),
            Some(tiers) => {
                self.tier_prelude(tiers, &record, stop, slot, &metrics)
                    .instrument(span.clone())
                    .await
            }
        };
        let outcome = match tracked {
            Err(ended) => ended,
            Ok(tracked) => {
                let run = self
                    .run(record.clone(), &metrics, stop, slot)
                    .instrument(span.clone());
                tokio::pin!(run);
                // Most records end at their first poll (no I/O, or none that waits): the
                // stall timer is set only for those that do not, from the record's start
                // (a timer per record costs two timer-wheel updates).
                let started = Instant::now();
                let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
                let outcome = match first {
                    Poll::Ready(outcome) => outcome,
                    Poll::Pending => tokio::select! {
                        outcome = &mut run => outcome,
                        () = tokio::time::sleep_until(started + self.stall_threshold) => {
                            warn!(coordinates = %record.coordinates(), threshold = ?self.stall_threshold, "record stalled: in flight longer than the stall threshold");
                            metrics.stalled();
                            run.await
                        }
                    },
                };
                match (tracked, &self.tiers) {
                    (Some(t), Some(tiers)) => self.tier_settle(tiers, t, outcome, stop).await,
                    _ => outcome,
                }
            }
        };
        let (reported, end) = match outcome {
            Outcome::Handled => (RecordOutcome::Handled, JobEnd::Settled),
            Outcome::Duplicate => (RecordOutcome::Duplicate, JobEnd::Settled),
            Outcome::DeadLettered(reason) => (RecordOutcome::DeadLettered(reason), JobEnd::Settled),
            Outcome::Forwarded(tier) => (RecordOutcome::Forwarded(tier), JobEnd::Settled),
            Outcome::Abandoned => {
                metrics.abandoned();
                (RecordOutcome::Abandoned, JobEnd::Abandoned)
            }
        };
        if let Some(d) = &self.dedup {
            // A claim fetched ahead for it and never taken (deferred, given up before it
            // claimed): released now, not left for the sweeper.
            d.ahead.forget(&record).await;
        }
        span.record("outcome", reported.as_str());
        if let Some(observer) = &self.observer {
            // Guarded like every plug-in: a panicking observer is logged and counted, and
            // the record keeps the outcome it has (it is settled either way).
            if let Err(panic) = guarded(|| observer(&record, reported)) {
                metrics.panicked();
                error!(coordinates = %record.coordinates(), outcome = %reported, %panic, "outcome observer panicked; the record keeps its outcome");
            }
        }
        end
    }

    async fn run(
        &self,
        record: Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Outcome {
        let cancel = &stop.abandon;
        let decoded = match guarded(|| self.codec.decode(&record)) {
            Ok(decoded) => decoded.map_err(|e| error_chain(&e)),
            Err(panic) => {
                metrics.panicked();
                Err(format!("codec panicked: {panic}"))
            }
        };
        let event = match decoded {
            Ok(event) => event,
            Err(error) => {
                warn!(coordinates = %record.coordinates(), %error, "poison pill: record cannot be decoded, dead-lettering");
                let failure = Failure::at_once(DeadLetterReason::Decode, error);
                return self
                    .dead_letter(record, failure, metrics, cancel, slot)
                    .await;
            }
        };
        let mut message = Message::new(record.clone(), 1, event);
        let dedup_key = match &self.dedup {
            None => None,
            Some(d) => match guarded(|| d.key.namespaced_key_of(&d.namespace, &message)) {
                Ok(Some(k)) => Some(k),
                Ok(None) => {
                    debug!(coordinates = %record.coordinates(), "record has no dedup key: handled without idempotency");
                    None
                }
                Err(panic) => {
                    metrics.panicked();
                    let error = format!("dedup key function panicked: {panic}");
                    error!(coordinates = %record.coordinates(), %error, "dead-lettering: the dedup key cannot be computed");
                    let failure = Failure::at_once(DeadLetterReason::Panic, error);
                    return self
                        .dead_letter(record, failure, metrics, cancel, slot)
                        .await;
                }
            },
        };

        let mut started = Instant::now();
        let mut first_failure = None;
        let mut attempt = 0u32;
        let mut lost_claims = 0u32;
        let mut first_claim = Some(slot);
        // Failures held for an outage (not counted as attempts), and when the last began.
        let (mut holds, mut held_since) = (0u32, None::<Instant>);
        // Whether this record failed a probe (it lets others probe first).
        let mut probed = ProbeMemo::default();
        loop {
            if cancel.is_cancelled() {
                return Outcome::Abandoned;
            }
            // The breaker: waits (cancellable, holding no claim) while the downstream is down.
            let Some(pass) = self
                .outage
                .admit(stop, probed, (record.partition, record.offset))
                .await
            else {
                debug!(coordinates = %record.coordinates(), "abandoned while waiting for the breaker: the partition is draining");
                return Outcome::Abandoned;
            };
            if let Some(since) = held_since.take() {
                started += since.elapsed(); // an outage does not count toward max_elapsed
            }
            // Claim before every attempt (a failed attempt released its claim). The first
            // takes the claim fetched ahead for it, if one waits; else it fetches the claims
            // of its lane's next records with its own.
            let mut held = match (&self.dedup, &dedup_key) {
                (Some(d), Some(k)) => match self
                    .claim(d, k, &record, metrics, cancel, first_claim.take())
                    .await
                {
                    ClaimOutcome::Run(held) => held,
                    ClaimOutcome::Duplicate => {
                        debug!(coordinates = %record.coordinates(), "duplicate: already done, skipped");
                        metrics.duplicate();
                        return Outcome::Duplicate;
                    }
                    ClaimOutcome::Cancelled => return Outcome::Abandoned,
                },
                _ => None,
            };

            attempt += 1;
            message.set_attempt(attempt);
            message.set_claim_token(held.as_ref().map(|h| h.token.clone()));
            tracing::Span::current().record("attempt", attempt);
            let call = guarded_async(self.handler.handle(&message));
            let attempt_started = Instant::now();
            let timed = async {
                match self.handler_timeout {
                    Some(limit) => tokio::time::timeout(limit, call).await.map_err(|_| limit),
                    None => Ok(call.await),
                }
            };
            // The claim is renewed while the attempt runs (DESIGN rule 15).
            let renewal = async {
                match (&self.dedup, &dedup_key, held.as_mut()) {
                    (Some(d), Some(k), Some(h)) => {
                        keep_renewed(&*d.store, k, d.lease, h, &stop.lost, &record, metrics).await;
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
                () = cancel.cancelled() => {
                    warn!(coordinates = %record.coordinates(), attempt, "handler attempt given up: the partition was revoked or the shutdown deadline passed");
                    return Outcome::Abandoned;
                }
                () = renewal => {
                    // The claim is someone else's now: drop the attempt (at its next `.await`)
                    // and commit nothing for it. It does not count; the record claims again
                    // (busy: waits; done: a duplicate), unless its partition is going, in which
                    // case nothing of it runs any more and it is given up like a back-off. The
                    // pause keeps a store that keeps losing claims from spinning the record.
                    attempt -= 1;
                    if stop.drain.is_cancelled() || stop.lost.is_cancelled() {
                        debug!(coordinates = %record.coordinates(), "abandoned: its claim was lost while the partition is draining");
                        return Outcome::Abandoned;
                    }
                    if !sleep_or_cancel(infra_delay(lost_claims), cancel).await {
                        return Outcome::Abandoned;
                    }
                    lost_claims = lost_claims.saturating_add(1);
                    continue;
                }
                outcome = timed => outcome,
            };
            metrics.handler_duration(attempt_started.elapsed());
            let result = match outcome {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => {
                    metrics.panicked();
                    error!(coordinates = %record.coordinates(), attempt, panic = %panic, "handler panicked");
                    Err(HandlerError::panic(format!("handler panicked: {panic}")))
                }
                Err(limit) => Err(HandlerError::transient(format!(
                    "handler timed out after {limit:?}"
                ))),
            };

            let error = match result {
                Ok(()) => {
                    pass.succeeded();
                    if let (Some(d), Some(k), Some(h)) = (&self.dedup, &dedup_key, &held) {
                        // Off the lane's critical path: the next record starts while the
                        // key is marked done; the offset waits for it.
                        slot.release();
                        if !self.complete(d, k, h, &record, metrics, cancel).await {
                            // Cut short (revoke timeout, shutdown deadline): not settled, so
                            // its offset is not committed and it is delivered again.
                            return Outcome::Abandoned;
                        }
                    }
                    metrics.handled();
                    return Outcome::Handled;
                }
                Err(e) => e,
            };
            let now = SystemTime::now();
            let first = *first_failure.get_or_insert(now);
            if let (Some(d), Some(k), Some(h)) = (&self.dedup, &dedup_key, &held) {
                self.release(d, k, h, &record, metrics).await;
            }
            if let Verdict::Hold(delay) = pass.failed(&error, holds, &mut probed) {
                // Not the record's fault: no attempt used, never dead-lettered for it.
                debug!(coordinates = %record.coordinates(), attempt, ?delay, error = %error, "the downstream looks unavailable: the record waits for it (attempt not counted)");
                (attempt, holds, held_since) =
                    (attempt - 1, holds.saturating_add(1), Some(Instant::now()));
                if !delay.is_zero() && !back_off(delay, slot, stop).await {
                    return Outcome::Abandoned;
                }
                continue;
            }
            let (retry, given_up) = match error.kind() {
                FailureKind::Permanent => (false, DeadLetterReason::Permanent),
                FailureKind::Panic => (self.retry_panics, DeadLetterReason::Panic),
                _ => (true, DeadLetterReason::RetriesExhausted),
            };
            let decision = if retry {
                self.policy
                    .decide(attempt, started.elapsed(), error.retry_after_hint())
            } else {
                RetryDecision::GiveUp
            };
            let reason = match decision {
                RetryDecision::RetryAfter(delay) => {
                    debug!(coordinates = %record.coordinates(), attempt, ?delay, error = %error, "failed, retrying");
                    metrics.retried(attempt);
                    // Nothing of the record runs while it waits: it holds no slot, and a
                    // revoke or a shutdown gives it up at once rather than waiting.
                    if !back_off(delay, slot, stop).await {
                        debug!(coordinates = %record.coordinates(), "abandoned during its retry back-off: the partition is draining");
                        return Outcome::Abandoned;
                    }
                    continue;
                }
                _ => given_up,
            };
            warn!(coordinates = %record.coordinates(), attempt, reason = reason.as_str(), error = %error, "giving up on record, dead-lettering");
            let failure = Failure {
                reason,
                error: error.message(),
                attempts: attempt,
                first,
                last: now,
            };
            return self
                .dead_letter(record, failure, metrics, cancel, slot)
                .await;
        }
    }

    /// Claims `key` for `record`. On its first claim (`first` is its slot) the record takes
    /// the claim fetched ahead for it, if one waits; else the claims of its lane's next
    /// records are fetched in the same batch call as its own (see [`claim_ahead`]).
    ///
    /// [`claim_ahead`]: super::claim_ahead
    async fn claim(
        &self,
        d: &Dedup<H::Event>,
        key: &str,
        record: &Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
        first: Option<&dyn Slot>,
    ) -> ClaimOutcome {
        let mut ahead = None;
        if let Some(slot) = first {
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
            if !sleep_or_cancel(infra_delay(waits), cancel).await {
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
                let key = guarded(|| d.key.namespaced_key_ahead(&d.namespace, &r, decode));
                let key = key.ok().flatten()?;
                Some((r, key))
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
            if !sleep_or_cancel(infra_delay(failures), cancel).await {
                return false;
            }
            failures = failures.saturating_add(1);
        }
    }

    async fn release(
        &self,
        d: &Dedup<H::Event>,
        key: &str,
        held: &HeldClaim,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
    ) {
        // Best effort: if it fails, the lease expires and the retry claims it then.
        if let Err(e) = store_call("release", d.store.release(key, &held.token)).await
            && !e.is_lease_lost()
        {
            metrics.store_error(StoreOperation::Release);
            warn!(coordinates = %record.coordinates(), error = %e, "could not release claim; the retry waits for the lease to expire");
        }
    }

    pub(super) async fn dead_letter(
        &self,
        record: Arc<RawRecord>,
        failure: Failure,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
        slot: &dyn Slot,
    ) -> Outcome {
        // Retry tiers: a transient give-up goes to the next tier; a tier record is
        // dead-lettered as its source record.
        let (record, failure) = match &self.tiers {
            None => (record, failure),
            Some(tiers) => match self
                .tier_give_up(tiers, record, failure, metrics, cancel)
                .await
            {
                Ok(forwarded) => return forwarded,
                Err(dead_letter) => dead_letter,
            },
        };
        let letter = DeadLetter {
            record,
            reason: failure.reason,
            error: failure.error,
            attempts: failure.attempts,
            first_failure: failure.first,
            last_failure: failure.last,
            group_id: self.group_id.clone(),
        };
        let mut failures = 0u32;
        loop {
            // Pipelined: once the letter is queued, the lane's next record starts while it is
            // written (and retried, never dropped); the offset waits for the acknowledgement.
            let sent = guarded_async(async {
                let pending = self.sink.enqueue(&letter).await;
                slot.release();
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
            slot.release(); // also when the sink panicked before it queued
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
            if !sleep_or_cancel(infra_delay(failures), cancel).await {
                return Outcome::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
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
