//! Batch handlers (`kourier::batch`) against the real broker: records are handled in
//! batches, each exactly once, in order within each key (in `Key` order) or partition (in
//! `Partition` order, where a batch takes a run of its partition's records); a record a
//! batch fails permanently is dead-lettered alone and the records after it in its batch are
//! handled in the next one, after its dead letter.
//!
//! Needs Kafka (`scripts/services up`); the test has its own topics and group.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::batch::{BatchHandler, BatchOutcome, batched};
use kourier::{
    DeadLetterReason, DedupKey, HandlerError, Idempotency, IdempotencyStore,
    InMemoryIdempotencyStore, Message, ProcessingOrder, RecordOutcome, RetryPolicy, async_trait,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};

#[derive(Debug, Deserialize)]
struct Row {
    id: u64,
}

const RECORDS: u64 = 2_000;
const KEYS: u64 = 200;

fn row(id: u64) -> TestRecord {
    TestRecord::new()
        .key(format!("k-{}", id % KEYS))
        .value(format!(r#"{{"id":{id}}}"#))
}

/// One row in 100 is refused by the "database".
fn bad(id: u64) -> bool {
    id % 100 == 42
}

/// What happened to a record, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    /// The bulk call stored row `id` (at partition, offset).
    Stored(u64, i32, i64),
    /// The bulk call refused it (partition, offset).
    Refused(i32, i64),
    /// The consumer settled it with this outcome (partition, offset).
    Settled(i32, i64, RecordOutcome),
}

/// A bulk insert: stores its batch up to the first bad row (refused: the rest of the batch is
/// not attempted), 20 ms per call whatever its size, and logs each row it stores or refuses
/// (a test's outcome observer may log into the same log).
#[derive(Default)]
struct BulkInsert {
    log: Mutex<Vec<Seen>>,
    sizes: Mutex<Vec<usize>>,
}

impl BulkInsert {
    /// The rows stored, in order: id, partition, offset.
    fn stored(&self) -> Vec<(u64, i32, i64)> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter_map(|s| match s {
                Seen::Stored(id, p, o) => Some((*id, *p, *o)),
                _ => None,
            })
            .collect()
    }

    /// The mean batch size (printed with the count and the largest).
    fn mean_batch(&self, what: &str) -> f64 {
        let sizes = self.sizes.lock().unwrap().clone();
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        eprintln!(
            "{} batches for {what}: mean size {mean:.1}, largest {}",
            sizes.len(),
            sizes.iter().max().unwrap()
        );
        mean
    }
}

/// The handler: shares the "database" with the test.
struct Insert(Arc<BulkInsert>);

#[async_trait]
impl BatchHandler for Insert {
    type Event = Row;

