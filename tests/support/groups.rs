//! Consumer groups' committed offsets: reading them, adding them up, and moving them.

use std::collections::BTreeMap;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::services::{KAFKA_TIMEOUT, client_config};

/// The committed offset of `group` for partitions `0..partitions` of `topic`: `None` where
/// the group has committed nothing.
pub(crate) async fn committed_offsets(
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, Option<i64>> {
    try_committed_offsets(group, topic, partitions)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`committed_offsets`], or why the broker did not answer in time (e.g. a transaction with
/// offsets pending: a `read_committed` client waits for it to end).
pub(crate) async fn try_committed_offsets(
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<BTreeMap<i32, Option<i64>>, String> {
    let group = group.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer = group_client(&group);
        // The lists live and die inside this block, before the consumer is dropped
        // (rust-rdkafka #453: dropping a consumer while its lists live can hang).
        let offsets = {
            let mut wanted = TopicPartitionList::new();
            wanted.add_partition_range(&topic, 0, partitions - 1);
            let committed = consumer
                .committed_offsets(wanted, KAFKA_TIMEOUT)
                .map_err(|e| format!("committed offsets of {group} on {topic}: {e}"))?;
            committed
                .elements_for_topic(&topic)
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    (e.partition(), offset)
                })
                .collect()
        };
        drop(consumer);
        Ok(offsets)
    })
    .await
    .expect("committed_offsets panicked")
}

/// A client for `group` that never joins it: it reads and commits offsets only.
fn group_client(group: &str) -> BaseConsumer {
    client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("create consumer")
}

/// The committed offsets of `group` on partitions `0..partitions` of `topic` added up (0
/// where none): the number of records settled when the offsets are dense from 0.
/// The sum of `group`'s committed offsets on `topic` (a partition without one counts 0), or
/// why the broker did not answer in time (see [`try_committed_offsets`]).
pub(crate) async fn try_committed_sum(
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<i64, String> {
    let offsets = try_committed_offsets(group, topic, partitions).await?;
    Ok(offsets.values().map(|o| o.unwrap_or(0)).sum())
}

pub(crate) async fn committed_sum(group: &str, topic: &str, partitions: i32) -> i64 {
    committed_offsets(group, topic, partitions)
        .await
        .values()
        .map(|o| o.unwrap_or(0))
        .sum()
}

/// Commits `offsets` (partition, next offset to read) of `topic` for `group`, synchronously,
/// from a consumer that is not a member of the group (the group must have no live members).
pub(crate) async fn commit_offsets(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let group = group.to_owned();
    let topic = topic.to_owned();
    let offsets = offsets.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer = group_client(&group);
        {
            let mut tpl = TopicPartitionList::new();
            for &(partition, offset) in &offsets {
                tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                    .expect("valid offset");
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .unwrap_or_else(|e| panic!("commit {offsets:?} of {topic} for {group}: {e}"));
        }
        drop(consumer);
    })
    .await
    .expect("commit_offsets panicked");
}
