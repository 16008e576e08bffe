//! Extreme durations against the engine (delivery rule 17 in the crate docs): a retry policy,
//! an outage breaker, a handler's retry-after hint, the stall threshold, the handler timeout
//! and the idempotency lease at 0, 1 ns, one year or `Duration::MAX` never panic, and the
//! record always ends in a defined state. Broker-free: one worker, driven with in-memory
//! fakes on paused time (a back-off of a year passes at once).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use tokio::time::{Instant, sleep};

use crate::codec::JsonCodec;
use crate::consumer::breaker::{Breaker, BreakerPolicy, OutageGate};
use crate::consumer::dedup::{Dedup, DedupKey};
use crate::consumer::schedule::{JobEnd, Stop};
use crate::consumer::work::{KeepSlot, WorkerContext};
use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
use crate::handler::{Handler, HandlerError};
use crate::idempotency::memory::InMemoryIdempotencyStore;
use crate::message::Message;
use crate::metrics::ConsumerMetrics;
use crate::record::{Headers, RawRecord};
use crate::retry::RetryPolicy;

const DAY: Duration = Duration::from_secs(86_400);
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// What the handler answers on one call.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Ok,
    /// Transient, with an optional retry-after hint.
    Transient(Option<Duration>),
    /// The downstream is unavailable, with an optional retry-after hint.
    Unavailable(Option<Duration>),
    /// Sleeps this long (paused time), then succeeds.
    Sleep(Duration),
}

/// Answers call n with `answers[n - 1]`, the last one repeating; notes when each call began.
struct Script {
    answers: Vec<Answer>,
    calls: AtomicU32,
    t0: Instant,
    at: Mutex<Vec<Duration>>,
}

#[async_trait]
impl Handler for Script {
    type Event = serde_json::Value;

    async fn handle(&self, _: &Message<serde_json::Value>) -> Result<(), HandlerError> {
        self.at.lock().unwrap().push(self.t0.elapsed());
        let n = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
        let answer = self.answers[n.min(self.answers.len() - 1)];
        let hinted = |e: HandlerError, hint: Option<Duration>| match hint {
            Some(d) => e.retry_after(d),
            None => e,
        };
        match answer {
            Answer::Ok => Ok(()),
            Answer::Transient(hint) => Err(hinted(HandlerError::transient("451 try later"), hint)),
            Answer::Unavailable(hint) => Err(hinted(
                HandlerError::unavailable("connection refused"),
                hint,
            )),
            Answer::Sleep(d) => {
                sleep(d).await;
                Ok(())
            }
        }
    }
}

/// A sink that acknowledges every letter.
#[derive(Debug, Default)]
struct AckSink(Mutex<Vec<DeadLetter>>);

#[async_trait]
impl DeadLetterSink for AckSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        self.0.lock().unwrap().push(letter.clone());
        Ok(DeadLetterReceipt {
            topic: "t.dlt".into(),
            partition: Some(0),
            offset: Some(0),
        })
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter)
    }
    fn topics_for(&self, _source_topic: &str) -> Vec<String> {
        Vec::new()
    }
}

/// The settings one engine run takes, as raw as a user may give them.
#[derive(Debug, Clone)]
struct Settings {
    answers: Vec<Answer>,
    policy: RetryPolicy,
    breaker: Option<BreakerPolicy>,
    stall_threshold: Duration,
    handler_timeout: Option<Duration>,
    /// Idempotency (an in-memory store) with this lease and TTL.
    dedup: Option<(Duration, Duration)>,
}

impl Settings {
    fn new(answers: impl Into<Vec<Answer>>) -> Self {
        Settings {
            answers: answers.into(),
            policy: RetryPolicy::fixed(Duration::from_millis(500), 3),
            breaker: None,
            stall_threshold: Duration::from_secs(60),
            handler_timeout: None,
            dedup: None,
        }
    }
}

struct Engine {
    worker: WorkerContext<Script>,
    handler: Arc<Script>,
    sink: Arc<AckSink>,
    t0: Instant,
}

