//! [`ConsumerMonitor`]: what a running consumer is doing, read from its hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use super::hub::Hub;
use super::topic_partition::Tp;
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
        ConsumerSnapshot {
            in_flight: s.in_flight(),
            buffered_records,
            buffered_bytes,
            assigned: list(s.assigned()),
            paused: list(s.paused()),
            handled: load(&counts.handled),
            retried: load(&counts.retried),
            dead_lettered: counts.dead_lettered(),
            duplicates: load(&counts.duplicates),
        }
    }
}
