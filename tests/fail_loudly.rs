//! Issue 11, "fail loudly, never wedge" (delivery rules 13 and 14 in the crate docs), against the real broker and
//! Redis: startup checks (unreachable brokers, missing subscribed and dead-letter topics,
//! `MissingTopics::Wait`, `MissingTopics::create`), a topic deleted while consuming, the honest
//! shutdown report, plug-ins that panic on a record's path (codec, dedup-key function,
//! idempotency store, dead-letter sink, handler), the uncommitted-work bound and the stall
//! threshold, running health (`caught_up`), and the maximum broker outage.
//!
//! The outage test runs on librdkafka's in-process mock cluster: the shared broker advertises
//! its own address, so a proxy in front of it would be bypassed after bootstrap, and a private
//! broker (as `tests/network_faults.rs` starts) costs more than this file's time budget.
//!
//! Needs Kafka and Redis (`scripts/services up`); each test has its own topics and group. Run
//! with `--nocapture` to see the figures the tests print (elapsed times, log-line counts).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kourier::dead_letter::headers;
use kourier::idempotency::testing::{HookedStore, StoreCall, StoreHook};
use kourier::rdkafka::admin::{AdminClient, AdminOptions};
use kourier::rdkafka::client::DefaultClientContext;
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::mocking::MockCluster;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::{
    Codec, ConnectionState, ConsumerMonitor, ConsumerSnapshot, DeadLetter, DeadLetterError,
    DeadLetterReason, DeadLetterReceipt, DeadLetterSink, DecodeError, DedupKey, Error, Handler,
    HandlerError, Idempotency, InMemoryIdempotencyStore, JsonCodec, KafkaDeadLetterSink, Message,
    MissingTopics, PanicPolicy, PendingLetter, ProcessingOrder, RawRecord, RedisIdempotencyStore,
    RetryPolicy, RetryingConsumer, RetryingConsumerBuilder, ShutdownReport, StoreError,
    async_trait,
};
use serde::{Deserialize, Serialize};
use support::{ReadRecord, TestRecord};

// ---------------------------------------------------------------------------------------------
// The test event and handler

/// What the handler does with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Act {
    Ok,
    Permanent,
    /// Fails transiently until the log is `healed`.
    Transient,
    Panic,
    SleepMs(u64),
    /// Waits until the log's gate opens.
    Gate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u64,
    act: Act,
}

/// Event `id`, keyed `key-<id>`.
fn ev(id: u64, act: Act) -> TestRecord {
    keyed(id, &format!("key-{id}"), act)
}

fn keyed(id: u64, key: &str, act: Act) -> TestRecord {
    TestRecord::new()
        .key(key)
        .value(serde_json::to_vec(&Ev { id, act }).expect("encode event"))
        .partition(0)
}

/// What the handler saw.
#[derive(Debug)]
struct Log {
    /// `(id, attempt)` of every call, in call order.
    attempts: Mutex<Vec<(u64, u32)>>,
    /// `(id, partition, offset)` of every successful call.
    handled: Mutex<Vec<(u64, i32, i64)>>,
    /// `Act::Gate` waits for a permit; closed (no permits) until `open_gate`.
    gate: tokio::sync::Semaphore,
    /// `Act::Transient` succeeds once set.
    healed: AtomicBool,
}

impl Log {
    /// Waits (at most 30 s) until `n` records were handled.
    async fn wait_handled(&self, n: usize) {
        wait_for(
            &format!("{n} records handled"),
            Duration::from_secs(30),
            || self.handled_count() == n,
        )
        .await;
    }

    fn new() -> Arc<Log> {
        Arc::new(Log {
            attempts: Mutex::new(Vec::new()),
            handled: Mutex::new(Vec::new()),
            gate: tokio::sync::Semaphore::new(0),
            healed: AtomicBool::new(false),
        })
    }
    fn attempts_of(&self, id: u64) -> Vec<u32> {
        let attempts = self.attempts.lock().unwrap();
        attempts
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, a)| *a)
            .collect()
    }
    /// Ids handled successfully, sorted, duplicates kept.
    fn handled_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.handled.lock().unwrap().iter().map(|h| h.0).collect();
        ids.sort_unstable();
        ids
    }
    fn handled_count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }
    fn open_gate(&self) {
        self.gate.add_permits(1 << 20);
    }
}

struct Probe(Arc<Log>);

#[async_trait]
impl Handler for Probe {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let ev = m.event();
        self.0.attempts.lock().unwrap().push((ev.id, m.attempt()));
        match ev.act {
            Act::Ok => {}
            Act::Permanent => {
                return Err(HandlerError::permanent(format!(
                    "event {} is permanently bad",
                    ev.id
                )));
            }
            Act::Transient if !self.0.healed.load(AtomicOrdering::SeqCst) => {
                return Err(HandlerError::transient(format!(
                    "event {} failed on attempt {}",
                    ev.id,
                    m.attempt()
                )));
            }
            Act::Transient => {}
            Act::Panic => panic!("event {} makes the handler panic", ev.id),
            Act::SleepMs(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Act::Gate => {
                let _permit = self.0.gate.acquire().await.expect("gate semaphore closed");
            }
        }
        self.0
            .handled
            .lock()
            .unwrap()
            .push((ev.id, m.partition(), m.offset()));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Running a consumer

fn builder(log: &Arc<Log>, topic: &str, group: &str) -> RetryingConsumerBuilder<Probe> {
    settings(RetryingConsumer::builder(Probe(log.clone())), topic, group)
}

/// The settings every test uses: fast retries, commits and group membership; short timeouts.
fn settings<H: Handler, C>(
    b: RetryingConsumerBuilder<H, C>,
    topic: &str,
    group: &str,
) -> RetryingConsumerBuilder<H, C> {
    settings_of_topics(b, &[topic], group)
}

/// [`settings`] for several topics.
fn settings_of_topics<H: Handler, C>(
    b: RetryingConsumerBuilder<H, C>,
    topics: &[&str],
    group: &str,
) -> RetryingConsumerBuilder<H, C> {
    b.bootstrap_servers(support::bootstrap())
        .group_id(group)
        .topics(topics)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 3))
        .commit_interval(Duration::from_millis(200))
        .startup_timeout(Duration::from_secs(3))
        .shutdown_timeout(Duration::from_secs(5))
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
}

/// A consumer running in the background until `stop` is called.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<kourier::Result<ShutdownReport>>,
    monitor: ConsumerMonitor,
}

