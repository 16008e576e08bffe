//! The queue engine: batches from a [`ShareSource`], each record's life (decode → claim →
//! handler → retry in place → dead letter → accept), lock renewal and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::QueueReport;
use super::source::{Ack, Delivery, ShareSource};
use crate::RecordOutcome;
use crate::clock;
use crate::codec::Codec;
use crate::consumer::{
    Dedup, OutageGate, OutcomeObserver, ProbeMemo, Signal, Stop, Verdict, caller_of,
};
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterSink, MAX_ERROR_MESSAGE_BYTES};
use crate::error::error_chain;
use crate::guard::{guarded, guarded_async};
use crate::handler::{FailureKind, Handler, HandlerError};
use crate::idempotency::{Claim, ClaimToken};
use crate::message::Message;
use crate::metrics::{ConsumerMetrics, RecordMetrics, StoreOperation};
use crate::record::RawRecord;
use crate::retry::{RetryDecision, RetryPolicy};

/// How long one poll waits for records before the loop looks at the stop signal again.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// The lock duration assumed before the broker said (the broker's default is 30 s; a third
/// of 15 s, the broker's lowest default minimum, keeps any default lock alive).
const ASSUMED_LOCK: Duration = Duration::from_secs(15);
/// Waits between tries of the store or the sink while they fail (the record stays locked).
const INFRA_WAIT: Duration = Duration::from_millis(500);
const INFRA_WAIT_MAX: Duration = Duration::from_secs(5);

/// Everything a record's life needs, shared by the records of every batch.
pub(super) struct Engine<H: Handler, C> {
    pub(super) handler: H,
    pub(super) codec: C,
    pub(super) retry: RetryPolicy,
    pub(super) sink: Arc<dyn DeadLetterSink>,
    pub(super) dedup: Option<Dedup<H::Event>>,
    pub(super) observer: Option<OutcomeObserver>,
    /// The outage breaker (a [`BreakerPolicy`](crate::BreakerPolicy)), or none.
    pub(super) gate: OutageGate,
    pub(super) group: String,
    pub(super) max_in_flight: usize,
    pub(super) shutdown_timeout: Duration,
    pub(super) counts: Counts,
    /// kourier's metrics, under the same names and labels as the consumer-group engine's
    /// (the breaker's included: it shares these handles).
    pub(super) metrics: Arc<ConsumerMetrics>,
}

/// What became of the records, for the [`QueueReport`].
#[derive(Default)]
pub(super) struct Counts {
    handled: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    released_unstarted: AtomicU64,
    abandoned: AtomicU64,
}

impl Counts {
    pub(super) fn report(&self) -> QueueReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueReport {
            handled: get(&self.handled),
            duplicates: get(&self.duplicates),
            dead_lettered: get(&self.dead_lettered),
            released_unstarted: get(&self.released_unstarted),
            abandoned: get(&self.abandoned),
            acknowledgement_failures: 0,
        }
    }
}

/// A batch record's state: waiting for a slot, running, settled (or released unstarted).
const WAITING: u8 = 0;
const RUNNING: u8 = 1;
const SETTLED: u8 = 2;

/// How a record's life ended, before it is settled with the source.
enum End {
    Outcome(RecordOutcome),
    /// Given up (shutdown): released so another member takes it at once.
    Abandoned,
}

/// The two stop levels: `stop` (no new record starts; waits end), `hard` (the shutdown
/// timeout has passed: running handlers are dropped).
#[derive(Clone)]
pub(super) struct Stops {
    pub(super) stop: CancellationToken,
    pub(super) hard: CancellationToken,
}

impl<H: Handler, C: Codec<H::Event>> Engine<H, C> {
    /// Polls and runs batches until `stops.stop`; then closes the source.
    pub(super) async fn run<S: ShareSource>(&self, source: &S, stops: &Stops) {
        let mut poll_failures = 0u32;
        while !stops.stop.is_cancelled() {
            let polled = tokio::select! {
                biased;
                () = stops.stop.cancelled() => break,
                polled = source.poll(POLL_WAIT) => polled,
            };
            let batch = match polled {
                Ok(batch) => {
                    poll_failures = 0;
                    batch
                }
                Err(e) => {
                    if poll_failures == 0 || poll_failures.is_multiple_of(20) {
                        warn!(group = %self.group, error = %error_chain(&*e), failures = poll_failures + 1, "share-group poll failed; trying again");
                    }
                    poll_failures = poll_failures.saturating_add(1);
                    tokio::select! {
                        () = stops.stop.cancelled() => break,
                        () = tokio::time::sleep(INFRA_WAIT) => {}
                    }
                    continue;
                }
            };
            if let Some(first) = batch.first() {
                // One topic per consumer: the batch is counted in one increment.
                self.metrics
                    .consumed_from(&first.record.topic, batch.len() as u64);
                self.run_batch(source, batch, stops).await;
            }
        }
        source.close().await;
    }

