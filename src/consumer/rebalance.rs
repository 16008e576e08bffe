//! Rebalances (DESIGN rule 9): what happens when partitions are assigned and revoked.

use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use tracing::{debug, info, warn};

use super::commit::commit;
use super::hub::Hub;
use super::topic_partition::{Tp, tps_display, tps_of};

/// Assign: track the partitions from their committed offsets, unpaused.
pub(crate) fn on_assign<C: ConsumerContext>(
    hub: &Hub,
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) {
    let tps = tps_of(tpl);
    info!(partitions = ?tps_display(&tps), "partitions assigned");
    hub.lock().assign(tps);
    // librdkafka keeps a partition's pause across re-assignment: start clean.
    if let Err(e) = consumer.resume(tpl) {
        debug!(error = %e, "resume after assign failed");
    }
}

/// Revoke: stop dispatching, wait (bounded) for in-flight records, commit what settled,
/// then forget the partitions (late completions are ignored). A lost assignment also stops
/// the renewal of its records' claims at once: another member may own them already.
pub(crate) fn on_revoke<C: ConsumerContext>(hub: &Hub, consumer: &BaseConsumer<C>, tps: &[Tp]) {
    {
        let mut scheduler = hub.lock();
        // Before the drain fires: a worker woken by it reads the deadline at once.
        scheduler.give_up_by(Some(tps), tokio::time::Instant::now() + hub.revoke_timeout);
        scheduler.begin_revoke(tps);
        if consumer.assignment_lost() {
            scheduler.lose(tps);
        }
    }
    let closing = hub.closing();
    if closing || !hub.wait_until(hub.revoke_timeout, |s| s.drained(tps)) {
        if !closing {
            warn!(partitions = ?tps_display(tps), timeout = ?hub.revoke_timeout, "revoke: records still running after the timeout; they will be handled again by the new owner");
        }
        hub.lock().cancel(tps);
        hub.wait_until(Duration::from_secs(1), |s| s.drained(tps));
    }
    let offsets = hub.lock().remove(tps);
    for (topic, partition) in tps {
        hub.metrics.partition_revoked(topic, *partition);
    }
    if consumer.assignment_lost() {
        warn!(partitions = ?tps_display(tps), "assignment lost: not committing");
    } else if !offsets.is_empty() && commit(consumer, &hub.metrics, &offsets, "revoke") {
        // During a shutdown: what a failed final commit left may be committed now.
        hub.committed_after_failure(&offsets);
    }
    info!(partitions = ?tps_display(tps), "partitions revoked");
}
