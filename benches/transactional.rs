//! The cost of transactional output: one drain of `TXN_BENCH_RECORDS` records (default 50,000
//! with `--bench`) of 100 B over 1,000 keys, 6 partitions, `Key` order, `max_in_flight` 256,
//! commits every second, three ways:
//!
//! - **no output**: the handler does nothing (the drain's own cost);
//! - **at-least-once output**: the handler sends one output record per input with a plain
//!   idempotent producer and awaits its acknowledgement (what a handler does without
//!   transactions);
//! - **transactional output**: the handler stages one output record per input
//!   (`Message::send_output`); kourier produces it and commits the offsets in one
//!   transaction per commit interval.
//!
//! Figures per run: records per second from the consumer's start until every record was
//! handled and the consumer stopped cleanly (its final commit included), and transactional ÷
//! at-least-once. Run: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo bench --bench
//! transactional` (needs `scripts/services up`).

mod drain_common;

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kourier::rdkafka::ClientConfig;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::topics::{TopicAdmin, TopicSpec};
use kourier::transactional::{OutputRecord, TransactionalOutput};
use kourier::{BytesCodec, HandlerError, Message, ProcessingOrder, RetryingConsumer, handler_fn};

const PARTITIONS: i32 = 6;
const KEYS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoOutput,
    AtLeastOnce,
    Transactional,
}

/// Drains `records` in `mode`: records per second.
async fn run(bootstrap: &str, records: u64, mode: Mode) -> f64 {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
            as u32
    );
    let topic = format!("bench-txn-{run_id}");
    let out = format!("bench-txn-out-{run_id}");
    TopicAdmin::new(bootstrap)
        .ensure(&[
            TopicSpec::new(topic.clone(), PARTITIONS),
            TopicSpec::dead_letter(&topic, PARTITIONS),
            TopicSpec::new(out.clone(), PARTITIONS),
        ])
        .await
        .expect("topics");
    drain_common::produce(bootstrap, &topic, records, KEYS, |_| vec![b'x'; 100]).await;
    let handled = Arc::new(AtomicU64::new(0));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let handler = {
        let (handled, out) = (handled.clone(), out.clone());
        handler_fn(move |m: Message<Option<Vec<u8>>>| {
            let (handled, out, producer) = (handled.clone(), out.clone(), producer.clone());
            async move {
                let value = m.event().clone().unwrap_or_default();
                match mode {
                    Mode::NoOutput => {}
                    Mode::AtLeastOnce => {
                        let record = FutureRecord::to(&out)
                            .key(m.key().unwrap_or_default())
                            .payload(&value);
                        producer
                            .send(record, Duration::from_secs(30))
                            .await
                            .map_err(|(e, _)| HandlerError::transient(e.to_string()))?;
                    }
                    Mode::Transactional => {
                        let mut output = OutputRecord::new(&out).value(value);
                        if let Some(key) = m.key() {
                            output = output.key(key);
                        }
                        m.send_output(output)?;
                    }
                }
                handled.fetch_add(1, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let mut builder = RetryingConsumer::builder(handler)
        .codec(BytesCodec)
        .bootstrap_servers(bootstrap)
        .group_id(format!("bench-txn-g-{run_id}"))
        .topic(topic.as_str())
        .ordering(ProcessingOrder::Key)
        .max_in_flight(256)
        .kafka_config("auto.offset.reset", "earliest");
    if mode == Mode::Transactional {
        builder = builder.transactional(TransactionalOutput::new(format!("bench-txn-{run_id}")));
    }
    let consumer = builder.build().expect("build");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    while handled.load(Ordering::Relaxed) < records {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the drain did not finish within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    task.await
        .expect("consumer task")
        .expect("clean stop")
        .into_result()
        .expect("nothing abandoned");
    records as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let Some((bootstrap, records)) = drain_common::sized("TXN_BENCH_RECORDS", 50_000, 200) else {
        return;
    };
    println!(
        "{records} records × 100 B, {PARTITIONS} partitions, {KEYS} keys, Key order, \
         max_in_flight 256, commit interval 1 s; one output record per input"
    );
    let none = run(&bootstrap, records, Mode::NoOutput).await;
    println!("no output:             {none:>8.0} rec/s");
    let plain = run(&bootstrap, records, Mode::AtLeastOnce).await;
    println!("at-least-once output:  {plain:>8.0} rec/s");
    let txn = run(&bootstrap, records, Mode::Transactional).await;
    println!("transactional output:  {txn:>8.0} rec/s");
    println!("transactional ÷ at-least-once: {:.2}×", txn / plain);
}