    /// Runs one batch: up to `max_in_flight` records at once, every held lock renewed each
    /// third of the lock duration (and flushed); settles every record. At the stop signal
    /// the records not started yet are RELEASEd and flushed at once (not after the running
    /// ones), so another member takes them without waiting.
    async fn run_batch<S: ShareSource>(
        &self,
        source: &S,
        batch: Vec<Delivery<S::Token>>,
        stops: &Stops,
    ) {
        let states: Vec<AtomicU8> = batch.iter().map(|_| AtomicU8::new(WAITING)).collect();
        let renewer = async {
            loop {
                let lock = source.lock_duration().unwrap_or(ASSUMED_LOCK);
                tokio::time::sleep((lock / 3).max(Duration::from_millis(10))).await;
                let mut renewed = 0usize;
                for (delivery, state) in batch.iter().zip(&states) {
                    if state.load(Ordering::Acquire) != SETTLED {
                        match source.renew(&delivery.token) {
                            Ok(()) => renewed += 1,
                            Err(e) => {
                                warn!(coordinates = %delivery.record.coordinates(), error = %error_chain(&*e), "renewing the record's lock failed")
                            }
                        }
                    }
                }
                if renewed > 0 {
                    debug!(renewed, "renewing locks");
                    self.flush(source).await;
                }
            }
        };
        let releaser = async {
            stops.stop.cancelled().await;
            if self.release_waiting(source, &batch, &states) > 0 {
                self.flush(source).await;
            }
            std::future::pending::<()>().await;
        };
        // Indices, not references, go through the stream: a closure taking references
        // makes the future not provably `Send` for every lifetime (a rustc limitation).
        let (batch_ref, states_ref) = (&batch, &states);
        let records = futures_util::stream::iter(0..batch.len())
            .map(|i| self.run_one(source, &batch_ref[i], &states_ref[i], stops))
            .buffer_unordered(self.max_in_flight.max(1))
            .collect::<Vec<()>>();
        tokio::select! {
            _ = records => {}
            () = renewer => {}
            () = releaser => {}
        }
        // The records stream can end before the releaser saw the stop.
        if self.release_waiting(source, &batch, &states) > 0 {
            self.flush(source).await;
        }
        // The settlements go with the next poll (no round trip of their own), or with the
        // close.
    }

    /// RELEASEs the records of the batch that did not start; how many.
    fn release_waiting<S: ShareSource>(
        &self,
        source: &S,
        batch: &[Delivery<S::Token>],
        states: &[AtomicU8],
    ) -> u64 {
        let mut released = 0u64;
        for (delivery, state) in batch.iter().zip(states) {
            if state
                .compare_exchange(WAITING, SETTLED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                released += 1;
                if let Err(e) = source.settle(&delivery.token, Ack::Release) {
                    warn!(coordinates = %delivery.record.coordinates(), error = %error_chain(&*e), "releasing the record failed; its lock runs out and the broker delivers it again");
                }
            }
        }
        if released > 0 {
            self.counts
                .released_unstarted
                .fetch_add(released, Ordering::Relaxed);
            info!(group = %self.group, released, "stopping: records not started are released");
        }
        released
    }

    /// One record of a batch, from its start to its settlement; nothing when the stop
    /// released it before it started.
    async fn run_one<S: ShareSource>(
        &self,
        source: &S,
        delivery: &Delivery<S::Token>,
        state: &AtomicU8,
        stops: &Stops,
    ) {
        if stops.stop.is_cancelled()
            || state
                .compare_exchange(WAITING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return; // the releaser settles it
        }
        // In flight (the `kourier_records_in_flight` gauge) until dropped, after settling.
        let metrics = self.metrics.record(&delivery.record.topic);
        let ack = match self.record_life(delivery, &metrics, stops).await {
            End::Outcome(outcome) => {
                self.observe(&delivery.record, outcome, &metrics);
                Ack::Accept
            }
            End::Abandoned => {
                self.observe(&delivery.record, RecordOutcome::Abandoned, &metrics);
                Ack::Release
            }
        };
        if let Err(e) = source.settle(&delivery.token, ack) {
            warn!(coordinates = %delivery.record.coordinates(), error = %error_chain(&*e), ?ack, "settling the record failed; its lock runs out and the broker delivers it again");
        }
        state.store(SETTLED, Ordering::Release);
    }

