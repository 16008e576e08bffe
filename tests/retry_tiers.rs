//! Retry tiers against the real broker (and Redis for the shared key-order ledger): per-key
//! order with and without `with_key_order`, due times, records that succeed in the second
//! tier handled once, dead letters after the last tier, several instances in one group, and
//! the startup error for a missing tier topic.
//!
//! Each test prints its figures (order violations, due-time lateness) for the report; the
//! assertions are about outcomes, never about timing.
//!
//! Needs Kafka and Redis (`scripts/services up`); each test has its own topics, group and
//! ledger prefix.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::dead_letter::Provenance;
use kourier::tiers::{RedisKeyOrderLedger, RetryTiers, headers as tier_headers};
use kourier::{
    DeadLetterReason, DedupKey, HandlerError, Idempotency, InMemoryIdempotencyStore, Message,
    MissingTopics, ProcessingOrder, RecordOutcome, RetryPolicy, handler_fn,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};

#[derive(Debug, Deserialize)]
struct Ev {
    id: u64,
}

/// Prime, so that the failing records (`id % 20 == 3`) spread over the keys.
const KEYS: u64 = 17;

/// Record `id` has key `k-<id % KEYS>`; within a key, ids increase with the source order.
fn record(id: u64) -> TestRecord {
    TestRecord::new()
        .key(format!("k-{}", id % KEYS))
        .value(format!(r#"{{"id":{id}}}"#))
        .header("event-id", Some(format!("e-{id}").into_bytes()))
}

/// 5 % of the records fail transiently: `id % 20 == 3` fails once (succeeds in tier 1) or
/// twice (succeeds in tier 2), alternately.
fn planned_failures(id: u64) -> u32 {
    if id % 20 == 3 {
        1 + u32::try_from((id / 20) % 2).unwrap()
    } else {
        0
    }
}

/// What the handler saw.
#[derive(Default)]
struct Seen {
    /// Failures made so far per id.
    failed: HashMap<u64, u32>,
    /// Successes in order: (id, topic).
    successes: Vec<(u64, String)>,
    /// For tier records: run time − due time, ms (negative: ran early).
    lateness_ms: Vec<i64>,
    /// Ids that ended for good: handled, duplicate or dead-lettered.
    ended: std::collections::HashSet<u64>,
}

type Shared = Arc<Mutex<Seen>>;

/// A handler failing per `failures(id)` (transiently), recording successes and lateness.
fn handler(seen: Shared, failures: fn(u64) -> u32) -> impl kourier::Handler<Event = Ev> + 'static {
    handler_fn(move |m: Message<Ev>| {
        let seen = seen.clone();
        async move {
            let id = m.event().id;
            let mut s = seen.lock().unwrap();
            if let Some(due) = m
                .headers()
                .get_str(tier_headers::DUE_MS)
                .and_then(|d| d.parse::<i64>().ok())
            {
                s.lateness_ms.push(support::now_ms() - due);
            }
            let done = s.failed.entry(id).or_default();
            if *done < failures(id) {
                *done += 1;
                return Err(HandlerError::transient(format!("failure {done} of {id}")));
            }
            s.successes.push((id, m.topic().to_owned()));
            Ok(())
        }
    })
}

/// Per key, records that succeeded after a later record of their key had (first successes
/// only).
fn order_violations(successes: &[(u64, String)]) -> usize {
    let mut latest: HashMap<u64, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut violations = 0;
    for (id, _) in successes {
        if !seen.insert(*id) {
            continue;
        }
        let key = id % KEYS;
        match latest.get(&key) {
            Some(&last) if last > *id => violations += 1,
            _ => {
                latest.insert(key, *id);
            }
        }
    }
    violations
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn ledger(prefix: &str) -> Arc<RedisKeyOrderLedger> {
    support::require_redis().await;
    Arc::new(
        RedisKeyOrderLedger::connect(&support::redis_url())
            .await
            .expect("connect the ledger")
            .key_prefix(prefix),
    )
}

/// Keys under `prefix`, by SCAN: a shared Redis may hold many other keys (a benchmark run
/// leaves ~1 M for a while), and KEYS would block the server and time the client out.
async fn redis_keys(prefix: &str) -> usize {
    let mut c = support::redis_connection().await;
    let (mut cursor, mut found) = (0u64, 0usize);
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await
            .expect("SCAN");
        found += keys.len();
        if next == 0 {
            return found;
        }
        cursor = next;
    }
}

/// What [`drain`] returns: what the handler saw, each instance's forwards per tier (from
/// its monitor), and the source topic (its tiers are `<topic>.retry.<n>`).
struct Drained {
    seen: Seen,
    forwarded: Vec<Vec<u64>>,
    topic: String,
}

/// Runs `records` ids through one or more consumers and returns what the handler saw.
async fn drain(
    name: &str,
    records: u64,
    tiers: RetryTiers,
    instances: usize,
    ordering: ProcessingOrder,
) -> Drained {
    let (topic, group, _dlt) = setup(name, 3).await;
    support::produce(&topic, (0..records).map(record).collect()).await;
    let seen: Shared = Arc::default();
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let mut running = Vec::new();
    for _ in 0..instances {
        let b = consumer::builder(handler(seen.clone(), planned_failures), &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .ordering(ordering)
            .idempotency(Idempotency::new(
                store.clone(),
                DedupKey::header("event-id"),
            ))
            .missing_topics(MissingTopics::create(3))
            .on_outcome({
                let seen = seen.clone();
                move |r, outcome| {
                    let ended = matches!(
                        outcome,
                        RecordOutcome::Handled
                            | RecordOutcome::Duplicate
                            | RecordOutcome::DeadLettered(_)
                    );
                    if let (true, Some(v)) = (ended, r.value.as_deref()) {
                        let ev: Ev = serde_json::from_slice(v).unwrap();
                        seen.lock().unwrap().ended.insert(ev.id);
                    }
                }
            })
            .retry_tiers(tiers.clone());
        running.push(Running::start(b));
    }
    wait_for(
        "every record handled or dead-lettered",
        Duration::from_secs(50),
        || seen.lock().unwrap().ended.len() as u64 == records,
    )
    .await;
    let forwarded: Vec<Vec<u64>> = running
        .iter()
        .map(|r| r.monitor.snapshot().forwarded)
        .collect();
    for r in running {
        r.stop().await;
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Drained {
        seen,
        forwarded,
        topic,
    }
}

fn report(name: &str, seen: &Seen) {
    let mut late = seen.lateness_ms.clone();
    late.sort_unstable();
    println!(
        "{name}: successes={} order violations={} tier runs={} lateness ms p50={} max={} min={}",
        seen.successes.len(),
        order_violations(&seen.successes),
        late.len(),
        percentile(&late, 0.5),
        late.last().copied().unwrap_or(0),
        late.first().copied().unwrap_or(0),
    );
}

/// With `with_key_order` (Redis ledger), 5 % transient failures that go through one or two
/// tiers do not reorder any key; every record succeeds once; no tier record runs early; the
/// ledger is empty afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_key_order_keeps_each_keys_order_across_tiers() {
    let prefix = support::unique_name("kourier-test-order:");
    let tiers = RetryTiers::new([Duration::from_secs(1), Duration::from_secs(2)])
        .with_key_order(ledger(&prefix).await);
    let Drained {
        seen,
        forwarded,
        topic,
    } = drain("tiers-ordered", 600, tiers, 1, ProcessingOrder::Key).await;
    report("with_key_order", &seen);
    assert_eq!(
        order_violations(&seen.successes),
        0,
        "a key's records were reordered"
    );
    assert!(
        seen.lateness_ms.iter().all(|&l| l >= 0),
        "a tier record ran before its due time: {:?}",
        seen.lateness_ms
    );
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (id, _) in &seen.successes {
        *counts.entry(*id).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "a record succeeded twice");
    assert_eq!(
        counts.len(),
        600,
        "every record succeeds: a record deferred into a tier keeps its stages"
    );
    // 30 ids fail: 15 once, 15 twice (planned_failures), 45 failures in all.
    assert_eq!(seen.failed.values().sum::<u32>(), 45);
    let tier_records = [
        support::read_all(&format!("{topic}.retry.1")).await,
        support::read_all(&format!("{topic}.retry.2")).await,
    ];
    println!(
        "forwarded per tier: {forwarded:?}; deferred for key order: {:?}",
        tier_records
            .iter()
            .map(|t| t
                .iter()
                .filter(|r| r.header(tier_headers::DEFERRED).is_some())
                .count())
            .collect::<Vec<_>>()
    );
    // The monitor counts exactly what the tier topics hold.
    let lens: Vec<u64> = tier_records.iter().map(|t| t.len() as u64).collect();
    assert_eq!(forwarded, [lens]);
    // No redundant forward: one tier record per event and hop.
    let mut hops = std::collections::HashSet::new();
    for r in tier_records.iter().flatten() {
        let hop = (
            r.header_str("event-id").to_owned(),
            r.header_str(tier_headers::HOP).to_owned(),
        );
        assert!(hops.insert(hop.clone()), "forwarded twice: {hop:?}");
    }
    // Exactly one forward per failure (3 stages, at most 2 failures: none dead-lettered); the
    // other tier records are later records of a failing key, deferred to keep its order (how
    // many depends on timing: the records that arrive while their key waits in a tier).
    let for_failures = tier_records
        .iter()
        .flatten()
        .filter(|r| r.header(tier_headers::DEFERRED).is_none())
        .count();
    assert_eq!(for_failures, 45, "one forward per failure");
    assert_eq!(redis_keys(&prefix).await, 0, "the ledger kept entries");
}

/// Without `with_key_order`, the same run reorders keys: a failed record is overtaken by the
/// later records of its key (Spring Kafka's documented trade-off). With a 3 s first tier and
/// every record produced up front, the later records run long before the failed one is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_keep_key_order_a_failed_record_is_overtaken() {
    let tiers = RetryTiers::new([Duration::from_secs(3), Duration::from_secs(1)]);
    let Drained { seen, .. } = drain("tiers-unordered", 600, tiers, 1, ProcessingOrder::Key).await;
    report("without with_key_order", &seen);
    assert!(
        order_violations(&seen.successes) > 0,
        "expected reordering without with_key_order"
    );
}

/// Two consumer instances in one group share the tiers and the ledger: every record is
/// handled (once, with the shared idempotency store) and no key is reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_keep_key_order() {
    let prefix = support::unique_name("kourier-test-order2:");
    let tiers = RetryTiers::new([Duration::from_secs(1), Duration::from_secs(2)])
        .with_key_order(ledger(&prefix).await);
    let Drained {
        seen, forwarded, ..
    } = drain("tiers-instances", 600, tiers, 2, ProcessingOrder::Partition).await;
    report("two instances", &seen);
    println!("forwarded per instance and tier: {forwarded:?}");
    assert_eq!(
        order_violations(&seen.successes),
        0,
        "a key's records were reordered"
    );
    assert!(
        seen.lateness_ms.iter().all(|&l| l >= 0),
        "a tier record ran early"
    );
    assert_eq!(redis_keys(&prefix).await, 0, "the ledger kept entries");
}

