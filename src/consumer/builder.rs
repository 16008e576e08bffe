//! [`RetryingConsumerBuilder`]: every setting of a [`RetryingConsumer`], validated by `build()`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;

use super::retrying_consumer::RetryingConsumer;
use crate::clock;
use crate::codec::{Codec, JsonCodec};
use crate::consumer::breaker::{
    Breaker, BreakerPolicy, DestinationBreakers, Destinations, OutageGate,
};
use crate::consumer::poll::KourierContext;
use crate::consumer::poll::PollSettings;
use crate::consumer::poll::{Provisioning, StartupSettings};
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::{Limits, ProcessingOrder, Scheduler};
use crate::consumer::transaction::Transactions;
use crate::consumer::work::{DestinationGate, WorkerContext};
use crate::consumer::work::{OutcomeObserver, RecordOutcome};
use crate::dead_letter::{DeadLetterSink, KafkaDeadLetterSink};
use crate::error::{ConfigError, Error, Result};
use crate::handler::Handler;
use crate::metrics::ConsumerMetrics;
use crate::producer::ProducerSettings;
use crate::record::RawRecord;
use crate::retry::RetryPolicy;
use crate::tiers::RetryTiers;
use crate::tiers::runtime::Tiers;
use crate::transactional::TransactionalOutput;

mod idempotency;
mod options;

pub use self::idempotency::{Idempotency, StoreOutage};
pub use self::options::{CommitMetadata, MissingTopics, PanicPolicy};

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

/// librdkafka's `max.poll.interval.ms` when it is not set.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Builds a [`RetryingConsumer`]. Start with [`RetryingConsumer::builder`].
///
/// Required: [`bootstrap_servers`](Self::bootstrap_servers), [`group_id`](Self::group_id) and
/// the [`topic`](Self::topic) (or [`topics`](Self::topics)). Everything else has a default
/// matching the starting design (500 ms × 3 retries, partition ordering, dead letters to
/// `<topic>.dlt`, values decoded as JSON).
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
/// # Conventions
///
/// There is one way to say each thing, and the names say which kind of thing it is:
///
/// - **Builder setters are nouns taking a value** — `.topic("t")`, `.retry_policy(p)`,
///   `.idempotency(i)`, `.missing_topics(MissingTopics::Wait)` — each sets its setting (a
///   second call replaces the first; `topic`/`topics`, which used to add, are refused twice);
///   `on_*` takes a callback ([`on_outcome`](Self::on_outcome)). The same holds for the other
///   builders ([`KafkaDeadLetterSinkBuilder`](crate::KafkaDeadLetterSinkBuilder),
///   [`PublisherBuilder`](crate::PublisherBuilder), ...) and clients
///   ([`TopicAdmin`](crate::topics::TopicAdmin), the Redis store and ledger).
/// - **Value types passed to a setter take their options through `with_*`**, and a getter
///   reading one back has the bare name: [`RetryPolicy::with_max_attempts`] /
///   [`RetryPolicy::max_attempts`], [`Idempotency::with_lease`] / [`Idempotency::lease`];
///   [`BreakerPolicy`], [`RetryTiers`] and [`TopicSpec`](crate::topics::TopicSpec) alike.
/// - **Choices are enums, not `bool`s**: [`MissingTopics`], [`PanicPolicy`],
///   [`StoreOutage`], [`ProcessingOrder`]. A `bool` would not say what `true` means at the
///   call site.
/// - **Types that decide the builder's type are set on the builder too**: the codec with
///   [`codec`](Self::codec), which changes the builder's second type parameter (JSON until
///   then).
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
/// | [`handler_timeout`](Self::handler_timeout) | none | refused | 1 year, and below the idempotency lease with idempotency | taken as 1 year; not below the lease: refused |
/// | [`Idempotency::with_lease`] | 60 s | refused | 1 year | taken as 1 year |
/// | [`Idempotency::with_ttl`] | 6 h | refused | 1 year | taken as 1 year |
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
/// + records read ahead   63 × record bytes: taken from librdkafka in runs of up to 64, the
///                        rest of a run waiting on the poll thread until the buffer has room
/// + records in flight    max_in_flight × record bytes (running, or parked in a retry back-off)
/// + records settling     4 × max_in_flight × (record bytes + 8 KiB): handled, their key
///                        being marked done or their dead letter awaiting its acknowledgement
/// + librdkafka's queue   queued.max.messages.kbytes                (16 MiB by default)
/// + fetch responses      fetch.max.bytes × brokers fetched from     (16 MiB by default)
/// + a constant           ≈ 72 MiB: the Tokio runtime, librdkafka's threads and metadata,
///                        the dead-letter producer, the idempotency store's client, code,
///                        allocator slack, and up to 256 KiB of settled records the poll
///                        thread frees one per record it reads (the allocator then reuses
///                        their memory from its per-thread cache)
/// ```
///
/// where *record bytes* is what the buffer charges a record: key + value + header names and
/// values + topic name + 64. With the defaults, one broker and small records (≤ 1 KiB)
/// that is about 110–120 MiB; `cargo bench --bench throughput` measures peak RSS against this formula.
/// Large records raise the first two terms, not the rest: librdkafka's queue and fetch are
/// bounded in bytes.
pub struct RetryingConsumerBuilder<H: Handler, C = JsonCodec<<H as Handler>::Event>> {
    handler: H,
    codec: C,
    s: Settings<H::Event>,
}