    async fn flush<S: ShareSource>(&self, source: &S) {
        source.flush().await;
    }

    fn observe(&self, record: &RawRecord, outcome: RecordOutcome, metrics: &RecordMetrics<'_>) {
        match outcome {
            RecordOutcome::Handled => metrics.handled(),
            RecordOutcome::Duplicate => metrics.duplicate(),
            RecordOutcome::DeadLettered(reason) => metrics.dead_lettered(reason),
            _ => metrics.abandoned(),
        }
        match outcome {
            RecordOutcome::Handled => &self.counts.handled,
            RecordOutcome::Duplicate => &self.counts.duplicates,
            RecordOutcome::DeadLettered(_) => &self.counts.dead_lettered,
            _ => &self.counts.abandoned,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer
            && let Err(panic) = guarded(|| observer(record, outcome))
        {
            metrics.panicked();
            warn!(coordinates = %record.coordinates(), panic, "the outcome observer panicked");
        }
    }

    /// One record: decode, claim, attempts, dead letter. Never panics on the record's input
    /// or a plug-in's panic (delivery rule 14 in the crate docs).
    async fn record_life<T>(
        &self,
        delivery: &Delivery<T>,
        metrics: &RecordMetrics<'_>,
        stops: &Stops,
    ) -> End {
        let record = &delivery.record;
        if let Some(count) = delivery.delivery_count.filter(|&c| c > 1) {
            info!(coordinates = %record.coordinates(), delivery_count = count, "record delivered again by the share group");
        }
        let event = match guarded(|| self.codec.decode(record)) {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => {
                return self
                    .dead_letter(
                        self.letter(record, DeadLetterReason::Decode, &error_chain(&e), 0, None),
                        metrics,
                        stops,
                    )
                    .await;
            }
            Err(panic) => {
                metrics.panicked();
                let error = format!("the codec panicked: {panic}");
                return self
                    .dead_letter(
                        self.letter(record, DeadLetterReason::Decode, &error, 0, None),
                        metrics,
                        stops,
                    )
                    .await;
            }
        };
        let mut message = Message::new(Arc::clone(record), 1, event);
        message.set_delivery_count(delivery.delivery_count);

        let claim = match self.claim(&message, record, metrics, stops).await {
            Ok(claim) => claim,
            Err(end) => return end,
        };
        message.set_claim_token(claim.as_ref().map(|(_, token)| token.clone()));

        let end = {
            let attempts = self.attempts(&mut message, record, metrics, stops);
            tokio::pin!(attempts);
            tokio::select! {
                biased;
                end = &mut attempts => end,
                () = self.renew_claim(claim.as_ref(), record, metrics) => attempts.await,
            }
        };
        if let (Some(d), Some((key, token))) = (&self.dedup, &claim) {
            // Done after a success or an acknowledged dead letter (delivery rules 7 and 18 in
            // the crate docs); released when given up, so the next delivery runs.
            let (result, operation) = match &end {
                End::Outcome(_) => (
                    d.store.complete(key, token, d.ttl).await,
                    StoreOperation::Complete,
                ),
                End::Abandoned => (d.store.release(key, token).await, StoreOperation::Release),
            };
            if let Err(e) = result {
                metrics.store_error(operation);
                warn!(coordinates = %record.coordinates(), key, error = %error_chain(&e), "idempotency store call failed after the record's outcome");
            }
        }
        end
    }

    /// Keeps the record's claim alive while its work runs: renewed every third of the lease
    /// (delivery rule 15 in the crate docs). Returns only when renewal is over (the store
    /// cannot renew, or no claim); a failed renewal is logged and tried again next period.
    async fn renew_claim(
        &self,
        claim: Option<&(String, ClaimToken)>,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
    ) {
        let (Some(d), Some((key, token))) = (&self.dedup, claim) else {
            return;
        };
        let period = (d.lease / 3).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(period).await;
            match guarded_async(d.store.renew(key, token, d.lease)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_unsupported() => return,
                Ok(Err(e)) => {
                    metrics.store_error(StoreOperation::Renew);
                    warn!(coordinates = %record.coordinates(), key, error = %error_chain(&e), "renewing the record's claim failed");
                }
                Err(panic) => {
                    metrics.store_error(StoreOperation::Renew);
                    warn!(coordinates = %record.coordinates(), key, panic, "the idempotency store panicked renewing a claim");
                }
            }
        }
    }

