//! kourier's metrics (`kourier::metrics`) read back through a test recorder, against the real
//! broker: records handled, retried by attempt, dead-lettered by kind, duplicates skipped,
//! store errors, dead-letter write failures, handler durations, commits, the in-flight
//! gauge, consumer lag and paused partitions, the outage breaker — and the matching
//! `ConsumerSnapshot` counts.
//!
//! The consumer's workers run on the runtime's threads and its poll thread on its own, so the
//! recorder must be the *global* one: this test binary installs `metrics-util`'s
//! `DebuggingRecorder` once. Its snapshots reset what they read (counters and gauges swap to
//! zero), so the tests run one at a time and add the snapshots up.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topic and group.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kourier::metrics::{self as m, labels};
use kourier::{
    DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink, DedupKey, Handler,
    HandlerError, Idempotency, InMemoryIdempotencyStore, Message, PendingLetter, ProcessingOrder,
    RetryPolicy, RetryingConsumerBuilder, async_trait,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde::{Deserialize, Serialize};
use support::TestRecord;
use support::consumer::{self, Running, setup, topic_and_group, wait_for};
use support::store::SpyStore;

// ───────────── the recorder ─────────────

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("install the test recorder");
        snapshotter
    })
}

/// One test at a time: snapshots reset the shared recorder.
async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    let _ = snapshotter().snapshot(); // forget what earlier tests left
    guard
}

type Key = (String, Vec<(String, String)>);

/// Snapshots added up: counters and gauge deltas summed, gauge readings and histogram values
/// kept.
#[derive(Default)]
struct Seen {
    counters: HashMap<Key, u64>,
    gauge_sums: HashMap<Key, f64>,
    gauge_readings: HashMap<Key, Vec<f64>>,
    histograms: HashMap<Key, Vec<f64>>,
}

impl Seen {
    fn take(&mut self) {
        for (key, _, _, value) in snapshotter().snapshot().into_vec() {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let k = (key.key().name().to_owned(), labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(k).or_default() += n,
                DebugValue::Gauge(g) => {
                    *self.gauge_sums.entry(k.clone()).or_default() += g.into_inner();
                    self.gauge_readings
                        .entry(k)
                        .or_default()
                        .push(g.into_inner());
                }
                DebugValue::Histogram(values) => self
                    .histograms
                    .entry(k)
                    .or_default()
                    .extend(values.into_iter().map(|v| v.into_inner())),
            }
        }
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> Key {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        (name.to_owned(), labels)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .get(&Self::key(name, labels))
            .copied()
            .unwrap_or(0)
    }

    /// A gauge moved with increment/decrement: the sum of every reading.
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.gauge_sums
            .get(&Self::key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// A gauge that is set: the readings since the last `take`s (0 when not set since).
    fn readings(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.gauge_readings
            .get(&Self::key(name, labels))
            .cloned()
            .unwrap_or_default()
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.histograms
            .get(&Self::key(name, labels))
            .cloned()
            .unwrap_or_default()
    }

    /// Every series named `name` with its labels, for failure messages.
    fn series(&self, name: &str) -> Vec<String> {
        self.counters
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| format!("{l:?}={v}"))
            .collect()
    }
}

// ───────────── the consumer under test ─────────────

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u32,
    #[serde(default)]
    fail_transient: u32,
    #[serde(default)]
    permanent: bool,
    /// Wait for the test's permit before finishing.
    #[serde(default)]
    block: bool,
}

impl Ev {
    fn new(id: u32) -> Self {
        Ev {
            id,
            fail_transient: 0,
            permanent: false,
            block: false,
        }
    }
    fn record(&self, event_id: &str) -> TestRecord {
        TestRecord::new()
            .key(format!("k{}", self.id))
            .value(serde_json::to_vec(self).unwrap())
            .header("event-id", Some(event_id.as_bytes().to_vec()))
    }
}

/// Records of `n` events (event ids `e-0`, `e-1`, ...) that wait for the test's permit.
fn blocked_records(n: u32) -> Vec<TestRecord> {
    (0..n)
        .map(|i| {
            let mut ev = Ev::new(i);
            ev.block = true;
            ev.record(&format!("e-{i}"))
        })
        .collect()
}

struct TestHandler {
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Handler for TestHandler {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let ev = m.event();
        if ev.block {
            self.gate.acquire().await.expect("gate closed").forget();
        }
        if ev.permanent {
            return Err(HandlerError::permanent(format!("{} is bad", ev.id)));
        }
        if m.attempt() <= ev.fail_transient {
            return Err(HandlerError::transient(format!(
                "{} failed on attempt {}",
                ev.id,
                m.attempt()
            )));
        }
        Ok(())
    }
}

/// A dead-letter sink that refuses its first `fail_first` writes, then accepts everything.
#[derive(Debug, Default)]
struct FlakySink {
    fail_first: u32,
    calls: AtomicU32,
    letters: Mutex<Vec<DeadLetter>>,
}

