//! `kourier::topics` against the real broker: creating missing topics with their partition
//! counts and configuration, a second call that changes nothing, two instances racing to
//! create the same topic, `missing` reporting exactly the absent topics (without creating
//! them), a refused spec naming its topic, and an unreachable cluster answered within the
//! timeout.
//!
//! Needs Kafka at `KAFKA_BOOTSTRAP_SERVERS` (default 127.0.0.1:9092): `scripts/services up`.
//! The unreachable-cluster test needs nothing.

mod support;

use std::time::{Duration, Instant};

use kourier::Error;
use kourier::rdkafka::types::RDKafkaErrorCode;
use kourier::topics::{TopicAdmin, TopicError, TopicSpec};

use crate::support::{
    bootstrap, client_config, create_topic, partitions_of, require_kafka, unique_name,
};

fn admin() -> TopicAdmin {
    TopicAdmin::new(bootstrap()).timeout(Duration::from_secs(30))
}

/// The partition ids `0..count`.
fn ids(count: i32) -> Vec<i32> {
    (0..count).collect()
}

#[tokio::test]
async fn ensure_creates_missing_topics_with_their_partition_counts() {
    require_kafka().await;
    let source = unique_name("topics-create");
    let other = unique_name("topics-create-other");
    let dlt = format!("{source}.dlt");

    let report = admin()
        .ensure(&[
            TopicSpec::new(&source, 3),
            TopicSpec::dead_letter(&source, 3),
            TopicSpec::new(&other, 1).with_config("retention.ms", "3600000"),
        ])
        .await
        .expect("ensure creates the topics");

    assert_eq!(
        report.created(),
        [source.clone(), dlt.clone(), other.clone()]
    );
    assert!(report.existing().is_empty(), "{report:?}");
    assert_eq!(report.partitions(&source), Some(3));
    assert_eq!(report.partitions(&dlt), Some(3));
    assert_eq!(report.partitions(&other), Some(1));
    // An independent metadata request sees them, every partition already led.
    assert_eq!(partitions_of(&source).await, ids(3));
    assert_eq!(partitions_of(&dlt).await, ids(3));
    assert_eq!(partitions_of(&other).await, ids(1));
    assert_eq!(
        topic_config(&other, "retention.ms").await.as_deref(),
        Some("3600000"),
        "the spec's topic configuration is applied"
    );
}