/// Every setting but the handler and the codec (whose type changes with
/// [`codec`](RetryingConsumerBuilder::codec)).
struct Settings<T> {
    bootstrap_servers: Option<String>,
    group_id: Option<String>,
    topics: Vec<String>,
    /// `topic`/`topics` calls: a second one is refused by `build()` (it used to add topics).
    topic_calls: u32,
    policy: RetryPolicy,
    ordering: ProcessingOrder,
    max_in_flight: usize,
    max_buffered_records: usize,
    max_buffered_bytes: usize,
    max_buffered_records_per_partition: usize,
    sink: Option<Arc<dyn DeadLetterSink>>,
    idempotency: Option<Idempotency<T>>,
    commit_interval: Duration,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    revoke_timeout: Duration,
    max_poll_batch: usize,
    kafka_config: BTreeMap<String, String>,
    startup_timeout: Duration,
    missing_topics: MissingTopics,
    max_broker_outage: Option<Duration>,
    error_log_interval: Duration,
    stall_threshold: Duration,
    observer: Option<OutcomeObserver>,
    max_uncommitted_per_partition: usize,
    panic_policy: PanicPolicy,
    breaker: Option<BreakerPolicy>,
    destinations: Option<Destinations<T>>,
    tiers: Option<RetryTiers>,
    commit_metadata: CommitMetadata,
    transactional: Option<TransactionalOutput>,
}

impl<T> Settings<T> {
    fn new() -> Self {
        Settings {
            bootstrap_servers: None,
            group_id: None,
            topics: Vec::new(),
            topic_calls: 0,
            policy: RetryPolicy::default(),
            ordering: ProcessingOrder::default(),
            max_in_flight: 64,
            max_buffered_records: 10_000,
            max_buffered_bytes: 64 << 20,
            max_buffered_records_per_partition: 5_000,
            sink: None,
            idempotency: None,
            commit_interval: Duration::from_secs(1),
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
            revoke_timeout: Duration::from_secs(30),
            max_poll_batch: 500,
            kafka_config: BTreeMap::new(),
            startup_timeout: Duration::from_secs(30),
            missing_topics: MissingTopics::Fail,
            max_broker_outage: None,
            error_log_interval: Duration::from_secs(30),
            stall_threshold: Duration::from_secs(60),
            observer: None,
            max_uncommitted_per_partition: 10_000,
            panic_policy: PanicPolicy::Retry,
            breaker: None,
            destinations: None,
            tiers: None,
            commit_metadata: CommitMetadata::FinishedOffsets,
            transactional: None,
        }
    }
}

impl<H: Handler, C> fmt::Debug for RetryingConsumerBuilder<H, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.s;
        f.debug_struct("RetryingConsumerBuilder")
            .field("bootstrap_servers", &s.bootstrap_servers)
            .field("group_id", &s.group_id)
            .field("topics", &s.topics)
            .field("policy", &s.policy)
            .field("ordering", &s.ordering)
            .field("max_in_flight", &s.max_in_flight)
            .field("idempotency", &s.idempotency)
            .field("missing_topics", &s.missing_topics)
            .field("panic_policy", &s.panic_policy)
            .field("transactional", &s.transactional)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> RetryingConsumer<H> {
    /// Starts a builder for `handler`. Values are decoded as JSON ([`JsonCodec`]) unless
    /// [`codec`](RetryingConsumerBuilder::codec) sets another codec: a handler whose event
    /// is not `serde::de::DeserializeOwned` must set one before
    /// [`build`](RetryingConsumerBuilder::build) (a compile error says so otherwise).
    ///
    /// ```
    /// use kourier::{handler_fn, BytesCodec, Message, RetryingConsumer};
    ///
    /// // Raw bytes (`Option<Vec<u8>>`: a null value stays `None`) are not JSON.
    /// let handler = handler_fn(|_m: Message<Option<Vec<u8>>>| async { Ok(()) });
    /// let consumer = RetryingConsumer::builder(handler)
    ///     .codec(BytesCodec)
    ///     .bootstrap_servers("127.0.0.1:9092")
    ///     .group_id("raw")
    ///     .topic("raw.v1")
    ///     .build()?;
    /// # let _ = consumer;
    /// # Ok::<(), kourier::Error>(())
    /// ```
    ///
    /// Without `.codec(..)` an event that JSON cannot decode does not build:
    ///
    /// ```compile_fail
    /// # use kourier::{handler_fn, Message, RetryingConsumer};
    /// struct NotJson;
    /// let handler = handler_fn(|_m: Message<NotJson>| async { Ok(()) });
    /// let consumer = RetryingConsumer::builder(handler).build(); // JsonCodec<NotJson>: Codec<NotJson>?
    /// ```
    pub fn builder(handler: H) -> RetryingConsumerBuilder<H> {
        RetryingConsumerBuilder {
            handler,
            codec: JsonCodec::new(),
            s: Settings::new(),
        }
    }
}

