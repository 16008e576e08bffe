//! The services the benchmark needs (Kafka, and Redis for scenario c), its topics, and the
//! offsets it reads back: log ends and a group's commits.

use std::time::{Duration, Instant};

use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::error::RDKafkaErrorCode;
use kourier::rdkafka::{Offset, TopicPartitionList};

use crate::BoxResult;

// The same addresses as the integration tests.
#[path = "../../tests/support/addresses.rs"]
mod addresses;
pub(crate) use addresses::{bootstrap, client_config, redis_url};

pub(crate) fn require_kafka() -> BoxResult<()> {
    let consumer: BaseConsumer = client_config().create()?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| {
            format!(
                "Kafka is not reachable at {} ({e}); start it with `scripts/services up`",
                bootstrap()
            )
        })?;
    if metadata.brokers().is_empty() {
        return Err("Kafka answered with no brokers".into());
    }
    Ok(())
}

/// The Redis server's CPU seconds so far (`INFO cpu`: `used_cpu_user` + `used_cpu_sys`).
pub(crate) async fn redis_cpu_secs() -> BoxResult<f64> {
    let client = redis::Client::open(redis_url().as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut connection)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (name, value) = l.trim().split_once(':')?;
            matches!(name, "used_cpu_user" | "used_cpu_sys").then(|| value.parse::<f64>().ok())?
        })
        .sum())
}

/// The prefix of every Redis key a scenario of run `run_id` writes (kourier's store prefix, and
/// the floor's keys under it): what [`delete_redis_keys`] deletes after it.
pub(crate) fn redis_prefix(run_id: &str) -> String {
    format!("kourier-bench:{run_id}:")
}

/// Deletes the keys a Redis scenario wrote (`prefix*`, with `SCAN` and `UNLINK`), so that the
/// next one starts from the same keyspace. Left behind (their TTL is 10 minutes), they made
/// the next scenarios' server CPU depend on what ran before: Redis grows its key table by
/// rehashing every key into one twice the size when the keyspace passes a power of two
/// (2^20, 2^21, ...), and a scenario that wrote its million keys across that line paid for
/// the keys before it (one (c0) crossing 2^23 keys cost the server 19.8 s against 6.2–8.9 s
/// for the same (c0) between the lines). Returns how many were deleted.
pub(crate) async fn delete_redis_keys(prefix: &str) -> BoxResult<u64> {
    let client = redis::Client::open(redis_url().as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            deleted += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(&mut connection)
                .await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Waits (at most 10 s) until the Redis server is idle: under 10 ms of its CPU in 200 ms, so
/// that a scenario's server CPU is its own, not the end of the work before it (a shrinking
/// key table after [`delete_redis_keys`] is rehashed by the server's timer).
pub(crate) async fn settle_redis() -> BoxResult<()> {
    let start = Instant::now();
    let mut before = redis_cpu_secs().await?;
    while start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = redis_cpu_secs().await?;
        if now - before < 0.01 {
            return Ok(());
        }
        before = now;
    }
    eprintln!("the Redis server was still busy after 10 s; measuring anyway");
    Ok(())
}

pub(crate) async fn require_redis() -> BoxResult<()> {
    let url = redis_url();
    let ping = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "Redis is not reachable at {url} ({e}); start it with `scripts/services up`"
        )
        .into()),
        Err(_) => Err(format!("Redis at {url} did not answer PING within 10 s").into()),
    }
}

pub(crate) async fn create_topics(topics: &[(String, i32)]) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config().create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("create topic {topic}: {code}").into()),
        }
    }
    let consumer: BaseConsumer = client_config().create()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, partitions) in topics {
        loop {
            let ready = consumer
                .fetch_metadata(Some(name), Duration::from_secs(10))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name && t.error().is_none())
                        .map(|t| t.partitions().iter().filter(|p| p.leader() >= 0).count())
                });
            if ready == Some(*partitions as usize) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("topic {name} has no leaders after 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

pub(crate) async fn delete_topics(topics: &[String]) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config().create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&names, &options).await? {
        if let Err((topic, code)) = result {
            eprintln!("warning: delete topic {topic}: {code}");
        }
    }
    Ok(())
}

/// Sum of the high watermarks of `topic`'s partitions.
pub(crate) fn log_end(topic: &str, partitions: i32) -> BoxResult<u64> {
    let consumer: BaseConsumer = client_config().create()?;
    let mut sum = 0;
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        sum += high as u64;
    }
    Ok(sum)
}

/// Sum of `group`'s committed offsets on `topic` (missing offsets count 0).
pub(crate) fn committed_sum(group: &str, topic: &str, partitions: i32) -> BoxResult<u64> {
    let consumer: BaseConsumer = client_config().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let sum = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o.max(0) as u64,
            _ => 0,
        })
        .sum();
    drop(committed); // before the consumer (rust-rdkafka #453)
    Ok(sum)
}
