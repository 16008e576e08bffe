//! Queue mode (`kourier::queue::QueueConsumer`, a share group) vs the consumer-group engine
//! (`RetryingConsumer`) on the same drain: each scenario fills one topic, then each engine
//! drains it with a group of its own (both from the earliest record), one after the other.
//!
//! - **no-op**: a handler that does nothing; 4 partitions, one member each side,
//!   `max_in_flight` 64; `QUEUE_BENCH_RECORDS` records (default 50,000 with `--bench`).
//! - **no-op f1k**: the same, the queue member fetching up to 1,024 records at a time
//!   (`fetch_size`; by default a member fetches `max_in_flight` records and fetches again once
//!   all of them are settled, one round trip per 64 records here).
//! - **10 ms**: a handler that sleeps 10 ms; the same set-up, a tenth of the records.
//! - **scaling**: a 10 ms handler on **1 partition**, `max_in_flight` 8 per member: 4 queue
//!   members in one share group vs one consumer-group member (a consumer group gives one
//!   partition to one member; more members would idle), a twenty-fifth of the records.
//!
//! The consumer group runs `ProcessingOrder::Unordered` (queue mode has no order either).
//! Figures per run: records per second from the first record handled to the last (the time to
//! join the group and get the first record is printed apart, not counted), and queue ÷ group.
//! Handler calls are counted, so a record delivered twice counts twice (none expected).
//!
//! Run: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo bench --features queue --bench queue`
//! (needs `scripts/services up`: Kafka 4.2+ with share groups on).

mod drain_common;

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::queue::QueueConsumer;
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BytesCodec, Handler, HandlerError, Message, ProcessingOrder, RetryingConsumer, async_trait,
};