impl<H: Handler, C> RetryingConsumerBuilder<H, C> {
    /// Kafka brokers, `host:port[,host:port...]`. Required.
    #[must_use]
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.s.bootstrap_servers = Some(servers.into());
        self
    }

    /// The consumer group. Required. It also namespaces dedup keys, so two services with
    /// their own groups dedup independently.
    #[must_use]
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.s.group_id = Some(group_id.into());
        self
    }

    /// The one topic to consume. Required, unless [`topics`](Self::topics) gives several.
    ///
    /// Give the topics once: `build()` refuses a second `topic` or `topics` call with
    /// [`ConfigError::Invalid`] (`setting: "topics"`) — `topic` used to *add* a topic, and
    /// `.topic(a).topic(b)` would otherwise silently consume only `b`.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.s.topics = vec![topic.into()];
        self.s.topic_calls = self.s.topic_calls.saturating_add(1);
        self
    }

    /// The topics to consume (at least one). Like [`topic`](Self::topic), given once.
    #[must_use]
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.s.topics = topics.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.s.topic_calls = self.s.topic_calls.saturating_add(1);
        self
    }

    /// How record values become the handler's event. Default [`JsonCodec`] (serde JSON);
    /// e.g. [`BytesCodec`](crate::BytesCodec) for raw bytes, or
    /// [`codec_fn`](crate::codec_fn). The builder's type names its codec, so this is the
    /// one place to choose it, whatever the event type.
    #[must_use]
    pub fn codec<D: Codec<H::Event>>(self, codec: D) -> RetryingConsumerBuilder<H, D> {
        RetryingConsumerBuilder {
            handler: self.handler,
            codec,
            s: self.s,
        }
    }

    /// How transient failures are retried. Default: 500 ms fixed, 3 retries (4 attempts).
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.s.policy = policy;
        self
    }

    /// How records may run in parallel ([`ProcessingOrder`]). Default:
    /// [`ProcessingOrder::Partition`]. The setter keeps the name `ordering`: it reads as
    /// `.ordering(ProcessingOrder::Key)` and did not collide with anything.
    #[must_use]
    pub fn ordering(mut self, ordering: ProcessingOrder) -> Self {
        self.s.ordering = ordering;
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
        self.s.max_in_flight = n;
        self
    }

    /// Records received but not started, across all partitions. At this limit the poll
    /// thread stops pulling records in bulk (the rest wait in librdkafka's bounded pre-fetch
    /// queue) while it keeps polling slowly to stay in the group; if handlers are stuck and
    /// the buffer still grows 10 % past the limit, partitions holding buffered records are
    /// paused until it is below half. Default 10 000.
    #[must_use]
    pub fn max_buffered_records(mut self, n: usize) -> Self {
        self.s.max_buffered_records = n;
        self
    }

    /// Bytes (keys, values, headers) received but not started. Default 64 MiB.
    #[must_use]
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.s.max_buffered_bytes = n;
        self
    }

    /// Records buffered for one partition before that partition is paused (resumed below
    /// half), once it has held them for half a second: a fast partition's fetch response
    /// overshoots the limit and drains within milliseconds, and pausing it would make
    /// librdkafka drop and fetch again what it pre-fetched. The total buffer limits
    /// (`max_buffered_records`, `max_buffered_bytes`) hold at all times. Default 5 000.
    #[must_use]
    pub fn max_buffered_records_per_partition(mut self, n: usize) -> Self {
        self.s.max_buffered_records_per_partition = n;
        self
    }

    /// Where dead letters go. Default: a [`KafkaDeadLetterSink`] writing to `<topic>.dlt`
    /// on the same brokers (with the `security.*`, `sasl.*` and `ssl.*` settings given to
    /// [`kafka_config`](Self::kafka_config)).
    #[must_use]
    pub fn dead_letter_sink(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.s.sink = Some(sink);
        self
    }

    /// Turns on idempotency (delivery rule 7 in the crate docs): before each attempt the
    /// record's dedup key is claimed in the store; records whose key is done are skipped.
    /// Everything about it — the store, the dedup key, the lease, the TTL, what a store
    /// outage does — is one [`Idempotency`] value. Default: none. With
    /// [`transactional`](Self::transactional) output, a key is marked done once the
    /// transaction carrying the record's outputs committed.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use kourier::{handler_fn, DedupKey, Idempotency, InMemoryIdempotencyStore, Message, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let store = Arc::new(InMemoryIdempotencyStore::new());
    /// let builder = RetryingConsumer::builder(handler)
    ///     .idempotency(Idempotency::new(store, DedupKey::header("event-id")));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn idempotency(mut self, idempotency: Idempotency<H::Event>) -> Self {
        self.s.idempotency = Some(idempotency);
        self
    }

    /// Calls `observer` once for each record a worker took, when it ends: with the record
    /// (its coordinates, key, headers) and how it ended — [`RecordOutcome::Handled`],
    /// [`Duplicate`](RecordOutcome::Duplicate), [`DeadLettered`](RecordOutcome::DeadLettered)
    /// with the failure kind (after the sink acknowledged the letter; with
    /// [`transactional`](Self::transactional) output and the Kafka sink, once the letter is
    /// staged for the transaction that commits the record's offset, not yet committed),
    /// [`Forwarded`](RecordOutcome::Forwarded) to a retry tier (acknowledged; with
    /// transactional output, once the forward is staged for the transaction that commits the
    /// record's offset, not yet committed),
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
        self.s.observer = Some(Arc::new(observer));
        self
    }

    /// What offset commits carry in their metadata: by default the offsets finished above
    /// the commit point, so that a partition's next owner (after a rebalance or a restart)
    /// skips them instead of handling them again. See [`CommitMetadata`].
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, CommitMetadata, Message, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler).commit_metadata(CommitMetadata::None);
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn commit_metadata(mut self, metadata: CommitMetadata) -> Self {
        self.s.commit_metadata = metadata;
        self
    }

    /// Transactional output, exactly-once Kafka-to-Kafka: the handler stages output records
    /// with [`Message::send_output`](crate::Message::send_output), and kourier produces them
    /// and commits the consumed offsets in one Kafka transaction per
    /// [`commit_interval`](Self::commit_interval) (delivery rule 20 in the crate docs). A
    /// `read_committed` reader of the outputs sees each input's outputs exactly once. See
    /// [`transactional`](crate::transactional) for what a transaction covers, what stays
    /// at-least-once and the cost.
    ///
    /// `build()` refuses, with [`ConfigError::Conflict`], transactional output combined with
    /// [`retry_tiers`](Self::retry_tiers) that keep key order
    /// ([`RetryTiers::with_key_order`](crate::tiers::RetryTiers::with_key_order): the ledger
    /// settles a record before its transaction commits, so after an abort a later record of
    /// the key could commit its outputs first) or
    /// [`CommitMetadata::None`] (not supported yet), or with an `isolation.level` other than
    /// `read_committed` (a new owner must wait for a pending transaction's offsets); and with
    /// [`ConfigError::Invalid`] an empty transactional id, or a transaction timeout not above
    /// the commit interval.
    ///
    /// Dead letters join the transaction with the [`KafkaDeadLetterSink`] (the default, or
    /// one given as is to [`dead_letter_sink`](Self::dead_letter_sink)): a record's letter is
    /// produced in the transaction that commits its offset, exactly-once under
    /// `read_committed`. A custom [`DeadLetterSink`] — a wrapper of the Kafka sink included —
    /// cannot join it: it writes its letters itself, at-least-once, as without this setting.
    ///
    /// With [`idempotency`](Self::idempotency), a record's key is marked done in the store
    /// only once the transaction carrying its outputs (or its dead letter, or its forward)
    /// and its offset committed; until then its claim stays held and renewed, and when that
    /// transaction aborts the claim is released: a redelivery runs the record again and
    /// produces its outputs again (so its effect outside Kafka runs again then; duplicates
    /// of a record whose transaction committed are skipped). Each claim is held about one
    /// commit interval longer. See [idempotency](crate::transactional#idempotency).
    ///
    /// Retry-tier forwards join the transaction too (retry tiers without key order): a
    /// record's forward — the record the tiers would write, same topic, partition, key, value
    /// and headers — is produced in the transaction that commits its offset, so the forward
    /// and the commit are atomic and a `read_committed` reader of a tier topic (the consumer
    /// itself) sees one forward per record given up to it.
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, Message, RetryingConsumer};
    /// use kourier::transactional::{OutputRecord, TransactionalOutput};
    ///
    /// let handler = handler_fn(|m: Message<String>| async move {
    ///     m.send_output(OutputRecord::new("out.v1").key("k").value(m.event().to_uppercase()))?;
    ///     Ok(())
    /// });
    /// let builder = RetryingConsumer::builder(handler)
    ///     .transactional(TransactionalOutput::new("uppercaser-0"));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn transactional(mut self, output: TransactionalOutput) -> Self {
        self.s.transactional = Some(output);
        self
    }

    /// How often settled offsets are committed. Default 1 s. Commits also happen on revoke
    /// and on shutdown. Zero is refused by `build()`; above one year it is taken as one year
    /// (see [Durations](Self#durations)).
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.s.commit_interval = clock::bounded(interval);
        self
    }

    /// Bounds each handler attempt: an attempt still running after `timeout` is dropped
    /// (cancelled at its next `.await`) and counts as a transient failure. Default: no
    /// bound. Set one when a stuck call (a hung connection) would otherwise hold its
    /// partition or key forever (with idempotency, a hung attempt also keeps renewing its
    /// claim). With idempotency it must be below the
    /// [idempotency lease](Idempotency::with_lease) (checked by `build()`): then even a
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
        self.s.handler_timeout = Some(clock::bounded(timeout));
        self
    }

    /// How long shutdown waits for in-flight records. Default 30 s. Zero gives them up at
    /// once; above one year it is taken as one year (see [Durations](Self#durations)).
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.s.shutdown_timeout = clock::bounded(timeout);
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
        self.s.revoke_timeout = timeout;
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
        self.s.startup_timeout = clock::bounded(timeout);
        self
    }

    /// What [`run`](RetryingConsumer::run) does when topics the consumer needs (subscribed,
    /// dead-letter and retry-tier topics) do not exist at start: fail with
    /// [`Error::MissingTopics`] (the default), wait for them, or create them — see
    /// [`MissingTopics`]. `build()` refuses [`MissingTopics::create`] with zero partitions.
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, Message, MissingTopics, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler).missing_topics(MissingTopics::create(3));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn missing_topics(mut self, missing: MissingTopics) -> Self {
        self.s.missing_topics = missing;
        self
    }

    /// Opt-in: stop with [`Error::BrokersUnreachable`] when the cluster has been unreachable
    /// this long while running (records in flight are given up unsettled, as at a
    /// shutdown). Default: no bound — the consumer waits for the cluster to come back. Zero
    /// is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn max_broker_outage(mut self, outage: Duration) -> Self {
        self.s.max_broker_outage = Some(clock::bounded(outage));
        self
    }

    /// How often a condition that persists (a broker down, a topic missing) is logged: the
    /// first occurrence at once, then at most once per interval with the count suppressed
    /// since. Default 30 s. It holds for librdkafka's own warnings and errors too, from the
    /// consumer and from every client it creates (the dead-letter producer of the default
    /// sink, the retry-tier producer, the admin client of [`MissingTopics::create`]). Zero
    /// is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](Self#durations)).
    #[must_use]
    pub fn error_log_interval(mut self, interval: Duration) -> Self {
        self.s.error_log_interval = clock::bounded(interval);
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
        self.s.stall_threshold = clock::bounded(threshold);
        self
    }

    /// Records of one partition started past its commit point — running, or settled behind
    /// a record that is not — before that partition is paused (resumed below half). Bounds
    /// the work a stuck record lets run ahead of the commit point in key and unordered mode
    /// (all of it is handled again if the consumer crashes). Default 10 000.
    ///
    /// The partition is paused once it has held `n` such records for half a second without
    /// a break, and at once at `2 × n`; its records already buffered still run. So at most
    /// `2 × n` plus the partition's records buffered at the pause (at most
    /// [`max_buffered_records`](Self::max_buffered_records)) run ahead of a stuck record.
    /// Records still buffered do not count: they are not work done, and the buffer limits
    /// bound them. A record that holds the commit point only for a moment, such as a dead
    /// letter waiting for the broker's acknowledgement (tens of milliseconds on a busy
    /// machine, in which a fast partition delivers thousands of records), does not pause
    /// it: a pause makes librdkafka drop the partition's pre-fetched records and fetch them
    /// again.
    #[must_use]
    pub fn max_uncommitted_per_partition(mut self, n: usize) -> Self {
        self.s.max_uncommitted_per_partition = n;
        self
    }

    /// Whether a panicking handler attempt is retried like a transient failure
    /// ([`PanicPolicy::Retry`], the default: a panic may come from a passing condition) or
    /// dead-lettered at once ([`PanicPolicy::DeadLetter`]). Either way it counts as
    /// [`FailureKind::Panic`](crate::FailureKind::Panic), and a record given up after a
    /// panic is dead-lettered as `panic`.
    #[must_use]
    pub fn panic_policy(mut self, policy: PanicPolicy) -> Self {
        self.s.panic_policy = policy;
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
        self.s.breaker = Some(policy);
        self
    }

    /// Opt-in: a breaker per destination (delivery rule 19 in the crate docs), so that a
    /// destination that is down (a customer's webhook endpoint, a tenant's API) holds only
    /// its own records while the others run at full speed. Default: none.
    ///
    /// Each record names its destination ([`Destinations::by_key`], a header, or a function
    /// of the message). A destination's failures open its breaker only: its records wait
    /// (no attempts used, nothing dead-lettered, order within the key kept, no in-flight
    /// slot held), one probe per open interval. With a consumer-wide
    /// [`breaker`](Self::breaker) too, that one counts failures by destination and opens only
    /// when they span [`min_destinations`](BreakerPolicy::with_min_destinations) of them.
    /// Isolation needs [`ProcessingOrder::Key`] (or `Unordered`): in partition order a
    /// waiting record holds its partition. See [`Destinations`] for the states, the
    /// defaults and the memory bound; the snapshot's
    /// [`destinations`](crate::ConsumerSnapshot::destinations), the
    /// `kourier_destination*` [metrics](crate::metrics) and one log line per destination
    /// transition (throttled) show them. `build()` refuses invalid settings with
    /// [`ConfigError::Invalid`] (`setting: "destinations"`).
    ///
    /// ```no_run
    /// # use kourier::{handler_fn, BreakerPolicy, Destinations, Message, ProcessingOrder, RetryingConsumer};
    /// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
    /// let builder = RetryingConsumer::builder(handler)
    ///     .ordering(ProcessingOrder::Key)
    ///     .destinations(Destinations::by_key())
    ///     .breaker(BreakerPolicy::default().with_min_destinations(5));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn destinations(mut self, destinations: Destinations<H::Event>) -> Self {
        self.s.destinations = Some(destinations);
        self
    }

    /// Retry tiers: after the retry policy's in-place attempts, a transient failure is
    /// forwarded to the next tier topic (by default `<topic>.retry.<n>`), runs again there
    /// once due, and reaches the dead-letter topic only after the last tier. The consumer
    /// subscribes to its tier topics too; they must exist at startup like the dead-letter
    /// topics (or be created by [`MissingTopics::create`], with the source's partition
    /// count). See [`tiers`](crate::tiers) for the record format, due times, the commit rule
    /// and [`with_key_order`](RetryTiers::with_key_order). `build()` refuses invalid tiers with
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
        self.s.tiers = Some(tiers);
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
        self.s.kafka_config.insert(key.into(), value.into());
        self
    }
}