    async fn handle_batch(&self, batch: &[Message<Row>]) -> BatchOutcome {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.sizes.lock().unwrap().push(batch.len());
        let mut log = self.0.log.lock().unwrap();
        for (i, m) in batch.iter().enumerate() {
            let (id, p, o) = (m.event().id, m.raw().partition, m.raw().offset);
            if bad(id) {
                log.push(Seen::Refused(p, o));
                return BatchOutcome::failed_at(
                    i,
                    HandlerError::permanent(format!("row {id} refused")),
                );
            }
            log.push(Seen::Stored(id, p, o));
        }
        BatchOutcome::all_ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_handle_each_record_once_in_key_order_and_dead_letter_only_the_bad_ones() {
    let (topic, group, dlt_topic) = setup("batch", 4).await;
    support::produce(&topic, (0..RECORDS).map(row).collect()).await;
    let db = Arc::new(BulkInsert::default());
    let handler = batched(Insert(db.clone()))
        .max_records(50)
        .linger(Duration::from_millis(5));
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(128)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(10), 2))
            .idempotency(Idempotency::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                DedupKey::from_fn(|m: &Message<Row>| Some(m.event().id.to_string())),
            )),
    );
    let good = (0..RECORDS).filter(|id| !bad(*id)).count();
    wait_for("every good row stored", Duration::from_secs(60), || {
        db.stored().len() >= good
    })
    .await;
    let bad_rows: Vec<u64> = (0..RECORDS).filter(|id| bad(*id)).collect();
    let letters = support::read_at_least(&dlt_topic, bad_rows.len(), Duration::from_secs(30)).await;
    c.stop().await;

    let stored: Vec<u64> = db.stored().iter().map(|(id, _, _)| *id).collect();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for id in &stored {
        *seen.entry(*id).or_default() += 1;
    }
    let not_once: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(not_once.is_empty(), "stored more than once: {not_once:?}");
    assert_eq!(stored.len(), good, "every good row stored");
    // Within a key, rows were stored in the order they were produced.
    let mut last: HashMap<u64, u64> = HashMap::new();
    for id in &stored {
        if let Some(before) = last.insert(id % KEYS, *id) {
            assert!(
                before < *id,
                "key k-{}: {before} stored before {id}",
                id % KEYS
            );
        }
    }
    assert_eq!(letters.len(), bad_rows.len(), "one dead letter per bad row");
    let mean = db.mean_batch(&format!("{RECORDS} records"));
    assert!(
        mean > 2.0,
        "records were batched (mean batch size {mean:.1})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_partition_order_a_batch_takes_a_run_of_its_partition_in_offset_order() {
    const RECORDS: u64 = 1_000;
    const PARTITIONS: i32 = 3;
    let (topic, group, dlt_topic) = setup("batch-partition", PARTITIONS).await;
    let sent = support::produce(
        &topic,
        (0..RECORDS)
            .map(|id| row(id).partition(i32::try_from(id).unwrap() % PARTITIONS))
            .collect(),
    )
    .await;
    let bad_at: Vec<(i32, i64)> = (0..RECORDS)
        .filter(|id| bad(*id))
        .map(|id| sent[usize::try_from(id).unwrap()])
        .collect();
    let db = Arc::new(BulkInsert::default());
    let observed = db.clone();
    let c = Running::start(
        consumer::builder(batched(Insert(db.clone())), &topic, &group)
            .ordering(ProcessingOrder::Partition)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(10), 2))
            .on_outcome(move |raw, outcome| {
                let seen = Seen::Settled(raw.partition, raw.offset, outcome);
                observed.log.lock().unwrap().push(seen);
            }),
    );
    let settled = |log: &[Seen]| {
        log.iter()
            .filter(|s| matches!(s, Seen::Settled(..)))
            .count()
    };
    wait_for("every record settled", Duration::from_secs(60), || {
        settled(&db.log.lock().unwrap()) >= RECORDS as usize
    })
    .await;
    let log = db.log.lock().unwrap().clone();
    let good = RECORDS as usize - bad_at.len();
    let stored: Vec<(i32, i64)> = db.stored().iter().map(|(_, p, o)| (*p, *o)).collect();
    // Per partition, offsets strictly increase: each row stored once, in offset order.
    let mut last: HashMap<i32, i64> = HashMap::new();
    for (p, o) in &stored {
        if let Some(before) = last.insert(*p, *o) {
            assert!(
                before < *o,
                "partition {p}: offset {o} stored after {before}"
            );
        }
    }
    assert_eq!(stored.len(), good, "every good row stored exactly once");
    // A partition's rows after a refused one are stored only after its last attempt (the
    // one that dead-letters it: its lane then moves on while the letter is written).
    let permanent = RecordOutcome::DeadLettered(DeadLetterReason::Permanent);
    for (p, o) in &bad_at {
        assert!(
            log.contains(&Seen::Settled(*p, *o, permanent)),
            "partition {p} offset {o} dead-lettered"
        );
        let last_try = log
            .iter()
            .rposition(|s| *s == Seen::Refused(*p, *o))
            .unwrap_or_else(|| panic!("partition {p} offset {o} attempted"));
        let early: Vec<_> = log[..last_try]
            .iter()
            .filter(|s| matches!(s, Seen::Stored(_, sp, so) if sp == p && so > o))
            .collect();
        assert!(
            early.is_empty(),
            "partition {p}: stored before offset {o}'s last attempt: {early:?}"
        );
    }
    let letters = support::read_at_least(&dlt_topic, bad_at.len(), Duration::from_secs(30)).await;
    c.stop().await;
    assert_eq!(letters.len(), bad_at.len(), "one dead letter per bad row");
    let mean = db.mean_batch(&format!("{RECORDS} records on {PARTITIONS} partitions"));
    assert!(
        mean > 10.0,
        "a batch takes a run of its partition (mean batch size {mean:.1}; one record per \
         partition would make at most {PARTITIONS})"
    );
}

