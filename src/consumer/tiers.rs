//! The worker's side of retry tiers: the due-time wait and the ledger's admission before a
//! record runs, the forward when it gives up, the ledger's release when it ends.

use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::scheduler::Stop;
use super::worker::{
    Failure, Outcome, Slot, WorkerContext, back_off, infra_delay, sleep_or_cancel,
};
use crate::dead_letter::DeadLetterReason;
use crate::error::{StoreError, error_chain};
use crate::guard::guarded_async;
use crate::handler::Handler;
use crate::metrics::RecordMetrics;
use crate::record::RawRecord;
use crate::tiers::headers::History;
use crate::tiers::runtime::{Located, Tiers};
use crate::tiers::{Admission, LedgerKey, SourceId};

/// A record the ledger holds: released when it ends.
pub(crate) struct Tracked {
    topic: String,
    key: Vec<u8>,
    id: SourceId,
}

/// Retries a ledger step until it answers or `cancel` fires (`None`).
async fn ledger_step<T, F, Fut>(
    operation: &'static str,
    record: &RawRecord,
    cancel: &CancellationToken,
    mut step: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut failures = 0u32;
    loop {
        let error = match guarded_async(step()).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => error_chain(&e),
            Err(panic) => format!("the key-order ledger panicked: {panic}"),
        };
        warn!(coordinates = %record.coordinates(), operation, %error, failures, "key-order ledger unavailable: the record waits");
        if !sleep_or_cancel(infra_delay(failures), cancel).await {
            return None;
        }
        failures = failures.saturating_add(1);
    }
}

impl<H: Handler> WorkerContext<H> {
    /// Before the record runs: waits for its due time without its slot, then asks the
    /// ledger (with `keep_key_order`). `Err` when the record ends here (deferred, or given
    /// up at a revoke).
    pub(crate) async fn tier_prelude(
        &self,
        tiers: &Tiers,
        record: &Arc<RawRecord>,
        stop: &Stop,
        slot: &dyn Slot,
        metrics: &RecordMetrics<'_>,
    ) -> Result<Option<Tracked>, Outcome> {
        let at = tiers.locate(record);
        if let Some(reason) = at.invalid.clone() {
            // Its headers are untrusted and do not hold (delivery rule 17): dead-lettered at
            // once, as it is, neither forwarded nor waited for.
            warn!(coordinates = %record.coordinates(), error = %reason, "unreadable retry-tier record: dead-lettering it");
            let failure = Failure::at_once(DeadLetterReason::Decode, reason);
            return Err(self
                .dead_letter(record.clone(), failure, metrics, &stop.abandon, slot)
                .await);
        }
        if let Some(due) = at.due_wait() {
            // Re-checked after each wait: the timer is monotonic, the due time wall-clock
            // (and bounded on the monotonic clock too).
            loop {
                let wait = due.left();
                if wait.is_zero() {
                    break;
                }
                if !back_off(wait, slot, stop).await {
                    debug!(coordinates = %record.coordinates(), "abandoned while waiting for its due time: the partition is draining");
                    return Err(Outcome::Abandoned);
                }
            }
        }
        let (Some(ledger), Some(key)) = (&tiers.config.ledger, record.key.as_deref()) else {
            return Ok(None);
        };
        let lk = LedgerKey {
            group: &tiers.group,
            topic: &at.origin.topic,
            key,
        };
        let id = SourceId {
            partition: at.origin.partition,
            offset: at.origin.offset,
        };
        let Some(admission) = ledger_step("admit", record, &stop.abandon, || {
            ledger.admit(lk, id, at.tier)
        })
        .await
        else {
            return Err(Outcome::Abandoned);
        };
        match admission {
            Admission::Run { tracked } => Ok(tracked.then(|| Tracked {
                topic: at.origin.topic.clone(),
                key: key.to_vec(),
                id,
            })),
            Admission::Defer(target) => {
                let target = target.clamp(1, tiers.count());
                debug!(coordinates = %record.coordinates(), tier = target, "deferred behind an earlier record of its key");
                let history = at.history.clone();
                Err(self
                    .tier_forward(
                        tiers,
                        record,
                        &at,
                        target,
                        history.as_ref(),
                        true,
                        metrics,
                        &stop.abandon,
                    )
                    .await)
            }
        }
    }

