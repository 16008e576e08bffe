//! Kafka chores around the notifier: watching a group's committed offsets, reading dead
//! letters back. Plain rdkafka (re-exported by kourier as `kourier::rdkafka`); the topics are
//! created with kourier's own `kourier::topics::TopicAdmin` (see `notifier.rs`).
//!
//! rdkafka's watermark, commit and poll calls block, so the async callers run them with
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::message::OwnedMessage;
use kourier::rdkafka::{Message as _, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer that never subscribes: for metadata, watermarks, committed offsets and reading
/// assigned partitions. It does not join `group` (only `subscribe` does).
fn plain_consumer(bootstrap: &str, group: Option<&str>) -> Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    if let Some(group) = group {
        config.set("group.id", group);
    }
    Ok(config.create()?)
}

/// The end offset (high watermark) of every partition of `topic`.
pub(crate) fn end_offsets(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<BTreeMap<i32, i64>> {
    let client = plain_consumer(bootstrap, None)?;
    let deadline = Instant::now() + TIMEOUT;
    (0..partitions)
        .map(|p| {
            loop {
                match client.fetch_watermarks(topic, p, TIMEOUT) {
                    Ok((_, high)) => return Ok((p, high)),
                    // Right after a broker (re)start, leadership may not be settled yet.
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("reading the end offset of {topic}/{p}"));
                    }
                }
            }
        })
        .collect()
}

/// Reads a group's committed offsets of one topic.
pub(crate) struct CommittedOffsets {
    client: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl CommittedOffsets {
    pub(crate) fn new(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Result<Self> {
        Ok(CommittedOffsets {
            client: plain_consumer(bootstrap, Some(group))?,
            topic: topic.to_owned(),
            partitions,
        })
    }

    /// The committed offset (the next record to read) per partition; partitions without a
    /// commit are left out.
    pub(crate) fn get(&self) -> Result<BTreeMap<i32, i64>> {
        let mut wanted = TopicPartitionList::new();
        for p in 0..self.partitions {
            wanted.add_partition(&self.topic, p);
        }
        // Keep the returned list in this scope: a list from a consumer must be dropped before
        // the consumer (rust-rdkafka #453).
        let committed = self.client.committed_offsets(wanted, TIMEOUT)?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    }
}

/// Reads `topic` from the given offsets up to its end offsets *at the time of the call*.
/// Partitions not in `from` are read from their start.
pub(crate) fn read_from(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    from: &BTreeMap<i32, i64>,
) -> Result<Vec<OwnedMessage>> {
    let ends = end_offsets(bootstrap, topic, partitions)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0usize;
    for (&p, &end) in &ends {
        let start = from.get(&p).copied().unwrap_or(0);
        if end > start {
            assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
            remaining += 1;
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    // librdkafka's assign() needs a group id, though nothing is committed or joined here.
    let client = plain_consumer(bootstrap, Some("mail-notifier-reader"))?;
    client.assign(&assignment)?;
    let mut done = std::collections::BTreeSet::new();
    let deadline = Instant::now() + TIMEOUT;
    while done.len() < remaining {
        if Instant::now() > deadline {
            bail!(
                "reading {topic}: only {} of {remaining} partitions read to their end",
                done.len()
            );
        }
        match client.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (p, offset) = (m.partition(), m.offset());
                if offset + 1 >= ends[&p] {
                    done.insert(p);
                }
                if offset < ends[&p] {
                    out.push(m.detach());
                }
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
            None => {}
        }
    }
    Ok(out)
}
