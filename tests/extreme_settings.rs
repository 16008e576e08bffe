//! Extreme durations against the real broker (delivery rule 17 in the crate docs: every
//! duration is bounded where it enters). Each setting below was accepted by `build()` and then
//! panicked at run time (`overflow when adding duration to instant`); now each is either
//! refused by `build()` with a typed error or taken at its documented bound, and every record
//! still ends in a defined state.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::{
    BreakerPolicy, BreakerStatus, ConfigError, Error, Handler, HandlerError, Message,
    MissingTopics, ProcessingOrder, RecordOutcome, RetryPolicy, RetryingConsumerBuilder,
    ShutdownReport, async_trait,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};

#[derive(Debug, Deserialize)]
struct Ev {
    id: u64,
}

/// What the handler does on a record's first call (later calls succeed).
#[derive(Debug, Clone, Copy)]
enum First {
    Succeed,
    /// A transient failure, with this retry-after hint if any.
    Fail(Option<Duration>),
    /// A transient failure of the record with this id only; the others succeed.
    FailOnly(u64),
}

/// Sleeps `sleep` on every call (so no record ends at its first poll), then answers as
/// `first` says on a record's first call and succeeds on later ones. Counts calls per id.
struct Scripted {
    first: First,
    sleep: Duration,
    calls: Arc<Mutex<HashMap<u64, u32>>>,
}

#[async_trait]
impl Handler for Scripted {
    type Event = Ev;

    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(m.event().id).or_default();
            *n += 1;
            *n
        };
        tokio::time::sleep(self.sleep).await;
        match self.first {
            First::Fail(hint) if n == 1 => {
                let e = HandlerError::transient("429 too many requests");
                Err(match hint {
                    Some(d) => e.retry_after(d),
                    None => e,
                })
            }
            First::FailOnly(id) if n == 1 && m.event().id == id => {
                Err(HandlerError::transient("451 try later"))
            }
            _ => Ok(()),
        }
    }
}

/// Each record's outcomes, by `(partition, offset)`.
type Outcomes = Arc<Mutex<BTreeMap<(i32, i64), Vec<RecordOutcome>>>>;

/// A test's consumer: what its handler saw and each record's outcomes, by offset.
struct Probe {
    calls: Arc<Mutex<HashMap<u64, u32>>>,
    outcomes: Outcomes,
}

impl Probe {
    fn builder(
        first: First,
        sleep: Duration,
        topic: &str,
        group: &str,
    ) -> (Probe, RetryingConsumerBuilder<Scripted>) {
        let calls: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
        let outcomes: Outcomes = Arc::default();
        let seen = outcomes.clone();
        let handler = Scripted {
            first,
            sleep,
            calls: calls.clone(),
        };
        let builder = consumer::builder(handler, topic, group)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 3))
            .on_outcome(move |record, outcome| {
                seen.lock()
                    .unwrap()
                    .entry((record.partition, record.offset))
                    .or_default()
                    .push(outcome);
            });
        (Probe { calls, outcomes }, builder)
    }

    fn called(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn calls_of_each(&self) -> Vec<u32> {
        self.calls.lock().unwrap().values().copied().collect()
    }

    fn handled(&self) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .values()
            .filter(|o| o.as_slice() == [RecordOutcome::Handled])
            .count()
    }

    /// Every record's outcomes: exactly one each, `n` records.
    fn assert_one_outcome_each(&self, n: usize) -> Vec<RecordOutcome> {
        let outcomes = self.outcomes.lock().unwrap();
        for (at, o) in outcomes.iter() {
            assert_eq!(o.len(), 1, "record {at:?} has outcomes {o:?}");
        }
        assert_eq!(
            outcomes.len(),
            n,
            "records with an outcome (a record whose worker panicked has none): {outcomes:?}"
        );
        outcomes.values().map(|o| o[0]).collect()
    }
}