    /// Claims the record's dedup key: `Ok(None)` without one, `Err` when the record ends
    /// here (a duplicate, or given up while the key was busy).
    async fn claim(
        &self,
        message: &Message<H::Event>,
        record: &Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        stops: &Stops,
    ) -> Result<Option<(String, ClaimToken)>, End> {
        let Some(d) = &self.dedup else {
            return Ok(None);
        };
        let keys = match guarded(|| d.keys_of(message)) {
            Ok(Some(keys)) => keys,
            Ok(None) => return Ok(None),
            Err(panic) => {
                metrics.panicked();
                let error = format!("the dedup-key function panicked: {panic}");
                return Err(self
                    .dead_letter(
                        self.letter(record, DeadLetterReason::Panic, &error, 0, None),
                        metrics,
                        stops,
                    )
                    .await);
            }
        };
        let mut waits = 0u32;
        loop {
            let answer = guarded_async(d.store.claim(&keys.delivery, d.lease)).await;
            match answer {
                Ok(Ok(Claim::Acquired(token))) => return Ok(Some((keys.delivery, token))),
                Ok(Ok(Claim::Done)) => {
                    debug!(coordinates = %message.raw().coordinates(), key = keys.delivery, "already done: accepted without running");
                    return Err(End::Outcome(RecordOutcome::Duplicate));
                }
                Ok(Ok(_busy)) => {
                    debug!(coordinates = %message.raw().coordinates(), key = keys.delivery, "key busy elsewhere; waiting");
                }
                Ok(Err(e)) if d.run_without_store_on_outage => {
                    metrics.store_error(StoreOperation::Claim);
                    warn!(coordinates = %message.raw().coordinates(), error = %error_chain(&e), "idempotency store unavailable; running without dedup (opted in)");
                    return Ok(None);
                }
                Ok(Err(e)) => {
                    metrics.store_error(StoreOperation::Claim);
                    warn!(coordinates = %message.raw().coordinates(), error = %error_chain(&e), "idempotency store unavailable; the record waits (its lock renewed)");
                }
                Err(panic) => {
                    metrics.store_error(StoreOperation::Claim);
                    warn!(coordinates = %message.raw().coordinates(), panic, "the idempotency store panicked; the record waits")
                }
            }
            if !infra_wait(waits, &stops.stop).await {
                return Err(End::Abandoned);
            }
            waits = waits.saturating_add(1);
        }
    }

