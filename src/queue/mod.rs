//! **Experimental.** Queue mode: the same [`Handler`] over a Kafka share group (KIP-932,
//! "queues for Kafka"), feature `queue`.
//!
//! A share group hands records to its members one by one, each locked for the member that
//! got it (the broker's *acquisition lock*) and settled per record: ACCEPT (done), RELEASE
//! (deliver again) or REJECT (archive). Members can outnumber partitions, and one slow
//! record never holds up a partition. When every event is independent — a mail, a push
//! notification — this is the natural model. A [`QueueConsumer`] runs the handler, codec,
//! [`IdempotencyStore`](crate::IdempotencyStore) (through [`Idempotency`]),
//! [`DeadLetterSink`], outcome observer and [`RetryPolicy`] of a
//! [`RetryingConsumer`](crate::RetryingConsumer) over a share group.
//!
//! ```no_run
//! use kourier::queue::QueueConsumer;
//! use kourier::{handler_fn, HandlerError, Message};
//!
//! # async fn run() -> Result<(), kourier::queue::QueueError> {
//! let handler = handler_fn(|m: Message<String>| async move {
//!     println!("{}", m.event());
//!     Ok::<(), HandlerError>(())
//! });
//! let report = QueueConsumer::builder(handler)
//!     .bootstrap_servers("127.0.0.1:9092")
//!     .group_id("notifier")
//!     .topic("notify.v1") // and its dead-letter topic notify.v1.dlt
//!     .build()?
//!     .run_until_signal()
//!     .await?;
//! println!("{report:?}");
//! # Ok(())
//! # }
//! ```
//!
//! # Why experimental
//!
//! The client. rdkafka 0.39 (librdkafka 2.12) has no share consumer; librdkafka's (2.15 and
//! later) is a Preview, "not for production". Queue mode runs on the pure-Rust client
//! [`krafka`](https://docs.rs/krafka) 0.28, which passed every trial against Kafka 4.4 but
//! is young. The engine reaches the client through one crate-private seam (a source of
//! locked records with accept, release and lock renewal), so a librdkafka-backed source can
//! replace it later without changing this API. The API may still change in a minor release.
//!
//! **Rust 1.95**: krafka's minimum Rust version; the rest of kourier needs 1.88.
//! The broker must be Kafka 4.2 or later with share groups on (`share.version` ≥ 1, the
//! default on a cluster formatted by 4.2+).
//!
//! # Semantics
//!
//! | what happens | queue mode | (consumer group, for comparison) |
//! |---|---|---|
//! | the handler succeeds | ACCEPT | offset committed once contiguous |
//! | a transient failure | retried in place with the [`RetryPolicy`]'s back-off while the record stays locked, its lock renewed every third of the lock duration | retried in place, partition lane held |
//! | attempts exhausted | kourier's own dead letter (the same letter and provenance headers, reason `retries-exhausted`, through the [`DeadLetterSink`]), then ACCEPT | the same letter, then commit |
//! | a permanent failure, a record the codec cannot decode (poison pill), a panicking dedup-key function | dead letter at once (`permanent`, `decode`, `panic`), then ACCEPT | the same |
//! | a panicking handler | retried like a transient failure, then dead letter `panic` | the same (by default) |
//! | [`HandlerError::unavailable`](crate::HandlerError::unavailable) | the record is held, its lock renewed, and tried again with back-off (or after the hint), using no attempt | the same |
//! | the outage breaker is open ([`breaker`](QueueConsumerBuilder::breaker)) | records wait before their next attempt, locked (locks renewed), using no attempt, never dead-lettered for it; one probe per open interval | the same, by partition |
//! | the dedup key is already done | ACCEPT without calling the handler | skip and commit |
//! | the dedup key is held by another member (a copy of the event) | the record waits (lock renewed), then is skipped once the key is done, or runs if it was released | the same |
//! | a handler outliving the idempotency lease | its claim is renewed every third of the lease | the same |
//! | a dead-letter write fails | retried (0.5 s doubling to 5 s) while the lock is renewed; never dropped | retried, the offset waits |
//! | shutdown | records not started are RELEASEd at once (another member takes them); running ones get [`shutdown_timeout`](QueueConsumerBuilder::shutdown_timeout), then are RELEASEd; records waiting (a back-off, a busy key, a failing sink) are RELEASEd at once | the same, by offsets |
//! | the member crashes (kill -9) | the broker releases its records when the connection closes, or when their locks run out | uncommitted offsets are read again |
//! | a record delivered `share.delivery.count.limit` times (default 5, or [`delivery_limit`](QueueConsumerBuilder::delivery_limit): its member crashed, froze, was killed or stopped while it ran each time) | the broker archives it: **no dead letter** is written by kourier (it never saw it fail); with [`broker_dead_letter_queue`](QueueConsumerBuilder::broker_dead_letter_queue) the broker writes a copy to that `dlq.*` topic, with `__dlq.errors.*` headers (topic, partition, offset, group, delivery count, message) | delivered again after every restart |
//! | redelivered record | [`Message::delivery_count`](crate::Message::delivery_count) is the broker's delivery count (across crashes and lock expiries), logged when above 1; [`Message::attempt`](crate::Message::attempt) counts this delivery's attempts | — |
//! | ordering | **none**: records of one partition, of one key, run in parallel on one or several members | [`ProcessingOrder`](crate::ProcessingOrder) |
//!
//! The broker's own dead-letter queue (KIP-1191) is only a backstop, off unless
//! [`broker_dead_letter_queue`](QueueConsumerBuilder::broker_dead_letter_queue) names a
//! topic: kourier REJECTs nothing (its letter keeps the provenance headers and the reason,
//! which the broker's does not), it writes its own letter and ACCEPTs. The broker's letter
//! is for the records kourier could not settle: delivered the delivery limit times (tested
//! under a limit of 2: a record abandoned at a stop twice, and a record whose member process
//! was killed with SIGKILL twice, land there).
//!
//! Duplicates remain possible, as with a consumer group: a record whose lock ran out (the
//! process frozen longer than the lock, or renewals not reaching the broker) is delivered to
//! another member while the first may still finish it. The first member's late ACCEPT is
//! refused while the record waits for its next delivery
//! ([`QueueReport::acknowledgement_failures`], logged), but once another member has
//! ACCEPTed it, Kafka 4.4 answers the late ACCEPT with success: that duplicate is reported
//! nowhere (measured). An [`Idempotency`] store makes the second delivery wait for the
//! first's claim (renewed while it runs), then skip it.
//!
//! # Not (yet) in queue mode
//!
//! Header names that are not UTF-8: krafka 0.28 hands them over as text, each invalid byte
//! replaced by U+FFFD, so a dead letter keeps such a name changed (`b"\xff\xfeid"` arrives
//! as `"\u{fffd}\u{fffd}id"`, measured); the consumer-group engine keeps it byte for byte.
//!
//! Per-destination breakers, retry tiers and the consumer monitor belong to the
//! consumer-group engine and are not wired here. A held record holds its slot (its
//! `max_in_flight` place) while it waits. A batch holds at most
//! [`fetch_size`](QueueConsumerBuilder::fetch_size) records, and the next batch is
//! fetched once every record of the current one is settled (the share consumer's explicit
//! mode requires it), so one slow record delays the member's next fetch (not the other
//! members). Settlements travel with the next fetch (no round trip of their own); lock
//! renewals are sent at once. A new member gets its first records on its second heartbeat:
//! about 5 s after it starts with the broker's default `group.share.heartbeat.interval.ms`.
//!
//! # Metrics
//!
//! A queue consumer records [kourier's metrics](crate::metrics) under the same names and
//! labels as a [`RetryingConsumer`](crate::RetryingConsumer), `group` being the share group:
//! `kourier_records_consumed_total` (records the share group handed over, redeliveries
//! included), `kourier_records_handled_total`, `kourier_records_retried_total` (by the
//! attempt that failed, within one delivery), `kourier_records_dead_lettered_total` (by
//! kind), `kourier_duplicates_skipped_total`, `kourier_idempotency_store_errors_total`,
//! `kourier_dead_letter_write_failures_total`, `kourier_handler_duration_seconds`,
//! `kourier_records_in_flight` (records started and not yet settled; records of a batch
//! waiting for a slot are not in it), `kourier_handler_panics_total`,
//! `kourier_records_abandoned_total` (given up at shutdown and RELEASEd; the records of a
//! batch RELEASEd before they started are in [`QueueReport::released_unstarted`] only) and,
//! with a [`breaker`](QueueConsumerBuilder::breaker), `kourier_breaker_state`,
//! `kourier_breaker_transitions_total` and `kourier_breaker_held_failures_total`.
//!
//! Not recorded, as they do not apply to a share group (their series are not registered):
//! `kourier_consumer_lag` and `kourier_partition_paused` (no partition is assigned to a
//! member, and none is paused), `kourier_commit_duration_seconds` and
//! `kourier_commit_failures_total` (no offsets are committed: settlements travel with the
//! fetches; refused ones are [`QueueReport::acknowledgement_failures`]),
//! `kourier_connection_state`, `kourier_records_stalled_total` (no stall threshold),
//! `kourier_records_forwarded_total` and `kourier_forward_failures_total` (no retry tiers),
//! and the per-destination breakers' metrics.
//!
//! # Startup checks
//!
//! [`QueueConsumer::run`] checks, within [`startup_timeout`](QueueConsumerBuilder::startup_timeout),
//! and answers with a [`QueueError`] naming what is wrong: the brokers answer
//! ([`QueueError::BrokersUnreachable`]); share groups are on
//! ([`QueueError::ShareGroupsUnsupported`]); the group's `share.auto.offset.reset` is set
//! ([`start_from`](QueueConsumerBuilder::start_from), default earliest: a new group reads
//! the records already in the topic) and, when set, its `share.record.lock.duration.ms`
//! within the broker's `group.share.min/max.record.lock.duration.ms`
//! ([`QueueError::LockDuration`]); when [`delivery_limit`](QueueConsumerBuilder::delivery_limit)
//! is set, that it lies within the broker's `group.share.min/max.delivery.count.limit`
//! (read from a broker; 2 to 10 by default), then set as the group's
//! `share.delivery.count.limit` ([`QueueError::DeliveryLimit`], naming the value and the
//! range); when [`broker_dead_letter_queue`](QueueConsumerBuilder::broker_dead_letter_queue)
//! is set, that its name starts with the broker's `errors.deadletterqueue.topic.name.prefix`
//! (`dlq.`) and that the topic exists with `errors.deadletterqueue.group.enable=true`
//! ([`QueueError::BrokerDeadLetterQueue`] naming the topic and the setting,
//! [`QueueError::MissingTopics`]; [`create_missing_topics`](QueueConsumerBuilder::create_missing_topics)
//! creates it or sets the config), then the group's `errors.deadletterqueue.topic.name` and
//! `errors.deadletterqueue.copy.record.enable=true` are set; the topic and its dead-letter topics exist, or are created
//! with [`create_missing_topics`](QueueConsumerBuilder::create_missing_topics)
//! ([`QueueError::MissingTopics`]).

