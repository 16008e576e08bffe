//! The first [`ShareSource`]: krafka's share consumer (explicit acknowledgement), and the
//! startup checks made with krafka's admin client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use krafka::Kafka;
use krafka::admin::{
    AdminClient, ConfigOp, ConfigResource, CreateTopicsOptions, DescribeClusterOptions,
    DescribeConfigsOptions, DescribeFeaturesOptions, IncrementalAlterConfigsOptions, NewTopic,
};
use krafka::consumer::ConsumerRecord;
use krafka::error::{ErrorCode, KrafkaError};
use krafka::share_consumer::{AcknowledgementMode, AcquireMode, ShareConsumer};

use super::QueueError;
use super::source::{Ack, Delivery, ShareSource};
use crate::error::BoxError;
use crate::record::{Header, Headers, RawRecord};

/// The finalized feature that gates share groups (KIP-932); 1 or more turns them on.
pub(super) const SHARE_FEATURE: &str = "share.version";
/// The group config: deliveries of a record before the broker archives it.
pub(super) const DELIVERY_LIMIT: &str = "share.delivery.count.limit";
/// The broker configs bounding [`DELIVERY_LIMIT`], and Kafka 4.4's defaults for them.
const MIN_DELIVERY_LIMIT: (&str, u32) = ("group.share.min.delivery.count.limit", 2);
const MAX_DELIVERY_LIMIT: (&str, u32) = ("group.share.max.delivery.count.limit", 10);
/// The group config naming the share group's dead-letter queue topic (KIP-1191).
pub(super) const DLQ_TOPIC: &str = "errors.deadletterqueue.topic.name";
/// The group config that makes the broker's letter a copy of the record besides its
/// `__dlq.errors.*` headers (off by default: the headers alone, no key, no value).
pub(super) const DLQ_COPY_RECORD: &str = "errors.deadletterqueue.copy.record.enable";
/// The topic config a dead-letter queue topic must have set to `true`.
pub(super) const DLQ_GROUP_ENABLE: &str = "errors.deadletterqueue.group.enable";
/// The broker config: the prefix every dead-letter queue topic name must have.
pub(super) const DLQ_PREFIX: (&str, &str) = ("errors.deadletterqueue.topic.name.prefix", "dlq.");

/// A share consumer of krafka's, subscribed to one topic.
pub(super) struct KrafkaSource {
    consumer: ShareConsumer,
    /// Acknowledgement requests refused, counted by krafka's callback (which sees every
    /// request: piggybacked on fetches, sent by `commit` or `close`).
    refused: Arc<AtomicU64>,
}

/// What the startup needs from the builder's settings.
pub(super) struct Connect<'a> {
    pub(super) bootstrap: &'a str,
    pub(super) group: &'a str,
    pub(super) topic: &'a str,
    pub(super) max_records: usize,
    pub(super) reset: &'static str,
    pub(super) lock_duration: Option<Duration>,
    pub(super) delivery_limit: Option<u32>,
    /// The broker's dead-letter queue topic (KIP-1191), when configured.
    pub(super) broker_dlq: Option<&'a str>,
    /// Create (or opt in) the broker's dead-letter queue topic when it is missing (or has
    /// not opted in), with `partitions` partitions.
    pub(super) create_missing_topics: bool,
    pub(super) partitions: i32,
    pub(super) timeout: Duration,
}

fn client(operation: &'static str, source: krafka::error::KrafkaError) -> QueueError {
    QueueError::Client {
        operation,
        source: Box::new(source),
    }
}

impl KrafkaSource {
    /// Connects, checks that the cluster runs share groups, sets the group's configs and
    /// joins the group.
    pub(super) async fn connect(c: Connect<'_>) -> Result<Self, QueueError> {
        let unreachable = || QueueError::BrokersUnreachable {
            servers: c.bootstrap.to_owned(),
            after: c.timeout,
        };
        let kafka = tokio::time::timeout(
            c.timeout,
            Kafka::builder(c.bootstrap)
                .client_id("kourier-queue")
                .request_timeout(c.timeout)
                .connect(),
        )
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| client("connecting", e))?;
        let admin = kafka.admin();

