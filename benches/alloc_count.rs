//! Heap allocations per record on the consumer's hot path, counted rather than timed: a
//! counting `#[global_allocator]` makes the figures deterministic (up to a few background
//! allocations of librdkafka's callbacks and the commit timer), unlike timings on a busy
//! machine.
//!
//! ```text
//! RUSTFLAGS="--cfg kourier_bench" cargo bench --bench alloc_count          # all parts
//! cargo bench --bench alloc_count                          # parts 1 and 3 (says so)
//! KAFKA_BOOTSTRAP_SERVERS=host:port cargo bench --bench alloc_count ...   # another broker
//! ```
//!
//! 1. `RawRecord::from_message`: a plain rdkafka consumer reads records like the throughput
//!    benchmark's (100-byte JSON value, a key, one `event-id` header, 6 partitions); only the
//!    conversion, on the polling thread, is counted.
//! 2. The scheduler: enqueue a 500-record poll batch over 6 partitions, start every job,
//!    settle each one (the job the scheduler hands back starts) — what the poll thread and the
//!    workers do under the hub's mutex (through the hidden `kourier::__bench` facade, built
//!    only with `--cfg kourier_bench`; without it this part says how to run it).
//! 3. The whole consume path: a `RetryingConsumer` with a no-op handler and a codec that
//!    allocates nothing drains a topic of 10,000 such records, then one of 20,000; every
//!    allocation of the process (poll thread, workers, librdkafka's callbacks into Rust) from
//!    `build()` to the end of the shutdown is counted, and the difference between the two runs
//!    divided by 10,000 (so start-up, assignment and shutdown cancel out).
//!
//! Parts 1 and 3 need a Kafka broker (`KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`);
//! without one they are skipped. Allocations are counted, frees are not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kourier::rdkafka::ClientConfig;
use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::message::{Header, OwnedHeaders};
use kourier::rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use kourier::{
    DecodeError, Handler, HandlerError, Message, MissingTopics, RawRecord, RetryingConsumer,
    async_trait, codec_fn,
};

/// Counts every allocation (and reallocation) of the process, and of the current thread.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

#[allow(unsafe_code)]
// SAFETY: every call is forwarded to the system allocator unchanged; counting allocates
// nothing (a relaxed atomic and a const-initialised thread-local without a destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn thread_allocations() -> u64 {
    THREAD_ALLOCATIONS.with(Cell::get)
}

fn process_allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const RECORDS: usize = 20_000;
const PARTITIONS: i32 = 6;
#[cfg(kourier_bench)]
const BATCH: usize = 500;

