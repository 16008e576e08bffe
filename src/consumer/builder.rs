//! [`RetryingConsumerBuilder`]: every setting of a [`RetryingConsumer`], validated by `build()`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use serde::de::DeserializeOwned;

use super::retrying_consumer::RetryingConsumer;
use crate::clock;
use crate::codec::{Codec, JsonCodec};
use crate::consumer::breaker::{Breaker, BreakerPolicy, OutageGate};
use crate::consumer::dedup::{Dedup, DedupKey};
use crate::consumer::poll::KourierContext;
use crate::consumer::poll::PollSettings;
use crate::consumer::poll::{Provisioning, StartupSettings};
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::{Limits, ProcessingOrder, Scheduler};
use crate::consumer::work::WorkerContext;
use crate::consumer::work::{OutcomeObserver, RecordOutcome};
use crate::dead_letter::{DeadLetterSink, KafkaDeadLetterSink};
use crate::error::{ConfigError, Error, Result};
use crate::handler::Handler;
use crate::idempotency::IdempotencyStore;
use crate::message::Message;
use crate::metrics::ConsumerMetrics;
use crate::producer::ProducerSettings;
use crate::record::RawRecord;
use crate::retry::RetryPolicy;
use crate::tiers::RetryTiers;
use crate::tiers::runtime::Tiers;

/// Settings kourier owns: a raw `kafka_config` may not change them.
const OWNED_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "enable.auto.commit",
        "false",
        "kourier commits only settled offsets itself; auto-commit would commit records still in flight",
    ),
    (
        "enable.auto.offset.store",
        "false",
        "kourier stores offsets only when records are settled",
    ),
];

/// Settings with a builder method of their own: a raw `kafka_config` may not set them, so each
/// has one place (the dead-letter producer, the topic admin and the dedup namespace use the
/// setter's value too).
const SETTER_SETTINGS: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "set the brokers with bootstrap_servers(), not kafka_config()",
    ),
    (
        "group.id",
        "set the consumer group with group_id(), not kafka_config()",
    ),
];

type DedupSetting<T> = (Arc<dyn IdempotencyStore>, DedupKey<T>);

/// librdkafka's `max.poll.interval.ms` when it is not set.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Builds a [`RetryingConsumer`]. Start with [`RetryingConsumer::builder`].
///
/// Required: [`bootstrap_servers`](Self::bootstrap_servers), [`group_id`](Self::group_id) and
/// at least one [`topic`](Self::topic). Everything else has a default matching the starting
/// design (500 ms × 3 retries, partition ordering, dead letters to `<topic>.dlt`).
///
/// ```no_run
/// use std::time::Duration;
/// use kourier::{handler_fn, Message, ProcessingOrder, RetryPolicy, RetryingConsumer};
///
/// # async fn demo() -> kourier::Result<()> {
/// let handler = handler_fn(|m: Message<serde_json::Value>| async move {
///     println!("{}", m.event());
///     Ok(())
/// });
/// let consumer = RetryingConsumer::builder(handler)
///     .bootstrap_servers("127.0.0.1:9092")
///     .group_id("notifier")
///     .topic("notify.v1")
///     .ordering(ProcessingOrder::Key)
///     .max_in_flight(64)
///     .retry_policy(RetryPolicy::fixed(Duration::from_millis(500), 3))
///     .build()?;
/// consumer.run_until_signal().await?;
/// # Ok(())
/// # }
/// ```
///
/// # Durations
///
/// Every duration is bounded where it enters (delivery rule 17 in the crate docs), so that no
/// deadline computed from it can overflow a clock: `Duration::MAX` is a valid way to say
/// "never" where the table says so, and no setting or hint makes the consumer panic. Above
/// its bound a duration is *taken as the bound* (clamped) or *refused* by `build()` with
/// [`ConfigError::Invalid`] naming the setting, as listed; the getters return what is kept.
///
/// | duration | default | zero | bound | above the bound |
/// |---|---|---|---|---|
/// | [`shutdown_timeout`](Self::shutdown_timeout) | 30 s | records are given up at once | 1 year | taken as 1 year |
/// | [`revoke_timeout`](Self::revoke_timeout) | 30 s | records are given up at once | below `max.poll.interval.ms` (librdkafka's default 300 s when not set) | refused: the member would be put out of its group |
/// | [`startup_timeout`](Self::startup_timeout) | 30 s | refused | 1 year | taken as 1 year |
/// | [`stall_threshold`](Self::stall_threshold) | 60 s | refused | 1 year | taken as 1 year (`Duration::MAX` turns it off) |
/// | [`commit_interval`](Self::commit_interval) | 1 s | refused | 1 year | taken as 1 year (commits still happen on revoke and shutdown) |
/// | [`error_log_interval`](Self::error_log_interval) | 30 s | refused | 1 year | taken as 1 year |
/// | [`max_broker_outage`](Self::max_broker_outage) | none | refused | 1 year | taken as 1 year |
/// | [`handler_timeout`](Self::handler_timeout) | none | refused | 1 year, and below `idempotency_lease` with idempotency | taken as 1 year; not below the lease: refused |
/// | [`idempotency_lease`](Self::idempotency_lease) | 60 s | refused | 1 year | taken as 1 year |
/// | [`idempotency_ttl`](Self::idempotency_ttl) | 6 h | refused | 1 year | taken as 1 year |
/// | [`RetryPolicy`] delays: `fixed`, `exponential` (initial, max), `with_max_elapsed` | 500 ms fixed | retries at once | 1 year | taken as 1 year |
/// | a handler's [`retry_after`](crate::HandlerError::retry_after) hint | none | no wait | 1 day ([`HandlerError::MAX_RETRY_AFTER`](crate::HandlerError::MAX_RETRY_AFTER)) | taken as 1 day: a hint is untrusted input (it often comes from a downstream's reply) |
/// | [`BreakerPolicy::with_open_interval`] (initial, max) | 5 s, 60 s | refused | 1 day ([`BreakerPolicy::MAX_OPEN_INTERVAL`]) | taken as 1 day |
/// | [`RetryTiers`] delays | none | refused | 30 days ([`RetryTiers::MAX_DELAY`]) | refused: past a topic's usual retention the record is deleted before it is due |
///
/// A breaker opened by failures that hint `retry_after` stays open for the longer of its
/// interval and the hint, so at most a day.
///
/// # librdkafka settings
///
/// The consumer's librdkafka client gets these settings. [`kafka_config`](Self::kafka_config)
/// passes any other property through, and may override the defaults; `build()` refuses a raw
/// setting that would take a setter's place or change what kourier owns, with a
/// [`ConfigError::Conflict`] naming it.
///
/// | property | value | why | via `kafka_config` |
/// |---|---|---|---|
/// | `bootstrap.servers` | [`bootstrap_servers`](Self::bootstrap_servers) | also used by the default dead-letter sink, topic checks and error messages, so it has one source | refused: use the setter |
/// | `group.id` | [`group_id`](Self::group_id) | also namespaces dedup keys and is written into dead letters | refused: use the setter |
/// | `enable.auto.commit` | `false` | kourier commits only settled offsets itself; auto-commit would commit records still in flight | owned: only `false` accepted |
/// | `enable.auto.offset.store` | `false` | offsets are stored only when a record and every lower one of its partition are settled | owned: only `false` accepted |
/// | `auto.offset.reset` | `earliest` | a new group (or one whose offsets expired) starts at the oldest record rather than skipping what was published before it joined; at-least-once by default | overridable (`latest` skips the backlog) |
/// | `enable.partition.eof` | `false` | kourier does not use end-of-partition events (it would only skip them) | overridable |
/// | `queued.max.messages.kbytes` | `16384` (16 MiB) | bounds librdkafka's own pre-fetch queue (librdkafka's default is 64 MiB per consumer) next to kourier's buffer limits | overridable |
/// | `fetch.max.bytes` | `16777216` (16 MiB) | bounds one fetch response, librdkafka's other large buffer (its default is 50 MiB); see *Memory* below | overridable |
/// | `fetch.queue.backoff.ms` | `20` | how long librdkafka waits to fetch again when that queue is full; its default (1 s) makes a consumer with a bounded queue idle (librdkafka #3662) | overridable |
/// | `statistics.interval.ms` | `5000` | librdkafka's statistics feed the consumer-lag gauge and [`ConsumerSnapshot`](crate::ConsumerSnapshot) lag; `0` turns them (and lag) off | overridable |
///
/// `max.poll.interval.ms` may be set; [`revoke_timeout`](Self::revoke_timeout) must be below
/// it (below librdkafka's default, 300 000 ms, when it is not set). The default dead-letter producer and the topic
/// admin get the raw `security.*`, `sasl.*` and `ssl.*` settings too.
///
/// # Memory
///
/// A consumer's memory is bounded by its settings. Its peak resident size stays below
///
/// ```text
///   kourier's buffer     min(max_buffered_bytes, max_buffered_records × record bytes) + one record
/// + records in flight    max_in_flight × record bytes (running, or parked in a retry back-off)
/// + librdkafka's queue   queued.max.messages.kbytes                (16 MiB by default)
/// + fetch responses      fetch.max.bytes × brokers fetched from     (16 MiB by default)
/// + a constant           ≈ 72 MiB: the Tokio runtime, librdkafka's threads and metadata,
///                        the dead-letter producer, the idempotency store's client, code
///                        and allocator slack
/// ```
///
/// where *record bytes* is what the buffer charges a record: key + value + header names and
/// values + topic name + 64. With the defaults, one broker and small records (≤ 1 KiB)
/// that is about 110–120 MiB; `cargo bench --bench throughput` measures peak RSS against this formula.
/// Large records raise the first two terms, not the rest: librdkafka's queue and fetch are
/// bounded in bytes.
pub struct RetryingConsumerBuilder<H: Handler> {
    handler: H,
    codec: Arc<dyn Codec<H::Event>>,
    bootstrap_servers: Option<String>,
    group_id: Option<String>,
    topics: Vec<String>,
    policy: RetryPolicy,
    ordering: ProcessingOrder,
    max_in_flight: usize,
    max_buffered_records: usize,
    max_buffered_bytes: usize,
    max_buffered_records_per_partition: usize,
    sink: Option<Arc<dyn DeadLetterSink>>,
    dedup: Option<DedupSetting<H::Event>>,
    dedup_lease: Duration,
    dedup_ttl: Duration,
    dedup_without_store_on_outage: bool,
    commit_interval: Duration,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    revoke_timeout: Duration,
    max_poll_batch: usize,
    kafka_config: BTreeMap<String, String>,
    startup_timeout: Duration,
    wait_for_topics: bool,
    create_missing_topics: Option<i32>,
    max_broker_outage: Option<Duration>,
    error_log_interval: Duration,
    stall_threshold: Duration,
    observer: Option<OutcomeObserver>,
    max_uncommitted_per_partition: usize,
    retry_panics: bool,
    breaker: Option<BreakerPolicy>,
    tiers: Option<RetryTiers>,
}

