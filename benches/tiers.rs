//! Retry tiers vs in-place retries: a drain of a topic where 5 % of the records hit a
//! transient failure that lasts `BLIP` (a downstream that rate-limits them for a while).
//!
//! - **in-place**: `RetryPolicy::fixed(500 ms, 8)` — the failing record's lane (its
//!   partition in `Partition` mode, its key in `Key` mode) waits through its back-offs.
//! - **tiers**: no in-place retry, `RetryTiers::new([1 s, 2 s, 4 s])` — the failing record is
//!   forwarded and its lane moves on at once.
//!
//! Figures per run: the drain rate of the records that never fail (records/s, from the
//! consumer's start to the last of them handled) and the completion time of the failing ones
//! (from the consumer's start to their success: p50 and max).
//!
//! Run: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo bench --bench tiers` (needs
//! `scripts/services up`). `TIERS_BENCH_RECORDS` sets the record count (default 6 000).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::rdkafka::ClientConfig;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use kourier::tiers::RetryTiers;
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::{
    BytesCodec, HandlerError, Message, ProcessingOrder, RetryPolicy, RetryingConsumer, handler_fn,
};

const PARTITIONS: i32 = 6;
const KEYS: u64 = 500;
/// How long a failing record keeps failing after its first attempt.
const BLIP: Duration = Duration::from_secs(1);

fn failing(id: u64) -> bool {
    id % 20 == 7
}

#[derive(Default)]
struct Seen {
    first_attempt: HashMap<u64, Instant>,
    ok_done: u64,
    ok_last: Option<Instant>,
    failing_done: Vec<Duration>,
}

async fn produce(bootstrap: &str, topic: &str, records: u64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for id in 0..records {
        let key = format!("k-{}", id % KEYS);
        let value = id.to_string();
        let record = FutureRecord::to(topic).key(&key).payload(&value);
        pending.push(producer.send_result(record).expect("enqueue"));
        if pending.len() >= 5_000 {
            for p in pending.drain(..) {
                p.await.expect("delivery").expect("acked");
            }
        }
    }
    for p in pending {
        p.await.expect("delivery").expect("acked");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
}

async fn run(bootstrap: &str, records: u64, tiers: bool, ordering: ProcessingOrder) {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
    );
    let topic = format!("bench-tiers-{run_id}");
    let admin = TopicAdmin::new(bootstrap);
    let mut specs = vec![
        TopicSpec::new(topic.clone(), PARTITIONS),
        TopicSpec::dead_letter(&topic, PARTITIONS),
    ];
    for n in 1..=3 {
        specs.push(TopicSpec::new(format!("{topic}.retry.{n}"), PARTITIONS));
    }
    admin.ensure(&specs).await.expect("topics");
    produce(bootstrap, &topic, records).await;

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let failing_total = (0..records).filter(|&id| failing(id)).count();
    let ok_total = records - failing_total as u64;
    let started = Instant::now();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |m: Message<Option<Vec<u8>>>| {
            let seen = seen.clone();
            async move {
                let bytes = m.event().as_deref().unwrap_or_default();
                let id: u64 = std::str::from_utf8(bytes).unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await; // the work
                let now = Instant::now();
                let mut s = seen.lock().unwrap();
                if failing(id) {
                    let first = *s.first_attempt.entry(id).or_insert(now);
                    if now.duration_since(first) < BLIP {
                        return Err(HandlerError::transient("rate-limited"));
                    }
                    s.failing_done.push(now.duration_since(started));
                } else {
                    s.ok_done += 1;
                    s.ok_last = Some(now);
                }
                Ok(())
            }
        })
    };
    let mut builder = RetryingConsumer::builder(handler)
        .codec(BytesCodec)
        .bootstrap_servers(bootstrap)
        .group_id(format!("bench-tiers-g-{run_id}"))
        .topic(topic.as_str())
        .ordering(ordering)
        .kafka_config("auto.offset.reset", "earliest");
    builder = if tiers {
        builder
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4),
            ]))
    } else {
        builder.retry_policy(RetryPolicy::fixed(Duration::from_millis(500), 8))
    };
    let consumer = builder.build().expect("build");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    loop {
        {
            let s = seen.lock().unwrap();
            if s.ok_done >= ok_total && s.failing_done.len() >= failing_total {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("the drain did not finish within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let _ = task.await;
    let s = seen.lock().unwrap();
    let ok_secs = s.ok_last.unwrap().duration_since(started).as_secs_f64();
    let mut done = s.failing_done.clone();
    done.sort();
    println!(
        "{:<9} {:<9} | never-failing: {:>6} in {:>6.2} s = {:>7.0} rec/s | failing: {:>4}, done at p50 {:>5.2} s, max {:>5.2} s",
        if tiers { "tiers" } else { "in-place" },
        format!("{ordering:?}"),
        ok_total,
        ok_secs,
        ok_total as f64 / ok_secs,
        failing_total,
        done[done.len() / 2].as_secs_f64(),
        done.last().unwrap().as_secs_f64(),
    );
}

fn rand_u32() -> u32 {
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

use std::hash::BuildHasher as _;

#[tokio::main]
async fn main() {
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    // `cargo test --all-targets` runs this binary too, without `--bench`: then a smoke run
    // (figures meaningless), so the test suite stays fast; a test-name filter skips it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    if !bench && args.iter().any(|a| !a.starts_with('-')) {
        return;
    }
    let records: u64 = std::env::var("TIERS_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 6_000 } else { 120 });
    if !bench {
        println!("smoke run (cargo test): figures are meaningless");
    }
    println!(
        "{records} records, {PARTITIONS} partitions, {KEYS} keys, 1 ms of work each; 5 % fail for {BLIP:?}"
    );
    for ordering in [ProcessingOrder::Partition, ProcessingOrder::Key] {
        for tiers in [false, true] {
            run(&bootstrap, records, tiers, ordering).await;
        }
    }
}
