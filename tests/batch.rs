//! Batch handlers (`kourier::batch`) against the real broker: records are handled in
//! batches, each exactly once, in order within each key; a record a batch fails permanently
//! is dead-lettered alone and the records after it in its batch are handled in the next one.
//!
//! Needs Kafka (`scripts/services up`); the test has its own topics and group.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::batch::{BatchHandler, BatchOutcome, batched};
use kourier::{
    DedupKey, HandlerError, Idempotency, InMemoryIdempotencyStore, Message, ProcessingOrder,
    RetryPolicy, async_trait,
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

/// A bulk insert: stores its batch up to the first bad row (refused: the rest of the batch is
/// not attempted), 20 ms per call whatever its size.
#[derive(Default)]
struct BulkInsert {
    /// Rows stored, in order.
    stored: Mutex<Vec<u64>>,
    sizes: Mutex<Vec<usize>>,
}

/// The handler: shares the "database" with the test.
struct Insert(Arc<BulkInsert>);

#[async_trait]
impl BatchHandler for Insert {
    type Event = Row;

    async fn handle_batch(&self, batch: &[Message<Row>]) -> BatchOutcome {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.sizes.lock().unwrap().push(batch.len());
        let mut stored = self.0.stored.lock().unwrap();
        for (i, m) in batch.iter().enumerate() {
            let id = m.event().id;
            if bad(id) {
                return BatchOutcome::failed_at(
                    i,
                    HandlerError::permanent(format!("row {id} refused")),
                );
            }
            stored.push(id);
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
        db.stored.lock().unwrap().len() >= good
    })
    .await;
    let bad_rows: Vec<u64> = (0..RECORDS).filter(|id| bad(*id)).collect();
    let letters = support::read_at_least(&dlt_topic, bad_rows.len(), Duration::from_secs(30)).await;
    c.stop().await;

    let stored = db.stored.lock().unwrap().clone();
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
    let sizes = db.sizes.lock().unwrap().clone();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    eprintln!(
        "{} batches for {RECORDS} records: mean size {mean:.1}, largest {}",
        sizes.len(),
        sizes.iter().max().unwrap()
    );
    assert!(
        mean > 2.0,
        "records were batched (mean batch size {mean:.1})"
    );
}
