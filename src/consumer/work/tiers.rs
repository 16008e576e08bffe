//! The worker's side of retry tiers: the due-time wait before a tier record runs, the
//! ledger's admission (with `with_key_order`), the forward when a record gives up or is
//! deferred, and the ledger's release when a record it holds is settled.

use std::sync::Arc;

use tracing::{debug, error, warn};

use super::outcome::RecordOutcome;
use super::waits::{AtDrain, InfraWait, Slot, back_off};
use super::worker::{Admit, Failure, Holding, Tracked, WorkerContext};
use crate::consumer::schedule::Stop;
use crate::dead_letter::DeadLetterReason;
use crate::error::{StoreError, error_chain};
use crate::guard::guarded_async;
use crate::handler::Handler;
use crate::metrics::RecordMetrics;
use crate::record::RawRecord;
use crate::tiers::headers::History;
use crate::tiers::runtime::{Located, Tiers};
use crate::tiers::{Admission, LedgerKey, SourceId};
use tokio_util::sync::CancellationToken;

/// The ledger's key and entry of a record of `key` standing at `at`: its source topic and
/// source position, whatever tier it is in.
fn ledger_entry<'a>(tiers: &'a Tiers, at: &'a Located, key: &'a [u8]) -> (LedgerKey<'a>, SourceId) {
    let lk = LedgerKey {
        group: &tiers.group,
        topic: &at.origin.topic,
        key,
    };
    let id = SourceId {
        partition: at.origin.partition,
        offset: at.origin.offset,
    };
    (lk, id)
}

/// Retries a ledger step until it answers or `wait` gives up (`None`).
async fn ledger_step<T, F, Fut>(
    operation: &'static str,
    record: &RawRecord,
    wait: InfraWait<'_>,
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
        if !wait.wait(failures).await {
            return None;
        }
        failures = failures.saturating_add(1);
    }
}

