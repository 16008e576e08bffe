//! Metrics: what a [`RetryingConsumer`](crate::RetryingConsumer) counts and measures.
//!
//! kourier records through the [`metrics`](https://docs.rs/metrics/0.24) facade and installs
//! nothing itself: without a recorder every call is a no-op. The application picks the
//! exporter (e.g. `metrics-exporter-prometheus`, or an OpenTelemetry bridge) and installs it
//! **before running the consumer**: a consumer takes its metric handles when it starts running
//! (per topic, when that topic's first record arrives), and a handle taken before a recorder
//! was installed stays a no-op.
//!
//! # Metrics
//!
//! Every metric carries the consumer group as `group`. Per-record metrics carry the `topic`;
//! only the per-partition gauges carry a `partition`.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `kourier_records_consumed_total` | counter | `topic`, `group` | records received from Kafka |
//! | `kourier_records_handled_total` | counter | `topic`, `group` | records whose handler succeeded |
//! | `kourier_records_retried_total` | counter | `topic`, `group`, `attempt` | transient failures that will be retried; `attempt` is the attempt that failed (`1` = the first try, …, `9`, then `10+`) |
//! | `kourier_records_dead_lettered_total` | counter | `topic`, `group`, `kind` | dead letters the sink acknowledged; `kind` is `decode`, `permanent`, `retries-exhausted` or `panic` |
//! | `kourier_duplicates_skipped_total` | counter | `topic`, `group` | records skipped because the idempotency store says their work is done |
//! | `kourier_idempotency_store_errors_total` | counter | `topic`, `group`, `operation` | idempotency store calls that failed (unavailable, timed out); `operation` is `claim`, `complete`, `release` or `renew` |
//! | `kourier_dead_letter_write_failures_total` | counter | `topic`, `group` | dead-letter writes that failed (each is retried; the partition waits) |
//! | `kourier_handler_duration_seconds` | histogram | `topic`, `group` | duration of each handler attempt, failed, timed-out and panicking ones included |
//! | `kourier_commit_duration_seconds` | histogram | `group` | duration of each synchronous offset commit |
//! | `kourier_commit_failures_total` | counter | `group` | offset commits that failed (retried at the next interval) |
//! | `kourier_records_in_flight` | gauge | `group` | records being handled now (running, waiting for a retry, a claim or a dead-letter write) |
//! | `kourier_consumer_lag` | gauge | `topic`, `group`, `partition` | records of an assigned partition not yet committed by the group: end offset − committed offset |
//! | `kourier_partition_paused` | gauge | `topic`, `group`, `partition` | `1` while flow control pauses the partition (its buffer is full), else `0` |
//! | `kourier_handler_panics_total` | counter | `topic`, `group` | panics caught on records' paths: handler attempts, codecs, dedup-key functions, the outcome observer |
//! | `kourier_records_stalled_total` | counter | `topic`, `group` | records in flight longer than the stall threshold, counted once each |
//! | `kourier_records_abandoned_total` | counter | `topic`, `group` | records given up unsettled at a revoke or shutdown (delivered again later) |
//! | `kourier_records_forwarded_total` | counter | `topic`, `group`, `tier` | records forwarded to a retry tier (acknowledged) |
//! | `kourier_forward_failures_total` | counter | `topic`, `group` | forwards to a retry tier that failed (each is retried) |
//! | `kourier_connection_state` | gauge | `group` | `1` while the consumer reaches the Kafka cluster, `0` while it does not |
//! | `kourier_breaker_state` | gauge | `group` | the [outage breaker](crate::BreakerPolicy)'s state: `0` closed, `1` open, `2` half-open (consumers with a breaker only) |
//! | `kourier_breaker_transitions_total` | counter | `group`, `state` | breaker transitions, by the state entered: `open`, `half-open` (one probe each) or `closed` |
//! | `kourier_breaker_held_failures_total` | counter | `group` | failed calls the open breaker absorbed: they used up no attempt and dead-lettered nothing |
//! | `kourier_destinations_open` | gauge | `group` | [destinations](crate::Destinations) whose breaker is open or half-open now (consumers with destinations only) |
//! | `kourier_destination_transitions_total` | counter | `group`, `state` | destination breaker transitions, by the state entered: `open`, `half-open` or `closed` (no destination label: its cardinality is unbounded; the snapshot names the top ones) |
//! | `kourier_destinations_untracked_total` | counter | `group` | failures of destinations that could not be tracked (as many are tracked as allowed): not isolated |
//!
//! The names are the constants of this module; the label names are in [`labels`].
//!
//! A queue-mode consumer (feature `queue`, `kourier::queue`) records a subset under the same
//! names and labels, `group` being the share group: no lag, paused-partition, commit,
//! connection, stall, retry-tier or destination metrics (the `kourier::queue` docs list
//! them).
//!
//! # Cost
//!
//! Per record, kourier increments pre-registered handles (no label strings are built per
//! record) and reads the clock twice around each handler attempt. Without a recorder the
//! handles are no-ops.
//!
//! **Lag** costs nothing per record: it comes from librdkafka's statistics, which kourier turns
//! on with `statistics.interval.ms=5000` (override it with
//! [`kafka_config`](crate::RetryingConsumerBuilder::kafka_config); `0` turns lag reporting
//! off). Every interval the poll thread reads each assigned partition's `consumer_lag` (end
//! offset, i.e. the last stable offset under the default `read_committed` isolation, minus the
//! group's committed offset). Before the group has committed anything on a partition, the lag
//! counts from the first offset this consumer read there. When a partition is revoked, its
//! lag and paused gauges are set to `0` on this consumer (its new owner reports it), so a
//! `sum by (topic)` over consumers stays right.
//!
//! # Example: Prometheus
//!
//! With `metrics-exporter-prometheus = { version = "0.18", default-features = false,
//! features = ["http-listener"] }`, inside a Tokio runtime, before the consumer runs:
//!
//! ```no_run
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! PrometheusBuilder::new()
//!     .with_http_listener(([127, 0, 0, 1], 9464)) // GET /metrics
//!     // Histograms instead of summaries for the two duration metrics:
//!     .set_buckets_for_metric(
//!         Matcher::Suffix("_duration_seconds".into()),
//!         &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
//!     )?
//!     .install()?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, SharedString, Unit};