/// The provenance of `forwarded` (a dead letter or a tier record of a record of `topic`),
/// checked to name `topic` as its source, and the index in `produced` of the source record
/// it names.
fn source_of(
    forwarded: &support::ReadRecord,
    topic: &str,
    produced: &[(i32, i64)],
) -> (Provenance, u64) {
    let p = Provenance::from_headers(&forwarded.raw_headers);
    assert_eq!(p.original_topic.as_deref(), Some(topic));
    let at = (p.original_partition.unwrap(), p.original_offset.unwrap());
    let id = produced
        .iter()
        .position(|c| *c == at)
        .expect("a produced record") as u64;
    (p, id)
}

/// With two attempts per stage: records that fail twice succeed in tier 1, four times in
/// tier 2 (each handled exactly once), six times reach the source topic's dead-letter topic
/// after the last tier, with their source coordinates and the attempts of all tiers. The
/// forwarded tier records carry the key, value, own headers, provenance and tier headers,
/// keep the source partition, and nothing runs before its due time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_tier_successes_run_once_and_the_last_tier_dead_letters() {
    fn failures(id: u64) -> u32 {
        u32::try_from(id % 4).unwrap() * 2
    }
    let (topic, group, dlt) = setup("tiers-dlt", 2).await;
    let produced = support::produce(&topic, (0..20).map(record).collect()).await;
    let seen: Shared = Arc::default();
    let b = consumer::builder(handler(seen.clone(), failures), &topic, &group)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(10), 1)) // 2 attempts per stage
        .idempotency(Idempotency::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            DedupKey::header("event-id"),
        ))
        .missing_topics(MissingTopics::create(2))
        .retry_tiers(RetryTiers::new([
            Duration::from_secs(1),
            Duration::from_secs(1),
        ]));
    let running = Running::start(b);
    let letters = support::read_at_least(&dlt, 5, Duration::from_secs(40)).await;
    wait_for(
        "every other record handled",
        Duration::from_secs(40),
        || seen.lock().unwrap().successes.len() >= 15,
    )
    .await;
    let snapshot = running.monitor.snapshot();
    running.stop().await;
    let s = std::mem::take(&mut *seen.lock().unwrap());
    report("second tier", &s);
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (id, ran_in) in &s.successes {
        *counts.entry(*id).or_default() += 1;
        let expected = match id % 4 {
            0 => topic.clone(),
            1 => format!("{topic}.retry.1"),
            2 => format!("{topic}.retry.2"),
            _ => panic!("record {id} should have been dead-lettered"),
        };
        assert_eq!(
            ran_in, &expected,
            "record {id} succeeded in the wrong place"
        );
    }
    assert_eq!(counts.len(), 15);
    assert!(
        counts.values().all(|&n| n == 1),
        "handled twice: {counts:?}"
    );
    assert!(
        s.lateness_ms.iter().all(|&l| l >= 0),
        "ran early: {:?}",
        s.lateness_ms
    );
    assert_eq!(snapshot.forwarded, vec![15, 10]);
    // The dead letters: as their source records, attempts of all stages.
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        let (p, id) = source_of(letter, &topic, &produced);
        assert_eq!(id % 4, 3);
        assert_eq!(p.attempts, Some(6));
        assert_eq!(p.original_partition, Some(letter.partition));
        assert!(letter.raw_headers.get(tier_headers::TIER).is_none());
        assert_eq!(
            letter.raw_headers.get_str("event-id"),
            Some(format!("e-{id}").as_str())
        );
    }
    // The tier records: key, value and own headers kept, tier headers added.
    let tier1 = support::read_all(&format!("{topic}.retry.1")).await;
    assert_eq!(tier1.len(), 15);
    for r in &tier1 {
        let (p, id) = source_of(r, &topic, &produced);
        assert_eq!(
            p.original_partition,
            Some(r.partition),
            "the tier record keeps the source partition"
        );
        assert_eq!(
            r.key.as_deref(),
            Some(format!("k-{}", id % KEYS).as_bytes())
        );
        assert_eq!(
            r.value.as_deref(),
            Some(format!(r#"{{"id":{id}}}"#).as_bytes())
        );
        assert_eq!(
            r.raw_headers.get_str("event-id"),
            Some(format!("e-{id}").as_str())
        );
        assert_eq!(r.raw_headers.get_str(tier_headers::TIER), Some("1"));
        assert_eq!(p.attempts, Some(2));
        assert_eq!(p.failure_kind, Some(DeadLetterReason::RetriesExhausted));
        assert_eq!(p.consumer_group.as_deref(), Some(group.as_str()));
        assert!(r.raw_headers.get_str(tier_headers::DUE_MS).is_some());
    }
}

/// A record failing in every tier reaches the source's dead-letter topic after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_failing_in_every_tier_is_dead_lettered_as_its_source_record() {
    fn always(_: u64) -> u32 {
        u32::MAX
    }
    let (topic, group, dlt) = setup("tiers-last", 1).await;
    let produced = support::produce(&topic, vec![record(7)]).await;
    let seen: Shared = Arc::default();
    let b = consumer::builder(handler(seen.clone(), always), &topic, &group)
        .retry_policy(RetryPolicy::no_retries())
        .missing_topics(MissingTopics::create(1))
        .retry_tiers(RetryTiers::new([
            Duration::from_secs(1),
            Duration::from_secs(1),
        ]));
    let running = Running::start(b);
    let letters = support::read_at_least(&dlt, 1, Duration::from_secs(30)).await;
    running.stop().await;
    let (p, id) = source_of(&letters[0], &topic, &produced);
    assert_eq!(id, 0);
    assert_eq!(
        p.attempts,
        Some(3),
        "one attempt at the source and in each tier"
    );
    assert_eq!(p.failure_kind, Some(DeadLetterReason::RetriesExhausted));
    assert!(letters[0].raw_headers.get(tier_headers::TIER).is_none());
    assert_eq!(letters[0].raw_headers.get_str("event-id"), Some("e-7"));
    let s = seen.lock().unwrap();
    assert_eq!(s.failed.get(&7), Some(&3));
    assert!(s.lateness_ms.iter().all(|&l| l >= 0));
}

