//! Criterion micro-benchmarks of kourier's per-record hot paths; no services needed.
//!
//! ```text
//! RUSTFLAGS="--cfg kourier_bench" cargo bench --bench micro                  # every group
//! RUSTFLAGS="--cfg kourier_bench" cargo bench --bench micro -- --quick       # fewer samples
//! RUSTFLAGS="--cfg kourier_bench" cargo bench --bench micro -- scheduler     # one group
//! cargo bench --bench micro                         # the public parts only (says so)
//! ```
//!
//! `RUSTFLAGS` rebuilds the dependencies with the flag; `CARGO_TARGET_DIR=target/kourier_bench`
//! keeps that build apart from the usual one.
//!
//! Reachable through the public API: the JSON codec (every record is decoded before its
//! handler runs), header lookups (dedup keys) and the in-memory idempotency store's
//! claim → complete.
//!
//! The offset tracker, the scheduler and a worker's record path are crate-private; their
//! benchmarks go through a hidden facade, `kourier::__bench` (`#[doc(hidden)]`, no semver
//! promise; src/consumer/bench_support.rs), which exists only when kourier is built with
//! `--cfg kourier_bench` (not a Cargo feature, so that no dependent can turn it on):
//!
//! ```text
//! kourier::__bench::OffsetTracker::{new, received(i64) -> bool, settled(i64) -> bool,
//!                                   committable() -> Option<i64>}
//! kourier::__bench::SchedulerHarness::{new(ProcessingOrder, max_in_flight, max_buffered_records,
//!     max_buffered_bytes, max_buffered_records_per_partition), assign(topic, partitions),
//!     enqueue(RawRecord) -> bool, start_ready() -> usize, settle_oldest() -> bool,
//!     flow_control() -> (paused, resumed), committable_partitions() -> usize,
//!     running() -> usize}
//! kourier::__bench::WorkerHarness::{new(handler, topic), run(Arc<RawRecord>) -> bool (async)}
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use kourier::{Claim, Codec, IdempotencyStore, InMemoryIdempotencyStore, JsonCodec, RawRecord};
use serde::Deserialize;

/// The throughput benchmark's event: one field read, the padding skipped.
#[derive(Debug, Deserialize)]
struct BenchEvent {
    id: u64,
}

fn record(partition: i32, offset: i64, key: Option<String>, size: usize) -> RawRecord {
    let mut value = format!("{{\"id\":{offset},\"pad\":\"").into_bytes();
    value.resize(size.saturating_sub(2).max(value.len()), b'x');
    value.extend_from_slice(b"\"}");
    let mut record = RawRecord::builder("bench.v1")
        .partition(partition)
        .offset(offset)
        .value(value)
        .header("event-id", format!("run-{offset}"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .timestamp(1_700_000_000_000)
        .build();
    record.key = key.map(Into::into);
    record
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let json = JsonCodec::<BenchEvent>::new();
    for size in [100, 1024] {
        let r = record(0, 42, None, size);
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("json_decode_{size}B"), |b| {
            b.iter(|| black_box(json.decode(black_box(&r)).map(|e| e.id)))
        });
    }
    group.finish();
}

fn headers(c: &mut Criterion) {
    let r = record(0, 42, None, 100);
    c.bench_function("headers/get_str_dedup_key", |b| {
        b.iter(|| black_box(black_box(&r.headers).get_str("event-id")))
    });
}

fn memory_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = InMemoryIdempotencyStore::new();
    let lease = Duration::from_secs(60);
    let ttl = Duration::from_secs(3600);
    let mut n = 0u64;
    c.bench_function("idempotency/memory_claim_complete", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let key = format!("group:event-{n}");
            let store = &store;
            async move {
                match store.claim(&key, lease).await {
                    Ok(Claim::Acquired(token)) => store.complete(&key, &token, ttl).await.ok(),
                    other => panic!("fresh key not acquired: {other:?}"),
                }
            }
        })
    });
}

#[cfg(kourier_bench)]
mod internals {
    use super::*;
    use criterion::BatchSize;
    use kourier::__bench::{OffsetTracker, SchedulerHarness};
    use kourier::ProcessingOrder;

    /// One poll batch's worth of records.
    const BATCH: i64 = 500;

