//! [`Stop`]: how a record's processing is told to stop early (shared by the scheduler, which
//! fires it, and the worker, the breaker and the lease renewal, which wait on it).

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// The ways a record's processing is told to stop early.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    /// Give the record up wherever it is (revoke or shutdown deadline passed): it is left
    /// unsettled and delivered again.
    pub(crate) abandon: CancellationToken,
    /// Its partition is being revoked or the consumer is stopping: a record that is only
    /// waiting out a retry back-off is given up at once (nothing of its is running) unless
    /// its back-off ends before [`Stop::deadline`].
    pub(crate) drain: CancellationToken,
    /// When a drain began: when `abandon` will fire (the revoke timeout or the shutdown
    /// deadline).
    pub(crate) give_up_by: Arc<OnceLock<tokio::time::Instant>>,
    /// Its partition's assignment was lost (it may already belong to another member): the
    /// record's claim is no longer renewed during a handler attempt, so the new owner can
    /// take the key once the lease runs out (a dead letter or forward being written keeps
    /// renewing until it is marked settled). Fired with `drain`, before the revoke waits.
    pub(crate) lost: CancellationToken,
}

impl Stop {
    /// When `abandon` fires, once a drain began (see [`Stop::give_up_by`]).
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.give_up_by.get().copied()
    }
}
