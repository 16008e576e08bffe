//! The runner's Kafka client: topics, producing the events, log ends, the group's commits, and
//! reading the dead-letter topic back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kourier::dead_letter::headers as dlt_headers;
use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::rdkafka::message::Message as _;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::rdkafka::{Offset, TopicPartitionList};

use crate::BoxResult;
use crate::event::Event;

/// A record of the dead-letter topic, as the checks see it.
pub(crate) struct Letter {
    pub(crate) id: Option<u64>,
    /// The source partition and offset, from the provenance headers.
    pub(crate) source: Option<(i32, i64)>,
    pub(crate) kind: Option<String>,
    pub(crate) attempts: Option<String>,
    /// The dead-letter partition it landed in.
    pub(crate) partition: i32,
    /// Its key (the source record's).
    pub(crate) key: Option<Vec<u8>>,
}

pub(crate) struct Kafka {
    bootstrap: String,
    /// Reads the group's commits (never joins it) and metadata.
    offsets: BaseConsumer,
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

impl Kafka {
    pub(crate) fn new(bootstrap: &str, group: &str) -> BoxResult<Kafka> {
        let offsets: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Kafka {
            bootstrap: bootstrap.to_owned(),
            offsets,
        })
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    pub(crate) fn require(&self) -> BoxResult<()> {
        let brokers = self
            .offsets
            .fetch_metadata(None, KAFKA_TIMEOUT)
            .map_err(|e| {
                format!(
                    "Kafka is not reachable at {} ({e}); start it with `scripts/services up`",
                    self.bootstrap
                )
            })?
            .brokers()
            .len();
        if brokers == 0 {
            return Err(format!("Kafka at {} lists no brokers", self.bootstrap).into());
        }
        Ok(())
    }

    pub(crate) async fn create_topics(&self, names: &[&str], partitions: i32) -> BoxResult<()> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("create topic {t}: {code}").into()),
            }
        }
        // Wait until every partition has a leader.
        let until = Instant::now() + Duration::from_secs(30);
        for name in names {
            loop {
                let ready = self
                    .offsets
                    .fetch_metadata(Some(name), KAFKA_TIMEOUT)
                    .ok()
                    .and_then(|m| {
                        m.topics().iter().find(|t| t.name() == *name).map(|t| {
                            t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    })
                    .unwrap_or(false);
                if ready {
                    break;
                }
                if Instant::now() > until {
                    return Err(format!("topic {name} not ready after 30 s").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub(crate) async fn delete_topics(&self, names: &[&str]) -> BoxResult<()> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
        admin.delete_topics(names, &options).await?;
        Ok(())
    }

    /// Produces every event (acks=all, idempotent: per-key order holds) and waits for all
    /// acknowledgements.
    pub(crate) async fn produce(&self, topic: &str, events: &[Event]) -> BoxResult<()> {
        let producer: FutureProducer = self
            .config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("message.timeout.ms", "60000")
            .create()?;
        let mut pending = Vec::with_capacity(events.len());
        for ev in events {
            let value = serde_json::to_vec(ev)?;
            let mut record = FutureRecord::to(topic).key(&ev.key).payload(&value);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(format!("produce to {topic}: {e}").into()),
                }
            }
        }
        for (id, delivery) in pending.into_iter().enumerate() {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(format!("event {id} not delivered: {e}").into()),
                Err(_) => return Err(format!("event {id}: delivery dropped").into()),
            }
        }
        Ok(())
    }

    /// The high watermark of each partition.
    pub(crate) fn log_end(&self, topic: &str, partitions: i32) -> BoxResult<Vec<i64>> {
        (0..partitions)
            .map(|p| {
                self.offsets
                    .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                    .map(|(_, high)| high)
                    .map_err(|e| format!("watermarks of {topic}/{p}: {e}").into())
            })
            .collect()
    }

    /// The group's committed offset of each partition (0 where nothing is committed).
    pub(crate) fn committed(
        &self,
        (topic, partitions): &(String, i32),
    ) -> Result<Vec<i64>, KafkaError> {
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition_range(topic, 0, partitions - 1);
        let committed = self
            .offsets
            .committed_offsets(wanted, Duration::from_secs(5))?;
        let mut out = vec![0; *partitions as usize];
        for e in committed.elements_for_topic(topic) {
            if let Offset::Offset(o) = e.offset() {
                out[e.partition() as usize] = o;
            }
        }
        Ok(out)
    }

    /// Every record of `topic`, parsed as a dead letter.
    pub(crate) fn read_all(&self, topic: &str, partitions: i32) -> BoxResult<Vec<Letter>> {
        let reader: BaseConsumer = self
            .config()
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
        let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
        {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                let (low, high) = reader.fetch_watermarks(topic, p, KAFKA_TIMEOUT)?;
                if low < high {
                    tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
                    pending.insert(p, high);
                }
            }
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            reader.assign(&tpl)?;
        }
        let mut out = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            if Instant::now() > until {
                return Err(format!("reading {topic} timed out; left {pending:?}").into());
            }
            match reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(m)) => {
                    let Some(&end) = pending.get(&m.partition()) else {
                        continue;
                    };
                    // Through kourier's headers: rdkafka's getters panic on header names
                    // that are not UTF-8, which dead letters keep.
                    let headers = m.headers().map(kourier::Headers::from_rdkafka);
                    let bytes = |name: &str| {
                        headers
                            .as_ref()
                            .and_then(|h| h.get(name).map(<[u8]>::to_vec))
                    };
                    let header =
                        |name: &str| bytes(name).map(|v| String::from_utf8_lossy(&v).into_owned());
                    let partition = bytes(dlt_headers::ORIGINAL_PARTITION)
                        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                        .map(i32::from_be_bytes);
                    let offset = bytes(dlt_headers::ORIGINAL_OFFSET)
                        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                        .map(i64::from_be_bytes);
                    out.push(Letter {
                        id: m
                            .payload()
                            .and_then(|v| serde_json::from_slice::<Event>(v).ok())
                            .map(|e| e.id),
                        source: partition.zip(offset),
                        kind: header(dlt_headers::FAILURE_KIND),
                        attempts: header(dlt_headers::ATTEMPTS),
                        partition: m.partition(),
                        key: m.key().map(<[u8]>::to_vec),
                    });
                    if m.offset() + 1 >= end {
                        pending.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(format!("reading {topic}: {e}").into()),
            }
        }
        Ok(out)
    }
}
