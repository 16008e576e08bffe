//! Rebalances (delivery rule 9 in the crate docs): what happens when partitions are assigned and revoked.

use std::time::Duration;

use std::sync::Arc;

use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::client::PollConsumer;
use super::commit::{commit, offsets_of};
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::{Tp, decode_finished, tps_display, tps_of};

/// How long an assignment waits for the group's committed offsets and their metadata.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);

/// Assign: track the partitions from their committed offsets, unpaused, skipping the
/// records their previous owner finished above its commit point.
pub(crate) fn on_assign(hub: &Hub, consumer: &impl PollConsumer, tpl: &TopicPartitionList) {
    let tps = tps_of(tpl);
    info!(partitions = ?tps_display(&tps), "partitions assigned");
    let metadata = {
        let mut s = hub.lock();
        s.assign(tps);
        s.commit_metadata_on()
    };
    if metadata {
        read_finished(hub, consumer, tpl);
    }
    // librdkafka keeps a partition's pause across re-assignment: start clean.
    if let Err(e) = consumer.resume(tpl) {
        debug!(error = %e, "resume after assign failed");
    }
}

/// Reads the finished offsets the previous owners of `tpl` committed above their commit
/// points (see `schedule::finished`): before any record of them is polled, so each is
/// skipped when it arrives. Metadata kourier did not write, or that does not hold, is
/// ignored; so is a failure to read it (those records are handled again, as without it).
fn read_finished(hub: &Hub, consumer: &impl PollConsumer, tpl: &TopicPartitionList) {
    let committed = match consumer.committed(tpl, COMMITTED_TIMEOUT) {
        Ok(committed) => committed,
        Err(e) => {
            if let Some(suppressed) = hub.throttle.admit("assign: committed metadata") {
                warn!(error = %e, suppressed, "cannot read the committed offsets' metadata: records finished above the commit point by the previous owner are handled again");
            }
            return;
        }
    };
    for e in committed.elements() {
        let (Offset::Offset(point), metadata) = (e.offset(), e.metadata()) else {
            continue;
        };
        if metadata.is_empty() {
            continue;
        }
        let tp: Tp = (Arc::from(e.topic()), e.partition());
        match decode_finished(metadata, point) {
            Some(finished) => {
                info!(partition = %format_args!("{}/{}", tp.0, tp.1), commit_point = point, up_to = ?finished.last(), "skipping the records the previous owner finished above its commit point");
                hub.lock().set_finished(&tp, finished);
            }
            None => {
                debug!(partition = %format_args!("{}/{}", tp.0, tp.1), metadata, "committed metadata is not kourier's: ignored");
            }
        }
    }
}

