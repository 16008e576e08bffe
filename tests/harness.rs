//! The test harness itself against the real broker and Redis: records round-trip through
//! `support::produce` / `support::read_all` unchanged (keys, null values, null-valued and
//! binary headers, a non-UTF-8 header key), committed offsets read back, Redis answers, and
//! an unreachable service fails loudly instead of skipping.
//!
//! Needs Kafka and Redis: `scripts/services up`.

mod support;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use support::TestRecord;

#[test]
fn unique_names_are_unique_and_safe_for_topics() {
    let a = support::unique_name("odd name/ü");
    let b = support::unique_name("odd name/ü");
    assert_ne!(a, b);
    assert!(a.starts_with("kourier-test-odd-name--"), "{a}");
    assert!(
        a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "{a}"
    );
    assert!(a.len() < 249, "topic names are at most 249 chars: {a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_with_keys_headers_and_nulls() {
    let topic = support::new_topic("harness-roundtrip", 3).await;

    let binary = vec![0x00, 0x9f, 0x92, 0x96, 0xff]; // not UTF-8
    let sent = vec![
        TestRecord::new()
            .key(b"user-1")
            .value(b"{\"n\":1}")
            .header("trace", Some(b"abc".to_vec()))
            .header("nothing", None)
            .header("bin", Some(binary.clone()))
            .header("trace", Some(b"second".to_vec()))
            .partition(2),
        TestRecord::new().key(b"user-1").partition(2), // null value
        TestRecord::new().value(b"no key").partition(0), // null key
        TestRecord::new()
            .key(vec![0xff, 0xfe])
            .value(Vec::new())
            .partition(1), // empty value
        TestRecord::new().key(b"by-hash").value(b"x"), // partition chosen by the producer
    ];
    let coordinates = support::produce(&topic, sent.clone()).await;
    assert_eq!(coordinates.len(), sent.len());
    assert_eq!(&coordinates[..4], &[(2, 0), (2, 1), (0, 0), (1, 0)]);

    let read = support::read_all(&topic).await;
    assert_eq!(read.len(), sent.len(), "{read:#?}");
    for (record, &(partition, offset)) in sent.iter().zip(&coordinates) {
        let got = read
            .iter()
            .find(|r| r.partition == partition && r.offset == offset)
            .unwrap_or_else(|| panic!("no record at {partition}/{offset}"));
        assert_eq!(got.topic, topic);
        assert_eq!(got.key, record.key, "key at {partition}/{offset}");
        assert_eq!(got.value, record.value, "value at {partition}/{offset}");
        assert_eq!(
            got.headers, record.headers,
            "headers at {partition}/{offset}"
        );
        assert!(
            got.timestamp.is_some_and(|t| t > 0),
            "timestamp at {partition}/{offset}"
        );
    }
    // Sorted by partition, then offset.
    let order: Vec<(i32, i64)> = read.iter().map(|r| (r.partition, r.offset)).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted);

    let first = &read
        .iter()
        .find(|r| r.partition == 2 && r.offset == 0)
        .unwrap();
    assert_eq!(
        first.header("trace"),
        Some(Some(&b"second"[..])),
        "last header wins"
    );
    assert_eq!(
        first.header("nothing"),
        Some(None),
        "null-valued header stays null"
    );
    assert_eq!(first.header("bin"), Some(Some(&binary[..])));
    assert_eq!(first.header("absent"), None);

    // Empty value stays empty (not null), and a null value stays null.
    assert_eq!(
        read.iter().find(|r| r.partition == 1).unwrap().value,
        Some(Vec::new())
    );
    assert_eq!(
        read.iter()
            .find(|r| r.partition == 2 && r.offset == 1)
            .unwrap()
            .value,
        None
    );

    // Reading again gives the same records: read_all consumes nothing.
    assert_eq!(support::read_all(&topic).await, read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_header_key_is_produced_raw_and_read_without_panicking() {
    let topic = support::new_topic("harness-rawkey", 1).await;
    support::produce(&topic, vec![TestRecord::new().value(b"before")]).await;

    let offset =
        support::produce_with_raw_header_key(&topic, &[0xc3, 0x28, b'x'], b"v", b"payload").await;
    assert_eq!(offset, 1);
    support::produce(&topic, vec![TestRecord::new().value(b"after")]).await;

    let read = support::read_all(&topic).await;
    let values: Vec<Option<&[u8]>> = read.iter().map(|r| r.value.as_deref()).collect();
    assert_eq!(
        values,
        vec![
            Some(&b"before"[..]),
            Some(&b"payload"[..]),
            Some(&b"after"[..])
        ]
    );
    let raw = &read[1];
    assert_eq!(raw.key, None);
    assert_eq!(
        raw.headers,
        vec![(support::UNREADABLE_HEADER_KEY.to_owned(), None)],
        "the non-UTF-8 key is reported, not dropped"
    );
    assert_eq!(
        raw.raw_headers,
        kourier::Headers::new().with(b"\xc3\x28x".to_vec(), "v"),
        "kourier reads the key byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_topic_reads_as_empty_and_read_at_least_waits() {
    let topic = support::new_topic("harness-wait", 2).await;
    assert!(support::read_all(&topic).await.is_empty());
    assert_eq!(support::partitions_of(&topic).await, vec![0, 1]);

    let later = topic.clone();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        support::produce(
            &later,
            (0..4)
                .map(|i| TestRecord::new().value(format!("v{i}")).partition(i % 2))
                .collect(),
        )
        .await
    });
    let read = support::read_at_least(&topic, 4, Duration::from_secs(30)).await;
    producer.await.unwrap();
    assert_eq!(read.len(), 4);
    assert_eq!(
        read.iter()
            .filter(|r| r.partition == 0)
            .map(|r| r.value.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![b"v0".to_vec(), b"v2".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_read_back_what_a_consumer_committed() {
    support::require_kafka().await;
    let topic = support::unique_name("harness-commit");
    let group = support::unique_name("harness-commit-g");
    support::create_topic(&topic, 3).await;
    let records = (0..6)
        .map(|i| {
            TestRecord::new()
                .key(format!("k{i}"))
                .value(b"v")
                .partition(i % 2)
        })
        .collect();
    support::produce(&topic, records).await;

    assert_eq!(
        support::committed_offsets(&group, &topic, 3)
            .await
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(0, None), (1, None), (2, None)],
        "a new group has committed nothing"
    );

    // A consumer of the group reads partitions 0 and 1 and commits a TPL by hand: all of
    // partition 0 (next offset 3) and the first record of partition 1 (next offset 1).
    let (t, g) = (topic.clone(), group.clone());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = support::client_config()
            .set("group.id", &g)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        {
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(&t, 0, Offset::Beginning)
                .unwrap();
            assignment
                .add_partition_offset(&t, 1, Offset::Beginning)
                .unwrap();
            consumer.assign(&assignment).unwrap();
        }
        let mut seen = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen < 6 {
            assert!(
                std::time::Instant::now() < deadline,
                "read {seen} of 6 records"
            );
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                assert!(m.partition() < 2);
                seen += 1;
            }
        }
        {
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(&t, 0, Offset::Offset(3))
                .unwrap();
            commit
                .add_partition_offset(&t, 1, Offset::Offset(1))
                .unwrap();
            consumer.commit(&commit, CommitMode::Sync).unwrap();
        }
        consumer.unassign().unwrap();
    })
    .await
    .unwrap();

    let committed = support::committed_offsets(&group, &topic, 3).await;
    assert_eq!(
        committed.into_iter().collect::<Vec<_>>(),
        vec![(0, Some(3)), (1, Some(1)), (2, None)]
    );

    // support::commit_offsets moves them; other groups are unaffected.
    support::commit_offsets(&group, &topic, &[(1, 3), (2, 0)]).await;
    let committed = support::committed_offsets(&group, &topic, 3).await;
    assert_eq!(
        committed.into_iter().collect::<Vec<_>>(),
        vec![(0, Some(3)), (1, Some(3)), (2, Some(0))]
    );
    let other = support::unique_name("harness-commit-other");
    assert!(
        support::committed_offsets(&other, &topic, 3)
            .await
            .values()
            .all(Option::is_none)
    );
}

/// `SET key value NX PX ms`: `Some("OK")` when set, `None` when the key exists.
async fn set_nx_px(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
    ms: u64,
) -> Option<String> {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(ms)
        .query_async(redis)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trip_and_set_nx_px() {
    let mut redis = support::redis_connection().await;
    let key = support::unique_name("harness-redis");

    let set: String = redis::cmd("SET")
        .arg(&key)
        .arg(b"\x00bytes\xff")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(set, "OK");
    let got: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(got, b"\x00bytes\xff");

    // SET NX PX: the first claim wins, a second one is refused while the first lives, and the
    // key expires by itself.
    let claim = format!("{key}:claim");
    let first = set_nx_px(&mut redis, &claim, "owner-1", 300).await;
    assert_eq!(first.as_deref(), Some("OK"));
    let second = set_nx_px(&mut redis, &claim, "owner-2", 300).await;
    assert_eq!(second, None, "NX refuses a live key");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&claim)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=300).contains(&ttl), "PX sets the expiry: {ttl}");
    let owner: String = redis::cmd("GET")
        .arg(&claim)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(owner, "owner-1");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let after: Option<String> = redis::cmd("SET")
        .arg(&claim)
        .arg("owner-3")
        .arg("NX")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        after.as_deref(),
        Some("OK"),
        "the expired claim can be taken again"
    );

    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .arg(&claim)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
}

#[tokio::test]
#[should_panic(expected = "scripts/services up")]
async fn an_unreachable_broker_fails_the_test_naming_the_start_command() {
    // Port 1 on loopback: nothing listens there.
    support::require_kafka_at("127.0.0.1:1", Duration::from_secs(2)).await;
}

#[tokio::test]
#[should_panic(expected = "scripts/services up")]
async fn an_unreachable_redis_fails_the_test_naming_the_start_command() {
    support::require_redis_at("redis://127.0.0.1:1/", Duration::from_secs(2)).await;
}