#[tokio::test]
async fn ensure_twice_creates_nothing_the_second_time() {
    require_kafka().await;
    let a = unique_name("topics-idempotent-a");
    let b = unique_name("topics-idempotent-b");
    let specs = [TopicSpec::new(&a, 2), TopicSpec::new(&b, 4)];

    let first = admin().ensure(&specs).await.expect("first ensure");
    assert_eq!(first.created(), [a.clone(), b.clone()]);

    // Asking for other counts does not change existing topics: they keep theirs.
    let again = [TopicSpec::new(&a, 5), TopicSpec::new(&b, 4)];
    let second = admin().ensure(&again).await.expect("second ensure");
    assert!(second.created().is_empty(), "{second:?}");
    assert_eq!(second.existing(), [a.clone(), b.clone()]);
    assert!(!second.was_created(&a));
    assert_eq!(second.partitions(&a), Some(2));
    assert_eq!(second.partitions(&b), Some(4));
    assert_eq!(partitions_of(&a).await, ids(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensure_of_one_new_topic_both_succeed() {
    require_kafka().await;
    let topic = unique_name("topics-race");
    let spec = [TopicSpec::new(&topic, 3)];
    // Two instances of a service starting at the same moment, each with its own admin.
    let (one, two) = (admin(), admin());
    let (r1, r2) = tokio::join!(one.ensure(&spec), two.ensure(&spec));
    let (r1, r2) = (r1.expect("first instance"), r2.expect("second instance"));

    assert_eq!(
        r1.created().len() + r2.created().len(),
        1,
        "exactly one instance created the topic: {r1:?} {r2:?}"
    );
    assert_eq!(r1.created().len() + r1.existing().len(), 1);
    assert_eq!(r2.created().len() + r2.existing().len(), 1);
    // Both return only once the topic is usable.
    assert_eq!(r1.partitions(&topic), Some(3));
    assert_eq!(r2.partitions(&topic), Some(3));
    assert_eq!(partitions_of(&topic).await, ids(3));
}

#[tokio::test]
async fn missing_reports_exactly_the_absent_topics() {
    require_kafka().await;
    let present = unique_name("topics-present");
    let absent = unique_name("topics-absent");
    let absent_too = format!("{present}.dlt");
    create_topic(&present, 2).await;
    let admin = admin();

    let asked = [present.as_str(), absent.as_str(), absent_too.as_str()];
    let missing = admin.missing(&asked).await.expect("missing answers");
    assert_eq!(missing, [absent.clone(), absent_too.clone()]);

    let counts = admin.partitions(&asked).await.expect("partitions answers");
    assert_eq!(counts.len(), 3);
    assert_eq!(counts[&present], Some(2));
    assert_eq!(counts[&absent], None);
    assert_eq!(counts[&absent_too], None);

    // Asking did not create them (no auto-creation through metadata requests).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = admin.missing(&asked).await.expect("missing answers");
    assert_eq!(still, [absent, absent_too]);
}

#[tokio::test]
async fn a_refused_topic_is_an_error_naming_it() {
    require_kafka().await;
    let fine = unique_name("topics-refused-ok");
    let too_many_replicas = unique_name("topics-refused-rf");
    let started = Instant::now();
    // The single test broker can never hold 3 replicas: refused at once, not retried.
    let err = admin()
        .ensure(&[
            TopicSpec::new(&fine, 1),
            TopicSpec::new(&too_many_replicas, 1).with_replication_factor(3),
        ])
        .await
        .expect_err("replication factor 3 on one broker is refused");
    let elapsed = started.elapsed();
    println!("refused after {elapsed:?}: {}", chain(&err));
    match &err {
        Error::Topic(TopicError::Create { topic, code }) => {
            assert_eq!(topic, &too_many_replicas);
            assert_eq!(*code, RDKafkaErrorCode::InvalidReplicationFactor);
        }
        other => panic!("expected TopicError::Create, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(15),
        "a factor the cluster cannot meet is not retried until the timeout ({elapsed:?})"
    );

    let bad_name = admin()
        .ensure(&[TopicSpec::new("no spaces allowed", 1)])
        .await
        .expect_err("an invalid topic name is refused");
    assert!(
        matches!(&bad_name, Error::Topic(TopicError::Create { topic, .. }) if topic == "no spaces allowed"),
        "{bad_name:?}"
    );
    assert!(
        matches!(
            admin().ensure(&[TopicSpec::new(&fine, 0)]).await,
            Err(Error::Config(_))
        ),
        "zero partitions is refused before anything connects"
    );
}

#[tokio::test]
async fn an_unreachable_cluster_is_an_error_within_the_timeout() {
    // Nothing listens on port 1.
    let timeout = Duration::from_secs(5);
    let admin = TopicAdmin::new("127.0.0.1:1").timeout(timeout);

    let started = Instant::now();
    let err = admin
        .missing(&["notify.v1"])
        .await
        .expect_err("nothing answers at 127.0.0.1:1");
    let missing_took = started.elapsed();

    let started = Instant::now();
    let ensure_err = admin
        .ensure(&[TopicSpec::new("notify.v1", 1)])
        .await
        .expect_err("nothing answers at 127.0.0.1:1");
    let ensure_took = started.elapsed();

    let text = chain(&err);
    println!("missing() failed after {missing_took:?}: {text}");
    println!(
        "ensure() failed after {ensure_took:?}: {}",
        chain(&ensure_err)
    );
    for (e, took) in [(&err, missing_took), (&ensure_err, ensure_took)] {
        match e {
            Error::Topic(TopicError::Unreachable {
                bootstrap_servers,
                after,
                ..
            }) => {
                assert_eq!(bootstrap_servers, "127.0.0.1:1");
                assert!(
                    *after >= timeout,
                    "it tried for the whole timeout: {after:?}"
                );
            }
            other => panic!("expected TopicError::Unreachable, got {other:?}"),
        }
        assert!(took >= timeout, "it tried for the whole timeout: {took:?}");
        // Generous: the bound is the timeout plus a metadata request's return.
        assert!(took < Duration::from_secs(30), "took {took:?}");
    }
    assert!(
        text.contains("127.0.0.1:1"),
        "the message names the servers: {text}"
    );
}

/// `error: cause: cause`, as a log line would show it.
fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        // Many errors print their source themselves: do not repeat it.
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// A topic's configuration value, as the broker describes it.
async fn topic_config(topic: &str, key: &str) -> Option<String> {
    crate::support::topic_config_via(&client_config(), topic, key).await
}