        let features = tokio::time::timeout(
            c.timeout,
            admin.describe_features(DescribeFeaturesOptions::default()),
        )
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| client("describing the cluster's features", e))?;
        let level = features
            .finalized
            .iter()
            .find(|f| f.name == SHARE_FEATURE)
            .map_or(0, |f| f.max_version_level);
        if level < 1 {
            return Err(QueueError::ShareGroupsUnsupported {
                feature: SHARE_FEATURE,
                level,
            });
        }

        let mut ops = vec![ConfigOp::set("share.auto.offset.reset", c.reset)];
        let broker = if c.delivery_limit.is_some() || c.broker_dlq.is_some() {
            broker_configs(&admin, c.timeout)
                .await
                .map_err(|e| e.unwrap_or_else(unreachable))?
        } else {
            BrokerConfigs::default()
        };
        if let Some(limit) = c.delivery_limit {
            let (min, max) = (broker.min_delivery_limit, broker.max_delivery_limit);
            if !(min..=max).contains(&limit) {
                return Err(QueueError::DeliveryLimit {
                    requested: limit,
                    min,
                    max,
                });
            }
            ops.push(ConfigOp::set(DELIVERY_LIMIT, limit.to_string()));
        }
        if let Some(dlq) = c.broker_dlq {
            ensure_broker_dlq(&admin, dlq, &broker.dlq_prefix, &c)
                .await
                .map_err(|e| e.unwrap_or_else(unreachable))?;
            ops.push(ConfigOp::set(DLQ_TOPIC, dlq));
            ops.push(ConfigOp::set(DLQ_COPY_RECORD, "true"));
        }
        if let Some(lock) = c.lock_duration {
            ops.push(ConfigOp::set(
                "share.record.lock.duration.ms",
                lock.as_millis().to_string(),
            ));
        }
        let results = tokio::time::timeout(
            c.timeout,
            admin.incremental_alter_configs(
                [(ConfigResource::group(c.group), ops)],
                IncrementalAlterConfigsOptions::default(),
            ),
        )
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| client("setting the share group's configs", e))?;
        for (_, result) in results {
            if let Err(e) = result {
                return Err(match c.lock_duration {
                    // The broker names the refused setting and the allowed range in its
                    // message (`group.share.min/max.record.lock.duration.ms`).
                    Some(lock) if e.to_string().contains("lock.duration") => {
                        QueueError::LockDuration {
                            requested: lock,
                            reason: e.to_string(),
                        }
                    }
                    _ => QueueError::GroupConfig {
                        group: c.group.to_owned(),
                        reason: e.to_string(),
                    },
                });
            }
        }

        let max = i32::try_from(c.max_records).unwrap_or(i32::MAX);
        let refused = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&refused);
        let group = c.group.to_owned();
        let consumer = kafka
            .share_consumer(c.group)
            .acknowledgement_commit_callback(move |commit| {
                if let Err(e) = &commit.result {
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(group, topic = commit.topic, partition = commit.partition, offsets = ?commit.offsets, error = %e, "the broker refused acknowledgements (a lock that ran out: the records may be handled again)");
                }
            })
            .acknowledgement_mode(AcknowledgementMode::Explicit)
            // A hard bound (Kafka 4.2+): the member holds locks on at most `max` records.
            .acquire_mode(AcquireMode::RecordLimit)
            .max_poll_records(max)
            .batch_size(max)
            .build()
            .await
            .map_err(|e| client("building the share consumer", e))?;
        consumer
            .subscribe([c.topic])
            .await
            .map_err(|e| client("subscribing", e))?;
        Ok(KrafkaSource { consumer, refused })
    }
}

/// What the startup checks read from a broker: the bounds of a share group's delivery limit
/// and the prefix of dead-letter queue topics.
struct BrokerConfigs {
    min_delivery_limit: u32,
    max_delivery_limit: u32,
    dlq_prefix: String,
}

impl Default for BrokerConfigs {
    /// Kafka 4.4's defaults.
    fn default() -> Self {
        BrokerConfigs {
            min_delivery_limit: MIN_DELIVERY_LIMIT.1,
            max_delivery_limit: MAX_DELIVERY_LIMIT.1,
            dlq_prefix: DLQ_PREFIX.1.to_owned(),
        }
    }
}

