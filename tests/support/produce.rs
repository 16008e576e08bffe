//! Producing test records: keys, values and headers, with nulls where a test wants them.
//! (A header key that is not UTF-8 needs the raw protocol: see `raw_produce.rs`.)

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::services::{START_HINT, client_config};

/// A record to produce. `None` key or value means null; `partition: None` lets the producer
/// choose (by key hash, or sticky for null keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TestRecord {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) partition: Option<i32>,
}

impl TestRecord {
    /// A record with null key, null value, no headers, any partition.
    pub(crate) fn new() -> TestRecord {
        TestRecord::default()
    }

    pub(crate) fn key(mut self, key: impl AsRef<[u8]>) -> TestRecord {
        self.key = Some(key.as_ref().to_vec());
        self
    }

    pub(crate) fn value(mut self, value: impl AsRef<[u8]>) -> TestRecord {
        self.value = Some(value.as_ref().to_vec());
        self
    }

    /// Appends a header; `None` is a null-valued header. Names may repeat.
    pub(crate) fn header(mut self, name: impl Into<String>, value: Option<Vec<u8>>) -> TestRecord {
        self.headers.push((name.into(), value));
        self
    }

    pub(crate) fn partition(mut self, partition: i32) -> TestRecord {
        self.partition = Some(partition);
        self
    }
}

/// Produces `records` in order (acks=all, idempotent) and waits for every delivery.
/// Returns the `(partition, offset)` of each record, in input order.
pub(crate) async fn produce(topic: &str, records: Vec<TestRecord>) -> Vec<(i32, i64)> {
    let producer: FutureProducer = client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    let mut deliveries = Vec::with_capacity(records.len());
    for record in &records {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut future = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        if let Some(value) = &record.value {
            future = future.payload(value);
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        // Enqueue everything before awaiting, so the batch is pipelined in order.
        loop {
            match producer.send_result(future) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => panic!("produce to {topic}: {e}"),
            }
        }
    }
    let mut coordinates = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.into_iter().enumerate() {
        match delivery.await.expect("producer dropped a delivery") {
            Ok(d) => coordinates.push((d.partition, d.offset)),
            Err((e, _)) => panic!("record #{i} to {topic} not delivered: {e}; {START_HINT}"),
        }
    }
    coordinates
}
