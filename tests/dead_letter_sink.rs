//! `KafkaDeadLetterSink` against the real broker: what a dead letter looks like (key, value,
//! headers, provenance encodings), where it lands, oversized records and a missing topic.
//!
//! Needs Kafka at `KAFKA_BOOTSTRAP_SERVERS` (default 127.0.0.1:9092): `scripts/services up`.

mod support;

use std::time::{Duration, Instant, UNIX_EPOCH};

use kourier::dead_letter::{MAX_ERROR_MESSAGE_BYTES, headers};
use kourier::topics::java_partition;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kourier::{
    DeadLetter, DeadLetterReason, DeadLetterReceipt, DeadLetterSink, Error, Header, Headers,
    KafkaDeadLetterSink, Message, RawRecord, handler_fn,
};
use support::{
    ReadRecord, bootstrap, create_topic_with_config, read_at_least, record_at, require_kafka,
    unique_name,
};

const KEY: &[u8] = b"user-42";

fn record(topic: &str, partition: i32, key: Option<&[u8]>, value: Option<Vec<u8>>) -> RawRecord {
    let mut record = RawRecord::builder(topic)
        .partition(partition)
        .offset(1234)
        .header("event-id", "e-1")
        .null_header("trace-parent")
        .header("binary", vec![0u8, 0xff, 0x10])
        .timestamp(1_700_000_000_123)
        .build();
    record.key = key.map(Into::into);
    record.value = value.map(Into::into);
    record
}

fn letter(record: RawRecord) -> DeadLetter {
    let mut letter = DeadLetter::new(
        record,
        DeadLetterReason::RetriesExhausted,
        "smtp 550: mailbox unavailable",
    );
    letter.attempts = 4;
    letter.first_failure = UNIX_EPOCH + Duration::from_millis(1_700_000_001_000);
    letter.last_failure = UNIX_EPOCH + Duration::from_millis(1_700_000_002_500);
    letter.group_id = "notifier".into();
    letter
}

/// A source topic name (the sink never reads the source topic, so it is not created) and its
/// dead-letter topic `<source>.dlt`, created with `partitions` and topic-level `configs`.
async fn source_and_dlt(name: &str, partitions: i32, configs: &[(&str, &str)]) -> (String, String) {
    require_kafka().await;
    let source = unique_name(name);
    let dlt = format!("{source}.dlt");
    create_topic_with_config(&dlt, partitions, configs).await;
    (source, dlt)
}