    /// The record is given up: `Ok` when it went to the next tier (or was abandoned on
    /// the way), `Err` with what to dead-letter (a tier record as its source record).
    pub(crate) async fn tier_give_up(
        &self,
        tiers: &Tiers,
        record: Arc<RawRecord>,
        failure: Failure,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, (Arc<RawRecord>, Failure)> {
        let at = tiers.locate(&record);
        let transient = failure.attempts > 0
            && (failure.reason == DeadLetterReason::RetriesExhausted
                || (failure.reason == DeadLetterReason::Panic && self.retry_panics));
        let prior = at.history.as_ref();
        let history = History {
            kind: failure.reason.as_str(),
            error: failure.error.clone(),
            attempts: prior
                .map_or(0, |h| h.attempts)
                .saturating_add(failure.attempts),
            first: prior.map_or(failure.first, |h| h.first),
            last: failure.last,
            stages: prior.map_or(0, |h| h.stages).saturating_add(1),
        };
        // One stage per tier plus one, wherever the record started: a record deferred into
        // the last tier (key order) goes round it again rather than losing its retries.
        if transient && history.stages <= tiers.count() {
            let next = at.tier.saturating_add(1).min(tiers.count());
            return Ok(self
                .tier_forward(
                    tiers,
                    &record,
                    &at,
                    next,
                    Some(&history),
                    false,
                    metrics,
                    cancel,
                )
                .await);
        }
        if at.tier == 0 {
            return Err((record, failure));
        }
        let original = Arc::new(Tiers::original_view(&record, &at));
        Err((
            original,
            Failure {
                attempts: history.attempts,
                first: history.first,
                ..failure
            },
        ))
    }

    /// Forwards `record` to tier `target`: recorded in the ledger first (with
    /// `keep_key_order`), then written and acknowledged. Failed writes are retried with
    /// back-off (the partition waits, as for a dead-letter write).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn tier_forward(
        &self,
        tiers: &Tiers,
        record: &RawRecord,
        at: &Located,
        target: u32,
        history: Option<&History>,
        deferred: bool,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
    ) -> Outcome {
        if let (Some(ledger), Some(key)) = (&tiers.config.ledger, record.key.as_deref()) {
            let lk = LedgerKey {
                group: &tiers.group,
                topic: &at.origin.topic,
                key,
            };
            let id = SourceId {
                partition: at.origin.partition,
                offset: at.origin.offset,
            };
            if ledger_step("place", record, cancel, || ledger.place(lk, id, target))
                .await
                .is_none()
            {
                return Outcome::Abandoned;
            }
        }
        let mut failures = 0u32;
        loop {
            match tiers.send(record, at, target, history, deferred).await {
                Ok((topic, delivery)) => {
                    debug!(coordinates = %record.coordinates(), tier = target, %topic, partition = delivery.partition, offset = delivery.offset, deferred, "forwarded to retry tier");
                    metrics.forwarded(target);
                    return Outcome::Forwarded(target);
                }
                Err(e) => {
                    metrics.forward_failed();
                    error!(coordinates = %record.coordinates(), tier = target, error = %error_chain(&e), failures, "forward to retry tier failed; retrying, the partition waits");
                }
            }
            if !sleep_or_cancel(infra_delay(failures), cancel).await {
                return Outcome::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
    }

    /// A record the ledger holds ended: released when it is settled for good.
    pub(crate) async fn tier_settle(
        &self,
        tiers: &Tiers,
        tracked: Tracked,
        outcome: Outcome,
        stop: &Stop,
    ) -> Outcome {
        if !matches!(
            outcome,
            Outcome::Handled | Outcome::Duplicate | Outcome::DeadLettered(_)
        ) {
            return outcome;
        }
        let Some(ledger) = &tiers.config.ledger else {
            return outcome;
        };
        let lk = LedgerKey {
            group: &tiers.group,
            topic: &tracked.topic,
            key: &tracked.key,
        };
        let coordinates = RawRecord {
            topic: Arc::from(tracked.topic.as_str()),
            partition: tracked.id.partition,
            offset: tracked.id.offset,
            key: None,
            value: None,
            headers: crate::record::Headers::new(),
            timestamp: None,
            log_append_time: false,
        };
        match ledger_step("settle", &coordinates, &stop.abandon, || {
            ledger.settle(lk, tracked.id)
        })
        .await
        {
            Some(()) => outcome,
            None => Outcome::Abandoned,
        }
    }
}