impl Engine {
    fn new(s: Settings) -> Self {
        let t0 = Instant::now();
        let handler = Arc::new(Script {
            answers: s.answers,
            calls: AtomicU32::new(0),
            t0,
            at: Mutex::new(Vec::new()),
        });
        let sink = Arc::new(AckSink::default());
        let metrics = Arc::new(ConsumerMetrics::new("g", &["t".to_owned()]));
        let dedup = s.dedup.map(|(lease, ttl)| {
            Dedup::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                DedupKey::from_fn(|m: &Message<serde_json::Value>| Some(m.offset().to_string())),
                "g".to_owned(),
                (lease, ttl),
                false,
            )
        });
        let worker = WorkerContext {
            handler: handler.clone(),
            codec: Arc::new(JsonCodec::<serde_json::Value>::new()),
            policy: s.policy,
            sink: sink.clone(),
            dedup,
            group_id: "g".to_owned(),
            handler_timeout: s.handler_timeout,
            retry_panics: true,
            stall_threshold: s.stall_threshold,
            metrics: metrics.clone(),
            observer: None,
            outage: OutageGate(
                s.breaker
                    .map(|p| Arc::new(Breaker::new(p, metrics.clone()))),
            ),
            tiers: None,
            destinations: None,
            transactions: None,
        };
        Engine {
            worker,
            handler,
            sink,
            t0,
        }
    }

    /// Runs one record; its partition starts draining at paused time `drain_at` (a revoke or
    /// shutdown, with a minute's deadline, after which it is abandoned). How it ended and
    /// when; a record still running 1000 days in fails the test instead of hanging.
    async fn run(&self, drain_at: Duration) -> (JobEnd, Duration) {
        let stop = Stop::default();
        let (drain, abandon, give_up_by) = (
            stop.drain.clone(),
            stop.abandon.clone(),
            stop.give_up_by.clone(),
        );
        let t0 = self.t0;
        let stopper = tokio::spawn(async move {
            tokio::time::sleep_until(t0 + drain_at).await;
            let deadline = crate::clock::deadline_in(Duration::from_secs(60));
            let _ = give_up_by.set(deadline);
            drain.cancel();
            tokio::time::sleep_until(deadline).await;
            abandon.cancel();
        });
        let record = Arc::new(RawRecord {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k".to_vec().into()),
            value: Some(b"{\"n\":1}".to_vec().into()),
            headers: Headers::new(),
            timestamp: Some(1_700_000_000_000),
            log_append_time: false,
        });
        let end = tokio::time::timeout(1000 * DAY, self.worker.run_job(record, &stop, &KeepSlot))
            .await
            .expect("the record never ended");
        stopper.abort();
        (end, self.t0.elapsed())
    }

    /// When each handler call began (paused time since the engine was built).
    fn calls(&self) -> Vec<Duration> {
        self.handler.at.lock().unwrap().clone()
    }

    fn handled(&self) -> u64 {
        self.worker.metrics.counts.handled.load(Ordering::Relaxed)
    }

    fn dead_letters(&self) -> usize {
        self.sink.0.lock().unwrap().len()
    }

    fn stalled(&self) -> u64 {
        self.worker.metrics.counts.stalled.load(Ordering::Relaxed)
    }
}

/// `stall_threshold(Duration::MAX)`, the natural way to switch it off: a record that does
/// not end at its first poll is handled, not a panic (`started + stall_threshold` overflowed).
#[tokio::test(start_paused = true)]
async fn a_stall_threshold_of_duration_max_is_off() {
    let mut s = Settings::new([Answer::Sleep(Duration::from_secs(3600))]);
    s.stall_threshold = Duration::MAX;
    let e = Engine::new(s);
    let (end, _) = e.run(1000 * DAY).await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!((e.handled(), e.stalled()), (1, 0));
}

/// A transient failure hinting `retry_after(Duration::MAX)`: the hint is clamped to a day
/// (rule 17), the record retries after it and is handled.
#[tokio::test(start_paused = true)]
async fn a_retry_after_hint_of_duration_max_waits_a_day() {
    let e = Engine::new(Settings::new([
        Answer::Transient(Some(Duration::MAX)),
        Answer::Ok,
    ]));
    let (end, _) = e.run(1000 * DAY).await;
    assert_eq!((end, e.handled()), (JobEnd::Settled, 1));
    let calls = e.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[1] >= DAY && calls[1] < DAY + Duration::from_secs(60),
        "the retry came {:?} after the first attempt, not a day",
        calls[1]
    );
}

/// An unavailable downstream hinting `Duration::MAX`, without a breaker: the record waits a
/// day (not forever, and no panic), then is handled.
#[tokio::test(start_paused = true)]
async fn an_unavailable_hint_of_duration_max_waits_a_day_without_a_breaker() {
    let e = Engine::new(Settings::new([
        Answer::Unavailable(Some(Duration::MAX)),
        Answer::Ok,
    ]));
    let (end, _) = e.run(1000 * DAY).await;
    assert_eq!((end, e.handled()), (JobEnd::Settled, 1));
    let calls = e.calls();
    assert!(
        calls[1] >= DAY && calls[1] < DAY + Duration::from_secs(60),
        "{calls:?}"
    );
}

/// The same hint opening a breaker: it stays open a day (the hint, clamped), then a probe
/// goes through and the record is handled.
#[tokio::test(start_paused = true)]
async fn an_unavailable_hint_of_duration_max_opens_the_breaker_for_a_day() {
    let mut s = Settings::new([
        Answer::Unavailable(Some(Duration::MAX)),
        Answer::Unavailable(Some(Duration::MAX)),
        Answer::Ok,
    ]);
    s.breaker = Some(
        BreakerPolicy::default()
            .without_failure_rate()
            .with_consecutive_failures(2),
    );
    let e = Engine::new(s);
    let (end, _) = e.run(1000 * DAY).await;
    assert_eq!((end, e.handled()), (JobEnd::Settled, 1));
    let calls = e.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    // First wait: the hint (a day, breaker closed). Second: the breaker open for the hint.
    assert!(
        calls[2] >= 2 * DAY && calls[2] < 2 * DAY + Duration::from_secs(60),
        "{calls:?}"
    );
}