/// A tier topic that does not exist stops the start with `Error::MissingTopics` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tier_topic_is_a_startup_error() {
    let (topic, group, _dlt) = setup("tiers-missing", 1).await;
    let seen: Shared = Arc::default();
    let consumer = consumer::builder(handler(seen, planned_failures), &topic, &group)
        .startup_timeout(Duration::from_secs(10))
        .retry_tiers(RetryTiers::new([Duration::from_secs(1)]))
        .build()
        .expect("build");
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(std::future::pending()),
    )
    .await
    .expect("the start must fail, not hang")
    .expect_err("a missing tier topic must fail the start");
    match err {
        kourier::Error::MissingTopics { topics, .. } => {
            assert_eq!(topics, vec![format!("{topic}.retry.1")]);
        }
        other => panic!("expected MissingTopics, got {other:?}"),
    }
}

/// Invalid tiers are a typed configuration error from `build()`.
#[test]
fn invalid_tiers_are_config_errors() {
    let build = |tiers: RetryTiers, ordering: ProcessingOrder| {
        let seen: Shared = Arc::default();
        kourier::RetryingConsumer::builder(handler(seen, planned_failures))
            .bootstrap_servers("127.0.0.1:9092")
            .group_id("g")
            .topic("t")
            .ordering(ordering)
            .retry_tiers(tiers)
            .build()
    };
    let invalid = |r: kourier::Result<_>| match r {
        Err(kourier::Error::Config(kourier::ConfigError::Invalid { setting, .. })) => {
            setting == "retry_tiers"
        }
        _ => false,
    };
    assert!(invalid(build(RetryTiers::new([]), ProcessingOrder::Key)));
    assert!(invalid(build(
        RetryTiers::new([Duration::ZERO]),
        ProcessingOrder::Key
    )));
    assert!(invalid(build(
        RetryTiers::new([Duration::from_secs(1), Duration::from_secs(2)])
            .with_topic_name(|s, _| format!("{s}.retry")),
        ProcessingOrder::Key
    )));
    assert!(invalid(build(
        RetryTiers::new([Duration::from_secs(1)]).with_topic_name(|s, _| s.to_owned()),
        ProcessingOrder::Key
    )));
    assert!(invalid(build(
        RetryTiers::new([Duration::from_secs(1)])
            .with_key_order(Arc::new(kourier::tiers::InMemoryKeyOrderLedger::new())),
        ProcessingOrder::Unordered
    )));
    assert!(
        build(
            RetryTiers::new([Duration::from_secs(1)]),
            ProcessingOrder::Key
        )
        .is_ok()
    );
}

