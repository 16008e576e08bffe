//! Committing settled offsets (delivery rule 1 in the crate docs): synchronously, exactly the offsets the
//! scheduler's watermarks allow.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::client::PollConsumer;
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::Tp;
use crate::metrics::ConsumerMetrics;

/// One partition's commit: the offset (the next to read) and the metadata it carries (the
/// finished offsets above it, see [`Scheduler::commit_metadata`](crate::consumer::schedule::Scheduler::commit_metadata)).
pub(crate) type Commit = ((Tp, i64), Option<String>);

/// `offsets` with their metadata, as the scheduler says now.
pub(crate) fn with_metadata(hub: &Hub, offsets: &[(Tp, i64)]) -> Vec<Commit> {
    let s = hub.lock();
    (offsets.iter())
        .map(|(tp, o)| ((tp.clone(), *o), s.commit_metadata(tp, *o)))
        .collect()
}

/// The offsets of `commits`.
pub(crate) fn offsets_of(commits: &[Commit]) -> Vec<(Tp, i64)> {
    commits.iter().map(|(offset, _)| offset.clone()).collect()
}

/// Commits exactly these offsets (each the next offset to read) synchronously; returns
/// whether the broker accepted them.
pub(crate) fn commit(
    consumer: &impl PollConsumer,
    hub: &Hub,
    commits: &[Commit],
    why: &str,
) -> bool {
    if let Some(t) = hub.transactions() {
        // Every partition's due offsets go with these (delivery rule 20).
        return t
            .commit(hub, consumer.group_metadata(), commits, why)
            .is_ok();
    }
    match commit_once(consumer, hub, commits, why) {
        Ok(()) => true,
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

/// One synchronous commit of exactly these offsets, counted in the metrics; failures are
/// left to the caller to log. Metadata the broker refuses as too large
/// (`offset.metadata.max.bytes` set below kourier's 4,000 bytes) is turned off for good,
/// with one warning, and the commit sent again without it.
fn commit_once(
    consumer: &impl PollConsumer,
    hub: &Hub,
    commits: &[Commit],
    why: &str,
) -> Result<(), KafkaError> {
    match send(consumer, &hub.metrics, commits, true, why) {
        Err(e)
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetMetadataTooLarge)
                && commits.iter().any(|(_, m)| m.is_some()) =>
        {
            warn!(error = %e, "the broker refuses commit metadata this large: commits carry no finished offsets from now on (a new owner handles again what finished above a commit point)");
            hub.lock().set_commit_metadata(false);
            send(consumer, &hub.metrics, commits, false, why)
        }
        result => result,
    }
}

/// Sends one commit (with its metadata, if `metadata`).
fn send(
    consumer: &impl PollConsumer,
    metrics: &ConsumerMetrics,
    commits: &[Commit],
    metadata: bool,
    why: &str,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(commits.len());
    for (((t, p), o), m) in commits {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        if let (true, Some(m), Some(mut e)) = (metadata, m, tpl.find_partition(t, *p)) {
            e.set_metadata(m.as_str());
        }
    }
    let started = Instant::now();
    let result = consumer.commit_sync(&tpl);
    metrics.commit(started.elapsed(), result.is_ok());
    if result.is_ok() {
        debug!(why, offsets = %offsets_display(&offsets_of(commits)), took = ?started.elapsed(), "committed");
    }
    result
}

/// `topic/partition@offset, ...`: each the offset a partition's next reader starts at.
fn offsets_display(offsets: &[(Tp, i64)]) -> String {
    offsets
        .iter()
        .map(|((t, p), o)| format!("{t}/{p}@{o}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first pause between two tries of the final commit; it doubles up to
/// [`FINAL_COMMIT_BACKOFF_MAX`].
const FINAL_COMMIT_BACKOFF: Duration = Duration::from_millis(100);
const FINAL_COMMIT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long one poll waits while the final commit pauses between tries.
const FINAL_COMMIT_POLL: Duration = Duration::from_millis(50);

/// The final commit at shutdown (rule 8 in the crate docs): every settled offset that
/// moved since the last commit, tried until it succeeds or `deadline` passes (at least
/// once), with a short back-off between tries during which the consumer keeps polling (it
/// stays in its group; a rebalance meanwhile commits and drops its partitions itself). What
/// still failed is kept in the hub for the report ([`Hub::take_final_commit_failure`]).
pub(crate) fn commit_final(consumer: &impl PollConsumer, hub: &Hub, deadline: Instant) {
    if hub.transactions().is_some_and(|t| t.failure().is_some()) {
        // The transactions stopped: nothing more may be committed (delivery rule 20).
        return;
    }
    final_commit_with(
        hub,
        deadline,
        |offsets| match hub.transactions() {
            // The transaction sends what is due when it holds its guard.
            Some(t) => (t.commit(hub, consumer.group_metadata(), &[], "shutdown"))
                .map(drop)
                .map_err(|f| f.error),
            None => commit_once(consumer, hub, &with_metadata(hub, offsets), "shutdown"),
        },
        |pause| {
            let started = Instant::now();
            // Records that still arrive are dropped (the scheduler is stopping).
            while let Some(left) = pause.checked_sub(started.elapsed()) {
                consumer.poll_and_drop(left.min(FINAL_COMMIT_POLL));
            }
        },
    );
}

/// [`commit_final`], with the commit and the pause given: `try_commit` commits the offsets
/// it is given, `pause` waits (polling) between tries.
fn final_commit_with(
    hub: &Hub,
    deadline: Instant,
    mut try_commit: impl FnMut(&[(Tp, i64)]) -> Result<(), KafkaError>,
    mut pause: impl FnMut(Duration),
) {
    let mut backoff = FINAL_COMMIT_BACKOFF;
    let mut tries = 0u32;
    loop {
        // Asked again at each try: a revoke while pausing commits and drops its partitions
        // (and, when it commits them, clears them from the failure).
        let offsets = hub.lock().commits_due();
        if offsets.is_empty() {
            return;
        }
        tries += 1;
        let error = match try_commit(&offsets) {
            Ok(()) => {
                hub.lock().committed(&offsets);
                hub.committed_after_failure(&offsets);
                if tries > 1 {
                    info!(tries, offsets = %offsets_display(&offsets), "final commit succeeded after retries");
                }
                return;
            }
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            error!(tries, error = %error, uncommitted = %offsets_display(&offsets), "final commit failed until the shutdown deadline: these partitions' settled records since their last commit are delivered again after a restart");
        } else if let Some(suppressed) = hub.throttle.admit("shutdown: final commit failed") {
            let ownership = ownership_lost(&error);
            warn!(tries, error = %error, ownership_lost = ownership, suppressed, left = ?left, "final commit failed; retrying until the shutdown deadline");
        }
        hub.final_commit_failed(&offsets, error);
        if left.is_zero() {
            return;
        }
        pause(backoff.min(left));
        backoff = (backoff * 2).min(FINAL_COMMIT_BACKOFF_MAX);
    }
}

/// Commits every offset that moved since the last commit, and notes what was committed.
pub(crate) fn commit_settled(consumer: &impl PollConsumer, hub: &Hub, why: &str) {
    if let Some(t) = hub.transactions() {
        // What is due is read under the transaction's guard (delivery rule 20).
        let _ = t.commit(hub, consumer.group_metadata(), &[], why);
        return;
    }
    let offsets = hub.lock().commits_due();
    if !offsets.is_empty() && commit(consumer, hub, &with_metadata(hub, &offsets), why) {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::client::fake::{FakeConsumer, hub_running};
    use super::*;
    use crate::consumer::schedule::JobEnd;

    /// A hub whose partition `t/0` settled offsets 0..3: 3 is to be committed.
    fn hub_with_settled_records() -> Arc<Hub> {
        let (hub, jobs) = hub_running(3, Duration::from_secs(1));
        for job in jobs {
            assert!(hub.finish(job, JobEnd::Settled).is_none());
        }
        hub
    }

    fn refused() -> KafkaError {
        KafkaError::ConsumerCommit(RDKafkaErrorCode::GroupAuthorizationFailed)
    }

    /// The logs tell a commit refused because the group moved on (its records are redelivered
    /// to the new owner, nothing to fix) from one that failed, and name what was committed
    /// as `topic/partition@offset`.
    #[test]
    fn refusals_by_a_rebalance_are_told_apart_and_offsets_are_named() {
        for code in [
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::State,
        ] {
            assert!(
                ownership_lost(&KafkaError::ConsumerCommit(code)),
                "{code:?}"
            );
        }
        assert!(!ownership_lost(&refused()));
        assert!(!ownership_lost(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RequestTimedOut
        )));
        let offsets = [((Arc::from("t"), 0), 3), ((Arc::from("u.v"), 11), 0)];
        assert_eq!(offsets_display(&offsets), "t/0@3, u.v/11@0");
        assert_eq!(offsets_display(&[]), "");
    }

    /// An interval commit that failed is tried again at the next interval; one that
    /// succeeded is noted and not sent again.
    #[test]
    fn a_failed_interval_commit_is_tried_again_and_a_successful_one_is_noted() {
        let hub = hub_with_settled_records();
        let consumer = FakeConsumer::new();
        consumer.fail_commits(1, &refused());
        let offsets = vec![((Arc::from("t"), 0), 3)];
        commit_settled(&consumer, &hub, "interval");
        assert_eq!(hub.lock().commits_due(), offsets, "failed: still to commit");
        commit_settled(&consumer, &hub, "interval");
        assert!(hub.lock().commits_due().is_empty(), "committed: noted");
        commit_settled(&consumer, &hub, "interval");
        assert_eq!(consumer.commits(), [offsets.clone(), offsets]);
    }

    #[test]
    fn a_final_commit_that_fails_then_succeeds_is_retried_until_it_does() {
        let hub = hub_with_settled_records();
        assert_eq!(hub.lock().commits_due(), vec![((Arc::from("t"), 0), 3)]);
        let mut tries = Vec::new();
        let mut pauses = Vec::new();
        let deadline = crate::clock::after(Instant::now(), Duration::from_secs(60));
        final_commit_with(
            &hub,
            deadline,
            |offsets| {
                tries.push(offsets.to_vec());
                if tries.len() <= 5 {
                    Err(refused())
                } else {
                    Ok(())
                }
            },
            |pause| pauses.push(pause),
        );
        assert_eq!(tries.len(), 6, "five refusals, then the commit");
        assert!(tries.iter().all(|t| *t == [((Arc::from("t"), 0), 3)]));
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000], "a short back-off, capped");
        assert!(hub.lock().commits_due().is_empty(), "the commit is noted");
        let failure = hub.take_final_commit_failure();
        assert!(failure.is_none(), "nothing to report: {failure:?}");
    }

    #[test]
    fn a_final_commit_that_keeps_failing_is_reported_at_the_deadline() {
        let hub = hub_with_settled_records();
        let started = Instant::now();
        let deadline = crate::clock::after(started, Duration::from_millis(400));
        let mut tries = 0;
        final_commit_with(
            &hub,
            deadline,
            |_| {
                tries += 1;
                Err(refused())
            },
            std::thread::sleep,
        );
        let took = started.elapsed();
        assert!(tries >= 3, "retried until the deadline: {tries} tries");
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(
            took < Duration::from_secs(2),
            "not past the deadline: {took:?}"
        );
        let failure = hub.take_final_commit_failure().expect("reported");
        assert_eq!(failure.uncommitted, [((Arc::from("t"), 0), 3)]);
        assert_eq!(failure.uncommitted_display(), ["t/0@3"]);
        assert_eq!(failure.error, refused());
        assert_eq!(hub.lock().commits_due().len(), 1, "still uncommitted");
    }

    #[test]
    fn a_final_commit_past_the_deadline_is_tried_once() {
        let hub = hub_with_settled_records();
        let mut tries = 0;
        final_commit_with(
            &hub,
            Instant::now(),
            |_| {
                tries += 1;
                Err(refused())
            },
            |_| panic!("no pause past the deadline"),
        );
        assert_eq!(tries, 1);
        assert!(hub.take_final_commit_failure().is_some());
    }

    #[test]
    fn partitions_that_leave_uncommitted_stay_reported_and_a_later_commit_clears_them() {
        let hub = hub_with_settled_records();
        let tp: Tp = (Arc::from("t"), 0);
        // A failed try, then the partition is revoked as lost (removed, not committed): the
        // final commit finds nothing more to commit, and the failure stays.
        let mut first = true;
        final_commit_with(
            &hub,
            crate::clock::after(Instant::now(), Duration::from_secs(60)),
            |_| Err(refused()),
            |_| {
                if std::mem::take(&mut first) {
                    hub.lock().remove(std::slice::from_ref(&tp));
                }
            },
        );
        let failure = hub.take_final_commit_failure().expect("still reported");
        assert_eq!(failure.uncommitted, [(tp.clone(), 3)]);

        // A revoke that commits a lower offset does not cover it; one that commits it does.
        hub.final_commit_failed(&[(tp.clone(), 3)], refused());
        hub.committed_after_failure(&[(tp.clone(), 2)]);
        assert!(hub.take_final_commit_failure().is_some());
        hub.final_commit_failed(&[(tp.clone(), 3)], refused());
        hub.committed_after_failure(&[(tp.clone(), 3)]);
        assert!(hub.take_final_commit_failure().is_none());
    }
}