    /// The attempts of one delivery, retried in place while the record stays locked.
    async fn attempts(
        &self,
        message: &mut Message<H::Event>,
        record: &Arc<RawRecord>,
        metrics: &RecordMetrics<'_>,
        stops: &Stops,
    ) -> End {
        let started = tokio::time::Instant::now();
        let mut attempt = 1u32;
        let mut first_failure: Option<SystemTime> = None;
        // The breaker's waits end at the stop (nothing of the record runs) or the hard stop.
        let stop = Stop {
            abandon: Signal::watching(stops.hard.clone()),
            drain: Signal::watching(stops.stop.clone()),
            ..Stop::default()
        };
        let caller = caller_of((record.topic.as_ref(), record.partition, record.offset));
        let mut memo = ProbeMemo::default();
        let mut holds = 0u32;
        loop {
            message.set_attempt(attempt);
            // While the breaker is open the record waits here, locked (the batch renews its
            // lock), using no attempt (delivery rule 16 in the crate docs).
            let Some(pass) = self.gate.admit_as(&stop, memo, caller, false).await else {
                return End::Abandoned;
            };
            let attempt_started = tokio::time::Instant::now();
            let result = tokio::select! {
                biased;
                () = stops.hard.cancelled() => return End::Abandoned,
                result = guarded_async(self.handler.handle(message)) => result,
            };
            metrics.handler_duration(attempt_started.elapsed());
            let error = match result {
                Ok(Ok(())) => {
                    pass.succeeded();
                    return End::Outcome(RecordOutcome::Handled);
                }
                Ok(Err(e)) => e,
                Err(panic) => {
                    metrics.panicked();
                    HandlerError::panic(panic)
                }
            };
            if let Verdict::Hold(wait) = pass.failed(&error, holds, &mut memo) {
                // Not the record's fault (an open breaker, or an unavailable downstream):
                // held and tried again without using an attempt.
                holds = holds.saturating_add(1);
                debug!(coordinates = %record.coordinates(), ?wait, error = %error.message(), "downstream unavailable; the record is held");
                if !wait_or_stop(wait, &stops.stop).await {
                    return End::Abandoned;
                }
                continue;
            }
            let now = SystemTime::now();
            let first = *first_failure.get_or_insert(now);
            let coordinates = message.raw().coordinates();
            let reason = match error.kind() {
                FailureKind::Permanent | FailureKind::DestinationGone => {
                    DeadLetterReason::Permanent
                }
                kind => {
                    match self
                        .retry
                        .decide(attempt, started.elapsed(), error.retry_after_hint())
                    {
                        RetryDecision::RetryAfter(delay) => {
                            debug!(coordinates, attempt, ?delay, error = %error.message(), "transient failure; retrying in place");
                            metrics.retried(attempt);
                            if !wait_or_stop(delay, &stops.stop).await {
                                return End::Abandoned;
                            }
                            attempt = attempt.saturating_add(1);
                            continue;
                        }
                        _ if kind == FailureKind::Panic => DeadLetterReason::Panic,
                        _ => DeadLetterReason::RetriesExhausted,
                    }
                }
            };
            return self
                .dead_letter(
                    self.letter(
                        record,
                        reason,
                        &error.message(),
                        attempt,
                        Some((first, now)),
                    ),
                    metrics,
                    stops,
                )
                .await;
        }
    }

    /// kourier's own dead letter for `record` (the same letter as the consumer-group
    /// engine's).
    fn letter(
        &self,
        record: &Arc<RawRecord>,
        reason: DeadLetterReason,
        error: &str,
        attempts: u32,
        failures: Option<(SystemTime, SystemTime)>,
    ) -> DeadLetter {
        let mut letter = DeadLetter::new(
            Arc::clone(record),
            reason,
            crate::dead_letter::truncate_utf8(error, MAX_ERROR_MESSAGE_BYTES),
        );
        letter.attempts = attempts;
        if let Some((first, last)) = failures {
            letter.first_failure = first;
            letter.last_failure = last;
        }
        letter.group_id.clone_from(&self.group);
        letter
    }

    /// Writes `letter`, retried until the sink acknowledges it (delivery rule 6 in the crate
    /// docs).
    async fn dead_letter(
        &self,
        letter: DeadLetter,
        metrics: &RecordMetrics<'_>,
        stops: &Stops,
    ) -> End {
        let (record, reason) = (&letter.record, letter.reason);
        let mut failures = 0u32;
        loop {
            let sent = guarded_async(async { self.sink.enqueue(&letter).await.await }).await;
            match sent {
                Ok(Ok(receipt)) => {
                    debug!(coordinates = %record.coordinates(), dlt = %receipt.topic, "dead-lettered");
                    return End::Outcome(RecordOutcome::DeadLettered(reason));
                }
                Ok(Err(e)) => {
                    metrics.dead_letter_write_failed();
                    warn!(coordinates = %record.coordinates(), error = %error_chain(&e), failures, "dead-letter write failed; retrying (the record stays locked)")
                }
                Err(panic) => {
                    metrics.dead_letter_write_failed();
                    warn!(coordinates = %record.coordinates(), panic, "the dead-letter sink panicked; retrying")
                }
            }
            if !infra_wait(failures, &stops.stop).await {
                return End::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
    }
}

/// Sleeps `delay`; `false` when `stop` came first.
async fn wait_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        () = stop.cancelled() => false,
        () = tokio::time::sleep_until(clock::deadline_in(delay)) => true,
    }
}

/// The wait before the next try of a failing store or sink: 0.5 s doubling to 5 s.
async fn infra_wait(failures: u32, stop: &CancellationToken) -> bool {
    let delay = INFRA_WAIT
        .saturating_mul(1u32 << failures.min(4))
        .min(INFRA_WAIT_MAX);
    wait_or_stop(delay, stop).await
}
