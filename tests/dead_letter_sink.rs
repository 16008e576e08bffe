//! `KafkaDeadLetterSink` against the real broker: what a dead letter looks like (key, value,
//! headers, provenance encodings), where it lands, oversized records and a missing topic.
//!
//! Needs Kafka at `KAFKA_BOOTSTRAP_SERVERS` (default 127.0.0.1:9092): `scripts/services up`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kourier::dead_letter::{MAX_ERROR_MESSAGE_BYTES, headers};
use kourier::rdkafka::Message as _;
use kourier::rdkafka::message::{Headers as _, OwnedMessage, Timestamp};
use kourier::{
    DeadLetter, DeadLetterReason, DeadLetterSink, Header, Headers, KafkaDeadLetterSink, RawRecord,
    java_partition,
};

use self::kafka::{bootstrap, create_topic, read_all, require_kafka, unique_name};

const KEY: &[u8] = b"user-42";

fn record(topic: &str, partition: i32, key: Option<&[u8]>, value: Option<Vec<u8>>) -> RawRecord {
    let mut headers = Headers::new().with("event-id", "e-1");
    headers.push(Header::null("trace-parent"));
    headers.push(Header::new("binary", vec![0u8, 0xff, 0x10]));
    RawRecord {
        topic: topic.to_owned(),
        partition,
        offset: 1234,
        key: key.map(<[u8]>::to_vec),
        value,
        headers,
        timestamp: Some(1_700_000_000_123),
        log_append_time: false,
    }
}

fn letter(record: RawRecord) -> DeadLetter {
    DeadLetter {
        record: Arc::new(record),
        reason: DeadLetterReason::RetriesExhausted,
        error: "smtp 550: mailbox unavailable".into(),
        attempts: 4,
        first_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_001_000),
        last_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_002_500),
        group_id: "notifier".into(),
    }
}

fn sink() -> KafkaDeadLetterSink {
    KafkaDeadLetterSink::builder(bootstrap())
        .send_timeout(Duration::from_secs(10))
        .build()
        .expect("sink builds")
}

/// The record's headers as (name, value) pairs, in order, null values as `None`.
fn header_list(message: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    message.headers().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect()
    })
}

fn only<'a>(list: &'a [(String, Option<Vec<u8>>)], name: &str) -> Option<&'a [u8]> {
    let mut found = list.iter().filter(|(k, _)| k == name);
    let (_, value) = found.next()?;
    assert!(
        found.next().is_none(),
        "header {name} appears more than once"
    );
    value.as_deref()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn at(messages: &[OwnedMessage], partition: i32, offset: i64) -> &OwnedMessage {
    messages
        .iter()
        .find(|m| m.partition() == partition && m.offset() == offset)
        .unwrap_or_else(|| panic!("no record at {partition}@{offset}"))
}