impl<H: Handler, C> RetryingConsumerBuilder<H, C> {
    /// Validates every setting and creates the consumer (it connects when run).
    ///
    /// # Errors
    /// [`Error::Config`] for a missing or contradictory setting; [`Error::Kafka`] when
    /// librdkafka rejects a property or the dead-letter producer cannot be created.
    pub fn build(self) -> Result<RetryingConsumer<H>>
    where
        C: Codec<H::Event>,
    {
        let RetryingConsumerBuilder { handler, codec, s } = self;
        // First: a `group.id` given only through `kafka_config` gets the error that says
        // where it belongs, not "missing group_id".
        s.check_kafka_config()?;
        let (bootstrap, group_id) = s.required_settings()?;
        s.check_limits()?;
        let sink = s.dead_letter_sink_or_default(&bootstrap)?;
        let tiers = s.tiers_or_none(&bootstrap, &group_id)?;
        let tier_topics = tiers.as_ref().map(|t| t.topics()).unwrap_or_default();
        let subscribed: Vec<String> = (s.topics.iter().cloned())
            .chain(tier_topics.iter().map(|(_, t)| t.clone()))
            .collect();
        let metrics = Arc::new(ConsumerMetrics::new(&group_id, &subscribed));
        let breaker = (s.breaker.clone()).map(|policy| {
            let breaker = Breaker::new(policy, metrics.clone());
            Arc::new(if s.destinations.is_some() {
                breaker.by_destination()
            } else {
                breaker
            })
        });
        // A record parked in a tier must not be overtaken by its key's later records: in an
        // ordered mode, only tiers that keep key order can take it.
        let can_park = tiers
            .as_ref()
            .is_some_and(|t| t.keeps_key_order() || s.ordering == ProcessingOrder::Unordered);
        let destinations = (s.destinations.clone()).map(|of| DestinationGate {
            breakers: Arc::new(DestinationBreakers::new(
                of.rules(),
                metrics.clone(),
                s.error_log_interval,
            )),
            park_after: of.park_after().filter(|_| can_park),
            of,
        });
        let hub = Arc::new(Hub::new(
            Scheduler::new(s.ordering, s.limits())
                .with_commit_metadata(s.commit_metadata == CommitMetadata::FinishedOffsets)
                // Transactional outputs are produced as the scheduler marks each record
                // finished (delivery rule 20): no record may settle on its worker alone.
                .with_runs(s.transactional.is_none())
                .with_breaker(breaker.clone())
                .with_destinations(destinations.as_ref().map(|d| d.breakers.clone())),
            s.revoke_timeout,
            metrics.clone(),
            s.error_log_interval,
        ));
        if let Some(t) = s.transactions(&bootstrap)? {
            hub.set_transactions(t);
        }
        let consumer: BaseConsumer<KourierContext> = (s.client_config(&bootstrap, &group_id))
            .create_with_context(KourierContext::new(hub.clone()))
            .map_err(|e| Error::kafka("create consumer", e))?;
        let sink_topics = s.sink_topics(sink.as_ref(), tier_topics);
        let settings = s.poll_settings(bootstrap, subscribed, sink_topics, &group_id);
        let worker = Arc::new(WorkerContext {
            handler: Arc::new(handler),
            codec: Arc::new(codec),
            policy: s.policy,
            sink,
            dedup: (s.idempotency).map(|i| i.into_dedup(group_id.clone())),
            group_id,
            handler_timeout: s.handler_timeout,
            retry_panics: s.panic_policy == PanicPolicy::Retry,
            stall_threshold: s.stall_threshold,
            metrics,
            observer: s.observer,
            outage: OutageGate(breaker),
            tiers,
            destinations,
            transactions: hub.transactions().cloned(),
        });
        Ok(RetryingConsumer {
            consumer,
            hub,
            worker,
            settings,
        })
    }
}