impl<H: Handler> WorkerContext<H> {
    /// A tier record waits for its due time, without its slot; `false` when its partition
    /// drained first (it is left for later: nothing of it ran). Other records go on at once.
    pub(crate) async fn wait_until_due(
        &self,
        at: Option<&Located>,
        record: &RawRecord,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> bool {
        let Some(due) = at.and_then(Located::due_wait) else {
            return true;
        };
        // Re-checked after each wait: the timer is monotonic, the due time wall-clock (and
        // bounded on the monotonic clock too: delivery rule 17).
        loop {
            let wait = due.left();
            if wait.is_zero() {
                break;
            }
            if !back_off(wait, slot, stop, AtDrain::FinishIfBefore).await {
                debug!(coordinates = %record.coordinates(), "given up while waiting for its due time: the partition is draining");
                return false;
            }
        }
        true
    }

    /// Asks the key-order ledger whether the record may run (it holds the record's claim,
    /// if any, so a stale copy never reaches the ledger). Waits for an unavailable ledger
    /// without its slot; a drain gives it up (nothing of it ran).
    pub(crate) async fn tier_admit(
        &self,
        at: &Located,
        record: &Arc<RawRecord>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Admit {
        let Some(tiers) = &self.tiers else {
            return Admit::Run(None);
        };
        let (Some(ledger), Some(key)) = (&tiers.config.ledger, record.key.as_deref()) else {
            return Admit::Run(None);
        };
        let (lk, id) = ledger_entry(tiers, at, key);
        let wait = InfraWait::BeforeRunning(stop, slot);
        let Some(admission) =
            ledger_step("admit", record, wait, || ledger.admit(lk, id, at.tier)).await
        else {
            return Admit::GaveUp;
        };
        match admission {
            Admission::Run { tracked } => Admit::Run(tracked.then(|| Tracked {
                topic: at.origin.topic.clone(),
                key: key.to_vec(),
                id,
            })),
            Admission::Defer(target) => Admit::Defer(target.clamp(1, tiers.count())),
        }
    }

    /// Forwards a record the ledger deferred behind an earlier record of its key (not a
    /// failure: no attempt used); its delivery is marked settled once the forward is
    /// acknowledged, like a failure's forward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn tier_defer(
        &self,
        record: &Arc<RawRecord>,
        at: &Located,
        target: u32,
        holding: Holding,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> RecordOutcome {
        let Some(tiers) = &self.tiers else {
            return RecordOutcome::Abandoned;
        };
        debug!(coordinates = %record.coordinates(), tier = target, "deferred to a retry tier (no attempt used)");
        let mut holding = holding;
        let history = at.history.clone();
        let forward = self.tier_forward(
            tiers,
            record,
            at,
            target,
            history.as_ref(),
            true,
            metrics,
            &stop.abandon,
        );
        let outcome = self.renewing(forward, &mut holding, record, metrics).await;
        if !matches!(outcome, RecordOutcome::Forwarded(_)) {
            self.abandon_claim(&mut holding);
            return outcome;
        }
        slot.release();
        self.mark_settled(holding, outcome, record, metrics, stop, slot)
            .await
    }

    /// The record is given up: `Ok` when it went to the next tier (or was abandoned on
    /// the way), `Err` with what to dead-letter (a tier record as its source record).
    pub(crate) async fn tier_give_up(
        &self,
        tiers: &Tiers,
        at: &Located,
        record: Arc<RawRecord>,
        failure: Failure,
        metrics: &RecordMetrics<'_>,
        cancel: &CancellationToken,
    ) -> Result<RecordOutcome, (Arc<RawRecord>, Failure)> {
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
                    at,
                    next,
                    Some(&history),
                    false,
                    metrics,
                    cancel,
                )
                .await);
        }
        if transient {
            warn!(coordinates = %record.coordinates(), tier = at.tier, attempts = history.attempts, error = %failure.error, "giving up on record after its last retry tier, dead-lettering");
        }
        if at.tier == 0 {
            return Err((record, failure));
        }
        let original = Arc::new(Tiers::original_view(&record, at));
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
    /// `with_key_order`), then written and acknowledged, or, with transactional output,
    /// staged in the transaction. Failures are retried with back-off (the partition waits,
    /// as for a dead-letter write).
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
    ) -> RecordOutcome {
        if let (Some(ledger), Some(key)) = (&tiers.config.ledger, record.key.as_deref()) {
            let (lk, id) = ledger_entry(tiers, at, key);
            let wait = InfraWait::UntilAbandoned(cancel);
            if ledger_step("place", record, wait, || ledger.place(lk, id, target))
                .await
                .is_none()
            {
                return RecordOutcome::Abandoned;
            }
        }
        let mut failures = 0u32;
        loop {
            let written = match &self.transactions {
                // With transactional output: the forward, rendered by the tiers as they would
                // write it, is produced in the transaction that commits the record's offset,
                // when the record finishes (delivery rule 20), not by the tiers' producer.
                // `record` is the job's record (a tier record's forward is staged under it).
                // Only choosing its partition can fail (the tier topic's metadata).
                Some(t) => tiers
                    .render(record, at, target, history, deferred)
                    .await
                    .map(|forward| {
                        let to = format!(
                            "{} partition {:?} (in the transaction)",
                            forward.topic, forward.partition
                        );
                        t.stage_forward(record, forward);
                        to
                    }),
                None => {
                    tiers
                        .send(record, at, target, history, deferred)
                        .await
                        .map(|(topic, d)| {
                            format!("{topic} partition {} offset {}", d.partition, d.offset)
                        })
                }
            };
            match written {
                Ok(to) => {
                    debug!(coordinates = %record.coordinates(), tier = target, %to, deferred, "forwarded to retry tier");
                    metrics.forwarded(target);
                    return RecordOutcome::Forwarded(target);
                }
                Err(e) => {
                    metrics.forward_failed();
                    error!(coordinates = %record.coordinates(), tier = target, error = %error_chain(&e), failures, "forward to retry tier failed; retrying, the partition waits");
                }
            }
            if !InfraWait::UntilAbandoned(cancel).wait(failures).await {
                return RecordOutcome::Abandoned;
            }
            failures = failures.saturating_add(1);
        }
    }

    /// Removes a settled record from the key-order ledger, which lets its key's later
    /// records run; `false` when given up first (the revoke timeout or the shutdown
    /// deadline): the record is then not settled either.
    pub(crate) async fn ledger_settle(
        &self,
        tracked: Tracked,
        record: &RawRecord,
        stop: &Stop,
    ) -> bool {
        let Some(ledger) = self.tiers.as_ref().and_then(|t| t.config.ledger.as_ref()) else {
            return true;
        };
        let Some(tiers) = &self.tiers else {
            return true;
        };
        let lk = LedgerKey {
            group: &tiers.group,
            topic: &tracked.topic,
            key: &tracked.key,
        };
        let wait = InfraWait::UntilAbandoned(&stop.abandon);
        ledger_step("settle", record, wait, || ledger.settle(lk, tracked.id))
            .await
            .is_some()
    }
}
