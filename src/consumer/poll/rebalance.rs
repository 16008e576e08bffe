//! Rebalances (delivery rule 9 in the crate docs): what happens when partitions are assigned and revoked.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::commit::commit;
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::{Tp, tps_display, tps_of};

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
    drain(hub, tps, consumer.assignment_lost(), !hub.closing());
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

/// Stops dispatching `tps` and waits (at most the revoke timeout, then cancels and waits a
/// second more) for their in-flight records; `lost`: their assignment is gone already (claim
/// renewal stops at once); `wait`: false while closing (nothing more is waited for).
fn drain(hub: &Hub, tps: &[Tp], lost: bool, wait: bool) {
    {
        let mut scheduler = hub.lock();
        // Before the drain fires: a worker woken by it reads the deadline at once.
        scheduler.give_up_by(Some(tps), crate::clock::deadline_in(hub.revoke_timeout));
        scheduler.begin_revoke(tps);
        if lost {
            scheduler.lose(tps);
        }
    }
    if !wait || !hub.wait_until(hub.revoke_timeout, |s| s.drained(tps)) {
        if wait {
            warn!(partitions = ?tps_display(tps), timeout = ?hub.revoke_timeout, "revoke: records still running after the timeout; they will be handled again");
        }
        hub.lock().cancel(tps);
        hub.wait_until(Duration::from_secs(1), |s| s.drained(tps));
    }
}

/// A record of `tps` was given up outside a revoke or a shutdown (a panic escaped its
/// worker): its lane would stay blocked and the commit point stuck for the rest of the
/// assignment. Instead, each partition is drained like a revoke (bounded by the revoke
/// timeout), its settled offsets are committed, and it is tracked again from its commit
/// point: the consumer seeks back there, so the given-up record and every unsettled one
/// after it are delivered again, in order (delivery rule 14).
pub(crate) fn reset<C: ConsumerContext>(hub: &Hub, consumer: &BaseConsumer<C>, tps: &[Tp]) {
    let tps: Vec<Tp> = {
        let s = hub.lock();
        let assigned = s.assigned();
        tps.iter()
            .filter(|tp| assigned.contains(tp))
            .cloned()
            .collect()
    };
    if tps.is_empty() {
        return;
    }
    warn!(partitions = ?tps_display(&tps), "a record was given up outside a revoke or shutdown (its worker panicked): resetting its partition to the commit point; the records after it are delivered again");
    drain(hub, &tps, false, true);
    let (offsets, restart) = {
        let mut s = hub.lock();
        let restart = s.restart_points(&tps);
        (s.remove(&tps), restart)
    };
    if !offsets.is_empty() {
        commit(consumer, &hub.metrics, &offsets, "reset");
    }
    hub.lock().assign(tps.iter().cloned());
    // The new assignment starts unpaused: so must librdkafka's (flow control may have paused it).
    let mut tpl = TopicPartitionList::with_capacity(tps.len());
    for (topic, partition) in &tps {
        tpl.add_partition(topic, *partition);
    }
    if let Err(e) = consumer.resume(&tpl) {
        debug!(error = %e, "resume after reset failed");
    }
    for ((topic, partition), offset) in restart {
        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT) {
            // The partition keeps fetching where it was: records between the commit point
            // and there come back only after a rebalance or restart.
            error!(partition = %format_args!("{topic}/{partition}"), offset, error = %e, "reset: seek to the commit point failed");
        } else {
            info!(partition = %format_args!("{topic}/{partition}"), offset, "reset: reading again from the commit point");
        }
    }
}

/// How long a reset's seek may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
