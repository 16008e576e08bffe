//! Wiring the notifier: topics, the idempotency store and the [`RetryingConsumer`].
//!
//! This is the part to copy into a service of your own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kourier::batch::{Batched, batched};
use kourier::tiers::{RedisKeyOrderLedger, RetryTiers};
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BreakerPolicy, DedupKey, Handler, Idempotency, Message, MissingTopics, ProcessingOrder,
    RedisIdempotencyStore, RetryPolicy, RetryingConsumer,
};

use crate::event::NotifyEvent;
use crate::mailer::BulkMailer;
#[cfg(feature = "queue")]
use crate::mailer::Mailer;

/// Where the notifier reads from and keeps its state.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) bootstrap: String,
    pub(crate) redis_url: String,
    pub(crate) topic: String,
    pub(crate) group: String,
    /// Partitions of the topic, when it is created; its dead-letter topic, when created, gets
    /// as many partitions as the topic has.
    pub(crate) partitions: i32,
    /// Retry tiers (`--retry-tiers`): delays of the tier topics `<topic>.retry.<n>`, created
    /// when missing; empty: in-place retries only.
    pub(crate) retry_tiers: Vec<Duration>,
}

impl Settings {
    /// kourier's default dead-letter topic for the source topic: `<topic>.dlt`.
    pub(crate) fn dead_letter_topic(&self) -> String {
        format!("{}.dlt", self.topic)
    }

    /// Queue mode's share group: `<group>-queue` (share groups and consumer groups share one
    /// name space on the broker).
    #[cfg(feature = "queue")]
    pub(crate) fn share_group(&self) -> String {
        format!("{}-queue", self.group)
    }
}

/// Creates the topic and its dead-letter topic when they are missing, with kourier's
/// [`TopicAdmin`]: the dead-letter topic gets as many partitions as the topic has, so each
/// dead letter lands in the partition of its source record. Returns the partition counts
/// (existing topics keep theirs).
pub(crate) async fn ensure_topics(settings: &Settings) -> Result<(i32, i32)> {
    let admin = TopicAdmin::new(settings.bootstrap.as_str());
    let source = admin
        .ensure(&[TopicSpec::new(settings.topic.as_str(), settings.partitions)])
        .await
        .with_context(|| format!("creating topic {}", settings.topic))?;
    let topic_partitions = source
        .partitions(&settings.topic)
        .unwrap_or(settings.partitions);
    let dlt = settings.dead_letter_topic();
    let dead_letters = admin
        .ensure(&[TopicSpec::dead_letter(&settings.topic, topic_partitions)])
        .await
        .with_context(|| format!("creating topic {dlt}"))?;
    let dlt_partitions = dead_letters.partitions(&dlt).unwrap_or(topic_partitions);
    for (name, partitions, report) in [
        (&settings.topic, topic_partitions, &source),
        (&dlt, dlt_partitions, &dead_letters),
    ] {
        let how = if report.was_created(name) {
            "created"
        } else {
            "exists"
        };
        tracing::info!(topic = %name, partitions, "topic {how}");
    }
    Ok((topic_partitions, dlt_partitions))
}

/// How transient failures (SMTP 4xx, connection trouble) are retried: 200 ms doubling up to
/// 2 s, with jitter, 4 attempts in all; then the record is dead-lettered as
/// `retries-exhausted`.
pub(crate) fn retry_policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(200), Duration::from_secs(2))
        .with_max_attempts(4)
}

/// The outage breaker: the default trigger (opens once at least half of the last 20 calls
/// failed, counted from 3 calls and with failures of two records at least; no
/// consecutive-failures trigger), probing after 1 s and then twice as long after each failed
/// probe, up to 30 s. A `421` or a refused connection is `unavailable`: each such failure counts
/// as a record of its own.
pub(crate) fn breaker_policy() -> BreakerPolicy {
    BreakerPolicy::default().with_open_interval(Duration::from_secs(1), Duration::from_secs(30))
}

/// Batch mode (`--batch`): the [`BulkMailer`] as a handler. The consumer still runs each
/// record on its own (its Redis claim, retries, dead letter, breaker); the adapter gathers the
/// records running at the same moment — in key order one per user, so a user's mails stay in
/// order — into bulk calls of up to 50 mails, each one SMTP session. A mail waits up to 20 ms
/// for others to join its batch.
pub(crate) fn bulk(mailer: BulkMailer) -> Batched<BulkMailer> {
    batched(mailer)
        .max_records(50)
        .linger(Duration::from_millis(20))
        // Four sessions at most, as many as the single-mail mode's connection pool.
        .max_concurrent_batches(4)
}

