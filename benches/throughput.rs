//! Throughput, CPU, memory and end-to-end latency of kourier against a raw rdkafka baseline,
//! on the real broker (and Redis for the idempotency scenario).
//!
//! ```text
//! cargo bench --bench throughput                  # full run: 1,000,000 records × 100 B
//! cargo bench --bench throughput -- --quick       # reduced run (CI smoke check), ~30 s
//! cargo bench --bench throughput -- --size 1024 --scenarios a,b
//! cargo bench --bench throughput -- --help
//! ```
//!
//! Needs Kafka and Redis (`scripts/services up`, or `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL`).
//! `cargo test --all-targets` runs this binary as well (debug build, no `--bench` argument):
//! then it makes a tiny `--smoke` run (~10 s), or none when a test-name filter is given.
//!
//! One run pre-produces the records to fresh topics (all of them are in the log before any
//! consumer starts, so the producer cannot be the bottleneck), then runs each scenario in its
//! own child process (this binary re-executed with `--scenario`), so that peak RSS (`VmHWM`) and
//! CPU time are per scenario. Each scenario uses its own consumer group; topics are unique per
//! run and deleted at the end (`--keep-topics` keeps them).
//!
//! Drain scenarios read the same topic (6 partitions) with the same consumer settings
//! (kourier's: `auto.offset.reset=earliest`, `enable.partition.eof=false`,
//! `queued.max.messages.kbytes=16384`, `fetch.queue.backoff.ms=20`, `enable.auto.commit=false`, offsets committed every 1 s
//! and at the end):
//!
//! - (a) a raw rdkafka `BaseConsumer` loop that only counts and tracks offsets;
//! - (b) kourier, no-op handler, `Ordering::Partition`;
//! - (c) (b) plus the Redis idempotency store (every record has a unique `event-id` header);
//! - (d) (b) with 1 % permanent failures, dead-lettered to `<topic>.dlt`.
//!
//! A drain's time runs from the first record handed to user code (raw: returned by `poll`;
//! kourier: handler entry) until every record is settled (raw: counted; kourier: handled,
//! dead letters acknowledged, nothing in flight or buffered), so group joins are excluded. Its
//! CPU time is the whole process's user+sys (librdkafka's threads included) from consumer
//! creation to that moment, read from `/proc/self/stat`. Afterwards the group's committed
//! offsets are checked to cover every record: a run that loses records is an error.
//!
//! kourier decodes each value as JSON (its default codec) into a one-field struct; that cost
//! is part of its overhead. The raw loop does not look at the payload.
//!
//! The slow-handler scenarios await a 10 ms tokio sleep per record on one partition with 1,000
//! keys: `Ordering::Partition` (only 1,000 records: 20,000 would take ~200 s) against
//! `Ordering::Key` with `max_in_flight(500)` (20,000 records); their rates are compared.
//!
//! The latency scenarios send at a fixed rate (5,000 records/s for 20 s after a 5 s warm-up
//! that is not recorded) from a producer thread in the same process, each record stamped with
//! its send time (µs since the epoch, header `sent-at-us`); the consumer (raw, or kourier with
//! a no-op handler) records `now − sent` at handler entry in an HDR histogram. The producer's
//! own send → acknowledgement time is reported beside it: it is the broker's share.
//!
//! One table goes to stdout with every figure, its ratio to (a) and the issue's targets marked
//! PASS/MISS; they are informational: the exit code is non-zero only when the benchmark itself
//! broke (a service missing, a scenario failing or losing records).

use std::fmt::Write as _;
use std::io::Read as _;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::rdkafka::message::{DeliveryResult, Header, Headers as _, Message as _, OwnedHeaders};
use kourier::rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};
use kourier::rdkafka::{ClientContext, Offset, TopicPartitionList};
use kourier::{
    DedupKey, Handler, HandlerError, Message, Ordering, RedisIdempotencyStore, RetryingConsumer,
    async_trait,
};
use serde::{Deserialize, Serialize};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Partitions of the drain and latency topics.
const PARTITIONS: i32 = 6;
/// Distinct keys of the slow-handler topic (one partition).
const SLOW_KEYS: u64 = 1_000;
/// What the slow handler awaits per record.
const SLOW_HANDLER: Duration = Duration::from_millis(10);
/// `max_in_flight` of the slow-handler Key scenario.
const SLOW_KEY_MAX_IN_FLIGHT: usize = 500;
/// Every `FAIL_EVERY`-th record fails permanently in scenario (d): 1 %.
const FAIL_EVERY: u64 = 100;
/// Unique per record: the dedup key of scenario (c).
const EVENT_ID_HEADER: &str = "event-id";
/// The scheduled send time in µs since the epoch (latency scenarios).
const SENT_AT_HEADER: &str = "sent-at-us";
/// `linger.ms` of the latency producer.
const LATENCY_LINGER_MS: u64 = 5;
/// kourier's librdkafka pre-fetch cap (`queued.max.messages.kbytes`, set by its builder).
const QUEUED_MAX_KBYTES: u64 = 16_384;
/// kourier's buffer defaults (builder.rs): records and bytes received but not started.
const MAX_BUFFERED_RECORDS: u64 = 10_000;
const MAX_BUFFERED_BYTES: u64 = 64 << 20;
/// What peak RSS may use beyond the configured buffers: the Tokio runtime, librdkafka's fetch
/// buffers beyond its queue cap, the dead-letter producer, allocator slack, code. Stated before
/// measuring; the raw baseline's own RSS shows how much of it any rdkafka consumer needs.
const RSS_CONSTANT_MIB: f64 = 64.0;
/// librdkafka's `/proc/<pid>/stat` ticks: USER_HZ, 100 on every mainstream Linux ABI.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;
/// A scenario that takes longer than this is broken.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Raw,
    Kourier,
    Redis,
    DeadLetter,
    SlowPartition,
    SlowKey,
    LatencyRaw,
    Latency,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::Raw,
        Scenario::Kourier,
        Scenario::Redis,
        Scenario::DeadLetter,
        Scenario::SlowPartition,
        Scenario::SlowKey,
        Scenario::LatencyRaw,
        Scenario::Latency,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Raw => "a",
            Scenario::Kourier => "b",
            Scenario::Redis => "c",
            Scenario::DeadLetter => "d",
            Scenario::SlowPartition => "slow-partition",
            Scenario::SlowKey => "slow-key",
            Scenario::LatencyRaw => "latency-raw",
            Scenario::Latency => "latency",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scenario::Raw => "(a) raw rdkafka BaseConsumer",
            Scenario::Kourier => "(b) kourier, no-op, Partition",
            Scenario::Redis => "(c) kourier + Redis idempotency",
            Scenario::DeadLetter => "(d) kourier, 1% permanent → DLT",
            Scenario::SlowPartition => "Partition (1 in flight/partition)",
            Scenario::SlowKey => "Key (max in flight 500)",
            Scenario::LatencyRaw => "raw rdkafka BaseConsumer",
            Scenario::Latency => "kourier, no-op, Partition",
        }
    }

    fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    fn is_drain(self) -> bool {
        matches!(
            self,
            Scenario::Raw | Scenario::Kourier | Scenario::Redis | Scenario::DeadLetter
        )
    }

    fn is_slow(self) -> bool {
        matches!(self, Scenario::SlowPartition | Scenario::SlowKey)
    }

    fn is_latency(self) -> bool {
        matches!(self, Scenario::LatencyRaw | Scenario::Latency)
    }
}