/// `Partition` order with an idempotency store: the lane's records whose claims were fetched
/// ahead join their lead's batch (mean batch size well above the partition count), each good
/// row is stored once, and an event delivered twice (the same dedup key in two records, in its
/// own partition and in another) is stored once.
async fn in_partition_order_with_a_store(name: &str, store: Arc<dyn IdempotencyStore>) {
    const RECORDS: u64 = 600;
    const DUPLICATES: u64 = 60;
    const PARTITIONS: i32 = 3;
    let (topic, group, dlt_topic) = setup(name, PARTITIONS).await;
    // Rows 0..RECORDS, then rows 0..DUPLICATES again (each to the partition after its first).
    let ids: Vec<(u64, i32)> = (0..RECORDS)
        .map(|id| (id, i32::try_from(id).unwrap() % PARTITIONS))
        .chain((0..DUPLICATES).map(|id| (id, (i32::try_from(id).unwrap() + 1) % PARTITIONS)))
        .collect();
    let sent = support::produce(
        &topic,
        ids.iter().map(|(id, p)| row(*id).partition(*p)).collect(),
    )
    .await;
    // A bad row delivered twice is dead-lettered once (one event, one outcome).
    let bad_rows = (0..RECORDS).filter(|id| bad(*id)).count();
    assert_eq!(sent.len(), ids.len());
    let db = Arc::new(BulkInsert::default());
    let settled = Arc::new(Mutex::new(0usize));
    let count = settled.clone();
    let c = Running::start(
        consumer::builder(batched(Insert(db.clone())), &topic, &group)
            .ordering(ProcessingOrder::Partition)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(10), 2))
            .idempotency(Idempotency::new(
                store,
                DedupKey::from_fn(|m: &Message<Row>| Some(m.event().id.to_string())),
            ))
            .on_outcome(move |_, _| *count.lock().unwrap() += 1),
    );
    wait_for("every record settled", Duration::from_secs(60), || {
        *settled.lock().unwrap() >= ids.len()
    })
    .await;
    let letters = support::read_at_least(&dlt_topic, bad_rows, Duration::from_secs(30)).await;
    c.stop().await;

    let mut times: HashMap<u64, u32> = HashMap::new();
    for (id, _, _) in db.stored() {
        *times.entry(id).or_default() += 1;
    }
    let not_once: Vec<_> = (0..RECORDS)
        .filter(|id| !bad(*id) && times.get(id) != Some(&1))
        .map(|id| (id, times.get(&id).copied().unwrap_or(0)))
        .collect();
    assert!(
        not_once.is_empty(),
        "each good row (duplicates included) stored once: (id, times) {not_once:?}"
    );
    assert!(times.keys().all(|id| !bad(*id)), "no refused row stored");
    assert_eq!(letters.len(), bad_rows, "one dead letter per bad row");
    let mean = db.mean_batch(&format!(
        "{} records on {PARTITIONS} partitions with a store ({name})",
        ids.len()
    ));
    assert!(
        mean > 10.0,
        "a batch takes a run of its partition whose claims are held (mean batch size \
         {mean:.1}; one record per partition would make at most {PARTITIONS})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_partition_order_with_an_in_memory_store_batches_store_each_row_once() {
    in_partition_order_with_a_store(
        "batch-partition-store",
        Arc::new(InMemoryIdempotencyStore::new()),
    )
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_partition_order_with_a_redis_store_batches_store_each_row_once() {
    support::require_redis().await;
    let store = kourier::RedisIdempotencyStore::builder(support::redis_url())
        .key_prefix(format!("{}:", support::unique_name("batch-idem")))
        .build()
        .await
        .expect("connect the idempotency store to REDIS_URL");
    in_partition_order_with_a_store("batch-partition-redis", Arc::new(store)).await;
}
