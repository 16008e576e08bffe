//! Names no other test uses, and topics that exist (with leaders) before a test goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;

use super::services::{KAFKA_TIMEOUT, START_HINT, client_config, require_kafka};

/// A name no other test (or test run) uses: `kourier-test-<prefix>-<pid>-<counter>-<nanos>`,
/// with characters outside `[A-Za-z0-9._-]` in `prefix` replaced by `-`. Valid as a topic
/// name, a group id and a Redis key.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    format!(
        "kourier-test-{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh topic named after `prefix`, with `partitions` partitions, on a broker that answers.
pub(crate) async fn new_topic(prefix: &str, partitions: i32) -> String {
    require_kafka().await;
    let topic = unique_name(prefix);
    create_topic(&topic, partitions).await;
    topic
}

/// Creates a topic with `partitions` partitions (replication factor 1) and waits until the
/// broker's metadata shows every partition with a leader.
///
/// An existing topic with the same partition count is accepted.
pub(crate) async fn create_topic(name: &str, partitions: i32) {
    create_topic_with_config(name, partitions, &[]).await;
}

/// Like [`create_topic`], with topic-level `configs` such as `("max.message.bytes", "2048")`.
pub(crate) async fn create_topic_with_config(
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    create_topic_via(&client_config(), name, partitions, configs).await;
}

/// Like [`create_topic`], on the broker that `client` (a client config) reaches: for tests
/// that run a broker of their own.
pub(crate) async fn create_topic_via(
    client: &ClientConfig,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = client.create().expect("create admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}; is Kafka up? {START_HINT}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("create topic {topic}: {code}"),
        }
    }
    let name = name.to_owned();
    let client = client.clone();
    tokio::task::spawn_blocking(move || wait_for_topic(&client, &name, partitions))
        .await
        .expect("topic wait panicked");
}

fn wait_for_topic(client: &ClientConfig, name: &str, partitions: i32) {
    let consumer: BaseConsumer = client.create().expect("create consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = match consumer.fetch_metadata(Some(name), KAFKA_TIMEOUT) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| {
                    let ready = t.partitions().iter().filter(|p| p.leader() >= 0).count();
                    (t.partitions().len(), ready)
                }),
            Err(_) => None,
        };
        if let Some((count, ready)) = seen {
            assert_eq!(
                count, partitions as usize,
                "topic {name} exists with {count} partitions, wanted {partitions}"
            );
            if ready == count {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "topic {name} not visible in metadata after 30 s (seen: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The partition ids of a topic, from the broker's metadata.
pub(crate) async fn partitions_of(topic: &str) -> Vec<i32> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config().create().expect("create consumer");
        topic_partitions(&consumer, &topic)
    })
    .await
    .expect("metadata task panicked")
}

/// The broker's metadata about `topic`; fails the test when the broker does not answer.
pub(super) fn metadata_of(consumer: &BaseConsumer, topic: &str) -> Metadata {
    consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .unwrap_or_else(|e| panic!("metadata for {topic}: {e}; {START_HINT}"))
}

pub(super) fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    let metadata = metadata_of(consumer, topic);
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .unwrap_or_else(|| panic!("topic {topic} missing from metadata"));
    if let Some(err) = t.error() {
        panic!("topic {topic}: {err:?}");
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    ids
}

/// A topic's configuration value `key`, as the broker `client` reaches describes it (`None`
/// when it has no value).
pub(crate) async fn topic_config_via(
    client: &ClientConfig,
    topic: &str,
    key: &str,
) -> Option<String> {
    let admin: AdminClient<DefaultClientContext> = client.create().expect("create admin client");
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await
        .expect("describe configs");
    let resource = results
        .into_iter()
        .next()
        .expect("one resource")
        .unwrap_or_else(|code| panic!("describe {topic}: {code}"));
    resource.get(key).and_then(|e| e.value.clone())
}