mod engine;
mod krafka_source;
mod source;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::engine::{Counts, Engine, Stops};
use self::krafka_source::{Connect, KrafkaSource};
use self::source::ShareSource as _;
use crate::codec::{Codec, JsonCodec};
use crate::consumer::{Breaker, OutageGate, OutcomeObserver};
use crate::dead_letter::DeadLetterSink;
use crate::error::{BoxError, ConfigError};
use crate::handler::Handler;
use crate::metrics::ConsumerMetrics;
use crate::record::RawRecord;
use crate::retry::RetryPolicy;
use crate::topics::{TopicAdmin, TopicSpec};
use crate::{BreakerPolicy, Idempotency, KafkaDeadLetterSink, RecordOutcome};

/// Where a new share group starts reading: the group config `share.auto.offset.reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// The earliest record still in the topic (kourier's default: a queue's records are
    /// work to do, whenever they were written).
    #[default]
    Earliest,
    /// Records written after the group started (the broker's default).
    Latest,
}

impl StartFrom {
    fn config_value(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// Why a [`QueueConsumer`] could not be built or could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A setting is missing or out of range (from `build()`).
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    /// The brokers did not answer within the startup timeout.
    #[error("kafka brokers {servers} unreachable for {after:?}")]
    BrokersUnreachable {
        /// The bootstrap servers.
        servers: String,
        /// The startup timeout.
        after: Duration,
    },
    /// The cluster does not run share groups: the finalized feature level is below 1
    /// (Kafka before 4.2, or a cluster where `share.version` was not raised:
    /// `kafka-features.sh upgrade --feature share.version=1`).
    #[error(
        "the cluster does not run share groups: feature `{feature}` is at level {level} (1 or more needed)"
    )]
    ShareGroupsUnsupported {
        /// The feature's name, `share.version`.
        feature: &'static str,
        /// Its finalized level (0 when the cluster does not know it).
        level: i16,
    },
    /// The broker refused the lock duration set with
    /// [`lock_duration`](QueueConsumerBuilder::lock_duration): it is outside the broker's
    /// `group.share.min.record.lock.duration.ms` ..= `group.share.max.record.lock.duration.ms`.
    #[error("lock duration {requested:?} refused by the broker: {reason}")]
    LockDuration {
        /// The lock duration asked for.
        requested: Duration,
        /// The broker's answer (it names the allowed range).
        reason: String,
    },
    /// The delivery limit set with [`delivery_limit`](QueueConsumerBuilder::delivery_limit)
    /// is outside the broker's `group.share.min.delivery.count.limit` ..=
    /// `group.share.max.delivery.count.limit` (2 ..= 10 by default).
    #[error(
        "delivery limit {requested} is outside the broker's range {min}..={max} \
         (group.share.min/max.delivery.count.limit)"
    )]
    DeliveryLimit {
        /// The delivery limit asked for.
        requested: u32,
        /// The broker's `group.share.min.delivery.count.limit`.
        min: u32,
        /// The broker's `group.share.max.delivery.count.limit`.
        max: u32,
    },
    /// The broker's dead-letter queue topic set with
    /// [`broker_dead_letter_queue`](QueueConsumerBuilder::broker_dead_letter_queue) cannot
    /// be used: its name lacks the broker's prefix (`errors.deadletterqueue.topic.name.prefix`,
    /// `dlq.` by default), or the topic has not opted in
    /// (`errors.deadletterqueue.group.enable=true`; without it the broker archives the
    /// records silently). A missing topic is [`QueueError::MissingTopics`].
    #[error("broker dead-letter queue topic {topic} ({setting}): {problem}")]
    BrokerDeadLetterQueue {
        /// The topic.
        topic: String,
        /// The setting that is not right: `errors.deadletterqueue.topic.name.prefix` (a
        /// broker config) or `errors.deadletterqueue.group.enable` (the topic's).
        setting: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The broker refused the share group's configs (`share.auto.offset.reset`), e.g. for
    /// lack of the ALTER_CONFIGS permission on the group.
    #[error("share group {group}: the broker refused its configs: {reason}")]
    GroupConfig {
        /// The share group.
        group: String,
        /// The broker's answer.
        reason: String,
    },
    /// Topics the consumer needs do not exist (the source topic, its dead-letter topics).
    #[error("missing topics: {} (set `create_missing_topics(true)` to create them)", topics.join(", "))]
    MissingTopics {
        /// The topics that do not exist.
        topics: Vec<String>,
    },
    /// Checking or creating the topics failed.
    #[error("checking the topics failed")]
    Topics(#[source] Box<crate::Error>),
    /// The default dead-letter sink could not be built (from `build()`).
    #[error("building the dead-letter sink failed")]
    DeadLetterSink(#[source] Box<crate::Error>),
    /// The share-group client failed.
    #[error("share-group client error during {operation}")]
    Client {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
}

/// What a [`QueueConsumer`] did, from [`QueueConsumer::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueReport {
    /// Records whose handler succeeded (ACCEPTed).
    pub handled: u64,
    /// Records skipped because their dedup key was done (ACCEPTed).
    pub duplicates: u64,
    /// Records dead-lettered by kourier (ACCEPTed after the sink's acknowledgement).
    pub dead_lettered: u64,
    /// Records of the last batch not started at shutdown, RELEASEd for other members.
    pub released_unstarted: u64,
    /// Records given up while running or waiting at shutdown, RELEASEd.
    pub abandoned: u64,
    /// Acknowledgement requests (accepts, releases, renewals; counted per partition and
    /// request) the broker refused, most often for a lock that had run out: such a record
    /// may have been handled twice. A late ACCEPT of a
    /// record another member ACCEPTed already is answered with success by the broker, and
    /// not counted (see the [module docs](self#semantics)).
    pub acknowledgement_failures: u64,
}

/// **Experimental.** Runs a [`Handler`] over a Kafka share group. See the
/// [module docs](self) for the semantics; build one with [`QueueConsumer::builder`].
pub struct QueueConsumer<H: Handler, C = JsonCodec<<H as Handler>::Event>> {
    engine: Engine<H, C>,
    fetch_size: usize,
    bootstrap: String,
    topic: String,
    start_from: StartFrom,
    lock_duration: Option<Duration>,
    delivery_limit: Option<u32>,
    broker_dlq: Option<String>,
    startup_timeout: Duration,
    create_missing_topics: bool,
    partitions: i32,
}

impl<H: Handler, C> fmt::Debug for QueueConsumer<H, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConsumer")
            .field("group", &self.engine.group)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> QueueConsumer<H> {
    /// A builder for a queue consumer running `handler`, decoding JSON until
    /// [`codec`](QueueConsumerBuilder::codec) says otherwise.
    pub fn builder(handler: H) -> QueueConsumerBuilder<H> {
        QueueConsumerBuilder {
            handler,
            codec: JsonCodec::new(),
            bootstrap: None,
            group: None,
            topic: None,
            retry: RetryPolicy::default(),
            sink: None,
            idempotency: None,
            observer: None,
            breaker: None,
            max_in_flight: 16,
            fetch_size: None,
            shutdown_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(30),
            start_from: StartFrom::Earliest,
            lock_duration: None,
            delivery_limit: None,
            broker_dlq: None,
            create_missing_topics: false,
            partitions: 1,
        }
    }
}

impl<H: Handler, C: Codec<H::Event>> QueueConsumer<H, C> {
    /// Runs until `shutdown` resolves, then RELEASEs what did not start, lets running records
    /// finish within the shutdown timeout, sends the last acknowledgements and leaves the
    /// group.
    ///
    /// # Errors
    /// A [`QueueError`] from the startup checks (see the [module docs](self#startup-checks)).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<QueueReport, QueueError> {
        self.ensure_topics().await?;
        let source = KrafkaSource::connect(Connect {
            bootstrap: &self.bootstrap,
            group: &self.engine.group,
            topic: &self.topic,
            max_records: self.fetch_size,
            reset: self.start_from.config_value(),
            lock_duration: self.lock_duration,
            delivery_limit: self.delivery_limit,
            broker_dlq: self.broker_dlq.as_deref(),
            create_missing_topics: self.create_missing_topics,
            partitions: self.partitions,
            timeout: self.startup_timeout,
        })
        .await?;
        tracing::info!(group = %self.engine.group, topic = %self.topic, "queue consumer joined its share group");
        // The handles are taken now: a recorder installed before `run` sees every metric.
        self.engine.metrics.start_queue();
        if self.engine.gate.0.is_some() {
            self.engine.metrics.breaker_start();
        }
        let stops = Stops {
            stop: CancellationToken::new(),
            hard: CancellationToken::new(),
        };
        let run = self.engine.run(&source, &stops);
        tokio::pin!(run);
        tokio::select! {
            () = &mut run => {}
            () = shutdown => {
                stops.stop.cancel();
                let hard = async {
                    tokio::time::sleep(self.engine.shutdown_timeout).await;
                    stops.hard.cancel();
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    () = &mut run => {}
                    () = hard => {}
                }
            }
        }
        let mut report = self.engine.counts.report();
        report.acknowledgement_failures = source.refused();
        tracing::info!(group = %self.engine.group, ?report, "queue consumer stopped");
        Ok(report)
    }

    /// [`run`](Self::run) until SIGINT (Ctrl-C) or SIGTERM.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_until_signal(self) -> Result<QueueReport, QueueError> {
        self.run(crate::shutdown_signal()).await
    }

    async fn ensure_topics(&self) -> Result<(), QueueError> {
        let mut topics = vec![self.topic.clone()];
        topics.extend(self.engine.sink.topics_for(&self.topic));
        let admin = TopicAdmin::new(self.bootstrap.clone()).timeout(self.startup_timeout);
        let missing = admin
            .missing(&topics)
            .await
            .map_err(|e| unreachable_or(e, self))?;
        if missing.is_empty() {
            return Ok(());
        }
        if !self.create_missing_topics {
            return Err(QueueError::MissingTopics { topics: missing });
        }
        let specs: Vec<TopicSpec> = missing
            .iter()
            .map(|t| TopicSpec::new(t.clone(), self.partitions))
            .collect();
        admin
            .ensure(&specs)
            .await
            .map_err(|e| unreachable_or(e, self))?;
        Ok(())
    }
}

