//! [`ConsumerMonitor`]: what a running consumer is doing, read from its hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime};

use crate::consumer::breaker::{BreakerStatus, DestinationsStatus};
use crate::consumer::schedule::{ConnectionState, PartitionStatus, RunState};
use crate::consumer::schedule::{Hub, PartitionEnd, Scheduler, Tp};
use crate::metrics::DeadLetterCounts;

/// Reports a running consumer's state: see
/// [`RetryingConsumer::monitor`](crate::RetryingConsumer::monitor).
#[derive(Debug, Clone)]
pub struct ConsumerMonitor {
    pub(crate) hub: Arc<Hub>,
}

/// A point-in-time view of a consumer, from [`ConsumerMonitor::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerSnapshot {
    /// Records being handled now (running, waiting for a retry or a dead-letter write).
    pub in_flight: usize,
    /// Of [`in_flight`](Self::in_flight), records waiting out a retry back-off (or for their
    /// [destination](crate::Destinations)): they hold no in-flight slot (see
    /// [`max_in_flight`](crate::RetryingConsumerBuilder::max_in_flight)).
    pub waiting_retry: usize,
    /// Records received and not started.
    pub buffered_records: usize,
    /// Bytes of the buffered records.
    pub buffered_bytes: usize,
    /// Assigned partitions, as `(topic, partition)`, sorted.
    pub assigned: Vec<(String, i32)>,
    /// Partitions paused by flow control, sorted.
    pub paused: Vec<(String, i32)>,
    /// Records whose handler succeeded, since the consumer was built.
    pub handled: u64,
    /// Transient failures that were (or are being) retried: one per failed attempt followed
    /// by another attempt.
    pub retried: u64,
    /// Dead letters the sink acknowledged, by failure kind.
    pub dead_lettered: DeadLetterCounts,
    /// Records skipped because the idempotency store said their work was done.
    pub duplicates: u64,
    /// Panics caught on records' paths (handler attempts, codecs, dedup-key functions).
    pub panics: u64,
    /// Records that were in flight longer than the stall threshold (counted once each).
    pub stalled: u64,
    /// Records given up unsettled at revokes and shutdown (delivered again later).
    pub abandoned: u64,
    /// Records not handled again because a previous owner of their partition had finished
    /// them above its commit point (named in its commit's metadata; see
    /// [`CommitMetadata`](crate::CommitMetadata)). They reach no worker and no
    /// [`on_outcome`](crate::RetryingConsumerBuilder::on_outcome) observer.
    pub skipped_finished: u64,
    /// Records forwarded to retry tiers, per tier (index 0 is tier 1; tiers from 16 on
    /// share the last entry): after failures and, with `with_key_order`, to wait behind an
    /// earlier record of their key. Empty when none was.
    pub forwarded: Vec<u64>,
    /// Whether the consumer reaches the cluster.
    pub connection: ConnectionState,
    /// Since when [`connection`](Self::connection) holds.
    pub connection_since: SystemTime,
    /// Each assigned partition's progress, sorted.
    pub partitions: Vec<PartitionStatus>,
    /// Whether the consumer has caught up: partitions are assigned, nothing is in flight
    /// or buffered, and every assigned partition is read and committed to its end (as of
    /// librdkafka's last fetch; refreshed five times a second). [`ConsumerMonitor::caught_up`]
    /// waits for it.
    pub caught_up: bool,
    /// The outage breaker's state, transitions and counts; `None` without a
    /// [breaker](crate::RetryingConsumerBuilder::breaker).
    pub breaker: Option<BreakerStatus>,
    /// The breakers of destinations: how many are tracked and open, and the ones open
    /// longest; `None` without [destinations](crate::RetryingConsumerBuilder::destinations).
    pub destinations: Option<DestinationsStatus>,
    /// Where the consumer is in its life: not started, starting (startup checks), running,
    /// stopping, stopped or failed.
    pub state: RunState,
    /// Why [`run`](crate::RetryingConsumer::run) failed (the error and its causes on one
    /// line), when [`state`](Self::state) is [`RunState::Failed`].
    pub failure: Option<String>,
    /// How long ago the poll loop last went round; `None` before its first round. It goes
    /// round at least every 50 ms while it runs, except while a rebalance waits for the
    /// revoked partitions' records (at most the revoke timeout) or librdkafka blocks: a
    /// figure that keeps growing while [`state`](Self::state) is
    /// [`Running`](RunState::Running) is a stuck poll loop.
    pub since_last_poll: Option<Duration>,
}