/// Revoke: stop dispatching, wait (bounded) for in-flight records, commit what settled,
/// then forget the partitions (late completions are ignored). A lost assignment also stops
/// the renewal of its records' claims at once: another member may own them already.
pub(crate) fn on_revoke(hub: &Hub, consumer: &impl PollConsumer, tps: &[Tp]) {
    drain(hub, tps, consumer.assignment_lost(), !hub.closing());
    let commits = hub.lock().remove(tps);
    for (topic, partition) in tps {
        hub.metrics.partition_revoked(topic, *partition);
    }
    if consumer.assignment_lost() {
        warn!(partitions = ?tps_display(tps), "assignment lost: not committing");
        if let Some(t) = hub.transactions() {
            // Its open transaction may hold outputs of records the new owner handles again.
            t.assignment_lost();
        }
    } else if !commits.is_empty() && commit(consumer, hub, &commits, "revoke") {
        // During a shutdown: what a failed final commit left may be committed now.
        hub.committed_after_failure(&offsets_of(&commits));
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
pub(crate) fn reset(hub: &Hub, consumer: &impl PollConsumer, tps: &[Tp]) {
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
    let (commits, restart) = {
        let mut s = hub.lock();
        let restart = s.restart_points(&tps);
        (s.remove(&tps), restart)
    };
    if !commits.is_empty() {
        commit(consumer, hub, &commits, "reset");
    }
    if let Some(t) = hub.transactions() {
        // Exactly-once output cannot go back to the commit point (delivery rule 20).
        t.partition_reset();
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
        if let Err(e) = consumer.seek(&topic, partition, offset) {
            // The partition keeps fetching where it was: records between the commit point
            // and there come back only after a rebalance or restart.
            error!(partition = %format_args!("{topic}/{partition}"), offset, error = %e, "reset: seek to the commit point failed");
        } else {
            info!(partition = %format_args!("{topic}/{partition}"), offset, "reset: reading again from the commit point");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::client::fake::{
        Call, FakeConsumer, around_a_record_given_up, end_after, end_when_abandoned, hub_running,
        tp, wait_for,
    };
    use super::*;
    use crate::consumer::schedule::JobEnd;

    const MS: Duration = Duration::from_millis(1);

    /// Delivery rule 9: the revoke waits for its in-flight records up to the revoke
    /// timeout, not less; then it cancels the one still running, which is given up, and
    /// commits exactly what settled below it.
    #[test]
    fn a_revoke_waits_up_to_its_timeout_then_cancels_and_commits_what_settled() {
        let timeout = Duration::from_millis(300);
        let (hub, jobs) = hub_running(3, timeout);
        let mut running_after = None;
        let (consumer, took, cancelled_at) = around_a_record_given_up(&hub, jobs, |consumer| {
            on_revoke(&hub, consumer, &[tp()]);
            running_after = Some(hub.lock().in_flight());
        });
        assert_eq!(
            running_after,
            Some(0),
            "the revoke waited for the cancelled record to end"
        );
        assert!(
            cancelled_at >= timeout,
            "cancelled before the revoke timeout: {cancelled_at:?}"
        );
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(
            consumer.calls_but_polls(),
            [Call::Commit(vec![(tp(), 1)])],
            "offset 0 settled, 1 was given up: the next reader starts at 1"
        );
        assert!(
            hub.lock().assigned().is_empty(),
            "the partition is forgotten"
        );
    }

    /// The revoke ends as soon as its records settled (woken by them), well before its
    /// timeout, and commits all of them.
    #[test]
    fn a_revoke_ends_when_its_records_settled() {
        let timeout = Duration::from_secs(10);
        let (hub, jobs) = hub_running(3, timeout);
        let started = Instant::now();
        let workers: Vec<_> = jobs
            .into_iter()
            .zip([30, 10, 20])
            .map(|(job, ms)| end_after(&hub, job, ms * MS, JobEnd::Settled))
            .collect();
        let consumer = FakeConsumer::new();
        on_revoke(&hub, &consumer, &[tp()]);
        let took = started.elapsed();
        for w in workers {
            w.join().unwrap();
        }
        assert!(took >= 30 * MS, "waited for the last record: {took:?}");
        assert!(took < Duration::from_secs(2), "not the timeout: {took:?}");
        assert_eq!(consumer.calls_but_polls(), [Call::Commit(vec![(tp(), 3)])]);
    }

    /// A lost assignment: the records' claim renewal is told at once (before the wait), and
    /// nothing is committed (another member may own the partition already).
    #[test]
    fn a_lost_assignment_stops_renewals_at_once_and_commits_nothing() {
        let (hub, jobs) = hub_running(1, Duration::from_secs(10));
        let job = jobs.into_iter().next().unwrap();
        let started = Instant::now();
        let worker = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let at = wait_for(|| job.stop.lost.is_cancelled(), started);
                hub.finish(job, JobEnd::Settled);
                at
            })
        };
        let consumer = FakeConsumer::lost();
        on_revoke(&hub, &consumer, &[tp()]);
        let lost_at = worker.join().unwrap();
        assert!(lost_at < Duration::from_secs(2), "{lost_at:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "no timeout");
        assert_eq!(consumer.calls(), [], "a lost assignment is not committed");
        assert!(hub.lock().assigned().is_empty());
    }

    /// While the consumer closes (after the final commit), a revoke does not wait: its
    /// running record is cancelled at once, and what settled is committed.
    #[test]
    fn a_revoke_while_closing_cancels_at_once() {
        let (hub, jobs) = hub_running(2, Duration::from_secs(10));
        hub.set_closing();
        let [j0, j1] = <[_; 2]>::try_from(jobs).unwrap();
        assert!(hub.finish(j0, JobEnd::Settled).is_none());
        let started = Instant::now();
        let stuck = end_when_abandoned(&hub, j1, started);
        let consumer = FakeConsumer::new();
        on_revoke(&hub, &consumer, &[tp()]);
        let cancelled_at = stuck.join().unwrap();
        assert!(cancelled_at < Duration::from_secs(1), "{cancelled_at:?}");
        assert_eq!(consumer.calls(), [Call::Commit(vec![(tp(), 1)])]);
    }

    /// An assignment is tracked from its committed offsets and resumed (librdkafka keeps a
    /// partition's pause across re-assignment); a revoke with nothing settled commits nothing.
    #[test]
    fn an_assignment_is_tracked_and_resumed_and_an_idle_revoke_commits_nothing() {
        let (hub, _) = hub_running(0, Duration::from_secs(10));
        hub.lock().remove(&[tp()]);
        let consumer = FakeConsumer::new();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        on_assign(&hub, &consumer, &tpl);
        assert_eq!(consumer.calls(), [Call::Resume(vec![tp()])]);
        assert_eq!(hub.lock().assigned(), [tp()]);

        let revoking = FakeConsumer::new();
        on_revoke(&hub, &revoking, &[tp()]);
        assert_eq!(revoking.calls(), [], "nothing settled: nothing to commit");
        assert!(hub.lock().assigned().is_empty());
    }

    /// Delivery rule 14: a record given up outside a revoke (its worker panicked) resets its
    /// partition: what settled is committed, the partition is tracked again, resumed, and
    /// read again from the commit point — in that order.
    #[test]
    fn a_reset_commits_what_settled_and_reads_again_from_the_commit_point() {
        let (hub, jobs) = hub_running(3, Duration::from_secs(10));
        let [j0, j1, j2] = <[_; 3]>::try_from(jobs).unwrap();
        assert!(hub.finish(j0, JobEnd::Settled).is_none());
        assert!(hub.finish(j1, JobEnd::Abandoned).is_none());
        assert!(hub.finish(j2, JobEnd::Settled).is_none());
        let consumer = FakeConsumer::new();
        reset(&hub, &consumer, &[tp(), (Arc::from("t"), 7)]);
        assert_eq!(
            consumer.calls(),
            [
                Call::Commit(vec![(tp(), 1)]),
                Call::Resume(vec![tp()]),
                Call::Seek(tp(), 1),
            ],
            "a partition not assigned (t/7) is left alone"
        );
        assert_eq!(hub.lock().assigned(), [tp()], "tracked again");
        assert!(hub.lock().commits_due().is_empty(), "from the commit point");

        let untouched = FakeConsumer::new();
        reset(&hub, &untouched, &[(Arc::from("t"), 7)]);
        assert_eq!(untouched.calls(), []);
    }
}