fn unreachable_or<H: Handler, C>(e: crate::Error, c: &QueueConsumer<H, C>) -> QueueError {
    if crate::topics::cluster_unreachable(&e) {
        QueueError::BrokersUnreachable {
            servers: c.bootstrap.clone(),
            after: c.startup_timeout,
        }
    } else {
        QueueError::Topics(Box::new(e))
    }
}

/// Builds a [`QueueConsumer`]; start with [`QueueConsumer::builder`]. The same parts as a
/// [`RetryingConsumerBuilder`](crate::RetryingConsumerBuilder), and the share group's own
/// settings.
#[must_use]
pub struct QueueConsumerBuilder<H: Handler, C = JsonCodec<<H as Handler>::Event>> {
    handler: H,
    codec: C,
    bootstrap: Option<String>,
    group: Option<String>,
    topic: Option<String>,
    retry: RetryPolicy,
    sink: Option<Arc<dyn DeadLetterSink>>,
    idempotency: Option<Idempotency<H::Event>>,
    observer: Option<OutcomeObserver>,
    breaker: Option<BreakerPolicy>,
    max_in_flight: usize,
    fetch_size: Option<usize>,
    shutdown_timeout: Duration,
    startup_timeout: Duration,
    start_from: StartFrom,
    lock_duration: Option<Duration>,
    delivery_limit: Option<u32>,
    broker_dlq: Option<String>,
    create_missing_topics: bool,
    partitions: i32,
}

