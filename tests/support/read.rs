//! Reading a topic back, from the beginning to its end, as owned records.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

use super::services::{KAFKA_TIMEOUT, client_config};
use super::topics::{topic_partitions, unique_name};

/// How long `read_all` may take to reach the end of a topic.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Stands in for a header key that is not UTF-8 (rdkafka 0.39 cannot hand those out).
pub(crate) const UNREADABLE_HEADER_KEY: &str = "\u{fffd}";

/// A record read back from a topic, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadRecord {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    /// In record order. A key that is not UTF-8 reads as [`UNREADABLE_HEADER_KEY`] with a
    /// `None` value: rdkafka 0.39 panics on such keys, and this helper catches that.
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    /// The same headers, names and values byte for byte (read by kourier, which keeps the
    /// names rdkafka 0.39 cannot hand out).
    pub(crate) raw_headers: kourier::Headers,
    /// Milliseconds since the epoch, when the record has a timestamp.
    pub(crate) timestamp: Option<i64>,
    /// Whether `timestamp` is the broker's log-append time rather than the producer's
    /// create time.
    pub(crate) log_append_time: bool,
}

impl ReadRecord {
    /// The value of the last header named `name` (`Some(None)` for a null-valued header).
    pub(crate) fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    /// The value of the last header named `name` as text; fails the test when the header is
    /// missing, null or not UTF-8.
    pub(crate) fn header_str(&self, name: &str) -> &str {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("missing header {name}"))
            .unwrap_or_else(|| panic!("header {name} is null"));
        std::str::from_utf8(value).unwrap_or_else(|e| panic!("header {name} is not UTF-8: {e}"))
    }
}

/// The record at `partition`/`offset` among `records`; fails the test when there is none.
pub(crate) fn record_at(records: &[ReadRecord], partition: i32, offset: i64) -> &ReadRecord {
    records
        .iter()
        .find(|r| r.partition == partition && r.offset == offset)
        .unwrap_or_else(|| panic!("no record at {partition}@{offset}"))
}

impl From<&BorrowedMessage<'_>> for ReadRecord {
    fn from(m: &BorrowedMessage<'_>) -> ReadRecord {
        let mut headers = Vec::new();
        let raw_headers = m
            .headers()
            .map(kourier::Headers::from_rdkafka)
            .unwrap_or_default();
        if let Some(h) = m.headers() {
            for i in 0..h.count() {
                let header = catch_unwind(AssertUnwindSafe(|| {
                    h.try_get(i)
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                }));
                match header {
                    Ok(Some(kv)) => headers.push(kv),
                    Ok(None) => {}
                    Err(_) => headers.push((UNREADABLE_HEADER_KEY.to_owned(), None)),
                }
            }
        }
        ReadRecord {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
            raw_headers,
            timestamp: m.timestamp().to_millis(),
            log_append_time: matches!(m.timestamp(), Timestamp::LogAppendTime(_)),
        }
    }
}

/// Reads `topic` from the beginning of every partition up to its high watermark as of the
/// call, sorted by (partition, offset). An empty topic gives an empty vector. Assigns the
/// partitions (no group membership) and commits nothing.
pub(crate) async fn read_all(topic: &str) -> Vec<ReadRecord> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_to_end(&topic))
        .await
        .expect("read_all panicked")
}

/// Waits until `topic` holds at least `count` records (at most `timeout`), then returns all
/// of them as [`read_all`] does. Fails the test on timeout, showing how many there were.
pub(crate) async fn read_at_least(topic: &str, count: usize, timeout: Duration) -> Vec<ReadRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_all(topic).await;
        if records.len() >= count {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} holds {} records after {timeout:?}, expected at least {count}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read_to_end(topic: &str) -> Vec<ReadRecord> {
    // rdkafka needs a group id even to assign; this one never joins or commits.
    let consumer: BaseConsumer = client_config()
        .set("group.id", unique_name("read-all"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("create consumer");
    // Partition -> offset to read up to (exclusive).
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    {
        let mut assignment = TopicPartitionList::new();
        for partition in topic_partitions(&consumer, topic) {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                .unwrap_or_else(|e| panic!("watermarks of {topic}/{partition}: {e}"));
            if low < high {
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(low))
                    .expect("valid offset");
                pending.insert(partition, high);
            }
        }
        if pending.is_empty() {
            return Vec::new();
        }
        consumer.assign(&assignment).expect("assign partitions");
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach the high watermarks within {READ_TIMEOUT:?}; \
             still waiting for (partition, end offset) {pending:?}, read {} records",
            records.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let done = pending
                    .get(&m.partition())
                    .is_some_and(|&end| m.offset() + 1 >= end);
                if pending.contains_key(&m.partition()) {
                    records.push(ReadRecord::from(&m));
                }
                if done {
                    pending.remove(&m.partition());
                }
            }
            // The end of the log (past transaction markers, say) also ends a partition.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}
