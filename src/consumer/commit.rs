//! Committing settled offsets (DESIGN rule 1): synchronously, exactly the offsets the
//! scheduler's watermarks allow.

use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, warn};

use super::hub::Hub;
use super::topic_partition::Tp;
use crate::metrics::ConsumerMetrics;

/// Commits exactly these offsets (each the next offset to read) synchronously; returns
/// whether the broker accepted them.
pub(crate) fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    metrics: &ConsumerMetrics,
    offsets: &[(Tp, i64)],
    why: &str,
) -> bool {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for ((t, p), o) in offsets {
        if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
            error!(error = %e, "cannot build commit list");
            return false;
        }
    }
    let started = Instant::now();
    let result = consumer.commit(&tpl, CommitMode::Sync);
    metrics.commit(started.elapsed(), result.is_ok());
    match result {
        Ok(()) => {
            debug!(why, offsets = ?offsets.iter().map(|((t, p), o)| format!("{t}/{p}={o}")).collect::<Vec<_>>(), took = ?started.elapsed(), "committed");
            true
        }
        Err(e) if ownership_lost(&e) => {
            warn!(why, error = %e, "commit refused: partitions changed owner; their records will be redelivered");
            false
        }
        Err(e) => {
            warn!(why, error = %e, "commit failed; retrying at the next interval");
            false
        }
    }
}

/// Commits every offset that moved since the last commit, and notes what was committed.
pub(crate) fn commit_settled<C: ConsumerContext>(consumer: &BaseConsumer<C>, hub: &Hub, why: &str) {
    let offsets = hub.lock().to_commit();
    if !offsets.is_empty() && commit(consumer, &hub.metrics, &offsets, why) {
        hub.lock().committed(&offsets);
    }
}

fn ownership_lost(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::State
        )
    )
}