fn sink() -> KafkaDeadLetterSink {
    KafkaDeadLetterSink::builder(bootstrap())
        .send_timeout(Duration::from_secs(10))
        .build()
        .expect("sink builds")
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

/// Asserts that each `(name, value)` header appears once in `list`, with that value.
fn assert_headers(list: &[(String, Option<Vec<u8>>)], expected: &[(&str, &[u8])]) {
    for (name, value) in expected {
        assert_eq!(only(list, name), Some(*value), "header {name}");
    }
}

/// Reads the dead-letter topic once it holds at least `count` letters.
async fn read_letters(topic: &str, count: usize) -> Vec<ReadRecord> {
    read_at_least(topic, count, Duration::from_secs(30)).await
}

#[tokio::test]
async fn dead_letter_keeps_key_value_headers_and_carries_provenance() {
    let (source, dlt) = source_and_dlt("dl-full", 3, &[]).await;
    let sink = sink();
    let value = br#"{"to":"nobody@example.com"}"#.to_vec();
    let before = support::now_ms();

    let receipt = sink
        .send(&letter(record(&source, 2, Some(KEY), Some(value.clone()))))
        .await
        .expect("dead letter written");
    assert_eq!(receipt.topic, dlt);
    assert_eq!(receipt.partition, Some(2), "same partition as the source");

    let messages = read_letters(&dlt, 1).await;
    let m = record_at(&messages, 2, receipt.offset.unwrap());
    assert_eq!(m.key.as_deref(), Some(KEY));
    assert_eq!(m.value.as_deref(), Some(value.as_slice()));
    // The dead letter is timestamped when it was written; the original time is a header.
    assert!(!m.log_append_time, "a create time, not a log-append time");
    let ts = m.timestamp.expect("the dead letter has a timestamp");
    assert!(ts >= before - 1000, "timestamp {ts} is not recent");

    let list = m.headers.clone();
    assert_eq!(
        &list[..3],
        &[
            ("event-id".to_owned(), Some(b"e-1".to_vec())),
            ("trace-parent".to_owned(), None),
            ("binary".to_owned(), Some(vec![0u8, 0xff, 0x10])),
        ],
        "original headers first, in order, null value kept null"
    );
    assert_headers(
        &list,
        &[
            (headers::ORIGINAL_TOPIC, source.as_bytes()),
            (headers::ORIGINAL_PARTITION, &2i32.to_be_bytes()[..]),
            (headers::ORIGINAL_OFFSET, &1234i64.to_be_bytes()[..]),
            (
                headers::ORIGINAL_TIMESTAMP,
                &1_700_000_000_123i64.to_be_bytes()[..],
            ),
            (headers::ORIGINAL_TIMESTAMP_TYPE, &b"CreateTime"[..]),
            (headers::ORIGINAL_CONSUMER_GROUP, &b"notifier"[..]),
            (
                headers::EXCEPTION_MESSAGE,
                &b"smtp 550: mailbox unavailable"[..],
            ),
            (headers::EXCEPTION_FQCN, &b"kourier.RetriesExhausted"[..]),
            (headers::FAILURE_KIND, &b"retries-exhausted"[..]),
            (headers::ATTEMPTS, &b"4"[..]),
            (headers::FIRST_FAILURE_MS, &b"1700000001000"[..]),
            (headers::LAST_FAILURE_MS, &b"1700000002500"[..]),
        ],
    );
    assert_eq!(only(&list, headers::VALUE_DROPPED_BYTES), None);
    assert_eq!(list.len(), 3 + 12);
}

#[tokio::test]
async fn null_value_and_null_key_stay_null_and_long_errors_are_cut() {
    let (source, dlt) = source_and_dlt("dl-null", 1, &[]).await;
    let sink = sink();

    let mut l = letter(record(&source, 0, None, None));
    l.reason = DeadLetterReason::Decode;
    l.attempts = 0;
    l.error = "x".repeat(MAX_ERROR_MESSAGE_BYTES * 2);
    let receipt = sink.send(&l).await.expect("dead letter written");

    let messages = read_letters(&dlt, 1).await;
    let m = record_at(
        &messages,
        receipt.partition.unwrap(),
        receipt.offset.unwrap(),
    );
    assert_eq!(m.key.as_deref(), None);
    assert_eq!(
        m.value.as_deref(),
        None,
        "a null value stays null, not empty"
    );
    let list = m.headers.clone();
    assert_headers(
        &list,
        &[
            (headers::FAILURE_KIND, &b"decode"[..]),
            (headers::EXCEPTION_FQCN, &b"kourier.DecodeError"[..]),
            (headers::ATTEMPTS, &b"0"[..]),
        ],
    );
    assert_eq!(
        only(&list, headers::EXCEPTION_MESSAGE).map(<[u8]>::len),
        Some(MAX_ERROR_MESSAGE_BYTES)
    );
}

#[tokio::test]
async fn dead_letters_keep_the_source_partition_when_the_topic_has_it() {
    let (source, dlt) = source_and_dlt("dl-same", 4, &[]).await;
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
    let messages = read_letters(&dlt, 4).await;
    let mut partitions: Vec<i32> = messages.iter().map(|m| m.partition).collect();
    partitions.sort_unstable();
    assert_eq!(partitions, vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn a_smaller_dead_letter_topic_is_partitioned_by_key_not_an_error() {
    let (source, dlt) = source_and_dlt("dl-fewer", 2, &[]).await;
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
    let messages = read_letters(&dlt, 10).await;
    for (partition, offset, key) in expected {
        assert_eq!(
            record_at(&messages, partition, offset).key.as_deref(),
            Some(key.as_bytes())
        );
    }
}

#[tokio::test]
async fn re_dead_lettering_a_redriven_letter_does_not_grow_its_headers() {
    let (source, dlt) = source_and_dlt("dl-redrive", 1, &[]).await;
    let sink = sink();

    let first = sink
        .send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec()))))
        .await
        .expect("first dead letter");
    let messages = read_letters(&dlt, 1).await;
    let first_headers = record_at(&messages, 0, first.offset.unwrap())
        .headers
        .clone();

    // A redrive tool copies the dead letter back to the source topic with a redrive count;
    // the consumer fails it again.
    let mut redriven: Headers = first_headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone().into(),
            value: v.clone().map(Into::into),
        })
        .collect();
    redriven.push(Header::new(headers::REDRIVE_COUNT, "1"));
    let mut again = record(&source, 0, Some(KEY), Some(b"v".to_vec()));
    again.headers = redriven;
    again.offset = 5678;
    let mut again = letter(again);
    again.reason = DeadLetterReason::Permanent;
    let second = sink.send(&again).await.expect("second dead letter");

    let messages = read_letters(&dlt, 2).await;
    let second_headers = record_at(&messages, 0, second.offset.unwrap())
        .headers
        .clone();
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
    assert_headers(
        &second_headers,
        &[
            (headers::REDRIVE_COUNT, &b"1"[..]),
            (headers::ORIGINAL_OFFSET, &5678i64.to_be_bytes()[..]),
            (headers::FAILURE_KIND, &b"permanent"[..]),
            ("event-id", &b"e-1"[..]),
        ],
    );
}