impl ConsumerMonitor {
    /// The consumer's state now.
    pub fn snapshot(&self) -> ConsumerSnapshot {
        snapshot_of(&self.hub)
    }

    /// Resolves once the consumer has caught up (see [`ConsumerSnapshot::caught_up`]): for
    /// tests and batch jobs that drain a topic and stop. Pair it with a timeout.
    ///
    /// It resolves at once when the consumer is caught up already; otherwise it is woken by
    /// the poll thread, which looks after each commit and each refresh of the partitions'
    /// ends (five times a second), and resolves at the first look that finds it caught up
    /// while a snapshot taken then agrees. It does not poll on a timer.
    pub async fn caught_up(&self) {
        let mut published = self.hub.caught_up.subscribe();
        if self.snapshot().caught_up {
            return;
        }
        // The sender lives in the hub, which `self` holds: `wait_for` cannot fail.
        let _ = published
            .wait_for(|&caught_up| caught_up && self.snapshot().caught_up)
            .await;
    }
}

/// Publishes whether the consumer has caught up, for [`ConsumerMonitor::caught_up`]: called
/// by the poll thread after each commit and each refresh of the partitions' ends. Waiters
/// are woken when it becomes true, and on every look while it stays true (a waiter whose own
/// snapshot disagreed, records having come in meanwhile, looks again); never while it is
/// false.
pub(crate) fn publish_caught_up(hub: &Hub) {
    let now = snapshot_of(hub).caught_up;
    hub.caught_up.send_if_modified(|published| {
        let changed = *published != now;
        *published = now;
        changed || now
    });
}

fn snapshot_of(hub: &Hub) -> ConsumerSnapshot {
    let s = hub.lock();
    let (buffered_records, buffered_bytes) = s.buffered();
    let counts = &hub.metrics.counts;
    let load = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
    let health = hub.health.state();
    let (state, failure) = hub.lifecycle.state();
    let assigned = sorted(s.assigned());
    let paused = sorted(s.paused());
    let partitions = partition_statuses(&s, &health.ends, &assigned, &paused);
    let caught_up = !partitions.is_empty()
        && s.in_flight() == 0
        && buffered_records == 0
        && s.all_committed()
        && partitions.iter().all(|p| p.lag == Some(0));
    ConsumerSnapshot {
        in_flight: s.in_flight(),
        waiting_retry: s.parked(),
        buffered_records,
        buffered_bytes,
        assigned,
        paused,
        handled: load(&counts.handled),
        retried: load(&counts.retried),
        dead_lettered: counts.dead_lettered(),
        duplicates: load(&counts.duplicates),
        panics: load(&counts.panics),
        stalled: load(&counts.stalled),
        abandoned: load(&counts.abandoned),
        skipped_finished: s.skipped_finished(),
        forwarded: counts.forwarded(),
        connection: health.connection,
        connection_since: health.since,
        partitions,
        caught_up,
        breaker: s.breaker().map(|b| b.status()),
        destinations: s.destinations().map(|d| d.status()),
        state,
        failure,
        since_last_poll: hub.lifecycle.since_last_poll(),
    }
}

fn sorted(tps: Vec<Tp>) -> Vec<(String, i32)> {
    let mut v: Vec<(String, i32)> = tps.into_iter().map(|(t, p)| (t.to_string(), p)).collect();
    v.sort();
    v
}

