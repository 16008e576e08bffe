//! How a record that is given up ends: dead-lettered, or forwarded to the next retry tier,
//! with its claim kept alive while the letter or forward is written and its delivery marked
//! settled once the broker acknowledged it (delivery rule 18).

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::outcome::RecordOutcome;
use super::waits::{InfraWait, Slot};
use super::worker::{Failure, Holding, WorkerContext};
use crate::consumer::dedup::keep_renewed;
use crate::consumer::stop::Stop;
use crate::dead_letter::letter::sealed::Token;
use crate::dead_letter::{DeadLetter, DeadLetterError};
use crate::error::error_chain;
use crate::guard::guarded_async;
use crate::handler::Handler;
use crate::metrics::RecordMetrics;
use crate::record::RawRecord;
use crate::tiers::runtime::Located;

impl<H: Handler> WorkerContext<H> {
    /// The record is given up: dead-lettered, or forwarded to the next retry tier. Its
    /// claim (if any) is kept alive meanwhile and its delivery marked settled once the
    /// letter or forward is acknowledged, so that a redelivery of it is skipped (at most
    /// one dead letter per event, as far as the store can tell: delivery rule 18).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn give_up(
        &self,
        record: Arc<RawRecord>,
        at: Option<&Located>,
        failure: Failure,
        mut holding: Holding,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> RecordOutcome {
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
            self.dead_letter(
                record,
                &coordinates,
                failure,
                metrics,
                cancel,
                slot,
                pipelined,
            )
            .await
        };
        let outcome = self
            .renewing(write, &mut holding, &coordinates, metrics)
            .await;
        match outcome {
            RecordOutcome::DeadLettered(_) => {
                if let Some(tracked) = holding.tracked.take()
                    && !self.ledger_settle(tracked, &coordinates, stop).await
                {
                    return RecordOutcome::Abandoned;
                }
            }
            RecordOutcome::Forwarded(_) => {}
            other => {
                self.abandon_claim(&mut holding);
                return other;
            }
        }
        slot.release();
        self.mark_settled(holding, outcome, &coordinates, metrics, stop, slot)
            .await
    }

    /// Marks the delivery's key done after its dead letter or forward was acknowledged
    /// (best effort within the lease, like a completion); with transactional output, once
    /// the transaction carrying the letter or forward committed, when it did
    /// ([`mark_done`](Self::mark_done)).
    pub(crate) async fn mark_settled(
        &self,
        holding: Holding,
        outcome: RecordOutcome,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> RecordOutcome {
        if self
            .mark_done(
                holding,
                self.in_transaction(outcome),
                record,
                metrics,
                stop,
                slot,
            )
            .await
        {
            outcome
        } else {
            RecordOutcome::Abandoned
        }
    }

    /// Whether `outcome` is written in the transaction that commits the record's offset: a
    /// forward with transactional output, and a dead letter when the Kafka sink's letters
    /// join it (a custom sink's letter is acknowledged already: its key is marked done at
    /// once, as without transactions).
    fn in_transaction(&self, outcome: RecordOutcome) -> bool {
        self.transactions.is_some()
            && match outcome {
                RecordOutcome::Forwarded(_) => true,
                RecordOutcome::DeadLettered(_) => self.sink.kafka_sink(Token(())).is_some(),
                _ => false,
            }
    }

    /// Runs `work` (writing a dead letter or a forward) with the record's claim renewed
    /// meanwhile; a claim found lost is dropped from `holding` (not marked done after).
    ///
    /// Renewal goes on when the partition's assignment is lost meanwhile (unlike during a
    /// handler attempt, which is cancelled at its lease's end): once queued, the letter or
    /// forward is written whatever happens to the assignment, so the claim is kept until it
    /// is marked settled and the partition's next owner, replaying the record, skips it
    /// rather than taking the key at the lease's end and writing a second letter (delivery
    /// rule 18). The wait is bounded by the write: the producer's delivery timeout, and the
    /// revoke timeout ends its retries.
    pub(crate) async fn renewing<F: Future<Output = RecordOutcome>>(
        &self,
        work: F,
        holding: &mut Holding,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
    ) -> RecordOutcome {
        let (Some(d), Some(keys), Some(claim)) = (&self.dedup, &holding.keys, &mut holding.claim)
        else {
            return work.await;
        };
        tokio::pin!(work);
        let assignment_kept = CancellationToken::new();
        let renewal = keep_renewed(
            &*d.store,
            &keys.delivery,
            d.lease,
            claim,
            &assignment_kept,
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

    /// Writes the dead letter of `record` (the job's record `job`, or the source record a
    /// tier record stands for); `pipelined`: the lane's next record may start once the letter
    /// is queued (else the lane is freed by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn dead_letter(
        &self,
        record: Arc<RawRecord>,
        job: &RawRecord,
        failure: Failure,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
        slot: &dyn Slot,
        pipelined: bool,
    ) -> RecordOutcome {
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
        if let Some(t) = &self.transactions
            && let Some(sink) = self.sink.kafka_sink(Token(()))
        {
            // Transactional output with the Kafka sink: the letter, rendered by the sink as it
            // would write it, is produced in the transaction that commits the record's offset,
            // when the record finishes (delivery rule 20), not by the sink's own producer. Only
            // choosing its partition can fail (the dead-letter topic's metadata). Staged under
            // the job's record: a tier record's letter is of the source record it stands for.
            return self
                .until_written(&letter, metrics, cancel, &release, || async {
                    let records = sink.render(&letter).await?;
                    t.stage_letter(job, records);
                    Ok(format!(
                        "{} (in the transaction)",
                        sink.topic_for(&letter.record.topic)
                    ))
                })
                .await;
        }
        // Pipelined: once the letter is queued, the lane's next record starts while it is
        // written (and retried, never dropped); the offset waits for the acknowledgement.
        self.until_written(&letter, metrics, cancel, &release, || async {
            let pending = self.sink.enqueue(&letter).await;
            release();
            let receipt = pending.await?;
            Ok(format!(
                "{} partition {:?} offset {:?}",
                receipt.topic, receipt.partition, receipt.offset
            ))
        })
        .await
    }

    /// Runs `write` (it answers where the letter went) until it succeeds or the record is
    /// given up, waiting longer after each failure; a panic in it is a failed write. The
    /// lane is released after each try, also when the sink panicked before it queued.
    async fn until_written<W, F>(
        &self,
        letter: &DeadLetter,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
        release: &(dyn Fn() + Sync),
        mut write: W,
    ) -> RecordOutcome
    where
        W: FnMut() -> F,
        F: Future<Output = Result<String, DeadLetterError>>,
    {
        let mut failures = 0u32;
        loop {
            let written = guarded_async(write()).await.unwrap_or_else(|panic| {
                Err(DeadLetterError {
                    coordinates: letter.record.coordinates(),
                    destination: "the dead-letter sink".into(),
                    source: format!("the sink panicked: {panic}").into(),
                })
            });
            release();
            match written {
                Ok(to) => {
                    debug!(coordinates = %letter.record.coordinates(), %to, "dead-lettered");
                    metrics.dead_lettered(letter.reason);
                    return RecordOutcome::DeadLettered(letter.reason);
                }
                Err(e) => {
                    metrics.dead_letter_write_failed();
                    error!(coordinates = %letter.record.coordinates(), error = %error_chain(&e), failures, "dead-letter write failed; retrying, the partition waits");
                }
            }
            if !InfraWait::UntilAbandoned(cancel).wait(failures).await {
                return RecordOutcome::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
    }
}