/// `BreakerPolicy::with_open_interval(Duration::MAX, Duration::MAX)`: the breaker opens (no
/// panic), probes after a day (the documented cap) and the record is handled.
#[tokio::test(start_paused = true)]
async fn a_breaker_open_interval_of_duration_max_probes_after_a_day() {
    let mut s = Settings::new([
        Answer::Unavailable(None),
        Answer::Unavailable(None),
        Answer::Ok,
    ]);
    s.breaker = Some(
        BreakerPolicy::default()
            .without_failure_rate()
            .with_consecutive_failures(2)
            .with_open_interval(Duration::MAX, Duration::MAX),
    );
    let e = Engine::new(s);
    let (end, _) = e.run(1000 * DAY).await;
    assert_eq!((end, e.handled()), (JobEnd::Settled, 1));
    let calls = e.calls();
    assert!(
        calls[2] >= DAY && calls[2] < DAY + Duration::from_secs(60),
        "{calls:?}"
    );
}

/// `RetryPolicy::fixed(Duration::MAX, 1)`: the failed record waits out its back-off (capped
/// at a year) without a slot, and a drain gives it up (listed as abandoned at a shutdown)
/// instead of a panic that left it neither retried nor reported.
#[tokio::test(start_paused = true)]
async fn a_retry_delay_of_duration_max_parks_the_record_until_the_drain() {
    let mut s = Settings::new([Answer::Transient(None), Answer::Ok]);
    s.policy = RetryPolicy::fixed(Duration::MAX, 1);
    let e = Engine::new(s);
    let (end, at) = e.run(Duration::from_secs(10)).await;
    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(
        at,
        Duration::from_secs(10),
        "given up at the drain, at once"
    );
    assert_eq!((e.calls().len(), e.handled(), e.dead_letters()), (1, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Property: every duration through extreme values
// ---------------------------------------------------------------------------------------------

/// 0, 1 ns, 1 ms, one year, `Duration::MAX`, or anything (the builder's tests use it too).
pub(super) fn extreme() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(YEAR),
        Just(Duration::MAX),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..100_000_000_000).prop_map(Duration::from_micros),
    ]
}

fn hint() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![Just(None), extreme().prop_map(Some)]
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        hint().prop_map(Answer::Transient),
        hint().prop_map(Answer::Unavailable),
        extreme().prop_map(Answer::Sleep),
    ]
}

fn policy() -> impl Strategy<Value = RetryPolicy> {
    let base = prop_oneof![
        (extreme(), 0u32..4).prop_map(|(d, retries)| RetryPolicy::fixed(d, retries)),
        (extreme(), extreme(), 1u32..5)
            .prop_map(|(i, m, n)| RetryPolicy::exponential(i, m).with_max_attempts(n)),
    ];
    (base, proptest::option::of(extreme())).prop_map(|(p, elapsed)| match elapsed {
        Some(e) => p.with_max_elapsed(e),
        None => p,
    })
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        proptest::collection::vec(answer(), 0..4),
        policy(),
        proptest::option::of((extreme(), extreme())),
        extreme(),
        proptest::option::of(extreme()),
        // `build()` refuses a zero lease: with one, every claim has lapsed before its
        // attempt starts, and the record only claims again until its partition drains.
        proptest::option::of((
            extreme().prop_filter("a zero lease is refused", |d| !d.is_zero()),
            extreme(),
        )),
    )
        .prop_map(
            |(failures, policy, breaker, stall_threshold, handler_timeout, dedup)| {
                // A few failures, then success: a record failing forever only ends at the drain.
                let mut answers = failures;
                answers.push(Answer::Ok);
                Settings {
                    answers,
                    policy,
                    breaker: breaker.map(|(initial, max)| {
                        BreakerPolicy::default()
                            .with_consecutive_failures(2)
                            .with_open_interval(initial, max)
                    }),
                    stall_threshold,
                    handler_timeout,
                    dedup,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the durations (even ones `build()` refuses, such as zero), the engine never
    /// panics and the record ends: settled (handled or dead-lettered, exactly one of them)
    /// or, only once its partition drains, abandoned.
    #[test]
    fn any_durations_end_the_record_in_a_defined_state(
        s in settings(),
        drain_days in 1u64..800,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (end, at, handled, dead_letters) = runtime.block_on(async {
            let e = Engine::new(s);
            let (end, at) = e.run(DAY * drain_days as u32).await;
            (end, at, e.handled(), e.dead_letters())
        });
        match end {
            JobEnd::Settled => prop_assert_eq!(handled + dead_letters as u64, 1),
            JobEnd::Abandoned => {
                prop_assert!(at >= DAY * drain_days as u32, "abandoned at {:?}, before the drain", at);
                prop_assert_eq!(handled, 0);
            }
            // Only a tier record waiting for its due time is left for later: none here.
            JobEnd::LeftForLater => prop_assert!(false, "left for later without tiers"),
        }
    }
}