#[tokio::test]
async fn dead_letter_keeps_key_value_headers_and_carries_provenance() {
    require_kafka().await;
    let source = unique_name("dl-full");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 3, &[]).await;
    let sink = sink();
    let value = br#"{"to":"nobody@example.com"}"#.to_vec();
    let before = now_ms();

    let receipt = sink
        .send(&letter(record(&source, 2, Some(KEY), Some(value.clone()))))
        .await
        .expect("dead letter written");
    assert_eq!(receipt.topic, dlt);
    assert_eq!(receipt.partition, Some(2), "same partition as the source");

    let messages = read_all(&dlt, 1).await;
    let m = at(&messages, 2, receipt.offset.unwrap());
    assert_eq!(m.key(), Some(KEY));
    assert_eq!(m.payload(), Some(value.as_slice()));
    // The dead letter is timestamped when it was written; the original time is a header.
    match m.timestamp() {
        Timestamp::CreateTime(ts) => assert!(ts >= before - 1000, "timestamp {ts} is not recent"),
        other => panic!("unexpected timestamp {other:?}"),
    }

    let list = header_list(m);
    assert_eq!(
        &list[..3],
        &[
            ("event-id".to_owned(), Some(b"e-1".to_vec())),
            ("trace-parent".to_owned(), None),
            ("binary".to_owned(), Some(vec![0u8, 0xff, 0x10])),
        ],
        "original headers first, in order, null value kept null"
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_TOPIC),
        Some(source.as_bytes())
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_PARTITION),
        Some(&2i32.to_be_bytes()[..])
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_OFFSET),
        Some(&1234i64.to_be_bytes()[..])
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_TIMESTAMP),
        Some(&1_700_000_000_123i64.to_be_bytes()[..])
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_TIMESTAMP_TYPE),
        Some(&b"CreateTime"[..])
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_CONSUMER_GROUP),
        Some(&b"notifier"[..])
    );
    assert_eq!(
        only(&list, headers::EXCEPTION_MESSAGE),
        Some(&b"smtp 550: mailbox unavailable"[..])
    );
    assert_eq!(
        only(&list, headers::EXCEPTION_FQCN),
        Some(&b"kourier.RetriesExhausted"[..])
    );
    assert_eq!(
        only(&list, headers::FAILURE_KIND),
        Some(&b"retries-exhausted"[..])
    );
    assert_eq!(only(&list, headers::ATTEMPTS), Some(&b"4"[..]));
    assert_eq!(
        only(&list, headers::FIRST_FAILURE_MS),
        Some(&b"1700000001000"[..])
    );
    assert_eq!(
        only(&list, headers::LAST_FAILURE_MS),
        Some(&b"1700000002500"[..])
    );
    assert_eq!(only(&list, headers::VALUE_DROPPED_BYTES), None);
    assert_eq!(list.len(), 3 + 12);
}

#[tokio::test]
async fn null_value_and_null_key_stay_null_and_long_errors_are_cut() {
    require_kafka().await;
    let source = unique_name("dl-null");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 1, &[]).await;
    let sink = sink();

    let mut l = letter(record(&source, 0, None, None));
    l.reason = DeadLetterReason::Decode;
    l.attempts = 0;
    l.error = "x".repeat(MAX_ERROR_MESSAGE_BYTES * 2);
    let receipt = sink.send(&l).await.expect("dead letter written");

    let messages = read_all(&dlt, 1).await;
    let m = at(
        &messages,
        receipt.partition.unwrap(),
        receipt.offset.unwrap(),
    );
    assert_eq!(m.key(), None);
    assert_eq!(m.payload(), None, "a null value stays null, not empty");
    let list = header_list(m);
    assert_eq!(only(&list, headers::FAILURE_KIND), Some(&b"decode"[..]));
    assert_eq!(
        only(&list, headers::EXCEPTION_FQCN),
        Some(&b"kourier.DecodeError"[..])
    );
    assert_eq!(only(&list, headers::ATTEMPTS), Some(&b"0"[..]));
    assert_eq!(
        only(&list, headers::EXCEPTION_MESSAGE).map(<[u8]>::len),
        Some(MAX_ERROR_MESSAGE_BYTES)
    );
}

#[tokio::test]
async fn dead_letters_keep_the_source_partition_when_the_topic_has_it() {
    require_kafka().await;
    let source = unique_name("dl-same");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 4, &[]).await;
    let sink = sink();

    for partition in 0..4 {
        // Keys that would hash elsewhere: the partition must still be the source's.
        let key = format!("k-{partition}");
        let receipt = sink
            .send(&letter(record(
                &source,
                partition,
                Some(key.as_bytes()),
                Some(b"v".to_vec()),
            )))
            .await
            .expect("dead letter written");
        assert_eq!(receipt.partition, Some(partition));
    }
    let messages = read_all(&dlt, 4).await;
    let mut partitions: Vec<i32> = messages.iter().map(|m| m.partition()).collect();
    partitions.sort_unstable();
    assert_eq!(partitions, vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn a_smaller_dead_letter_topic_is_partitioned_by_key_not_an_error() {
    require_kafka().await;
    let source = unique_name("dl-fewer");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 2, &[]).await;
    let sink = sink();

    let mut expected = Vec::new();
    for i in 0..10 {
        let key = format!("user-{i}");
        let receipt = sink
            .send(&letter(record(
                &source,
                5,
                Some(key.as_bytes()),
                Some(b"v".to_vec()),
            )))
            .await
            .expect("source partition 5 does not exist in a 2-partition DLT: not an error");
        let partition = receipt.partition.unwrap();
        assert_eq!(
            Some(partition),
            java_partition(key.as_bytes(), 2),
            "key {key}"
        );
        expected.push((partition, receipt.offset.unwrap(), key));
    }
    let messages = read_all(&dlt, 10).await;
    for (partition, offset, key) in expected {
        assert_eq!(at(&messages, partition, offset).key(), Some(key.as_bytes()));
    }
}