use crate::dead_letter::DeadLetterReason;
use crate::record::RawRecord;

/// Counter: records received from Kafka.
pub const RECORDS_CONSUMED: &str = "kourier_records_consumed_total";
/// Counter: records whose handler succeeded.
pub const RECORDS_HANDLED: &str = "kourier_records_handled_total";
/// Counter: transient failures that will be retried, by failed `attempt`.
pub const RECORDS_RETRIED: &str = "kourier_records_retried_total";
/// Counter: dead letters acknowledged by the sink, by failure `kind`.
pub const RECORDS_DEAD_LETTERED: &str = "kourier_records_dead_lettered_total";
/// Counter: records skipped as duplicates.
pub const DUPLICATES_SKIPPED: &str = "kourier_duplicates_skipped_total";
/// Counter: failed idempotency store calls, by `operation`.
pub const STORE_ERRORS: &str = "kourier_idempotency_store_errors_total";
/// Counter: failed dead-letter writes.
pub const DEAD_LETTER_WRITE_FAILURES: &str = "kourier_dead_letter_write_failures_total";
/// Histogram (seconds): duration of each handler attempt.
pub const HANDLER_DURATION: &str = "kourier_handler_duration_seconds";
/// Histogram (seconds): duration of each synchronous offset commit.
pub const COMMIT_DURATION: &str = "kourier_commit_duration_seconds";
/// Counter: failed offset commits.
pub const COMMIT_FAILURES: &str = "kourier_commit_failures_total";
/// Gauge: records being handled now.
pub const RECORDS_IN_FLIGHT: &str = "kourier_records_in_flight";
/// Gauge (per partition): records not yet committed by the group.
pub const CONSUMER_LAG: &str = "kourier_consumer_lag";
/// Gauge (per partition): `1` while paused by flow control, else `0`.
pub const PARTITION_PAUSED: &str = "kourier_partition_paused";
/// Counter: handler attempts (and codec or dedup-key calls) that panicked. Labels: `topic`.
pub const HANDLER_PANICS: &str = "kourier_handler_panics_total";
/// Counter: records in flight longer than the stall threshold, counted once each. Labels:
/// `topic`.
pub const RECORDS_STALLED: &str = "kourier_records_stalled_total";
/// Counter: records given up unsettled at a revoke or shutdown (delivered again later).
/// Labels: `topic`.
pub const RECORDS_ABANDONED: &str = "kourier_records_abandoned_total";
/// Gauge: `1` while the consumer reaches the cluster, `0` while it does not.
pub const CONNECTION_STATE: &str = "kourier_connection_state";
/// Gauge: the outage breaker's state, `0` closed, `1` open, `2` half-open.
pub const BREAKER_STATE: &str = "kourier_breaker_state";
/// Counter: outage breaker transitions, by the `state` entered.
pub const BREAKER_TRANSITIONS: &str = "kourier_breaker_transitions_total";

/// The breaker's states as `state` labels, by gauge value (0 closed, 1 open, 2 half-open):
/// what `BreakerState::as_str` says (the breaker's tests check it).
pub(crate) const BREAKER_STATES: [&str; 3] = ["closed", "open", "half-open"];
/// Counter: records forwarded to a retry tier (acknowledged), by `tier` (1-based).
pub const RECORDS_FORWARDED: &str = "kourier_records_forwarded_total";
/// Counter: forwards to a retry tier that failed (each is retried).
pub const FORWARD_FAILURES: &str = "kourier_forward_failures_total";
/// Counter: failed calls the open breaker absorbed (no attempt used, nothing dead-lettered).
pub const BREAKER_HELD_FAILURES: &str = "kourier_breaker_held_failures_total";
/// Gauge: destinations whose breaker is open or half-open now.
pub const DESTINATIONS_OPEN: &str = "kourier_destinations_open";
/// Counter: destination breaker transitions, by the `state` entered.
pub const DESTINATION_TRANSITIONS: &str = "kourier_destination_transitions_total";
/// Counter: failures of destinations that could not be tracked (the cap was reached).
pub const DESTINATIONS_UNTRACKED: &str = "kourier_destinations_untracked_total";

/// Label names.
pub mod labels {
    /// The source topic.
    pub const TOPIC: &str = "topic";
    /// The consumer group.
    pub const GROUP: &str = "group";
    /// The partition (per-partition gauges only).
    pub const PARTITION: &str = "partition";
    /// The attempt that failed (`1`…`9`, then `10+`), on retries.
    pub const ATTEMPT: &str = "attempt";
    /// The dead-letter failure kind: `decode`, `permanent` or `retries-exhausted`.
    pub const KIND: &str = "kind";
    /// The idempotency store operation: `claim`, `complete`, `release` or `renew`.
    pub const OPERATION: &str = "operation";
    /// The breaker state entered: `open`, `half-open` or `closed`.
    pub const STATE: &str = "state";
    /// The retry tier a record was forwarded to (`1`…`15`, then `16+`).
    pub const TIER: &str = "tier";
}

