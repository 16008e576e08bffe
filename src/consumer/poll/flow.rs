//! Flow control (delivery rule 10 in the crate docs): applying the scheduler's pause and resume decisions.

use tracing::{debug, warn};

use super::client::PollConsumer;

use crate::consumer::schedule::FlowChanges;
use crate::consumer::schedule::{tpl_of, tps_display};
use crate::metrics::ConsumerMetrics;

/// Pauses and resumes partitions as the scheduler decided, and updates the paused gauge.
pub(crate) fn apply_flow(
    consumer: &impl PollConsumer,
    metrics: &ConsumerMetrics,
    changes: &FlowChanges,
) {
    for ((topic, partition), paused) in changes
        .pause
        .iter()
        .map(|tp| (tp, true))
        .chain(changes.resume.iter().map(|tp| (tp, false)))
    {
        metrics.partition_paused(topic, *partition, paused);
    }
    if !changes.pause.is_empty() {
        debug!(partitions = ?tps_display(&changes.pause), "pausing: buffer full");
        if let Err(e) = consumer.pause(&tpl_of(&changes.pause)) {
            warn!(error = %e, "pause failed");
        }
    }
    if !changes.resume.is_empty() {
        debug!(partitions = ?tps_display(&changes.resume), "resuming");
        if let Err(e) = consumer.resume(&tpl_of(&changes.resume)) {
            warn!(error = %e, "resume failed");
        }
    }
}