/// `group.share.min/max.delivery.count.limit` and `errors.deadletterqueue.topic.name.prefix`
/// as one broker of the cluster says (settings of every broker; Kafka's defaults for those it
/// does not report). `Err(None)`: no answer within `timeout`.
async fn broker_configs(
    admin: &AdminClient,
    timeout: Duration,
) -> Result<BrokerConfigs, Option<QueueError>> {
    let reading = |e| Some(client("reading the broker's share-group configs", e));
    let cluster = tokio::time::timeout(
        timeout,
        admin.describe_cluster(DescribeClusterOptions::default()),
    )
    .await
    .map_err(|_| None)?
    .map_err(reading)?;
    let mut configs = BrokerConfigs::default();
    let Some(broker) = cluster.brokers.first() else {
        return Ok(configs);
    };
    let resource = ConfigResource::broker(broker.id);
    let names = [MIN_DELIVERY_LIMIT.0, MAX_DELIVERY_LIMIT.0, DLQ_PREFIX.0];
    let mut described = tokio::time::timeout(
        timeout,
        admin.describe_configs(
            [resource.clone()],
            DescribeConfigsOptions::default()
                .config_names(names.iter().map(|n| (*n).to_owned()).collect()),
        ),
    )
    .await
    .map_err(|_| None)?
    .map_err(reading)?;
    let entries = described
        .remove(&resource)
        .unwrap_or_else(|| Ok(Vec::new()))
        .map_err(reading)?;
    let value = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .map(str::trim)
    };
    let number = |name: &str| value(name).and_then(|v| v.parse::<u32>().ok());
    if let Some(min) = number(MIN_DELIVERY_LIMIT.0) {
        configs.min_delivery_limit = min;
    }
    if let Some(max) = number(MAX_DELIVERY_LIMIT.0) {
        configs.max_delivery_limit = max;
    }
    if let Some(prefix) = value(DLQ_PREFIX.0) {
        prefix.clone_into(&mut configs.dlq_prefix);
    }
    Ok(configs)
}

/// Checks the broker's dead-letter queue topic `dlq`: its name has the broker's `prefix`, it
/// exists and it has opted in (`errors.deadletterqueue.group.enable=true`); with
/// `create_missing_topics`, creates it opted in, or opts it in. `Err(None)`: no answer within
/// the timeout.
async fn ensure_broker_dlq(
    admin: &AdminClient,
    dlq: &str,
    prefix: &str,
    c: &Connect<'_>,
) -> Result<(), Option<QueueError>> {
    let refused = |setting: &'static str, problem: String| {
        Some(QueueError::BrokerDeadLetterQueue {
            topic: dlq.to_owned(),
            setting,
            problem,
        })
    };
    if !dlq.starts_with(prefix) || dlq.len() == prefix.len() {
        return Err(refused(
            DLQ_PREFIX.0,
            format!("the name must start with the broker's prefix `{prefix}`"),
        ));
    }
    let resource = ConfigResource::topic(dlq);
    let mut described = tokio::time::timeout(
        c.timeout,
        admin.describe_configs(
            [resource.clone()],
            DescribeConfigsOptions::default().config_names(vec![DLQ_GROUP_ENABLE.to_owned()]),
        ),
    )
    .await
    .map_err(|_| None)?
    .map_err(|e| Some(client("describing the dead-letter queue topic", e)))?;
    let enabled = match described.remove(&resource) {
        Some(Ok(entries)) => entries
            .iter()
            .find(|e| e.name == DLQ_GROUP_ENABLE)
            .and_then(|e| e.value.as_deref())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
        Some(Err(KrafkaError::Broker {
            code: ErrorCode::UnknownTopicOrPartition,
            ..
        }))
        | None => {
            if !c.create_missing_topics {
                return Err(Some(QueueError::MissingTopics {
                    topics: vec![dlq.to_owned()],
                }));
            }
            let topic = NewTopic::new(dlq, c.partitions, -1)
                .map_err(|e| Some(client("creating the dead-letter queue topic", e)))?
                .with_config(DLQ_GROUP_ENABLE, "true");
            let created = tokio::time::timeout(
                c.timeout,
                admin.create_topics([topic], CreateTopicsOptions::default()),
            )
            .await
            .map_err(|_| None)?
            .map_err(|e| Some(client("creating the dead-letter queue topic", e)))?;
            for (_, result) in created {
                match result {
                    // Created meanwhile by another member: opted in below like any other.
                    Err(KrafkaError::Broker {
                        code: ErrorCode::TopicAlreadyExists,
                        ..
                    }) => return Box::pin(ensure_broker_dlq(admin, dlq, prefix, c)).await,
                    Err(e) => {
                        return Err(Some(client("creating the dead-letter queue topic", e)));
                    }
                    Ok(()) => {}
                }
            }
            tracing::info!(topic = dlq, "created the broker's dead-letter queue topic");
            true
        }
        Some(Err(e)) => {
            return Err(Some(client("describing the dead-letter queue topic", e)));
        }
    };
    if enabled {
        return Ok(());
    }
    if !c.create_missing_topics {
        return Err(refused(
            DLQ_GROUP_ENABLE,
            format!(
                "the topic's `{DLQ_GROUP_ENABLE}` is not `true`: the broker would archive \
                 records silently (set it, or `create_missing_topics(true)` sets it)"
            ),
        ));
    }
    let altered = tokio::time::timeout(
        c.timeout,
        admin.incremental_alter_configs(
            [(resource, vec![ConfigOp::set(DLQ_GROUP_ENABLE, "true")])],
            IncrementalAlterConfigsOptions::default(),
        ),
    )
    .await
    .map_err(|_| None)?
    .map_err(|e| Some(client("opting the dead-letter queue topic in", e)))?;
    for (_, result) in altered {
        result.map_err(|e| refused(DLQ_GROUP_ENABLE, format!("setting it failed: {e}")))?;
    }
    tracing::info!(
        topic = dlq,
        "set {DLQ_GROUP_ENABLE}=true on the broker's dead-letter queue topic"
    );
    Ok(())
}

