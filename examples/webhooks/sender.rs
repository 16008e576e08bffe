//! Wiring the sender: topics, the idempotency store, the retry tiers and the
//! [`RetryingConsumer`] with a breaker per endpoint.
//!
//! This is the part to copy into a service of your own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kourier::tiers::{RedisKeyOrderLedger, RetryTiers};
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BreakerPolicy, DedupKey, Destinations, GoneRecords, Idempotency, MissingTopics,
    ProcessingOrder, RedisIdempotencyStore, RetryPolicy, RetryingConsumer,
};

use crate::delivery::Deliverer;
use crate::event::{EVENT_ID_HEADER, WebhookEvent};

/// Where the sender reads from and keeps its state, and how it treats endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) bootstrap: String,
    pub(crate) redis_url: String,
    pub(crate) topic: String,
    pub(crate) group: String,
    /// Partitions of the topic, when it is created; its dead-letter and tier topics, when
    /// created, get as many.
    pub(crate) partitions: i32,
    /// Delays of the retry tiers `<topic>.retry.<n>` (created when missing); empty: in-place
    /// retries only.
    pub(crate) retry_tiers: Vec<Duration>,
    /// Each request's timeout.
    pub(crate) request_timeout: Duration,
    /// At most this many calls per second to one endpoint.
    pub(crate) endpoint_rate: u32,
    /// The consumer-wide breaker opens only when the failures span this many endpoints.
    pub(crate) min_failing_endpoints: u32,
}

impl Settings {
    /// kourier's default dead-letter topic for the source topic: `<topic>.dlt`.
    pub(crate) fn dead_letter_topic(&self) -> String {
        format!("{}.dlt", self.topic)
    }
}

/// Creates the topic and its dead-letter topic when they are missing (the dead-letter topic
/// with as many partitions as the topic has); returns their partition counts.
pub(crate) async fn ensure_topics(settings: &Settings) -> Result<(i32, i32)> {
    let admin = TopicAdmin::new(settings.bootstrap.as_str());
    let source = admin
        .ensure(&[TopicSpec::new(settings.topic.as_str(), settings.partitions)])
        .await
        .with_context(|| format!("creating topic {}", settings.topic))?;
    let partitions = source
        .partitions(&settings.topic)
        .unwrap_or(settings.partitions);
    let dlt = settings.dead_letter_topic();
    let dead_letters = admin
        .ensure(&[TopicSpec::dead_letter(&settings.topic, partitions)])
        .await
        .with_context(|| format!("creating topic {dlt}"))?;
    Ok((
        partitions,
        dead_letters.partitions(&dlt).unwrap_or(partitions),
    ))
}

/// In-place retries of a transient failure (a `5xx`, a timeout): 100 ms doubling to 1 s, with
/// jitter, 3 attempts in all; then the next retry tier (then the dead-letter topic as
/// `retries-exhausted`).
pub(crate) fn retry_policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1))
        .with_max_attempts(3)
}

/// A breaker per endpoint (the record key): an endpoint that is down (`503`, refused
/// connections) or asks for a pause (`429`) opens at once, three failures in a row (of two
/// webhooks at least) open it too; its webhooks wait, the others run. It is probed after 1 s,
/// then twice as long after each failed probe, up to 30 s (a `Retry-After` keeps it open at
/// least that long). An endpoint that answered `410 Gone` has its webhooks dead-lettered
/// without a call for an hour (kourier's default, spelled out). And at most `rate` calls a
/// second to any one endpoint.
pub(crate) fn destinations(rate: u32) -> Destinations<WebhookEvent> {
    Destinations::by_key()
        .with_open_interval(Duration::from_secs(1), Duration::from_secs(30))
        .with_gone(GoneRecords::DeadLetter, Duration::from_secs(3600))
        .with_rate_limit(rate, Duration::from_secs(1))
}

/// The consumer-wide breaker: the default trigger (half of the last 20 calls failed), but only
/// when the failures span `min_endpoints` endpoints or more: then the trouble is ours (our
/// network, a proxy, DNS), not the endpoints', and nothing is sent until a probe gets through
/// (after 1 s, doubling up to 30 s).
pub(crate) fn breaker_policy(min_endpoints: u32) -> BreakerPolicy {
    BreakerPolicy::default()
        .with_open_interval(Duration::from_secs(1), Duration::from_secs(30))
        .with_min_destinations(min_endpoints)
}

/// The consumer: JSON `WebhookEvent`s keyed by endpoint, one endpoint's webhooks in order
/// (key order, kept through the retry tiers by a ledger in Redis), each event delivered once
/// (deduplicated in Redis by its `event-id` header), dead letters to `<topic>.dlt`.
pub(crate) async fn consumer(
    settings: &Settings,
    deliverer: Deliverer,
) -> Result<RetryingConsumer<Deliverer>> {
    let store = RedisIdempotencyStore::builder(settings.redis_url.as_str())
        .build()
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;
    let mut builder = RetryingConsumer::builder(deliverer)
        .bootstrap_servers(settings.bootstrap.as_str())
        .group_id(settings.group.as_str())
        .topic(settings.topic.as_str())
        // One endpoint's webhooks in order; different endpoints in parallel. An endpoint's
        // records waiting for it hold no in-flight slot: the others take them.
        .ordering(ProcessingOrder::Key)
        .idempotency(Idempotency::new(
            Arc::new(store),
            DedupKey::header(EVENT_ID_HEADER),
        ))
        .retry_policy(retry_policy())
        .destinations(destinations(settings.endpoint_rate))
        .breaker(breaker_policy(settings.min_failing_endpoints))
        .commit_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(15));
    if !settings.retry_tiers.is_empty() {
        // A webhook that still fails after its in-place attempts waits in a tier topic
        // instead of the dead-letter topic; its endpoint's later webhooks wait behind it.
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
    builder.build().context("building the consumer")
}