/// Tiers counted one by one (in the snapshot and the `tier` label); later ones share the
/// last entry.
pub(crate) const COUNTED_TIERS: usize = 16;
const TIER_LABELS: [&str; COUNTED_TIERS] = [
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16+",
];

const ATTEMPT_LABELS: [&str; 10] = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10+"];
const REASONS: [DeadLetterReason; 4] = [
    DeadLetterReason::Decode,
    DeadLetterReason::Permanent,
    DeadLetterReason::RetriesExhausted,
    DeadLetterReason::Panic,
];

/// An idempotency store operation, for [`STORE_ERRORS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreOperation {
    Claim,
    Complete,
    Release,
    Renew,
}

impl StoreOperation {
    fn as_str(self) -> &'static str {
        match self {
            StoreOperation::Claim => "claim",
            StoreOperation::Complete => "complete",
            StoreOperation::Release => "release",
            StoreOperation::Renew => "renew",
        }
    }
}

fn reason_index(reason: DeadLetterReason) -> usize {
    match reason {
        DeadLetterReason::Decode => 0,
        DeadLetterReason::Permanent => 1,
        DeadLetterReason::RetriesExhausted => 2,
        DeadLetterReason::Panic => 3,
    }
}

/// Dead letters written by a consumer, by failure kind (see
/// [`ConsumerSnapshot::dead_lettered`](crate::ConsumerSnapshot::dead_lettered)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DeadLetterCounts {
    /// Records that could not be decoded.
    pub decode: u64,
    /// Records whose handler failed permanently.
    pub permanent: u64,
    /// Records whose transient failures used up the retry policy.
    pub retries_exhausted: u64,
    /// Records given up on because code on their path panicked.
    pub panic: u64,
}

impl DeadLetterCounts {
    /// All dead letters.
    pub fn total(&self) -> u64 {
        self.decode + self.permanent + self.retries_exhausted + self.panic
    }

    /// The count of one kind.
    pub fn of(&self, reason: DeadLetterReason) -> u64 {
        match reason {
            DeadLetterReason::Decode => self.decode,
            DeadLetterReason::Permanent => self.permanent,
            DeadLetterReason::RetriesExhausted => self.retries_exhausted,
            DeadLetterReason::Panic => self.panic,
        }
    }
}

/// Outcome counts since the consumer was built, for [`crate::ConsumerSnapshot`].
#[derive(Debug, Default)]
pub(crate) struct OutcomeCounts {
    pub(crate) handled: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) stalled: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    dead_lettered: [AtomicU64; 4],
    forwarded: [AtomicU64; COUNTED_TIERS],
}

impl OutcomeCounts {
    /// Records forwarded per tier (index 0 is tier 1), up to the highest tier used.
    pub(crate) fn forwarded(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .forwarded
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    }

    pub(crate) fn dead_lettered(&self) -> DeadLetterCounts {
        let get = |r| self.dead_lettered[reason_index(r)].load(Ordering::Relaxed);
        DeadLetterCounts {
            decode: get(DeadLetterReason::Decode),
            permanent: get(DeadLetterReason::Permanent),
            retries_exhausted: get(DeadLetterReason::RetriesExhausted),
            panic: get(DeadLetterReason::Panic),
        }
    }
}

/// The handles of one topic, registered on first use.
#[derive(Clone)]
pub(crate) struct TopicMetrics {
    topic: SharedString,
    group: SharedString,
    consumed: Counter,
    handled: Counter,
    duplicates: Counter,
    dead_letter_write_failures: Counter,
    handler_duration: Histogram,
    retried: [OnceLock<Counter>; 10],
    dead_lettered: [OnceLock<Counter>; 4],
    panics: Counter,
    stalled: Counter,
    abandoned: Counter,
    store_errors: [OnceLock<Counter>; 4],
    forwarded: [OnceLock<Counter>; COUNTED_TIERS],
    forward_failures: Counter,
}

impl TopicMetrics {
    /// `queue`: a queue-mode consumer's, without the consumer-group engine's stall and
    /// retry-tier counters (no-op handles: those series are not registered).
    fn new(topic: SharedString, group: SharedString, queue: bool) -> Self {
        let labels = [
            (labels::TOPIC, topic.clone()),
            (labels::GROUP, group.clone()),
        ];
        TopicMetrics {
            consumed: ::metrics::counter!(RECORDS_CONSUMED, &labels),
            handled: ::metrics::counter!(RECORDS_HANDLED, &labels),
            duplicates: ::metrics::counter!(DUPLICATES_SKIPPED, &labels),
            dead_letter_write_failures: ::metrics::counter!(DEAD_LETTER_WRITE_FAILURES, &labels),
            handler_duration: ::metrics::histogram!(HANDLER_DURATION, &labels),
            panics: ::metrics::counter!(HANDLER_PANICS, &labels),
            stalled: if queue {
                Counter::noop()
            } else {
                ::metrics::counter!(RECORDS_STALLED, &labels)
            },
            abandoned: ::metrics::counter!(RECORDS_ABANDONED, &labels),
            retried: Default::default(),
            dead_lettered: Default::default(),
            store_errors: Default::default(),
            forwarded: Default::default(),
            forward_failures: if queue {
                Counter::noop()
            } else {
                ::metrics::counter!(FORWARD_FAILURES, &labels)
            },
            topic,
            group,
        }
    }

    fn with_extra(&self, name: &'static str, key: &'static str, value: &'static str) -> Counter {
        ::metrics::counter!(
            name,
            labels::TOPIC => self.topic.clone(),
            labels::GROUP => self.group.clone(),
            key => value
        )
    }
}