impl<H: Handler> fmt::Debug for RetryingConsumerBuilder<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingConsumerBuilder")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("policy", &self.policy)
            .field("ordering", &self.ordering)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> RetryingConsumer<H> {
    /// Starts a builder for `handler`, decoding values as JSON.
    pub fn builder(handler: H) -> RetryingConsumerBuilder<H>
    where
        H::Event: DeserializeOwned,
    {
        RetryingConsumerBuilder::with_codec(handler, JsonCodec::<H::Event>::new())
    }
}

impl<H: Handler> RetryingConsumerBuilder<H> {
    /// Starts a builder for `handler` with a custom [`Codec`].
    pub fn with_codec(handler: H, codec: impl Codec<H::Event>) -> Self {
        RetryingConsumerBuilder {
            handler,
            codec: Arc::new(codec),
            bootstrap_servers: None,
            group_id: None,
            topics: Vec::new(),
            policy: RetryPolicy::default(),
            ordering: ProcessingOrder::default(),
            max_in_flight: 64,
            max_buffered_records: 10_000,
            max_buffered_bytes: 64 << 20,
            max_buffered_records_per_partition: 5_000,
            sink: None,
            dedup: None,
            dedup_lease: Duration::from_secs(60),
            dedup_ttl: Duration::from_secs(6 * 3600),
            dedup_without_store_on_outage: false,
            commit_interval: Duration::from_secs(1),
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
            revoke_timeout: Duration::from_secs(30),
            max_poll_batch: 500,
            kafka_config: BTreeMap::new(),
            startup_timeout: Duration::from_secs(30),
            wait_for_topics: false,
            create_missing_topics: None,
            max_broker_outage: None,
            error_log_interval: Duration::from_secs(30),
            stall_threshold: Duration::from_secs(60),
            observer: None,
            max_uncommitted_per_partition: 10_000,
            retry_panics: true,
            breaker: None,
            tiers: None,
        }
    }