/// `n` events with ids `0..n`, keyed `k<id>`, produced to `topic` round-robin over
/// `partitions` partitions.
async fn produce(topic: &str, n: u64, partitions: i32) {
    let records = (0..n)
        .map(|id| {
            TestRecord::new()
                .key(format!("k{id}"))
                .value(format!(r#"{{"id":{id}}}"#))
                .partition((id % partitions as u64) as i32)
        })
        .collect();
    support::produce(topic, records).await;
}

async fn stop(running: Running) -> ShutdownReport {
    running.stop_with_report(Duration::from_secs(60)).await
}

/// `n` records on `topic` (`partitions` partitions), a consumer of them that `set` configures
/// and whose handler succeeds: every record is handled, once, and the shutdown is clean.
async fn handles_every_record_cleanly(
    (topic, group): (&str, &str),
    n: u64,
    partitions: i32,
    set: impl FnOnce(RetryingConsumerBuilder<Scripted>) -> RetryingConsumerBuilder<Scripted>,
) {
    produce(topic, n, partitions).await;
    let (probe, b) = Probe::builder(First::Succeed, Duration::from_millis(5), topic, group);
    let running = Running::start(set(b));
    let n = usize::try_from(n).unwrap();
    wait_for(
        &format!("{n} records handled"),
        Duration::from_secs(60),
        || probe.handled() == n,
    )
    .await;
    let report = stop(running).await;
    assert!(report.is_clean(), "{report:?}");
    probe.assert_one_outcome_each(n);
}

/// Waits until the handler has been called for all `n` records and, with a breaker, until
/// `breaker_open` holds of it; lets the records settle into their waits for `settle`, then
/// stops: the shutdown gives all `n` up, each with exactly one outcome, `Abandoned`.
async fn every_record_abandoned_at_shutdown(
    probe: &Probe,
    running: Running,
    n: usize,
    breaker_open: Option<fn(&BreakerStatus) -> bool>,
    settle: Duration,
) {
    wait_for(
        &format!("{n} records called"),
        Duration::from_secs(60),
        || probe.called() == n,
    )
    .await;
    if let Some(open) = breaker_open {
        wait_for("the breaker open", Duration::from_secs(30), || {
            running
                .monitor
                .snapshot()
                .breaker
                .as_ref()
                .is_some_and(open)
        })
        .await;
    }
    tokio::time::sleep(settle).await;
    let report = stop(running).await;
    assert_eq!(report.abandoned, n, "{report:?}");
    let outcomes = probe.assert_one_outcome_each(n);
    assert!(outcomes.iter().all(|o| *o == RecordOutcome::Abandoned));
}

/// `stall_threshold(Duration::MAX)`, the natural way to switch it off: every record is
/// handled. Before, the stall timer of each partition's first record panicked: 0 of 40 handled
/// and `run()` still returned a clean report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_threshold_of_duration_max_handles_every_record() {
    let (topic, group, _) = setup("stall-max", 4).await;
    handles_every_record_cleanly((&topic, &group), 40, 4, |b| {
        b.stall_threshold(Duration::MAX)
    })
    .await;
}

/// `shutdown_timeout(Duration::MAX)`: the shutdown is clean and `run()` returns. Before, the
/// deadline panicked on the poll thread: `run()` returned "the poll thread panicked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_timeout_of_duration_max_shuts_down_cleanly() {
    let (topic, group, _) = setup("shutdown-max", 2).await;
    handles_every_record_cleanly((&topic, &group), 10, 2, |b| {
        b.shutdown_timeout(Duration::MAX)
    })
    .await;
}

/// `revoke_timeout(Duration::MAX)`: refused by `build()`, since a revoke that waits as long as
/// `max.poll.interval.ms` (librdkafka's default, 300 s, when not set) gets the member kicked
/// out of its group. Before, `build()` accepted it: a rebalance panicked in the revoke
/// callback, and a plain shutdown never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_timeout_of_duration_max_is_refused_by_build() {
    let (topic, group, _) = setup("revoke-max", 1).await;
    for (timeout, max_poll) in [
        (Duration::MAX, None),
        (Duration::from_secs(300), None),
        (Duration::MAX, Some("600000")),
    ] {
        let (_, mut b) = Probe::builder(First::Succeed, Duration::ZERO, &topic, &group);
        b = b.revoke_timeout(timeout);
        if let Some(ms) = max_poll {
            b = b.kafka_config("max.poll.interval.ms", ms);
        }
        match b.build() {
            Err(Error::Config(ConfigError::Invalid { setting, reason })) => {
                assert_eq!(setting, "revoke_timeout");
                assert!(reason.contains("max.poll.interval.ms"), "{reason}");
            }
            Err(other) => panic!("{timeout:?}: expected a config error, got {other}"),
            Ok(_) => panic!("{timeout:?}: accepted"),
        }
    }
}

/// `startup_timeout(Duration::MAX)`: the startup checks pass and records are handled. Before,
/// the checks' first deadline panicked and nothing was handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_timeout_of_duration_max_handles_records() {
    let (topic, group, _) = setup("startup-max", 2).await;
    handles_every_record_cleanly((&topic, &group), 20, 2, |b| {
        b.startup_timeout(Duration::MAX)
    })
    .await;
}