#[tokio::test]
async fn an_oversized_record_becomes_a_metadata_only_letter() {
    let (source, dlt) = source_and_dlt("dl-big", 1, &[("max.message.bytes", "2048")]).await;
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

    let messages = read_letters(&dlt, 1).await;
    assert_eq!(
        messages.len(),
        1,
        "only the metadata-only letter was stored"
    );
    let m = record_at(&messages, 0, receipt.offset.unwrap());
    assert_eq!(m.key.as_deref(), Some(KEY));
    assert_eq!(m.value.as_deref(), None, "the value is dropped");
    let list = m.headers.clone();
    assert_headers(
        &list,
        &[
            (headers::VALUE_DROPPED_BYTES, &b"10240"[..]),
            (headers::ORIGINAL_OFFSET, &1234i64.to_be_bytes()[..]),
            (headers::FAILURE_KIND, &b"retries-exhausted"[..]),
            ("event-id", &b"e-1"[..]),
        ],
    );
}

/// Letters are batched; the broker refuses a batch over the topic's `max.message.bytes` as a
/// whole. A letter refused with its batch is written again alone: the small letters that
/// shared a batch with an oversized one (or with too many others) keep their values, and only
/// the oversized letter becomes metadata-only.
#[tokio::test]
async fn letters_refused_with_their_batch_are_written_again_alone() {
    let (source, dlt) = source_and_dlt("dl-batch", 1, &[("max.message.bytes", "2048")]).await;
    let sink = sink();
    let big = 20;
    let letters: Vec<DeadLetter> = (0..30u8)
        .map(|i| {
            let size = if usize::from(i) == big {
                10 * 1024
            } else {
                100
            };
            let mut record = record(&source, 0, Some(KEY), Some(vec![b'a' + i % 26; size]));
            record.offset = i64::from(i);
            letter(record)
        })
        .collect();
    // All queued at once, so that they leave in batches.
    let receipts = futures_util::future::join_all(letters.iter().map(|l| sink.send(l))).await;
    let receipts: Vec<DeadLetterReceipt> = receipts
        .into_iter()
        .map(|r| r.expect("every letter written"))
        .collect();

    let messages = read_letters(&dlt, letters.len()).await;
    assert_eq!(messages.len(), letters.len(), "one letter each, no copies");
    for (i, (letter, receipt)) in letters.iter().zip(&receipts).enumerate() {
        let m = record_at(&messages, 0, receipt.offset.unwrap());
        let original = only(&m.headers, headers::ORIGINAL_OFFSET);
        assert_eq!(original, Some(&(i as i64).to_be_bytes()[..]));
        if i == big {
            assert_eq!(m.value, None, "the oversized letter loses its value");
            assert_eq!(
                only(&m.headers, headers::VALUE_DROPPED_BYTES),
                Some(&b"10240"[..])
            );
        } else {
            assert_eq!(
                m.value.as_deref(),
                letter.record.value.as_deref(),
                "letter {i} keeps its value"
            );
            assert_eq!(only(&m.headers, headers::VALUE_DROPPED_BYTES), None);
        }
    }
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
    let (source, _) = source_and_dlt("dl-flush", 1, &[]).await;
    let sink = sink();
    sink.send(&letter(record(&source, 0, Some(KEY), Some(b"v".to_vec()))))
        .await
        .unwrap();
    sink.flush(Duration::from_secs(5)).await.expect("flushed");
}

/// A wrapper around the Kafka sink keeps its startup check: with the dead-letter topic
/// missing, `run()` fails with `MissingTopics` naming it. When `topics_for` had a default
/// (none), a wrapper that forwarded only `send` compiled, and the consumer started without
/// the topic; its first dead letter then held its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_wrapping_the_kafka_sink_keeps_the_startup_check_of_its_topic() {
    let (topic, group) = support::consumer::topic_and_group("dl-wrapped", 1).await;
    let dlt = format!("{topic}.dlt");
    let sink = Arc::new(support::sinks::CountingSink::new(sink()));
    let handler = handler_fn(|_m: Message<serde_json::Value>| async { Ok(()) });
    let consumer = support::consumer::builder(handler, &topic, &group)
        .dead_letter_sink(sink.clone())
        .build()
        .expect("build");

    let outcome = tokio::time::timeout(
        Duration::from_secs(15),
        consumer.run(std::future::pending()),
    )
    .await
    .expect("run() answers within 15 s instead of running without its dead-letter topic");
    let err = outcome.expect_err("the dead-letter topic does not exist");
    assert_eq!(err.missing_topics(), std::slice::from_ref(&dlt), "{err}");
    assert!(matches!(err, Error::MissingTopics { .. }), "{err:?}");
    assert_eq!(
        sink.letters.load(Ordering::SeqCst),
        0,
        "nothing was written"
    );
}