#[tokio::test]
async fn re_dead_lettering_a_redriven_letter_does_not_grow_its_headers() {
    require_kafka().await;
    let source = unique_name("dl-redrive");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 1, &[]).await;
    let sink = sink();

    let first = sink
        .send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec()))))
        .await
        .expect("first dead letter");
    let messages = read_all(&dlt, 1).await;
    let first_headers = header_list(at(&messages, 0, first.offset.unwrap()));

    // A redrive tool copies the dead letter back to the source topic with a redrive count;
    // the consumer fails it again.
    let mut redriven: Headers = first_headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    redriven.push(Header::new(headers::REDRIVE_COUNT, "1"));
    let mut again = record(&source, 0, Some(KEY), Some(b"v".to_vec()));
    again.headers = redriven;
    again.offset = 5678;
    let mut again = letter(again);
    again.reason = DeadLetterReason::Permanent;
    let second = sink.send(&again).await.expect("second dead letter");

    let messages = read_all(&dlt, 2).await;
    let second_headers = header_list(at(&messages, 0, second.offset.unwrap()));
    assert_eq!(
        second_headers.len(),
        first_headers.len() + 1,
        "only the redrive count was added"
    );
    for name in headers::ALL.iter().filter(|n| {
        ![
            headers::VALUE_DROPPED_BYTES,
            headers::KEY_DROPPED_BYTES,
            headers::HEADERS_DROPPED,
        ]
        .contains(*n)
    }) {
        assert!(only(&second_headers, name).is_some(), "{name} present once");
    }
    assert_eq!(
        only(&second_headers, headers::REDRIVE_COUNT),
        Some(&b"1"[..])
    );
    assert_eq!(
        only(&second_headers, headers::ORIGINAL_OFFSET),
        Some(&5678i64.to_be_bytes()[..])
    );
    assert_eq!(
        only(&second_headers, headers::FAILURE_KIND),
        Some(&b"permanent"[..])
    );
    assert_eq!(only(&second_headers, "event-id"), Some(&b"e-1"[..]));
}

#[tokio::test]
async fn an_oversized_record_becomes_a_metadata_only_letter() {
    require_kafka().await;
    let source = unique_name("dl-big");
    let dlt = format!("{source}.dlt");
    create_topic(&dlt, 1, &[("max.message.bytes", "2048")]).await;
    let sink = sink();

    let receipt = sink
        .send(&letter(record(
            &source,
            0,
            Some(KEY),
            Some(vec![b'x'; 10 * 1024]),
        )))
        .await
        .expect("metadata-only dead letter written");

    let messages = read_all(&dlt, 1).await;
    assert_eq!(
        messages.len(),
        1,
        "only the metadata-only letter was stored"
    );
    let m = at(&messages, 0, receipt.offset.unwrap());
    assert_eq!(m.key(), Some(KEY));
    assert_eq!(m.payload(), None, "the value is dropped");
    let list = header_list(m);
    assert_eq!(
        only(&list, headers::VALUE_DROPPED_BYTES),
        Some(&b"10240"[..])
    );
    assert_eq!(
        only(&list, headers::ORIGINAL_OFFSET),
        Some(&1234i64.to_be_bytes()[..])
    );
    assert_eq!(
        only(&list, headers::FAILURE_KIND),
        Some(&b"retries-exhausted"[..])
    );
    assert_eq!(only(&list, "event-id"), Some(&b"e-1"[..]));
}

