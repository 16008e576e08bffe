//! `Publisher` against the real broker: acknowledged sends, pipelined batches, Java-compatible
//! key partitioning, and a typed error (not a hang) when the broker is unreachable.
//!
//! Needs Kafka at `KAFKA_BOOTSTRAP_SERVERS` (default 127.0.0.1:9092): `scripts/services up`.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::topics::java_partition;
use kourier::{Error, Header, Headers, Publisher};
use serde::{Deserialize, Serialize};
use support::{
    ReadRecord, bootstrap, new_topic, read_at_least, record_at, require_kafka, unique_name,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Notification {
    id: String,
    user_id: String,
    text: String,
}

fn notification(i: usize) -> Notification {
    Notification {
        id: format!("e-{i}"),
        user_id: format!("user-{i}"),
        text: format!("hello {i}"),
    }
}

fn publisher(topic: &str) -> Publisher<Notification> {
    Publisher::<Notification>::builder(bootstrap(), topic)
        .key_fn(|n: &Notification| n.user_id.clone())
        .headers_fn(|n: &Notification| vec![Header::new("event-id", n.id.as_bytes())])
        .send_timeout(Duration::from_secs(10))
        .build()
        .expect("publisher builds")
}

/// Reads `topic` once it holds at least `count` records.
async fn read_all(topic: &str, count: usize) -> Vec<ReadRecord> {
    read_at_least(topic, count, Duration::from_secs(30)).await
}

#[tokio::test]
async fn send_resolves_to_the_acknowledgement_a_reader_sees() {
    let topic = new_topic("pub-ack", 3).await;
    let publisher = publisher(&topic);

    let event = notification(1);
    let delivery = publisher.send(&event).await.expect("acknowledged");
    let mut extra = Headers::new().with("source", "test");
    extra.push(Header::null("nothing"));
    let second = publisher
        .send_with_headers(&notification(2), extra)
        .await
        .expect("acknowledged");

    let messages = read_all(&topic, 2).await;
    assert_eq!(messages.len(), 2);
    let m = record_at(&messages, delivery.partition, delivery.offset);
    assert_eq!(m.key.as_deref(), Some(&b"user-1"[..]));
    let decoded: Notification = serde_json::from_slice(m.value.as_deref().unwrap()).unwrap();
    assert_eq!(decoded, event);
    assert_eq!(
        m.headers,
        vec![("event-id".to_owned(), Some(b"e-1".to_vec()))]
    );

    let m = record_at(&messages, second.partition, second.offset);
    assert_eq!(
        m.headers,
        vec![
            ("event-id".to_owned(), Some(b"e-2".to_vec())),
            ("source".to_owned(), Some(b"test".to_vec())),
            ("nothing".to_owned(), None),
        ]
    );
    publisher
        .flush(Duration::from_secs(5))
        .await
        .expect("flushed");
}

#[tokio::test]
async fn batch_send_acknowledges_every_event_in_order() {
    let topic = new_topic("pub-batch", 2).await;
    // One key for all: one partition, so the offsets show the order.
    let publisher = Publisher::<Notification>::builder(bootstrap(), &topic)
        .key_fn(|_: &Notification| "same-user")
        .build()
        .unwrap();

    let events: Vec<Notification> = (0..100).map(notification).collect();
    let results = publisher.send_batch(&events).await;
    assert_eq!(results.len(), events.len());
    let deliveries: Vec<_> = results
        .into_iter()
        .map(|r| r.expect("acknowledged"))
        .collect();
    let partition = java_partition(b"same-user", 2).unwrap();
    assert!(deliveries.iter().all(|d| d.partition == partition));
    assert!(
        deliveries.windows(2).all(|w| w[1].offset > w[0].offset),
        "offsets follow the batch order"
    );

    let messages = read_all(&topic, events.len()).await;
    assert_eq!(messages.len(), events.len());
    for (event, delivery) in events.iter().zip(&deliveries) {
        let m = record_at(&messages, delivery.partition, delivery.offset);
        let decoded: Notification = serde_json::from_slice(m.value.as_deref().unwrap()).unwrap();
        assert_eq!(&decoded, event);
    }

    assert!(publisher.send_batch(&[]).await.is_empty());
}

#[tokio::test]
async fn keyed_records_land_where_a_java_producer_puts_them() {
    let topic = new_topic("pub-murmur", 6).await;
    let publisher = publisher(&topic);

    let events: Vec<Notification> = (0..200).map(notification).collect();
    let deliveries: Vec<_> = publisher
        .send_batch(&events)
        .await
        .into_iter()
        .map(|r| r.expect("acknowledged"))
        .collect();
    for (event, delivery) in events.iter().zip(&deliveries) {
        assert_eq!(
            delivery.partition,
            java_partition(event.user_id.as_bytes(), 6).unwrap(),
            "key {}",
            event.user_id
        );
    }

    let messages = read_all(&topic, events.len()).await;
    assert_eq!(messages.len(), events.len());
    let mut used = [0usize; 6];
    for m in &messages {
        let key = m.key.as_deref().expect("keyed");
        assert_eq!(m.partition, java_partition(key, 6).unwrap());
        used[m.partition as usize] += 1;
    }
    assert!(
        used.iter().all(|n| *n > 0),
        "200 keys spread over all partitions: {used:?}"
    );
}

#[tokio::test]
async fn raw_bytes_and_tombstones_are_sent_as_given() {
    let topic = new_topic("pub-raw", 3).await;
    let publisher = publisher(&topic); // its key_fn / headers_fn do not apply to raw sends

    let json = br#"{"id":"pre","user_id":"u-9","text":"encoded elsewhere"}"#;
    let mut headers = Headers::new().with("content-type", "application/json");
    headers.push(Header::null("nothing"));
    let encoded = publisher
        .send_raw(Some(b"u-9"), Some(json), headers)
        .await
        .expect("acknowledged");
    let binary = publisher
        .send_raw(Some(b"\xff\x00"), Some(&[0, 159, 146, 150]), Headers::new())
        .await
        .expect("acknowledged");
    let tombstone = publisher
        .send_raw(Some(b"u-9"), None, Headers::new())
        .await
        .expect("acknowledged");
    let unkeyed = publisher
        .send_raw(None, Some(b"{}"), Headers::new())
        .await
        .expect("acknowledged");

    let messages = read_all(&topic, 4).await;
    let m = record_at(&messages, encoded.partition, encoded.offset);
    assert_eq!(encoded.partition, java_partition(b"u-9", 3).unwrap());
    assert_eq!(m.key.as_deref(), Some(&b"u-9"[..]));
    assert_eq!(m.value.as_deref(), Some(&json[..]));
    assert_eq!(
        m.headers,
        vec![
            (
                "content-type".to_owned(),
                Some(b"application/json".to_vec())
            ),
            ("nothing".to_owned(), None),
        ]
    );
    let m = record_at(&messages, binary.partition, binary.offset);
    assert_eq!(m.key.as_deref(), Some(&b"\xff\x00"[..]));
    assert_eq!(m.value.as_deref(), Some(&[0u8, 159, 146, 150][..]));
    assert!(m.headers.is_empty());
    let m = record_at(&messages, tombstone.partition, tombstone.offset);
    assert_eq!(tombstone.partition, encoded.partition);
    assert_eq!(m.value, None, "a null value stays null");
    let m = record_at(&messages, unkeyed.partition, unkeyed.offset);
    assert_eq!(m.key, None);
    assert_eq!(m.value.as_deref(), Some(&b"{}"[..]));
}

#[tokio::test]
async fn unkeyed_events_are_published_too() {
    let topic = new_topic("pub-nokey", 3).await;
    let publisher = Publisher::<Notification>::builder(bootstrap(), &topic)
        .build()
        .unwrap();
    let delivery = publisher
        .send(&notification(7))
        .await
        .expect("acknowledged");
    let messages = read_all(&topic, 1).await;
    let m = record_at(&messages, delivery.partition, delivery.offset);
    assert_eq!(m.key.as_deref(), None);
    assert!(m.headers.is_empty());
}

#[tokio::test]
async fn an_unreachable_broker_is_a_typed_error_not_a_hang() {
    let publisher = Publisher::<Notification>::builder("127.0.0.1:1", "nowhere")
        .key_fn(|n: &Notification| n.user_id.clone())
        .kafka_config("message.timeout.ms", "1500")
        .build()
        .expect("build does not connect");

    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), publisher.send(&notification(1)))
        .await
        .expect("the send must end")
        .expect_err("nothing can acknowledge it");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        Error::Kafka {
            operation,
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        } => assert_eq!(*operation, "publish"),
        other => panic!("unexpected error: {other:?}"),
    }

    let results = tokio::time::timeout(
        Duration::from_secs(15),
        publisher.send_batch(&[notification(2), notification(3)]),
    )
    .await
    .expect("the batch must end");
    assert!(results.iter().all(Result::is_err));
}