impl Running {
    fn start<H: Handler, C: Codec<H::Event>>(b: RetryingConsumerBuilder<H, C>) -> Running {
        let consumer = b.build().expect("build");
        let monitor = consumer.monitor();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(async {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
            monitor,
        }
    }

    fn snapshot(&self) -> ConsumerSnapshot {
        self.monitor.snapshot()
    }

    /// Waits until partitions of `topic` are assigned.
    async fn assigned(&self, topic: &str) {
        wait_for(
            &format!("partitions of {topic} assigned"),
            Duration::from_secs(30),
            || self.snapshot().assigned.iter().any(|(t, _)| t == topic),
        )
        .await;
    }

    /// Signals the stop; returns what `run` returned and how long it took to.
    async fn stop(mut self) -> (kourier::Result<ShutdownReport>, Duration) {
        assert!(
            !self.task.is_finished(),
            "the consumer stopped before it was told to"
        );
        let _ = self.stop.take().expect("stopped once").send(());
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("run() did not return within 60 s of the stop signal")
            .expect("consumer task panicked");
        (result, started.elapsed())
    }

    /// Stops and asserts a clean shutdown.
    async fn stop_clean(self) {
        let (result, took) = self.stop().await;
        let report = result.expect("run() failed");
        assert!(report.is_clean(), "shutdown abandoned records: {report:?}");
        assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What most tests start with: the log capture, a topic and its `<topic>.dlt` (both with
/// `partitions` partitions) named after `prefix`, a group and an empty handler log.
struct Case {
    topic: String,
    dlt: String,
    group: String,
    log: Arc<Log>,
}

impl Case {
    async fn new(prefix: &str, partitions: i32) -> Case {
        captured();
        support::require_kafka().await;
        let (topic, dlt) = topics(prefix, partitions).await;
        Case {
            topic,
            dlt,
            group: support::unique_name(prefix),
            log: Log::new(),
        }
    }

    /// Topic, dead-letter topic, group, log.
    fn parts(self) -> (String, String, String, Arc<Log>) {
        (self.topic, self.dlt, self.group, self.log)
    }
}

/// Runs a consumer of `topic` in `group` that cannot start: the error `run()` returns
/// within `within`, and how long it took.
async fn start_error(topic: &str, group: &str, within: Duration) -> (Error, Duration) {
    let consumer = builder(&Log::new(), topic, group).build().expect("build");
    let started = Instant::now();
    let result = tokio::time::timeout(within, consumer.run(std::future::pending()))
        .await
        .unwrap_or_else(|_| panic!("run() returned within {within:?}"));
    (result.expect_err("run() fails"), started.elapsed())
}

/// A topic and its `<topic>.dlt`, both created with `partitions` partitions.
async fn topics(prefix: &str, partitions: i32) -> (String, String) {
    let topic = support::unique_name(prefix);
    let dlt = format!("{topic}.dlt");
    support::create_topic(&topic, partitions).await;
    support::create_topic(&dlt, partitions).await;
    (topic, dlt)
}

/// Committed offset of partition 0.
async fn committed0(group: &str, topic: &str) -> Option<i64> {
    support::committed_offsets(group, topic, 1).await[&0]
}

/// A header's value as text ("" when absent or null).
fn header(r: &ReadRecord, name: &str) -> String {
    r.header(name)
        .flatten()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// A Spring-style big-endian integer header (`kafka_dlt-original-offset`, ...), if present.
fn header_int(r: &ReadRecord, name: &str) -> Option<i64> {
    let v = r.header(name).flatten()?;
    match v.len() {
        8 => Some(i64::from_be_bytes(v.try_into().ok()?)),
        4 => Some(i64::from(i32::from_be_bytes(v.try_into().ok()?))),
        _ => None,
    }
}

/// Deletes topics (local helper: tests/support has none).
async fn delete_topics(names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = support::client_config()
        .create()
        .expect("create admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .delete_topics(names, &options)
        .await
        .expect("delete topics")
    {
        if let Err((topic, code)) = result {
            panic!("delete topic {topic}: {code}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Captured log lines

/// Everything logged at WARN and above by this test binary (the global subscriber).
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .without_time()
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install the log capture");
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the captured log is now, to read what comes after with [`lines_since`].
fn log_mark() -> usize {
    captured().lock().unwrap().len()
}

/// The WARN/ERROR lines logged since `mark` (by any test of this binary) that `matches`.
fn lines_since(mark: usize, matches: impl Fn(&str) -> bool) -> Vec<String> {
    let buffer = captured().lock().unwrap();
    String::from_utf8_lossy(&buffer[mark..])
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("WARN") || l.starts_with("ERROR")
        })
        .filter(|l| matches(l))
        .map(str::to_owned)
        .collect()
}

/// Tests whose log lines speak of unreachable brokers run one at a time, so that each counts
/// only its own.
static OUTAGE_LOGS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// 1. Unreachable bootstrap servers

/// What one `run()` against `127.0.0.1:1` (nothing listens on port 1) returned, how long it
/// took, and the WARN/ERROR lines logged meanwhile about that cluster.
struct UnreachableRun {
    result: kourier::Result<ShutdownReport>,
    elapsed: Duration,
    lines: Vec<String>,
}

async fn run_against_nothing(startup_timeout: Duration) -> UnreachableRun {
    run_against_nothing_with(startup_timeout, |b| b).await
}

/// [`run_against_nothing`] with more settings.
async fn run_against_nothing_with(
    startup_timeout: Duration,
    more: impl FnOnce(RetryingConsumerBuilder<Probe>) -> RetryingConsumerBuilder<Probe>,
) -> UnreachableRun {
    captured();
    let _quiet = OUTAGE_LOGS.lock().await;
    let consumer = more(
        RetryingConsumer::builder(Probe(Log::new()))
            .bootstrap_servers("127.0.0.1:1")
            .group_id(support::unique_name("unreachable"))
            .topic("notify.v1")
            .startup_timeout(startup_timeout),
    )
    .build()
    .expect("build");
    let mark = log_mark();
    let started = Instant::now();
    let result = tokio::time::timeout(
        startup_timeout + Duration::from_secs(12),
        consumer.run(std::future::pending()),
    )
    .await
    .expect("run() returned within the startup timeout + 12 s");
    let elapsed = started.elapsed();
    // Lines about this cluster: its address (not a longer port), or the cluster being down.
    let names_it = |l: &str| {
        l.match_indices("127.0.0.1:1")
            .any(|(i, m)| !l[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
    };
    let lines = lines_since(mark, |l| {
        names_it(l)
            || l.contains("does not answer")
            || l.contains("unreachable")
            || l.contains("brokers are down")
            || l.contains("broker connections are down")
    });
    UnreachableRun {
        result,
        elapsed,
        lines,
    }
}

/// Lines logged by kourier itself or through the consumer's own client context (whose
/// librdkafka lines carry a `suppressed` count); the rest come from other clients.
fn is_kourier_line(l: &str) -> bool {
    let target = l.split_whitespace().nth(1).unwrap_or_default();
    target.starts_with("kourier") || (target.starts_with("librdkafka") && l.contains("suppressed="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_an_error_within_the_startup_timeout() {
    let run = run_against_nothing(Duration::from_secs(3)).await;
    let err = run.result.expect_err("nothing answers at 127.0.0.1:1");
    let own = run.lines.iter().filter(|l| is_kourier_line(l)).count();
    eprintln!(
        "unreachable bootstrap: run() returned after {:?} with `{err}`; {} WARN/ERROR lines \
         about the cluster, {own} of them from the consumer itself:\n  {}",
        run.elapsed,
        run.lines.len(),
        run.lines.join("\n  ")
    );
    assert!(err.is_brokers_unreachable(), "{err:?}");
    match &err {
        Error::BrokersUnreachable { servers, after } => {
            assert_eq!(servers, "127.0.0.1:1");
            assert!(
                *after >= Duration::from_secs(3),
                "it tried for the whole startup timeout: {after:?}"
            );
        }
        other => panic!("expected BrokersUnreachable, got {other:?}"),
    }
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(!err.is_missing_topics() && !err.is_config());
    assert!(
        run.elapsed < Duration::from_secs(15),
        "returned within 15 s: {:?}",
        run.elapsed
    );
    assert!(own >= 1, "the unreachable cluster is logged");
    assert!(
        own <= 10,
        "the consumer logs a persisting condition once per interval, not per poll: {own} lines"
    );
}

/// Issue 23: whatever step meets the unreachable cluster — the startup checks, or creating
/// the missing topics first (`MissingTopics::create`, which was `Error::Topic`) — `run()`
/// returns `Error::BrokersUnreachable` naming the servers, within the startup timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_brokers_unreachable_whatever_step_met_them() {
    let timeout = Duration::from_secs(2);
    for (step, create) in [("startup checks", None), ("MissingTopics::create", Some(3))] {
        let run = run_against_nothing_with(timeout, |b| match create {
            Some(partitions) => b.missing_topics(MissingTopics::create(partitions)),
            None => b,
        })
        .await;
        let err = run.result.expect_err("nothing answers at 127.0.0.1:1");
        eprintln!(
            "unreachable, {step}: run() returned after {:?} with `{err}`",
            run.elapsed
        );
        match &err {
            Error::BrokersUnreachable { servers, after } => {
                assert_eq!(servers, "127.0.0.1:1", "{step}");
                assert!(
                    *after >= timeout,
                    "{step}: tried for the whole timeout: {after:?}"
                );
            }
            other => panic!("{step}: expected BrokersUnreachable, got {other:?}"),
        }
        assert!(err.is_brokers_unreachable(), "{step}");
        assert!(
            run.elapsed < timeout + Duration::from_secs(5),
            "{step}: returned within the startup timeout (+5 s): {:?}",
            run.elapsed
        );
    }
}

/// A broker that answers and refuses to create a topic is not "unreachable": the refusal
/// stays `Error::Topic` naming the topic. Kafka refuses a name that collides with an existing
/// one once `.` and `_` are folded (`a.b` / `a_b`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_to_create_a_topic_stays_a_topic_error() {
    captured();
    support::require_kafka().await;
    let base = support::unique_name("refused").replace('.', "-");
    let existing = format!("{base}_x");
    let colliding = format!("{base}.x");
    support::create_topic(&existing, 1).await;
    let log = Log::new();
    let consumer = builder(&log, &colliding, &support::unique_name("refused"))
        .startup_timeout(Duration::from_secs(10))
        .missing_topics(MissingTopics::create(1))
        .build()
        .expect("build");
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(std::future::pending()),
    )
    .await
    .expect("run() returned within 30 s");
    let err = result.expect_err("the broker refuses the colliding name");
    eprintln!("refused: {err:?}");
    match &err {
        Error::Topic(kourier::topics::TopicError::Create { topic, .. }) => {
            assert_eq!(topic, &colliding);
        }
        other => panic!("expected Error::Topic(Create), got {other:?}"),
    }
    assert!(!err.is_brokers_unreachable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_logged_a_few_times_not_per_reconnect() {
    let run = run_against_nothing(Duration::from_secs(3)).await;
    assert!(run.result.is_err());
    assert!(
        run.lines.len() <= 10,
        "a persisting condition is logged once per interval, not per reconnect: {} lines:\n  {}",
        run.lines.len(),
        run.lines.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2–4. Missing topics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_subscribed_topic_is_an_error_naming_it() {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("missing-source");
    // The dead-letter topic exists: only the subscribed topic is missing.
    support::create_topic(&format!("{topic}.dlt"), 1).await;
    let group = support::unique_name("missing-source");
    let (err, took) = start_error(&topic, &group, Duration::from_secs(15)).await;
    eprintln!("missing topic: {took:?} → {err}");
    assert!(err.is_missing_topics(), "{err:?}");
    assert_eq!(err.missing_topics(), std::slice::from_ref(&topic));
    match &err {
        Error::MissingTopics { hint, .. } => {
            assert!(hint.contains("MissingTopics::Wait"), "{hint}");
            assert!(hint.contains("MissingTopics::create"), "{hint}");
        }
        other => panic!("expected MissingTopics, got {other:?}"),
    }
}

/// Runs a consumer with `MissingTopics::Wait` and the given startup timeout on a topic that
/// is created `after` it started (its dead-letter topic exists); checks it consumes it.
async fn wait_for_topic_created_after(startup_timeout: Duration, after: Duration) {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("wait-for");
    let dlt = format!("{topic}.dlt");
    support::create_topic(&dlt, 1).await;
    let group = support::unique_name("wait-for");
    let log = Log::new();
    let running = Running::start(
        builder(&log, &topic, &group)
            .missing_topics(MissingTopics::Wait)
            .startup_timeout(startup_timeout),
    );
    tokio::time::sleep(after).await;
    if running.task.is_finished() {
        let ended = running.task.await;
        panic!("run() returned instead of waiting for the topic: {ended:?}");
    }
    let waiting = running.snapshot();
    assert_eq!(waiting.connection, ConnectionState::Connected);
    assert!(waiting.assigned.is_empty(), "{:?}", waiting.assigned);

    support::create_topic(&topic, 1).await;
    support::produce(&topic, (0..3).map(|id| ev(id, Act::Ok)).collect()).await;
    log.wait_handled(3).await;
    assert_eq!(log.handled_ids(), [0, 1, 2]);
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_topics_waits_for_a_topic_created_later_then_consumes_it() {
    wait_for_topic_created_after(Duration::from_secs(10), Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_topics_waits_past_the_startup_timeout() {
    wait_for_topic_created_after(Duration::from_secs(3), Duration::from_secs(4)).await;
}

/// With `wait_for_topics`, the consumer waits for the source topic and for its dead-letter
/// topic: it says so (the warning names what is missing, first both, then the dead-letter
/// topic alone once the source exists), keeps running meanwhile, and consumes once both exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_topics_also_waits_for_the_dead_letter_topic() {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("wait-both");
    let dlt = format!("{topic}.dlt");
    let group = support::unique_name("wait-both");
    let log = Log::new();
    let waiting_for = |mark: usize, missing: String| {
        move || {
            !lines_since(mark, |l| {
                l.contains("waiting for topics to be created") && l.contains(&missing)
            })
            .is_empty()
        }
    };
    let mark = log_mark();
    // The warning repeats every 200 ms, naming what is still missing.
    let running = Running::start(
        builder(&log, &topic, &group)
            .missing_topics(MissingTopics::Wait)
            .error_log_interval(Duration::from_millis(200)),
    );
    let both = format!("topics=[\"{topic}\", \"{dlt}\"]");
    wait_for(
        "a wait for both topics",
        Duration::from_secs(30),
        waiting_for(mark, both),
    )
    .await;
    assert!(
        !running.task.is_finished(),
        "run() returned instead of waiting"
    );

    support::create_topic(&topic, 1).await;
    let mark = log_mark();
    let dlt_alone = format!("topics=[\"{dlt}\"]");
    wait_for(
        "a wait for the dead-letter topic alone",
        Duration::from_secs(30),
        waiting_for(mark, dlt_alone),
    )
    .await;
    assert!(
        !running.task.is_finished(),
        "run() returned without its dead-letter topic"
    );
    assert!(running.snapshot().assigned.is_empty(), "not consuming yet");

    support::create_topic(&dlt, 1).await;
    support::produce(&topic, (0..3).map(|id| ev(id, Act::Ok)).collect()).await;
    log.wait_handled(3).await;
    running.stop_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_is_an_error_naming_it_and_the_setting_that_creates_it() {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("missing-dlt");
    support::create_topic(&topic, 1).await;
    let group = support::unique_name("missing-dlt");
    let (err, took) = start_error(&topic, &group, Duration::from_secs(15)).await;
    eprintln!("missing dead-letter topic: {took:?} → {err}");
    assert_eq!(err.missing_topics(), [format!("{topic}.dlt")]);
    match &err {
        Error::MissingTopics { hint, .. } => {
            assert!(hint.contains("MissingTopics::create"), "{hint}");
        }
        other => panic!("expected MissingTopics, got {other:?}"),
    }
    assert!(err.to_string().contains(&format!("{topic}.dlt")), "{err}");
    // Nothing was consumed: no offsets committed for the group.
    assert_eq!(committed0(&group, &topic).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_names_every_missing_topic() {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("missing-both");
    let group = support::unique_name("missing-both");
    let (err, _) = start_error(&topic, &group, Duration::from_secs(15)).await;
    let mut missing = err.missing_topics().to_vec();
    missing.sort();
    assert_eq!(missing, [topic.clone(), format!("{topic}.dlt")], "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_missing_topics_creates_source_and_dead_letter_topics_and_letters_flow() {
    captured();
    support::require_kafka().await;
    let topic = support::unique_name("create-missing");
    let dlt = format!("{topic}.dlt");
    let group = support::unique_name("create-missing");
    let log = Log::new();
    let running = Running::start(
        builder(&log, &topic, &group)
            .missing_topics(MissingTopics::create(3))
            .startup_timeout(Duration::from_secs(20)),
    );
    running.assigned(&topic).await;
    assert_eq!(support::partitions_of(&topic).await, [0, 1, 2]);
    assert_eq!(
        support::partitions_of(&dlt).await,
        [0, 1, 2],
        "the dead-letter topic has its source's partition count"
    );

    let records: Vec<TestRecord> = (0..6)
        .map(|id| {
            let act = if id == 4 { Act::Permanent } else { Act::Ok };
            ev(id, act).partition((id % 3) as i32)
        })
        .collect();
    let coordinates = support::produce(&topic, records).await;
    let letters = support::read_at_least(&dlt, 1, Duration::from_secs(30)).await;
    log.wait_handled(5).await;
    assert_eq!(log.handled_ids(), [0, 1, 2, 3, 5]);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(header(letter, headers::FAILURE_KIND), "permanent");
    assert_eq!(
        letter.partition, coordinates[4].0,
        "the letter keeps its source partition"
    );
    assert_eq!(
        header_int(letter, headers::ORIGINAL_OFFSET),
        Some(coordinates[4].1)
    );
    running.stop_clean().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A topic deleted while consuming

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_while_consuming_leaves_the_assignment_and_the_rest_flows() {
    captured();
    support::require_kafka().await;
    let (kept, _) = topics("deleted-kept", 1).await;
    let (doomed, _) = topics("deleted-doomed", 2).await;
    let group = support::unique_name("deleted");
    let log = Log::new();
    let running = Running::start(settings_of_topics(
        RetryingConsumer::builder(Probe(log.clone())),
        &[&kept, &doomed],
        &group,
    ));
    support::produce(&kept, vec![ev(0, Act::Ok)]).await;
    support::produce(&doomed, vec![ev(1, Act::Ok), ev(2, Act::Ok).partition(1)]).await;
    log.wait_handled(3).await;
    wait_for("the doomed topic assigned", Duration::from_secs(10), || {
        running
            .snapshot()
            .assigned
            .iter()
            .filter(|(t, _)| *t == doomed)
            .count()
            == 2
    })
    .await;

    let mark = log_mark();
    delete_topics(&[&doomed]).await;
    let deleted = Instant::now();
    // (A rebalance may revoke everything for a moment: wait for the kept topic, too.)
    let only_kept = vec![(kept.clone(), 0)];
    // librdkafka reports a subscribed topic gone only after `topic.metadata.propagation.max.ms`
    // (default 30 s): kourier acts on that report.
    wait_for(
        "the deleted topic's partitions to leave the assignment",
        Duration::from_secs(45),
        || running.snapshot().assigned == only_kept,
    )
    .await;
    let left_after = deleted.elapsed();
    let snapshot = running.snapshot();
    assert_eq!(snapshot.assigned, [(kept.clone(), 0)]);
    assert!(
        snapshot.partitions.iter().all(|p| p.topic == kept),
        "{:?}",
        snapshot.partitions
    );

    // The consumer keeps running: the other topic still flows.
    support::produce(&kept, vec![ev(3, Act::Ok)]).await;
    wait_for(
        "the record after the deletion",
        Duration::from_secs(30),
        || log.handled_count() == 4,
    )
    .await;
    let lines = lines_since(mark, |l| l.contains(doomed.as_str()));
    eprintln!(
        "deleted topic: left the assignment after {left_after:?}; {} WARN/ERROR lines name it:\n  {}",
        lines.len(),
        lines.join("\n  ")
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("subscribed topic deleted"))
            .count()
            <= 1,
        "one warning for the deletion"
    );
    assert!(
        lines.len() <= 10,
        "no flood of warnings: {} lines",
        lines.len()
    );
    running.stop_clean().await;
    assert_eq!(committed0(&group, &kept).await, Some(2));
}

// ---------------------------------------------------------------------------------------------
// 6. Honest shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_waiting_out_a_back_off_is_abandoned_at_once_reported_and_redelivered() {
    let (topic, _, group, log) = Case::new("backoff-stop", 1).await.parts();
    support::produce(
        &topic,
        vec![
            ev(0, Act::Ok),
            ev(1, Act::Ok),
            ev(2, Act::Transient),
            ev(3, Act::Ok),
        ],
    )
    .await;
    // A 30 s back-off, and a shutdown timeout longer than the bound asserted below: only
    // giving the record up at once can return in time.
    let running = Running::start(
        builder(&log, &topic, &group)
            .retry_policy(RetryPolicy::fixed(Duration::from_secs(30), 3))
            .shutdown_timeout(Duration::from_secs(20)),
    );
    wait_for(
        "the first attempt of event 2",
        Duration::from_secs(30),
        || !log.attempts_of(2).is_empty(),
    )
    .await;
    wait_for("offsets 0 and 1 committed", Duration::from_secs(10), || {
        committed_now(&running) == Some(2)
    })
    .await;

    let (result, took) = running.stop().await;
    eprintln!("shutdown with a record in a 30 s back-off: run() returned after {took:?}");
    let report = result.expect("run() failed");
    assert!(
        took < Duration::from_secs(10),
        "the back-off does not hold the shutdown: {took:?}"
    );
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert_eq!(report.abandoned_records, [format!("{topic}/0@2")]);
    assert!(!report.is_clean());
    let err = report.clone().into_result().expect_err("abandoned");
    assert!(err.is_abandoned(), "{err:?}");
    assert!(err.to_string().contains(&format!("{topic}/0@2")), "{err}");
    assert_eq!(log.attempts_of(2), [1], "no attempt during the shutdown");
    assert_eq!(
        committed0(&group, &topic).await,
        Some(2),
        "the commit stops at the abandoned record"
    );

    // After a restart the record is delivered again, and only what was not committed.
    log.healed.store(true, AtomicOrdering::SeqCst);
    let running = Running::start(builder(&log, &topic, &group));
    wait_for("events 2 and 3 handled", Duration::from_secs(30), || {
        log.handled_count() == 4
    })
    .await;
    assert_eq!(log.handled_ids(), [0, 1, 2, 3], "nothing handled twice");
    assert_eq!(log.attempts_of(2), [1, 1], "one attempt in each run");
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_outliving_the_shutdown_timeout_is_reported_abandoned() {
    let (topic, _, group, log) = Case::new("blocked-stop", 1).await.parts();
    support::produce(&topic, vec![ev(0, Act::Ok), ev(1, Act::SleepMs(30_000))]).await;
    let running =
        Running::start(builder(&log, &topic, &group).shutdown_timeout(Duration::from_secs(1)));
    wait_for("event 1 in its handler", Duration::from_secs(30), || {
        !log.attempts_of(1).is_empty()
    })
    .await;
    let (result, took) = running.stop().await;
    eprintln!("shutdown with a handler blocked 30 s: run() returned after {took:?}: {result:?}");
    assert!(
        took < Duration::from_secs(10),
        "bounded by the shutdown timeout: {took:?}"
    );
    let report = result.expect("run() failed");
    assert_eq!(
        committed0(&group, &topic).await,
        Some(1),
        "the commit stops at the record still running"
    );
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert_eq!(report.abandoned_records, [format!("{topic}/0@1")]);
}

// ---------------------------------------------------------------------------------------------
// 7. Panicking plug-ins

/// Five records on partition 0, the middle one (id 2) the bad one.
fn five_with(bad: Act) -> Vec<TestRecord> {
    (0..5)
        .map(|id| ev(id, if id == 2 { bad } else { Act::Ok }))
        .collect()
}

/// A JSON codec that panics on event 2.
struct PanickyCodec;

impl Codec<Ev> for PanickyCodec {
    fn decode(&self, record: &RawRecord) -> Result<Ev, DecodeError> {
        let ev = JsonCodec::<Ev>::new().decode(record)?;
        assert!(ev.id != 2, "the codec panics on event 2");
        Ok(ev)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_codec_dead_letters_the_record_as_decode_and_the_partition_flows() {
    let (topic, dlt, group, log) = Case::new("panic-codec", 1).await.parts();
    support::produce(&topic, five_with(Act::Ok)).await;
    let b = RetryingConsumer::builder(Probe(log.clone())).codec(PanickyCodec);
    let running = Running::start(settings(b, &topic, &group));
    let letters = support::read_at_least(&dlt, 1, Duration::from_secs(30)).await;
    log.wait_handled(4).await;
    assert_eq!(
        log.handled_ids(),
        [0, 1, 3, 4],
        "records after it were handled"
    );
    assert!(log.attempts_of(2).is_empty(), "the handler never saw it");
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], headers::FAILURE_KIND), "decode");
    assert_eq!(header_int(&letters[0], headers::ORIGINAL_OFFSET), Some(2));
    assert!(
        header(&letters[0], headers::EXCEPTION_MESSAGE).contains("the codec panics on event 2"),
        "{:?}",
        letters[0].headers
    );
    let snapshot = running.snapshot();
    assert_eq!(snapshot.panics, 1);
    assert_eq!(snapshot.dead_lettered.of(DeadLetterReason::Decode), 1);
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_dedup_key_function_dead_letters_the_record_as_panic() {
    let (topic, dlt, group, log) = Case::new("panic-key", 1).await.parts();
    support::produce(&topic, five_with(Act::Ok)).await;
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let key = DedupKey::from_fn(|m: &Message<Ev>| {
        assert!(m.event().id != 2, "the key function panics on event 2");
        Some(format!("ev-{}", m.event().id))
    });
    let running = Running::start(
        builder(&log, &topic, &group).idempotency(Idempotency::new(store.clone(), key)),
    );
    let letters = support::read_at_least(&dlt, 1, Duration::from_secs(30)).await;
    log.wait_handled(4).await;
    assert_eq!(log.handled_ids(), [0, 1, 3, 4]);
    assert!(log.attempts_of(2).is_empty(), "the handler never saw it");
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], headers::FAILURE_KIND), "panic");
    assert_eq!(header_int(&letters[0], headers::ORIGINAL_OFFSET), Some(2));
    assert_eq!(
        store.len(),
        4,
        "the four handled keys are done, nothing else"
    );
    let snapshot = running.snapshot();
    assert_eq!(snapshot.panics, 1);
    assert_eq!(snapshot.dead_lettered.of(DeadLetterReason::Panic), 1);
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(5));
}

/// Claims of keys ending in `ev-2` panic the first `panics` times.
#[derive(Debug)]
struct PanicsClaiming2 {
    panics: AtomicU32,
    claims_of_2: AtomicU32,
}

#[async_trait]
impl StoreHook for PanicsClaiming2 {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        if let StoreCall::Claim { key, .. } = call
            && key.ends_with(":ev-2")
        {
            self.claims_of_2.fetch_add(1, AtomicOrdering::SeqCst);
            let left =
                self.panics
                    .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                        n.checked_sub(1)
                    });
            assert!(left.is_err(), "the store panics claiming {key}");
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_store_makes_the_record_wait_and_it_is_handled_once() {
    let (topic, dlt, group, log) = Case::new("panic-store", 1).await.parts();
    support::require_redis().await;
    support::produce(&topic, five_with(Act::Ok)).await;
    let redis = RedisIdempotencyStore::builder(support::redis_url().as_str())
        .key_prefix(support::unique_name("panic-store"))
        .build()
        .await
        .expect("redis store");
    let panics = PanicsClaiming2 {
        panics: AtomicU32::new(3),
        claims_of_2: AtomicU32::new(0),
    };
    // One key at a time through the panicking claim (the Redis store's batch never panics).
    let store = Arc::new(HookedStore::new(Arc::new(redis), panics).one_by_one());
    let key = DedupKey::from_fn(|m: &Message<Ev>| Some(format!("ev-{}", m.event().id)));
    let running = Running::start(
        builder(&log, &topic, &group).idempotency(Idempotency::new(store.clone(), key)),
    );
    log.wait_handled(5).await;
    assert_eq!(
        log.handled_ids(),
        [0, 1, 2, 3, 4],
        "each handled once, none skipped"
    );
    assert_eq!(log.attempts_of(2), [1], "one handler attempt");
    assert_eq!(
        store.hook().claims_of_2.load(AtomicOrdering::SeqCst),
        4,
        "three panicking claims, then the one that worked"
    );
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(5));
    assert!(support::read_all(&dlt).await.is_empty(), "no dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sink_is_retried_and_the_offset_waits_for_the_letter() {
    let case = Case::new("panic-sink", 2).await;
    support::produce(&case.topic, five_with(Act::Permanent)).await;
    let sink = GatedSink::new(2, Fail::Panic);
    // Key ordering: the records after the letter run while it waits.
    let running = Running::start(
        builder(&case.log, &case.topic, &case.group)
            .ordering(ProcessingOrder::Key)
            .dead_letter_sink(sink.clone()),
    );
    let letters = the_letter_holds_the_commit_point(&case, &sink, &running).await;
    assert_eq!(header(&letters[0], headers::FAILURE_KIND), "permanent");
    assert_eq!(sink.sends.load(AtomicOrdering::SeqCst), 3);
    assert_eq!(
        running
            .snapshot()
            .dead_lettered
            .of(DeadLetterReason::Permanent),
        1
    );
    running.stop_clean().await;
    assert_eq!(committed0(&case.group, &case.topic).await, Some(5));
    assert_eq!(support::read_all(&case.dlt).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_without_panic_retries_is_dead_lettered_after_one_attempt() {
    let (topic, dlt, group, log) = Case::new("panic-handler", 1).await.parts();
    support::produce(&topic, five_with(Act::Panic)).await;
    let running =
        Running::start(builder(&log, &topic, &group).panic_policy(PanicPolicy::DeadLetter));
    let letters = support::read_at_least(&dlt, 1, Duration::from_secs(30)).await;
    log.wait_handled(4).await;
    assert_eq!(log.handled_ids(), [0, 1, 3, 4]);
    assert_eq!(log.attempts_of(2), [1], "one attempt");
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], headers::FAILURE_KIND), "panic");
    assert_eq!(header(&letters[0], headers::ATTEMPTS), "1");
    assert!(
        header(&letters[0], headers::EXCEPTION_MESSAGE).contains("makes the handler panic"),
        "{:?}",
        letters[0].headers
    );
    let snapshot = running.snapshot();
    assert_eq!(snapshot.panics, 1);
    assert_eq!(snapshot.retried, 0);
    assert_eq!(snapshot.dead_lettered.of(DeadLetterReason::Panic), 1);
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(5));
}

// ---------------------------------------------------------------------------------------------
// 8. Stall bounds

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stuck_key_pauses_its_partition_at_the_uncommitted_limit() {
    let (topic, _, group, log) = Case::new("uncommitted", 1).await.parts();
    const TOTAL: u64 = 300;
    const LIMIT: usize = 50;
    const BUFFER: usize = 20;
    // Past the limit but under twice it: the partition is paused once it has held the limit
    // for the pause grace (half a second), not as it reaches it.
    const FIRST: u64 = 95;
    let record = |id: u64| {
        if id == 0 {
            keyed(0, "stuck", Act::Gate)
        } else {
            keyed(id, &format!("k{}", id % 10), Act::Ok)
        }
    };
    support::produce(&topic, (0..FIRST).map(record).collect()).await;
    let mark = log_mark();
    let running = Running::start(
        builder(&log, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(8)
            .max_buffered_records(BUFFER)
            .max_uncommitted_per_partition(LIMIT),
    );
    let tp = (topic.clone(), 0);
    wait_for("the partition paused", Duration::from_secs(30), || {
        running.snapshot().paused.contains(&tp)
    })
    .await;
    wait_for(
        "everything received but the stuck record handled",
        Duration::from_secs(30),
        || {
            let s = running.snapshot();
            s.in_flight == 1 && s.buffered_records == 0
        },
    )
    .await;
    // Every record produced so far was handled: reaching the limit did not pause the
    // partition at once (a pause at the limit leaves at most LIMIT - 1 + BUFFER handled).
    let handled = log.handled_count();
    eprintln!("uncommitted bound: {handled} records handled past the stuck one (limit {LIMIT})");
    assert_eq!(handled, FIRST as usize - 1);
    // The rest, produced while the partition is paused, waits for the stuck record.
    support::produce(&topic, (FIRST..TOTAL).map(record).collect()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot = running.snapshot();
    assert_eq!(log.handled_count(), handled, "nothing more while paused");
    assert!(snapshot.paused.contains(&tp));
    assert!(snapshot.partitions[0].paused);
    // Committed at most at offset 0 (with the handled records above it in the commit's
    // metadata): offset 0 holds the commit point.
    let committed = snapshot.partitions[0].committed;
    assert!(
        matches!(committed, None | Some(0)),
        "offset 0 holds the commit: {committed:?}"
    );
    let warned = lines_since(mark, |l| {
        l.contains(topic.as_str()) && l.contains("too many records started past its commit point")
    });
    assert_eq!(warned.len(), 1, "one warning: {warned:?}");

    log.open_gate();
    wait_for("every record handled", Duration::from_secs(30), || {
        log.handled_count() == TOTAL as usize
    })
    .await;
    wait_for("committed to the end", Duration::from_secs(10), || {
        running.snapshot().partitions[0].committed == Some(TOTAL as i64)
    })
    .await;
    assert_eq!(log.handled_ids(), (0..TOTAL).collect::<Vec<_>>());
    assert!(running.snapshot().paused.is_empty());
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(TOTAL as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_in_flight_past_the_stall_threshold_is_counted_once() {
    let (topic, _, group, log) = Case::new("stall", 1).await.parts();
    support::produce(&topic, vec![ev(0, Act::SleepMs(3_000)), ev(1, Act::Ok)]).await;
    let mark = log_mark();
    let running =
        Running::start(builder(&log, &topic, &group).stall_threshold(Duration::from_millis(500)));
    wait_for("the stall counted", Duration::from_secs(30), || {
        running.snapshot().stalled == 1
    })
    .await;
    assert!(
        !log.handled_ids().contains(&0),
        "counted while it runs, not when it ends"
    );
    wait_for("both handled", Duration::from_secs(30), || {
        log.handled_count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running.snapshot().stalled, 1, "counted once");
    let warned = lines_since(mark, |l| {
        l.contains(&format!("{topic}/0@0")) && l.contains("stalled")
    });
    assert_eq!(warned.len(), 1, "logged once: {warned:?}");
    running.stop_clean().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Health

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_resolves_when_everything_is_handled_and_committed() {
    let (topic, _, group, log) = Case::new("caught-up", 3).await.parts();
    let records: Vec<TestRecord> = (0..100)
        .map(|id| ev(id, Act::Ok).partition((id % 3) as i32))
        .collect();
    support::produce(&topic, records).await;
    let running = Running::start(builder(&log, &topic, &group));
    running.assigned(&topic).await;
    assert_eq!(running.snapshot().connection, ConnectionState::Connected);

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), running.monitor.caught_up())
        .await
        .expect("caught up within 30 s");
    eprintln!("caught_up() resolved after {:?}", started.elapsed());
    assert_eq!(log.handled_ids(), (0..100).collect::<Vec<_>>());
    let snapshot = running.snapshot();
    assert!(snapshot.caught_up);
    assert_eq!(snapshot.connection, ConnectionState::Connected);
    assert_eq!(snapshot.partitions.len(), 3);
    let ends: BTreeMap<i32, i64> = [(0, 34), (1, 33), (2, 33)].into();
    for p in &snapshot.partitions {
        assert_eq!(p.lag, Some(0), "{p:?}");
        assert_eq!(p.committed, p.end_offset, "{p:?}");
        assert_eq!(p.end_offset, Some(ends[&p.partition]), "{p:?}");
        assert!(!p.paused, "{p:?}");
    }
    running.stop_clean().await;
    let committed = support::committed_offsets(&group, &topic, 3).await;
    for (partition, end) in ends {
        assert_eq!(committed[&partition], Some(end));
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Maximum broker outage (librdkafka's mock cluster: see the module docs)

/// An in-process mock cluster with a topic named after `prefix` (and its dead-letter
/// topic) holding events 0, 1, 2: the cluster, its bootstrap servers, the topic.
async fn mock_with_three_records(
    prefix: &str,
) -> (
    MockCluster<'static, kourier::rdkafka::producer::DefaultProducerContext>,
    String,
    String,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = support::unique_name(prefix);
    mock.create_topic(&topic, 1, 1).expect("create topic");
    mock.create_topic(&format!("{topic}.dlt"), 1, 1)
        .expect("create dlt");
    let events: Vec<Ev> = (0..3).map(|id| Ev { id, act: Act::Ok }).collect();
    produce_to_mock(&bootstrap, &topic, &events).await;
    (mock, bootstrap, topic)
}

async fn produce_to_mock(bootstrap: &str, topic: &str, events: &[Ev]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("create producer");
    for e in events {
        let value = serde_json::to_vec(e).expect("encode");
        let key = format!("key-{}", e.id);
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to the mock cluster: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_max_broker_outage_ends_run_with_brokers_unreachable() {
    captured();
    let _quiet = OUTAGE_LOGS.lock().await;
    let (mock, bootstrap, topic) = mock_with_three_records("outage").await;

    let log = Log::new();
    let b = builder(&log, &topic, &support::unique_name("outage"))
        .bootstrap_servers(&bootstrap)
        .max_broker_outage(Duration::from_secs(3))
        .shutdown_timeout(Duration::from_secs(1));
    let running = Running::start(b);
    log.wait_handled(3).await;
    wait_for("committed", Duration::from_secs(10), || {
        committed_now(&running) == Some(3)
    })
    .await;
    assert_eq!(running.snapshot().connection, ConnectionState::Connected);

    mock.broker_down(1).expect("broker down");
    let cut = Instant::now();
    let mut saw_disconnected = false;
    while !running.task.is_finished() && cut.elapsed() < Duration::from_secs(30) {
        saw_disconnected |= running.snapshot().connection == ConnectionState::Disconnected;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = tokio::time::timeout(Duration::from_secs(1), running.task)
        .await
        .expect("run() returned within 30 s of the outage")
        .expect("consumer task panicked");
    let took = cut.elapsed();
    eprintln!("broker outage: run() returned after {took:?}: {result:?}");
    assert!(saw_disconnected, "the snapshot showed the outage");
    let err = result.expect_err("the outage outlasted max_broker_outage");
    assert!(err.is_brokers_unreachable(), "{err:?}");
    match &err {
        Error::BrokersUnreachable { servers, after } => {
            assert_eq!(servers, &bootstrap);
            assert!(*after >= Duration::from_secs(3), "{after:?}");
        }
        other => panic!("expected BrokersUnreachable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(20), "bounded: {took:?}");
    drop(mock);
}

// ---------------------------------------------------------------------------------------------
// 11. A final commit the group coordinator refuses (librdkafka's mock cluster: a real broker
// cannot be made to refuse one commit and accept the next)

/// The group's committed offset of `topic`/0 on the mock cluster.
fn committed_on_mock(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
    use kourier::rdkafka::{Offset, TopicPartitionList};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("create group client");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = client
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let offset = committed.elements().first().map(|e| e.offset());
    match offset {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

/// Runs a consumer on the mock cluster until it handled 3 records (nothing committed yet:
/// the commit interval is an hour), makes the coordinator refuse the next `refusals` offset
/// commits (`GROUP_AUTHORIZATION_FAILED`), stops it, and returns the report, how long the
/// stop took, and the committed offset afterwards.
async fn stop_while_commits_are_refused(
    refusals: usize,
) -> (kourier::Result<ShutdownReport>, Duration, Option<i64>) {
    use kourier::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (mock, bootstrap, topic) = mock_with_three_records("final-commit").await;

    let log = Log::new();
    let group = support::unique_name("final-commit");
    let b = builder(&log, &topic, &group)
        .bootstrap_servers(&bootstrap)
        .commit_interval(Duration::from_secs(3600))
        .shutdown_timeout(Duration::from_secs(3));
    let running = Running::start(b);
    log.wait_handled(3).await;
    assert_eq!(committed_on_mock(&bootstrap, &group, &topic), None);
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; refusals],
    );
    let (result, took) = running.stop().await;
    let committed = committed_on_mock(&bootstrap, &group, &topic);
    (result, took, committed)
}

/// Issue 23: a final commit that fails is retried (with a short back-off, polling) until the
/// shutdown deadline: refused three times, it commits on the fourth try and the shutdown is
/// clean (it was one try: the offsets stayed uncommitted and the report said "clean").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_refused_a_few_times_is_retried_until_it_commits() {
    captured();
    let (result, took, committed) = stop_while_commits_are_refused(3).await;
    let report = result.expect("run() returns a report");
    eprintln!(
        "final commit refused 3 times: stop took {took:?}; {report:?}; committed {committed:?}"
    );
    assert_eq!(committed, Some(3), "committed on a later try");
    assert!(report.is_clean(), "{report:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// Issue 23: a final commit that still fails at the shutdown deadline is reported: the
/// report is not clean, names the partition and offset left uncommitted and the error, and
/// `into_result()` is `Error::Commit` (it was a clean report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_refused_until_the_deadline_is_reported() {
    captured();
    let (result, took, committed) = stop_while_commits_are_refused(1000).await;
    let report = result.expect("run() returns a report");
    eprintln!("final commit always refused: stop took {took:?}; {report:?}");
    assert_eq!(committed, None, "nothing was committed");
    assert!(!report.is_clean(), "{report:?}");
    assert_eq!(report.abandoned, 0);
    assert_eq!(report.uncommitted.len(), 1, "{report:?}");
    assert!(report.uncommitted[0].ends_with("/0@3"), "{report:?}");
    assert!(
        report
            .commit_error
            .as_ref()
            .and_then(|e| e.rdkafka_error_code())
            .is_some(),
        "{report:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "retried until the deadline (3 s), not past it: {took:?}"
    );
    let err = report.into_result().expect_err("not clean");
    assert!(err.is_commit_failed(), "{err:?}");
    assert!(err.to_string().contains("/0@3"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Pipelined dead letters: the partition moves on while a letter is written; its offset waits
// ---------------------------------------------------------------------------------------------

/// The Kafka sink, failing its first `failures` sends (an error or a panic); later sends
/// wait for `gate`.
#[derive(Debug)]
struct GatedSink {
    inner: KafkaDeadLetterSink,
    /// How many of the first sends fail, and how.
    failures: u32,
    fail: Fail,
    sends: AtomicU32,
    gate: tokio::sync::Semaphore,
}

/// How a [`GatedSink`]'s failing sends fail.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Error,
    Panic,
}

impl GatedSink {
    fn new(failures: u32, fail: Fail) -> Arc<GatedSink> {
        Arc::new(GatedSink {
            inner: KafkaDeadLetterSink::builder(support::bootstrap())
                .build()
                .expect("sink"),
            failures,
            fail,
            sends: AtomicU32::new(0),
            gate: tokio::sync::Semaphore::new(0),
        })
    }
}

#[async_trait]
impl DeadLetterSink for GatedSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        let n = self.sends.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        if n <= self.failures {
            match self.fail {
                Fail::Panic => panic!("the sink panics on send {n}"),
                Fail::Error => {
                    return Err(DeadLetterError {
                        coordinates: letter.record.coordinates(),
                        destination: "flaky sink".into(),
                        source: format!("send {n} fails").into(),
                    });
                }
            }
        }
        let _permit = self.gate.acquire().await.expect("gate semaphore closed");
        self.inner.send(letter).await
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter) // through the faults above, queued nowhere
    }
    fn topics_for(&self, source_topic: &str) -> Vec<String> {
        self.inner.topics_for(source_topic)
    }
}

/// Record 2 of [`five_with`]`(Act::Permanent)` on partition 0 of `case` (which has 2): its
/// letter's first two sends fail, the third waits for the gate. The records after it are
/// handled meanwhile, but the commit stays at it — also in a commit pass that came after
/// them (a witness record on partition 1 committed). Then the gate opens: the letter
/// arrives once, everything is committed, the handler ran record 2 once. Returns the letters.
async fn the_letter_holds_the_commit_point(
    case: &Case,
    sink: &GatedSink,
    running: &Running,
) -> Vec<ReadRecord> {
    wait_for(
        "two failed sends, the third waiting",
        Duration::from_secs(30),
        || sink.sends.load(AtomicOrdering::SeqCst) == 3,
    )
    .await;
    wait_for(
        "the records after the letter handled",
        Duration::from_secs(30),
        || case.log.handled_count() == 4,
    )
    .await;
    wait_for("offsets 0 and 1 committed", Duration::from_secs(10), || {
        committed_now(running) == Some(2)
    })
    .await;
    the_next_commit_pass(running, &case.topic).await;
    assert_eq!(committed_now(running), Some(2), "held at the letter");
    assert_eq!(committed0(&case.group, &case.topic).await, Some(2));
    assert!(support::read_all(&case.dlt).await.is_empty());

    sink.gate.add_permits(1 << 20);
    let letters = support::read_at_least(&case.dlt, 1, Duration::from_secs(30)).await;
    wait_for("everything committed", Duration::from_secs(10), || {
        committed_now(running) == Some(5)
    })
    .await;
    assert_eq!(letters.len(), 1, "the letter arrives once");
    assert_eq!(header_int(&letters[0], headers::ORIGINAL_OFFSET), Some(2));
    assert_eq!(case.log.attempts_of(2), [1], "the handler is not run again");
    letters
}

/// The id of the witness record of [`the_next_commit_pass`].
const WITNESS: u64 = 100;

/// Waits for a commit pass that comes after everything before the call: produces a witness
/// record (event [`WITNESS`]) to partition 1 of `topic` (which needs 2 partitions) and waits
/// until the consumer committed it (a pass commits every partition that moved).
async fn the_next_commit_pass(running: &Running, topic: &str) {
    support::produce(topic, vec![ev(WITNESS, Act::Ok).partition(1)]).await;
    wait_for("the witness committed", Duration::from_secs(30), || {
        running
            .snapshot()
            .partitions
            .iter()
            .any(|p| p.partition == 1 && p.committed == Some(1))
    })
    .await;
}

/// The committed offset the running consumer last reported for partition 0.
fn committed_now(running: &Running) -> Option<i64> {
    running
        .snapshot()
        .partitions
        .first()
        .and_then(|p| p.committed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dead_letter_write_lets_the_partition_move_on_but_holds_its_commit_point() {
    let case = Case::new("pipelined-dlt", 2).await;
    support::produce(&case.topic, five_with(Act::Permanent)).await;
    let sink = GatedSink::new(2, Fail::Error);
    // Partition ordering (the default): one record of the partition handled at a time, yet
    // the records after the letter run while it is written.
    let running =
        Running::start(builder(&case.log, &case.topic, &case.group).dead_letter_sink(sink.clone()));
    the_letter_holds_the_commit_point(&case, &sink, &running).await;
    running.stop_clean().await;
    assert_eq!(committed0(&case.group, &case.topic).await, Some(5));
    assert_eq!(support::read_all(&case.dlt).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_still_pending_at_shutdown_is_reported_abandoned_and_not_committed_past() {
    let (topic, dlt, group, log) = Case::new("pipelined-dlt-stop", 1).await.parts();
    support::produce(&topic, five_with(Act::Permanent)).await;
    let sink = GatedSink::new(u32::MAX, Fail::Error);
    let running = Running::start(
        builder(&log, &topic, &group)
            .shutdown_timeout(Duration::from_secs(1))
            .dead_letter_sink(sink.clone()),
    );
    wait_for(
        "the records after the letter handled",
        Duration::from_secs(30),
        || log.handled_count() == 4,
    )
    .await;
    assert!(sink.sends.load(AtomicOrdering::SeqCst) >= 1);

    let (result, _) = running.stop().await;
    let report = result.expect("run() returns a report");
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert_eq!(report.abandoned_records, [format!("{topic}/0@2")]);
    assert_eq!(
        committed0(&group, &topic).await,
        Some(2),
        "the commit stops at the record whose letter was never acknowledged"
    );
    assert!(support::read_all(&dlt).await.is_empty());
}

/// Completions (single or batched) wait for `gate` (a slow store).
#[derive(Debug)]
struct GatedComplete {
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl StoreHook for GatedComplete {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        if let StoreCall::Complete { .. } | StoreCall::CompleteMany { .. } = call {
            let _permit = self.gate.acquire().await.expect("gate semaphore closed");
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_run_behind_the_lane_and_the_commit_waits_for_them() {
    let (topic, _, group, log) = Case::new("pipelined-complete", 2).await.parts();
    support::produce(&topic, five_with(Act::Ok)).await;
    let gated = GatedComplete {
        gate: tokio::sync::Semaphore::new(0),
    };
    let store = Arc::new(HookedStore::new(
        Arc::new(InMemoryIdempotencyStore::new()),
        gated,
    ));
    // The witness (event 100, partition 1) has no dedup key: nothing holds its commit.
    let running = Running::start(builder(&log, &topic, &group).idempotency(Idempotency::new(
        store.clone(),
        DedupKey::from_fn(|m: &Message<Ev>| {
            (m.event().id != WITNESS).then(|| m.event().id.to_string())
        }),
    )));
    // Every record is handled while no key could be marked done yet.
    log.wait_handled(5).await;
    the_next_commit_pass(&running, &topic).await;
    assert_eq!(committed_now(&running), None);
    assert_eq!(
        committed0(&group, &topic).await,
        None,
        "nothing committed before its key is done"
    );
    store.hook().gate.add_permits(1 << 20);
    wait_for("everything committed", Duration::from_secs(10), || {
        committed_now(&running) == Some(5)
    })
    .await;
    running.stop_clean().await;
    assert_eq!(committed0(&group, &topic).await, Some(5));
}
