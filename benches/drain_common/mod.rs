//! What the drain benchmarks (`benches/tiers.rs`, `benches/batch.rs`) share: how a run is
//! sized (a smoke run under `cargo test`, a measured one with `--bench`) and how their topic
//! is filled.

use std::time::Duration;

use kourier::rdkafka::ClientConfig;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// The broker (`KAFKA_BOOTSTRAP_SERVERS`, default loopback) and the record count: `None` when
/// a test-name filter was given (`cargo test --all-targets` runs this binary too: then it is
/// skipped). Without `--bench` it is a smoke run of `smoke` records (figures meaningless), so
/// the test suite stays fast; with it, `env` (a variable name) or `bench` records.
pub(crate) fn sized(env: &str, bench: u64, smoke: u64) -> Option<(String, u64)> {
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let measured = args.iter().any(|a| a == "--bench");
    if !measured && args.iter().any(|a| !a.starts_with('-')) {
        return None;
    }
    let records: u64 = std::env::var(env)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measured { bench } else { smoke });
    if !measured {
        println!("smoke run (cargo test): figures are meaningless");
    }
    Some((bootstrap, records))
}

/// Produces `records` records to `topic`: record `id` has key `k-<id % keys>` and the value
/// `value(id)`; waits for every acknowledgement.
pub(crate) async fn produce(
    bootstrap: &str,
    topic: &str,
    records: u64,
    keys: u64,
    value: impl Fn(u64) -> Vec<u8>,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for id in 0..records {
        let key = format!("k-{}", id % keys);
        let payload = value(id);
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
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
