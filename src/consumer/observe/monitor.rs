//! [`ConsumerMonitor`]: what a running consumer is doing, read from its hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime};

use crate::consumer::breaker::BreakerStatus;
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::Tp;
use crate::consumer::schedule::{ConnectionState, PartitionStatus};
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
    /// Of [`in_flight`](Self::in_flight), records waiting out a retry back-off: they hold
    /// no in-flight slot (see
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
    /// librdkafka's last fetch; refreshed five times a second).
    pub caught_up: bool,
    /// The outage breaker's state, transitions and counts; `None` without a
    /// [breaker](crate::RetryingConsumerBuilder::breaker).
    pub breaker: Option<BreakerStatus>,
}

impl ConsumerMonitor {
    /// The consumer's state now.
    pub fn snapshot(&self) -> ConsumerSnapshot {
        let s = self.hub.lock();
        let list = |tps: Vec<Tp>| {
            let mut v: Vec<(String, i32)> =
                tps.into_iter().map(|(t, p)| (t.to_string(), p)).collect();
            v.sort();
            v
        };
        let (buffered_records, buffered_bytes) = s.buffered();
        let counts = &self.hub.metrics.counts;
        let load = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        let health = self.hub.health.state();
        let assigned = list(s.assigned());
        let paused = list(s.paused());
        let partitions: Vec<PartitionStatus> = assigned
            .iter()
            .map(|(topic, partition)| {
                let committed = s.committed_of(&(Arc::from(topic.as_str()), *partition));
                let end = health
                    .ends
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .unwrap_or_default();
                // How far the group has got: what this consumer committed, else where it
                // reads (its position starts at the group's committed offset).
                let reached = committed.or(end.position).or(end.group_committed).or(
                    match (end.low, end.high) {
                        (Some(low), Some(high)) if low == high => Some(high),
                        _ => None,
                    },
                );
                PartitionStatus {
                    topic: topic.clone(),
                    partition: *partition,
                    committed,
                    end_offset: end.high,
                    lag: end.high.zip(reached).map(|(h, r)| (h - r).max(0)),
                    paused: paused.contains(&(topic.clone(), *partition)),
                }
            })
            .collect();
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
            forwarded: counts.forwarded(),
            connection: health.connection,
            connection_since: health.since,
            partitions,
            caught_up,
            breaker: s.breaker().map(|b| b.status()),
        }
    }

    /// Resolves once the consumer has caught up (see [`ConsumerSnapshot::caught_up`]): for
    /// tests and batch jobs that drain a topic and stop. Pair it with a timeout.
    pub async fn caught_up(&self) {
        while !self.snapshot().caught_up {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
