//! Idempotency at consumer level, against the real broker and real Redis: claim → work →
//! complete through the whole pipeline (delivery rule 7 in the crate docs). The side effect is a handler call
//! that succeeded, recorded in a shared log.
//!
//! - A transient failure, then success: the side effect happens exactly once (the starting
//!   design marked the key before the work, so its retry was skipped as a "duplicate" and the
//!   mail was lost).
//! - The same event id in two records runs once; the second settles as a duplicate and the
//!   commit moves past both, with the dedup key from a header or from the typed event.
//! - Two workers racing on one id (key ordering): one runs, the other waits (busy) and then
//!   settles as done.
//! - A handler running three times its lease keeps its claim (renewed every third of the
//!   lease): a second claimer is answered busy throughout, the record runs once.
//! - Redis stopped mid-stream: nothing skipped, nothing committed past the outage, everything
//!   handled exactly once when Redis is back; with the opt-in, processing goes on without dedup.
//! - A dead-lettered event is not marked done, and its redrive runs.
//! - One scenario (duplicates and a transient failure) run against both stores.
//!
//! Needs Kafka and Redis (`scripts/services up`); the outage tests run their own
//! `redis-server` on a free port (`redis-server` and `redis-cli` on `PATH`). Each test has its
//! own topics, group (hence dedup namespace `<group>:<id>`) and Redis key prefix.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kourier::dead_letter::headers as dlt;
use kourier::idempotency::testing::{HookedStore, StoreAnswer, StoreCall, StoreHook};
use kourier::{
    Claim, ClaimToken, DedupKey, Idempotency, IdempotencyStore, InMemoryIdempotencyStore,
    ProcessingOrder, RedisIdempotencyStore, RetryPolicy, RetryingConsumerBuilder, StoreOutage,
};
use support::consumer::{self, Running, setup, wait_for};
use support::recorder::{Call, EVENT_ID_HEADER, Ev, Log, Recorder};
use support::redis_server::RedisServer;
use support::store::{Answer, HeldCompletions, SpyStore};
use support::{TestRecord, committed_sum};

/// Generous: the machine is small and other suites may run at the same time.
const WAIT: Duration = Duration::from_secs(60);
/// How long a consumer may take to shut down.
const SHUTDOWN: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The side-effect log (the event and the handler are support::recorder's)
// ---------------------------------------------------------------------------------------------

/// `(id, attempt, ok)` of each call, in call order.
fn outcomes(calls: &[Call]) -> Vec<(u64, u32, bool)> {
    calls.iter().map(|c| (c.id, c.attempt, c.ok)).collect()
}

// ---------------------------------------------------------------------------------------------
// Consumers, stores, waiting
// ---------------------------------------------------------------------------------------------

fn by_header() -> DedupKey<Ev> {
    DedupKey::header(EVENT_ID_HEADER)
}

fn by_event() -> DedupKey<Ev> {
    DedupKey::<Ev>::from_fn(|m| Some(m.event().event_id.clone()))
}

fn builder(
    log: &Arc<Log>,
    topic: &str,
    group: &str,
    store: Arc<dyn IdempotencyStore>,
    key: DedupKey<Ev>,
) -> RetryingConsumerBuilder<Recorder> {
    builder_with(log, topic, group, Idempotency::new(store, key))
}

fn builder_with(
    log: &Arc<Log>,
    topic: &str,
    group: &str,
    idempotency: Idempotency<Ev>,
) -> RetryingConsumerBuilder<Recorder> {
    consumer::builder(Recorder(log.clone()), topic, group)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 3))
        .idempotency(idempotency)
}

/// Starts a consumer of `topic` with `idempotency` and waits until record #0's handler has
/// started.
async fn start_and_wait_for_first(
    log: &Arc<Log>,
    topic: &str,
    group: &str,
    idempotency: Idempotency<Ev>,
) -> Running {
    let c = Running::start(builder_with(log, topic, group, idempotency));
    wait_for("#0's handler to start", WAIT, || log.has_started(0)).await;
    c
}

/// The dedup key the consumer of `group` uses for `event_id`.
fn namespaced(group: &str, event_id: &str) -> String {
    format!("{group}:{event_id}")
}

