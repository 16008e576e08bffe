//! Batch vs single-record handlers against a bulk downstream: each call takes 10 ms whatever
//! it carries, and at most 4 calls run at once (a bulk API with a connection pool of 4). A
//! drain of `BATCH_BENCH_RECORDS` records (default 20,000 with `--bench`) over 1,000 keys and
//! 6 partitions, with `max_in_flight` 256, in `Key` order and in `Partition` order:
//!
//! - **single**: a `Handler`, one call per record;
//! - **batch**: `batched(..)` with 100 records per batch at most and a 5 ms linger (in both
//!   orders a batch takes each lane's next records: a run per key, a run per partition).
//!
//! Figures per run: records per second from the consumer's start to the last record handled,
//! calls made, batch ÷ single in each order, and the `Partition` batch ÷ the `Key` batch. Run: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo bench
//! --bench batch` (needs `scripts/services up`).

mod drain_common;

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kourier::batch::{BatchHandler, BatchOutcome, batched};
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BytesCodec, Handler, HandlerError, Message, ProcessingOrder, RetryingConsumer, async_trait,
};
use tokio::sync::Semaphore;

const PARTITIONS: i32 = 6;
const KEYS: u64 = 1_000;
const CALL: Duration = Duration::from_millis(10);
const POOL: usize = 4;

/// The bulk downstream: a call takes `CALL` whatever its size, at most `POOL` at once.
struct Downstream {
    pool: Semaphore,
    calls: AtomicU64,
    records: AtomicU64,
}

impl Downstream {
    async fn call(&self, records: usize) {
        let _connection = self.pool.acquire().await.expect("pool");
        tokio::time::sleep(CALL).await;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
    }
}

struct Single(Arc<Downstream>);

#[async_trait]
impl Handler for Single {
    type Event = Option<Vec<u8>>;

    async fn handle(&self, _m: &Message<Option<Vec<u8>>>) -> Result<(), HandlerError> {
        self.0.call(1).await;
        Ok(())
    }
}

struct Bulk(Arc<Downstream>);

#[async_trait]
impl BatchHandler for Bulk {
    type Event = Option<Vec<u8>>;

    async fn handle_batch(&self, batch: &[Message<Option<Vec<u8>>>]) -> BatchOutcome {
        self.0.call(batch.len()).await;
        BatchOutcome::all_ok()
    }
}

/// Drains `records` with the single or the batch handler: records per second and calls.
async fn run(bootstrap: &str, records: u64, order: ProcessingOrder, batch: bool) -> (f64, u64) {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
            as u32
    );
    let topic = format!("bench-batch-{run_id}");
    let admin = TopicAdmin::new(bootstrap);
    admin
        .ensure(&[
            TopicSpec::new(topic.clone(), PARTITIONS),
            TopicSpec::dead_letter(&topic, PARTITIONS),
        ])
        .await
        .expect("topics");
    drain_common::produce(bootstrap, &topic, records, KEYS, |_| vec![b'x'; 100]).await;
    let downstream = Arc::new(Downstream {
        pool: Semaphore::new(POOL),
        calls: AtomicU64::new(0),
        records: AtomicU64::new(0),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let until_stopped = async {
        let _ = stopped.await;
    };
    macro_rules! consumer {
        ($handler:expr) => {
            RetryingConsumer::builder($handler)
                .codec(BytesCodec)
                .bootstrap_servers(bootstrap)
                .group_id(format!("bench-batch-g-{run_id}"))
                .topic(topic.as_str())
                .ordering(order)
                .max_in_flight(256)
                .kafka_config("auto.offset.reset", "earliest")
                .build()
                .expect("build")
        };
    }
    let task = if batch {
        let handler = batched(Bulk(downstream.clone()))
            .max_records(100)
            .linger(Duration::from_millis(5));
        tokio::spawn(consumer!(handler).run(until_stopped))
    } else {
        tokio::spawn(consumer!(Single(downstream.clone())).run(until_stopped))
    };
    while downstream.records.load(Ordering::Relaxed) < records {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the drain did not finish within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = task.await;
    (
        records as f64 / secs,
        downstream.calls.load(Ordering::Relaxed),
    )
}

#[tokio::main]
async fn main() {
    let Some((bootstrap, records)) = drain_common::sized("BATCH_BENCH_RECORDS", 20_000, 200) else {
        return;
    };
    println!(
        "{records} records × 100 B, {PARTITIONS} partitions, {KEYS} keys, max_in_flight 256; \
         the downstream: {CALL:?} per call whatever its size, {POOL} calls at once"
    );
    let mut batches = Vec::new();
    for (name, order) in [
        ("Key", ProcessingOrder::Key),
        ("Partition", ProcessingOrder::Partition),
    ] {
        let (single, single_calls) = run(&bootstrap, records, order, false).await;
        println!("{name:<9} single: {single:>8.0} rec/s, {single_calls} calls");
        let (batch, batch_calls) = run(&bootstrap, records, order, true).await;
        println!(
            "{name:<9} batch:  {batch:>8.0} rec/s, {batch_calls} calls (mean {:.1} records per call)",
            records as f64 / batch_calls as f64
        );
        println!("{name:<9} batch ÷ single: {:.1}×", batch / single);
        batches.push(batch);
    }
    println!(
        "Partition batch ÷ Key batch: {:.2}×",
        batches[1] / batches[0]
    );
}
