//! Fault-injection runner: pre-produces events, consumes them with a [`RetryingConsumer`] in a
//! child process while killing that process, the Kafka broker and the idempotency Redis, then
//! checks that nothing was lost and that duplicates stayed within the documented bound.
//!
//! ```text
//! # the reduced run scripts/test does (about 2 minutes):
//! cargo run --example fault_injection -- --events 20000 --kills 2 --broker-restarts 1 --redis-outages 1
//! # the full run (200,000 events, 5 kills, 1 broker restart, 1 Redis outage):
//! cargo run --release --example fault_injection
//! # graceful restarts only: 0 duplicates expected
//! cargo run --release --example fault_injection -- --events 20000 --clean-restarts --kills 3
//! ```
//!
//! It needs the broker (`KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`) and
//! `redis-server` on `PATH`: it starts its own Redis for the idempotency store on a free port,
//! so it can stop it. The broker is restarted only when `KOURIER_FAULT_BROKER_CONTROL` (or
//! `--broker-control`) names the `scripts/services` that runs it (with the same
//! `KOURIER_KAFKA_PORT` / `KOURIER_STATE`), and that script reports it running at the very
//! address the run uses; a broker the script calls external is never touched. Otherwise broker
//! restarts are skipped and the output says so. scripts/test sets the variable only for a
//! broker it started itself.
//!
//! What happens:
//! 1. `--events` events with unique ids go to a fresh topic (6 partitions), keyed by one of
//!    `--keys` keys (200), each carrying its key's sequence number.
//! 2. The consumer runs as a child process (`fault_injection consume ...`): key ordering,
//!    `max_in_flight` 32, a Redis idempotency store (lease 3 s), 4 attempts. Its handler
//!    appends each side effect `(id, key, seq, attempt, pid, partition, offset, time)` to a
//!    ledger file and counts it done only once the line is on disk (`sync_data`, batched).
//!    Simulated work (`--work-ms`, half before and half after the effect) paces consumption so
//!    every fault meets a busy consumer. Failures are injected by a hash of the id, so the
//!    checker knows them: 4.5 % fail transiently once or twice and then succeed, 0.5 % always
//!    fail transiently (retries exhausted: dead-lettered), 0.5 % fail permanently.
//! 3. At random points of progress it SIGKILLs the consumer and starts another (`--kills`),
//!    SIGKILLs the broker and starts it again (`--broker-restarts`), and kills the Redis for a
//!    few seconds, restarting it *empty* on the same port (`--redis-outages`). Faults run one
//!    after the other: after each, the runner waits until the consumer has committed past
//!    every effect made so far, so the records one fault can make repeat never overlap the
//!    next fault (a Redis restart during the redelivery after a kill would repeat all of it).
//! 4. When every event is accounted for and the consumer reports itself idle, it stops the
//!    last consumer with SIGTERM and checks.
//!
//! The checks, and the verdict line `events=E lost=L duplicates=D bound=B dead_lettered=X
//! kills=K broker_restarts=R redis_outages=S verdict=PASS|FAIL` (exit status 1 on FAIL):
//! - **lost = 0**: every id is in the ledger or the dead-letter topic.
//! - The dead-letter topic holds exactly the permanent and the exhausted ids (X), with the
//!   right failure kind and attempt count; none of them ever had a side effect.
//! - **D ≤ B** (duplicate side effects), `B = kills × max_in_flight`: after a SIGKILL only
//!   records whose effect was written but whose idempotency claim was not yet completed can
//!   run again (a completed one is skipped as done), and at most `max_in_flight` records are
//!   in flight. Checked per kill too: the repeats of a killed process's effects are at most
//!   `min(max_in_flight, its effects its group had not committed when it died)`, and effects
//!   of a process that was not killed never repeat. A broker restart adds no repeated effect:
//!   if it outlasts the session timeout the partitions are lost and redelivered, but the
//!   store says done. It does repeat **dead letters** (a dead-lettered key is not marked done,
//!   so a redrive can run): duplicate dead letters are checked against the letters not yet
//!   committed at each kill and broker restart, and no letter repeats more often than there
//!   were kills and broker restarts.
//! - `--clean-restarts`: SIGTERM instead of SIGKILL and **no idempotency store** (it would
//!   hide redeliveries), so `B = 0`, and no dead letter may repeat either: this tests the
//!   consumer's own commit on graceful shutdown.
//! - Each effect ran at the attempt its injected failures predict; per key, the sequence
//!   numbers of *first* effects strictly increase; committed offsets end at the log end; the
//!   last consumer's monitor snapshot shows every partition assigned, none paused, nothing in
//!   flight or buffered; no consumer process exited unless the runner stopped it.
//!
//! On PASS the topics and the work directory are removed; on FAIL they are kept (the path is
//! printed), with each consumer's log and ledger.
//!
//! [`RetryingConsumer`]: kourier::RetryingConsumer

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use kourier::dead_letter::headers as dlt_headers;
use kourier::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::rdkafka::message::{Headers as _, Message as _};
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::rdkafka::{Offset, TopicPartitionList};
use kourier::{
    DedupKey, Handler, HandlerError, Message, Ordering, RedisIdempotencyStore, RetryPolicy,
    RetryingConsumer, async_trait,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Parser, Debug)]
#[command(
    name = "fault_injection",
    about = "Kill the consumer, the broker and Redis while consuming; check nothing is lost",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Internal: the consumer child process the runner starts.
    Consume(ConsumeArgs),
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Events to produce and consume.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Consumer kills (SIGKILL; SIGTERM with --clean-restarts), each followed by a restart.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Broker kills and restarts (default 1; 0 with --clean-restarts).
    #[arg(long)]
    broker_restarts: Option<u32>,
    /// Idempotency Redis outages (default 1; 0 with --clean-restarts or --no-idempotency).
    #[arg(long)]
    redis_outages: Option<u32>,
    /// Stop the consumer with SIGTERM (graceful shutdown) instead of SIGKILL, without an
    /// idempotency store; expects 0 duplicates.
    #[arg(long)]
    clean_restarts: bool,
    /// Run the consumer without the idempotency store. With SIGKILLs the duplicate bound then
    /// does not hold (every uncommitted effect repeats): a check that the checker catches it.
    #[arg(long)]
    no_idempotency: bool,
    /// Partitions of the topic (and of its dead-letter topic).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Distinct record keys.
    #[arg(long, default_value_t = 200)]
    keys: u32,
    /// The consumer's max_in_flight (the duplicate bound per kill).
    #[arg(long, default_value_t = 32)]
    max_in_flight: usize,
    /// Simulated work per record, in ms: half before the side effect, half after it (so a
    /// kill can land between the effect and the handler's return). Default: paced so that
    /// consuming takes about 18 s per fault (each fault needs a busy consumer to hit).
    #[arg(long)]
    work_ms: Option<u64>,
    /// Seconds the idempotency Redis stays down per outage.
    #[arg(long, default_value_t = 5)]
    redis_down_secs: u64,
    /// Seconds the broker stays down per restart (before it is started again).
    #[arg(long, default_value_t = 3)]
    broker_down_secs: u64,
    /// Seed of the key choice, fault moments and injected failures (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Gives up waiting for the consumer after this many seconds in all.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap: String,
    /// The `scripts/services` that runs the broker, for broker restarts. Unset: broker
    /// restarts are skipped.
    #[arg(long, env = "KOURIER_FAULT_BROKER_CONTROL")]
    broker_control: Option<PathBuf>,
    /// Directory for the ledgers and logs (default: a new temporary directory, removed after
    /// a passing run).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the topics and the work directory after a passing run.
    #[arg(long)]
    keep: bool,
}

