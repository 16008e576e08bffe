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

mod drain_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    drain_common::produce(bootstrap, &topic, records, KEYS, |id| {
        id.to_string().into_bytes()
    })
    .await;

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
    let Some((bootstrap, records)) = drain_common::sized("TIERS_BENCH_RECORDS", 6_000, 120) else {
        return;
    };
    println!(
        "{records} records, {PARTITIONS} partitions, {KEYS} keys, 1 ms of work each; 5 % fail for {BLIP:?}"
    );
    for ordering in [ProcessingOrder::Partition, ProcessingOrder::Key] {
        for tiers in [false, true] {
            run(&bootstrap, records, tiers, ordering).await;
        }
    }
}
