//! A record's claims in the idempotency store: taking one before each attempt (the claim
//! fetched ahead for it, or one batched with its lane's next records'), ending early when
//! the store says its delivery is settled, marking it done, releasing it.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::outcome::RecordOutcome;
use super::waits::{AfterCommit, InfraWait, Slot};
use super::worker::{Holding, RecordRun, WorkerContext};
use crate::consumer::dedup::{
    Answer, CLAIM_AHEAD, Dedup, HeldClaim, LaneKeys, Taken, keep_renewed,
};
use crate::consumer::stop::Stop;
use crate::guard::{guarded, store_call};
use crate::handler::Handler;
use crate::idempotency::{Claim, StoreError};
use crate::message::Message;
use crate::metrics::{RecordMetrics, StoreOperation};
use crate::record::RawRecord;

pub(super) enum ClaimOutcome {
    Run(Option<HeldClaim>),
    Duplicate,
    Cancelled,
}

impl<H: Handler> WorkerContext<H> {
    /// Claims the record's delivery key for its next attempt; `Some` when the record ends
    /// here instead (a duplicate, or given up while waiting).
    pub(super) async fn claim_for_attempt(
        &self,
        holding: &mut Holding,
        r: &RecordRun<'_>,
        first: bool,
    ) -> Option<RecordOutcome> {
        let (record, metrics, stop, slot) = (r.record, r.metrics, r.stop, r.slot);
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
                Some(RecordOutcome::Duplicate)
            }
            ClaimOutcome::Cancelled => Some(RecordOutcome::Abandoned),
        }
    }

    /// The record ends before an attempt (a duplicate, given up): a record the key-order
    /// ledger holds is removed from it when it is settled.
    pub(super) async fn end_early(
        &self,
        outcome: RecordOutcome,
        holding: Holding,
        record: &RawRecord,
        stop: &Stop,
    ) -> RecordOutcome {
        match (outcome, holding.tracked) {
            (RecordOutcome::Duplicate, Some(tracked)) => {
                if self.ledger_settle(tracked, record, stop).await {
                    RecordOutcome::Duplicate
                } else {
                    RecordOutcome::Abandoned
                }
            }
            (outcome, _) => outcome,
        }
    }

    /// Claims `key` for `record`. On its first claim the record takes the claim fetched
    /// ahead for it, if one waits; else the claims of its lane's next records are fetched
    /// in the same batch call as its own (see [`claim_ahead`]). While the key is busy or
    /// the store does not answer, the record waits without its slot, and a drain gives it
    /// up at once (nothing of it ran).
    ///
    /// [`claim_ahead`]: crate::consumer::dedup::claim_ahead
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn claim(
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
    pub(super) fn keys_ahead(&self, d: &Dedup<H::Event>, slot: &dyn Slot) -> Option<LaneKeys> {
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

    /// The lane's next records (`next`, in order) that may run ahead of their turn with a
    /// store: the prefix whose claims were fetched ahead and are held for them, lent to the
    /// batch (see [`claim_ahead`](crate::consumer::dedup::claim_ahead)'s module docs): each
    /// message carries its claim's token and keeps the claim in use (renewed, never swept)
    /// while it lives. A record without a dedup key, or whose key is done, busy or not claimed
    /// yet, ends the prefix: it runs at its turn. No claim is fetched here: the claims of the
    /// lane's next records are fetched with the claim of the record whose turn it is, when it
    /// claims without one fetched for it.
    pub(super) fn lent_claims(
        &self,
        d: &Dedup<H::Event>,
        lane_stop: &Stop,
        next: Vec<Message<H::Event>>,
    ) -> Vec<Message<H::Event>> {
        // The keys first: the key function does not run under the claims' lock.
        let keyed: Vec<_> = next
            .iter()
            .map_while(|m| {
                let keys = guarded(|| d.keys_of(m)).ok().flatten()?;
                Some((m.raw_shared(), keys.delivery))
            })
            .collect();
        let Some((lent, tokens)) = d.ahead.lend(keyed, &lane_stop.lost) else {
            return Vec::new();
        };
        let held: Arc<dyn std::any::Any + Send + Sync> = lent;
        next.into_iter()
            .zip(tokens)
            .map(|(mut message, token)| {
                message.set_claim_token(Some(token));
                message.hold_while_alive(held.clone());
                message
            })
            .collect()
    }

    /// Marks the record's delivery key done (when it holds a claim), the lane freed first
    /// so that its next record starts meanwhile; `false` when cut short (the record is then
    /// given up unsettled). With `in_transaction` (its outcome commits in a transaction, after
    /// its job's end) the claim is handed to the slot instead, to be marked done once that
    /// transaction committed ([`complete_after_commit`](Self::complete_after_commit)).
    pub(super) async fn mark_done(
        &self,
        holding: Holding,
        in_transaction: bool,
        record: &RawRecord,
        metrics: &RecordMetrics<'_>,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> bool {
        let (Some(d), Some(keys), Some(claim)) = (&self.dedup, holding.keys, holding.claim) else {
            return true;
        };
        if in_transaction && let Some(t) = &self.transactions {
            slot.complete_after_commit(AfterCommit {
                key: keys.delivery,
                claim,
                kept: t.keep_claim(),
            });
            return true;
        }
        slot.release();
        self.complete(d, &keys.delivery, &claim, record, metrics, &stop.abandon)
            .await
    }

    /// A claim kept past its record's job (see [`AfterCommit`]), renewed meanwhile: marked
    /// done once transaction number `finished_in` (where the record finished) committed;
    /// released when the record did not finish in a transaction (given up, or finished after
    /// its partition was revoked: its outputs were dropped) or the transactions stopped first
    /// (its outputs were aborted with its offset), so that its redelivery runs it again
    /// without waiting for the lease.
    pub(crate) async fn complete_after_commit(
        &self,
        kept: AfterCommit,
        record: &RawRecord,
        finished_in: Option<u64>,
    ) {
        let (Some(d), Some(t)) = (&self.dedup, &self.transactions) else {
            return;
        };
        let AfterCommit {
            key,
            mut claim,
            kept: _counted,
        } = kept;
        let metrics = self.metrics.record(&record.topic);
        let committed = match finished_in {
            None => false,
            Some(transaction) => {
                // Renewed whatever happens to the assignment: the wait ends with the next
                // commit (a revoke commits first), or when the transactions stop.
                let renewed_until_lost = CancellationToken::new();
                let renewal = keep_renewed(
                    &*d.store,
                    &key,
                    d.lease,
                    &mut claim,
                    &renewed_until_lost,
                    record,
                    &metrics,
                );
                let committed = tokio::select! {
                    committed = t.committed(transaction) => Some(committed),
                    () = renewal => None,
                };
                match committed {
                    Some(committed) => committed,
                    // The claim was lost: marking it done is refused (lease lost) once it commits.
                    None => t.committed(transaction).await,
                }
            }
        };
        if committed {
            self.complete(d, &key, &claim, record, &metrics, &CancellationToken::new())
                .await;
            return;
        }
        debug!(coordinates = %record.coordinates(), key, "its transaction did not commit: the claim is released, the record runs again when delivered again");
        if let Err(e) = store_call("release", d.store.release(&key, &claim.token)).await
            && !e.is_lease_lost()
        {
            metrics.store_error(StoreOperation::Release);
            warn!(coordinates = %record.coordinates(), error = %e, "could not release claim; its redelivery waits for the lease to expire");
        }
    }

    pub(super) async fn complete(
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
    pub(super) async fn release(
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
}
