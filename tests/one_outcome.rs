//! One event, one outcome (delivery rules 14 and 18 in the crate docs), against the real
//! broker: copies of an event whose outcome is known are skipped, waits end at the drain,
//! a record given up outside a drain does not freeze its partition, a tier record waiting
//! for its due time at shutdown is left for later, and copies of one event never open the
//! breaker between them.
//!
//! Copies are made the way a crash makes them: the very records kourier read or wrote (the
//! source record, the tier copies it forwarded), produced again.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kourier::dead_letter::headers as dlt;
use kourier::idempotency::testing::{HookedStore, StoreCall, StoreHook};
use kourier::tiers::{
    Admission, InMemoryKeyOrderLedger, KeyOrderLedger, LedgerKey, RetryTiers, SourceId,
    headers as tier,
};
use kourier::{
    BreakerPolicy, DedupKey, HandlerError, Idempotency, InMemoryIdempotencyStore, Message,
    ProcessingOrder, RecordOutcome, RetryPolicy, StoreError, handler_fn,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};
use support::exploding::{ARMED, Exploding};

#[derive(Debug, Deserialize)]
struct Ev {
    id: u64,
}

fn record(id: u64, key: &str) -> TestRecord {
    TestRecord::new()
        .key(key)
        .value(format!(r#"{{"id":{id}}}"#))
        .header("event-id", Some(format!("e-{id}").into_bytes()))
}

/// The same record again, as a redelivery or a stale copy would bring it.
fn again(r: &support::ReadRecord) -> TestRecord {
    let mut t = TestRecord::new().partition(r.partition);
    t.key = r.key.clone();
    t.value = r.value.clone();
    t.headers = r.headers.clone();
    t
}

fn id_of(value: Option<&[u8]>) -> u64 {
    serde_json::from_slice::<Ev>(value.expect("a value"))
        .unwrap()
        .id
}

/// Outcomes and handler calls per event id.
#[derive(Default)]
struct Seen {
    calls: HashMap<u64, u32>,
    outcomes: Vec<(u64, RecordOutcome)>,
}

impl Seen {
    fn count(&self, id: u64, what: fn(&RecordOutcome) -> bool) -> usize {
        self.outcomes
            .iter()
            .filter(|(i, o)| *i == id && what(o))
            .count()
    }
}

type Shared = Arc<Mutex<Seen>>;

fn observe(seen: &Shared) -> impl Fn(&kourier::RawRecord, RecordOutcome) + Send + Sync + 'static {
    let seen = seen.clone();
    move |r, outcome| {
        let id = id_of(r.value.as_deref());
        seen.lock().unwrap().outcomes.push((id, outcome));
    }
}

/// A handler that counts its calls per event id in `seen` and fails transiently when
/// `fails(id, call)` says so (`call` counts from 1).
fn counting(
    seen: &Shared,
    fails: fn(u64, u32) -> bool,
) -> impl kourier::Handler<Event = Ev> + 'static {
    let seen = seen.clone();
    handler_fn(move |m: Message<Ev>| {
        let id = m.event().id;
        let call = {
            let mut s = seen.lock().unwrap();
            let n = s.calls.entry(id).or_default();
            *n += 1;
            *n
        };
        async move {
            if fails(id, call) {
                Err(HandlerError::transient(format!(
                    "call {call} of event {id} fails"
                )))
            } else {
                Ok(())
            }
        }
    })
}