#[tokio::test]
async fn a_missing_topic_fails_within_the_send_timeout() {
    require_kafka().await;
    let publisher = Publisher::<Notification>::builder(bootstrap(), unique_name("pub-missing"))
        .send_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), publisher.send(&notification(1)))
        .await
        .expect("the send must end")
        .expect_err("no such topic");
    assert!(matches!(err, Error::Kafka { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_event_that_cannot_be_encoded_is_an_encode_error() {
    #[derive(Serialize)]
    struct Bad {
        map: HashMap<(u8, u8), u8>, // tuple keys are not JSON object keys
    }
    let publisher = Publisher::<Bad>::builder("127.0.0.1:1", "nowhere")
        .build()
        .unwrap();
    let err = publisher
        .send(&Bad {
            map: HashMap::from([((1, 2), 3)]),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Encode { topic, .. } if topic == "nowhere"),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_empty_key_is_hashed_like_java_not_randomized() {
    let topic = new_topic("pub-empty-key", 6).await;
    let publisher = Publisher::<Notification>::builder(bootstrap(), &topic)
        .key_fn(|_: &Notification| "")
        .build()
        .unwrap();
    let events: Vec<Notification> = (0..20).map(notification).collect();
    for result in publisher.send_batch(&events).await {
        assert_eq!(
            result.expect("acknowledged").partition,
            java_partition(b"", 6).unwrap()
        );
    }
}
