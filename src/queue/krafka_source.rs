//! The first [`ShareSource`]: krafka's share consumer (explicit acknowledgement), and the
//! startup checks made with krafka's admin client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use krafka::Kafka;
use krafka::admin::{
    AdminClient, ConfigOp, ConfigResource, DescribeClusterOptions, DescribeConfigsOptions,
    DescribeFeaturesOptions, IncrementalAlterConfigsOptions,
};
use krafka::consumer::ConsumerRecord;
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
pub(super) const MIN_DELIVERY_LIMIT: (&str, u32) = ("group.share.min.delivery.count.limit", 2);
pub(super) const MAX_DELIVERY_LIMIT: (&str, u32) = ("group.share.max.delivery.count.limit", 10);

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
        if let Some(limit) = c.delivery_limit {
            let (min, max) = delivery_limit_range(&admin, c.timeout)
                .await
                .map_err(|e| e.unwrap_or_else(unreachable))?;
            if !(min..=max).contains(&limit) {
                return Err(QueueError::DeliveryLimit {
                    requested: limit,
                    min,
                    max,
                });
            }
            ops.push(ConfigOp::set(DELIVERY_LIMIT, limit.to_string()));
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

/// The broker's bounds of a share group's delivery limit:
/// `group.share.min/max.delivery.count.limit` as one broker of the cluster says (a setting of
/// every broker; Kafka's defaults when it reports none). `Err(None)`: no answer within
/// `timeout`.
async fn delivery_limit_range(
    admin: &AdminClient,
    timeout: Duration,
) -> Result<(u32, u32), Option<QueueError>> {
    let reading = |e| Some(client("reading the broker's delivery count limits", e));
    let cluster = tokio::time::timeout(
        timeout,
        admin.describe_cluster(DescribeClusterOptions::default()),
    )
    .await
    .map_err(|_| None)?
    .map_err(reading)?;
    let Some(broker) = cluster.brokers.first() else {
        return Ok((MIN_DELIVERY_LIMIT.1, MAX_DELIVERY_LIMIT.1));
    };
    let resource = ConfigResource::broker(broker.id);
    let names = [MIN_DELIVERY_LIMIT, MAX_DELIVERY_LIMIT];
    let mut configs = tokio::time::timeout(
        timeout,
        admin.describe_configs(
            [resource.clone()],
            DescribeConfigsOptions::default()
                .config_names(names.iter().map(|(n, _)| (*n).to_owned()).collect()),
        ),
    )
    .await
    .map_err(|_| None)?
    .map_err(reading)?;
    let entries = configs
        .remove(&resource)
        .unwrap_or_else(|| Ok(Vec::new()))
        .map_err(reading)?;
    let [min, max] = names.map(|(name, default)| {
        entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(default)
    });
    Ok((min, max))
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