    pub(super) fn offset_tracker(c: &mut Criterion) {
        let mut group = c.benchmark_group("offset_tracker");
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("in_order_500", |b| {
            b.iter_batched_ref(
                OffsetTracker::new,
                |t| {
                    for o in 0..BATCH {
                        t.received(o);
                    }
                    for o in 0..BATCH {
                        t.settled(o);
                    }
                    black_box(t.committable())
                },
                BatchSize::SmallInput,
            )
        });
        // Key mode: records settle out of order; the watermark waits for the oldest.
        group.bench_function("reverse_order_500", |b| {
            b.iter_batched_ref(
                OffsetTracker::new,
                |t| {
                    for o in 0..BATCH {
                        t.received(o);
                    }
                    for o in (0..BATCH).rev() {
                        t.settled(o);
                    }
                    black_box(t.committable())
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }

    /// Enqueue one 500-record poll batch over 6 partitions, then run it to the end: every job
    /// started and settled, as the poll thread and the workers do under the mutex.
    pub(super) fn scheduler(c: &mut Criterion) {
        let mut group = c.benchmark_group("scheduler");
        group.throughput(Throughput::Elements(BATCH as u64));
        for (name, ordering, keys) in [
            ("partition", ProcessingOrder::Partition, 10_000),
            ("key_1000_keys", ProcessingOrder::Key, 1_000),
            ("unordered", ProcessingOrder::Unordered, 10_000),
        ] {
            let records: Vec<RawRecord> = (0..BATCH)
                .map(|o| {
                    record(
                        (o % 6) as i32,
                        o / 6,
                        Some(format!("key-{}", o % keys)),
                        100,
                    )
                })
                .collect();
            group.bench_function(format!("batch_500_{name}"), |b| {
                b.iter_batched(
                    || {
                        let mut s = SchedulerHarness::new(ordering, 64, 10_000, 64 << 20, 2_000);
                        s.assign("bench.v1", 6);
                        (s, records.clone())
                    },
                    |(mut s, batch)| {
                        for r in batch {
                            s.enqueue(r);
                        }
                        s.start_ready();
                        while s.settle_oldest() {}
                        black_box(s.committable_partitions())
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        group.bench_function("flow_control_6_partitions", |b| {
            let mut s =
                SchedulerHarness::new(ProcessingOrder::Partition, 64, 10_000, 64 << 20, 2_000);
            s.assign("bench.v1", 6);
            for o in 0..BATCH {
                s.enqueue(record((o % 6) as i32, o / 6, None, 100));
            }
            b.iter(|| black_box(s.flow_control()))
        });
        group.finish();
    }

    /// A handler that does nothing (the throughput benchmark's (b)).
    struct Noop;

    #[async_trait::async_trait]
    impl kourier::Handler for Noop {
        type Event = BenchEvent;

        async fn handle(
            &self,
            message: &kourier::Message<BenchEvent>,
        ) -> Result<(), kourier::HandlerError> {
            black_box(message.event().id);
            Ok(())
        }
    }

    /// One worker's path for 500 records of 100 B whose handler does nothing: decode,
    /// breaker, attempt, settle and report, on one thread (the worker's share of (b)'s cost
    /// per record, without the poll thread, the scheduler or the hand-off).
    pub(super) fn worker(c: &mut Criterion) {
        use std::sync::Arc;
        let mut group = c.benchmark_group("worker");
        group.throughput(Throughput::Elements(BATCH as u64));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let worker = kourier::__bench::WorkerHarness::new(Noop, "bench.v1");
        // One topic name shared by the records, as records read from Kafka share it.
        let topic: Arc<str> = Arc::from("bench.v1");
        let records: Vec<Arc<RawRecord>> = (0..BATCH)
            .map(|o| {
                let mut r = record(0, o, Some(format!("key-{o}")), 100);
                r.topic = Arc::clone(&topic);
                Arc::new(r)
            })
            .collect();
        group.bench_function("run_500_noop", |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut settled = 0;
                    for r in &records {
                        settled += usize::from(worker.run(Arc::clone(r)).await);
                    }
                    assert_eq!(settled, records.len(), "every record settles");
                })
            })
        });
        group.finish();
    }
}

criterion_group!(public, codec, headers, memory_store);

#[cfg(kourier_bench)]
criterion_group!(
    crate_private,
    internals::offset_tracker,
    internals::scheduler,
    internals::worker
);

#[cfg(kourier_bench)]
criterion::criterion_main!(public, crate_private);

/// Without `--cfg kourier_bench`: the public groups, and how to run the others.
#[cfg(not(kourier_bench))]
fn main() {
    eprintln!(
        "micro: the offset tracker and scheduler benchmarks need kourier's crate-private parts: \
         RUSTFLAGS=\"--cfg kourier_bench\" cargo bench --bench micro \
         (running the public groups only)"
    );
    public();
    Criterion::default().configure_from_args().final_summary();
}