impl<T> Settings<T> {
    /// The dead-letter topics of each subscribed topic, then the retry-tier topics, each
    /// with the source topic it serves: the startup checks need them all.
    fn sink_topics(
        &self,
        sink: &dyn DeadLetterSink,
        tier_topics: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        (self.topics.iter())
            .flat_map(|t| sink.topics_for(t).into_iter().map(|d| (t.clone(), d)))
            .chain(tier_topics)
            .collect()
    }

    /// The poll thread's settings, its startup checks' included.
    fn poll_settings(
        &self,
        servers: String,
        subscribed: Vec<String>,
        sink_topics: Vec<(String, String)>,
        group: &str,
    ) -> PollSettings {
        let create = match self.missing_topics {
            MissingTopics::Create { partitions } => Some(Provisioning {
                partitions: i32::from(partitions),
                kafka_config: self.security_settings(),
                log_interval: self.error_log_interval,
            }),
            MissingTopics::Fail | MissingTopics::Wait => None,
        };
        PollSettings {
            startup: StartupSettings {
                servers,
                timeout: self.startup_timeout,
                topics: self.topics.clone(),
                sink_topics,
                wait_for_topics: self.missing_topics == MissingTopics::Wait,
                create,
            },
            topics: subscribed,
            group: group.to_owned(),
            commit_interval: self.commit_interval,
            shutdown_timeout: self.shutdown_timeout,
            max_poll_batch: self.max_poll_batch,
            max_broker_outage: self.max_broker_outage,
        }
    }