#[derive(Args, Debug, Clone)]
struct ConsumeArgs {
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    group: String,
    /// The idempotency Redis; none: no idempotency store.
    #[arg(long)]
    redis_url: Option<String>,
    #[arg(long)]
    ledger: PathBuf,
    #[arg(long)]
    seed: u64,
    #[arg(long)]
    max_in_flight: usize,
    #[arg(long)]
    work_ms: u64,
}

/// How many attempts the consumer makes (fixed 50 ms back-off, 3 retries).
const MAX_ATTEMPTS: u32 = 4;
/// The consumer's commit interval.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// The idempotency lease: a killed consumer's claims block their keys this long.
const LEASE: Duration = Duration::from_secs(3);

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Sub::Consume(args)) => consume(args),
        None => match run(cli.run) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("fault: error: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// What each event is and how it fails

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    id: u64,
    key: String,
    seq: u64,
}

/// The injected outcome of an event, a pure function of its id and the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    /// Fails transiently on this many attempts, then succeeds.
    Transient(u32),
    /// Always fails transiently: retries exhausted, dead-lettered.
    Exhausted,
    /// Fails permanently: dead-lettered after one attempt.
    Permanent,
}

impl Fate {
    fn of(id: u64, seed: u64) -> Fate {
        let h = splitmix64(id ^ seed.rotate_left(29));
        match h % 1000 {
            0..5 => Fate::Permanent,
            5..10 => Fate::Exhausted,
            10..55 => Fate::Transient(1 + ((h >> 32) % 2) as u32),
            _ => Fate::Ok,
        }
    }

    fn dead_lettered(self) -> bool {
        matches!(self, Fate::Exhausted | Fate::Permanent)
    }

    /// The attempt on which the side effect happens.
    fn success_attempt(self) -> Option<u32> {
        match self {
            Fate::Ok => Some(1),
            Fate::Transient(n) => Some(n + 1),
            Fate::Exhausted | Fate::Permanent => None,
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------------------------
// The consumer child

/// Appends ledger lines from a dedicated thread, one `sync_data` per batch; `append` returns
/// once its line is on disk.
struct Ledger {
    tx: mpsc::Sender<LedgerWrite>,
}

/// A line to append, and who to tell once it is on disk.
type LedgerWrite = (Vec<u8>, tokio::sync::oneshot::Sender<Result<(), String>>);

impl Ledger {
    fn open(path: &Path) -> std::io::Result<Ledger> {
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::channel::<LedgerWrite>();
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let buf: Vec<u8> = batch.iter().flat_map(|(l, _)| l.iter().copied()).collect();
                    let result = file
                        .write_all(&buf)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| e.to_string());
                    for (_, done) in batch {
                        let _ = done.send(result.clone());
                    }
                }
            })?;
        Ok(Ledger { tx })
    }

    async fn append(&self, line: String) -> Result<(), String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((line.into_bytes(), done))
            .map_err(|_| "ledger thread gone".to_owned())?;
        wait.await.map_err(|_| "ledger thread gone".to_owned())?
    }
}

struct FaultHandler {
    ledger: Ledger,
    seed: u64,
    pid: u32,
    /// Half the simulated work, done before and again after the side effect.
    half_work: Duration,
}

#[async_trait]
impl Handler for FaultHandler {
    type Event = Event;

    async fn handle(&self, m: &Message<Event>) -> Result<(), HandlerError> {
        let ev = m.event();
        match Fate::of(ev.id, self.seed) {
            Fate::Permanent => {
                return Err(HandlerError::permanent(format!(
                    "event {} is injected as permanently failing",
                    ev.id
                )));
            }
            Fate::Exhausted => {
                return Err(HandlerError::transient(format!(
                    "event {} is injected as always failing (attempt {})",
                    ev.id,
                    m.attempt()
                )));
            }
            Fate::Transient(n) if m.attempt() <= n => {
                return Err(HandlerError::transient(format!(
                    "event {} injected failure {} of {n}",
                    ev.id,
                    m.attempt()
                )));
            }
            Fate::Transient(_) | Fate::Ok => {}
        }
        tokio::time::sleep(self.half_work).await;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = format!(
            "{} {} {} {} {} {} {} {now_ms}\n",
            ev.id,
            ev.key,
            ev.seq,
            m.attempt(),
            self.pid,
            m.partition(),
            m.offset()
        );
        self.ledger
            .append(line)
            .await
            .map_err(|e| HandlerError::transient(format!("ledger write failed: {e}")))?;
        tokio::time::sleep(self.half_work).await;
        Ok(())
    }
}

fn consume(args: ConsumeArgs) -> i32 {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consume: cannot start the runtime: {e}");
            return 2;
        }
    };
    match runtime.block_on(consume_async(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("consume: {e}");
            1
        }
    }
}