fn main() -> BoxResult<()> {
    println!("heap allocations per record (counted; lower is better)");
    scheduler_part();
    let servers =
        std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run = format!("kourier-alloc-count-{}", std::process::id());
    let (small, large) = (format!("{run}-small"), format!("{run}-large"));
    if let Err(e) = runtime.block_on(produce(&servers, &small, RECORDS / 2)) {
        println!("parts 1 and 3 skipped: no broker at {servers} ({e})");
        return Ok(());
    }
    runtime.block_on(produce(&servers, &large, RECORDS))?;
    conversion_part(&servers, &large)?;
    // The same run on twice the records: the difference leaves out what does not depend on
    // the record count (start-up, assignment, shutdown).
    let (few, many) = (
        runtime.block_on(consume_part(&servers, &small, RECORDS / 2))?,
        runtime.block_on(consume_part(&servers, &large, RECORDS))?,
    );
    println!(
        "  3. whole consume path, RetryingConsumer, no-op handler ({} − {} records): {:.2}",
        RECORDS,
        RECORDS / 2,
        (many as f64 - few as f64) / (RECORDS - RECORDS / 2) as f64
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()?;
    let topics = [&small, &large]
        .map(|t| [t.clone(), format!("{t}.dlt")])
        .concat();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = runtime.block_on(admin.delete_topics(&topics, &AdminOptions::new()));
    Ok(())
}

/// Part 2 without `--cfg kourier_bench`: how to run it.
#[cfg(not(kourier_bench))]
fn scheduler_part() {
    println!(
        "  2. scheduler: skipped, it needs kourier's crate-private parts: \
         RUSTFLAGS=\"--cfg kourier_bench\" cargo bench --bench alloc_count"
    );
}

/// Part 2: the scheduler, per ordering mode.
#[cfg(kourier_bench)]
fn scheduler_part() {
    use kourier::__bench::SchedulerHarness;
    use kourier::ProcessingOrder;
    for (name, ordering) in [
        ("partition", ProcessingOrder::Partition),
        ("key", ProcessingOrder::Key),
    ] {
        let mut s = SchedulerHarness::new(ordering, 64, 10_000, 64 << 20, 2_000);
        s.assign("alloc.v1", PARTITIONS);
        let (mut allocations, mut records) = (0, 0);
        for round in 0..20 {
            let batch: Vec<RawRecord> = (0..BATCH)
                .map(|i| {
                    let o = (round * BATCH + i) as i64;
                    RawRecord::builder("alloc.v1")
                        .partition((o % i64::from(PARTITIONS)) as i32)
                        .offset(o / i64::from(PARTITIONS))
                        .key(format!("key-{}", o % 1_000))
                        .value(vec![b'x'; 100])
                        .header("event-id", format!("run-{o}"))
                        .build()
                })
                .collect();
            let before = thread_allocations();
            for r in batch {
                s.enqueue(r);
            }
            s.start_ready();
            while s.settle_oldest() {}
            // The first rounds grow the scheduler's queues and maps to their working size.
            if round >= 10 {
                allocations += thread_allocations() - before;
                records += BATCH;
            }
        }
        println!(
            "  2. scheduler enqueue → job → finish ({name} order): {:.2}",
            allocations as f64 / records as f64
        );
    }
}

/// Pre-produces the throughput benchmark's records: `{"id":N,"pad":"xx…"}` (100 bytes), key
/// `key-{N % 1000}`, one `event-id` header.
async fn produce(servers: &str, topic: &str, records: usize) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("socket.timeout.ms", "3000")
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &options,
        )
        .await?
    {
        result.map_err(|(t, e)| format!("create {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "10000")
        .create()?;
    let mut pending = Vec::with_capacity(records);
    for id in 0..records {
        let mut value = format!("{{\"id\":{id},\"pad\":\"").into_bytes();
        value.resize(98, b'x');
        value.extend_from_slice(b"\"}");
        let key = format!("key-{}", id % 1_000);
        let event_id = format!("e-{id}");
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: "event-id",
            value: Some(event_id.as_bytes()),
        });
        let record = FutureRecord::to(topic)
            .partition((id % PARTITIONS as usize) as i32)
            .key(key.as_bytes())
            .payload(&value)
            .headers(headers);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| format!("send: {e}"))?,
        );
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| format!("delivery: {e}"))?;
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

/// Part 1: `RawRecord::from_message` on the polling thread.
fn conversion_part(servers: &str, topic: &str) -> BoxResult<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", format!("{topic}-raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let (mut allocations, mut records, mut polls) = (0u64, 0usize, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while records < RECORDS && Instant::now() < deadline {
        let before = thread_allocations();
        let polled = consumer.poll(Duration::from_millis(100));
        polls += thread_allocations() - before;
        let Some(message) = polled else {
            continue;
        };
        let message = message?;
        let before = thread_allocations();
        let record = RawRecord::from_message(&message);
        allocations += thread_allocations() - before;
        drop(record);
        records += 1;
    }
    println!(
        "  1. RawRecord::from_message ({records} records): {:.2}",
        allocations as f64 / records.max(1) as f64
    );
    println!(
        "     (rdkafka's own BaseConsumer::poll, for comparison: {:.2})",
        polls as f64 / records.max(1) as f64
    );
    Ok(())
}

/// The no-op handler of the throughput benchmark's scenario (b).
struct Noop(Arc<AtomicU64>);

#[async_trait]
impl Handler for Noop {
    type Event = ();

    async fn handle(&self, _message: &Message<()>) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Part 3: the whole consume path, from building the consumer until it has shut down after
/// handling `records`; returns the process's allocations meanwhile.
async fn consume_part(servers: &str, topic: &str, records: usize) -> BoxResult<u64> {
    let handled = Arc::new(AtomicU64::new(0));
    let before = process_allocations();
    let consumer = RetryingConsumer::builder(Noop(handled.clone()))
        .codec(codec_fn(|_: &RawRecord| Ok::<(), DecodeError>(())))
        .bootstrap_servers(servers)
        .group_id(format!("{topic}-kourier"))
        .topic(topic)
        .kafka_config("auto.offset.reset", "earliest")
        .missing_topics(MissingTopics::create(
            u16::try_from(PARTITIONS).expect("a small count"),
        ))
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled.load(Ordering::Relaxed) < records as u64 {
        if Instant::now() > deadline {
            return Err(format!("{topic}: not drained within 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stop.send(());
    let _report = task.await??;
    Ok(process_allocations() - before)
}