    /// Transactional output, checked, with its producer (see
    /// [`RetryingConsumerBuilder::transactional`]).
    fn transactions(&self, bootstrap: &str) -> Result<Option<Arc<Transactions>>> {
        let Some(output) = &self.transactional else {
            return Ok(None);
        };
        let conflict = |with: &str, reason| ConfigError::Conflict {
            key: "transactional".to_owned(),
            value: with.to_owned(),
            reason,
        };
        if output.transactional_id.trim().is_empty() {
            return Err(
                ConfigError::invalid("transactional", "the transactional id is empty").into(),
            );
        }
        if self.tiers.as_ref().is_some_and(|t| t.ledger.is_some()) {
            // Delivery rule 20: the ledger is outside the transaction. Its `place` may run
            // again at a replay (a repeated step), but its `settle` frees the key's later
            // records before the transaction commits: after an abort, one of them may commit
            // its outputs before the settled record's replay commits its own.
            return Err(conflict(
                "RetryTiers::with_key_order",
                "the key-order ledger settles a record before its transaction commits: if that transaction aborts, a later record of the key may run and commit its outputs before the record's replay does, so key order would not hold for read_committed readers; transactional output cannot be combined with a key-order ledger",
            )
            .into());
        }
        if self.commit_metadata == CommitMetadata::None {
            return Err(conflict(
                "CommitMetadata::None",
                "a transaction marks the records it finished above the commit point in the commit metadata",
            )
            .into());
        }
        if let Some(level) = self.kafka_config.get("isolation.level")
            && !level.trim().eq_ignore_ascii_case("read_committed")
        {
            // A new owner must wait for a pending transaction's offsets (KIP-447): librdkafka
            // asks for stable offsets only when reading committed.
            return Err(ConfigError::Conflict {
                key: "isolation.level".to_owned(),
                value: level.clone(),
                reason: "transactional output reads its committed offsets as stable: the consumer must read committed",
            }
            .into());
        }
        if output.transaction_timeout <= self.commit_interval {
            return Err(ConfigError::invalid(
                "transactional",
                "the transaction timeout must be longer than the commit interval (a transaction stays open for one interval)",
            )
            .into());
        }
        for (setting, value) in [
            ("transaction timeout", output.transaction_timeout),
            ("transaction operation timeout", output.operation_timeout),
        ] {
            if value.is_zero() || value > Duration::from_secs(3_600) {
                return Err(ConfigError::invalid(
                    "transactional",
                    format!("the {setting} must be above zero and at most one hour"),
                )
                .into());
            }
        }
        let t = Transactions::new(bootstrap, self.security_settings(), output)
            .map_err(|e| Error::kafka("create transactional producer", e))?;
        Ok(Some(Arc::new(t)))
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
                "with_key_order needs Partition or Key ordering, not Unordered",
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
        if self.topic_calls > 1 {
            return Err(ConfigError::invalid(
                "topics",
                "topic() or topics() given more than once: give every topic in one \
                 topics([..]) call (topic() no longer adds a topic)",
            )
            .into());
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
        if let Some(destinations) = &self.destinations {
            destinations.validate()?;
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
                "missing_topics",
                match self.missing_topics {
                    MissingTopics::Create { partitions } => usize::from(partitions),
                    MissingTopics::Fail | MissingTopics::Wait => 1,
                },
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
        self.check_idempotency()
    }

    /// The idempotency lease and TTL are not zero, and a handler timeout ends an attempt
    /// before its claim's lease runs out.
    fn check_idempotency(&self) -> Result<()> {
        let Some(idempotency) = &self.idempotency else {
            return Ok(());
        };
        for (what, value) in [("lease", idempotency.lease), ("ttl", idempotency.ttl)] {
            if value.is_zero() {
                return Err(ConfigError::invalid(
                    "idempotency",
                    format!("the {what} must be longer than zero"),
                )
                .into());
            }
        }
        // An attempt that may outlive its claim's lease lets another consumer claim the same
        // event and run it too: with idempotency, the timeout must end the attempt first.
        if let Some(timeout) = self.handler_timeout
            && timeout >= idempotency.lease
        {
            return Err(ConfigError::invalid(
                "handler_timeout",
                format!(
                    "{timeout:?} must be below the idempotency lease ({:?}): an attempt \
                     outliving its lease can run twice",
                    idempotency.lease
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
    use crate::consumer::dedup::DedupKey;
    use crate::handler::HandlerError;
    use crate::idempotency::IdempotencyStore;
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
        let unset = || RetryingConsumer::builder(Nop).topic("t");
        for (b, refused) in [
            (
                unset()
                    .bootstrap_servers("b:9092")
                    .kafka_config("group.id", "g"),
                "group.id",
            ),
            (base().kafka_config("group.id", "g"), "group.id"),
            (base().kafka_config("group.id", "other"), "group.id"),
            (
                unset()
                    .group_id("g")
                    .kafka_config("bootstrap.servers", "b:9092"),
                "bootstrap.servers",
            ),
            (
                base().kafka_config("bootstrap.servers", "b:9092"),
                "bootstrap.servers",
            ),
        ] {
            let (key, message) = conflict(b);
            assert_eq!(key, refused);
            // The message names the setter: `group.id` → `group_id()`.
            let setter = format!("{}()", refused.replace('.', "_"));
            assert!(message.contains(&setter), "{message}");
        }
        builds(base());
    }

    /// kourier's defaults come first, so a raw setting overrides them; owned settings win.
    #[test]
    fn raw_settings_override_defaults_but_not_owned_settings() {
        let b = RetryingConsumer::builder(Nop)
            .bootstrap_servers("b:9092")
            .group_id("g")
            .topic("t")
            .kafka_config("auto.offset.reset", "latest");
        let config = b.s.client_config("b:9092", "g");
        assert_eq!(config.get("auto.offset.reset"), Some("latest"));
        assert_eq!(config.get("statistics.interval.ms"), Some("5000"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn an_invalid_breaker_is_a_config_error() {
        let invalid = BreakerPolicy::default().with_failure_rate(1.5, 20, 10);
        assert_eq!(invalid_setting(base().breaker(invalid)), "breaker");
        builds(base().breaker(BreakerPolicy::default()));
    }

    #[test]
    fn a_handler_timeout_must_end_attempts_before_their_lease() {
        let leased = || base().idempotency(idempotency().with_lease(Duration::from_secs(10)));
        assert_eq!(
            invalid_setting(leased().handler_timeout(Duration::from_secs(10))),
            "handler_timeout"
        );
        builds(leased().handler_timeout(Duration::from_secs(9)));
        // Without idempotency there is no lease to outlive.
        builds(base().handler_timeout(Duration::from_secs(600)));
    }

    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    fn base() -> RetryingConsumerBuilder<Nop> {
        RetryingConsumer::builder(Nop)
            .bootstrap_servers("b:9092")
            .group_id("g")
            .topic("t")
    }

    /// Idempotency on an in-memory store, keyed by the `id` header.
    fn idempotency() -> Idempotency<serde_json::Value> {
        let store: Arc<dyn IdempotencyStore> = Arc::new(crate::InMemoryIdempotencyStore::new());
        Idempotency::new(store, DedupKey::header("id"))
    }

    /// Fails the test with the error when `b` does not build.
    fn builds(b: RetryingConsumerBuilder<Nop>) {
        if let Err(e) = b.build() {
            panic!("expected a consumer, got {e:?}");
        }
    }

    fn invalid_setting(b: RetryingConsumerBuilder<Nop>) -> &'static str {
        match b.build() {
            Err(Error::Config(ConfigError::Invalid { setting, .. })) => setting,
            Err(other) => panic!("expected an invalid setting, got {other:?}"),
            Ok(_) => panic!("expected an invalid setting, got a consumer"),
        }
    }

    /// `topic` sets the one topic and `topics` the list; a second call (which used to add a
    /// topic) is refused instead of silently dropping the first topics.
    #[test]
    fn topics_are_set_once() {
        let unset = || {
            RetryingConsumer::builder(Nop)
                .bootstrap_servers("b:9092")
                .group_id("g")
        };
        let c = unset().topics(["a", "b"]).build().expect("two topics");
        assert_eq!(c.settings.topics, ["a", "b"]);
        let c = unset().topic("a").build().expect("one topic");
        assert_eq!(c.settings.topics, ["a"]);
        for b in [
            unset().topic("a").topic("b"),
            unset().topics(["a"]).topic("b"),
            unset().topic("a").topics(["b", "c"]),
        ] {
            assert_eq!(invalid_setting(b), "topics");
        }
    }

    /// `MissingTopics` reaches the startup settings; zero partitions are refused.
    #[test]
    fn missing_topics_choose_fail_wait_or_create() {
        assert_eq!(
            invalid_setting(base().missing_topics(MissingTopics::create(0))),
            "missing_topics"
        );
        let startup = |m| {
            base()
                .missing_topics(m)
                .build()
                .expect("valid")
                .settings
                .startup
        };
        let s = startup(MissingTopics::create(u16::MAX));
        assert_eq!(s.create.map(|c| c.partitions), Some(65_535));
        assert!(!s.wait_for_topics);
        let s = startup(MissingTopics::Wait);
        assert!(s.wait_for_topics && s.create.is_none());
        let s = startup(MissingTopics::default());
        assert!(!s.wait_for_topics && s.create.is_none());
    }

    #[test]
    fn the_panic_policy_reaches_the_worker() {
        assert!(base().build().expect("valid").worker.retry_panics);
        let c = base().panic_policy(PanicPolicy::DeadLetter).build();
        assert!(!c.expect("valid").worker.retry_panics);
    }

    /// The idempotency value's lease, TTL and outage choice reach the engine; a zero lease
    /// or TTL is refused.
    #[test]
    fn idempotency_is_one_value() {
        for i in [
            idempotency().with_lease(Duration::ZERO),
            idempotency().with_ttl(Duration::ZERO),
        ] {
            assert_eq!(invalid_setting(base().idempotency(i)), "idempotency");
        }
        let c = base()
            .idempotency(
                idempotency()
                    .with_lease(Duration::from_secs(7))
                    .with_ttl(Duration::from_secs(8))
                    .with_store_outage(StoreOutage::RunWithoutDedup),
            )
            .build()
            .expect("valid");
        let d = c.worker.dedup.as_ref().expect("idempotency is on");
        assert_eq!(
            (d.lease, d.ttl),
            (Duration::from_secs(7), Duration::from_secs(8))
        );
        assert!(d.run_without_store_on_outage);
        let c = base().idempotency(idempotency()).build().expect("valid");
        let d = c.worker.dedup.as_ref().expect("idempotency is on");
        assert_eq!(
            (d.lease, d.ttl),
            (Duration::from_secs(60), Duration::from_secs(6 * 3600))
        );
        assert!(!d.run_without_store_on_outage);
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
        builds(base().revoke_timeout(Duration::from_secs(299)));
        builds(
            base()
                .revoke_timeout(Duration::from_secs(500))
                .kafka_config("max.poll.interval.ms", "600000"),
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
            .build()
            .expect("a year is a valid setting");
        assert_eq!(c.settings.shutdown_timeout, YEAR);
        assert_eq!(c.settings.startup.timeout, YEAR);
        assert_eq!(c.settings.commit_interval, YEAR);
        assert_eq!(c.settings.max_broker_outage, Some(YEAR));
        assert_eq!(c.worker.stall_threshold, YEAR);
        assert_eq!(c.worker.handler_timeout, Some(YEAR));
        let c = base()
            .idempotency(
                idempotency()
                    .with_lease(Duration::MAX)
                    .with_ttl(Duration::MAX),
            )
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
        builds(base().retry_tiers(tiers(Duration::from_secs(30 * 86_400))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Every duration setting, the retry policy's, the breaker's and the tiers' at 0,
        /// 1 ns, 1 ms, a year, `Duration::MAX` or anything: `build()` gives a consumer whose
        /// durations are at most a year, or a typed error; it never panics.
        #[test]
        fn build_never_panics_on_extreme_durations(
            d in proptest::collection::vec(crate::consumer::duration_tests::extreme(), 22),
            rate_calls in proptest::sample::select(vec![0u32, 1, 1000, u32::MAX]),
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
                .retry_policy({
                    let (initial, max) = pair(d[10], d[11]);
                    RetryPolicy::exponential(initial, max).with_max_elapsed(d[12])
                })
                .breaker({
                    let (initial, max) = pair(d[13], d[14]);
                    BreakerPolicy::default().with_open_interval(initial, max)
                })
                .destinations({
                    let (initial, max) = pair(d[17], d[18]);
                    Destinations::by_key()
                        .with_open_interval(initial, max)
                        .with_idle_expiry(d[19])
                        .with_gone(crate::GoneRecords::DeadLetter, d[20])
                        .with_rate_limit(rate_calls, d[21])
                });
            if tiers {
                b = b.retry_tiers(crate::tiers::RetryTiers::new([d[15], d[16]]));
            }
            if dedup {
                b = b.idempotency(
                    idempotency()
                        .with_lease(d[8])
                        .with_ttl(d[9]),
                );
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
