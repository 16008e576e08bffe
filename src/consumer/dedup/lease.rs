//! Leases that live as long as the work (delivery rule 15 in the crate docs): while a handler attempt runs with
//! a held claim, the worker renews the claim every third of the lease.
//!
//! [`keep_renewed`] runs next to the attempt (in the same `select!`, so it ends with it) and
//! returns only when the store says the claim is lost: the worker then drops the attempt.
//! It stops renewing, without returning, when
//! - the record's partition assignment is lost (`Stop::lost`): the partition may already
//!   belong to another member, whose worker must be able to claim the key once the lease runs
//!   out. A revoke does not stop renewal: the partition stays ours while the revoke waits for
//!   its records, and a record the revoke gives up (`Stop::abandon`) has its attempt dropped,
//!   renewal included. A dead letter or tier forward being written is the exception: its
//!   renewal ignores the loss (`WorkerContext::renewing`), since the write lands whatever
//!   the assignment and the claim must hold until it is marked settled (delivery rule 18);
//! - the store cannot renew ([`StoreError::Unsupported`] from `renew`): logged once
//!   per process; the lease runs out as it was set at the claim.
//!
//! A store error is retried at the next tick; if the lease may have run out meanwhile, that
//! is logged (the next renewal tells: `LeaseLost` or renewed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::clock::after;
use crate::guard::store_call;
use crate::idempotency::{ClaimToken, IdempotencyStore, StoreError};
use crate::metrics::{RecordMetrics, StoreOperation};
use crate::record::RawRecord;

/// A claim a worker holds for one attempt.
#[derive(Debug)]
pub(crate) struct HeldClaim {
    pub(crate) token: ClaimToken,
    /// When the claim, or its last successful renewal, was sent: the store's lease ends no
    /// earlier than this plus the lease.
    since: Instant,
}

impl HeldClaim {
    /// A claim acquired by a call sent at `sent`.
    pub(crate) fn new(token: ClaimToken, sent: Instant) -> Self {
        HeldClaim { token, since: sent }
    }

    /// Until when the claim surely holds.
    pub(crate) fn held_until(&self, lease: Duration) -> Instant {
        after(self.since, lease)
    }
}

/// Whether "this store cannot renew" was logged (once per process, at `warn`).
static UNSUPPORTED_LOGGED: AtomicBool = AtomicBool::new(false);

/// Renews `claim` on `key` every third of `lease` (see the module docs). Returns when the
/// claim is lost ([`StoreError::LeaseLost`], or its lease ran out by the local clock);
/// otherwise it runs until dropped.
pub(crate) async fn keep_renewed(
    store: &dyn IdempotencyStore,
    key: &str,
    lease: Duration,
    claim: &mut HeldClaim,
    partition_lost: &CancellationToken,
    record: &RawRecord,
    metrics: &RecordMetrics<'_>,
) {
    let period = (lease / 3).max(Duration::from_millis(1));
    let mut next = after(claim.since, period);
    loop {
        // Checked first whenever the task wakes (the worker polls this future before the
        // attempt): a claim whose lease ran out by the local clock — the process was frozen
        // (SIGSTOP, a VM pause), or renewals failed for a whole lease — may be another
        // worker's already, so the attempt is not polled again.
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(claim.held_until(lease)) => {
                warn!(coordinates = %record.coordinates(), key, "the claim's lease ran out before it was renewed (the process was paused, or the store did not answer): the attempt is cancelled");
                return;
            }
            () = partition_lost.cancelled() => {
                debug!(coordinates = %record.coordinates(), key, "partition lost: the claim is no longer renewed");
                // Not renewed any more, but the attempt still ends with the lease.
                tokio::time::sleep_until(claim.held_until(lease)).await;
                warn!(coordinates = %record.coordinates(), key, "the claim's lease ran out after the partition was lost: the attempt is cancelled");
                return;
            }
            () = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        next = after(sent, period);
        let renewed = tokio::select! {
            biased;
            () = tokio::time::sleep_until(claim.held_until(lease)) => continue,
            renewed = store_call("renew", store.renew(key, &claim.token, lease)) => renewed,
        };
        match renewed {
            Ok(()) => claim.since = sent,
            Err(StoreError::LeaseLost { .. }) => {
                warn!(coordinates = %record.coordinates(), key, "claim lost while the handler ran (its lease ran out or another worker holds the key): the attempt is cancelled");
                return;
            }
            Err(StoreError::Unsupported { .. }) => {
                if !UNSUPPORTED_LOGGED.swap(true, Ordering::Relaxed) {
                    warn!(store = ?store, "the idempotency store cannot renew claims: a handler outliving the idempotency lease may run twice (logged once)");
                }
                return std::future::pending().await;
            }
            Err(e) => {
                metrics.store_error(StoreOperation::Renew);
                if Instant::now() >= claim.held_until(lease) {
                    error!(coordinates = %record.coordinates(), key, error = %e, "could not renew the claim and its lease may have run out: another worker may run the record too; retrying");
                } else {
                    warn!(coordinates = %record.coordinates(), key, error = %e, "could not renew the claim; retrying at the next tick");
                }
            }
        }
    }
}