/// `startup_timeout(Duration::MAX)` with `MissingTopics::create`: the missing dead-letter
/// topic is created and records are handled. Before, creating it panicked
/// (`remaining + 1 s` in the topic admin overflowed) and `run()` panicked with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_timeout_of_duration_max_creates_missing_topics() {
    let (topic, group) = consumer::topic_and_group("startup-max-create", 1).await;
    handles_every_record_cleanly((&topic, &group), 5, 1, |b| {
        b.startup_timeout(Duration::MAX)
            .missing_topics(MissingTopics::create(1))
    })
    .await;
    assert_eq!(
        support::partitions_of(&format!("{topic}.dlt")).await,
        [0],
        "the dead-letter topic was created"
    );
}

/// `RetryPolicy::fixed(Duration::MAX, 1)`: the failed record waits out its back-off (a year at
/// most) without holding its slot, the others are handled, and the shutdown gives it up and
/// lists it. Before, deciding the back-off panicked: the record was neither retried nor listed
/// in the shutdown report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_delay_of_duration_max_parks_the_record_and_lists_it_at_shutdown() {
    let (topic, group, _) = setup("retry-max", 1).await;
    produce(&topic, 10, 1).await;
    // Record 0 fails once; the others succeed. Key order: they do not wait behind it.
    let (probe, b) = Probe::builder(First::FailOnly(0), Duration::ZERO, &topic, &group);
    let running = Running::start(
        b.ordering(ProcessingOrder::Key)
            .retry_policy(RetryPolicy::fixed(Duration::MAX, 1)),
    );
    wait_for("9 records handled", Duration::from_secs(60), || {
        probe.handled() == 9
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = stop(running).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert_eq!(report.abandoned_records, [format!("{topic}/0@0")]);
    assert_eq!(probe.calls.lock().unwrap().get(&0), Some(&1), "not retried");
    let outcomes = probe.outcomes.lock().unwrap();
    assert_eq!(
        outcomes.get(&(0, 0)).map(Vec::as_slice),
        Some([RecordOutcome::Abandoned].as_slice())
    );
    assert_eq!(outcomes.len(), 10);
}

/// A handler hinting `retry_after(Duration::MAX)` on each record's first call, no breaker:
/// each record waits out the hint (capped at a day) without its slot, and the shutdown gives
/// all 40 up and lists them. Before, every back-off panicked (`consumer/worker.rs:125`): no
/// record had an outcome or was listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_hint_of_duration_max_ends_every_record() {
    let (topic, group, _) = setup("hint-max", 1).await;
    produce(&topic, 40, 1).await;
    let (probe, b) = Probe::builder(
        First::Fail(Some(Duration::MAX)),
        Duration::from_millis(5),
        &topic,
        &group,
    );
    let running = Running::start(b.ordering(ProcessingOrder::Unordered));
    every_record_abandoned_at_shutdown(&probe, running, 40, None, Duration::from_millis(500)).await;
    assert!(
        probe.calls_of_each().iter().all(|n| *n == 1),
        "the day's wait is honoured"
    );
}

/// The same hint with an outage breaker: the breaker opens for the hint (capped at a day),
/// records wait for it, and the shutdown gives all 40 up. Before, opening the breaker panicked
/// (`consumer/breaker.rs:848`) on nearly every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_hint_of_duration_max_with_a_breaker_ends_every_record() {
    let (topic, group, _) = setup("hint-max-breaker", 1).await;
    produce(&topic, 40, 1).await;
    // Each first call takes a second, so that all 40 are running before the breaker opens.
    let (probe, b) = Probe::builder(
        First::Fail(Some(Duration::MAX)),
        Duration::from_secs(1),
        &topic,
        &group,
    );
    let running = Running::start(
        b.ordering(ProcessingOrder::Unordered)
            .breaker(BreakerPolicy::default()),
    );
    every_record_abandoned_at_shutdown(
        &probe,
        running,
        40,
        Some(|b| b.opened == 1),
        Duration::from_secs(2),
    )
    .await;
}

/// `BreakerPolicy::with_open_interval(Duration::MAX, Duration::MAX)`: the breaker opens for a
/// day (the documented cap), the records wait for it, and the shutdown gives all 40 up.
/// Before, opening it panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_open_interval_of_duration_max_ends_every_record() {
    let (topic, group, _) = setup("open-max", 1).await;
    produce(&topic, 40, 1).await;
    let (probe, b) = Probe::builder(First::Fail(None), Duration::from_secs(1), &topic, &group);
    let running = Running::start(
        b.ordering(ProcessingOrder::Unordered)
            .breaker(BreakerPolicy::default().with_open_interval(Duration::MAX, Duration::MAX)),
    );
    every_record_abandoned_at_shutdown(
        &probe,
        running,
        40,
        Some(|b| b.opened == 1 && b.open_interval == Duration::from_secs(86_400)),
        Duration::from_secs(2),
    )
    .await;
}