impl std::fmt::Debug for TopicMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicMetrics")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Consumer-wide handles, registered when the consumer starts running.
#[derive(Debug)]
struct GroupMetrics {
    commit_duration: Histogram,
    commit_failures: Counter,
    connection_state: Gauge,
}

/// The outage breaker's handles (consumers with a breaker only).
#[derive(Debug)]
struct BreakerMetrics {
    state: Gauge,
    /// By the state entered: closed, open, half-open.
    transitions: [Counter; 3],
    held_failures: Counter,
}

/// The destinations' breakers' handles (consumers with destinations only).
#[derive(Debug)]
struct DestinationMetrics {
    open: Gauge,
    /// By the state entered: closed, open, half-open.
    transitions: [Counter; 3],
    untracked: Counter,
}

/// Every metric handle of one consumer, and its outcome counts.
#[derive(Debug)]
pub(crate) struct ConsumerMetrics {
    group: SharedString,
    topics: Box<[TopicEntry]>,
    consumer: OnceLock<GroupMetrics>,
    /// Apart from [`GroupMetrics`]: queue mode has it and no commits.
    in_flight: OnceLock<Gauge>,
    breaker: OnceLock<BreakerMetrics>,
    /// A queue-mode consumer's (see [`TopicMetrics::new`]).
    queue: bool,
    destinations: OnceLock<DestinationMetrics>,
    pub(crate) counts: OutcomeCounts,
}

impl ConsumerMetrics {
    pub(crate) fn new(group: &str, topics: &[String]) -> Self {
        ConsumerMetrics {
            group: SharedString::from(std::sync::Arc::<str>::from(group)),
            topics: topics.iter().map(|t| TopicEntry::new(t)).collect(),
            consumer: OnceLock::new(),
            in_flight: OnceLock::new(),
            breaker: OnceLock::new(),
            queue: false,
            destinations: OnceLock::new(),
            counts: OutcomeCounts::default(),
        }
    }

    /// A queue-mode consumer's metrics: no commit, lag, pause, stall or retry-tier series.
    #[cfg(feature = "queue")]
    pub(crate) fn new_queue(group: &str, topic: &str) -> Self {
        ConsumerMetrics {
            queue: true,
            ..ConsumerMetrics::new(group, &[topic.to_owned()])
        }
    }

    fn consumer(&self) -> &GroupMetrics {
        self.consumer.get_or_init(|| {
            describe();
            let group = [(labels::GROUP, self.group.clone())];
            GroupMetrics {
                commit_duration: ::metrics::histogram!(COMMIT_DURATION, &group),
                commit_failures: ::metrics::counter!(COMMIT_FAILURES, &group),
                connection_state: ::metrics::gauge!(CONNECTION_STATE, &group),
            }
        })
    }

    /// Whether the consumer reaches the cluster.
    pub(crate) fn connection_state(&self, connected: bool) {
        self.consumer()
            .connection_state
            .set(if connected { 1.0 } else { 0.0 });
    }

    fn in_flight(&self) -> &Gauge {
        self.in_flight.get_or_init(
            || ::metrics::gauge!(RECORDS_IN_FLIGHT, labels::GROUP => self.group.clone()),
        )
    }