const USAGE: &str = "\
usage: throughput [--quick|--smoke] [--records N] [--size BYTES] [--scenarios LIST]
                  [--compression none|lz4|...] [--latency-rate N] [--latency-secs S]
                  [--slow-records N] [--slow-partition-records N] [--keep-topics]
                  [--consumer-config KEY=VALUE]... [--buffer-records N] [--partition-buffer N]
                  [--ordering partition|key|unordered] [--max-in-flight N] [--timeline]

  --records N          records of the drain scenarios a-d (default 1000000; --quick 50000)
  --size BYTES         value size (default 100)
  --scenarios LIST     comma-separated, from: a,b,c,d,slow-partition,slow-key,latency-raw,latency
                       (default: all)
  --quick              a reduced run (CI smoke check): 50,000 records, 3 s latency phase, slow
                       handler on 5,000 (Key) and 100 (Partition) records
  --smoke              a tiny run (what `cargo test --all-targets` does with this binary):
                       2,000 records, 1 s latency phase at 1,000/s; figures are meaningless
  --compression C      producer compression.codec for pre-production (default none)
  --latency-rate N     offered rate of the latency scenarios, records/s (default 5000)
  --latency-secs S     measured seconds of the latency scenarios (default 20; --quick 3)
  --slow-records N     records of the slow-handler Key scenario (default 20000)
  --slow-partition-records N
                       records of the slow-handler Partition scenario (default 1000)
  --keep-topics        do not delete this run's topics at the end
  --consumer-config KEY=VALUE
                       a librdkafka consumer property for every consumer, raw and kourier
                       (repeatable), e.g. fetch.wait.max.ms=10
  --buffer-records N   kourier's max_buffered_records (default: kourier's, 10000)
  --partition-buffer N kourier's max_buffered_records_per_partition (default: kourier's, 2000)
  --ordering O         kourier's ordering in scenarios b, c, d and latency (default partition;
                       the slow-handler scenarios always compare Partition with Key)
  --max-in-flight N    kourier's max_in_flight in scenarios b, c, d and latency (default 64)
  --timeline           print each latency scenario's mean and max latency per second (stderr)";

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    smoke: bool,
    records: u64,
    size: usize,
    scenarios: Vec<Scenario>,
    compression: String,
    latency_rate: u64,
    latency_secs: u64,
    slow_records: u64,
    slow_partition_records: u64,
    keep_topics: bool,
    timeline: bool,
    consumer_config: Vec<(String, String)>,
    buffer_records: Option<u64>,
    partition_buffer: Option<u64>,
    ordering: Option<String>,
    max_in_flight: Option<u64>,
    child: Option<ChildArgs>,
}

/// What a child process runs: one scenario on an existing topic.
#[derive(Debug, Clone)]
struct ChildArgs {
    scenario: Scenario,
    topic: String,
    /// Records in the topic (the scenario may stop earlier: see `records`).
    topic_records: u64,
    run_id: String,
}