/// The child process of [`sigkill_during_forwarding_loses_nothing`]: a consumer that forwards
/// every source record to tier 1 (its handler fails them) and never finishes a tier record.
/// Runs only when the parent sets `KOURIER_TIERS_CHILD` (topic, group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by sigkill_during_forwarding_loses_nothing as a child process"]
async fn child_forwarding_consumer() {
    let Ok(spec) = std::env::var("KOURIER_TIERS_CHILD") else {
        return;
    };
    let (topic, group) = spec.split_once(' ').expect("topic and group");
    let handler = handler_fn(|m: Message<Ev>| async move {
        if m.topic().contains(".retry.") {
            std::future::pending::<()>().await;
        }
        Err(HandlerError::transient("fails at the source"))
    });
    let consumer = consumer::builder(handler, topic, group)
        .retry_policy(RetryPolicy::no_retries())
        .retry_tiers(RetryTiers::new([Duration::from_secs(5)]))
        .build()
        .expect("build");
    let _report = consumer
        .run(std::future::pending())
        .await
        .expect("the child consumer runs until it is killed");
}

/// SIGKILL while the consumer forwards records to a tier loses none: a child process forwards
/// every source record; it is killed with part of them forwarded; a new consumer of the group
/// then handles every record (from the tier), some of them twice at most through duplicate
/// forwards (the commit follows the forward's acknowledgement).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_forwarding_loses_nothing() {
    const N: u64 = 3000;
    let (topic, group, _dlt) = setup("tiers-kill", 3).await;
    let tier = format!("{topic}.retry.1");
    support::create_topic(&tier, 3).await;
    support::produce(&topic, (0..N).map(record).collect()).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_forwarding_consumer",
            "--ignored",
            "--nocapture",
        ])
        .env("KOURIER_TIERS_CHILD", format!("{topic} {group}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child consumer");
    let started = std::time::Instant::now();
    let forwarded_at_kill = loop {
        let n = support::read_all(&tier).await.len() as u64;
        if n >= N / 10 || started.elapsed() > Duration::from_secs(30) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().expect("SIGKILL the child");
    let _ = child.wait();
    let forwarded_after_kill = support::read_all(&tier).await.len() as u64;
    assert!(
        forwarded_after_kill > 0 && forwarded_after_kill < N,
        "the kill must come during forwarding ({forwarded_after_kill} of {N} forwarded)"
    );
    // A new member of the group picks up where the child's commits end.
    let seen: Shared = Arc::default();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |m: Message<Ev>| {
            let seen = seen.clone();
            async move {
                if !m.topic().contains(".retry.") {
                    return Err(HandlerError::transient("fails at the source"));
                }
                seen.lock()
                    .unwrap()
                    .successes
                    .push((m.event().id, m.topic().to_owned()));
                Ok(())
            }
        })
    };
    let running = Running::start(
        consumer::builder(handler, &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([Duration::from_secs(5)])),
    );
    wait_for(
        "every record handled from the tier",
        Duration::from_secs(50),
        || {
            let s = seen.lock().unwrap();
            let ids: std::collections::HashSet<u64> =
                s.successes.iter().map(|(id, _)| *id).collect();
            ids.len() as u64 == N
        },
    )
    .await;
    running.stop().await;
    let total_forwards = support::read_all(&tier).await.len() as u64;
    let handled = seen.lock().unwrap().successes.len() as u64;
    println!(
        "sigkill: forwarded at kill {forwarded_at_kill} (after {forwarded_after_kill}), tier records in all {total_forwards} for {N} records (duplicate forwards {}), handled {handled}, lost 0",
        total_forwards - N
    );
}

