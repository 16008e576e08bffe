//! Finished work is not replayed (`CommitMetadata`), against the real broker: a commit
//! carries the offsets finished above its commit point, and the partition's next owner skips
//! them; metadata kourier did not write is read safely.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topic and group.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use kourier::{CommitMetadata, HandlerError, Message, ProcessingOrder, handler_fn};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};

#[derive(Debug, Deserialize)]
struct Job {
    id: usize,
}

const RECORDS: usize = 200;

async fn produce(topic: &str) {
    let records = (0..RECORDS)
        .map(|id| {
            TestRecord::new()
                .key(format!("k{id}"))
                .value(format!(r#"{{"id":{id}}}"#))
        })
        .collect();
    support::produce(topic, records).await;
}

/// Handler calls per record id; record 0 hangs while `stuck` is set.
struct Calls {
    calls: Vec<AtomicU32>,
    stuck: AtomicBool,
}

impl Calls {
    fn new() -> Arc<Self> {
        Arc::new(Calls {
            calls: (0..RECORDS).map(|_| AtomicU32::new(0)).collect(),
            stuck: AtomicBool::new(false),
        })
    }

    fn called(&self) -> Vec<usize> {
        (self.calls.iter().enumerate())
            .filter(|(_, n)| n.load(Ordering::SeqCst) > 0)
            .map(|(id, _)| id)
            .collect()
    }
}

fn counting(calls: &Arc<Calls>) -> impl kourier::Handler<Event = Job> {
    let calls = calls.clone();
    handler_fn(move |m: Message<Job>| {
        let calls = calls.clone();
        async move {
            let id = m.event().id;
            calls.calls[id].fetch_add(1, Ordering::SeqCst);
            while id == 0 && calls.stuck.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<(), HandlerError>(())
        }
    })
}

fn keyed(
    handler: impl kourier::Handler<Event = Job>,
    topic: &str,
    group: &str,
) -> kourier::RetryingConsumerBuilder<impl kourier::Handler<Event = Job>> {
    consumer::builder(handler, topic, group)
        .ordering(ProcessingOrder::Key)
        .shutdown_timeout(Duration::from_secs(1))
        .revoke_timeout(Duration::from_secs(1))
}

/// The first owner: record 0 hangs, every other record is handled; it leaves the group
/// (its partition revoked) with record 0 still running. Returns the group's committed
/// offset and metadata.
async fn first_owner_leaves_with_record_0_stuck(
    topic: &str,
    group: &str,
    metadata: CommitMetadata,
) {
    let calls = Calls::new();
    calls.stuck.store(true, Ordering::SeqCst);
    let c = Running::start(keyed(counting(&calls), topic, group).commit_metadata(metadata));
    wait_for(
        "every record but 0 handled",
        Duration::from_secs(60),
        || calls.called().len() == RECORDS,
    )
    .await;
    let report = c.stop_with_report(Duration::from_secs(30)).await;
    assert_eq!(report.abandoned, 1, "record 0, stuck: {report:?}");
}

/// The next owner, until it handled record `until`: which records it handled, and the
/// snapshot's skip count.
async fn next_owner(topic: &str, group: &str, until: usize) -> (Vec<usize>, u64) {
    let calls = Calls::new();
    let c = Running::start(keyed(counting(&calls), topic, group));
    wait_for("the next owner's records", Duration::from_secs(60), || {
        calls.calls[until].load(Ordering::SeqCst) > 0
    })
    .await;
    // Whatever else it would replay arrives with record 0 (one fetch).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let skipped = c.monitor.snapshot().skipped_finished;
    c.stop().await;
    (calls.called(), skipped)
}

/// A stuck record and a rebalance: the records finished above it are not handled again by
/// the partition's next owner (with metadata off, all of them are: the figure before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_finished_above_a_stuck_one_are_not_replayed_by_the_next_owner() {
    let (topic, group, _) = setup("finished-skip", 1).await;
    produce(&topic).await;
    first_owner_leaves_with_record_0_stuck(&topic, &group, CommitMetadata::FinishedOffsets).await;
    let (again, skipped) = next_owner(&topic, &group, 0).await;

    let (topic_off, group_off, _) = setup("finished-off", 1).await;
    produce(&topic_off).await;
    first_owner_leaves_with_record_0_stuck(&topic_off, &group_off, CommitMetadata::None).await;
    let (again_off, _) = next_owner(&topic_off, &group_off, 0).await;
    eprintln!(
        "replayed by the next owner after a stuck record and a rebalance: {} of {RECORDS} with finished offsets in the commit metadata, {} without",
        again.len(),
        again_off.len()
    );
    assert_eq!(again, [0], "only the record that never finished");
    assert_eq!(skipped, RECORDS as u64 - 1);
    assert_eq!(
        again_off.len(),
        RECORDS,
        "without metadata every record runs again"
    );
}

/// Metadata another client committed (or an old commit's) is ignored: every record from
/// the commit point on is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_kourier_did_not_write_is_ignored() {
    let (topic, group, _) = setup("finished-foreign", 1).await;
    produce(&topic).await;
    for foreign in ["written by another app", "k1:0:1.199", "k1:0:x"] {
        let committer: BaseConsumer = support::client_config()
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        // Commit point 0 with metadata naming another point (5), or not kourier's at all.
        tpl.add_partition_offset(&topic, 0, Offset::Offset(5))
            .unwrap();
        tpl.find_partition(&topic, 0).unwrap().set_metadata(foreign);
        committer.commit(&tpl, CommitMode::Sync).expect("commit");
        drop(committer);
        let (again, skipped) = next_owner(&topic, &group, RECORDS - 1).await;
        assert_eq!(skipped, 0, "{foreign:?}");
        assert_eq!(
            again.len(),
            RECORDS - 5,
            "every record from 5 on: {foreign:?}"
        );
    }
}
