//! Wiring the notifier: topics, the idempotency store and the [`RetryingConsumer`].
//!
//! This is the part to copy into a service of your own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kourier::{DedupKey, Message, Ordering, RedisIdempotencyStore, RetryPolicy, RetryingConsumer};

use crate::event::NotifyEvent;
use crate::kafka::ensure_topic;
use crate::mailer::Mailer;

/// Where the notifier reads from and keeps its state.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) bootstrap: String,
    pub(crate) redis_url: String,
    pub(crate) topic: String,
    pub(crate) group: String,
    /// Partitions of the topic and of its dead-letter topic, when they are created.
    pub(crate) partitions: i32,
}

impl Settings {
    /// kourier's default dead-letter topic for the source topic: `<topic>.dlt`.
    pub(crate) fn dead_letter_topic(&self) -> String {
        format!("{}.dlt", self.topic)
    }
}

/// Creates the topic and its dead-letter topic when they are missing. Returns the partition
/// counts (existing topics keep theirs).
pub(crate) async fn ensure_topics(settings: &Settings) -> Result<(i32, i32)> {
    let (topic_partitions, created) =
        ensure_topic(&settings.bootstrap, &settings.topic, settings.partitions).await?;
    let dlt = settings.dead_letter_topic();
    let (dlt_partitions, dlt_created) =
        ensure_topic(&settings.bootstrap, &dlt, settings.partitions).await?;
    for (name, partitions, created) in [
        (&settings.topic, topic_partitions, created),
        (&dlt, dlt_partitions, dlt_created),
    ] {
        let how = if created { "created" } else { "exists" };
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

/// The consumer: JSON `NotifyEvent`s, one mail per event id (deduplicated in Redis), one record
/// per user at a time (key order), dead letters to `<topic>.dlt`.
pub(crate) async fn consumer(
    settings: &Settings,
    mailer: Mailer,
) -> Result<RetryingConsumer<Mailer>> {
    let store = RedisIdempotencyStore::builder(settings.redis_url.as_str())
        .build()
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;
    let consumer = RetryingConsumer::builder(mailer)
        .bootstrap_servers(settings.bootstrap.as_str())
        .group_id(settings.group.as_str())
        .topic(settings.topic.as_str())
        // Records of one key (user) are mailed in order; different users in parallel.
        .ordering(Ordering::Key)
        .idempotency(
            Arc::new(store),
            DedupKey::from_fn(|m: &Message<NotifyEvent>| Some(m.event().event_id.clone())),
        )
        .retry_policy(retry_policy())
        .commit_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(15))
        .build()
        .context("building the consumer")?;
    Ok(consumer)
}