    fn breaker(&self) -> &BreakerMetrics {
        self.breaker.get_or_init(|| {
            // The descriptions (not `consumer()`: queue mode has no commit metrics).
            describe();
            let transition = |state: &'static str| {
                ::metrics::counter!(
                    BREAKER_TRANSITIONS,
                    labels::GROUP => self.group.clone(),
                    labels::STATE => state
                )
            };
            let group = [(labels::GROUP, self.group.clone())];
            BreakerMetrics {
                state: ::metrics::gauge!(BREAKER_STATE, &group),
                transitions: BREAKER_STATES.map(transition),
                held_failures: ::metrics::counter!(BREAKER_HELD_FAILURES, &group),
            }
        })
    }

    /// The breaker entered the state of index `state` in [`BREAKER_STATES`] (its gauge
    /// value too).
    pub(crate) fn breaker_transition(&self, state: usize) {
        let m = self.breaker();
        m.state.set(state as f64);
        m.transitions[state.min(BREAKER_STATES.len() - 1)].increment(1);
    }

    /// The open breaker absorbed a failed call.
    pub(crate) fn breaker_held_failure(&self) {
        self.breaker().held_failures.increment(1);
    }

    fn destinations(&self) -> &DestinationMetrics {
        self.destinations.get_or_init(|| {
            self.consumer(); // the descriptions
            let transition = |state: &'static str| {
                ::metrics::counter!(
                    DESTINATION_TRANSITIONS,
                    labels::GROUP => self.group.clone(),
                    labels::STATE => state
                )
            };
            let group = [(labels::GROUP, self.group.clone())];
            DestinationMetrics {
                open: ::metrics::gauge!(DESTINATIONS_OPEN, &group),
                transitions: BREAKER_STATES.map(transition),
                untracked: ::metrics::counter!(DESTINATIONS_UNTRACKED, &group),
            }
        })
    }

    /// A destination's breaker entered the state of index `state` in [`BREAKER_STATES`];
    /// `open` destinations changed by `open_delta`.
    pub(crate) fn destination_transition(&self, state: usize, open_delta: i64) {
        let m = self.destinations();
        m.transitions[state.min(BREAKER_STATES.len() - 1)].increment(1);
        if open_delta != 0 {
            m.open.increment(open_delta as f64);
        }
    }

    /// `n` destinations that were open were forgotten (idle past the expiry).
    pub(crate) fn destination_forgotten(&self, n: usize) {
        self.destinations().open.decrement(n as f64);
    }

    /// A destination's failure could not be tracked.
    pub(crate) fn destination_untracked(&self) {
        self.destinations().untracked.increment(1);
    }

    /// Registers the destinations' handles (none open): call when a consumer with
    /// destinations starts.
    pub(crate) fn destinations_start(&self) {
        self.destinations().open.set(0.0);
    }

    /// Registers the breaker's handles (state `0`): call when a consumer with a breaker
    /// starts.
    pub(crate) fn breaker_start(&self) {
        self.breaker().state.set(0.0);
    }

    /// Registers the consumer-wide handles (and the descriptions): call when it starts.
    pub(crate) fn start(&self) {
        self.consumer();
        self.in_flight();
    }

    /// Registers the handles of a queue-mode consumer (no commits, no connection state).
    #[cfg(feature = "queue")]
    pub(crate) fn start_queue(&self) {
        describe();
        self.in_flight();
    }

    /// The handles of a record's topic. The records of a topic share its name
    /// (`RawRecord::topic`): found by the name's address first, without reading the name
    /// (the thread that reads records writes its count for each).
    fn topic(&self, topic: &Arc<str>) -> TopicRef<'_> {
        match self.topics.iter().find(|e| e.is(topic)) {
            Some(e) => self.cached(e),
            None => self.topic_named(topic, |e| e.share(topic)),
        }
    }

    /// The handles of `topic`, found by its name; `found` is told the entry found.
    fn topic_named(&self, topic: &str, found: impl FnOnce(&TopicEntry)) -> TopicRef<'_> {
        match self.topics.iter().find(|e| *e.name == *topic) {
            Some(e) => {
                found(e);
                self.cached(e)
            }
            // Not subscribed (cannot happen with exact topic names): correct labels, no cache.
            None => TopicRef::Own(Box::new(TopicMetrics::new(
                SharedString::from(topic.to_owned()),
                self.group.clone(),
                self.queue,
            ))),
        }
    }

    fn cached<'a>(&self, e: &'a TopicEntry) -> TopicRef<'a> {
        TopicRef::Cached(e.metrics.get_or_init(|| {
            TopicMetrics::new(
                SharedString::from(String::from(&*e.name)),
                self.group.clone(),
                self.queue,
            )
        }))
    }

    /// The handles for one record's metrics; marks it in flight until dropped.
    pub(crate) fn record(&self, topic: &Arc<str>) -> RecordMetrics<'_> {
        let in_flight = self.in_flight();
        in_flight.increment(1.0);
        RecordMetrics {
            topic: self.topic(topic),
            counts: &self.counts,
            in_flight,
        }
    }

    /// Counts a polled batch (per topic, one increment per batch).
    pub(crate) fn consumed<'r>(&self, batch: impl IntoIterator<Item = &'r RawRecord>) {
        let mut run: Option<(&Arc<str>, u64)> = None;
        for record in batch {
            match &mut run {
                // A topic's records share its name (`RawRecord::topic`), and `Arc<str>`'s
                // equality compares pointers before contents.
                Some((topic, n)) if **topic == record.topic => {
                    *n += 1;
                }
                _ => {
                    if let Some((topic, n)) = run.replace((&record.topic, 1)) {
                        self.topic(topic).consumed.increment(n);
                    }
                }
            }
        }
        if let Some((topic, n)) = run {
            self.topic(topic).consumed.increment(n);
        }
    }

    /// Counts `n` records received from `topic` (queue mode: one topic per consumer).
    #[cfg(feature = "queue")]
    pub(crate) fn consumed_from(&self, topic: &str, n: u64) {
        self.topic_named(topic, |_| {}).consumed.increment(n);
    }

    /// Records one synchronous commit.
    pub(crate) fn commit(&self, took: Duration, ok: bool) {
        let m = self.consumer();
        m.commit_duration.record(took.as_secs_f64());
        if !ok {
            m.commit_failures.increment(1);
        }
    }

    fn partition_gauge(&self, name: &'static str, topic: &str, partition: i32) -> Gauge {
        ::metrics::gauge!(
            name,
            labels::TOPIC => topic.to_owned(),
            labels::GROUP => self.group.clone(),
            labels::PARTITION => partition.to_string()
        )
    }

    /// Sets the paused gauge of a partition (flow control changes are rare: no cache).
    pub(crate) fn partition_paused(&self, topic: &str, partition: i32, paused: bool) {
        self.partition_gauge(PARTITION_PAUSED, topic, partition)
            .set(if paused { 1.0 } else { 0.0 });
    }

    /// Sets the lag gauge of a partition.
    pub(crate) fn consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.partition_gauge(CONSUMER_LAG, topic, partition)
            .set(lag as f64);
    }

    /// A partition left this consumer: its gauges go to zero here.
    pub(crate) fn partition_revoked(&self, topic: &str, partition: i32) {
        self.consumer_lag(topic, partition, 0);
        self.partition_paused(topic, partition, false);
    }
}

/// A subscribed topic's metric handles, and the name its records share.
#[derive(Debug)]
struct TopicEntry {
    name: Box<str>,
    /// The shared name of the first record found by its text: later records of the topic
    /// are found by its address alone. Kept alive here, so no other name takes its address.
    shared: OnceLock<Arc<str>>,
    metrics: OnceLock<TopicMetrics>,
}

impl TopicEntry {
    fn new(name: &str) -> Self {
        TopicEntry {
            name: Box::from(name),
            shared: OnceLock::new(),
            metrics: OnceLock::new(),
        }
    }

    /// `topic` is the shared name this entry found before (compares addresses only).
    fn is(&self, topic: &Arc<str>) -> bool {
        self.shared.get().is_some_and(|s| Arc::ptr_eq(s, topic))
    }