    /// Kafka brokers, `host:port[,host:port...]`. Required.
    #[must_use]
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap_servers = Some(servers.into());
        self
    }

    /// The consumer group. Required. It also namespaces dedup keys, so two services with
    /// their own groups dedup independently.
    #[must_use]
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = Some(group_id.into());
        self
    }

    /// Adds a topic to consume. At least one is required.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Adds several topics to consume.
    #[must_use]
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Replaces the codec.
    #[must_use]
    pub fn codec(mut self, codec: impl Codec<H::Event>) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// How transient failures are retried. Default: 500 ms fixed, 3 retries (4 attempts).
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How records may run in parallel ([`ProcessingOrder`]). Default:
    /// [`ProcessingOrder::Partition`]. The setter keeps the name `ordering`: it reads as
    /// `.ordering(ProcessingOrder::Key)` and did not collide with anything.
    #[must_use]
    pub fn ordering(mut self, ordering: ProcessingOrder) -> Self {
        self.ordering = ordering;
        self
    }

    /// Records handled at once, across all partitions. Default 64.
    ///
    /// A record waiting out a retry back-off holds no slot: it is parked (its key's or
    /// partition's later records still wait behind it) and the slot runs other records
    /// meanwhile; when its back-off is over it takes the next free slot before any new
    /// record. So with many records in back-off more than `n` records can be *held* at
    /// once, but never more than `n` *run* at once.
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Records received but not started, across all partitions. At this limit the poll
    /// thread stops pulling records in bulk (the rest wait in librdkafka's bounded pre-fetch
    /// queue) while it keeps polling slowly to stay in the group; if handlers are stuck and
    /// the buffer still grows 10 % past the limit, partitions holding buffered records are
    /// paused until it is below half. Default 10 000.
    #[must_use]
    pub fn max_buffered_records(mut self, n: usize) -> Self {
        self.max_buffered_records = n;
        self
    }

    /// Bytes (keys, values, headers) received but not started. Default 64 MiB.
    #[must_use]
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.max_buffered_bytes = n;
        self
    }

    /// Records buffered for one partition before that partition is paused (resumed below
    /// half), once it has held them for half a second: a fast partition's fetch response
    /// overshoots the limit and drains within milliseconds, and pausing it would make
    /// librdkafka drop and fetch again what it pre-fetched. The total buffer limits
    /// (`max_buffered_records`, `max_buffered_bytes`) hold at all times. Default 5 000.
    #[must_use]
    pub fn max_buffered_records_per_partition(mut self, n: usize) -> Self {
        self.max_buffered_records_per_partition = n;
        self
    }

    /// Where dead letters go. Default: a [`KafkaDeadLetterSink`] writing to `<topic>.dlt`
    /// on the same brokers (with the `security.*`, `sasl.*` and `ssl.*` settings given to
    /// [`kafka_config`](Self::kafka_config)).
    #[must_use]
    pub fn dead_letter_sink(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Turns on idempotency: before each attempt the record's dedup key is claimed in
    /// `store`; records whose key is done are skipped. A record without a dedup key is
    /// handled without idempotency (logged at debug level).
    ///
    /// In partition and key order a lane runs one record at a time, so a claim per record
    /// would put a store round trip between every two records of a lane. Instead, a record
    /// that claims its key also claims the keys of the next records queued in its lane (up
    /// to 32, in the same batch call) and each of them takes its claim when its turn comes.
    /// Such a claim is taken only within a third of the
    /// [lease](Self::idempotency_lease) and only if no store call failed since it was
    /// fetched; claims a record never takes (its partition revoked, the consumer stopping,
    /// the record ending early) are released. At a revoke, a sweeper that looks every 0.1 s
    /// takes them out of use and releases them one store call after another: a revoked
    /// partition's keys are free again within 0.1 s plus one release round trip per claim
    /// (up to 32 per lane), and a claim whose release fails runs out with its lease. Dedup
    /// keys from a function are then computed (the record decoded) before the record runs.
    #[must_use]
    pub fn idempotency(
        mut self,
        store: Arc<dyn IdempotencyStore>,
        key: DedupKey<H::Event>,
    ) -> Self {
        self.dedup = Some((store, key));
        self
    }

    /// Turns on idempotency like [`idempotency`](Self::idempotency), the dedup key computed
    /// from the decoded message by `key` (`None`: the record is handled without dedup). The
    /// closure's parameter type is inferred, unlike `DedupKey::from_fn`'s in that position:
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use kourier::{handler_fn, InMemoryIdempotencyStore, Message, RetryingConsumer};
    /// # #[derive(serde::Deserialize)] struct Ev { event_id: String }
    /// # let handler = handler_fn(|_m: Message<Ev>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler)
    ///     .idempotency_key_fn(Arc::new(InMemoryIdempotencyStore::new()), |m| {
    ///         Some(m.event().event_id.clone())
    ///     });
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn idempotency_key_fn<F>(self, store: Arc<dyn IdempotencyStore>, key: F) -> Self
    where
        F: Fn(&Message<H::Event>) -> Option<String> + Send + Sync + 'static,
    {
        self.idempotency(store, DedupKey::from_fn(key))
    }

    /// Calls `observer` once for each record a worker took, when it ends: with the record
    /// (its coordinates, key, headers) and how it ended — [`RecordOutcome::Handled`],
    /// [`Duplicate`](RecordOutcome::Duplicate), [`DeadLettered`](RecordOutcome::DeadLettered)
    /// with the failure kind (after the sink acknowledged the letter),
    /// [`Forwarded`](RecordOutcome::Forwarded) to a retry tier (acknowledged),
    /// [`Abandoned`](RecordOutcome::Abandoned) at a revoke or shutdown, or
    /// [`LeftForLater`](RecordOutcome::LeftForLater) (a tier record still waiting for its due
    /// time at a revoke or shutdown). Records dropped from
    /// the buffers at a revoke never reached a worker and are not reported (they are
    /// delivered again).
    ///
    /// The observer runs on the worker, synchronously, before the record is reported
    /// settled: keep it short (a counter, a `try_send` on a channel, a log line), never block
    /// or wait on I/O; each call delays that record's commit (and, in partition order, the
    /// next record of its partition, unless the record had released its lane already: a
    /// record whose key is being marked done or whose dead letter awaits the broker's
    /// acknowledgement lets the next record start, so calls for one partition can come out
    /// of offset order). A panicking observer is logged and counted
    /// (`kourier_handler_panics_total`); the record keeps its outcome. Calls come from
    /// several workers at once, so the observer is `Send + Sync`.
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, Message, RecordOutcome, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler).on_outcome(|record, outcome| {
    ///     if let RecordOutcome::DeadLettered(kind) = outcome {
    ///         eprintln!("{} dead-lettered: {kind}", record.coordinates());
    ///     }
    /// });
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn on_outcome<F>(mut self, observer: F) -> Self
    where
        F: Fn(&RawRecord, RecordOutcome) + Send + Sync + 'static,
    {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// How long a claim holds a key without renewal. Default 60 s.
    ///
    /// While a handler attempt runs, the consumer renews its claim every third of the lease
    /// ([`IdempotencyStore::renew`](crate::IdempotencyStore::renew)), so a handler may run
    /// longer than the lease and still hold the key: another consumer claiming the same
    /// event meanwhile is answered busy and waits. The lease is how long a key stays held after its holder *stopped* renewing: a
    /// crashed consumer, a partition whose assignment was lost (renewal stops at once; the
    /// new owner waits at most one lease), or a store outage long enough that two renewals in
    /// a row fail. Shorter leases hand such keys over sooner; longer ones ride out longer
    /// store outages. A renewal that finds the claim lost cancels the running attempt at its
    /// next `.await` (it does not count as an attempt) and the record claims again.
    ///
    /// After the handler succeeded, marking the key done is retried (on store errors) until
    /// the lease, counted from the claim or its last successful renewal, would have run out.
    /// A store that cannot renew (its `renew` answers `StoreError::Unsupported`) keeps the
    /// old behaviour: the lease runs out as set at the claim, so set it above your slowest
    /// handler.
    ///
    /// Zero is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn idempotency_lease(mut self, lease: Duration) -> Self {
        self.dedup_lease = clock::bounded(lease);
        self
    }

    /// How long a done key is remembered. Default 6 h, as in the starting design. Zero is
    /// refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.dedup_ttl = clock::bounded(ttl);
        self
    }

    /// Opt-in: when the idempotency store is unavailable, handle records *without* dedup
    /// instead of waiting for the store (the default). Duplicates become possible while the
    /// store is down; nothing is lost either way.
    #[must_use]
    pub fn run_without_dedup_on_store_outage(mut self, enabled: bool) -> Self {
        self.dedup_without_store_on_outage = enabled;
        self
    }

    /// How often settled offsets are committed. Default 1 s. Commits also happen on revoke
    /// and on shutdown. Zero is refused by `build()`; above one year it is taken as one year
    /// (see [Durations](Self#durations)).
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = clock::bounded(interval);
        self
    }

    /// Bounds each handler attempt: an attempt still running after `timeout` is dropped
    /// (cancelled at its next `.await`) and counts as a transient failure. Default: no
    /// bound. Set one when a stuck call (a hung connection) would otherwise hold its
    /// partition or key forever (with idempotency, a hung attempt also keeps renewing its
    /// claim). With idempotency it must be below the
    /// [`idempotency_lease`](Self::idempotency_lease) (checked by `build()`): then even a
    /// claim that is never renewed (a store that cannot renew, a store outage) outlives its
    /// attempt.
    ///
    /// What it cannot interrupt: code that blocks its thread (no `.await` reached) runs to
    /// its end first — the timeout fires after the effect. Run such code with
    /// [`blocking`](crate::blocking): then the worker stops waiting at the timeout, but the
    /// blocking thread still finishes the attempt.
    ///
    /// Zero is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(clock::bounded(timeout));
        self
    }

    /// How long shutdown waits for in-flight records. Default 30 s. Zero gives them up at
    /// once; above one year it is taken as one year (see [Durations](Self#durations)).
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = clock::bounded(timeout);
        self
    }

    /// How long a revoke waits for the revoked partitions' in-flight records. Default 30 s.
    ///
    /// It must be below `max.poll.interval.ms` — the value given to
    /// [`kafka_config`](Self::kafka_config), else librdkafka's default of 300 000 ms (5 min):
    /// the revoke runs on the poll thread, and a member that does not poll for that long is
    /// put out of its group. `build()` refuses a longer one (`Duration::MAX` included) with
    /// [`ConfigError::Invalid`] (`setting: "revoke_timeout"`).
    #[must_use]
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// How long [`run`](RetryingConsumer::run) waits at start for the cluster to answer.
    /// Within it, the consumer also checks that every subscribed topic and every topic its
    /// dead-letter sink writes to exist. Unreachable brokers give
    /// [`Error::BrokersUnreachable`]; missing topics [`Error::MissingTopics`]. Default 30 s.
    /// Zero is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = clock::bounded(timeout);
        self
    }

    /// Opt-in: when topics the consumer needs (subscribed and dead-letter topics) do not
    /// exist at start, wait for them to be created (logging what it waits for once per log
    /// interval) instead of failing with [`Error::MissingTopics`]. The startup timeout then
    /// bounds only how long the cluster may stay unreachable. Default off.
    #[must_use]
    pub fn wait_for_topics(mut self, wait: bool) -> Self {
        self.wait_for_topics = wait;
        self
    }

    /// Opt-in: at start, create the topics the consumer needs that do not exist — each
    /// subscribed topic with `partitions` partitions, and each dead-letter topic of the sink
    /// with the partition count of its source topic (so letters keep their source
    /// partition) — with the broker's default replication factor and settings. Existing
    /// topics are not changed. For anything finer, create them with
    /// [`TopicAdmin`](crate::topics::TopicAdmin) first. Default off: a missing topic is
    /// [`Error::MissingTopics`].
    #[must_use]
    pub fn create_missing_topics(mut self, partitions: i32) -> Self {
        self.create_missing_topics = Some(partitions);
        self
    }

    /// Opt-in: stop with [`Error::BrokersUnreachable`] when the cluster has been unreachable
    /// this long while running (records in flight are given up unsettled, as at a
    /// shutdown). Default: no bound — the consumer waits for the cluster to come back. Zero
    /// is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn max_broker_outage(mut self, outage: Duration) -> Self {
        self.max_broker_outage = Some(clock::bounded(outage));
        self
    }

    /// How often a condition that persists (a broker down, a topic missing) is logged: the
    /// first occurrence at once, then at most once per interval with the count suppressed
    /// since. Default 30 s. It holds for librdkafka's own warnings and errors too, from the
    /// consumer and from every client it creates (the dead-letter producer of the default
    /// sink, the retry-tier producer, the admin client of
    /// [`create_missing_topics`](Self::create_missing_topics)). Zero is refused by `build()`;
    /// above one year it is taken as one year (see [Durations](Self#durations)).
    #[must_use]
    pub fn error_log_interval(mut self, interval: Duration) -> Self {
        self.error_log_interval = clock::bounded(interval);
        self
    }

    /// A record in flight longer than this is logged once (with its coordinates) and
    /// counted in [`metrics::RECORDS_STALLED`](crate::metrics::RECORDS_STALLED) and the
    /// snapshot; nothing else happens to it. Default 60 s.
    ///
    /// To turn it off, pass `Duration::MAX`: above one year it is taken as one year (see
    /// [Durations](Self#durations)), longer than any record stays in flight. Zero is refused
    /// by `build()`.
    #[must_use]
    pub fn stall_threshold(mut self, threshold: Duration) -> Self {
        self.stall_threshold = clock::bounded(threshold);
        self
    }

    /// Records of one partition received past its commit point — running, buffered, or
    /// settled behind a record that is not — before that partition is paused (resumed
    /// below half). Bounds the work a stuck record lets run ahead of the commit point in
    /// key and unordered mode (all of it is handled again if the consumer crashes). Default
    /// 10 000.
    #[must_use]
    pub fn max_uncommitted_per_partition(mut self, n: usize) -> Self {
        self.max_uncommitted_per_partition = n;
        self
    }

    /// Whether a panicking handler attempt is retried like a transient failure (the
    /// default: a panic may come from a passing condition) or dead-lettered at once. Either
    /// way it counts as [`FailureKind::Panic`](crate::FailureKind::Panic), and a record
    /// given up after a panic is dead-lettered as `panic`.
    #[must_use]
    pub fn retry_panics(mut self, retry: bool) -> Self {
        self.retry_panics = retry;
        self
    }

    /// Opt-in: an outage breaker, so that a downstream outage makes records wait instead of
    /// using up their attempts and filling the dead-letter topic (delivery rule 16 in the crate docs). Default:
    /// none.
    ///
    /// When transient failures cross the policy's threshold the breaker *opens*: no new
    /// record is dispatched (the consumer keeps polling and stays in its group; flow control
    /// pauses partitions as their buffers fill), and records whose attempts fail meanwhile
    /// wait in order — their attempts are not counted, they are never dead-lettered for it,
    /// their idempotency claims are released while they wait, and a revoke or shutdown gives
    /// them up at once (delivered again). After the open interval one probe record goes
    /// through: success closes the breaker, failure opens it again for twice as long.
    /// Permanent failures and poison pills are dead-lettered as always.
    /// [`HandlerError::unavailable`](crate::HandlerError::unavailable) is the handler's
    /// explicit "the downstream is down". State and transitions are in
    /// [`ConsumerSnapshot::breaker`](crate::ConsumerSnapshot::breaker), the `kourier_breaker_*`
    /// [metrics](crate::metrics) and one log line per transition. See [`BreakerPolicy`] for
    /// the triggers and defaults; `build()` refuses invalid ones with
    /// [`ConfigError::Invalid`] (`setting: "breaker"`).
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, BreakerPolicy, Message, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler).breaker(BreakerPolicy::default());
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.breaker = Some(policy);
        self
    }

    /// Retry tiers: after the retry policy's in-place attempts, a transient failure is
    /// forwarded to the next tier topic (by default `<topic>.retry.<n>`), runs again there
    /// once due, and reaches the dead-letter topic only after the last tier. The consumer
    /// subscribes to its tier topics too; they must exist at startup like the dead-letter
    /// topics (or be created by [`create_missing_topics`](Self::create_missing_topics), with
    /// the source's partition count). See [`tiers`](crate::tiers) for the record format,
    /// due times, the commit rule and `keep_key_order`. `build()` refuses invalid tiers with
    /// [`ConfigError::Invalid`] (`setting: "retry_tiers"`).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use kourier::{handler_fn, Message, RetryingConsumer, tiers::RetryTiers};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler)
    ///     .retry_tiers(RetryTiers::new([Duration::from_secs(30), Duration::from_secs(300)]));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn retry_tiers(mut self, tiers: RetryTiers) -> Self {
        self.tiers = Some(tiers);
        self
    }

    /// Sets a raw librdkafka consumer property (e.g. `session.timeout.ms`,
    /// `auto.offset.reset`), overriding kourier's default for it (the table in the
    /// [builder docs](Self#librdkafka-settings) lists them). `build()` refuses
    /// `bootstrap.servers` and `group.id` here (use [`bootstrap_servers`](Self::bootstrap_servers)
    /// and [`group_id`](Self::group_id)) and any change to the settings kourier owns
    /// (`enable.auto.commit=false`, `enable.auto.offset.store=false`).
    #[must_use]
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_config.insert(key.into(), value.into());
        self
    }

    /// Validates every setting and creates the consumer (it connects when run).
    ///
    /// # Errors
    /// [`Error::Config`] for a missing or contradictory setting; [`Error::Kafka`] when
    /// librdkafka rejects a property or the dead-letter producer cannot be created.
    pub fn build(self) -> Result<RetryingConsumer<H>> {
        // First: a `group.id` given only through `kafka_config` gets the error that says
        // where it belongs, not "missing group_id".
        self.check_kafka_config()?;
        let (bootstrap, group_id) = self.required_settings()?;
        self.check_limits()?;
        let config = self.client_config(&bootstrap, &group_id);
        let sink = self.dead_letter_sink_or_default(&bootstrap)?;
        let tiers = self.tiers_or_none(&bootstrap, &group_id)?;
        let tier_topics = tiers.as_ref().map(|t| t.topics()).unwrap_or_default();
        let subscribed: Vec<String> = self
            .topics
            .iter()
            .cloned()
            .chain(tier_topics.iter().map(|(_, t)| t.clone()))
            .collect();
        let metrics = Arc::new(ConsumerMetrics::new(&group_id, &subscribed));
        let breaker = self
            .breaker
            .clone()
            .map(|policy| Arc::new(Breaker::new(policy, metrics.clone())));
        let hub = Arc::new(Hub::new(
            Scheduler::new(self.ordering, self.limits()).with_breaker(breaker.clone()),
            self.revoke_timeout,
            metrics.clone(),
            self.error_log_interval,
        ));
        let sink_topics = self
            .topics
            .iter()
            .flat_map(|t| sink.topics_for(t).into_iter().map(|d| (t.clone(), d)))
            .chain(tier_topics)
            .collect();
        let create = self.create_missing_topics.map(|partitions| Provisioning {
            partitions,
            kafka_config: self.security_settings(),
            log_interval: self.error_log_interval,
        });
        let consumer: BaseConsumer<KourierContext> = config
            .create_with_context(KourierContext { hub: hub.clone() })
            .map_err(|e| Error::kafka("create consumer", e))?;
        let settings = PollSettings {
            startup: StartupSettings {
                servers: bootstrap,
                timeout: self.startup_timeout,
                topics: self.topics.clone(),
                sink_topics,
                wait_for_topics: self.wait_for_topics,
                create,
            },
            topics: subscribed,
            commit_interval: self.commit_interval,
            shutdown_timeout: self.shutdown_timeout,
            max_poll_batch: self.max_poll_batch,
            max_broker_outage: self.max_broker_outage,
        };
        let dedup = self.dedup.map(|(store, key)| {
            Dedup::new(
                store,
                key,
                group_id.clone(),
                (self.dedup_lease, self.dedup_ttl),
                self.dedup_without_store_on_outage,
            )
        });
        let worker = Arc::new(WorkerContext {
            handler: Arc::new(self.handler),
            codec: self.codec,
            policy: self.policy,
            sink,
            dedup,
            group_id,
            handler_timeout: self.handler_timeout,
            retry_panics: self.retry_panics,
            stall_threshold: self.stall_threshold,
            metrics,
            observer: self.observer,
            outage: OutageGate(breaker),
            tiers,
        });
        Ok(RetryingConsumer {
            consumer,
            hub,
            worker,
            settings,
        })
    }

    /// The retry tiers, checked, with their forwarding producer.
    fn tiers_or_none(&self, bootstrap: &str, group_id: &str) -> Result<Option<Arc<Tiers>>> {
        let Some(config) = &self.tiers else {
            return Ok(None);
        };
        Tiers::check(config, &self.topics)?;
        if config.ledger.is_some() && self.ordering == ProcessingOrder::Unordered {
            return Err(ConfigError::invalid(
                "retry_tiers",
                "keep_key_order needs Partition or Key ordering, not Unordered",
            )
            .into());
        }
        let mut settings = ProducerSettings::new(bootstrap.to_owned());
        for (k, v) in self.security_settings() {
            settings.set(k, v);
        }
        let producer =
            settings.build_logging_every("kourier-retry-tiers", self.error_log_interval)?;
        Ok(Some(Arc::new(Tiers::new(
            config.clone(),
            &self.topics,
            group_id.to_owned(),
            producer,
        ))))
    }

    /// The bootstrap servers and the group, from their setters (never from the raw settings:
    /// `check_kafka_config` refuses them there).
    fn required_settings(&self) -> Result<(String, String)> {
        let bootstrap = self
            .bootstrap_servers
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or(ConfigError::Missing("bootstrap_servers"))?;
        let group_id = self
            .group_id
            .clone()
            .ok_or(ConfigError::Missing("group_id"))?;
        if group_id.trim().is_empty() {
            return Err(ConfigError::invalid("group_id", "must not be empty").into());
        }
        if self.topics.is_empty() {
            return Err(ConfigError::Missing("topics").into());
        }
        for t in &self.topics {
            crate::topic_name::check(t).map_err(|reason| ConfigError::invalid("topics", reason))?;
        }
        Ok((bootstrap, group_id))
    }

    /// Counts and durations: none may be zero; the retry policy is consistent.
    fn check_limits(&self) -> Result<()> {
        self.policy.validate()?;
        if let Some(breaker) = &self.breaker {
            breaker.validate()?;
        }
        for (setting, value) in [
            ("max_in_flight", self.max_in_flight),
            ("max_buffered_records", self.max_buffered_records),
            ("max_buffered_bytes", self.max_buffered_bytes),
            (
                "max_buffered_records_per_partition",
                self.max_buffered_records_per_partition,
            ),
            ("max_poll_batch", self.max_poll_batch),
            (
                "create_missing_topics",
                self.create_missing_topics
                    .map_or(1, |p| usize::try_from(p).unwrap_or(0)),
            ),
            (
                "max_uncommitted_per_partition",
                self.max_uncommitted_per_partition,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(setting, "must be at least 1").into());
            }
        }
        for (setting, value) in [
            ("commit_interval", self.commit_interval),
            ("idempotency_lease", self.dedup_lease),
            ("idempotency_ttl", self.dedup_ttl),
            ("startup_timeout", self.startup_timeout),
            ("error_log_interval", self.error_log_interval),
            ("stall_threshold", self.stall_threshold),
            (
                "max_broker_outage",
                self.max_broker_outage.unwrap_or(Duration::MAX),
            ),
            (
                "handler_timeout",
                self.handler_timeout.unwrap_or(Duration::MAX),
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(setting, "must be longer than zero").into());
            }
        }
        // An attempt that may outlive its claim's lease lets another consumer claim the same
        // event and run it too: with idempotency, the timeout must end the attempt first.
        if let (Some(timeout), Some(_)) = (self.handler_timeout, &self.dedup)
            && timeout >= self.dedup_lease
        {
            return Err(ConfigError::invalid(
                "handler_timeout",
                format!(
                    "{timeout:?} must be below idempotency_lease ({:?}): an attempt outliving \
                     its lease can run twice",
                    self.dedup_lease
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Raw librdkafka settings: none may change what kourier owns or contradict a setter.
    fn check_kafka_config(&self) -> Result<()> {
        for (key, required, reason) in OWNED_SETTINGS {
            if let Some(v) = self.kafka_config.get(*key)
                && !v.trim().eq_ignore_ascii_case(required)
            {
                return Err(ConfigError::Conflict {
                    key: (*key).to_owned(),
                    value: v.clone(),
                    reason,
                }
                .into());
            }
        }
        for (key, reason) in SETTER_SETTINGS {
            if let Some(raw) = self.kafka_config.get(*key) {
                return Err(ConfigError::Conflict {
                    key: (*key).to_owned(),
                    value: raw.clone(),
                    reason,
                }
                .into());
            }
        }
        // The revoke waits on the poll thread: waiting as long as max.poll.interval.ms gets the
        // member put out of its group. Checked against librdkafka's default when it is not
        // set, so `revoke_timeout(Duration::MAX)` is refused (delivery rule 17).
        let (ms, whose) = match self.kafka_config.get("max.poll.interval.ms") {
            Some(raw) => (
                raw.trim()
                    .parse::<u64>()
                    .map_err(|_| ConfigError::Conflict {
                        key: "max.poll.interval.ms".into(),
                        value: raw.clone(),
                        reason: "not a number of milliseconds",
                    })?,
                "",
            ),
            None => (DEFAULT_MAX_POLL_INTERVAL_MS, ", librdkafka's default"),
        };
        if self.revoke_timeout >= Duration::from_millis(ms) {
            return Err(ConfigError::invalid(
                "revoke_timeout",
                format!(
                    "{:?} must be below max.poll.interval.ms ({ms} ms{whose}): a revoke that \
                     waits that long gets the member put out of its group",
                    self.revoke_timeout
                ),
            )
            .into());
        }
        Ok(())
    }

    /// The consumer's librdkafka configuration: kourier's defaults, then the raw settings,
    /// then the settings kourier owns.
    fn client_config(&self, bootstrap: &str, group_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Bound librdkafka's own pre-fetch queue (default 64 MiB per consumer).
            .set("queued.max.messages.kbytes", "16384")
            // Bound one fetch response (default 50 MiB): it is librdkafka's other large
            // buffer, and part of the documented memory bound.
            .set("fetch.max.bytes", "16777216")
            // When that queue is full, librdkafka waits this long before fetching again
            // (default 1 s): with a bounded queue the consumer then idles (librdkafka #3662).
            .set("fetch.queue.backoff.ms", "20")
            // The consumer-lag gauge comes from these statistics (see kourier::metrics).
            .set("statistics.interval.ms", "5000");
        for (k, v) in &self.kafka_config {
            config.set(k, v);
        }
        for (key, value, _) in OWNED_SETTINGS {
            config.set(*key, *value);
        }
        config
    }

    /// The sink given, or a [`KafkaDeadLetterSink`] on the same brokers (with the security
    /// settings of the raw configuration).
    fn dead_letter_sink_or_default(&self, bootstrap: &str) -> Result<Arc<dyn DeadLetterSink>> {
        Ok(match &self.sink {
            Some(sink) => sink.clone(),
            None => {
                let mut b =
                    KafkaDeadLetterSink::builder(bootstrap).log_interval(self.error_log_interval);
                for (k, v) in self.security_settings() {
                    b = b.kafka_config(k, v);
                }
                Arc::new(b.build()?) as Arc<dyn DeadLetterSink>
            }
        })
    }

    /// The raw `security.*`, `sasl.*` and `ssl.*` settings, for the clients kourier makes
    /// on the consumer's behalf (dead-letter producer, topic admin).
    fn security_settings(&self) -> Vec<(String, String)> {
        self.kafka_config
            .iter()
            .filter(|(k, _)| {
                k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_in_flight: self.max_in_flight,
            max_buffered_records: self.max_buffered_records,
            max_buffered_bytes: self.max_buffered_bytes,
            max_buffered_records_per_partition: self.max_buffered_records_per_partition,
            max_uncommitted_per_partition: self.max_uncommitted_per_partition,
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::handler::HandlerError;
    use crate::message::Message;

    struct Nop;

    #[async_trait]
    impl Handler for Nop {
        type Event = serde_json::Value;
        async fn handle(&self, _: &Message<serde_json::Value>) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    fn conflict(b: RetryingConsumerBuilder<Nop>) -> (String, String) {
        let err = match b.build() {
            Err(Error::Config(e)) => e,
            Err(other) => panic!("expected a config error, got {other:?}"),
            Ok(_) => panic!("expected a config error, got a consumer"),
        };
        let message = err.to_string();
        match err {
            ConfigError::Conflict { key, .. } => (key, message),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    /// `group.id` and `bootstrap.servers` have setters: through `kafka_config` they are
    /// refused, whether the setter is used too (same value or not) or not at all, and the
    /// message names the setter.
    #[test]
    fn group_id_and_bootstrap_servers_only_through_their_setters() {
        let base = || RetryingConsumer::builder(Nop).topic("t");
        for b in [
            base()
                .bootstrap_servers("b:9092")
                .kafka_config("group.id", "g"),
            base()
                .bootstrap_servers("b:9092")
                .group_id("g")
                .kafka_config("group.id", "g"),
            base()
                .bootstrap_servers("b:9092")
                .group_id("g")
                .kafka_config("group.id", "other"),
        ] {
            let (key, message) = conflict(b);
            assert_eq!(key, "group.id");
            assert!(message.contains("group_id()"), "{message}");
        }
        for b in [
            base()
                .group_id("g")
                .kafka_config("bootstrap.servers", "b:9092"),
            base()
                .bootstrap_servers("b:9092")
                .group_id("g")
                .kafka_config("bootstrap.servers", "b:9092"),
        ] {
            let (key, message) = conflict(b);
            assert_eq!(key, "bootstrap.servers");
            assert!(message.contains("bootstrap_servers()"), "{message}");
        }
        assert!(
            base()
                .bootstrap_servers("b:9092")
                .group_id("g")
                .build()
                .is_ok()
        );
    }

    /// kourier's defaults come first, so a raw setting overrides them; owned settings win.
    #[test]
    fn raw_settings_override_defaults_but_not_owned_settings() {
        let b = RetryingConsumer::builder(Nop)
            .bootstrap_servers("b:9092")
            .group_id("g")
            .topic("t")
            .kafka_config("auto.offset.reset", "latest");
        let config = b.client_config("b:9092", "g");
        assert_eq!(config.get("auto.offset.reset"), Some("latest"));
        assert_eq!(config.get("statistics.interval.ms"), Some("5000"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn an_invalid_breaker_is_a_config_error() {
        let base = || {
            RetryingConsumer::builder(Nop)
                .bootstrap_servers("b:9092")
                .group_id("g")
                .topic("t")
        };
        let err = base()
            .breaker(BreakerPolicy::default().with_failure_rate(1.5, 20, 10))
            .build()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Config(ConfigError::Invalid {
                    setting: "breaker",
                    ..
                })
            ),
            "{err}"
        );
        assert!(base().breaker(BreakerPolicy::default()).build().is_ok());
    }

    #[test]
    fn a_handler_timeout_must_end_attempts_before_their_lease() {
        let store =
            || -> Arc<dyn IdempotencyStore> { Arc::new(crate::InMemoryIdempotencyStore::new()) };
        let base = || {
            RetryingConsumer::builder(Nop)
                .bootstrap_servers("b:9092")
                .group_id("g")
                .topic("t")
                .idempotency(store(), DedupKey::header("id"))
                .idempotency_lease(Duration::from_secs(10))
        };
        let err = base()
            .handler_timeout(Duration::from_secs(10))
            .build()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Config(ConfigError::Invalid {
                    setting: "handler_timeout",
                    ..
                })
            ),
            "{err}"
        );
        assert!(
            base()
                .handler_timeout(Duration::from_secs(9))
                .build()
                .is_ok()
        );
        // Without idempotency there is no lease to outlive.
        assert!(
            RetryingConsumer::builder(Nop)
                .bootstrap_servers("b:9092")
                .group_id("g")
                .topic("t")
                .handler_timeout(Duration::from_secs(600))
                .build()
                .is_ok()
        );
    }

    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    fn base() -> RetryingConsumerBuilder<Nop> {
        RetryingConsumer::builder(Nop)
            .bootstrap_servers("b:9092")
            .group_id("g")
            .topic("t")
    }

    fn invalid_setting(b: RetryingConsumerBuilder<Nop>) -> &'static str {
        match b.build() {
            Err(Error::Config(ConfigError::Invalid { setting, .. })) => setting,
            Err(other) => panic!("expected an invalid setting, got {other:?}"),
            Ok(_) => panic!("expected an invalid setting, got a consumer"),
        }
    }

    /// A revoke wait as long as `max.poll.interval.ms` gets the member kicked out of its
    /// group: refused, against librdkafka's default (300 s) when it is not set.
    #[test]
    fn a_revoke_timeout_from_max_poll_interval_on_is_refused() {
        for timeout in [Duration::MAX, YEAR, Duration::from_secs(300)] {
            assert_eq!(
                invalid_setting(base().revoke_timeout(timeout)),
                "revoke_timeout",
                "{timeout:?}"
            );
        }
        assert_eq!(
            invalid_setting(
                base()
                    .revoke_timeout(Duration::from_secs(700))
                    .kafka_config("max.poll.interval.ms", "600000")
            ),
            "revoke_timeout"
        );
        assert!(
            base()
                .revoke_timeout(Duration::from_secs(299))
                .build()
                .is_ok()
        );
        assert!(
            base()
                .revoke_timeout(Duration::from_secs(500))
                .kafka_config("max.poll.interval.ms", "600000")
                .build()
                .is_ok()
        );
    }

    /// Every other duration setting above a year is taken as a year ("never"), so no
    /// deadline computed from it can overflow.
    #[test]
    fn duration_settings_above_a_year_are_taken_as_a_year() {
        let c = base()
            .shutdown_timeout(Duration::MAX)
            .startup_timeout(Duration::MAX)
            .stall_threshold(Duration::MAX)
            .commit_interval(Duration::MAX)
            .error_log_interval(Duration::MAX)
            .max_broker_outage(Duration::MAX)
            .handler_timeout(Duration::MAX)
            .idempotency_ttl(Duration::MAX)
            .build()
            .expect("a year is a valid setting");
        assert_eq!(c.settings.shutdown_timeout, YEAR);
        assert_eq!(c.settings.startup.timeout, YEAR);
        assert_eq!(c.settings.commit_interval, YEAR);
        assert_eq!(c.settings.max_broker_outage, Some(YEAR));
        assert_eq!(c.worker.stall_threshold, YEAR);
        assert_eq!(c.worker.handler_timeout, Some(YEAR));
        let store: Arc<dyn IdempotencyStore> = Arc::new(crate::InMemoryIdempotencyStore::new());
        let c = base()
            .idempotency(store, DedupKey::header("id"))
            .idempotency_lease(Duration::MAX)
            .idempotency_ttl(Duration::MAX)
            .build()
            .expect("a year is a valid lease");
        let dedup = c.worker.dedup.as_ref().expect("idempotency is on");
        assert_eq!((dedup.lease, dedup.ttl), (YEAR, YEAR));
    }

    /// A tier delay past 30 days outlives a topic's usual retention (the record would be
    /// deleted before it is due): refused.
    #[test]
    fn tier_delays_past_thirty_days_are_refused() {
        let tiers = |d| crate::tiers::RetryTiers::new([Duration::from_secs(1), d]);
        for d in [
            Duration::MAX,
            YEAR,
            Duration::from_secs(30 * 86_400) + Duration::from_nanos(1),
        ] {
            assert_eq!(
                invalid_setting(base().retry_tiers(tiers(d))),
                "retry_tiers",
                "{d:?}"
            );
        }
        assert!(
            base()
                .retry_tiers(tiers(Duration::from_secs(30 * 86_400)))
                .build()
                .is_ok()
        );
    }

    fn extreme() -> impl proptest::strategy::Strategy<Value = Duration> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_nanos(1)),
            Just(Duration::from_millis(1)),
            Just(YEAR),
            Just(Duration::MAX),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            (0u64..1_000_000).prop_map(Duration::from_millis),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Every duration setting, the retry policy's, the breaker's and the tiers' at 0,
        /// 1 ns, 1 ms, a year, `Duration::MAX` or anything: `build()` gives a consumer whose
        /// durations are at most a year, or a typed error; it never panics.
        #[test]
        fn build_never_panics_on_extreme_durations(
            d in proptest::collection::vec(extreme(), 17),
            max_poll in proptest::option::of(proptest::sample::select(
                vec!["1", "1000", "300000", "600000", "86400000", "86400001"],
            )),
            dedup in proptest::prelude::any::<bool>(),
            short_revoke in proptest::option::of(1u64..300_000),
            tiers in proptest::prelude::any::<bool>(),
        ) {
            // Ordered pairs, and mostly a revoke timeout below librdkafka's default poll
            // interval: otherwise nearly every case is refused for that alone.
            let pair = |a: Duration, b: Duration| (a.min(b), a.max(b));
            let revoke = short_revoke.map_or(d[1], Duration::from_millis);
            let mut b = base()
                .shutdown_timeout(d[0])
                .revoke_timeout(revoke)
                .startup_timeout(d[2])
                .stall_threshold(d[3])
                .commit_interval(d[4])
                .error_log_interval(d[5])
                .max_broker_outage(d[6])
                .handler_timeout(d[7])
                .idempotency_lease(d[8])
                .idempotency_ttl(d[9])
                .retry_policy({
                    let (initial, max) = pair(d[10], d[11]);
                    RetryPolicy::exponential(initial, max).with_max_elapsed(d[12])
                })
                .breaker({
                    let (initial, max) = pair(d[13], d[14]);
                    BreakerPolicy::default().with_open_interval(initial, max)
                });
            if tiers {
                b = b.retry_tiers(crate::tiers::RetryTiers::new([d[15], d[16]]));
            }
            if dedup {
                let store: Arc<dyn IdempotencyStore> =
                    Arc::new(crate::InMemoryIdempotencyStore::new());
                b = b.idempotency(store, DedupKey::header("id"));
            }
            if let Some(ms) = max_poll {
                b = b.kafka_config("max.poll.interval.ms", ms);
            }
            match b.build() {
                Ok(c) => {
                    let s = &c.settings;
                    for d in [
                        s.shutdown_timeout,
                        s.startup.timeout,
                        s.commit_interval,
                        c.hub.revoke_timeout,
                        c.worker.stall_threshold,
                    ]
                    .into_iter()
                    .chain(s.max_broker_outage)
                    .chain(c.worker.handler_timeout)
                    {
                        proptest::prop_assert!(d <= YEAR, "{:?}", d);
                    }
                }
                Err(Error::Config(_) | Error::Kafka { .. }) => {}
                Err(other) => proptest::prop_assert!(false, "untyped error {:?}", other),
            }
        }
    }
}