async fn consume_async(args: ConsumeArgs) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::signal::unix::{SignalKind, signal};
    // Catch SIGTERM/SIGINT from the start (a signal before `run` polls its shutdown future is
    // kept, not fatal); the first status line tells the runner they are caught.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let handler = FaultHandler {
        ledger: Ledger::open(&args.ledger)?,
        seed: args.seed,
        pid: std::process::id(),
        half_work: Duration::from_millis(args.work_ms) / 2,
    };
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(&args.bootstrap)
        .group_id(&args.group)
        .topic(&args.topic)
        .ordering(Ordering::Key)
        .max_in_flight(args.max_in_flight)
        .retry_policy(RetryPolicy::fixed(
            Duration::from_millis(50),
            MAX_ATTEMPTS - 1,
        ))
        .commit_interval(COMMIT_INTERVAL)
        .shutdown_timeout(Duration::from_secs(20))
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500");
    if let Some(url) = &args.redis_url {
        let store = RedisIdempotencyStore::builder(url.as_str())
            .key_prefix("fault:")
            .build()
            .await?;
        builder = builder
            .idempotency(
                Arc::new(store),
                DedupKey::from_fn(|m: &Message<Event>| Some(m.event().id.to_string())),
            )
            .idempotency_lease(LEASE);
    }
    let consumer = builder.build()?;
    let monitor = consumer.monitor();
    // A status line every 500 ms; the runner stops the last consumer only once it is idle.
    let status_monitor = monitor.clone();
    let status = tokio::spawn(async move {
        loop {
            println!(
                "{}",
                serde_json::json!({ "status": snapshot_json(&status_monitor) })
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // The state the consumer was in when told to stop: the runner stops the last one only
        // once everything is handled and committed, so this must be idle and unpaused.
        println!(
            "{}",
            serde_json::json!({ "snapshot": snapshot_json(&monitor) })
        );
    };
    let result = consumer.run(shutdown).await;
    status.abort();
    let report = result?;
    println!(
        "{}",
        serde_json::json!({ "exited": "clean", "abandoned": report.abandoned })
    );
    Ok(())
}

fn snapshot_json(monitor: &kourier::ConsumerMonitor) -> serde_json::Value {
    let s = monitor.snapshot();
    serde_json::json!({
        "in_flight": s.in_flight,
        "buffered_records": s.buffered_records,
        "buffered_bytes": s.buffered_bytes,
        "assigned": s.assigned,
        "paused": s.paused,
    })
}

// ---------------------------------------------------------------------------------------------
// The runner

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn log(msg: impl AsRef<str>) {
    eprintln!("fault: {}", msg.as_ref());
}

fn run(mut args: RunArgs) -> BoxResult<bool> {
    let started = Instant::now();
    let broker_restarts = args
        .broker_restarts
        .unwrap_or(if args.clean_restarts { 0 } else { 1 });
    let redis_outages =
        args.redis_outages
            .unwrap_or(if args.clean_restarts || args.no_idempotency {
                0
            } else {
                1
            });
    if args.clean_restarts && (broker_restarts > 0 || redis_outages > 0) {
        return Err(
            "--clean-restarts runs only clean consumer restarts (0 duplicates expected); \
                    it takes no --broker-restarts or --redis-outages"
                .into(),
        );
    }
    if args.events == 0 || args.partitions < 1 || args.keys == 0 || args.max_in_flight == 0 {
        return Err("--events, --partitions, --keys and --max-in-flight must be positive".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    args.seed = Some(seed);
    let use_store = !args.clean_restarts && !args.no_idempotency;
    if !use_store && redis_outages > 0 {
        return Err("--redis-outages needs the idempotency store".into());
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let stamp = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kourier-fault-{stamp}")),
    };
    std::fs::create_dir_all(&work_dir)?;
    let topic = format!("kourier-fault-{stamp}");
    let dlt = format!("{topic}.dlt");
    let group = format!("{topic}-group");
    log(format!(
        "seed={seed} events={} partitions={} keys={} max_in_flight={} mode={} bootstrap={} work_dir={}",
        args.events,
        args.partitions,
        args.keys,
        args.max_in_flight,
        if args.clean_restarts {
            "clean-restarts (SIGTERM, no idempotency store)"
        } else {
            "sigkill"
        },
        args.bootstrap,
        work_dir.display()
    ));

    let kafka = Kafka::new(&args.bootstrap, &group)?;
    kafka.require()?;

    let broker = if broker_restarts > 0 {
        match BrokerControl::resolve(args.broker_control.as_deref(), &args.bootstrap) {
            Ok(b) => Some(b),
            Err(why) => {
                log(format!("broker restarts SKIPPED: {why}"));
                None
            }
        }
    } else {
        None
    };
    let broker_restarts = if broker.is_some() { broker_restarts } else { 0 };

    let mut redis = if use_store {
        Some(RedisServer::start(&work_dir)?)
    } else {
        None
    };

    // Topics and events.
    rt.block_on(kafka.create_topics(&[&topic, &dlt], args.partitions))?;
    let produce_started = Instant::now();
    let events = make_events(args.events, args.keys, &mut rng);
    rt.block_on(kafka.produce(&topic, &events))?;
    let log_end = kafka.log_end(&topic, args.partitions)?;
    let fates: Vec<Fate> = (0..args.events).map(|id| Fate::of(id, seed)).collect();
    let expected_effects = fates.iter().filter(|f| !f.dead_lettered()).count();
    log(format!(
        "produced {} events to {topic} in {:.1?} (log end {:?}); expecting {} effects and {} dead letters",
        events.len(),
        produce_started.elapsed(),
        log_end,
        expected_effects,
        fates.len() - expected_effects
    ));

    // The fault plan: kinds in random order, each at a random point of progress.
    let mut plan: Vec<FaultKind> = std::iter::repeat_n(FaultKind::Kill, args.kills as usize)
        .chain(std::iter::repeat_n(
            FaultKind::Broker,
            broker_restarts as usize,
        ))
        .chain(std::iter::repeat_n(
            FaultKind::Redis,
            redis_outages as usize,
        ))
        .collect();
    rng.shuffle(&mut plan);
    // Faults at random points of the first 60 % of the effects: each one's recovery takes
    // seconds while records keep flowing, so later faults still meet a busy consumer.
    let slots = plan.len() as f64;
    let triggers: Vec<f64> = (0..plan.len())
        .map(|i| (i as f64 + 0.2 + rng.f64() * 0.6) / slots * 0.6)
        .collect();

    let work_ms = args.work_ms.unwrap_or_else(|| {
        let target_secs = (18.0 * plan.len() as f64).max(20.0);
        let per_record_ms =
            args.max_in_flight as f64 * target_secs * 1000.0 / expected_effects.max(1) as f64;
        (per_record_ms - 10.0).clamp(0.0, 200.0) as u64
    });
    log(format!(
        "faults planned: {:?} at {:?} of the effects; simulated work {work_ms} ms per record",
        plan,
        triggers
            .iter()
            .map(|t| format!("{:.0}%", t * 100.0))
            .collect::<Vec<_>>()
    ));

    let consumer_args = ConsumerSpawn {
        exe: std::env::current_exe()?,
        bootstrap: args.bootstrap.clone(),
        topic: topic.clone(),
        group: group.clone(),
        redis_url: redis.as_ref().map(RedisServer::url),
        seed,
        max_in_flight: args.max_in_flight,
        work_ms,
        work_dir: work_dir.clone(),
    };
    let mut ledgers = Ledgers::new(args.events as usize);
    let mut problems: Vec<String> = Vec::new();
    let mut children: Vec<ChildRecord> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let consume_started = Instant::now();
    let mut current = consumer_args.spawn(0, &mut ledgers)?;
    let mut kills_done = 0u32;
    // Dead letters that may be written twice: those not committed at a kill or broker restart.
    let mut dlt_allowance = 0u64;
    let mut broker_commits: Option<Vec<i64>> = None;
    let mut broker_done = 0u32;
    let mut redis_done = 0u32;

    let mut watch = Watch {
        kafka: &kafka,
        topic: topic_of(&log_end, &topic),
        dlt: dlt.clone(),
        ledgers: &mut ledgers,
        log_end: &log_end,
        expected_effects,
        deadline,
    };
    for (i, fault) in plan.iter().enumerate() {
        let target = (triggers[i] * expected_effects as f64) as usize;
        watch.wait_progress(
            target,
            &mut current,
            &consumer_args,
            &mut children,
            &mut problems,
        )?;
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        let at = watch.ledgers.distinct;
        match fault {
            FaultKind::Kill => {
                let child_index = current.index;
                let (status, how) = if args.clean_restarts {
                    (current.terminate(Duration::from_secs(60))?, "SIGTERM")
                } else {
                    (current.kill()?, "SIGKILL")
                };
                watch.ledgers.poll();
                // Commits cannot move any more: what the next consumer will redo is fixed.
                let commits = watch.commits_retrying();
                let exposure = commits
                    .as_ref()
                    .map(|c| watch.uncommitted_effects_of(child_index, c));
                let letters = watch.uncommitted_dead_letters(commits.as_deref());
                dlt_allowance += letters;
                log(format!(
                    "kill {}/{}: {how} consumer #{child_index} at {at}/{expected_effects} effects ({status}); \
                     not yet committed: {} of its effects, {letters} dead letters",
                    kills_done + 1,
                    args.kills,
                    exposure.map_or("unknown (commits unreadable)".into(), |n| n.to_string())
                ));
                if args.clean_restarts && !status.success() {
                    problems.push(format!(
                        "consumer #{child_index} did not shut down cleanly on SIGTERM: {status}"
                    ));
                }
                children.push(ChildRecord {
                    index: child_index,
                    killed: !args.clean_restarts,
                    uncommitted_at_kill: exposure,
                });
                kills_done += 1;
                current = consumer_args.spawn(child_index + 1, watch.ledgers)?;
            }
            FaultKind::Broker => {
                let broker = broker.as_ref().expect("planned only with a broker control");
                log(format!(
                    "broker restart {}/{broker_restarts}: at {at}/{expected_effects} effects",
                    broker_done + 1
                ));
                // Commits before the kill: if the consumer's session times out while the broker
                // is down, it loses its partitions and redoes everything from here on.
                broker_commits = watch.commits_retrying();
                let took = broker.kill_and_restart(Duration::from_secs(args.broker_down_secs))?;
                log(format!("broker back after {took:.1?}"));
                broker_done += 1;
            }
            FaultKind::Redis => {
                let redis = redis.as_mut().expect("planned only with a store");
                log(format!(
                    "redis outage {}/{redis_outages}: killing the idempotency Redis for {} s at {at}/{expected_effects} effects",
                    redis_done + 1,
                    args.redis_down_secs
                ));
                redis.kill();
                std::thread::sleep(Duration::from_secs(args.redis_down_secs));
                redis.restart()?;
                log("redis restarted empty on the same port: done marks are gone");
                redis_done += 1;
            }
        }
        // Let the consumer recover before the next fault: it commits again and, after a Redis
        // restart, commits past every effect whose done mark was lost.
        watch.settle(
            *fault,
            &mut current,
            &consumer_args,
            &mut children,
            &mut problems,
        )?;
        if *fault == FaultKind::Broker {
            // Redelivered records skip their effects (the store says done), but dead letters
            // are not marked done: those the lost partitions had not committed are written
            // again.
            let letters = watch.uncommitted_dead_letters(broker_commits.take().as_deref());
            log(format!(
                "dead letters not committed before the broker restart: {letters}"
            ));
            dlt_allowance += letters;
        }
    }

    log("faults done; waiting until every event is handled and committed");
    let complete =
        watch.wait_complete(&mut current, &consumer_args, &mut children, &mut problems)?;
    let consume_took = consume_started.elapsed();
    if !complete {
        problems.push(format!(
            "not complete before the deadline/stall: {}/{} effects, commits {:?} of log end {:?}",
            watch.ledgers.distinct,
            expected_effects,
            watch.kafka.committed(&watch.topic).ok(),
            log_end
        ));
    }
    let last_index = current.index;
    let status = current.terminate(Duration::from_secs(60))?;
    if !status.success() {
        problems.push(format!(
            "the last consumer #{last_index} did not shut down cleanly: {status}"
        ));
    }
    children.push(ChildRecord {
        index: last_index,
        killed: false,
        uncommitted_at_kill: None,
    });
    watch.ledgers.poll();
    let snapshot = read_last(&consumer_args.out_path(last_index), "snapshot");

    // ------------------------------------------------------------------ checks
    let committed = kafka.committed(&topic_of(&log_end, &topic));
    let letters = kafka.read_all(&dlt, args.partitions)?;
    let report = check(&Inputs {
        events: &events,
        fates: &fates,
        ledgers: &ledgers,
        letters: &letters,
        committed: committed.as_ref().ok(),
        log_end: &log_end,
        snapshot: snapshot.as_ref(),
        children: &children,
        max_in_flight: args.max_in_flight,
        partitions: args.partitions,
        // After clean restarts nothing may repeat, dead letters included.
        dlt_allowance: if args.clean_restarts {
            0
        } else {
            dlt_allowance
        },
        redeliveries: kills_done + broker_done,
    });
    problems.extend(report.problems.iter().cloned());

    let bound = if args.clean_restarts {
        0
    } else {
        u64::from(kills_done) * args.max_in_flight as u64
    };
    if report.duplicates > bound {
        problems.push(format!(
            "{} duplicate side effects exceed the bound {bound}",
            report.duplicates
        ));
    }
    let pass = problems.is_empty();
    log(format!(
        "consumed in {consume_took:.1?}; {} consumer processes; effects {} (distinct {}), dead letters {} (distinct {}), duplicate dead letters {}",
        children.len(),
        ledgers.effects.len(),
        ledgers.distinct,
        letters.len(),
        report.dead_lettered,
        report.dlt_duplicates
    ));
    log(format!(
        "per kill: uncommitted effects / duplicates of them: {}; duplicate dead letters {} (allowed: {} uncommitted at kills and broker restarts)",
        report.per_kill, report.dlt_duplicates, dlt_allowance
    ));
    for p in &problems {
        log(format!("PROBLEM: {p}"));
    }
    log(format!("total time {:.1?}", started.elapsed()));

    // Cleanup: the Redis, the topics, the work directory (kept on failure).
    drop(redis.take());
    if pass && !args.keep {
        if let Err(e) = rt.block_on(kafka.delete_topics(&[&topic, &dlt])) {
            log(format!("could not delete the topics: {e}"));
        }
        if args.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
    } else {
        log(format!(
            "kept topic {topic}, group {group} and work dir {}",
            work_dir.display()
        ));
    }

    println!(
        "events={} lost={} duplicates={} bound={bound} dead_lettered={} kills={kills_done} broker_restarts={broker_done} redis_outages={redis_done} verdict={}",
        args.events,
        report.lost,
        report.duplicates,
        report.dead_lettered,
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

fn topic_of(log_end: &[i64], topic: &str) -> (String, i32) {
    (topic.to_owned(), log_end.len() as i32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    Kill,
    Broker,
    Redis,
}

fn make_events(n: u64, keys: u32, rng: &mut fastrand::Rng) -> Vec<Event> {
    let mut next_seq = vec![0u64; keys as usize];
    (0..n)
        .map(|id| {
            let k = rng.usize(..keys as usize);
            let seq = next_seq[k];
            next_seq[k] += 1;
            Event {
                id,
                key: format!("k{k:04}"),
                seq,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Consumer processes

struct ConsumerSpawn {
    exe: PathBuf,
    bootstrap: String,
    topic: String,
    group: String,
    redis_url: Option<String>,
    seed: u64,
    max_in_flight: usize,
    work_ms: u64,
    work_dir: PathBuf,
}

impl ConsumerSpawn {
    fn ledger_path(&self, index: usize) -> PathBuf {
        self.work_dir.join(format!("ledger-{index:02}.log"))
    }

    fn out_path(&self, index: usize) -> PathBuf {
        self.work_dir.join(format!("consumer-{index:02}.out"))
    }

    fn spawn(&self, index: usize, ledgers: &mut Ledgers) -> BoxResult<ConsumerProc> {
        let ledger = self.ledger_path(index);
        ledgers.add(index, ledger.clone());
        let mut cmd = Command::new(&self.exe);
        cmd.arg("consume")
            .args(["--bootstrap", &self.bootstrap])
            .args(["--topic", &self.topic])
            .args(["--group", &self.group])
            .args(["--seed", &self.seed.to_string()])
            .args(["--max-in-flight", &self.max_in_flight.to_string()])
            .args(["--work-ms", &self.work_ms.to_string()])
            .arg("--ledger")
            .arg(&ledger)
            .stdin(Stdio::null())
            .stdout(File::create(self.out_path(index))?)
            .stderr(File::create(
                self.work_dir.join(format!("consumer-{index:02}.log")),
            )?);
        if let Some(url) = &self.redis_url {
            cmd.args(["--redis-url", url]);
        }
        let child = cmd.spawn()?;
        log(format!("started consumer #{index} (pid {})", child.id()));
        Ok(ConsumerProc {
            index,
            child,
            out: self.out_path(index),
        })
    }
}

struct ConsumerProc {
    index: usize,
    child: Child,
    /// Its stdout: JSON status lines.
    out: PathBuf,
}

impl ConsumerProc {
    /// The last line of its stdout carrying `field` (`status` or `snapshot`).
    fn last(&self, field: &str) -> Option<serde_json::Value> {
        read_last(&self.out, field)
    }

    /// Waits until it printed a status line (its signal handlers are installed then).
    fn wait_ready(&mut self, timeout: Duration) -> BoxResult<()> {
        let until = Instant::now() + timeout;
        while self.last("status").is_none() {
            if self.child.try_wait()?.is_some() || Instant::now() >= until {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kill(&mut self) -> BoxResult<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after that).
    fn terminate(&mut self, grace: Duration) -> BoxResult<ExitStatus> {
        self.wait_ready(Duration::from_secs(30))?;
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        signal(self.child.id(), "TERM")?;
        let until = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= until {
                log(format!(
                    "consumer #{} ignored SIGTERM for {grace:?}; killing it",
                    self.index
                ));
                return self.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsumerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) -> BoxResult<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        return Err(format!("kill -{sig} {pid} failed: {status}").into());
    }
    Ok(())
}

/// What became of one consumer process.
struct ChildRecord {
    index: usize,
    /// SIGKILLed (its in-flight records may repeat).
    killed: bool,
    /// Its effects at offsets its group had not committed when it died.
    uncommitted_at_kill: Option<u64>,
}

/// The value of `field` in the last JSON line of `path` that has it.
fn read_last(path: &Path, field: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get(field).cloned())
}

/// Whether a consumer status shows it idle: every partition assigned, none paused, nothing
/// in flight or buffered.
fn idle(status: &serde_json::Value, partitions: i32) -> bool {
    status["paused"].as_array().is_some_and(Vec::is_empty)
        && status["assigned"]
            .as_array()
            .is_some_and(|a| a.len() == partitions as usize)
        && status["in_flight"] == 0
        && status["buffered_records"] == 0
}

// ---------------------------------------------------------------------------------------------
// Watching progress

/// Drives waits: reads the ledgers and commits, restarts a consumer that died on its own.
struct Watch<'a> {
    kafka: &'a Kafka,
    /// The source topic and its partition count.
    topic: (String, i32),
    dlt: String,
    ledgers: &'a mut Ledgers,
    log_end: &'a [i64],
    expected_effects: usize,
    deadline: Instant,
}

/// How long the consumer may make no progress at all before the runner stops waiting.
const STALL: Duration = Duration::from_secs(120);

impl Watch<'_> {
    /// A consumer that exited although nobody stopped it is a failure; start another so the
    /// run can still check for loss.
    fn check_child(
        &mut self,
        current: &mut ConsumerProc,
        spawn: &ConsumerSpawn,
        children: &mut Vec<ChildRecord>,
        problems: &mut Vec<String>,
    ) -> BoxResult<()> {
        if let Some(status) = current.child.try_wait()? {
            let index = current.index;
            problems.push(format!(
                "consumer #{index} exited on its own: {status} (see {})",
                spawn
                    .work_dir
                    .join(format!("consumer-{index:02}.log"))
                    .display()
            ));
            log(format!(
                "consumer #{index} exited on its own ({status}); starting another"
            ));
            children.push(ChildRecord {
                index,
                killed: true,
                uncommitted_at_kill: None,
            });
            *current = spawn.spawn(index + 1, self.ledgers)?;
        }
        Ok(())
    }

    fn wait_progress(
        &mut self,
        target: usize,
        current: &mut ConsumerProc,
        spawn: &ConsumerSpawn,
        children: &mut Vec<ChildRecord>,
        problems: &mut Vec<String>,
    ) -> BoxResult<()> {
        let mut last = (self.ledgers.distinct, Instant::now());
        while self.ledgers.distinct < target.min(self.expected_effects) {
            if Instant::now() >= self.deadline || last.1.elapsed() > STALL {
                log(format!(
                    "no progress to {target} effects (at {}); running the fault anyway",
                    self.ledgers.distinct
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
            self.ledgers.poll();
            if self.ledgers.distinct != last.0 {
                last = (self.ledgers.distinct, Instant::now());
            }
            self.check_child(current, spawn, children, problems)?;
        }
        Ok(())
    }

    /// Waits until the consumer recovered from `fault`: its commits pass every effect made
    /// so far. Only then is the next fault injected, so the windows of records a fault can
    /// make repeat never overlap: a Redis restart (done marks lost) during the redelivery
    /// that a kill or a lost assignment causes would repeat all of that window.
    fn settle(
        &mut self,
        fault: FaultKind,
        current: &mut ConsumerProc,
        spawn: &ConsumerSpawn,
        children: &mut Vec<ChildRecord>,
        problems: &mut Vec<String>,
    ) -> BoxResult<()> {
        let started = Instant::now();
        self.ledgers.poll();
        let mut max = vec![-1i64; self.log_end.len()];
        for e in &self.ledgers.effects {
            let p = e.partition as usize;
            max[p] = max[p].max(e.offset);
        }
        let limit = Duration::from_secs(180);
        loop {
            self.check_child(current, spawn, children, problems)?;
            self.ledgers.poll();
            let commits = self.kafka.committed(&self.topic).ok();
            if commits
                .as_ref()
                .is_some_and(|c| max.iter().zip(c).all(|(m, c)| c > m))
            {
                log(format!(
                    "recovered from the {fault:?} fault after {:.1?}: commits pass all earlier effects ({} effects now)",
                    started.elapsed(),
                    self.ledgers.distinct
                ));
                return Ok(());
            }
            if started.elapsed() > limit || Instant::now() >= self.deadline {
                problems.push(format!(
                    "the consumer did not commit past its earlier effects within {limit:?} after the \
                     {fault:?} fault (commits {commits:?}, highest effected offsets {max:?})"
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every expected effect is in the ledgers, the commits reached the log end
    /// and the consumer reports itself idle; false on deadline or stall.
    fn wait_complete(
        &mut self,
        current: &mut ConsumerProc,
        spawn: &ConsumerSpawn,
        children: &mut Vec<ChildRecord>,
        problems: &mut Vec<String>,
    ) -> BoxResult<bool> {
        let mut last = (self.ledgers.distinct, None::<Vec<i64>>, Instant::now());
        loop {
            self.check_child(current, spawn, children, problems)?;
            self.ledgers.poll();
            let commits = self.kafka.committed(&self.topic).ok();
            if self.ledgers.distinct >= self.expected_effects
                && commits.as_deref() == Some(self.log_end)
                && current
                    .last("status")
                    .is_some_and(|s| idle(&s, self.topic.1))
            {
                return Ok(true);
            }
            if self.ledgers.distinct != last.0 || commits != last.1 {
                last = (self.ledgers.distinct, commits, Instant::now());
            }
            if Instant::now() >= self.deadline || last.2.elapsed() > STALL {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The group's commits, retried for a few seconds while the broker does not answer.
    fn commits_retrying(&self) -> Option<Vec<i64>> {
        for _ in 0..20 {
            if let Ok(c) = self.kafka.committed(&self.topic) {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    /// Effects of consumer `index` at offsets not covered by `commits`.
    fn uncommitted_effects_of(&self, index: usize, commits: &[i64]) -> u64 {
        self.ledgers
            .effects
            .iter()
            .filter(|e| e.child == index && e.offset >= commits[e.partition as usize])
            .count() as u64
    }

    /// Events in the dead-letter topic now whose source offsets `commits` does not cover
    /// (all of them when the commits are unknown).
    fn uncommitted_dead_letters(&self, commits: Option<&[i64]>) -> u64 {
        let letters = match self.kafka.read_all(&self.dlt, self.topic.1) {
            Ok(l) => l,
            Err(e) => {
                log(format!("cannot read the dead letters: {e}"));
                return 0;
            }
        };
        let mut ids: Vec<u64> = letters
            .iter()
            .filter(|l| match (commits, l.source) {
                (Some(c), Some((p, o))) => c.get(p as usize).is_none_or(|&c| o >= c),
                _ => true,
            })
            .filter_map(|l| l.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Ledgers

#[derive(Debug, Clone)]
struct Effect {
    id: u64,
    key: String,
    seq: u64,
    attempt: u32,
    partition: i32,
    offset: i64,
    /// Which consumer process wrote it.
    child: usize,
}

struct LedgerFile {
    child: usize,
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

/// Every ledger line read so far, in write order (consumer processes one after another).
struct Ledgers {
    files: Vec<LedgerFile>,
    effects: Vec<Effect>,
    /// Effects per id.
    count: Vec<u32>,
    /// Ids with at least one effect.
    distinct: usize,
    malformed: Vec<String>,
}

impl Ledgers {
    fn new(events: usize) -> Ledgers {
        Ledgers {
            files: Vec::new(),
            effects: Vec::new(),
            count: vec![0; events],
            distinct: 0,
            malformed: Vec::new(),
        }
    }

    fn add(&mut self, child: usize, path: PathBuf) {
        self.files.push(LedgerFile {
            child,
            path,
            pos: 0,
            partial: Vec::new(),
        });
    }

    /// Reads what was appended since the last call (complete lines only).
    fn poll(&mut self) {
        for f in &mut self.files {
            let Ok(mut file) = File::open(&f.path) else {
                continue;
            };
            if file.seek(SeekFrom::Start(f.pos)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).is_err() {
                continue;
            }
            f.pos += buf.len() as u64;
            f.partial.extend_from_slice(&buf);
            let Some(end) = f.partial.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let complete: Vec<u8> = f.partial.drain(..=end).collect();
            for line in String::from_utf8_lossy(&complete).lines() {
                match parse_effect(line, f.child) {
                    Some(e) if (e.id as usize) < self.count.len() => {
                        let c = &mut self.count[e.id as usize];
                        if *c == 0 {
                            self.distinct += 1;
                        }
                        *c += 1;
                        self.effects.push(e);
                    }
                    _ => self.malformed.push(line.to_owned()),
                }
            }
        }
    }
}

fn parse_effect(line: &str, child: usize) -> Option<Effect> {
    let mut it = line.split(' ');
    let id = it.next()?.parse().ok()?;
    let key = it.next()?.to_owned();
    let seq = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let _pid: u32 = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    Some(Effect {
        id,
        key,
        seq,
        attempt,
        partition,
        offset,
        child,
    })
}

// ---------------------------------------------------------------------------------------------
// The checker

struct Letter {
    id: Option<u64>,
    /// The source partition and offset, from the provenance headers.
    source: Option<(i32, i64)>,
    kind: Option<String>,
    attempts: Option<String>,
}

struct Inputs<'a> {
    events: &'a [Event],
    fates: &'a [Fate],
    ledgers: &'a Ledgers,
    letters: &'a [Letter],
    committed: Option<&'a Vec<i64>>,
    log_end: &'a [i64],
    snapshot: Option<&'a serde_json::Value>,
    children: &'a [ChildRecord],
    max_in_flight: usize,
    partitions: i32,
    /// Dead letters that a kill or broker restart may have repeated.
    dlt_allowance: u64,
    /// Kills and broker restarts: how often one record can be redelivered at most.
    redeliveries: u32,
}

struct Report {
    lost: u64,
    duplicates: u64,
    dlt_duplicates: u64,
    dead_lettered: u64,
    per_kill: String,
    problems: Vec<String>,
}

fn check(i: &Inputs<'_>) -> Report {
    let mut problems = Vec::new();
    let n = i.events.len();
    let first_examples = |problems: &mut Vec<String>, what: &str, ids: &[u64]| {
        if !ids.is_empty() {
            problems.push(format!(
                "{what}: {} (e.g. ids {:?})",
                ids.len(),
                &ids[..ids.len().min(10)]
            ));
        }
    };

    // Dead letters per id.
    let mut letters_of = vec![0u32; n];
    let mut bad_letters = Vec::new();
    let mut wrong_provenance = Vec::new();
    for l in i.letters {
        let Some(id) = l.id.filter(|&id| (id as usize) < n) else {
            bad_letters.push(u64::MAX);
            continue;
        };
        letters_of[id as usize] += 1;
        let (kind, attempts) = match i.fates[id as usize] {
            Fate::Permanent => ("permanent", "1".to_owned()),
            Fate::Exhausted => ("retries-exhausted", MAX_ATTEMPTS.to_string()),
            _ => ("", String::new()),
        };
        if l.kind.as_deref() != Some(kind) || l.attempts.as_deref() != Some(attempts.as_str()) {
            wrong_provenance.push(id);
        }
    }
    first_examples(
        &mut problems,
        "dead letters whose value is not an event",
        &bad_letters,
    );

    let lost: Vec<u64> = (0..n as u64)
        .filter(|&id| i.ledgers.count[id as usize] == 0 && letters_of[id as usize] == 0)
        .collect();
    first_examples(
        &mut problems,
        "LOST (neither in the ledger nor dead-lettered)",
        &lost,
    );
    let unexpected_letters: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] > 0 && !i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "dead-lettered but expected to succeed",
        &unexpected_letters,
    );
    let missing_letters: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] == 0 && i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "expected in the dead-letter topic but missing",
        &missing_letters,
    );
    first_examples(
        &mut problems,
        "dead letters with a wrong failure kind or attempt count",
        &wrong_provenance,
    );
    let effects_of_dead: Vec<u64> = (0..n as u64)
        .filter(|&id| i.ledgers.count[id as usize] > 0 && i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "side effects of events that must always fail",
        &effects_of_dead,
    );

    // Each effect: the right key, sequence number and attempt.
    let mut wrong_effects = Vec::new();
    for e in &i.ledgers.effects {
        let ev = &i.events[e.id as usize];
        if e.key != ev.key
            || e.seq != ev.seq
            || Some(e.attempt) != i.fates[e.id as usize].success_attempt()
        {
            wrong_effects.push(e.id);
        }
    }
    first_examples(
        &mut problems,
        "effects with a wrong key, seq or attempt",
        &wrong_effects,
    );
    if !i.ledgers.malformed.is_empty() {
        problems.push(format!(
            "{} malformed ledger lines, e.g. {:?}",
            i.ledgers.malformed.len(),
            &i.ledgers.malformed[..i.ledgers.malformed.len().min(3)]
        ));
    }

    // Per key, first effects in strictly increasing sequence order.
    let mut seen = vec![false; n];
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut order_violations = Vec::new();
    // Duplicates, attributed to the process that wrote the previous effect of the same id.
    let mut previous_child: Vec<Option<usize>> = vec![None; n];
    let mut duplicates_from: BTreeMap<usize, u64> = BTreeMap::new();
    for e in &i.ledgers.effects {
        let id = e.id as usize;
        if !seen[id] {
            seen[id] = true;
            if let Some(&prev) = last_seq.get(e.key.as_str())
                && e.seq <= prev
            {
                order_violations.push(e.id);
            }
            last_seq.insert(e.key.as_str(), e.seq);
        } else if let Some(prev) = previous_child[id] {
            *duplicates_from.entry(prev).or_default() += 1;
        }
        previous_child[id] = Some(e.child);
    }
    first_examples(
        &mut problems,
        "per-key order violations (first effect with a seq not above the key's previous)",
        &order_violations,
    );
    let duplicates: u64 = duplicates_from.values().sum();
    let mut per_kill = Vec::new();
    for c in i.children {
        let dups = duplicates_from.get(&c.index).copied().unwrap_or(0);
        if c.killed {
            let allowed = c
                .uncommitted_at_kill
                .map_or(i.max_in_flight as u64, |u| u.min(i.max_in_flight as u64));
            per_kill.push(format!(
                "#{}: {}/{dups}",
                c.index,
                c.uncommitted_at_kill
                    .map_or("?".to_owned(), |u| u.to_string())
            ));
            if dups > allowed {
                problems.push(format!(
                    "consumer #{} was killed with {:?} uncommitted effects (max_in_flight {}), \
                     but {dups} of its effects were repeated",
                    c.index, c.uncommitted_at_kill, i.max_in_flight
                ));
            }
        } else if dups > 0 {
            problems.push(format!(
                "{dups} effects of consumer #{}, which was not killed, were repeated",
                c.index
            ));
        }
    }

    // Commits at the log end.
    match i.committed {
        Some(c) if c.as_slice() == i.log_end => {}
        Some(c) => problems.push(format!(
            "committed offsets {c:?} are not the log end {:?}",
            i.log_end
        )),
        None => problems.push("committed offsets could not be read".into()),
    }

    // The last consumer's state when it was told to stop.
    match i.snapshot {
        None => problems.push("the last consumer printed no snapshot".into()),
        Some(s) => {
            let paused = s["paused"].as_array().map_or(usize::MAX, Vec::len);
            let assigned = s["assigned"].as_array().map_or(0, Vec::len);
            if paused != 0
                || s["in_flight"] != 0
                || s["buffered_records"] != 0
                || assigned != i.partitions as usize
            {
                problems.push(format!(
                    "the last consumer was not idle with all partitions unpaused: {s}"
                ));
            }
        }
    }

    let dlt_duplicates = letters_of
        .iter()
        .map(|&c| u64::from(c.saturating_sub(1)))
        .sum();
    if dlt_duplicates > i.dlt_allowance {
        problems.push(format!(
            "{dlt_duplicates} duplicate dead letters, but only {} were uncommitted at kills and broker restarts",
            i.dlt_allowance
        ));
    }
    let looping: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] > i.redeliveries + 1)
        .collect();
    first_examples(
        &mut problems,
        "dead-lettered more often than there were redeliveries",
        &looping,
    );
    Report {
        lost: lost.len() as u64,
        duplicates,
        dlt_duplicates,
        dead_lettered: letters_of.iter().filter(|&&c| c > 0).count() as u64,
        per_kill: if per_kill.is_empty() {
            "none".into()
        } else {
            per_kill.join(", ")
        },
        problems,
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka

struct Kafka {
    bootstrap: String,
    /// Reads the group's commits (never joins it) and metadata.
    offsets: BaseConsumer,
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

impl Kafka {
    fn new(bootstrap: &str, group: &str) -> BoxResult<Kafka> {
        let offsets: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Kafka {
            bootstrap: bootstrap.to_owned(),
            offsets,
        })
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn require(&self) -> BoxResult<()> {
        let brokers = self
            .offsets
            .fetch_metadata(None, KAFKA_TIMEOUT)
            .map_err(|e| {
                format!(
                    "Kafka is not reachable at {} ({e}); start it with `scripts/services up`",
                    self.bootstrap
                )
            })?
            .brokers()
            .len();
        if brokers == 0 {
            return Err(format!("Kafka at {} lists no brokers", self.bootstrap).into());
        }
        Ok(())
    }

    async fn create_topics(&self, names: &[&str], partitions: i32) -> BoxResult<()> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("create topic {t}: {code}").into()),
            }
        }
        // Wait until every partition has a leader.
        let until = Instant::now() + Duration::from_secs(30);
        for name in names {
            loop {
                let ready = self
                    .offsets
                    .fetch_metadata(Some(name), KAFKA_TIMEOUT)
                    .ok()
                    .and_then(|m| {
                        m.topics().iter().find(|t| t.name() == *name).map(|t| {
                            t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    })
                    .unwrap_or(false);
                if ready {
                    break;
                }
                if Instant::now() > until {
                    return Err(format!("topic {name} not ready after 30 s").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    async fn delete_topics(&self, names: &[&str]) -> BoxResult<()> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
        admin.delete_topics(names, &options).await?;
        Ok(())
    }

    /// Produces every event (acks=all, idempotent: per-key order holds) and waits for all
    /// acknowledgements.
    async fn produce(&self, topic: &str, events: &[Event]) -> BoxResult<()> {
        let producer: FutureProducer = self
            .config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("message.timeout.ms", "60000")
            .create()?;
        let mut pending = Vec::with_capacity(events.len());
        for ev in events {
            let value = serde_json::to_vec(ev)?;
            let mut record = FutureRecord::to(topic).key(&ev.key).payload(&value);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(format!("produce to {topic}: {e}").into()),
                }
            }
        }
        for (id, delivery) in pending.into_iter().enumerate() {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(format!("event {id} not delivered: {e}").into()),
                Err(_) => return Err(format!("event {id}: delivery dropped").into()),
            }
        }
        Ok(())
    }

    /// The high watermark of each partition.
    fn log_end(&self, topic: &str, partitions: i32) -> BoxResult<Vec<i64>> {
        (0..partitions)
            .map(|p| {
                self.offsets
                    .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                    .map(|(_, high)| high)
                    .map_err(|e| format!("watermarks of {topic}/{p}: {e}").into())
            })
            .collect()
    }

    /// The group's committed offset of each partition (0 where nothing is committed).
    fn committed(&self, (topic, partitions): &(String, i32)) -> Result<Vec<i64>, KafkaError> {
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition_range(topic, 0, partitions - 1);
        let committed = self
            .offsets
            .committed_offsets(wanted, Duration::from_secs(5))?;
        let mut out = vec![0; *partitions as usize];
        for e in committed.elements_for_topic(topic) {
            if let Offset::Offset(o) = e.offset() {
                out[e.partition() as usize] = o;
            }
        }
        Ok(out)
    }

    /// Every record of `topic`, parsed as a dead letter.
    fn read_all(&self, topic: &str, partitions: i32) -> BoxResult<Vec<Letter>> {
        let reader: BaseConsumer = self
            .config()
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
        let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
        {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                let (low, high) = reader.fetch_watermarks(topic, p, KAFKA_TIMEOUT)?;
                if low < high {
                    tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
                    pending.insert(p, high);
                }
            }
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            reader.assign(&tpl)?;
        }
        let mut out = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            if Instant::now() > until {
                return Err(format!("reading {topic} timed out; left {pending:?}").into());
            }
            match reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(m)) => {
                    let Some(&end) = pending.get(&m.partition()) else {
                        continue;
                    };
                    let bytes = |name: &str| {
                        m.headers().and_then(|h| {
                            h.iter()
                                .filter(|h| h.key == name)
                                .last()
                                .and_then(|h| h.value)
                                .map(<[u8]>::to_vec)
                        })
                    };
                    let header =
                        |name: &str| bytes(name).map(|v| String::from_utf8_lossy(&v).into_owned());
                    let partition = bytes(dlt_headers::ORIGINAL_PARTITION)
                        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                        .map(i32::from_be_bytes);
                    let offset = bytes(dlt_headers::ORIGINAL_OFFSET)
                        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                        .map(i64::from_be_bytes);
                    out.push(Letter {
                        id: m
                            .payload()
                            .and_then(|v| serde_json::from_slice::<Event>(v).ok())
                            .map(|e| e.id),
                        source: partition.zip(offset),
                        kind: header(dlt_headers::FAILURE_KIND),
                        attempts: header(dlt_headers::ATTEMPTS),
                    });
                    if m.offset() + 1 >= end {
                        pending.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(format!("reading {topic}: {e}").into()),
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The idempotency Redis

/// A `redis-server` on a free loopback port, without persistence; killed on drop.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start(work_dir: &Path) -> BoxResult<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = RedisServer {
            port,
            dir: work_dir.to_owned(),
            child: None,
        };
        server.restart()?;
        log(format!("idempotency redis on 127.0.0.1:{port}"));
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port, empty, and waits for PING.
    fn restart(&mut self) -> BoxResult<()> {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}); install it with `apt-get install redis-server`")
            })?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("redis-server on port {} did not answer PING", self.port).into())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ---------------------------------------------------------------------------------------------
// The broker

/// Restarts the broker through the `scripts/services` that runs it.
struct BrokerControl {
    script: PathBuf,
}

impl BrokerControl {
    /// Accepts only a broker the script runs itself (not one it calls external), at the very
    /// address the run uses.
    fn resolve(script: Option<&Path>, bootstrap: &str) -> Result<BrokerControl, String> {
        let script = script.ok_or(
            "no broker control: set KOURIER_FAULT_BROKER_CONTROL (or --broker-control) to the \
             scripts/services that runs this broker (scripts/test does for a broker it started)",
        )?;
        let control = BrokerControl {
            script: script.to_owned(),
        };
        let (pid, address) = control.status()?;
        if address != bootstrap {
            return Err(format!(
                "{} runs the broker at {address}, but this run uses {bootstrap}",
                script.display()
            ));
        }
        log(format!(
            "broker control: {} (broker pid {pid} at {address})",
            script.display()
        ));
        Ok(control)
    }

    fn command(&self, arg: &str) -> Command {
        let mut c = Command::new(&self.script);
        // Never let a restart wipe the broker's data.
        c.arg(arg).env_remove("KOURIER_KAFKA_FRESH");
        c
    }

    /// `(pid, address)` from `scripts/services status kafka`: "kafka: running, pid N, ADDR, ...".
    fn status(&self) -> Result<(u32, String), String> {
        let out = self
            .command("status")
            .arg("kafka")
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let fields: Vec<&str> = text.split(", ").collect();
        match fields.as_slice() {
            ["kafka: running", pid, address, ..] => {
                let pid = pid
                    .strip_prefix("pid ")
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("unexpected status line {text:?}"))?;
                Ok((pid, (*address).to_owned()))
            }
            _ => Err(format!(
                "{} does not run this broker (status: {text:?}); a broker it calls external is \
                 never restarted",
                self.script.display()
            )),
        }
    }

    /// SIGKILLs the broker, waits `down`, starts it again; returns how long it was gone.
    fn kill_and_restart(&self, down: Duration) -> BoxResult<Duration> {
        let started = Instant::now();
        let (pid, _) = self.status()?;
        signal(pid, "KILL")?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        while proc_dir.exists() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        log(format!("broker pid {pid} killed; down for {down:?}"));
        std::thread::sleep(down);
        let out = self.command("kafka-start").output()?;
        if !out.status.success() {
            return Err(format!(
                "`{} kafka-start` failed: {}",
                self.script.display(),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            log(format!("  {line}"));
        }
        Ok(started.elapsed())
    }
}