/// A dead-lettered event and an event handled in a tier, delivered again after they ended —
/// their source records and every tier copy, as a crash before the commit brings them back:
/// every copy is skipped. No handler call, no second dead letter, no new forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_settled_events_from_the_source_and_the_tiers_are_skipped() {
    let (topic, group, dlt_topic) = setup("one-outcome-copies", 1).await;
    let tier1 = format!("{topic}.retry.1");
    support::create_topic(&tier1, 1).await;
    // Event 1 always fails (source, tier 1, then the dead-letter topic); event 2 fails once
    // (succeeds in tier 1); event 3 succeeds at once.
    support::produce(&topic, vec![record(1, "a"), record(2, "b"), record(3, "c")]).await;
    let seen: Shared = Arc::default();
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let start = |seen: &Shared| {
        // Event 1 fails every call, event 2 its first one.
        let handler = counting(seen, |id, call| id == 1 || (id == 2 && call == 1));
        Running::start(
            consumer::builder(handler, &topic, &group)
                .retry_policy(RetryPolicy::no_retries())
                .idempotency(Idempotency::new(
                    store.clone(),
                    DedupKey::header("event-id"),
                ))
                .retry_tiers(RetryTiers::new([Duration::from_millis(500)]))
                .on_outcome(observe(seen)),
        )
    };
    let running = start(&seen);
    wait_for("every event ended", Duration::from_secs(30), || {
        let s = seen.lock().unwrap();
        s.count(1, |o| matches!(o, RecordOutcome::DeadLettered(_))) == 1
            && s.count(2, |o| *o == RecordOutcome::Handled) == 1
            && s.count(3, |o| *o == RecordOutcome::Handled) == 1
    })
    .await;
    running.stop().await;
    let calls_before = seen.lock().unwrap().calls.clone();
    assert_eq!(calls_before[&1], 2, "source and tier 1");
    assert_eq!(calls_before[&2], 2);

    // Every record the run read, produced again: 3 source records and 2 tier copies.
    let sources = support::read_all(&topic).await;
    let copies = support::read_all(&tier1).await;
    assert_eq!((sources.len(), copies.len()), (3, 2));
    support::produce(&topic, sources.iter().map(again).collect()).await;
    support::produce(&tier1, copies.iter().map(again).collect()).await;
    let seen_again: Shared = Arc::default();
    let running = start(&seen_again);
    wait_for("every copy ended", Duration::from_secs(30), || {
        seen_again.lock().unwrap().outcomes.len() >= 5
    })
    .await;
    running.stop().await;

    let (outcomes, calls) = {
        let s = seen_again.lock().unwrap();
        (s.outcomes.clone(), s.calls.clone())
    };
    println!("copies: {outcomes:?}");
    assert!(
        outcomes.iter().all(|(_, o)| *o == RecordOutcome::Duplicate),
        "every copy of a settled event is skipped: {outcomes:?}"
    );
    assert!(calls.is_empty(), "no handler call: {calls:?}");
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1, "one dead letter for event 1");
    assert_eq!(
        support::read_all(&tier1).await.len(),
        4,
        "no new forward: the 2 forwards and their 2 copies"
    );
}

/// A key-order ledger whose `settle` answers late: the window in which the key's next
/// record, if it started, would still find the settled record in the ledger.
#[derive(Debug)]
struct SlowSettle(InMemoryKeyOrderLedger);

#[async_trait]
impl KeyOrderLedger for SlowSettle {
    async fn admit(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<Admission, StoreError> {
        self.0.admit(key, record, tier).await
    }
    async fn place(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<(), StoreError> {
        self.0.place(key, record, tier).await
    }
    async fn settle(&self, key: LedgerKey<'_>, record: SourceId) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.settle(key, record).await
    }
}

/// With `with_key_order` and idempotency: A fails once and goes to tier 1, B (same key) is
/// deferred behind it. When A succeeds in tier 1, the ledger lets its key go *before* the
/// lane moves on to B: B runs, instead of being sent round the tier once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_settles_before_the_keys_next_record_starts() {
    let (topic, group, _dlt) = setup("one-outcome-ledger", 1).await;
    support::create_topic(&format!("{topic}.retry.1"), 1).await;
    support::produce(&topic, vec![record(1, "k"), record(2, "k")]).await;
    let seen: Shared = Arc::default();
    let handler = counting(&seen, |id, call| id == 1 && call == 1);
    let running = Running::start(
        consumer::builder(handler, &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .idempotency(Idempotency::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                DedupKey::header("event-id"),
            ))
            .retry_tiers(
                RetryTiers::new([Duration::from_millis(300)])
                    .with_key_order(Arc::new(SlowSettle(InMemoryKeyOrderLedger::new()))),
            )
            .on_outcome(observe(&seen)),
    );
    wait_for("both handled", Duration::from_secs(30), || {
        let s = seen.lock().unwrap();
        (1..=2).all(|id| s.count(id, |o| *o == RecordOutcome::Handled) == 1)
    })
    .await;
    running.stop().await;
    let s = seen.lock().unwrap();
    println!("outcomes: {:?}", s.outcomes);
    let forwards = |id| s.count(id, |o| matches!(o, RecordOutcome::Forwarded(_)));
    assert_eq!(forwards(1), 1, "A: one forward, for its failure");
    assert_eq!(
        forwards(2),
        1,
        "B: deferred once behind A, not sent round the tier again"
    );
}

/// A record in a retry tier waiting for its due time when the consumer stops is *left for
/// later*: the shutdown is clean (nothing of it ran), and the report says how many wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_record_waiting_for_its_due_time_is_left_for_later_at_shutdown() {
    let (topic, group, _dlt) = setup("one-outcome-later", 1).await;
    support::create_topic(&format!("{topic}.retry.1"), 1).await;
    support::produce(&topic, vec![record(1, "k")]).await;
    let seen: Shared = Arc::default();
    let handler = handler_fn(|_m: Message<Ev>| async { Err(HandlerError::transient("down")) });
    let running = Running::start(
        consumer::builder(handler, &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([Duration::from_secs(600)]))
            .on_outcome(observe(&seen)),
    );
    wait_for("forwarded to tier 1", Duration::from_secs(30), || {
        seen.lock()
            .unwrap()
            .count(1, |o| matches!(o, RecordOutcome::Forwarded(1)))
            == 1
    })
    .await;
    wait_for(
        "the tier record taken (waiting for its due time)",
        Duration::from_secs(30),
        || running.monitor.snapshot().waiting_retry == 1,
    )
    .await;
    let report = running.stop_with_report(Duration::from_secs(30)).await;
    println!("report: {report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.abandoned, report.left_for_later), (0, 1));
    assert_eq!(
        seen.lock()
            .unwrap()
            .count(1, |o| *o == RecordOutcome::LeftForLater),
        1
    );
}

/// An idempotency store that is down: every call answers `Unavailable`, one key at a time.
#[derive(Debug, Default)]
struct Down {
    claims: AtomicU32,
}

#[async_trait]
impl StoreHook for Down {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        if let StoreCall::Claim { .. } = call {
            self.claims.fetch_add(1, Ordering::SeqCst);
        }
        Err(StoreError::Unavailable {
            operation: call.operation(),
            source: "connection refused".into(),
        })
    }
}