/// Each assigned partition's progress: committed offset, end and lag.
fn partition_statuses(
    s: &Scheduler,
    ends: &HashMap<(String, i32), PartitionEnd>,
    assigned: &[(String, i32)],
    paused: &[(String, i32)],
) -> Vec<PartitionStatus> {
    assigned
        .iter()
        .map(|(topic, partition)| {
            let committed = s.committed_of(&(Arc::from(topic.as_str()), *partition));
            let end = ends
                .get(&(topic.clone(), *partition))
                .copied()
                .unwrap_or_default();
            // How far the group has got: what this consumer committed, else where it
            // reads (its position starts at the group's committed offset).
            let reached =
                committed
                    .or(end.position)
                    .or(end.group_committed)
                    .or(match (end.low, end.high) {
                        (Some(low), Some(high)) if low == high => Some(high),
                        _ => None,
                    });
            PartitionStatus {
                topic: topic.clone(),
                partition: *partition,
                committed,
                end_offset: end.high,
                lag: end.high.zip(reached).map(|(h, r)| (h - r).max(0)),
                paused: paused.contains(&(topic.clone(), *partition)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;

    /// A waker that only notes it was woken.
    #[derive(Default)]
    struct Woken(AtomicBool);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, AtomicOrdering::SeqCst);
        }
    }

    impl Woken {
        fn take(&self) -> bool {
            self.0.swap(false, AtomicOrdering::SeqCst)
        }
    }

    /// A hub with partition t/0 assigned, read up to `position` of `high`.
    fn hub_at(position: i64, high: i64) -> Arc<Hub> {
        let hub = Arc::new(Hub::idle_for_tests());
        hub.lock().assign([(Arc::from("t"), 0)]);
        set_position(&hub, position, high);
        hub
    }

    fn set_position(hub: &Hub, position: i64, high: i64) {
        let end = PartitionEnd {
            low: Some(0),
            high: Some(high),
            position: Some(position),
            group_committed: None,
        };
        hub.health
            .set_ends(HashMap::from([(("t".to_owned(), 0), end)]));
    }

    /// The paused clock never moves here (nothing yields to the runtime): a timer-driven
    /// wait could not resolve, so what wakes `caught_up()` is the poll thread's publication.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn caught_up_is_woken_by_the_poll_threads_look_not_by_a_timer() {
        let hub = hub_at(3, 5);
        let monitor = ConsumerMonitor { hub: hub.clone() };
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(monitor.caught_up());
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "lag 2: not caught up"
        );
        // A look that finds it still behind wakes nobody.
        publish_caught_up(&hub);
        assert!(!woken.take(), "woken while still behind");
        // Caught up, but the poll thread has not looked yet: still waiting.
        set_position(&hub, 5, 5);
        assert!(!woken.take());
        publish_caught_up(&hub);
        assert!(
            woken.take(),
            "the poll thread's look did not wake caught_up()"
        );
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn caught_up_resolves_at_once_when_already_caught_up() {
        let hub = hub_at(5, 5);
        let monitor = ConsumerMonitor { hub: hub.clone() };
        assert!(monitor.snapshot().caught_up);
        // Before the poll thread published anything, and after.
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken);
        let mut cx = Context::from_waker(&waker);
        assert!(std::pin::pin!(monitor.caught_up()).poll(&mut cx).is_ready());
        publish_caught_up(&hub);
        assert!(std::pin::pin!(monitor.caught_up()).poll(&mut cx).is_ready());
    }

    /// A published "caught up" that records made stale does not resolve a waiter; the next
    /// look that finds it caught up again wakes it, though the published value never
    /// changed.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_stale_caught_up_waits_for_the_next_look() {
        let hub = hub_at(5, 5);
        publish_caught_up(&hub);
        set_position(&hub, 5, 9); // new records, not looked at yet
        let monitor = ConsumerMonitor { hub: hub.clone() };
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(monitor.caught_up());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        set_position(&hub, 9, 9);
        publish_caught_up(&hub);
        assert!(
            woken.take(),
            "a look finding it caught up again did not wake the waiter"
        );
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(()));
    }
}