/// kourier's record from krafka's. krafka gives header names as `String` (a name that is not
/// UTF-8 arrives with U+FFFD in it): those bytes are what the dead letter keeps.
fn raw_record(r: &ConsumerRecord) -> RawRecord {
    let mut headers = Headers::new();
    for (name, value) in &r.headers {
        headers.push(match value {
            Some(v) => Header::new(name.as_bytes(), v.as_ref()),
            None => Header::null(name.as_bytes()),
        });
    }
    let mut raw = RawRecord::builder(r.topic.as_ref())
        .partition(r.partition)
        .offset(r.offset)
        .build();
    raw.key = r.key.as_ref().map(|k| k.as_ref().into());
    raw.value = r.value.as_ref().map(|v| v.as_ref().into());
    raw.headers = headers;
    // A negative timestamp is Kafka's "none".
    raw.timestamp = (r.timestamp >= 0).then_some(r.timestamp);
    raw.log_append_time = matches!(
        r.timestamp_type,
        krafka::consumer::TimestampType::LogAppendTime
    );
    raw
}

#[async_trait]
impl ShareSource for KrafkaSource {
    type Token = ConsumerRecord;

    async fn poll(&self, wait: Duration) -> Result<Vec<Delivery<ConsumerRecord>>, BoxError> {
        let records = self.consumer.poll(wait).await?;
        Ok(records
            .into_iter()
            .map(|r| Delivery {
                record: Arc::new(raw_record(&r)),
                // The broker's count is an i16 from 1; anything else is clamped (delivery
                // rule 17 in the crate docs: what a record carries is untrusted).
                delivery_count: r.delivery_count.map(|c| c.max(1).unsigned_abs()),
                token: r,
            })
            .collect())
    }

    fn settle(&self, token: &ConsumerRecord, ack: Ack) -> Result<(), BoxError> {
        match ack {
            Ack::Accept => self.consumer.ack(token)?,
            Ack::Release => self.consumer.release(token)?,
        }
        Ok(())
    }

    fn renew(&self, token: &ConsumerRecord) -> Result<(), BoxError> {
        Ok(self.consumer.renew(token)?)
    }

    async fn flush(&self) {
        // Outcomes reach the callback (counted in `refused`); a failed call is logged here.
        if let Err(e) = self.consumer.commit().await {
            tracing::warn!(error = %e, "sending acknowledgements failed");
        }
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn lock_duration(&self) -> Option<Duration> {
        self.consumer.acquisition_lock_timeout()
    }

    async fn close(&self) {
        if let Err(e) = self.consumer.close().await {
            tracing::warn!(error = %e, "closing the share consumer failed");
        }
    }
}