/// Handler calls: how many, and when the first and the latest happened.
#[derive(Default)]
struct Calls {
    count: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

impl Calls {
    fn record(&self) {
        let now = Instant::now();
        self.first.lock().unwrap().get_or_insert(now);
        *self.last.lock().unwrap() = Some(now);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Takes `work` (none, or a sleep), then counts the call.
struct Work {
    calls: Arc<Calls>,
    work: Duration,
}

#[async_trait]
impl Handler for Work {
    type Event = Option<Vec<u8>>;

    async fn handle(&self, _m: &Message<Option<Vec<u8>>>) -> Result<(), HandlerError> {
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        self.calls.record();
        Ok(())
    }
}

/// One drain's figures.
struct Drain {
    /// Records per second, first record handled to last.
    rate: f64,
    /// From the start to the first record handled (joining the group, fetching).
    first_after: Duration,
}

/// A scenario: the drain's shape.
struct Scenario {
    name: &'static str,
    partitions: i32,
    records: u64,
    work: Duration,
    max_in_flight: usize,
    queue_members: usize,
    /// The queue members' `fetch_size` (default: `max_in_flight`).
    fetch_size: Option<usize>,
}

fn run_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
            as u32
    )
}

/// Waits until `calls` reached `records`, then gives the drain's figures.
async fn drained(calls: &Calls, records: u64, started: Instant) -> Drain {
    while calls.count.load(Ordering::Relaxed) < records {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the drain did not finish within 300 s ({} of {records} records)",
            calls.count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = calls.first.lock().unwrap().expect("a first call");
    let last = calls.last.lock().unwrap().expect("a last call");
    let secs = last.duration_since(first).as_secs_f64().max(1e-6);
    Drain {
        // The first record's own time is not in the span: count the records after it.
        rate: (records.saturating_sub(1)).max(1) as f64 / secs,
        first_after: first.duration_since(started),
    }
}

/// The consumer-group engine drains `topic` with one member.
async fn group_drain(bootstrap: &str, topic: &str, s: &Scenario) -> Drain {
    let calls = Arc::new(Calls::default());
    let consumer = RetryingConsumer::builder(Work {
        calls: calls.clone(),
        work: s.work,
    })
    .codec(BytesCodec)
    .bootstrap_servers(bootstrap)
    .group_id(format!("bench-queue-cg-{}", run_id()))
    .topic(topic)
    .ordering(ProcessingOrder::Unordered)
    .max_in_flight(s.max_in_flight)
    .kafka_config("auto.offset.reset", "earliest")
    .build()
    .expect("build the group consumer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let drain = drained(&calls, s.records, started).await;
    let _ = stop.send(());
    let _ = task.await;
    drain
}

/// Queue mode drains `topic` with `s.queue_members` members of one share group.
async fn queue_drain(bootstrap: &str, topic: &str, s: &Scenario) -> Drain {
    let calls = Arc::new(Calls::default());
    let group = format!("bench-queue-sg-{}", run_id());
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let started = Instant::now();
    let mut members = Vec::new();
    for _ in 0..s.queue_members {
        let consumer = QueueConsumer::builder(Work {
            calls: calls.clone(),
            work: s.work,
        })
        .codec(BytesCodec)
        .bootstrap_servers(bootstrap)
        .group_id(group.as_str())
        .topic(topic)
        .max_in_flight(s.max_in_flight)
        .fetch_size(s.fetch_size.unwrap_or(s.max_in_flight))
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .expect("build the queue consumer");
        let mut stopped = stop.subscribe();
        members.push(tokio::spawn(consumer.run(async move {
            let _ = stopped.recv().await;
        })));
    }
    let drain = drained(&calls, s.records, started).await;
    let _ = stop.send(());
    for member in members {
        match member.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("a queue member failed: {e}"),
            Err(e) => panic!("a queue member panicked: {e}"),
        }
    }
    drain
}

async fn scenario(bootstrap: &str, s: &Scenario) -> (Drain, Drain) {
    let topic = format!("bench-queue-{}", run_id());
    TopicAdmin::new(bootstrap)
        .ensure(&[
            TopicSpec::new(topic.clone(), s.partitions),
            TopicSpec::dead_letter(&topic, s.partitions),
        ])
        .await
        .expect("topics");
    drain_common::produce(bootstrap, &topic, s.records, 1_000, |_| vec![b'x'; 100]).await;
    let group = group_drain(bootstrap, &topic, s).await;
    let queue = queue_drain(bootstrap, &topic, s).await;
    (group, queue)
}

#[tokio::main]
async fn main() {
    let Some((bootstrap, records)) = drain_common::sized("QUEUE_BENCH_RECORDS", 50_000, 200) else {
        return;
    };
    let scenarios = [
        Scenario {
            name: "no-op",
            partitions: 4,
            records,
            work: Duration::ZERO,
            max_in_flight: 64,
            queue_members: 1,
            fetch_size: None,
        },
        Scenario {
            name: "no-op f1k",
            partitions: 4,
            records,
            work: Duration::ZERO,
            max_in_flight: 64,
            queue_members: 1,
            fetch_size: Some(1_024),
        },
        Scenario {
            name: "10 ms",
            partitions: 4,
            records: (records / 10).max(10),
            work: Duration::from_millis(10),
            max_in_flight: 64,
            queue_members: 1,
            fetch_size: None,
        },
        Scenario {
            name: "scaling",
            partitions: 1,
            records: (records / 25).max(10),
            work: Duration::from_millis(10),
            max_in_flight: 8,
            queue_members: 4,
            fetch_size: None,
        },
    ];
    println!(
        "records × 100 B over 1,000 keys; rec/s from the first record handled to the last \
         (time to the first record apart); group: RetryingConsumer, Unordered, 1 member"
    );
    println!(
        "{:<9} {:>7} {:>10} {:>9} {:>13} {:>12} {:>12} {:>8}   first record after (group / queue)",
        "scenario",
        "records",
        "partitions",
        "in flight",
        "queue members",
        "group rec/s",
        "queue rec/s",
        "q÷g"
    );
    for s in &scenarios {
        let (group, queue) = scenario(&bootstrap, s).await;
        println!(
            "{:<9} {:>7} {:>10} {:>9} {:>13} {:>12.0} {:>12.0} {:>7.2}×   {:.1} s / {:.1} s",
            s.name,
            s.records,
            s.partitions,
            s.max_in_flight,
            s.queue_members,
            group.rate,
            queue.rate,
            queue.rate / group.rate,
            group.first_after.as_secs_f64(),
            queue.first_after.as_secs_f64(),
        );
    }
}