    /// Keeps `topic`, this entry's name, as the one its records share (the first kept
    /// stays). Records whose names are not shared (queue mode builds a name per record)
    /// come here every time: nothing is cloned for them once one is kept.
    fn share(&self, topic: &Arc<str>) {
        if self.shared.get().is_none() {
            let _ = self.shared.set(Arc::clone(topic));
        }
    }
}

/// A topic's handles: the consumer's, registered once, or (a topic not subscribed) a set of
/// its own, boxed: a record's [`RecordMetrics`] stays a few words (its future holds it).
enum TopicRef<'a> {
    Cached(&'a TopicMetrics),
    Own(Box<TopicMetrics>),
}

impl std::ops::Deref for TopicRef<'_> {
    type Target = TopicMetrics;

    fn deref(&self) -> &TopicMetrics {
        match self {
            TopicRef::Cached(t) => t,
            TopicRef::Own(t) => t,
        }
    }
}

/// One record's metrics, from [`ConsumerMetrics::record`]. The record counts as in flight
/// until this is dropped.
pub(crate) struct RecordMetrics<'a> {
    topic: TopicRef<'a>,
    counts: &'a OutcomeCounts,
    in_flight: &'a Gauge,
}

impl RecordMetrics<'_> {
    pub(crate) fn handled(&self) {
        self.topic.handled.increment(1);
        self.counts.handled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn duplicate(&self) {
        self.topic.duplicates.increment(1);
        self.counts.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// Attempt `attempt` failed transiently and will be retried.
    pub(crate) fn retried(&self, attempt: u32) {
        let i = (attempt.clamp(1, 10) - 1) as usize;
        self.topic.retried[i]
            .get_or_init(|| {
                self.topic
                    .with_extra(RECORDS_RETRIED, labels::ATTEMPT, ATTEMPT_LABELS[i])
            })
            .increment(1);
        self.counts.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// The sink acknowledged the record's dead letter.
    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        let i = reason_index(reason);
        self.topic.dead_lettered[i]
            .get_or_init(|| {
                self.topic
                    .with_extra(RECORDS_DEAD_LETTERED, labels::KIND, REASONS[i].as_str())
            })
            .increment(1);
        self.counts.dead_lettered[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The record was forwarded to retry tier `tier` (1-based).
    pub(crate) fn forwarded(&self, tier: u32) {
        let i = (tier.max(1) as usize - 1).min(COUNTED_TIERS - 1);
        self.topic.forwarded[i]
            .get_or_init(|| {
                self.topic
                    .with_extra(RECORDS_FORWARDED, labels::TIER, TIER_LABELS[i])
            })
            .increment(1);
        self.counts.forwarded[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A forward to a retry tier failed (it is retried).
    pub(crate) fn forward_failed(&self) {
        self.topic.forward_failures.increment(1);
    }

    /// Code on the record's path panicked (the handler, a codec, the dedup-key function).
    pub(crate) fn panicked(&self) {
        self.topic.panics.increment(1);
        self.counts.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// The record has been in flight longer than the stall threshold (counted once).
    pub(crate) fn stalled(&self) {
        self.topic.stalled.increment(1);
        self.counts.stalled.fetch_add(1, Ordering::Relaxed);
    }

    /// The record was given up unsettled (revoke or shutdown); it will be delivered again.
    pub(crate) fn abandoned(&self) {
        self.topic.abandoned.increment(1);
        self.counts.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dead_letter_write_failed(&self) {
        self.topic.dead_letter_write_failures.increment(1);
    }

    pub(crate) fn store_error(&self, operation: StoreOperation) {
        let i = operation as usize;
        self.topic.store_errors[i]
            .get_or_init(|| {
                self.topic
                    .with_extra(STORE_ERRORS, labels::OPERATION, operation.as_str())
            })
            .increment(1);
    }

    pub(crate) fn handler_duration(&self, took: Duration) {
        self.topic.handler_duration.record(took.as_secs_f64());
    }
}

impl Drop for RecordMetrics<'_> {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// What kind of metric a name is, for [`describe`].
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric's kind, unit and help text (what [`describe`] hands the recorder).
const DESCRIPTIONS: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        RECORDS_CONSUMED,
        Kind::Counter,
        Some(Unit::Count),
        "Records received from Kafka.",
    ),
    (
        RECORDS_HANDLED,
        Kind::Counter,
        Some(Unit::Count),
        "Records whose handler succeeded.",
    ),
    (
        RECORDS_RETRIED,
        Kind::Counter,
        Some(Unit::Count),
        "Transient failures that will be retried, by the attempt that failed.",
    ),
    (
        RECORDS_DEAD_LETTERED,
        Kind::Counter,
        Some(Unit::Count),
        "Dead letters acknowledged by the sink, by failure kind.",
    ),
    (
        DUPLICATES_SKIPPED,
        Kind::Counter,
        Some(Unit::Count),
        "Records skipped because the idempotency store says their work is done.",
    ),
    (
        STORE_ERRORS,
        Kind::Counter,
        Some(Unit::Count),
        "Idempotency store calls that failed, by operation.",
    ),
    (
        DEAD_LETTER_WRITE_FAILURES,
        Kind::Counter,
        Some(Unit::Count),
        "Dead-letter writes that failed (each is retried).",
    ),
    (
        HANDLER_DURATION,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of each handler attempt.",
    ),
    (
        COMMIT_DURATION,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of each synchronous offset commit.",
    ),
    (
        COMMIT_FAILURES,
        Kind::Counter,
        Some(Unit::Count),
        "Offset commits that failed.",
    ),
    (
        RECORDS_IN_FLIGHT,
        Kind::Gauge,
        Some(Unit::Count),
        "Records being handled now.",
    ),
    (
        CONSUMER_LAG,
        Kind::Gauge,
        Some(Unit::Count),
        "Records of an assigned partition not yet committed by the group.",
    ),
    (
        PARTITION_PAUSED,
        Kind::Gauge,
        None,
        "1 while flow control pauses the partition, else 0.",
    ),
    (
        HANDLER_PANICS,
        Kind::Counter,
        Some(Unit::Count),
        "Panics caught on records' paths: handler attempts, codec, dedup-key and outcome observer calls.",
    ),
    (
        RECORDS_STALLED,
        Kind::Counter,
        Some(Unit::Count),
        "Records in flight longer than the stall threshold (counted once each).",
    ),
    (
        RECORDS_ABANDONED,
        Kind::Counter,
        Some(Unit::Count),
        "Records given up unsettled at a revoke or shutdown; they are delivered again.",
    ),
    (
        RECORDS_FORWARDED,
        Kind::Counter,
        Some(Unit::Count),
        "Records forwarded to a retry tier (acknowledged), by tier.",
    ),
    (
        FORWARD_FAILURES,
        Kind::Counter,
        Some(Unit::Count),
        "Forwards to a retry tier that failed (each is retried).",
    ),
    (
        CONNECTION_STATE,
        Kind::Gauge,
        None,
        "1 while the consumer reaches the Kafka cluster, 0 while it does not.",
    ),
    (
        BREAKER_STATE,
        Kind::Gauge,
        None,
        "The outage breaker's state: 0 closed, 1 open, 2 half-open.",
    ),
    (
        BREAKER_TRANSITIONS,
        Kind::Counter,
        Some(Unit::Count),
        "Outage breaker transitions, by the state entered.",
    ),
    (
        BREAKER_HELD_FAILURES,
        Kind::Counter,
        Some(Unit::Count),
        "Failed calls the open breaker absorbed: no attempt used, nothing dead-lettered.",
    ),
    (
        DESTINATIONS_OPEN,
        Kind::Gauge,
        None,
        "Destinations whose breaker is open or half-open now.",
    ),
    (
        DESTINATION_TRANSITIONS,
        Kind::Counter,
        Some(Unit::Count),
        "Destination breaker transitions, by the state entered.",
    ),
    (
        DESTINATIONS_UNTRACKED,
        Kind::Counter,
        Some(Unit::Count),
        "Failures of destinations that could not be tracked (the cap was reached): not isolated.",
    ),
];

/// Describes every metric to the installed recorder (help texts and units).
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
        }
    }
}

/// Every metric name kourier registers, in the order of the table in the module docs.
///
/// For checks outside the crate: dashboards, alert rules and recording rules that name
/// kourier's metrics can be tested against this list (kourier's own `tests/ops_assets.rs`
/// does so for the `mail_notifier` example's Grafana dashboard and Prometheus rules).
/// Histograms appear under their base name; Prometheus exporters add `_bucket`, `_sum` and
/// `_count` series.
pub const METRIC_NAMES: &[&str] = &[
    RECORDS_CONSUMED,
    RECORDS_HANDLED,
    RECORDS_RETRIED,
    RECORDS_DEAD_LETTERED,
    DUPLICATES_SKIPPED,
    STORE_ERRORS,
    DEAD_LETTER_WRITE_FAILURES,
    HANDLER_DURATION,
    COMMIT_DURATION,
    COMMIT_FAILURES,
    RECORDS_IN_FLIGHT,
    CONSUMER_LAG,
    PARTITION_PAUSED,
    HANDLER_PANICS,
    RECORDS_STALLED,
    RECORDS_ABANDONED,
    RECORDS_FORWARDED,
    FORWARD_FAILURES,
    CONNECTION_STATE,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    BREAKER_HELD_FAILURES,
    DESTINATIONS_OPEN,
    DESTINATION_TRANSITIONS,
    DESTINATIONS_UNTRACKED,
];

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn every_metric_is_described_once() {
        let mut described: Vec<&str> = super::DESCRIPTIONS.iter().map(|d| d.0).collect();
        let mut named: Vec<&str> = super::METRIC_NAMES.to_vec();
        described.sort_unstable();
        named.sort_unstable();
        assert_eq!(described, named);
    }

    use super::*;

    fn handles_of(m: &ConsumerMetrics, topic: &Arc<str>) -> Option<*const TopicMetrics> {
        match m.topic(topic) {
            TopicRef::Cached(t) => Some(std::ptr::from_ref(t)),
            TopicRef::Own(_) => None,
        }
    }

    /// A record's topic is found by its shared name's address once found by its text; a name
    /// of the same text elsewhere finds the same handles, another topic's name its own.
    #[test]
    fn a_topic_is_found_by_the_address_of_its_shared_name() {
        let m = ConsumerMetrics::new("g", &["a".to_owned(), "b".to_owned()]);
        let (b, b_elsewhere): (Arc<str>, Arc<str>) = (Arc::from("b"), Arc::from("b"));
        let b_handles = handles_of(&m, &b).expect("a subscribed topic's handles are cached");
        assert!(m.topics[1].is(&b), "the first shared name is kept");
        assert!(!m.topics[1].is(&b_elsewhere), "addresses, not text");
        assert_eq!(handles_of(&m, &b), Some(b_handles));
        assert_eq!(handles_of(&m, &b_elsewhere), Some(b_handles));
        let a: Arc<str> = Arc::from("a");
        let a_handles = handles_of(&m, &a).expect("cached");
        assert_ne!(a_handles, b_handles, "each topic its own handles");
        assert_eq!(handles_of(&m, &a), Some(a_handles));
        assert_eq!(
            handles_of(&m, &Arc::from("c")),
            None,
            "not subscribed: not cached"
        );
    }

    #[test]
    fn dead_letter_counts_add_up() {
        let counts = OutcomeCounts::default();
        counts.dead_lettered[reason_index(DeadLetterReason::Permanent)]
            .fetch_add(2, Ordering::Relaxed);
        counts.dead_lettered[reason_index(DeadLetterReason::Decode)]
            .fetch_add(1, Ordering::Relaxed);
        let d = counts.dead_lettered();
        assert_eq!((d.decode, d.permanent, d.retries_exhausted), (1, 2, 0));
        assert_eq!(d.total(), 3);
        assert_eq!(d.of(DeadLetterReason::Permanent), 2);
    }

    /// One row of the module docs' metrics table: type, label names, and the label values
    /// the meaning names (between backticks).
    struct DocRow {
        kind: String,
        labels: BTreeSet<String>,
        meaning: String,
    }

    fn doc_table() -> BTreeMap<String, DocRow> {
        let mut rows = BTreeMap::new();
        for line in include_str!("metrics.rs").lines() {
            let Some(row) = line.strip_prefix("//! | `kourier_") else {
                continue;
            };
            let cells: Vec<&str> = row.split(" | ").collect();
            let name = format!("kourier_{}", cells[0].trim_end_matches('`'));
            let labels = cells[2]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .filter(|l| !l.is_empty())
                .collect();
            let row = DocRow {
                kind: cells[1].to_owned(),
                labels,
                meaning: cells[3].to_owned(),
            };
            assert!(rows.insert(name.clone(), row).is_none(), "{name} twice");
        }
        rows
    }

    /// A polled batch is counted per topic, each run of a topic's records once (records of
    /// one topic that are not adjacent count toward it all the same).
    #[test]
    fn a_polled_batch_is_counted_per_topic() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            let m = ConsumerMetrics::new("g", &["a".to_owned(), "b".to_owned()]);
            let batch: Vec<RawRecord> = ["a", "a", "b", "a", "b", "b", "b"]
                .into_iter()
                .map(|t| RawRecord::builder(t).build())
                .collect();
            m.consumed(&batch);
        });
        let mut counts = BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if key.key().name() == RECORDS_CONSUMED
                && let DebugValue::Counter(n) = value
            {
                let topic = key.key().labels().find(|l| l.key() == labels::TOPIC);
                counts.insert(topic.map(|l| l.value().to_owned()), n);
            }
        }
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [(Some("a".to_owned()), 3), (Some("b".to_owned()), 4)]
        );
    }

    /// Every metric the code registers, with its type, label names and the values of its
    /// enumerated labels, is the module docs' table: no metric, label or label value left out
    /// (the dead-letter `kind` `panic` once was).
    #[test]
    fn the_docs_table_is_what_the_code_registers() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            let m = ConsumerMetrics::new("g", &["t".to_owned()]);
            m.start();
            m.breaker_start();
            for state in 0..BREAKER_STATES.len() {
                m.breaker_transition(state);
            }
            m.breaker_held_failure();
            m.destinations_start();
            for state in 0..BREAKER_STATES.len() {
                m.destination_transition(state, 0);
            }
            m.destination_untracked();
            m.commit(Duration::from_millis(1), false);
            m.connection_state(true);
            m.consumed(&[RawRecord::builder("t").build()]);
            m.consumer_lag("t", 0, 1);
            m.partition_paused("t", 0, true);
            let r = m.record(&Arc::from("t"));
            r.handled();
            r.duplicate();
            (1..=11).for_each(|a| r.retried(a));
            REASONS.into_iter().for_each(|k| r.dead_lettered(k));
            (1..=17).for_each(|t| r.forwarded(t));
            r.forward_failed();
            r.panicked();
            r.stalled();
            r.abandoned();
            r.dead_letter_write_failed();
            use StoreOperation::*;
            for operation in [Claim, Complete, Release, Renew] {
                r.store_error(operation);
            }
            r.handler_duration(Duration::from_millis(1));
        });

        // name → (type, label names, values of each label)
        let mut seen: BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)> =
            BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let kind = match value {
                DebugValue::Counter(_) => "counter",
                DebugValue::Gauge(_) => "gauge",
                DebugValue::Histogram(_) => "histogram",
            };
            let entry = seen
                .entry(key.key().name().to_owned())
                .or_insert_with(|| (kind.to_owned(), BTreeMap::new()));
            for label in key.key().labels() {
                entry
                    .1
                    .entry(label.key().to_owned())
                    .or_default()
                    .insert(label.value().to_owned());
            }
        }
        let registered: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
        let listed: BTreeSet<&str> = METRIC_NAMES.iter().copied().collect();
        assert_eq!(registered, listed, "registered metrics vs METRIC_NAMES");

        let docs = doc_table();
        let documented: BTreeSet<&str> = docs.keys().map(String::as_str).collect();
        assert_eq!(
            registered, documented,
            "registered metrics vs the docs table"
        );
        for (name, (kind, labels)) in &seen {
            let row = &docs[name];
            assert_eq!(&row.kind, kind, "{name}: type");
            let names: BTreeSet<String> = labels.keys().cloned().collect();
            assert_eq!(row.labels, names, "{name}: label names");
            // Labels with a closed set of values: the docs name every value.
            for enumerated in [labels::KIND, labels::OPERATION, labels::STATE] {
                for value in labels.get(enumerated).into_iter().flatten() {
                    assert!(
                        row.meaning.contains(&format!("`{value}`")),
                        "{name}: the docs do not name {enumerated} `{value}`"
                    );
                }
            }
        }
    }
}