impl<H: Handler, C> fmt::Debug for QueueConsumerBuilder<H, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConsumerBuilder")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .field("retry", &self.retry)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<H: Handler, C: Codec<H::Event>> QueueConsumerBuilder<H, C> {
    /// The Kafka bootstrap servers (required).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = Some(servers.into());
        self
    }

    /// The share group (required). Share groups and consumer groups have separate names
    /// spaces in practice: do not reuse a consumer group's name.
    pub fn group_id(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The topic to consume (required; one topic).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// How records are decoded. Default: JSON.
    pub fn codec<D: Codec<H::Event>>(self, codec: D) -> QueueConsumerBuilder<H, D> {
        QueueConsumerBuilder {
            handler: self.handler,
            codec,
            bootstrap: self.bootstrap,
            group: self.group,
            topic: self.topic,
            retry: self.retry,
            sink: self.sink,
            idempotency: self.idempotency,
            observer: self.observer,
            breaker: self.breaker,
            max_in_flight: self.max_in_flight,
            fetch_size: self.fetch_size,
            shutdown_timeout: self.shutdown_timeout,
            startup_timeout: self.startup_timeout,
            start_from: self.start_from,
            lock_duration: self.lock_duration,
            delivery_limit: self.delivery_limit,
            broker_dlq: self.broker_dlq,
            create_missing_topics: self.create_missing_topics,
            partitions: self.partitions,
        }
    }

    /// The retry policy of transient failures, retried in place while the record stays
    /// locked. Default: [`RetryPolicy::default`] (4 attempts, 500 ms apart).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Where dead letters go. Default: a [`KafkaDeadLetterSink`] writing to `<topic>.dlt`.
    pub fn dead_letter_sink(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Idempotency, as for a consumer group: a record whose dedup key is done is ACCEPTed
    /// without calling the handler; a key busy elsewhere makes the record wait (its lock
    /// renewed). Keys are namespaced by the share group. Default: none.
    pub fn idempotency(mut self, idempotency: Idempotency<H::Event>) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    /// Calls `observer` with each record and its [`RecordOutcome`] when its life ends
    /// (`Handled`, `Duplicate`, `DeadLettered`, `Abandoned`), before it is settled. Keep it
    /// short; a panic in it is logged.
    pub fn on_outcome<F>(mut self, observer: F) -> Self
    where
        F: Fn(&RawRecord, RecordOutcome) + Send + Sync + 'static,
    {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Turns on the outage breaker, as for a consumer group (delivery rule 16 in the crate
    /// docs): when transient failures cross the policy's threshold the breaker opens and
    /// records wait — still locked, their locks renewed, using no attempt, never
    /// dead-lettered for it — until a probe record gets through. Default: none (a
    /// [`HandlerError::unavailable`](crate::HandlerError::unavailable) failure still holds
    /// its record without using an attempt).
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.breaker = Some(policy);
        self
    }

    /// The most records this member runs at once. Default 16; at least 1.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// The most records one fetch takes (and this member holds locked): records of a batch
    /// beyond [`max_in_flight`](Self::max_in_flight) wait locked (renewed) for a free slot,
    /// and are RELEASEd at once at shutdown. Default: `max_in_flight`; at least
    /// `max_in_flight`.
    pub fn fetch_size(mut self, n: usize) -> Self {
        self.fetch_size = Some(n);
        self
    }

    /// How long running records may take to finish after the shutdown signal before they are
    /// RELEASEd. Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = crate::clock::bounded(timeout);
        self
    }

    /// How long the startup checks may take. Default 30 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = crate::clock::bounded(timeout);
        self
    }

    /// Where the share group starts, set as its `share.auto.offset.reset` at start.
    /// Default [`StartFrom::Earliest`].
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Sets the group's lock duration (`share.record.lock.duration.ms`) at start; the broker
    /// refuses one outside its `group.share.min/max.record.lock.duration.ms` (15 s to 60 s by
    /// default): [`QueueError::LockDuration`]. Default: the broker's (30 s). Locks are
    /// renewed every third of it while a record is held.
    pub fn lock_duration(mut self, lock: Duration) -> Self {
        self.lock_duration = Some(crate::clock::bounded(lock));
        self
    }

    /// Sets the group's delivery limit (`share.delivery.count.limit`) at start: how many
    /// times the broker delivers a record before it archives it. A delivery ends without a
    /// settlement when its member crashes, freezes past the lock or is stopped while the
    /// record runs (RELEASEd); kourier's own failures never use one (they are retried in
    /// place, then dead-lettered and ACCEPTed). The startup check refuses a limit outside the
    /// broker's `group.share.min/max.delivery.count.limit` (2 to 10 by default):
    /// [`QueueError::DeliveryLimit`]. Default: the group's current limit (the broker's
    /// `group.share.delivery.count.limit`, 5, for a new group). What the broker does with the
    /// record then: see [`broker_dead_letter_queue`](Self::broker_dead_letter_queue).
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// A backstop: the broker's own dead-letter queue (KIP-1191, Kafka 4.2+) for records the
    /// broker gives up on — delivered [`delivery_limit`](Self::delivery_limit) times without
    /// being settled (their member crashed, froze past the lock, or was stopped while they
    /// ran). Without it the broker archives such a record silently. kourier's own dead
    /// letters (failures it saw, through the [`DeadLetterSink`]) are unchanged.
    ///
    /// At start kourier sets the group's `errors.deadletterqueue.topic.name` to `topic` and
    /// `errors.deadletterqueue.copy.record.enable=true` (the broker's letter is a copy of the
    /// record, with the broker's `__dlq.errors.*` headers: topic, partition, offset, group,
    /// delivery count, message; without it, the headers alone), after checking that the name starts with the
    /// broker's `errors.deadletterqueue.topic.name.prefix` (`dlq.` by default) and that the
    /// topic exists with `errors.deadletterqueue.group.enable=true`: else
    /// [`QueueError::BrokerDeadLetterQueue`] (or [`QueueError::MissingTopics`]), unless
    /// [`create_missing_topics`](Self::create_missing_topics) creates the topic or sets the
    /// config. Default: none (kourier leaves the group's own setting as it is).
    pub fn broker_dead_letter_queue(mut self, topic: impl Into<String>) -> Self {
        self.broker_dlq = Some(topic.into());
        self
    }

    /// Creates the topic and its dead-letter topics when missing, with
    /// [`partitions`](Self::partitions) partitions each. Default: off (a missing topic is
    /// [`QueueError::MissingTopics`]).
    pub fn create_missing_topics(mut self, create: bool) -> Self {
        self.create_missing_topics = create;
        self
    }

    /// The partition count of topics created by
    /// [`create_missing_topics`](Self::create_missing_topics). Default 1 (share-group
    /// members do not need partitions to scale).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Checks the settings and builds the consumer; it connects in
    /// [`run`](QueueConsumer::run).
    ///
    /// # Errors
    /// [`QueueError::Config`] for a missing bootstrap server, group or topic, a zero
    /// `max_in_flight`, partitions below 1, a zero lock duration or an invalid retry policy.
    pub fn build(self) -> Result<QueueConsumer<H, C>, QueueError> {
        let config = QueueError::Config;
        let bootstrap = self
            .bootstrap
            .filter(|s| !s.trim().is_empty())
            .ok_or(config(ConfigError::Missing("bootstrap_servers")))?;
        let group = self
            .group
            .filter(|s| !s.is_empty())
            .ok_or(config(ConfigError::Missing("group_id")))?;
        let topic = self
            .topic
            .filter(|s| !s.is_empty())
            .ok_or(config(ConfigError::Missing("topic")))?;
        if self.max_in_flight == 0 {
            return Err(config(ConfigError::invalid(
                "max_in_flight",
                "must be at least 1",
            )));
        }
        let fetch_size = self.fetch_size.unwrap_or(self.max_in_flight);
        if fetch_size < self.max_in_flight {
            return Err(config(ConfigError::invalid(
                "fetch_size",
                "must be at least max_in_flight",
            )));
        }
        if self.partitions < 1 {
            return Err(config(ConfigError::invalid(
                "partitions",
                "must be at least 1",
            )));
        }
        if self.lock_duration.is_some_and(|l| l.is_zero()) {
            return Err(config(ConfigError::invalid(
                "lock_duration",
                "must not be zero",
            )));
        }
        self.retry.validate().map_err(config)?;
        if let Some(policy) = &self.breaker {
            policy.validate().map_err(config)?;
        }
        let metrics = Arc::new(ConsumerMetrics::new_queue(&group, &topic));
        let gate = OutageGate(
            self.breaker
                .map(|policy| Arc::new(Breaker::new(policy, Arc::clone(&metrics)))),
        );
        let sink = match self.sink {
            Some(sink) => sink,
            None => Arc::new(
                KafkaDeadLetterSink::builder(bootstrap.clone())
                    .build()
                    .map_err(|e| QueueError::DeadLetterSink(Box::new(e)))?,
            ),
        };
        Ok(QueueConsumer {
            engine: Engine {
                handler: self.handler,
                codec: self.codec,
                retry: self.retry,
                sink,
                dedup: self.idempotency.map(|i| i.into_dedup(group.clone())),
                observer: self.observer,
                gate,
                group,
                max_in_flight: self.max_in_flight,
                shutdown_timeout: self.shutdown_timeout,
                counts: Counts::default(),
                metrics,
            },
            fetch_size,
            bootstrap,
            topic,
            start_from: self.start_from,
            lock_duration: self.lock_duration,
            delivery_limit: self.delivery_limit,
            broker_dlq: self.broker_dlq,
            startup_timeout: self.startup_timeout,
            create_missing_topics: self.create_missing_topics,
            partitions: self.partitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HandlerError, Message, handler_fn};

    fn builder() -> QueueConsumerBuilder<impl Handler<Event = String>> {
        QueueConsumer::builder(handler_fn(|_m: Message<String>| async {
            Ok::<(), HandlerError>(())
        }))
        .bootstrap_servers("127.0.0.1:9")
        .group_id("g")
        .topic("t")
    }

    fn config_error(b: QueueConsumerBuilder<impl Handler<Event = String>>) -> ConfigError {
        match b.build() {
            Err(QueueError::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn build_refuses_missing_and_out_of_range_settings() {
        let missing = QueueConsumer::builder(handler_fn(|_m: Message<String>| async {
            Ok::<(), HandlerError>(())
        }))
        .group_id("g")
        .topic("t");
        assert_eq!(
            config_error(missing),
            ConfigError::Missing("bootstrap_servers")
        );
        assert_eq!(
            config_error(builder().group_id("")),
            ConfigError::Missing("group_id")
        );
        assert!(matches!(
            config_error(builder().max_in_flight(0)),
            ConfigError::Invalid {
                setting: "max_in_flight",
                ..
            }
        ));
        assert!(matches!(
            config_error(builder().max_in_flight(8).fetch_size(4)),
            ConfigError::Invalid {
                setting: "fetch_size",
                ..
            }
        ));
        assert!(matches!(
            config_error(builder().lock_duration(Duration::ZERO)),
            ConfigError::Invalid {
                setting: "lock_duration",
                ..
            }
        ));
        assert!(matches!(
            config_error(builder().partitions(0)),
            ConfigError::Invalid {
                setting: "partitions",
                ..
            }
        ));
    }

    #[test]
    fn build_takes_good_settings_and_defaults_the_fetch_to_max_in_flight() {
        let consumer = builder().max_in_flight(8).build().unwrap();
        assert_eq!(consumer.fetch_size, 8);
        assert_eq!(consumer.start_from, StartFrom::Earliest);
        let consumer = builder().max_in_flight(2).fetch_size(10).build().unwrap();
        assert_eq!(consumer.fetch_size, 10);
    }
}
