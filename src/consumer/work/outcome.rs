//! [`RecordOutcome`]: what became of a record, as the builder's
//! [`on_outcome`](crate::RetryingConsumerBuilder::on_outcome) observer is told.

use std::fmt;
use std::sync::Arc;

use crate::dead_letter::DeadLetterReason;
use crate::record::RawRecord;

/// How one record's processing ended, as reported to an outcome observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordOutcome {
    /// The handler succeeded (and the key was marked done, with idempotency on; with
    /// transactional output too, it is marked done once the record's transaction commits,
    /// after this is reported).
    Handled,
    /// Skipped: the idempotency store says the record's key is done.
    Duplicate,
    /// Written to the dead-letter sink (acknowledged), for this reason.
    DeadLettered(DeadLetterReason),
    /// Forwarded to this retry tier (1-based; acknowledged by the broker, or, with
    /// transactional output, staged for the transaction that commits the record's offset):
    /// it runs again there. See [`tiers`](crate::tiers).
    Forwarded(u32),
    /// Given up unsettled at a revoke or shutdown: not committed, delivered again later.
    Abandoned,
    /// A retry-tier record that was still waiting for its due time when its partition was
    /// revoked or the consumer stopped: nothing of it ran; not committed, it runs after the
    /// next assignment, once due ([`ShutdownReport::left_for_later`](crate::ShutdownReport::left_for_later)).
    LeftForLater,
}

impl RecordOutcome {
    /// The name used in logs, spans and metrics: `handled`, `duplicate`, `dead-lettered`,
    /// `forwarded`, `abandoned`, `left-for-later`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Handled => "handled",
            RecordOutcome::Duplicate => "duplicate",
            RecordOutcome::DeadLettered(_) => "dead-lettered",
            RecordOutcome::Forwarded(_) => "forwarded",
            RecordOutcome::Abandoned => "abandoned",
            RecordOutcome::LeftForLater => "left-for-later",
        }
    }
}

impl fmt::Display for RecordOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordOutcome::DeadLettered(reason) => write!(f, "dead-lettered ({reason})"),
            RecordOutcome::Forwarded(tier) => write!(f, "forwarded (tier {tier})"),
            other => f.write_str(other.as_str()),
        }
    }
}

pub(crate) type OutcomeObserver = Arc<dyn Fn(&RawRecord, RecordOutcome) + Send + Sync>;