/// The consumer: JSON `NotifyEvent`s, one mail per event id (deduplicated in Redis), one record
/// per user at a time (key order), dead letters to `<topic>.dlt`. `handler` is the
/// [`Mailer`](crate::mailer::Mailer) (one mail per call) or, in batch mode, [`bulk`]'s handler.
pub(crate) async fn consumer<H: Handler<Event = NotifyEvent>>(
    settings: &Settings,
    handler: H,
) -> Result<RetryingConsumer<H>> {
    let store = RedisIdempotencyStore::builder(settings.redis_url.as_str())
        .build()
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(settings.bootstrap.as_str())
        .group_id(settings.group.as_str())
        .topic(settings.topic.as_str())
        // Records of one key (user) are mailed in order; different users in parallel.
        .ordering(ProcessingOrder::Key)
        .idempotency(Idempotency::new(
            Arc::new(store),
            DedupKey::from_fn(|m: &Message<NotifyEvent>| Some(m.event().event_id.clone())),
        ))
        .retry_policy(retry_policy())
        // When the relay is down, mails wait for it instead of using up their attempts and
        // filling the dead-letter topic; a probe every 1 s at first (doubling to 30 s).
        .breaker(breaker_policy())
        .commit_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(15));
    if !settings.retry_tiers.is_empty() {
        // A mail that still fails after its in-place attempts waits in a tier topic instead
        // of the dead-letter topic; the user's later mails wait behind it (key order kept
        // across tiers, in a ledger in the same Redis).
        let ledger = RedisKeyOrderLedger::connect(settings.redis_url.as_str())
            .await
            .with_context(|| {
                format!("connecting the key-order ledger to {}", settings.redis_url)
            })?;
        builder = builder
            .retry_tiers(
                RetryTiers::new(settings.retry_tiers.iter().copied())
                    .with_key_order(Arc::new(ledger)),
            )
            .missing_topics(MissingTopics::create(
                u16::try_from(settings.partitions).context("partitions must be 1 to 65535")?,
            ));
    }
    let consumer = builder.build().context("building the consumer")?;
    Ok(consumer)
}

/// Queue mode (`--queue`): the same [`Mailer`], Redis idempotency, retry policy and dead-letter
/// topic over a Kafka share group (kourier's experimental `QueueConsumer`, feature `queue`).
/// The group's members share the records of every partition, one by one, each locked for the
/// member that got it: no per-user order (a user's mails may go out in any order), and members
/// may outnumber partitions. The share group is `<group>-queue` (a share group cannot take a
/// consumer group's name); a new one starts at the earliest record, so records the demo
/// publishes while it joins are not missed. Retry tiers and the outage breaker belong to the
/// consumer-group engine: a refused connection (`unavailable`) holds the mail, its lock
/// renewed, and tries it again after the retry policy's first delay, using no attempt.
#[cfg(feature = "queue")]
pub(crate) async fn queue_consumer(
    settings: &Settings,
    mailer: Mailer,
    observer: impl Fn(&kourier::RawRecord, kourier::RecordOutcome) + Send + Sync + 'static,
) -> Result<kourier::queue::QueueConsumer<Mailer>> {
    if !settings.retry_tiers.is_empty() {
        anyhow::bail!("--retry-tiers is not available in queue mode (--queue)");
    }
    let store = RedisIdempotencyStore::builder(settings.redis_url.as_str())
        .build()
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;
    kourier::queue::QueueConsumer::builder(mailer)
        .bootstrap_servers(settings.bootstrap.as_str())
        .group_id(settings.share_group())
        .topic(settings.topic.as_str())
        .start_from(kourier::queue::StartFrom::Earliest)
        .idempotency(Idempotency::new(
            Arc::new(store),
            DedupKey::from_fn(|m: &Message<NotifyEvent>| Some(m.event().event_id.clone())),
        ))
        .retry_policy(retry_policy())
        .on_outcome(observer)
        .shutdown_timeout(Duration::from_secs(15))
        .build()
        .context("building the queue consumer")
}