/// Waits until the group's committed offsets of `topic` add up to `total` (offsets here are
/// dense from 0, so that is "every record settled").
async fn wait_committed(group: &str, topic: &str, partitions: i32, total: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let sum = committed_sum(group, topic, partitions).await;
        assert!(sum <= total, "committed {sum} > {total} records on {topic}");
        if sum == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets of {group} on {topic} add up to {sum} after {WAIT:?}, \
             expected {total}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the records of `topic` (one partition) are committed up to `total`, stops `c`,
/// and answers the handler's calls ([`outcomes`]).
async fn outcomes_once_committed(
    c: Running,
    log: &Log,
    group: &str,
    topic: &str,
    total: i64,
) -> Vec<(u64, u32, bool)> {
    wait_committed(group, topic, 1, total).await;
    c.stop_within(SHUTDOWN).await;
    outcomes(&log.calls())
}

/// A Redis store at `url` with a key prefix of its own.
async fn redis_store_at(url: &str, command_timeout: Duration) -> RedisIdempotencyStore {
    let prefix = format!("{}:", support::unique_name("idem"));
    RedisIdempotencyStore::builder(url)
        .key_prefix(prefix)
        .command_timeout(command_timeout)
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect the idempotency store to {url}: {e:?}"))
}

/// A store on the shared Redis (`REDIS_URL`), failing the test when it is not running.
async fn shared_redis_store() -> Arc<dyn IdempotencyStore> {
    support::require_redis().await;
    Arc::new(
        redis_store_at(
            &support::redis_url(),
            RedisIdempotencyStore::DEFAULT_COMMAND_TIMEOUT,
        )
        .await,
    )
}

/// What the store now answers for `event_id` of `group` (a claim acquired here is released).
async fn probe(store: &dyn IdempotencyStore, group: &str, event_id: &str) -> Claim {
    let key = namespaced(group, event_id);
    let claim = store
        .claim(&key, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("probe claim on {key}: {e:?}"));
    if let Claim::Acquired(token) = &claim {
        store
            .release(&key, token)
            .await
            .unwrap_or_else(|e| panic!("release probe claim on {key}: {e:?}"));
    }
    claim
}

fn assert_nothing_dead_lettered(letters: &[support::ReadRecord]) {
    assert!(
        letters.is_empty(),
        "nothing should be dead-lettered, got {} letters",
        letters.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Transient failure, then success: exactly once
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_then_success_sends_exactly_once() {
    let (topic, group, dlt_topic) = setup("idem-once", 1).await;
    let redis = shared_redis_store().await;
    let spy = SpyStore::new(redis.clone());
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(0, "mail-1", "user-1")
                .fail_transient(1)
                .record(),
        ],
    )
    .await;

    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group, spy.clone(), by_header()));
    wait_for("the retry to succeed", WAIT, || !log.successes().is_empty()).await;

    assert_eq!(
        outcomes_once_committed(c, &log, &group, &topic, 1).await,
        vec![(0, 1, false), (0, 2, true)],
        "one transient failure, then one successful attempt"
    );
    assert_eq!(
        log.successes().len(),
        1,
        "the side effect happened exactly once (not zero: the failed attempt marked nothing)"
    );
    let key = namespaced(&group, "mail-1");
    assert_eq!(
        spy.hook().labels_for(&key),
        [
            "claim:acquired",
            "release:released",
            "claim:acquired",
            "complete:completed"
        ],
        "claim → fail → release → claim again → complete"
    );
    let tokens: Vec<ClaimToken> = spy
        .hook()
        .calls_for(&key)
        .into_iter()
        .filter_map(|c| match c.answer {
            Answer::Acquired(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_ne!(tokens[0], tokens[1], "the retry holds a claim of its own");
    assert_eq!(probe(&*redis, &group, "mail-1").await, Claim::Done);
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

// ---------------------------------------------------------------------------------------------
// 2. The same event id in two records: handled once, the duplicate settles
// ---------------------------------------------------------------------------------------------

/// `order-1` twice (different offsets and Kafka keys), then `order-2`, in one partition.
async fn duplicate_event_runs_once(name: &str, key: DedupKey<Ev>, with_header: bool) {
    let (topic, group, dlt_topic) = setup(name, 1).await;
    let redis = shared_redis_store().await;
    let spy = SpyStore::new(redis.clone());
    let events = [
        Ev::with_event_id(0, "order-1", "alice"),
        Ev::with_event_id(1, "order-1", "bob"),
        Ev::with_event_id(2, "order-2", "alice"),
    ];
    let records = events
        .iter()
        .map(|e| {
            if with_header {
                e.record()
            } else {
                e.record_without_header()
            }
        })
        .collect();
    let coordinates = support::produce(&topic, records).await;
    assert_eq!(coordinates, [(0, 0), (0, 1), (0, 2)]);

    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group, spy.clone(), key));

    assert_eq!(
        outcomes_once_committed(c, &log, &group, &topic, 3).await,
        vec![(0, 1, true), (2, 1, true)],
        "order-1 ran once (offset 0); its duplicate at offset 1 never reached the handler"
    );
    assert_eq!(
        spy.hook()
            .settled_labels_for(&namespaced(&group, "order-1")),
        ["claim:acquired", "complete:completed", "claim:done"],
        "the duplicate was answered `done` and settled"
    );
    assert_eq!(
        committed_sum(&group, &topic, 1).await,
        3,
        "committed past both"
    );
    assert_eq!(probe(&*redis, &group, "order-1").await, Claim::Done);
    assert_eq!(probe(&*redis, &group, "order-2").await, Claim::Done);
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_id_from_a_header_is_handled_once() {
    duplicate_event_runs_once("idem-dup-header", by_header(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_id_from_the_typed_event_is_handled_once() {
    // No header at all: only the closure over the decoded event can find the id.
    duplicate_event_runs_once("idem-dup-fn", by_event(), false).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Two workers race on one id
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_on_one_id_run_it_once() {
    let (topic, group, dlt_topic) = setup("idem-race", 1).await;
    let redis = shared_redis_store().await;
    let spy = SpyStore::new(redis.clone());
    let key = namespaced(&group, "pay-1");

    // #0 (Kafka key a) takes pay-1 and holds it: ~1 s of work, then until the test saw the
    // other worker find the id busy.
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(0, "pay-1", "a")
                .sleep_ms(1000)
                .gated()
                .record(),
        ],
    )
    .await;
    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group, spy.clone(), by_event()).ordering(ProcessingOrder::Key),
    );
    wait_for("#0's handler to start", WAIT, || log.has_started(0)).await;

    // #1 (key b, same event id) runs in parallel with #0 in key mode; #2 queues behind it.
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(1, "pay-1", "b").record(),
            Ev::with_event_id(2, "pay-2", "b").record(),
        ],
    )
    .await;
    wait_for("#1 to find pay-1 busy", WAIT, || {
        spy.hook()
            .labels_for(&key)
            .iter()
            .any(|l| l == "claim:busy")
    })
    .await;
    log.open_gate();
    wait_committed(&group, &topic, 1, 3).await;
    c.stop_within(SHUTDOWN).await;

    let pay = log.calls_for("pay-1");
    assert_eq!(
        outcomes(&pay),
        vec![(0, 1, true)],
        "exactly one handler run for pay-1, by the worker that claimed it first"
    );
    assert_eq!(log.sorted_succeeded_ids(), [0, 2]);

    let store_calls = spy.hook().calls_for(&key);
    let labels = spy.hook().labels_for(&key);
    assert_eq!(
        labels.first().map(String::as_str),
        Some("claim:acquired"),
        "{labels:?}"
    );
    assert_eq!(
        labels.last().map(String::as_str),
        Some("claim:done"),
        "#1 ended with `done`: {labels:?}"
    );
    let count = |label: &str| labels.iter().filter(|l| *l == label).count();
    assert_eq!(count("claim:acquired"), 1, "{labels:?}");
    assert_eq!(count("complete:completed"), 1, "{labels:?}");
    assert_eq!(count("claim:done"), 1, "{labels:?}");
    assert!(count("claim:busy") >= 1, "#1 waited while busy: {labels:?}");
    assert_eq!(
        labels.len(),
        count("claim:acquired")
            + count("complete:completed")
            + count("claim:done")
            + count("claim:busy"),
        "nothing else happened on the key: {labels:?}"
    );
    // #1 settled only after #0's work was done; its lane (key b) waited meanwhile.
    let done_at = store_calls.last().unwrap().at;
    assert!(
        done_at >= pay[0].ended,
        "#1 was answered `done` after #0 ended"
    );
    let next = log.calls_for("pay-2");
    assert!(
        next[0].started >= pay[0].ended,
        "#2 (key b) started only after #1 (key b) had waited for pay-1 to be done"
    );
    assert_eq!(probe(&*redis, &group, "pay-1").await, Claim::Done);
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

// ---------------------------------------------------------------------------------------------
// 4. A handler outliving its lease keeps its claim (delivery rule 15 in the crate docs)
// ---------------------------------------------------------------------------------------------

/// A handler that runs three times its lease keeps the key: the consumer renews the claim
/// every third of the lease, so a second claimer — another client of the same Redis, trying
/// throughout — is answered busy every time. The record is handled once and its key is
/// completed by the token the handler saw. (Before renewal, the second claimer acquired the
/// key after one lease and the event ran twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_outlives_its_lease_while_the_handler_runs() {
    let (topic, group, dlt_topic) = setup("idem-lease", 1).await;
    support::require_redis().await;
    let prefix = format!("{}:", support::unique_name("idem-renew"));
    let connect = || {
        RedisIdempotencyStore::builder(support::redis_url())
            .key_prefix(prefix.clone())
            .build()
    };
    let redis: Arc<dyn IdempotencyStore> = Arc::new(connect().await.expect("connect"));
    let rival = connect().await.expect("connect the second claimer");
    let spy = SpyStore::new(redis.clone());
    let key = namespaced(&group, "slow-1");
    let lease = Duration::from_secs(1);

    support::produce(
        &topic,
        vec![Ev::with_event_id(0, "slow-1", "a").sleep_ms(3000).record()],
    )
    .await;
    let log = Log::new();
    let idempotency = Idempotency::new(spy.clone(), by_header()).with_lease(lease);
    let c = start_and_wait_for_first(&log, &topic, &group, idempotency).await;

    // The second claimer, until the handler is done.
    let mut answers = Vec::new();
    let first_try = Instant::now();
    while log.calls().is_empty() {
        let answer = rival
            .claim(&key, lease)
            .await
            .unwrap_or_else(|e| panic!("rival claim on {key}: {e:?}"));
        if let Claim::Acquired(token) = &answer {
            // Give it back at once so the failure below is the only damage.
            rival.release(&key, token).await.unwrap();
        }
        answers.push((Instant::now(), answer));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handler_ended = log.calls()[0].ended;
    wait_committed(&group, &topic, 1, 1).await;
    c.stop_within(SHUTDOWN).await;

    let during: Vec<&Claim> = answers
        .iter()
        .filter(|(at, _)| *at <= handler_ended)
        .map(|(_, a)| a)
        .collect();
    assert!(
        during.iter().all(|a| **a == Claim::Busy),
        "the second claimer must be answered busy while the handler runs: {during:?}"
    );
    let (last_busy, _) = answers
        .iter()
        .rfind(|(at, a)| *at <= handler_ended && *a == Claim::Busy)
        .expect("the second claimer tried while the handler ran");
    assert!(
        last_busy.duration_since(first_try) > lease,
        "the second claimer still found the key busy after the first lease ran out \
         ({:?} after its first try)",
        last_busy.duration_since(first_try)
    );

    let calls = log.calls_for("slow-1");
    assert_eq!(outcomes(&calls), vec![(0, 1, true)], "handled once");
    let labels = spy.hook().labels_for(&key);
    let count = |label: &str| labels.iter().filter(|l| *l == label).count();
    assert_eq!(count("claim:acquired"), 1, "{labels:?}");
    assert!(
        count("renew:renewed") >= 2,
        "renewed while the 3 s handler ran: {labels:?}"
    );
    assert_eq!(
        labels.len(),
        count("claim:acquired") + count("renew:renewed") + 1,
        "claim, renewals, then complete, and nothing else: {labels:?}"
    );
    assert_eq!(
        labels.last().map(String::as_str),
        Some("complete:completed")
    );
    let acquired = spy
        .hook()
        .calls_for(&key)
        .into_iter()
        .find_map(|c| match c.answer {
            Answer::Acquired(t) => Some(t),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        calls[0].token.as_ref(),
        Some(&acquired),
        "the handler saw its claim's token"
    );
    assert!(
        spy.hook()
            .calls_for(&key)
            .iter()
            .filter(|c| c.op != "claim")
            .all(|c| c.token.as_ref() == Some(&acquired)),
        "renewed and completed with that token"
    );
    assert_eq!(probe(&rival, &group, "slow-1").await, Claim::Done);
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

// ---------------------------------------------------------------------------------------------
// 5. Redis stopped mid-stream
// ---------------------------------------------------------------------------------------------

const OUTAGE_RECORDS: u64 = 200;
const OUTAGE_PARTITIONS: i32 = 2;

/// Records handled (successfully) in `partition`, as offsets.
fn handled_offsets(calls: &[Call], partition: i32) -> BTreeSet<i64> {
    calls
        .iter()
        .filter(|c| c.ok && c.partition == partition)
        .map(|c| c.offset)
        .collect()
}

/// Every offset below the committed one was handled, by a call that started before `before`.
fn assert_committed_only_handled(
    committed: &BTreeMap<i32, Option<i64>>,
    calls: &[Call],
    before: Instant,
    when: &str,
) {
    let early: Vec<Call> = calls
        .iter()
        .filter(|c| c.started < before)
        .cloned()
        .collect();
    for (&partition, &offset) in committed {
        let handled = handled_offsets(&early, partition);
        let missing: Vec<i64> = (0..offset.unwrap_or(0))
            .filter(|o| !handled.contains(o))
            .collect();
        assert!(
            missing.is_empty(),
            "{when}: partition {partition} committed up to {offset:?}, but offsets {missing:?} \
             were not handled before the outage"
        );
    }
}

async fn redis_outage_mid_stream(name: &str, run_without_dedup: bool) {
    let (topic, group, dlt_topic) = setup(name, OUTAGE_PARTITIONS).await;
    let mut server =
        tokio::task::block_in_place(|| RedisServer::start_on_free_port("consumer-outage"));
    let store: Arc<dyn IdempotencyStore> =
        Arc::new(redis_store_at(&server.url(), Duration::from_millis(500)).await);
    let records = (0..OUTAGE_RECORDS)
        .map(|i| {
            Ev::with_event_id(i, &format!("evt-{i}"), &format!("k{}", i % 10))
                .sleep_ms(20)
                .record()
        })
        .collect();
    support::produce(&topic, records).await;

    let log = Log::new();
    let mut idempotency = Idempotency::new(store.clone(), by_header());
    if run_without_dedup {
        // A record whose handler ends as Redis goes down retries `complete` until its lease
        // ends, holding its partition meanwhile (see the ignored test below): a short lease
        // keeps that stall short here.
        idempotency = idempotency
            .with_store_outage(StoreOutage::RunWithoutDedup)
            .with_lease(Duration::from_secs(5));
    }
    let c = Running::start(builder_with(&log, &topic, &group, idempotency));
    wait_for("some records handled before the outage", WAIT, || {
        log.successes().len() >= 30
    })
    .await;
    tokio::task::block_in_place(|| server.kill());
    let killed_at = Instant::now();
    let handled_at_kill = log.successes().len();
    assert!(
        handled_at_kill < OUTAGE_RECORDS as usize - 20,
        "Redis went down mid-stream ({handled_at_kill} handled)"
    );

    if run_without_dedup {
        // Opted in: the records keep flowing, handled without dedup while Redis is down.
        wait_for("every record handled while Redis is down", WAIT * 2, || {
            log.sorted_succeeded_ids().len() >= OUTAGE_RECORDS as usize
        })
        .await;
        wait_committed(&group, &topic, OUTAGE_PARTITIONS, OUTAGE_RECORDS as i64).await;
        assert!(!server.is_running(), "all of it happened during the outage");
        let during = log
            .successes()
            .iter()
            .filter(|c| c.started > killed_at)
            .count();
        assert!(
            during + handled_at_kill + OUTAGE_PARTITIONS as usize >= OUTAGE_RECORDS as usize,
            "the rest ({during} records) was handled while Redis was down"
        );
    } else {
        // While Redis is down: no record is skipped, none committed past the outage, and no
        // handler call starts once the store's first failure is seen (within the grace).
        let grace = Duration::from_secs(2);
        let outage = Duration::from_secs(8);
        let mut calls_after_grace = None;
        while killed_at.elapsed() < outage {
            let committed = support::committed_offsets(&group, &topic, OUTAGE_PARTITIONS).await;
            assert_committed_only_handled(&committed, &log.calls(), killed_at, "during the outage");
            if calls_after_grace.is_none() && killed_at.elapsed() >= grace {
                calls_after_grace = Some(log.calls().len());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let calls = log.calls();
        let late: Vec<(u64, Duration)> = calls
            .iter()
            .filter(|c| c.started > killed_at + grace)
            .map(|c| (c.id, c.started.duration_since(killed_at)))
            .collect();
        assert!(
            late.is_empty(),
            "handler calls started during the outage, without dedup: {late:?}"
        );
        assert_eq!(Some(calls.len()), calls_after_grace);
        // Besides the records in flight at the kill, a few may start right after it: their
        // keys were claimed (fetched ahead, with an earlier record's claim) before the kill,
        // so they run fenced by a valid claim. Once a store call has failed, no claim fetched
        // before the failure is taken: every call starts within the grace (checked above).
        let handled = log.successes().len();
        assert!(
            handled < OUTAGE_RECORDS as usize,
            "records are waiting for Redis"
        );

        // Same port, fresh (empty) server: the waiting records go on.
        tokio::task::block_in_place(|| server.restart());
        let restarted_at = Instant::now();
        wait_for("every record handled after the restart", WAIT * 2, || {
            log.sorted_succeeded_ids().len() >= OUTAGE_RECORDS as usize
        })
        .await;
        wait_committed(&group, &topic, OUTAGE_PARTITIONS, OUTAGE_RECORDS as i64).await;
        // A record handled after the restart is done in the new server.
        let after = log
            .successes()
            .into_iter()
            .filter(|c| c.started > restarted_at)
            .max_by_key(|c| c.started)
            .expect("records handled after the restart");
        assert_eq!(probe(&*store, &group, &after.event_id).await, Claim::Done);
    }
    c.stop_within(SHUTDOWN).await;

    let ids = log.sorted_succeeded_ids();
    assert_eq!(
        ids,
        (0..OUTAGE_RECORDS).collect::<Vec<_>>(),
        "every record handled exactly once overall"
    );
    assert_eq!(
        committed_sum(&group, &topic, OUTAGE_PARTITIONS).await,
        OUTAGE_RECORDS as i64
    );
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_stream_skips_nothing_and_resumes() {
    redis_outage_mid_stream("idem-outage", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_stream_with_the_opt_in_keeps_handling() {
    redis_outage_mid_stream("idem-outage-optin", true).await;
}

/// With the opt-in, a record whose handler finishes while Redis is down must not hold its
/// partition (or key) while `complete` keeps failing: the consumer goes on without dedup.
/// (Before the fix, `complete` retried for the whole lease: with the default 60 s lease the
/// first handler call after the kill came at +60.3 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_in_goes_on_promptly_after_a_record_finishes_during_the_outage() {
    let (topic, group, _) = setup("idem-optin-stall", 1).await;
    let mut server =
        tokio::task::block_in_place(|| RedisServer::start_on_free_port("consumer-optin-stall"));
    let store: Arc<dyn IdempotencyStore> =
        Arc::new(redis_store_at(&server.url(), Duration::from_millis(500)).await);
    // #0 holds its claim in the handler until the test has stopped Redis; #1 comes after it.
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(0, "a-0", "k").gated().record(),
            Ev::with_event_id(1, "a-1", "k").record(),
        ],
    )
    .await;
    let log = Log::new();
    let idempotency =
        Idempotency::new(store, by_header()).with_store_outage(StoreOutage::RunWithoutDedup);
    let c = start_and_wait_for_first(&log, &topic, &group, idempotency).await;
    tokio::task::block_in_place(|| server.kill());
    log.open_gate();
    // #0 is done (its `complete` cannot reach Redis); #1 should run without dedup at once
    // (one failing claim, ~0.5 s), not after #0's 60 s lease.
    wait_for(
        "#1 to be handled without dedup",
        Duration::from_secs(15),
        || log.has_started(1),
    )
    .await;
    c.stop_within(SHUTDOWN).await;
    assert_eq!(log.sorted_succeeded_ids(), [0, 1]);
}

// ---------------------------------------------------------------------------------------------
// 6. Dead letters settle their delivery; a redrive is a delivery of its own
// ---------------------------------------------------------------------------------------------

/// A dead-lettered event's delivery is marked settled (a redelivery after a crash is skipped,
/// not dead-lettered twice); a redrive carries a redrive count and runs under a key of its
/// own (`<key>#r1`), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_event_is_settled_and_its_redrive_runs_once() {
    let (topic, group, dlt_topic) = setup("idem-dlt", 1).await;
    let redis = shared_redis_store().await;
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(0, "invoice-1", "acme")
                .permanent()
                .record(),
        ],
    )
    .await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group, redis.clone(), by_header()));
    let letters = support::read_at_least(&dlt_topic, 1, WAIT).await;
    wait_committed(&group, &topic, 1, 1).await;
    assert_eq!(outcomes(&log.calls()), vec![(0, 1, false)]);

    // Settled: a redelivery of the event is skipped (one dead letter per event).
    assert_eq!(
        probe(&*redis, &group, "invoice-1").await,
        Claim::Done,
        "a dead-lettered delivery is settled"
    );

    // The bug is fixed; redrive the letter as it is (key, value, original headers) to the
    // source topic.
    log.fix();
    let letter = &letters[0];
    let mut redriven = TestRecord::new()
        .key(letter.key.clone().expect("the letter keeps the key"))
        .value(letter.value.clone().expect("the letter keeps the value"));
    for (name, value) in &letter.headers {
        if !dlt::ALL.contains(&name.as_str()) {
            redriven = redriven.header(name.clone(), value.clone());
        }
    }
    redriven = redriven.header(dlt::REDRIVE_COUNT, Some(b"1".to_vec()));
    support::produce(&topic, vec![redriven.clone()]).await;
    wait_for("the redrive to run", WAIT, || !log.successes().is_empty()).await;
    wait_committed(&group, &topic, 1, 2).await;
    assert_eq!(probe(&*redis, &group, "invoice-1#r1").await, Claim::Done);

    // Once done, a second redrive of the same event is a duplicate.
    support::produce(&topic, vec![redriven]).await;
    wait_committed(&group, &topic, 1, 3).await;
    c.stop_within(SHUTDOWN).await;

    let calls = log.calls_for("invoice-1");
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.offset, c.attempt, c.ok))
            .collect::<Vec<_>>(),
        vec![(0, 1, false), (1, 1, true)],
        "the redrive (offset 1) ran; the second redrive (offset 2) was skipped"
    );
    assert_eq!(
        support::read_all(&dlt_topic).await.len(),
        1,
        "one dead letter"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. One scenario, both stores
// ---------------------------------------------------------------------------------------------

/// Duplicates and a transient failure, at consumer level: what every [`IdempotencyStore`] must
/// give a consumer. `e1` fails once then succeeds, its duplicate is skipped; `e2` succeeds, its
/// duplicate (which would fail if it ran) is skipped.
async fn duplicates_and_a_transient_failure(store: Arc<dyn IdempotencyStore>, name: &str) {
    let (topic, group, dlt_topic) = setup(name, 1).await;
    let spy = SpyStore::new(store.clone());
    support::produce(
        &topic,
        vec![
            Ev::with_event_id(0, "e1", "a").fail_transient(1).record(),
            Ev::with_event_id(1, "e1", "b").record(),
            Ev::with_event_id(2, "e2", "a").record(),
            Ev::with_event_id(3, "e2", "c").permanent().record(),
        ],
    )
    .await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group, spy.clone(), by_event()));

    assert_eq!(
        outcomes_once_committed(c, &log, &group, &topic, 4).await,
        vec![(0, 1, false), (0, 2, true), (2, 1, true)],
        "{store:?}: e1 failed once then ran once, e2 ran once, the duplicates never ran"
    );
    assert_eq!(
        spy.hook().settled_labels_for(&namespaced(&group, "e1")),
        [
            "claim:acquired",
            "release:released",
            "claim:acquired",
            "complete:completed",
            "claim:done"
        ],
        "{store:?}"
    );
    assert_eq!(
        spy.hook().settled_labels_for(&namespaced(&group, "e2")),
        ["claim:acquired", "complete:completed", "claim:done"],
        "{store:?}"
    );
    assert_eq!(probe(&*store, &group, "e1").await, Claim::Done);
    assert_eq!(probe(&*store, &group, "e2").await, Claim::Done);
    assert!(matches!(
        probe(&*store, &group, "never-seen").await,
        Claim::Acquired(_)
    ));
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scenario_with_the_in_memory_store() {
    duplicates_and_a_transient_failure(
        Arc::new(InMemoryIdempotencyStore::new()),
        "idem-shared-mem",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scenario_with_the_redis_store() {
    duplicates_and_a_transient_failure(shared_redis_store().await, "idem-shared-redis").await;
}

// ---------------------------------------------------------------------------------------------
// 6. Claims fetched ahead: one round trip for a lane's next records, released when unused
// ---------------------------------------------------------------------------------------------

/// Counts the store's claim round trips (a `claim_many` batch is one) and the keys claimed,
/// in front of a real store.
#[derive(Debug, Default)]
struct RoundTrips {
    claim_calls: std::sync::atomic::AtomicUsize,
    keys_claimed: std::sync::atomic::AtomicUsize,
    busy: std::sync::atomic::AtomicUsize,
}

impl RoundTrips {
    /// `inner`, its claims counted (the counter is its [`hook`](HookedStore::hook)).
    fn new(inner: Arc<dyn IdempotencyStore>) -> Arc<HookedStore<dyn IdempotencyStore, RoundTrips>> {
        Arc::new(HookedStore::new(inner, RoundTrips::default()))
    }

    fn counts(&self) -> (usize, usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (
            self.claim_calls.load(SeqCst),
            self.keys_claimed.load(SeqCst),
            self.busy.load(SeqCst),
        )
    }

    fn count(&self, answers: &[Result<Claim, kourier::StoreError>]) {
        use std::sync::atomic::Ordering::SeqCst;
        self.claim_calls.fetch_add(1, SeqCst);
        self.keys_claimed.fetch_add(answers.len(), SeqCst);
        let busy = answers
            .iter()
            .filter(|a| matches!(a, Ok(Claim::Busy)))
            .count();
        self.busy.fetch_add(busy, SeqCst);
    }
}

impl StoreHook for RoundTrips {
    fn after(&self, _: &StoreCall<'_>, answer: StoreAnswer<'_>) {
        match answer {
            StoreAnswer::Claim(answer) => self.count(std::slice::from_ref(answer)),
            StoreAnswer::ClaimMany(answers) => self.count(answers),
            _ => {}
        }
    }
}

/// `n` records with unique event ids over `partitions` (round robin by key).
fn unique_events(n: u64, partitions: u64, sleep_ms: u64) -> Vec<TestRecord> {
    (0..n)
        .map(|i| {
            Ev::with_event_id(i, &format!("evt-{i}"), &format!("k{}", i % partitions))
                .sleep_ms(sleep_ms)
                .record()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_claims_its_next_records_in_one_round_trip() {
    const RECORDS: u64 = 400;
    let (topic, group, dlt_topic) = setup("idem-ahead", 1).await;
    let store = RoundTrips::new(shared_redis_store().await);
    support::produce(&topic, unique_events(RECORDS, 1, 0)).await;

    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group, store.clone(), by_header())
            .ordering(ProcessingOrder::Partition),
    );
    wait_committed(&group, &topic, 1, RECORDS as i64).await;
    c.stop_within(SHUTDOWN).await;

    let (round_trips, keys, busy) = store.hook().counts();
    println!(
        "{RECORDS} records in one partition: {round_trips} claim round trips, {keys} keys claimed, {busy} busy"
    );
    assert_eq!(
        log.sorted_succeeded_ids(),
        (0..RECORDS).collect::<Vec<_>>(),
        "every record handled exactly once"
    );
    // One record at a time in the partition: without claim-ahead, one round trip each.
    assert!(
        round_trips * 8 <= RECORDS as usize,
        "{round_trips} claim round trips for {RECORDS} records in one partition"
    );
    assert_eq!(
        (keys, busy),
        (RECORDS as usize, 0),
        "each key claimed once, never found busy (a record took the claim fetched for it)"
    );
    let last = format!("evt-{}", RECORDS - 1);
    assert_eq!(probe(&*store, &group, &last).await, Claim::Done);
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

/// A consumer holding claims fetched ahead gives up partitions (a second consumer joins),
/// then shuts down: the records it did not run go to the other consumer, which must find
/// their keys free — with a 120 s lease, claims left behind would hold them for two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_shutdown_release_the_claims_fetched_ahead() {
    const RECORDS: u64 = 600;
    const PARTITIONS: i32 = 2;
    let lease = Duration::from_secs(120);
    let (topic, group, dlt_topic) = setup("idem-ahead-release", PARTITIONS).await;
    let store = RoundTrips::new(shared_redis_store().await);
    support::produce(&topic, unique_events(RECORDS, PARTITIONS as u64, 10)).await;

    let log = Log::new();
    let consumer = |log: &Arc<Log>| {
        builder_with(
            log,
            &topic,
            &group,
            Idempotency::new(store.clone(), by_header()).with_lease(lease),
        )
        .ordering(ProcessingOrder::Partition)
    };
    let started = Instant::now();
    let first = Running::start(consumer(&log));
    wait_for("the first consumer to handle records", WAIT, || {
        log.successes().len() >= 40
    })
    .await;
    let second = Running::start(consumer(&log));
    wait_for("the second consumer to take a partition over", WAIT, || {
        !second.monitor.snapshot().assigned.is_empty()
    })
    .await;
    wait_for("records handled after the hand-over", WAIT, || {
        log.successes().len() >= 200
    })
    .await;
    first.stop_within(SHUTDOWN).await;
    wait_committed(&group, &topic, PARTITIONS, RECORDS as i64).await;
    let took = started.elapsed();
    second.stop_within(SHUTDOWN).await;

    let (round_trips, keys, busy) = store.hook().counts();
    println!(
        "{RECORDS} records, a rebalance and a shutdown: done in {took:.1?} (lease {lease:?}); \
         {round_trips} claim round trips, {keys} keys claimed, {busy} busy"
    );
    assert!(
        took < lease / 2,
        "the records the first consumer held claims for waited for their lease: {took:?}"
    );
    assert_eq!(
        log.sorted_succeeded_ids(),
        (0..RECORDS).collect::<Vec<_>>(),
        "every record handled exactly once"
    );
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}

/// A record whose key is being marked done frees its lane for the next record, and costs no
/// task of its own meanwhile: the worker that ran it keeps it beside the records it runs next
/// (no task spawn, no thread hand-off per record). Records settling are bounded: 4 per
/// in-flight slot (256 with the default 64). With the store's completions held, 256 records
/// of the partition are handled and wait to settle, the 257th is handled and keeps its slot
/// and lane (nothing after it starts), while the runtime holds a handful of tasks; opened,
/// all of them settle and are committed, each handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_being_marked_done_hold_no_task_each_and_are_bounded() {
    const RECORDS: u64 = 300;
    const SETTLING: usize = 4 * 64;
    let (topic, group, dlt_topic) = setup("idem-tails", 1).await;
    let (open, held) = tokio::sync::watch::channel(false);
    let inner: Arc<dyn IdempotencyStore> = Arc::new(InMemoryIdempotencyStore::new());
    let store = Arc::new(HookedStore::new(inner, HeldCompletions(held)));
    support::produce(&topic, unique_events(RECORDS, 1, 0)).await;

    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group, store, by_header()).ordering(ProcessingOrder::Partition),
    );
    wait_for("the settling limit reached", WAIT, || {
        log.successes().len() == SETTLING + 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settling = c.monitor.snapshot().in_flight;
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    println!("{settling} records waiting to settle, {tasks} tasks alive");
    assert_eq!(
        (log.successes().len(), settling),
        (SETTLING + 1, SETTLING + 1),
        "256 records settle, the next keeps its slot: nothing more starts"
    );
    assert!(
        tasks < 20,
        "{tasks} tasks alive while {settling} records wait for their completions"
    );
    assert_eq!(
        committed_sum(&group, &topic, 1).await,
        0,
        "nothing settled yet"
    );

    open.send_replace(true);
    wait_committed(&group, &topic, 1, RECORDS as i64).await;
    c.stop_within(SHUTDOWN).await;
    assert_eq!(
        log.sorted_succeeded_ids(),
        (0..RECORDS).collect::<Vec<_>>(),
        "every record handled exactly once"
    );
    assert_nothing_dead_lettered(&support::read_all(&dlt_topic).await);
}