/// In a store outage, records wait for their claims without their slots; a shutdown gives
/// them up at once (nothing of them ran) instead of waiting out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_waiting_for_their_claims_are_given_up_at_once_at_shutdown() {
    let (topic, group, _dlt) = setup("one-outcome-claims", 2).await;
    support::produce(
        &topic,
        (0..10).map(|id| record(id, &format!("k{id}"))).collect(),
    )
    .await;
    // The in-memory store is never reached.
    let down = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), Down::default());
    let store = Arc::new(down.one_by_one());
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = handler_fn(move |_m: Message<Ev>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let running = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(2)
            .idempotency(Idempotency::new(
                store.clone(),
                DedupKey::header("event-id"),
            ))
            .shutdown_timeout(Duration::from_secs(60)),
    );
    wait_for(
        "records waiting for their claims",
        Duration::from_secs(30),
        || store.hook().claims.load(Ordering::SeqCst) >= 20,
    )
    .await;
    // Waiting for a claim holds no slot: more records wait than there are slots.
    let snapshot = running.monitor.snapshot();
    println!(
        "in flight {} waiting {} (max_in_flight 2)",
        snapshot.in_flight, snapshot.waiting_retry
    );
    assert!(snapshot.in_flight > 2, "{snapshot:?}");
    let started = Instant::now();
    let report = running.stop_with_report(Duration::from_secs(50)).await;
    let took = started.elapsed();
    println!("shutdown took {took:?}: {report:?}");
    assert!(
        took < Duration::from_secs(15),
        "the shutdown waited for the store: {took:?}"
    );
    assert!(report.abandoned > 0);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing ran without a claim"
    );
}

/// A worker that panics outside kourier's guards gives its record up while nothing drains:
/// its partition is reset to the commit point (read again from there), so the record and
/// the ones after it run, instead of the partition freezing until the next rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_given_up_outside_a_drain_resets_its_partition_instead_of_freezing_it() {
    let (topic, group, _dlt) = setup("one-outcome-reset", 1).await;
    support::produce(&topic, (0..20).map(|id| record(id, "k")).collect()).await;
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let h = handled.clone();
    let handler = handler_fn(move |m: Message<Exploding>| {
        h.lock().unwrap().push(m.event().id);
        async { Ok(()) }
    });
    let running = Running::start(consumer::builder(handler, &topic, &group));
    wait_for(
        "every record handled and committed",
        Duration::from_secs(30),
        || {
            let mut ids = handled.lock().unwrap().clone();
            ids.sort_unstable();
            ids.dedup();
            ids.len() == 20 && running.monitor.snapshot().caught_up
        },
    )
    .await;
    running.stop().await;
    let calls = handled.lock().unwrap().clone();
    println!("handler calls: {calls:?}");
    assert!(!ARMED.load(Ordering::SeqCst), "event 5 exploded");
    assert_eq!(
        calls.iter().filter(|&&id| id == 5).count(),
        2,
        "event 5 ran again after the reset"
    );
    assert_eq!(
        support::committed_sum(&group, &topic, 1).await,
        20,
        "committed to the end"
    );
}