#[async_trait]
impl DeadLetterSink for FlakySink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        if self.calls.fetch_add(1, AtomicOrdering::SeqCst) < self.fail_first {
            return Err(DeadLetterError {
                coordinates: letter.record.coordinates(),
                destination: "memory".into(),
                source: "refused by the test".into(),
            });
        }
        self.letters.lock().unwrap().push(letter.clone());
        Ok(DeadLetterReceipt {
            topic: "memory".into(),
            partition: None,
            offset: None,
        })
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter)
    }
    fn topics_for(&self, _source_topic: &str) -> Vec<String> {
        Vec::new() // in memory: no topic to check
    }
}

fn builder(
    topic: &str,
    group: &str,
    gate: &Arc<tokio::sync::Semaphore>,
) -> RetryingConsumerBuilder<TestHandler> {
    consumer::builder(TestHandler { gate: gate.clone() }, topic, group)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(10), 2))
}

// ───────────── tests ─────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_counted_by_topic_attempt_and_kind() {
    let _one_at_a_time = exclusive().await;
    let (topic, group) = topic_and_group("metrics-outcomes", 1).await;
    let mut flaky = Ev::new(2);
    flaky.fail_transient = 2; // attempts 1 and 2 fail, 3 succeeds
    let mut bad = Ev::new(3);
    bad.permanent = true;
    let mut hopeless = Ev::new(5);
    hopeless.fail_transient = 99; // 3 attempts, then retries-exhausted
    support::produce(
        &topic,
        vec![
            Ev::new(1).record("e-1"),
            flaky.record("e-2"),
            bad.record("e-3"),
            TestRecord::new()
                .key("k4")
                .value("not json")
                .header("event-id", Some(b"e-4".to_vec())),
            hopeless.record("e-5"),
            Ev::new(1).record("e-1"), // a duplicate of the first
        ],
    )
    .await;

    let sink = Arc::new(FlakySink {
        fail_first: 2,
        ..FlakySink::default()
    });
    let store = SpyStore::failing_first_claims(Arc::new(InMemoryIdempotencyStore::new()), 1);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = Running::start(
        builder(&topic, &group, &gate)
            .dead_letter_sink(sink.clone())
            .idempotency(Idempotency::new(store, DedupKey::header("event-id"))),
    );
    wait_for("6 records settled", Duration::from_secs(60), || {
        let s = c.monitor.snapshot();
        s.handled + s.duplicates + s.dead_lettered.total() >= 6 && s.in_flight == 0
    })
    .await;
    let snapshot = c.monitor.snapshot();
    c.stop().await;

    let mut seen = Seen::default();
    seen.take();
    let tg: &[(&str, &str)] = &[(labels::TOPIC, &topic), (labels::GROUP, &group)];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = tg.to_vec();
        l.push(extra);
        l
    };
    assert_eq!(seen.counter(m::RECORDS_CONSUMED, tg), 6);
    assert_eq!(seen.counter(m::RECORDS_HANDLED, tg), 2, "events 1 and 2");
    assert_eq!(
        seen.counter(m::RECORDS_RETRIED, &with((labels::ATTEMPT, "1"))),
        2,
        "events 2 and 5 failed their first attempt; series: {:?}",
        seen.series(m::RECORDS_RETRIED)
    );
    assert_eq!(
        seen.counter(m::RECORDS_RETRIED, &with((labels::ATTEMPT, "2"))),
        2
    );
    assert_eq!(
        seen.counter(m::RECORDS_RETRIED, &with((labels::ATTEMPT, "3"))),
        0
    );
    for (kind, n) in [("decode", 1), ("permanent", 1), ("retries-exhausted", 1)] {
        assert_eq!(
            seen.counter(m::RECORDS_DEAD_LETTERED, &with((labels::KIND, kind))),
            n,
            "{kind}; series: {:?}",
            seen.series(m::RECORDS_DEAD_LETTERED)
        );
    }
    assert_eq!(seen.counter(m::DUPLICATES_SKIPPED, tg), 1);
    assert_eq!(seen.counter(m::DEAD_LETTER_WRITE_FAILURES, tg), 2);
    assert_eq!(
        seen.counter(m::STORE_ERRORS, &with((labels::OPERATION, "claim"))),
        1
    );
    // Attempts: event 1 once, 2 three times, 3 once, 5 three times (4 never reaches it).
    assert_eq!(seen.histogram(m::HANDLER_DURATION, tg).len(), 8);
    let g: &[(&str, &str)] = &[(labels::GROUP, &group)];
    assert!(
        !seen.histogram(m::COMMIT_DURATION, g).is_empty(),
        "commits are timed"
    );
    assert_eq!(
        seen.gauge(m::RECORDS_IN_FLIGHT, g),
        0.0,
        "every record left"
    );

    assert_eq!(snapshot.handled, 2);
    assert_eq!(snapshot.retried, 4);
    assert_eq!(snapshot.duplicates, 1);
    let d = snapshot.dead_lettered;
    assert_eq!((d.decode, d.permanent, d.retries_exhausted), (1, 1, 1));
    assert_eq!(sink.letters.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_follows_running_records() {
    let _one_at_a_time = exclusive().await;
    let (topic, group, _dlt) = setup("metrics-in-flight", 1).await;
    support::produce(&topic, blocked_records(3)).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = Running::start(builder(&topic, &group, &gate).ordering(ProcessingOrder::Unordered));
    wait_for("3 records in flight", Duration::from_secs(30), || {
        c.monitor.snapshot().in_flight == 3
    })
    .await;
    let g: &[(&str, &str)] = &[(labels::GROUP, &group)];
    let mut seen = Seen::default();
    seen.take();
    assert_eq!(seen.gauge(m::RECORDS_IN_FLIGHT, g), 3.0);

    gate.add_permits(3);
    wait_for("3 handled", Duration::from_secs(30), || {
        c.monitor.snapshot().handled == 3
    })
    .await;
    c.stop().await;
    seen.take();
    assert_eq!(seen.gauge(m::RECORDS_IN_FLIGHT, g), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_paused_partitions_are_reported_per_partition() {
    let _one_at_a_time = exclusive().await;
    let (topic, group, _dlt) = setup("metrics-lag", 1).await;
    support::produce(&topic, blocked_records(20)).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = Running::start(
        builder(&topic, &group, &gate)
            .max_buffered_records_per_partition(5)
            .kafka_config("statistics.interval.ms", "200"),
    );
    let p0: &[(&str, &str)] = &[
        (labels::TOPIC, &topic),
        (labels::GROUP, &group),
        (labels::PARTITION, "0"),
    ];
    let mut seen = Seen::default();

    // Nothing committed yet: the lag counts from the first offset read.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        seen.take();
        let lag = seen.readings(m::CONSUMER_LAG, p0);
        let paused = seen.readings(m::PARTITION_PAUSED, p0);
        if lag.contains(&20.0) && paused.contains(&1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag 20 and a pause not reported; lag readings {lag:?}, paused readings {paused:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.monitor.snapshot().paused, vec![(topic.clone(), 0)]);

    // 12 done and committed: librdkafka's consumer_lag (end − committed) takes over.
    gate.add_permits(12);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        seen.gauge_readings.clear();
        seen.take();
        if seen.readings(m::CONSUMER_LAG, p0).contains(&8.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag 8 not reported; readings {:?}",
            seen.readings(m::CONSUMER_LAG, p0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.add_permits(8);
    wait_for("20 handled", Duration::from_secs(30), || {
        c.monitor.snapshot().handled == 20
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_reports_its_state_transitions_and_held_failures() {
    use std::sync::atomic::AtomicBool;
    let _one_at_a_time = exclusive().await;
    let (topic, group, _dlt) = setup("metrics-breaker", 1).await;
    support::produce(
        &topic,
        (0..20)
            .map(|i| Ev::new(i).record(&format!("e-{i}")))
            .collect(),
    )
    .await;
    let down = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicU32::new(0));
    let handler = {
        let (down, handled) = (down.clone(), handled.clone());
        kourier::handler_fn(move |_m: Message<Ev>| {
            let (down, handled) = (down.clone(), handled.clone());
            async move {
                if down.load(AtomicOrdering::SeqCst) {
                    return Err(HandlerError::unavailable("connection refused"));
                }
                handled.fetch_add(1, AtomicOrdering::SeqCst);
                Ok(())
            }
        })
    };
    let c = Running::start(
        consumer::builder(handler, &topic, &group).breaker(
            kourier::BreakerPolicy::default()
                .with_open_interval(Duration::from_millis(200), Duration::from_millis(400)),
        ),
    );
    wait_for(
        "the breaker to open and probe",
        Duration::from_secs(60),
        || {
            c.monitor
                .snapshot()
                .breaker
                .is_some_and(|b| b.opened >= 2 && b.held_failures >= 2)
        },
    )
    .await;
    // The recorder keeps a gauge's last value: read it while the downstream is down.
    let mut seen = Seen::default();
    seen.take();
    down.store(false, AtomicOrdering::SeqCst);
    wait_for("20 records handled", Duration::from_secs(60), || {
        handled.load(AtomicOrdering::SeqCst) == 20
    })
    .await;
    let b = c.monitor.snapshot().breaker.expect("a breaker");
    c.stop().await;

    seen.take();
    let g: &[(&str, &str)] = &[(labels::GROUP, &group)];
    let entered = |state: &'static str| {
        seen.counter(
            m::BREAKER_TRANSITIONS,
            &[(labels::GROUP, &group), (labels::STATE, state)],
        )
    };
    assert_eq!(b.state, kourier::BreakerState::Closed);
    assert_eq!(entered("open"), b.opened, "{b:?}");
    assert_eq!(entered("half-open"), b.probes, "{b:?}");
    assert_eq!(entered("closed"), 1, "{b:?}");
    assert_eq!(seen.counter(m::BREAKER_HELD_FAILURES, g), b.held_failures);
    let states = seen.readings(m::BREAKER_STATE, g);
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(
        states[0] == 1.0 || states[0] == 2.0,
        "open or half-open while down: {states:?}"
    );
    assert_eq!(states[1], 0.0, "closed at the end: {states:?}");
}