fn parse_args() -> Result<Args, String> {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`. `cargo test --all-targets` runs this binary too (a debug
    // build, no `--bench`, perhaps libtest flags or a test-name filter): then it makes only a
    // smoke run, or none when a filter is given, so the test suite stays fast.
    let under_bench = raw.iter().any(|a| a == "--bench");
    let is_child = raw.iter().any(|a| a == "--scenario");
    if !under_bench && !is_child {
        if let Some(filter) = raw.iter().find(|a| !a.starts_with('-')) {
            // Like libtest with a filter that matches nothing: run nothing, succeed.
            println!(
                "throughput: not run (test filter {filter:?}); run it with `cargo bench --bench throughput`"
            );
            std::process::exit(0);
        }
        raw = vec!["--smoke".into()];
    }
    raw.retain(|a| a != "--bench");
    let smoke = raw.iter().any(|a| a == "--smoke");
    let quick = smoke || raw.iter().any(|a| a == "--quick");
    let pick = |smoke_value: u64, quick_value: u64, full: u64| {
        if smoke {
            smoke_value
        } else if quick {
            quick_value
        } else {
            full
        }
    };
    let mut args = Args {
        quick,
        smoke,
        records: pick(2_000, 50_000, 1_000_000),
        size: 100,
        scenarios: Scenario::ALL.to_vec(),
        compression: "none".into(),
        latency_rate: pick(1_000, 5_000, 5_000),
        latency_secs: pick(1, 3, 20),
        slow_records: pick(500, 5_000, 20_000),
        slow_partition_records: pick(20, 100, 1_000),
        keep_topics: false,
        timeline: false,
        consumer_config: Vec::new(),
        buffer_records: None,
        partition_buffer: None,
        ordering: None,
        max_in_flight: None,
        child: None,
    };
    let (mut scenario, mut topic, mut topic_records, mut run_id) = (None, None, None, None);
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| -> Result<u64, String> {
            v.replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--quick" | "--smoke" => {}
            "--keep-topics" => args.keep_topics = true,
            "--timeline" => args.timeline = true,
            "--consumer-config" => {
                let v = value(&flag)?;
                let (k, v) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--consumer-config: {v:?} is not KEY=VALUE"))?;
                args.consumer_config.push((k.to_owned(), v.to_owned()));
            }
            "--ordering" => {
                let v = value(&flag)?;
                if !matches!(v.as_str(), "partition" | "key" | "unordered") {
                    return Err(format!(
                        "--ordering: {v:?} is not partition, key or unordered"
                    ));
                }
                args.ordering = Some(v);
            }
            "--max-in-flight" => args.max_in_flight = Some(number(&flag, value(&flag)?)?),
            "--buffer-records" => args.buffer_records = Some(number(&flag, value(&flag)?)?),
            "--partition-buffer" => args.partition_buffer = Some(number(&flag, value(&flag)?)?),
            "--records" => args.records = number(&flag, value(&flag)?)?,
            "--size" => args.size = number(&flag, value(&flag)?)? as usize,
            "--compression" => args.compression = value(&flag)?,
            "--latency-rate" => args.latency_rate = number(&flag, value(&flag)?)?,
            "--latency-secs" => args.latency_secs = number(&flag, value(&flag)?)?,
            "--slow-records" => args.slow_records = number(&flag, value(&flag)?)?,
            "--slow-partition-records" => {
                args.slow_partition_records = number(&flag, value(&flag)?)?;
            }
            "--scenarios" => {
                args.scenarios = value(&flag)?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Scenario::parse(s).ok_or_else(|| format!("unknown scenario {s:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--scenario" => {
                let v = value(&flag)?;
                scenario =
                    Some(Scenario::parse(&v).ok_or_else(|| format!("unknown scenario {v:?}"))?);
            }
            "--topic" => topic = Some(value(&flag)?),
            "--topic-records" => topic_records = Some(number(&flag, value(&flag)?)?),
            "--run-id" => run_id = Some(value(&flag)?),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.records == 0 || args.slow_records == 0 || args.slow_partition_records == 0 {
        return Err("record counts must be at least 1".into());
    }
    if args.latency_rate == 0 || args.latency_secs == 0 {
        return Err("--latency-rate and --latency-secs must be at least 1".into());
    }
    if args.scenarios.is_empty() {
        return Err("--scenarios: nothing to run".into());
    }
    if let Some(scenario) = scenario {
        args.child = Some(ChildArgs {
            scenario,
            topic: topic.ok_or("--scenario needs --topic")?,
            topic_records: topic_records.ok_or("--scenario needs --topic-records")?,
            run_id: run_id.ok_or("--scenario needs --run-id")?,
        });
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match &args.child {
        Some(child) => run_child(&args, child).map(|outcome| {
            println!(
                "RESULT {}",
                serde_json::to_string(&outcome).expect("outcome serializes")
            );
        }),
        None => run_parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Services, topics, producing

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}

fn require_kafka() -> BoxResult<()> {
    let consumer: BaseConsumer = client_config().create()?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| {
            format!(
                "Kafka is not reachable at {} ({e}); start it with `scripts/services up`",
                bootstrap()
            )
        })?;
    if metadata.brokers().is_empty() {
        return Err("Kafka answered with no brokers".into());
    }
    Ok(())
}

async fn require_redis() -> BoxResult<()> {
    let url = redis_url();
    let ping = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "Redis is not reachable at {url} ({e}); start it with `scripts/services up`"
        )
        .into()),
        Err(_) => Err(format!("Redis at {url} did not answer PING within 10 s").into()),
    }
}

async fn create_topics(topics: &[(String, i32)]) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config().create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("create topic {topic}: {code}").into()),
        }
    }
    let consumer: BaseConsumer = client_config().create()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, partitions) in topics {
        loop {
            let ready = consumer
                .fetch_metadata(Some(name), Duration::from_secs(10))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name && t.error().is_none())
                        .map(|t| t.partitions().iter().filter(|p| p.leader() >= 0).count())
                });
            if ready == Some(*partitions as usize) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("topic {name} has no leaders after 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

async fn delete_topics(topics: &[String]) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config().create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&names, &options).await? {
        if let Err((topic, code)) = result {
            eprintln!("warning: delete topic {topic}: {code}");
        }
    }
    Ok(())
}

/// Sum of the high watermarks of `topic`'s partitions.
fn log_end(topic: &str, partitions: i32) -> BoxResult<u64> {
    let consumer: BaseConsumer = client_config().create()?;
    let mut sum = 0;
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        sum += high as u64;
    }
    Ok(sum)
}

/// Sum of `group`'s committed offsets on `topic` (missing offsets count 0).
fn committed_sum(group: &str, topic: &str, partitions: i32) -> BoxResult<u64> {
    let consumer: BaseConsumer = client_config().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let sum = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o.max(0) as u64,
            _ => 0,
        })
        .sum();
    drop(committed); // before the consumer (rust-rdkafka #453)
    Ok(sum)
}

/// Counts deliveries of the load producers.
#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Latency producers: send → broker acknowledgement, from the `sent-at` header.
    acks: Option<Arc<LatencyRecorder>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.delivered.fetch_add(1, AtomicOrdering::Relaxed);
                if let Some(acks) = &self.acks {
                    let sent = m.headers().and_then(|hs| {
                        hs.iter()
                            .find(|h| h.key == SENT_AT_HEADER)
                            .and_then(|h| h.value)
                    });
                    acks.record(sent, epoch_micros());
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, AtomicOrdering::Relaxed);
                let mut first = self.first_error.lock().expect("not poisoned");
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// A JSON value of exactly `size` bytes where possible: `{"id":N,"pad":"xxx…"}`.
fn fill_payload(buf: &mut Vec<u8>, id: u64, size: usize) {
    buf.clear();
    let _ = std::io::Write::write_fmt(buf, format_args!("{{\"id\":{id},\"pad\":\""));
    let pad = size.saturating_sub(buf.len() + 2);
    buf.resize(buf.len() + pad, b'x');
    buf.extend_from_slice(b"\"}");
}

/// Sends `record`, waiting while librdkafka's queue is full.
fn send_blocking<'a>(
    producer: &BaseProducer<DeliveryCounter>,
    mut record: BaseRecord<'a, [u8], [u8]>,
) -> BoxResult<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

struct Produced {
    secs: f64,
}

/// Pre-produces `n` records (id = 0..n) round-robin over `partitions`, with keys cycling over
/// `keys` values and a unique `event-id` header, then waits for every acknowledgement.
/// Throughput settings: `linger.ms=50`, big batches, `acks=1`.
fn pre_produce(
    topic: &str,
    n: u64,
    size: usize,
    partitions: i32,
    keys: u64,
    compression: &str,
    run_id: &str,
) -> BoxResult<Produced> {
    let producer: BaseProducer<DeliveryCounter> = client_config()
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "10000")
        .set("compression.codec", compression)
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "300000")
        .create_with_context(DeliveryCounter::default())?;
    let started = Instant::now();
    let mut payload = Vec::with_capacity(size + 32);
    let mut key = String::new();
    let mut event_id = String::new();
    for id in 0..n {
        fill_payload(&mut payload, id, size);
        key.clear();
        let _ = write!(key, "key-{}", id % keys);
        event_id.clear();
        let _ = write!(event_id, "{run_id}-{id}");
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: EVENT_ID_HEADER,
            value: Some(event_id.as_bytes()),
        });
        let record = BaseRecord::to(topic)
            .partition((id % partitions as u64) as i32)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        send_blocking(&producer, record)?;
        if id % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let secs = started.elapsed().as_secs_f64();
    let ctx = producer.context();
    let failed = ctx.failed.load(AtomicOrdering::Relaxed);
    if failed > 0 {
        let first = ctx.first_error.lock().expect("not poisoned").clone();
        return Err(format!("{failed} records failed to produce: {first:?}").into());
    }
    let delivered = ctx.delivered.load(AtomicOrdering::Relaxed);
    if delivered != n {
        return Err(format!("{delivered} of {n} records acknowledged").into());
    }
    Ok(Produced { secs })
}

// ---------------------------------------------------------------------------------------------
// Process measurements

/// User+sys CPU seconds of this whole process (every thread, exited ones included).
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at "state" (field 3).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(utime), Some(stime)) => (utime + stime) as f64 / CLOCK_TICKS_PER_SEC,
        _ => f64::NAN,
    }
}

/// Peak resident set size of this process so far (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------------------------
// Scenario results (child → parent, one JSON line on stdout)

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Outcome {
    /// Records measured.
    records: u64,
    /// Value bytes of those records.
    payload_bytes: u64,
    /// First record handed to user code → all measured records settled.
    secs: f64,
    /// Consumer created → first record (group join, first fetch).
    join_secs: f64,
    /// Process user+sys CPU from consumer creation to the end of the measurement.
    cpu_secs: f64,
    /// `VmHWM` at the end of the measurement.
    peak_rss_kib: u64,
    /// Dead letters in `<topic>.dlt` afterwards (scenario d).
    dead_letters: u64,
    latency: Option<LatencyOutcome>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LatencyOutcome {
    samples: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    offered_rate: u64,
    /// Records sent per second over the measured phase (the producer kept the schedule?).
    send_rate: f64,
    /// How far the producer fell behind its schedule at worst, µs.
    max_send_lag_us: u64,
    /// Send → broker acknowledgement (acks=1), measured phase: the broker's share.
    ack_p50_us: u64,
    ack_p99_us: u64,
}

// ---------------------------------------------------------------------------------------------
// Child: one scenario

fn run_child(args: &Args, child: &ChildArgs) -> BoxResult<Outcome> {
    // Unique per child process, so a scenario run again by hand on a kept topic starts over.
    let group = format!(
        "{}-{}-{}-g",
        child.topic,
        child.scenario.name(),
        std::process::id()
    );
    match child.scenario {
        Scenario::Raw => raw_drain(args, child, &group),
        Scenario::LatencyRaw | Scenario::Latency => latency(args, child, &group),
        _ => kourier_drain(args, child, &group),
    }
}

fn consumer_config(args: &Args, group: &str) -> ClientConfig {
    // Exactly what kourier's builder sets (builder.rs), so both arms fetch alike.
    let mut config = client_config();
    config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES.to_string())
        .set("fetch.queue.backoff.ms", "20")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (k, v) in &args.consumer_config {
        config.set(k, v);
    }
    config
}

/// A kourier consumer with the run's settings (`--consumer-config`, buffer sizes).
fn kourier_builder(
    args: &Args,
    handler: BenchHandler,
    group: &str,
    topic: &str,
) -> kourier::RetryingConsumerBuilder<BenchHandler> {
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(bootstrap())
        .group_id(group)
        .topic(topic);
    for (k, v) in &args.consumer_config {
        builder = builder.kafka_config(k, v);
    }
    if let Some(n) = args.buffer_records {
        builder = builder.max_buffered_records(n as usize);
    }
    if let Some(n) = args.partition_buffer {
        builder = builder.max_buffered_records_per_partition(n as usize);
    }
    match args.ordering.as_deref() {
        Some("key") => builder = builder.ordering(Ordering::Key),
        Some("unordered") => builder = builder.ordering(Ordering::Unordered),
        _ => {}
    }
    if let Some(n) = args.max_in_flight {
        builder = builder.max_in_flight(n as usize);
    }
    builder
}

/// Commits `next` (the next offset to read, per partition) synchronously.
fn raw_commit(consumer: &BaseConsumer, topic: &str, next: &[i64]) -> BoxResult<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, &o) in next.iter().enumerate() {
        if o >= 0 {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(o))?;
        }
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(())
}

/// (a): poll, count, track offsets; commit every second like kourier.
fn raw_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let n = child.topic_records;
    let cpu0 = process_cpu_secs();
    let created = Instant::now();
    let consumer: BaseConsumer = consumer_config(args, group).create()?;
    consumer.subscribe(&[child.topic.as_str()])?;
    let mut next = vec![-1i64; PARTITIONS as usize];
    let mut count = 0u64;
    let mut first = None;
    let mut last_commit = Instant::now();
    while count < n {
        if last_commit.elapsed() >= Duration::from_secs(1) {
            raw_commit(&consumer, &child.topic, &next)?;
            last_commit = Instant::now();
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
                if let Some(slot) = next.get_mut(m.partition() as usize) {
                    *slot = m.offset() + 1;
                }
            }
            Some(Err(e)) => eprintln!("raw consumer error: {e}"),
            None => {}
        }
        if created.elapsed() > SCENARIO_TIMEOUT {
            return Err(
                format!("raw drain: {count} of {n} records after {SCENARIO_TIMEOUT:?}").into(),
            );
        }
    }
    let end = Instant::now();
    let cpu1 = process_cpu_secs();
    let rss = peak_rss_kib();
    raw_commit(&consumer, &child.topic, &next)?;
    consumer.unsubscribe();
    drop(consumer);
    let first = first.unwrap_or(end);
    check_committed(group, &child.topic, n)?;
    Ok(Outcome {
        records: n,
        payload_bytes: n * args.size as u64,
        secs: (end - first).as_secs_f64(),
        join_secs: (first - created).as_secs_f64(),
        cpu_secs: cpu1 - cpu0,
        peak_rss_kib: rss,
        ..Outcome::default()
    })
}

fn check_committed(group: &str, topic: &str, n: u64) -> BoxResult<()> {
    let committed = committed_sum(group, topic, PARTITIONS)?;
    if committed < n {
        return Err(format!(
            "group {group} committed {committed} of {n} records: the run lost track of records"
        )
        .into());
    }
    Ok(())
}

/// The handler's event: only the id is read; serde skips the padding.
#[derive(Debug, Clone, Deserialize)]
struct BenchEvent {
    id: u64,
}

#[derive(Debug, Default)]
struct Progress {
    /// Handler calls that returned.
    handled: AtomicU64,
    /// Permanent failures returned (scenario d).
    failed: AtomicU64,
    /// First handler entry.
    first: OnceLock<Instant>,
}

#[derive(Debug)]
enum Behaviour {
    Noop,
    FailEvery(u64),
    Sleep(Duration),
    /// Record `handler entry − sent-at`.
    Latency(Arc<LatencyRecorder>),
}

#[derive(Debug)]
struct BenchHandler {
    progress: Arc<Progress>,
    behaviour: Behaviour,
}

/// End-to-end latencies: an HDR histogram of the measured phase, plus a per-second timeline
/// (by send second, warm-up included) for `--timeline`.
#[derive(Debug)]
struct LatencyRecorder {
    /// Records scheduled before this (µs since the epoch) are warm-up: not in the histogram.
    measured_after_us: AtomicU64,
    /// When the producer started (µs since the epoch).
    start_us: AtomicU64,
    histogram: Mutex<Histogram<u64>>,
    /// Per scheduled second: (records, sum µs, max µs).
    timeline: Mutex<Vec<(u64, u64, u64)>>,
}

impl LatencyRecorder {
    fn new() -> Self {
        LatencyRecorder {
            measured_after_us: AtomicU64::new(u64::MAX),
            start_us: AtomicU64::new(u64::MAX),
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            ),
            timeline: Mutex::new(Vec::new()),
        }
    }

    /// Records a record whose `sent-at` header holds `sent` (text µs), received at `now_us`.
    fn record(&self, sent: Option<&[u8]>, now_us: u64) {
        let Some(sent) = sent
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let latency = now_us.saturating_sub(sent).max(1);
        if sent >= self.measured_after_us.load(AtomicOrdering::Relaxed) {
            let mut h = self.histogram.lock().expect("not poisoned");
            let _ = h.record(latency);
        }
        let start = self.start_us.load(AtomicOrdering::Relaxed);
        if sent >= start {
            let second = ((sent - start) / 1_000_000) as usize;
            let mut t = self.timeline.lock().expect("not poisoned");
            if t.len() <= second {
                t.resize(second + 1, (0, 0, 0));
            }
            let slot = &mut t[second];
            slot.0 += 1;
            slot.1 += latency;
            slot.2 = slot.2.max(latency);
        }
    }
}

#[async_trait]
impl Handler for BenchHandler {
    type Event = BenchEvent;

    async fn handle(&self, message: &Message<BenchEvent>) -> Result<(), HandlerError> {
        self.progress.first.get_or_init(Instant::now);
        let result = match &self.behaviour {
            Behaviour::Noop => Ok(()),
            Behaviour::FailEvery(k) => {
                if message.event().id.is_multiple_of(*k) {
                    self.progress.failed.fetch_add(1, AtomicOrdering::Relaxed);
                    Err(HandlerError::permanent("benchmark: permanent failure"))
                } else {
                    Ok(())
                }
            }
            Behaviour::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            Behaviour::Latency(recorder) => {
                recorder.record(message.headers().get(SENT_AT_HEADER), epoch_micros());
                Ok(())
            }
        };
        self.progress.handled.fetch_add(1, AtomicOrdering::Relaxed);
        result
    }
}

fn runtime() -> BoxResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A kourier consumer running in the background of a runtime.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<kourier::Result<kourier::ShutdownReport>>,
    monitor: kourier::ConsumerMonitor,
}

impl Running {
    fn start(consumer: RetryingConsumer<BenchHandler>) -> Running {
        let monitor = consumer.monitor();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(async {
            let _ = rx.await;
        }));
        Running {
            stop,
            task,
            monitor,
        }
    }

    async fn stop(self) -> BoxResult<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .map_err(|_| "consumer did not shut down within 120 s")??
            .map(|_report| ())
            .map_err(Into::into)
    }
}

/// (b), (c), (d) and the slow-handler scenarios.
fn kourier_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let scenario = child.scenario;
    let n = match scenario {
        Scenario::SlowPartition => args.slow_partition_records.min(child.topic_records),
        _ => child.topic_records,
    };
    // When the scenario reads the whole topic, its end is "everything settled"; the
    // slow Partition scenario stops after its first `n` records instead.
    let whole_topic = n == child.topic_records;
    let rt = runtime()?;
    rt.block_on(async {
        let progress = Arc::new(Progress::default());
        let behaviour = match scenario {
            Scenario::DeadLetter => Behaviour::FailEvery(FAIL_EVERY),
            Scenario::SlowPartition | Scenario::SlowKey => Behaviour::Sleep(SLOW_HANDLER),
            _ => Behaviour::Noop,
        };
        let handler = BenchHandler {
            progress: progress.clone(),
            behaviour,
        };
        let dlt = format!("{}.dlt", child.topic);
        let dlt_before = if scenario == Scenario::DeadLetter {
            log_end(&dlt, PARTITIONS)?
        } else {
            0
        };
        let cpu0 = process_cpu_secs();
        let created = Instant::now();
        let mut builder = kourier_builder(args, handler, group, &child.topic);
        match scenario {
            Scenario::Redis => {
                require_redis().await?;
                let store = RedisIdempotencyStore::builder(redis_url())
                    .key_prefix(format!("kourier-bench:{}:", child.run_id))
                    .build()
                    .await?;
                builder = builder
                    .idempotency(Arc::new(store), DedupKey::header(EVENT_ID_HEADER))
                    // Short: a full run leaves ~1 M keys behind.
                    .idempotency_ttl(Duration::from_secs(600));
            }
            Scenario::SlowKey => {
                builder = builder
                    .ordering(Ordering::Key)
                    .max_in_flight(SLOW_KEY_MAX_IN_FLIGHT);
            }
            Scenario::SlowPartition => builder = builder.ordering(Ordering::Partition),
            _ => {}
        }
        let running = Running::start(builder.build()?);
        let end = loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if progress.handled.load(AtomicOrdering::Relaxed) >= n {
                if !whole_topic {
                    break Instant::now();
                }
                let s = running.monitor.snapshot();
                if s.in_flight == 0 && s.buffered_records == 0 {
                    break Instant::now();
                }
            }
            if running.task.is_finished() {
                return Err("the consumer stopped before the end".into());
            }
            if created.elapsed() > SCENARIO_TIMEOUT {
                let handled = progress.handled.load(AtomicOrdering::Relaxed);
                return Err(
                    format!("{handled} of {n} records handled after {SCENARIO_TIMEOUT:?}").into(),
                );
            }
        };
        let cpu1 = process_cpu_secs();
        let rss = peak_rss_kib();
        running.stop().await?;
        let first = progress.first.get().copied().unwrap_or(end);
        let partitions = if scenario.is_slow() { 1 } else { PARTITIONS };
        let committed = committed_sum(group, &child.topic, partitions)?;
        if committed < n {
            return Err(format!("group {group} committed {committed} of {n} records").into());
        }
        let mut dead_letters = 0;
        if scenario == Scenario::DeadLetter {
            let failed = progress.failed.load(AtomicOrdering::Relaxed);
            dead_letters = log_end(&dlt, PARTITIONS)? - dlt_before;
            if dead_letters != failed {
                return Err(format!(
                    "{failed} records failed but the dead-letter topic holds {dead_letters}"
                )
                .into());
            }
        }
        Ok(Outcome {
            records: n,
            payload_bytes: n * args.size as u64,
            secs: (end - first).as_secs_f64(),
            join_secs: (first - created).as_secs_f64(),
            cpu_secs: cpu1 - cpu0,
            peak_rss_kib: rss,
            dead_letters,
            latency: None,
        })
    })
}

/// Sends records at `rate`/s for `warmup + secs`, each stamped with the time it is handed to
/// the producer (µs since the epoch, in a header). The consumer never holds the producer back
/// (no coordinated omission); how far the producer thread itself fell behind its schedule is
/// returned so a starved producer shows. Returns (records sent, measured-phase send rate,
/// worst lag behind schedule in µs).
fn paced_producer(
    topic: &str,
    rate: u64,
    warmup: Duration,
    secs: Duration,
    size: usize,
    recorder: &LatencyRecorder,
    acks: &Arc<LatencyRecorder>,
) -> BoxResult<(u64, f64, u64)> {
    let producer: BaseProducer<DeliveryCounter> = client_config()
        // librdkafka's default linger (5 ms): 1 ms makes ~1,000 produce requests/s, more than
        // a busy single broker acknowledges in time (acks then take seconds, measured).
        .set("linger.ms", LATENCY_LINGER_MS.to_string())
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .create_with_context(DeliveryCounter {
            acks: Some(acks.clone()),
            ..DeliveryCounter::default()
        })?;
    let total = rate * (warmup + secs).as_secs();
    let warm = rate * warmup.as_secs();
    let started = Instant::now();
    let start_us = epoch_micros();
    for r in [recorder, &**acks] {
        r.start_us.store(start_us, AtomicOrdering::Relaxed);
        r.measured_after_us.store(
            start_us + warmup.as_micros() as u64,
            AtomicOrdering::Relaxed,
        );
    }
    let mut payload = Vec::with_capacity(size + 32);
    let mut key = String::new();
    let mut max_lag = 0u64;
    let mut measured_from = None;
    for id in 0..total {
        let due = Duration::from_micros(id * 1_000_000 / rate);
        let now = started.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            max_lag = max_lag.max((now - due).as_micros() as u64);
        }
        if id == warm {
            measured_from = Some(Instant::now());
        }
        fill_payload(&mut payload, id, size);
        key.clear();
        let _ = write!(key, "key-{}", id % 10_000);
        let sent_at = epoch_micros().to_string();
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: SENT_AT_HEADER,
            value: Some(sent_at.as_bytes()),
        });
        let record = BaseRecord::to(topic)
            .partition((id % PARTITIONS as u64) as i32)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        send_blocking(&producer, record)?;
        producer.poll(Duration::ZERO);
    }
    let send_secs = measured_from.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    producer.flush(Duration::from_secs(60))?;
    let failed = producer.context().failed.load(AtomicOrdering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} latency records failed to produce").into());
    }
    Ok((total, (total - warm) as f64 / send_secs, max_lag))
}

/// latency-raw and latency: a paced producer thread, a consumer taking the time at entry.
fn latency(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let rate = args.latency_rate;
    // A fresh topic's first seconds are slow on a busy broker (seen with both consumers).
    let warmup = Duration::from_secs(if args.quick { 1 } else { 5 });
    let secs = Duration::from_secs(args.latency_secs);
    let total = rate * (warmup + secs).as_secs();
    let recorder = Arc::new(LatencyRecorder::new());
    let acks = Arc::new(LatencyRecorder::new());
    let progress = Arc::new(Progress::default());
    let assigned = Arc::new(AtomicBool::new(false));
    let cpu0 = process_cpu_secs();
    let created = Instant::now();

    // The consumer side: raw on a thread, or kourier on a runtime.
    let rt = runtime()?;
    let mut raw_thread = None;
    let mut running = None;
    if child.scenario == Scenario::LatencyRaw {
        let consumer: BaseConsumer = consumer_config(args, group).create()?;
        consumer.subscribe(&[child.topic.as_str()])?;
        let (recorder, progress, assigned) = (recorder.clone(), progress.clone(), assigned.clone());
        let topic = child.topic.clone();
        raw_thread = Some(std::thread::spawn(move || -> BoxResult<()> {
            let mut next = vec![-1i64; PARTITIONS as usize];
            let mut last_commit = Instant::now();
            while progress.handled.load(AtomicOrdering::Relaxed) < total {
                if created.elapsed() > SCENARIO_TIMEOUT {
                    return Err("raw latency consumer timed out".into());
                }
                if !assigned.load(AtomicOrdering::Relaxed) {
                    let count = consumer.assignment().map_or(0, |a| a.count());
                    assigned.store(count == PARTITIONS as usize, AtomicOrdering::Relaxed);
                }
                if last_commit.elapsed() >= Duration::from_secs(1) {
                    raw_commit(&consumer, &topic, &next)?;
                    last_commit = Instant::now();
                }
                let Some(m) = consumer.poll(Duration::from_millis(10)) else {
                    continue;
                };
                let m = m?;
                let now = epoch_micros();
                let sent = m.headers().and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == SENT_AT_HEADER)
                        .and_then(|h| h.value)
                });
                recorder.record(sent, now);
                if let Some(slot) = next.get_mut(m.partition() as usize) {
                    *slot = m.offset() + 1;
                }
                progress.first.get_or_init(Instant::now);
                progress.handled.fetch_add(1, AtomicOrdering::Relaxed);
            }
            raw_commit(&consumer, &topic, &next)?;
            Ok(())
        }));
    } else {
        let _guard = rt.enter();
        let handler = BenchHandler {
            progress: progress.clone(),
            behaviour: Behaviour::Latency(recorder.clone()),
        };
        let consumer = kourier_builder(args, handler, group, &child.topic).build()?;
        running = Some(Running::start(consumer));
    }

    // Wait for the assignment, so the measured phase does not include the group join.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match &running {
            Some(r) => r.monitor.snapshot().assigned.len() == PARTITIONS as usize,
            None => assigned.load(AtomicOrdering::Relaxed),
        };
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("no partitions assigned after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let (sent, send_rate, max_lag) = paced_producer(
        &child.topic,
        rate,
        warmup,
        secs,
        args.size,
        &recorder,
        &acks,
    )
    .map_err(|e| format!("latency producer: {e}"))?;
    debug_assert_eq!(sent, total);

    let end = Instant::now();
    loop {
        if progress.handled.load(AtomicOrdering::Relaxed) >= total {
            break;
        }
        if end.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "latency: {} of {total} records consumed 60 s after the last send",
                progress.handled.load(AtomicOrdering::Relaxed)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu1 = process_cpu_secs();
    let rss = peak_rss_kib();
    if let Some(t) = raw_thread {
        t.join().map_err(|_| "raw latency consumer panicked")??;
    }
    if let Some(r) = running {
        rt.block_on(r.stop())?;
    }
    if args.timeline {
        let t = recorder.timeline.lock().expect("not poisoned");
        eprintln!(
            "latency timeline ({}), by send second:",
            child.scenario.name()
        );
        for (second, (n, sum, max)) in t.iter().enumerate() {
            eprintln!(
                "  {second:>3} s  {n:>6} records  mean {:>9.2} ms  max {:>9.2} ms",
                *sum as f64 / (*n).max(1) as f64 / 1000.0,
                *max as f64 / 1000.0
            );
        }
    }
    let h = recorder.histogram.lock().expect("not poisoned");
    let a = acks.histogram.lock().expect("not poisoned");
    let first = progress.first.get().copied().unwrap_or(end);
    Ok(Outcome {
        records: total,
        payload_bytes: total * args.size as u64,
        secs: (Instant::now() - first).as_secs_f64(),
        join_secs: (first - created).as_secs_f64(),
        cpu_secs: cpu1 - cpu0,
        peak_rss_kib: rss,
        dead_letters: 0,
        latency: Some(LatencyOutcome {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            offered_rate: rate,
            send_rate,
            max_send_lag_us: max_lag,
            ack_p50_us: a.value_at_quantile(0.50),
            ack_p99_us: a.value_at_quantile(0.99),
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// Parent: set up, run each scenario in a child, print the table

fn run_child_process(
    args: &Args,
    scenario: Scenario,
    topic: &str,
    topic_records: u64,
    run_id: &str,
) -> BoxResult<Outcome> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["--scenario", scenario.name(), "--topic", topic])
        .args(["--topic-records", &topic_records.to_string()])
        .args(["--run-id", run_id])
        .args(["--records", &args.records.to_string()])
        .args(["--size", &args.size.to_string()])
        .args(["--latency-rate", &args.latency_rate.to_string()])
        .args(["--latency-secs", &args.latency_secs.to_string()])
        .args(["--slow-records", &args.slow_records.to_string()])
        .args([
            "--slow-partition-records",
            &args.slow_partition_records.to_string(),
        ]);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.smoke {
        cmd.arg("--smoke");
    }
    if args.timeline {
        cmd.arg("--timeline");
    }
    for (k, v) in &args.consumer_config {
        cmd.args(["--consumer-config", &format!("{k}={v}")]);
    }
    if let Some(n) = args.buffer_records {
        cmd.args(["--buffer-records", &n.to_string()]);
    }
    if let Some(n) = args.partition_buffer {
        cmd.args(["--partition-buffer", &n.to_string()]);
    }
    if let Some(o) = &args.ordering {
        cmd.args(["--ordering", o]);
    }
    if let Some(n) = args.max_in_flight {
        cmd.args(["--max-in-flight", &n.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)?;
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("scenario {} failed ({status})", scenario.name()).into());
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("scenario {} printed no result", scenario.name()))?;
    Ok(serde_json::from_str(line)?)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0));
    let (_, librdkafka) = kourier::rdkafka::util::get_rdkafka_version();
    format!("{cpus} CPUs ({model}), {mem_gib:.0} GiB RAM, librdkafka {librdkafka}")
}

/// 1234567 → "1,234,567".
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && v.is_finite() => format!("{:.2}×", v / b),
        _ => "—".into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// The bytes kourier's buffer accounting charges one drain record (`RawRecord::byte_len`):
/// key + value + header names and values + topic + 64.
fn accounted_record_bytes(args: &Args, topic: &str, run_id: &str) -> u64 {
    let key = "key-0000".len() as u64;
    let header = (EVENT_ID_HEADER.len() + run_id.len() + 1 + args.records.to_string().len()) as u64;
    key + args.size as u64 + header + topic.len() as u64 + 64
}

fn run_parent(args: &Args) -> BoxResult<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    require_kafka()?;
    if args.scenarios.contains(&Scenario::Redis) {
        rt.block_on(require_redis())?;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let run_id = format!("{}-{}", std::process::id(), nanos % 1_000_000_000_000);
    let load_start = load_average();
    eprintln!("throughput: run {run_id}; {}", machine());

    let drain_topic = format!("kourier-bench-{run_id}-drain");
    let slow_topic = format!("kourier-bench-{run_id}-slow");
    let mut topics: Vec<(String, i32)> = Vec::new();
    let wants = |f: fn(Scenario) -> bool| args.scenarios.iter().any(|s| f(*s));
    if wants(Scenario::is_drain) {
        topics.push((drain_topic.clone(), PARTITIONS));
        topics.push((format!("{drain_topic}.dlt"), PARTITIONS));
    }
    if wants(Scenario::is_slow) {
        topics.push((slow_topic.clone(), 1));
        topics.push((format!("{slow_topic}.dlt"), 1));
    }
    for s in args.scenarios.iter().filter(|s| s.is_latency()) {
        let t = format!("kourier-bench-{run_id}-{}", s.name());
        topics.push((format!("{t}.dlt"), PARTITIONS));
        topics.push((t, PARTITIONS));
    }
    rt.block_on(create_topics(&topics))?;

    let result = run_scenarios(args, &run_id, &drain_topic, &slow_topic);
    if !args.keep_topics {
        let names: Vec<String> = topics.into_iter().map(|(t, _)| t).collect();
        if let Err(e) = rt.block_on(delete_topics(&names)) {
            eprintln!("warning: could not delete this run's topics: {e}");
        }
    }
    let (produced, results, failures) = result?;
    print_table(
        args,
        &run_id,
        &drain_topic,
        &produced,
        &results,
        &load_start,
    );
    if failures > 0 {
        return Err(format!("{failures} scenario(s) failed").into());
    }
    Ok(())
}

type Results = Vec<(Scenario, Outcome)>;

/// Pre-produces and runs every scenario; a failed scenario is reported and skipped.
fn run_scenarios(
    args: &Args,
    run_id: &str,
    drain_topic: &str,
    slow_topic: &str,
) -> BoxResult<(Option<Produced>, Results, usize)> {
    let wants = |f: fn(Scenario) -> bool| args.scenarios.iter().any(|s| f(*s));
    let mut produced = None;
    if wants(Scenario::is_drain) {
        eprintln!(
            "throughput: pre-producing {} records × {} B to {drain_topic}",
            thousands(args.records as f64),
            args.size
        );
        let p = pre_produce(
            drain_topic,
            args.records,
            args.size,
            PARTITIONS,
            10_000,
            &args.compression,
            run_id,
        )?;
        let in_log = log_end(drain_topic, PARTITIONS)?;
        if in_log != args.records {
            return Err(format!("{in_log} records in the log, expected {}", args.records).into());
        }
        produced = Some(p);
    }
    if wants(Scenario::is_slow) {
        let n = args.slow_records.max(args.slow_partition_records);
        eprintln!("throughput: pre-producing {n} records over {SLOW_KEYS} keys to {slow_topic}");
        pre_produce(
            slow_topic,
            n,
            args.size,
            1,
            SLOW_KEYS,
            &args.compression,
            run_id,
        )?;
    }
    let mut results = Vec::new();
    let mut failures = 0;
    for &scenario in &args.scenarios {
        let (topic, topic_records) = if scenario.is_drain() {
            (drain_topic.to_owned(), args.records)
        } else if scenario.is_slow() {
            let n = args.slow_records.max(args.slow_partition_records);
            (slow_topic.to_owned(), n)
        } else {
            (format!("kourier-bench-{run_id}-{}", scenario.name()), 0)
        };
        eprintln!(
            "throughput: scenario {} ({}) …",
            scenario.name(),
            scenario.label()
        );
        match run_child_process(args, scenario, &topic, topic_records, run_id) {
            Ok(outcome) => results.push((scenario, outcome)),
            Err(e) => {
                eprintln!("throughput: {e}");
                failures += 1;
            }
        }
    }
    Ok((produced, results, failures))
}

fn print_table(
    args: &Args,
    run_id: &str,
    drain_topic: &str,
    produced: &Option<Produced>,
    results: &Results,
    load_start: &str,
) {
    let get = |s: Scenario| results.iter().find(|(x, _)| *x == s).map(|(_, o)| o);
    let rate = |o: &Outcome| o.records as f64 / o.secs;
    let cpu_per_m = |o: &Outcome| o.cpu_secs / o.records as f64 * 1e6;
    let rss_mib = |o: &Outcome| o.peak_rss_kib as f64 / 1024.0;
    let base = get(Scenario::Raw);
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "kourier throughput benchmark{} — {} records × {} B, {PARTITIONS} partitions, compression {}",
        if args.smoke {
            " (smoke run: figures are meaningless)"
        } else if args.quick {
            " (--quick)"
        } else {
            ""
        },
        thousands(args.records as f64),
        args.size,
        args.compression
    );
    let _ = writeln!(w, "machine: {}", machine());
    if !args.consumer_config.is_empty()
        || args.buffer_records.is_some()
        || args.partition_buffer.is_some()
        || args.ordering.is_some()
        || args.max_in_flight.is_some()
    {
        let overrides: Vec<String> = args
            .consumer_config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(
                args.buffer_records
                    .map(|n| format!("kourier max_buffered_records={n}")),
            )
            .chain(
                args.partition_buffer
                    .map(|n| format!("kourier max_buffered_records_per_partition={n}")),
            )
            .chain(
                args.ordering
                    .as_ref()
                    .map(|o| format!("kourier ordering={o}")),
            )
            .chain(
                args.max_in_flight
                    .map(|n| format!("kourier max_in_flight={n}")),
            )
            .collect();
        let _ = writeln!(w, "overrides: {}", overrides.join(", "));
    }
    let _ = writeln!(
        w,
        "load average (1/5/15 min): {load_start} at start, {} at end",
        load_average()
    );
    if let Some(p) = produced {
        let _ = writeln!(
            w,
            "pre-produce: {} records in {:.2} s = {} rec/s ({:.1} MB/s), linger.ms=50, acks=1; \
             all in the log before any consumer started",
            thousands(args.records as f64),
            p.secs,
            thousands(args.records as f64 / p.secs),
            args.records as f64 * args.size as f64 / p.secs / 1e6
        );
    }

    let drains: Vec<_> = results.iter().filter(|(s, _)| s.is_drain()).collect();
    if !drains.is_empty() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "Drain: first record handed to user code → every record settled; CPU = whole process \
             user+sys from consumer creation; MB/s counts values only"
        );
        let _ = writeln!(
            w,
            "{:<34} {:>9} {:>7} {:>10} {:>6} {:>7} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}",
            "scenario",
            "records",
            "secs",
            "rec/s",
            "×(a)",
            "MB/s",
            "CPU s/M",
            "×(a)",
            "RSS MiB",
            "×(a)",
            "µs/rec+(a)",
            "join s"
        );
        for (s, o) in &drains {
            let overhead = base.map_or(f64::NAN, |b| 1e6 / rate(o) - 1e6 / rate(b));
            let _ = writeln!(
                w,
                "{:<34} {:>9} {:>7.2} {:>10} {:>6} {:>7.1} {:>8.2} {:>6} {:>8.1} {:>6} {:>10.2} {:>6.1}",
                s.label(),
                thousands(o.records as f64),
                o.secs,
                thousands(rate(o)),
                ratio(rate(o), base.map(rate)),
                o.payload_bytes as f64 / o.secs / 1e6,
                cpu_per_m(o),
                ratio(cpu_per_m(o), base.map(cpu_per_m)),
                rss_mib(o),
                ratio(rss_mib(o), base.map(rss_mib)),
                overhead,
                o.join_secs
            );
        }
        if let Some(d) = get(Scenario::DeadLetter) {
            let _ = writeln!(
                w,
                "(d) wrote {} dead letters to {drain_topic}.dlt (acks=all, idempotent producer)",
                thousands(d.dead_letters as f64)
            );
        }
    }

    let slow_p = get(Scenario::SlowPartition);
    let slow_k = get(Scenario::SlowKey);
    if slow_p.is_some() || slow_k.is_some() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "Slow handler: each record awaits a {} ms tokio sleep; 1 partition, {} keys. \
             Partition runs only {} records (at 10 ms/record {} would take ~{:.0} s); rates compare",
            SLOW_HANDLER.as_millis(),
            SLOW_KEYS,
            thousands(args.slow_partition_records as f64),
            thousands(args.slow_records as f64),
            args.slow_records as f64 * SLOW_HANDLER.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "{:<34} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8}",
            "scenario", "records", "secs", "rec/s", "CPU s/M", "RSS MiB", "join s"
        );
        for s in [Scenario::SlowPartition, Scenario::SlowKey] {
            if let Some(o) = get(s) {
                let _ = writeln!(
                    w,
                    "{:<34} {:>9} {:>7.2} {:>10} {:>8.1} {:>8.1} {:>8.1}",
                    s.label(),
                    thousands(o.records as f64),
                    o.secs,
                    thousands(rate(o)),
                    cpu_per_m(o),
                    rss_mib(o),
                    o.join_secs
                );
            }
        }
    }

    let lat_raw = get(Scenario::LatencyRaw).and_then(|o| o.latency.clone());
    let lat = get(Scenario::Latency).and_then(|o| o.latency.clone());
    if lat_raw.is_some() || lat.is_some() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "End-to-end latency: send time (µs header, producer linger.ms={LATENCY_LINGER_MS}) → handler \
             entry; offered {} rec/s for {} s after a warm-up that is not recorded; {PARTITIONS} partitions; \
             consumer defaults (fetch.wait.max.ms=500); lag = producer behind schedule (worst), \
             ack = send → broker ack (acks=1)",
            thousands(args.latency_rate as f64),
            args.latency_secs
        );
        let _ = writeln!(
            w,
            "{:<34} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
            "scenario",
            "samples",
            "sent/s",
            "lag ms",
            "ack p50",
            "ack p99",
            "p50 ms",
            "p99 ms",
            "×raw",
            "p99.9 ms",
            "max ms",
            "RSS MiB"
        );
        for (s, l) in [(Scenario::LatencyRaw, &lat_raw), (Scenario::Latency, &lat)] {
            if let (Some(l), Some(o)) = (l, get(s)) {
                let ms = |us: u64| us as f64 / 1000.0;
                let _ = writeln!(
                    w,
                    "{:<34} {:>8} {:>9} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8} {:>8.2} {:>8.2} {:>8.1}",
                    s.label(),
                    thousands(l.samples as f64),
                    thousands(l.send_rate),
                    ms(l.max_send_lag_us),
                    ms(l.ack_p50_us),
                    ms(l.ack_p99_us),
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ratio(l.p99_us as f64, lat_raw.as_ref().map(|r| r.p99_us as f64)),
                    ms(l.p999_us),
                    ms(l.max_us),
                    rss_mib(o)
                );
            }
        }
    }

    // Targets.
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Targets (informational: the exit code does not depend on them)"
    );
    let mut target = |name: String, value: String, ok: Option<bool>| {
        let v = ok.map_or("—   ", verdict);
        let _ = writeln!(w, "  {v}  {name:<58} {value}");
    };
    for (s, min) in [
        (Scenario::Kourier, 0.9),
        (Scenario::Redis, 0.5),
        (Scenario::DeadLetter, 0.8),
    ] {
        if let Some(o) = get(s) {
            let r = base.map(|b| rate(o) / rate(b));
            target(
                format!("{} ≥ {min:.2} × (a) throughput", s.label()),
                r.map_or("no baseline".into(), |r| format!("{r:.2} × (a)")),
                r.map(|r| r >= min),
            );
        }
    }
    if let (Some(p), Some(k)) = (slow_p, slow_k) {
        let r = rate(k) / rate(p);
        target(
            "slow handler: Key ≥ 20 × Partition".into(),
            format!("{r:.0} ×"),
            Some(r >= 20.0),
        );
    }
    let buffer_mib = (MAX_BUFFERED_RECORDS * accounted_record_bytes(args, drain_topic, run_id))
        .min(MAX_BUFFERED_BYTES) as f64
        / (1024.0 * 1024.0);
    let limit_mib = QUEUED_MAX_KBYTES as f64 / 1024.0 + buffer_mib + RSS_CONSTANT_MIB;
    for s in [Scenario::Kourier, Scenario::Redis, Scenario::DeadLetter] {
        if let Some(o) = get(s) {
            target(
                format!(
                    "{} peak RSS ≤ {:.0} + {:.1} + {:.0} MiB",
                    s.label(),
                    QUEUED_MAX_KBYTES as f64 / 1024.0,
                    buffer_mib,
                    RSS_CONSTANT_MIB
                ),
                format!("{:.1} MiB (limit {limit_mib:.1})", rss_mib(o)),
                Some(rss_mib(o) <= limit_mib),
            );
        }
    }
    if let Some(l) = &lat {
        target(
            format!(
                "kourier p99 latency at {} rec/s ≤ 20 ms",
                thousands(args.latency_rate as f64)
            ),
            format!("{:.2} ms", l.p99_us as f64 / 1000.0),
            Some(l.p99_us <= 20_000),
        );
    }
    let _ = writeln!(
        w,
        "  (RSS limit: librdkafka queued.max.messages.kbytes + kourier's buffer bound \
         min(max_buffered_bytes, max_buffered_records × accounted bytes/record) + a constant \
         for runtime, fetch buffers, DLT producer and allocator)"
    );
    println!("{out}");
}