/// Copies of one event — its source record and a tier copy of it, back together after a
/// crash — failing at once count as one record for the breaker: it does not open on them
/// alone, and the event takes its normal path (one dead letter).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_one_failing_event_do_not_open_the_breaker() {
    let (topic, group, dlt_topic) = setup("one-outcome-breaker", 1).await;
    let tier1 = format!("{topic}.retry.1");
    support::create_topic(&tier1, 1).await;
    let source = support::produce(&topic, vec![record(7, "k")]).await[0];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    // The tier copy kourier writes when it forwards the source record (hop 1).
    let copy = record(7, "k")
        .partition(0)
        .header(dlt::ORIGINAL_TOPIC, Some(topic.clone().into_bytes()))
        .header(
            dlt::ORIGINAL_PARTITION,
            Some(source.0.to_be_bytes().to_vec()),
        )
        .header(dlt::ORIGINAL_OFFSET, Some(source.1.to_be_bytes().to_vec()))
        .header(dlt::ATTEMPTS, Some(b"1".to_vec()))
        .header(dlt::FAILURE_KIND, Some(b"retries-exhausted".to_vec()))
        .header(tier::FAILED_STAGES, Some(b"1".to_vec()))
        .header(tier::TIER, Some(b"1".to_vec()))
        .header(tier::HOP, Some(b"1".to_vec()))
        .header(tier::DUE_MS, Some(now.into_bytes()));
    support::produce(&tier1, vec![copy]).await;
    let seen: Shared = Arc::default();
    let handler = handler_fn(|_m: Message<Ev>| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(HandlerError::transient("this event fails"))
    });
    let running = Running::start(
        consumer::builder(handler, &topic, &group)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(100), 2))
            .idempotency(Idempotency::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                DedupKey::header("event-id"),
            ))
            .retry_tiers(RetryTiers::new([Duration::from_millis(200)]))
            .breaker(
                BreakerPolicy::default()
                    .with_failure_rate(0.5, 10, 2)
                    .with_open_interval(Duration::from_secs(5), Duration::from_secs(60)),
            )
            .on_outcome(observe(&seen)),
    );
    wait_for("the event dead-lettered", Duration::from_secs(40), || {
        seen.lock()
            .unwrap()
            .count(7, |o| matches!(o, RecordOutcome::DeadLettered(_)))
            == 1
    })
    .await;
    let opened = running.monitor.snapshot().breaker.map(|b| b.opened);
    running.stop().await;
    println!("outcomes: {:?}", seen.lock().unwrap().outcomes);
    assert_eq!(opened, Some(0), "one event never opens the breaker");
    assert_eq!(support::read_all(&dlt_topic).await.len(), 1);
}

/// A consumer that restarts on partitions its group has committed to their end (nothing new
/// to read) is caught up: before, a partition it never read a record from had no known
/// position, so `caught_up` stayed false for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_on_partitions_committed_to_their_end_is_caught_up() {
    let (topic, group, _dlt) = setup("one-outcome-caught-up", 3).await;
    support::produce(
        &topic,
        (0..30).map(|id| record(id, &format!("k{id}"))).collect(),
    )
    .await;
    let handler = || handler_fn(|_m: Message<Ev>| async { Ok(()) });
    let first = Running::start(consumer::builder(handler(), &topic, &group));
    tokio::time::timeout(Duration::from_secs(30), first.monitor.caught_up())
        .await
        .expect("the first consumer catches up");
    first.stop().await;
    assert_eq!(support::committed_sum(&group, &topic, 3).await, 30);

    let second = Running::start(consumer::builder(handler(), &topic, &group));
    let caught_up = tokio::time::timeout(Duration::from_secs(20), second.monitor.caught_up()).await;
    let snapshot = second.monitor.snapshot();
    second.stop().await;
    assert!(
        caught_up.is_ok(),
        "the restarted consumer never reported caught up: {:?}",
        snapshot.partitions
    );
}