/// The Redis ledger's Lua script follows the admission rule step by step (the same sequence
/// as the in-memory ledger's unit test), and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_ledger_follows_the_admission_rule() {
    use kourier::tiers::{Admission, InMemoryKeyOrderLedger, KeyOrderLedger, LedgerKey, SourceId};
    let prefix = support::unique_name("kourier-test-ledger:");
    let redis = ledger(&prefix).await;
    let memory = InMemoryKeyOrderLedger::new();
    let k = LedgerKey::new("g", "t", b"k\xff\x00");
    let id = |offset| SourceId::new(0, offset);
    let steps: Vec<(&str, i64, u32)> = vec![
        ("admit", 1, 0),
        ("place", 1, 1),
        ("admit", 2, 0),
        ("admit", 1, 1),
        ("place", 1, 2),
        ("admit", 3, 0),
        ("admit", 2, 1),
        ("admit", 3, 2),
        ("admit", 1, 2),
        ("settle", 1, 0),
        ("admit", 2, 2),
        ("settle", 2, 0),
        ("admit", 3, 2),
        ("settle", 3, 0),
        ("place", 9, 2),
        ("admit", 9, 1),
        ("admit", 10, 0),
        ("settle", 9, 0),
        ("admit", 10, 2),
        ("settle", 10, 0),
    ];
    for (op, offset, tier) in steps {
        let (a, b): (Option<Admission>, Option<Admission>) = match op {
            "admit" => (
                Some(redis.admit(k, id(offset), tier).await.unwrap()),
                Some(memory.admit(k, id(offset), tier).await.unwrap()),
            ),
            "place" => {
                redis.place(k, id(offset), tier).await.unwrap();
                memory.place(k, id(offset), tier).await.unwrap();
                (None, None)
            }
            _ => {
                redis.settle(k, id(offset)).await.unwrap();
                memory.settle(k, id(offset)).await.unwrap();
                (None, None)
            }
        };
        assert_eq!(a, b, "{op} {offset} at tier {tier}");
    }
    assert!(memory.is_empty());
    assert_eq!(redis_keys(&prefix).await, 0);

    // Then 400 pseudo-random steps over two partitions, six offsets and four tiers: the
    // script answers as `AdmitStep` (through the in-memory ledger) at every step.
    let k = LedgerKey::new("g", "t", b"random");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut deferred = 0;
    for step in 0..400 {
        let record = SourceId::new(next(2) as i32, next(6) as i64);
        let tier = next(4) as u32;
        match next(3) {
            0 => {
                let a = redis.admit(k, record, tier).await.unwrap();
                let b = memory.admit(k, record, tier).await.unwrap();
                assert_eq!(a, b, "step {step}: admit {record:?} at tier {tier}");
                deferred += usize::from(matches!(a, Admission::Defer(_)));
            }
            1 => {
                redis.place(k, record, tier).await.unwrap();
                memory.place(k, record, tier).await.unwrap();
            }
            _ => {
                redis.settle(k, record).await.unwrap();
                memory.settle(k, record).await.unwrap();
            }
        }
    }
    assert!(
        deferred > 10,
        "the sequence exercised deferral ({deferred})"
    );
}