#[tokio::test]
async fn a_missing_dead_letter_topic_is_an_error_within_the_send_timeout() {
    require_kafka().await;
    let source = unique_name("dl-missing");
    let send_timeout = Duration::from_secs(3);
    let sink = KafkaDeadLetterSink::builder(bootstrap())
        .send_timeout(send_timeout)
        .build()
        .unwrap();

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        send_timeout * 3,
        sink.send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec())))),
    )
    .await
    .expect("the send must not hang");
    let err = outcome.expect_err("no dead-letter topic: the write fails");
    assert!(
        started.elapsed() <= send_timeout + Duration::from_secs(1),
        "failed after {:?}",
        started.elapsed()
    );
    assert_eq!(err.destination, format!("{source}.dlt"));
    assert_eq!(err.coordinates, format!("{source}/0@1234"));
    let cause = std::error::Error::source(&err).expect("the cause is kept");
    assert!(
        cause.downcast_ref::<kourier::Error>().is_some(),
        "cause: {cause}"
    );

    // Still failing, still bounded, on a second try (the consumer retries).
    let started = Instant::now();
    let again = sink
        .send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec()))))
        .await;
    assert!(again.is_err());
    assert!(started.elapsed() <= send_timeout + Duration::from_secs(1));
}

#[tokio::test]
async fn flush_after_writes_succeeds() {
    require_kafka().await;
    let source = unique_name("dl-flush");
    create_topic(&format!("{source}.dlt"), 1, &[]).await;
    let sink = sink();
    sink.send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec()))))
        .await
        .unwrap();
    sink.flush(Duration::from_secs(5)).await.expect("flushed");
}

/// Minimal broker helpers (kept local: this file needs topic configs and raw records with
/// their headers, which the shared support module does not expose).
mod kafka {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use kourier::rdkafka::client::DefaultClientContext;
    use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
    use kourier::rdkafka::message::OwnedMessage;
    use kourier::rdkafka::{ClientConfig, Offset, TopicPartitionList};

    pub(super) fn bootstrap() -> String {
        std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
    }

    /// Fails the test with a clear message when no broker answers.
    pub(super) async fn require_kafka() {
        let servers = bootstrap();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &servers)
                .create()
                .expect("client");
            if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
                panic!("no Kafka broker at {servers} ({e}); start one with `scripts/services up`");
            }
        })
        .await
        .unwrap();
    }

    pub(super) fn unique_name(prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!(
            "{prefix}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Creates a topic and waits until its metadata shows every partition with a leader.
    pub(super) async fn create_topic(name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let results = admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .expect("create topics");
        for result in results {
            result.expect("topic created");
        }
        let name = name.to_owned();
        let servers = bootstrap();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &servers)
                .create()
                .expect("client");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(md) = consumer.fetch_metadata(Some(&name), Duration::from_secs(5))
                    && let Some(t) = md.topics().iter().find(|t| t.name() == name)
                    && t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions()
                        .iter()
                        .all(|p| p.leader() >= 0 && p.error().is_none())
                {
                    return;
                }
                assert!(Instant::now() < deadline, "topic {name} never became ready");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .unwrap();
    }

    /// Reads every partition of `topic` from the beginning until at least `expected` records
    /// arrived (then a short while longer, to see extras), or fails after 30 s.
    pub(super) async fn read_all(topic: &str, expected: usize) -> Vec<OwnedMessage> {
        let topic = topic.to_owned();
        let servers = bootstrap();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &servers)
                .set("group.id", super::unique_name("reader"))
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("metadata");
            let partitions = md.topics()[0].partitions().len() as i32;
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&tpl).expect("assign");
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut settle_until: Option<Instant> = None;
            loop {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    out.push(m.detach());
                }
                if out.len() >= expected {
                    let until = *settle_until
                        .get_or_insert_with(|| Instant::now() + Duration::from_millis(500));
                    if Instant::now() >= until {
                        return out;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "read {} of {expected} records from {topic}",
                    out.len()
                );
            }
        })
        .await
        .unwrap()
    }
}
