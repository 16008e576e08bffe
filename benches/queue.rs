//! Queue mode (feature `queue`, experimental) against the consumer-group engine, on the same
//! drain of a topic with **one partition**:
//!
//! - **no-op**: `QUEUE_BENCH_RECORDS` records (default 20,000 with `--bench`) handled by a
//!   handler that does nothing: a `RetryingConsumer` (unordered, `max_in_flight` 64) and one
//!   `QueueConsumer` member (`max_in_flight` 64, fetches of 500);
//! - **10 ms**: a tenth as many records, each taking 10 ms: a `RetryingConsumer` in partition
//!   order (a consumer group gives the one partition to one member, which runs one record at
//!   a time) and four `QueueConsumer` members running one record each (members scale past
//!   the partition count).
//!
//! Figures: the time from the consumers' start to the first record handled (joining), and
//! records per second from the first record to the last.
//! Run: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo bench --features queue --bench queue`
//! (needs `scripts/services up`, Kafka 4.2+).

mod drain_common;

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kourier::queue::QueueConsumer;
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BytesCodec, Handler, HandlerError, Message, ProcessingOrder, RetryingConsumer, async_trait,
};

/// Counts records, taking `work` for each.
struct Work {
    work: Duration,
    done: Arc<AtomicU64>,
}

#[async_trait]
impl Handler for Work {
    type Event = Option<Vec<u8>>;

    async fn handle(&self, _m: &Message<Option<Vec<u8>>>) -> Result<(), HandlerError> {
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Engine {
    /// A consumer group, this order and in-flight bound.
    Group(ProcessingOrder, usize),
    /// This many share-group members, each with this in-flight bound.
    Queue(usize, usize),
}

/// Drains `records` records with `engine`, each taking `work`: the time to the first record
/// handled (joining the group), and records per second from then to the last.
async fn run(bootstrap: &str, records: u64, work: Duration, engine: Engine) -> (Duration, f64) {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
            as u32
    );
    let topic = format!("bench-queue-{run_id}");
    TopicAdmin::new(bootstrap)
        .ensure(&[
            TopicSpec::new(topic.clone(), 1),
            TopicSpec::dead_letter(&topic, 1),
        ])
        .await
        .expect("topics");
    drain_common::produce(bootstrap, &topic, records, 1_000, |_| vec![b'x'; 100]).await;
    let done = Arc::new(AtomicU64::new(0));
    let group = format!("bench-queue-g-{run_id}");
    let started = Instant::now();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let handler = || Work {
        work,
        done: done.clone(),
    };
    match engine {
        Engine::Group(order, in_flight) => {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            let consumer = RetryingConsumer::builder(handler())
                .codec(BytesCodec)
                .bootstrap_servers(bootstrap)
                .group_id(group)
                .topic(topic.as_str())
                .ordering(order)
                .max_in_flight(in_flight)
                .kafka_config("auto.offset.reset", "earliest")
                .build()
                .expect("build");
            tasks.push(tokio::spawn(async move {
                let _ = consumer
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await;
            }));
        }
        Engine::Queue(members, in_flight) => {
            for _ in 0..members {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                stops.push(stop);
                let consumer = QueueConsumer::builder(handler())
                    .codec(BytesCodec)
                    .bootstrap_servers(bootstrap)
                    .group_id(group.clone())
                    .topic(topic.as_str())
                    .max_in_flight(in_flight)
                    .fetch_size(if in_flight > 1 { 500 } else { 1 })
                    .build()
                    .expect("build");
                tasks.push(tokio::spawn(async move {
                    let _ = consumer
                        .run(async {
                            let _ = stopped.await;
                        })
                        .await;
                }));
            }
        }
    }
    let mut first = None;
    while done.load(Ordering::Relaxed) < records {
        if first.is_none() && done.load(Ordering::Relaxed) > 0 {
            first = Some(Instant::now());
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the drain did not finish within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = first.unwrap_or(started);
    let joined = first.duration_since(started);
    let secs = first.elapsed().as_secs_f64().max(1e-3);
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        let _ = task.await;
    }
    (joined, records.saturating_sub(1) as f64 / secs)
}

#[tokio::main]
async fn main() {
    let Some((bootstrap, records)) = drain_common::sized("QUEUE_BENCH_RECORDS", 20_000, 200) else {
        return;
    };
    let slow = (records / 10).max(1);
    println!(
        "one partition, 100 B records; join = time to the first record handled, rate = from \
         the first record to the last"
    );
    let (gj, group) = run(
        &bootstrap,
        records,
        Duration::ZERO,
        Engine::Group(ProcessingOrder::Unordered, 64),
    )
    .await;
    let (qj, queue) = run(&bootstrap, records, Duration::ZERO, Engine::Queue(1, 64)).await;
    println!("no-op, {records} records:");
    println!("  consumer group (unordered, 64 in flight): join {gj:>8.2?}, {group:>8.0} rec/s");
    println!(
        "  queue, 1 member (64 in flight):           join {qj:>8.2?}, {queue:>8.0} rec/s ({:.2}×)",
        queue / group
    );
    let ten = Duration::from_millis(10);
    let (gj, group) = run(
        &bootstrap,
        slow,
        ten,
        Engine::Group(ProcessingOrder::Partition, 1),
    )
    .await;
    let (qj, queue) = run(&bootstrap, slow, ten, Engine::Queue(4, 1)).await;
    println!("10 ms each, {slow} records:");
    println!(
        "  consumer group (partition order: 1 member, 1 at a time): join {gj:>8.2?}, {group:>6.0} rec/s"
    );
    println!(
        "  queue, 4 members × 1 in flight:                          join {qj:>8.2?}, {queue:>6.0} rec/s ({:.2}×)",
        queue / group
    );
}
