//! Transactional output (`RetryingConsumerBuilder::transactional`), against the real broker:
//! the outputs a handler stages and the consumed offsets commit in one transaction, so a
//! `read_committed` reader of the outputs sees each input's outputs exactly once — in a clean
//! run, after a rebalance with records finished out of order above a stuck one, and after an
//! aborted transaction (whose outputs are in the log but invisible to `read_committed`).
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics, group and
//! transactional id.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kourier::idempotency::testing::HookedStore;
use kourier::transactional::{OutputRecord, TransactionalOutput};
use kourier::{Error, HandlerError, Message, ProcessingOrder, handler_fn};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};
use support::store::HeldCompletions;

#[derive(Debug, Deserialize)]
struct Job {
    id: usize,
}

/// Each input produces this many outputs.
const OUTPUTS_PER_INPUT: usize = 2;

async fn produce_inputs(topic: &str, n: usize) {
    let records = (0..n)
        .map(|id| {
            TestRecord::new()
                .key(format!("k{id}"))
                .value(format!(r#"{{"id":{id}}}"#))
        })
        .collect();
    support::produce(topic, records).await;
}

/// What the handlers do, per input id.
struct Calls {
    calls: Vec<AtomicU32>,
    /// Record 0 hangs while set.
    stuck: AtomicBool,
    /// While set, record `big` also stages an output too large for the `big` topic.
    oversize: AtomicBool,
    big: usize,
}

impl Calls {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Calls {
            calls: (0..n).map(|_| AtomicU32::new(0)).collect(),
            stuck: AtomicBool::new(false),
            oversize: AtomicBool::new(false),
            big: usize::MAX,
        })
    }

    fn called(&self) -> Vec<usize> {
        (self.calls.iter().enumerate())
            .filter(|(_, n)| n.load(Ordering::SeqCst) > 0)
            .map(|(id, _)| id)
            .collect()
    }
}

/// Stages `OUTPUTS_PER_INPUT` outputs to `out` per input (key `k<id>`, value `<id>-<n>`).
fn enriching(
    calls: &Arc<Calls>,
    out: &str,
    big_topic: Option<String>,
) -> impl kourier::Handler<Event = Job> {
    let calls = calls.clone();
    let out = out.to_owned();
    handler_fn(move |m: Message<Job>| {
        let (calls, out, big_topic) = (calls.clone(), out.clone(), big_topic.clone());
        async move {
            let id = m.event().id;
            calls.calls[id].fetch_add(1, Ordering::SeqCst);
            while id == 0 && calls.stuck.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for n in 0..OUTPUTS_PER_INPUT {
                m.send_output(
                    OutputRecord::new(&out)
                        .key(format!("k{id}"))
                        .value(format!("{id}-{n}"))
                        .header("input-offset", m.offset().to_string()),
                )?;
            }
            if let Some(big) = &big_topic
                && id == calls.big
                && calls.oversize.load(Ordering::SeqCst)
            {
                m.send_output(OutputRecord::new(big).value(vec![b'x'; 8_000]))?;
            }
            Ok::<(), HandlerError>(())
        }
    })
}

fn transactional(
    handler: impl kourier::Handler<Event = Job>,
    topic: &str,
    group: &str,
    transactional_id: &str,
) -> kourier::RetryingConsumerBuilder<impl kourier::Handler<Event = Job>> {
    consumer::builder(handler, topic, group)
        .ordering(ProcessingOrder::Key)
        .shutdown_timeout(Duration::from_secs(2))
        .revoke_timeout(Duration::from_secs(1))
        .transactional(
            TransactionalOutput::new(transactional_id)
                .with_transaction_timeout(Duration::from_secs(10)),
        )
}

/// The values of `topic` (every partition, from the start to its end) as a reader with
/// `isolation.level` `read_committed` (`committed`) or `read_uncommitted` sees them, counted.
fn read_values(topic: &str, committed: bool) -> BTreeMap<String, usize> {
    let consumer: BaseConsumer = support::client_config()
        .set("group.id", support::unique_name("txn-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set(
            "isolation.level",
            if committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .expect("reader");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut values = BTreeMap::new();
    let mut ended = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ended.len() < partitions {
        assert!(Instant::now() < deadline, "reading {topic}: no end in 30 s");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                *values.entry(v).or_insert(0) += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    values
}

async fn read(topic: &str, committed: bool) -> BTreeMap<String, usize> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_values(&topic, committed))
        .await
        .expect("reader")
}

/// Every expected output value of inputs `0..n`, once each.
fn each_once(n: usize) -> BTreeMap<String, usize> {
    (0..n)
        .flat_map(|id| (0..OUTPUTS_PER_INPUT).map(move |k| (format!("{id}-{k}"), 1)))
        .collect()
}

/// The values seen more than once, and those missing.
fn differences(seen: &BTreeMap<String, usize>, n: usize) -> (Vec<(String, usize)>, Vec<String>) {
    let expected = each_once(n);
    let duplicates = (seen.iter())
        .filter(|(_, c)| **c > 1)
        .map(|(v, c)| (v.clone(), *c))
        .collect();
    // (Failure messages name the count and the first few.)
    let missing = (expected.keys())
        .filter(|v| !seen.contains_key(*v))
        .cloned()
        .collect();
    (duplicates, missing)
}

fn assert_exactly_once(duplicates: &[(String, usize)], missing: &[String]) {
    assert!(
        duplicates.is_empty(),
        "{} output values seen more than once under read_committed, first: {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(6)]
    );
    assert!(
        missing.is_empty(),
        "{} output values missing under read_committed, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(6)]
    );
}

/// A clean run: every input's outputs are seen exactly once by a `read_committed` reader,
/// and the group's offsets are committed to the end (by the transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inputs_outputs_are_seen_exactly_once_in_a_clean_run() {
    const N: usize = 300;
    let (topic, group, _) = setup("txn-clean", 3).await;
    let out = support::new_topic("txn-clean-out", 3).await;
    produce_inputs(&topic, N).await;
    let calls = Calls::new(N);
    let c = Running::start(transactional(
        enriching(&calls, &out, None),
        &topic,
        &group,
        &support::unique_name("txn-clean-id"),
    ));
    wait_for("every input handled", Duration::from_secs(60), || {
        calls.called().len() == N
    })
    .await;
    c.stop().await;
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
    assert_eq!(seen.len(), N * OUTPUTS_PER_INPUT);
    let total = support::committed_sum(&group, &topic, 3).await;
    assert_eq!(total, N as i64, "offsets committed to the end");
}

// ---- With an idempotency store: keys are marked done once their transaction committed ----

/// The dedup key of an input: its id.
fn job_id_key() -> kourier::DedupKey<Job> {
    kourier::DedupKey::from_fn(|m: &Message<Job>| Some(format!("job-{}", m.event().id)))
}

/// A Redis idempotency store under `prefix` (the one a consumer of this test used).
async fn redis_store(prefix: &str) -> Arc<dyn kourier::IdempotencyStore> {
    support::require_redis().await;
    let store = kourier::RedisIdempotencyStore::builder(support::redis_url().as_str())
        .key_prefix(prefix)
        .build()
        .await
        .expect("redis store");
    Arc::new(store)
}

/// Every input id `0..n`'s key is done in `store` for `group` (a claim says `Done`).
async fn assert_all_done(store: &dyn kourier::IdempotencyStore, group: &str, n: usize) {
    let mut not_done = Vec::new();
    for id in 0..n {
        let key = format!("{group}:job-{id}");
        let claim = store
            .claim(&key, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("probe claim on {key}: {e:?}"));
        if claim != kourier::Claim::Done {
            not_done.push((id, claim));
        }
    }
    assert!(
        not_done.is_empty(),
        "{} of {n} keys not done in the store after the run, first: {:?}",
        not_done.len(),
        &not_done[..not_done.len().min(6)]
    );
}

/// Inputs `0..n`, then `0..dups` again (the same ids: duplicate events, later offsets of
/// the same keys' partitions); a transactional consumer with idempotency in `store` handles
/// them: each input's effect (the handler's call) happens once, its outputs are seen once
/// under `read_committed`, the duplicates are skipped and their offsets committed, and every
/// key is done in the store after the run. Without duplicates the consumer is stopped once
/// every input was handled, before its first commit (an 8 s interval): the shutdown's
/// commit carries every record, and `run` returns once their keys are done.
/// `held_completions`, if any, is opened half a second after the stop is asked for.
async fn once_with_a_store(
    name: &str,
    store: Arc<dyn kourier::IdempotencyStore>,
    dups: usize,
    held_completions: Option<tokio::sync::watch::Sender<bool>>,
) {
    const N: usize = 60;
    let (topic, group, _) = setup(name, 2).await;
    let out = support::new_topic(&format!("{name}-out"), 2).await;
    produce_inputs(&topic, N).await;
    produce_inputs(&topic, dups).await;
    let calls = Calls::new(N);
    let c = Running::start(
        transactional(
            enriching(&calls, &out, None),
            &topic,
            &group,
            &support::unique_name(&format!("{name}-id")),
        )
        // (A duplicate waits while its key's claim is held: until a commit.)
        .commit_interval(Duration::from_millis(if dups == 0 { 8_000 } else { 500 }))
        .idempotency(kourier::Idempotency::new(store.clone(), job_id_key())),
    );
    if dups == 0 {
        wait_for("every input handled", Duration::from_secs(30), || {
            calls.called().len() == N
        })
        .await;
    } else {
        consumer::wait_until(
            "every input committed, duplicates included",
            Duration::from_secs(30),
            || async {
                support::try_committed_sum(&group, &topic, 2).await == Ok((N + dups) as i64)
            },
        )
        .await;
    }
    if let Some(open) = held_completions {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = open.send(true);
        });
    }
    c.stop().await;
    // Done once `run` returned (before anything else is looked at).
    assert_all_done(&*store, &group, N).await;
    assert_eq!(
        support::committed_sum(&group, &topic, 2).await,
        (N + dups) as i64,
        "offsets committed to the end"
    );
    let twice: Vec<_> = (calls.calls.iter().enumerate())
        .map(|(id, n)| (id, n.load(Ordering::SeqCst)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        twice.is_empty(),
        "inputs whose effect did not happen exactly once (id, calls): {twice:?}"
    );
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
}

/// A clean run with transactional output and an in-memory idempotency store whose
/// completions are held until half a second after the stop was asked for (`run` must wait
/// for the completions its last transaction led to): each input's outputs seen once under
/// `read_committed`, each key done in the store once `run` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_in_memory_store_each_key_is_done_after_its_outputs_committed() {
    let memory: Arc<dyn kourier::IdempotencyStore> =
        Arc::new(kourier::InMemoryIdempotencyStore::new());
    let (open, held) = tokio::sync::watch::channel(false);
    let store = Arc::new(HookedStore::new(memory, HeldCompletions(held)));
    once_with_a_store("txn-mem-store", store, 0, Some(open)).await;
}

/// The same with the Redis store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_redis_store_each_key_is_done_after_its_outputs_committed() {
    let store = redis_store(&support::unique_name("txn-redis-store:")).await;
    once_with_a_store("txn-redis-store", store, 0, None).await;
}

/// Duplicate events (the same dedup key in two records): the second copy waits while the
/// first's claim is held until its transaction committed, then is skipped; one effect and
/// one set of outputs per event, with the in-memory store and with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_has_its_effect_and_outputs_once() {
    let store = Arc::new(kourier::InMemoryIdempotencyStore::new());
    once_with_a_store("txn-mem-dups", store, 20, None).await;
    let store = redis_store(&support::unique_name("txn-redis-dups:")).await;
    once_with_a_store("txn-redis-dups", store, 20, None).await;
}

/// kill -9 once every record was handled (its effect made, its key claimed in Redis) but
/// before the transaction committed (a 30 s commit interval); the restarted consumer (same
/// transactional id, same Redis store) aborts that transaction and, the keys not being done,
/// handles the records again: each input's outputs are seen exactly once under
/// `read_committed`, and every key is done in the store after the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_handling_before_the_commit_with_a_redis_store_leaves_each_output_once() {
    kill_9_before_the_commit_leaves_one_copy_per_record(KillAfter::Handled, true).await;
}

/// Records finished out of order above a stuck one, then a rebalance: the transaction that
/// carried their outputs also carried their "finished" mark (the commit metadata), so the
/// partition's next owner handles only the stuck record, and a `read_committed` reader sees
/// every input's outputs exactly once (delivery rule 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_of_records_finished_above_a_stuck_one_are_not_produced_again_by_the_next_owner() {
    const N: usize = 200;
    let (topic, group, _) = setup("txn-ooo", 1).await;
    let out = support::new_topic("txn-ooo-out", 1).await;
    produce_inputs(&topic, N).await;
    let id = support::unique_name("txn-ooo-id");

    // The first owner: record 0 hangs, every other finishes (out of order above it) and
    // their transactions commit; it leaves with record 0 still running.
    let first = Calls::new(N);
    first.stuck.store(true, Ordering::SeqCst);
    let c = Running::start(transactional(
        enriching(&first, &out, None),
        &topic,
        &group,
        &id,
    ));
    wait_for("every input but 0 handled", Duration::from_secs(60), || {
        first.called().len() == N
    })
    .await;
    // Let a transaction commit them while 0 is still stuck.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = read(&out, true).await;
    assert_eq!(
        before.len(),
        (N - 1) * OUTPUTS_PER_INPUT,
        "records above the stuck one committed their outputs already"
    );
    let report = c.stop_with_report(Duration::from_secs(30)).await;
    assert_eq!(report.abandoned, 1, "record 0, stuck: {report:?}");

    // The next owner.
    let next = Calls::new(N);
    let c = Running::start(transactional(
        enriching(&next, &out, None),
        &topic,
        &group,
        &id,
    ));
    wait_for(
        "record 0 handled by the next owner",
        Duration::from_secs(60),
        || next.calls[0].load(Ordering::SeqCst) > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.stop().await;
    assert_eq!(next.called(), [0], "only the record that never finished");
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
}

/// A transaction that cannot commit (an output the broker refuses) is aborted: the consumer
/// stops with `Error::Transaction`, the outputs of the aborted transaction are in the log
/// (a `read_uncommitted` reader sees them) but not visible to `read_committed`, and a restart
/// handles the aborted records again: each input's outputs exactly once under
/// `read_committed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transactions_outputs_are_invisible_and_its_records_handled_again() {
    const N: usize = 100;
    let (topic, group, _) = setup("txn-abort", 1).await;
    let out = support::new_topic("txn-abort-out", 1).await;
    let big = support::unique_name("txn-abort-big");
    support::create_topic_with_config(&big, 1, &[("max.message.bytes", "1024")]).await;
    produce_inputs(&topic, N).await;
    let id = support::unique_name("txn-abort-id");

    let mut calls = Calls::new(N);
    Arc::get_mut(&mut calls).unwrap().big = 60;
    calls.oversize.store(true, Ordering::SeqCst);
    let c = Running::start(transactional(
        enriching(&calls, &out, Some(big.clone())),
        &topic,
        &group,
        &id,
    ));
    let result = tokio::time::timeout(Duration::from_secs(60), c.task)
        .await
        .expect("the consumer stops on its own")
        .expect("no panic");
    match result {
        Err(Error::Transaction { fenced, .. }) => assert!(!fenced),
        other => panic!("expected a transaction error, got {other:?}"),
    }
    let uncommitted = read(&out, false).await;
    let committed = read(&out, true).await;
    assert!(
        uncommitted.len() > committed.len(),
        "the aborted transaction's outputs are in the log: {} read uncommitted, {} committed",
        uncommitted.len(),
        committed.len()
    );
    assert!(
        !committed.contains_key("60-0"),
        "the record whose output was refused is not committed"
    );

    // Restarted without the oversized output: the aborted records are handled again.
    let again = Calls::new(N);
    let c = Running::start(transactional(
        enriching(&again, &out, Some(big)),
        &topic,
        &group,
        &id,
    ));
    wait_for(
        "record 99 handled after the restart",
        Duration::from_secs(60),
        || again.calls[N - 1].load(Ordering::SeqCst) > 0,
    )
    .await;
    c.stop().await;
    assert!(again.called().contains(&60), "the aborted record ran again");
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
}

/// `build()` refuses the combinations not supported yet, with a typed error.
#[test]
fn unsupported_combinations_are_refused_by_build() {
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let err = kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .retry_tiers(
            kourier::tiers::RetryTiers::new([Duration::from_secs(5)])
                .with_key_order(Arc::new(kourier::tiers::InMemoryKeyOrderLedger::new())),
        )
        .transactional(TransactionalOutput::new("x"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(kourier::ConfigError::Conflict { value, reason, .. })
            if value == "RetryTiers::with_key_order" && reason.contains("before its transaction commits")),
        "{err:?}"
    );
    // Without a key-order ledger, retry tiers are forwarded in the transaction.
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .retry_tiers(kourier::tiers::RetryTiers::new([Duration::from_secs(5)]))
        .transactional(TransactionalOutput::new("x"))
        .build()
        .expect("retry tiers without key order build with transactional output");
    // An idempotency store is kept until the transaction commits: not refused.
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let store = std::sync::Arc::new(kourier::InMemoryIdempotencyStore::new());
    kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .idempotency(kourier::Idempotency::new(
            store,
            kourier::DedupKey::header("event-id"),
        ))
        .transactional(TransactionalOutput::new("x"))
        .build()
        .expect("idempotency builds with transactional output");
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let err = kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .commit_metadata(kourier::CommitMetadata::None)
        .transactional(TransactionalOutput::new("x"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(kourier::ConfigError::Conflict { .. })),
        "{err:?}"
    );
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let err = kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .kafka_config("isolation.level", "read_uncommitted")
        .transactional(TransactionalOutput::new("x"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(kourier::ConfigError::Conflict { key, .. }) if key == "isolation.level"),
        "{err:?}"
    );
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let err = kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .commit_interval(Duration::from_secs(60))
        .transactional(TransactionalOutput::new("x"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(kourier::ConfigError::Invalid { .. })),
        "{err:?}"
    );
    let handler = handler_fn(|_m: Message<Job>| async { Ok(()) });
    let err = kourier::RetryingConsumer::builder(handler)
        .bootstrap_servers("127.0.0.1:1")
        .group_id("g")
        .topic("t")
        .transactional(TransactionalOutput::new(" "))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(kourier::ConfigError::Invalid { .. })),
        "{err:?}"
    );
}

// ---- Process faults: a child process runs the consumer (this test binary, run again) ----

/// The child's handler sleeps this long per record, so that faults land mid-run.
const CHILD_HANDLER_MS: u64 = 20;

/// Not a test on its own: with `KOURIER_TXN_CHILD` set, runs a transactional consumer of
/// `KOURIER_TXN_TOPIC` in `KOURIER_TXN_GROUP` with the id `KOURIER_TXN_ID`, writing to
/// `KOURIER_TXN_OUT`, until SIGTERM; exits 0 after a clean stop, 3 on `Error::Transaction`
/// (printing `fenced=<bool>`), 4 on any other error. `KOURIER_TXN_DLT_REPORT` (every input
/// fails permanently), `KOURIER_TXN_TIER_REPORT` (every input fails transiently, to tier 1)
/// or `KOURIER_TXN_HANDLED_REPORT` (every input is handled) names a file each outcome is
/// appended to; each sets a 30 s commit interval. `KOURIER_TXN_REDIS_PREFIX` turns on
/// idempotency in Redis under that key prefix.
#[test]
fn child_consumer() {
    let Ok(topic) = std::env::var("KOURIER_TXN_CHILD") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let (group, out, id) = (
        var("KOURIER_TXN_GROUP"),
        var("KOURIER_TXN_OUT"),
        var("KOURIER_TXN_ID"),
    );
    // Dead-letter mode: every input fails permanently, each outcome is appended to this file.
    let letters_to = std::env::var("KOURIER_TXN_DLT_REPORT").ok();
    // Tier mode: every input fails transiently and is forwarded to tier 1 (a 30 s delay),
    // each outcome is appended to this file.
    let forwards_to = std::env::var("KOURIER_TXN_TIER_REPORT").ok();
    // Handled mode: each outcome appended to this file.
    let handled_to = std::env::var("KOURIER_TXN_HANDLED_REPORT").ok();
    let fail_all = letters_to.is_some();
    let fail_transiently = forwards_to.is_some();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let result = runtime.block_on(async move {
        let handler = handler_fn(move |m: Message<Job>| {
            let out = out.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(CHILD_HANDLER_MS)).await;
                if fail_all {
                    return Err(HandlerError::permanent("refused"));
                }
                if fail_transiently {
                    return Err(HandlerError::transient("not yet"));
                }
                let id = m.event().id;
                for n in 0..OUTPUTS_PER_INPUT {
                    m.send_output(
                        OutputRecord::new(&out)
                            .key(format!("k{id}"))
                            .value(format!("{id}-{n}")),
                    )?;
                }
                Ok::<(), HandlerError>(())
            }
        });
        let mut builder = consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(8)
            .shutdown_timeout(Duration::from_secs(5))
            .transactional(TransactionalOutput::new(id));
        if forwards_to.is_some() {
            builder = builder
                .retry_policy(kourier::RetryPolicy::no_retries())
                .retry_tiers(kourier::tiers::RetryTiers::new([Duration::from_secs(30)]));
        }
        if let Ok(prefix) = std::env::var("KOURIER_TXN_REDIS_PREFIX") {
            // A short lease: the restarted consumer takes the killed one's claims over soon.
            let store = kourier::RedisIdempotencyStore::builder(support::redis_url().as_str())
                .key_prefix(prefix)
                .build()
                .await
                .expect("redis store");
            builder = builder.idempotency(
                kourier::Idempotency::new(Arc::new(store), job_id_key())
                    .with_lease(Duration::from_secs(3)),
            );
        }
        if let Some(report) = letters_to.or(forwards_to).or(handled_to) {
            // A long interval: the transaction holding the letters stays open till the kill
            // (a restarted child is given a short one, to commit soon).
            let interval = std::env::var("KOURIER_TXN_COMMIT_INTERVAL_MS")
                .map_or(Duration::from_secs(30), |ms| {
                    Duration::from_millis(ms.parse().expect("milliseconds"))
                });
            builder = builder
                .commit_interval(interval)
                .on_outcome(move |record, outcome| {
                    use std::io::Write as _;
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&report)
                        .expect("report file");
                    // One write per line: workers report at once, and `writeln!` may
                    // write a line in pieces that interleave.
                    let line = format!("{} {outcome}\n", record.coordinates());
                    file.write_all(line.as_bytes()).expect("report");
                });
        }
        builder.build()?.run_until_signal().await
    });
    match result {
        Ok(_) => std::process::exit(0),
        Err(Error::Transaction {
            fenced,
            operation,
            source,
        }) => {
            eprintln!("child: transaction error during {operation}: fenced={fenced}: {source}");
            std::process::exit(3)
        }
        Err(e) => {
            eprintln!("child: error: {e:?}");
            std::process::exit(4)
        }
    }
}

/// A child process running [`child_consumer`].
struct Child(std::process::Child);

impl Child {
    fn start(topic: &str, group: &str, out: &str, id: &str) -> Child {
        Child::start_with(topic, group, out, id, &[])
    }

    fn start_with(topic: &str, group: &str, out: &str, id: &str, env: &[(&str, &str)]) -> Child {
        let exe = std::env::current_exe().expect("test binary");
        let child = std::process::Command::new(exe)
            .envs(env.iter().copied())
            .args([
                "--exact",
                "child_consumer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KOURIER_TXN_CHILD", topic)
            .env("KOURIER_TXN_GROUP", group)
            .env("KOURIER_TXN_OUT", out)
            .env("KOURIER_TXN_ID", id)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn the child consumer");
        Child(child)
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits (at most `timeout`) for the child to exit; its exit code.
    async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the child did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a `read_committed` reader sees at least `count` output values (each counted
/// once per copy) in `out`; returns how many it saw.
async fn wait_for_committed(out: &str, count: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let seen: usize = read(out, true).await.values().sum();
        if seen >= count {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{out}: {seen} committed outputs after {timeout:?}, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kill -9 of the consumer process, twice, mid-run (the same transactional id restarts
/// each time): each input's outputs are seen exactly once by a `read_committed` reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_run_leaves_each_inputs_outputs_exactly_once() {
    // About 8 s of work for one process (8 records at a time, 20 ms each).
    const N: usize = 3_000;
    let (topic, group, _) = setup("txn-kill", 2).await;
    let out = support::new_topic("txn-kill-out", 2).await;
    produce_inputs(&topic, N).await;
    let id = support::unique_name("txn-kill-id");
    let mut seen_before_kill = Vec::new();
    let mut floor = 0i64;
    for _ in 0..2 {
        let child = Child::start(&topic, &group, &out, &id);
        // Some inputs committed by this run (their transactions), then the kill lands
        // mid-run.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A killed child's transaction may hold its offsets pending until its successor
            // (same transactional id) fences it: a fetch that times out meanwhile is retried.
            let committed = support::try_committed_sum(&group, &topic, 2)
                .await
                .unwrap_or(floor);
            if committed >= floor + 300 {
                floor = committed;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no progress: {committed} committed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.signal("-KILL");
        drop(child);
        seen_before_kill.push(floor);
    }
    let mut last = Child::start(&topic, &group, &out, &id);
    wait_for_committed(&out, N * OUTPUTS_PER_INPUT, Duration::from_secs(120)).await;
    last.signal("-TERM");
    assert_eq!(
        last.exit_code(Duration::from_secs(30)).await,
        Some(0),
        "a clean stop"
    );
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    eprintln!(
        "kill -9 twice (inputs committed before each kill: {seen_before_kill:?}): {} duplicates, {} missing under read_committed; {} copies read uncommitted",
        duplicates.len(),
        missing.len(),
        read(&out, false).await.values().sum::<usize>()
    );
    assert_exactly_once(&duplicates, &missing);
}

/// A zombie: the consumer process is frozen (SIGSTOP) past its session timeout while another
/// member of its group takes its partitions over and handles them; resumed, the zombie's
/// open transaction is refused (KIP-447: its group generation is stale) or aborted, it stops
/// with `Error::Transaction`, and a `read_committed` reader sees each input's outputs exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_frozen_past_its_session_is_fenced() {
    const N: usize = 600;
    let (topic, group, _) = setup("txn-zombie", 2).await;
    let out = support::new_topic("txn-zombie-out", 2).await;
    produce_inputs(&topic, N).await;
    let mut zombie = Child::start(&topic, &group, &out, &support::unique_name("txn-zombie-a"));
    wait_for_committed(&out, 100, Duration::from_secs(60)).await;
    zombie.signal("-STOP");
    // Past the 6 s session timeout: the group forgets the zombie.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut successor = Child::start(&topic, &group, &out, &support::unique_name("txn-zombie-b"));
    let deadline = Instant::now() + Duration::from_secs(120);
    // The frozen zombie's transaction may hold offsets pending (a read_committed fetch
    // waits for it) until the broker aborts it: a fetch that times out is retried.
    while support::try_committed_sum(&group, &topic, 2)
        .await
        .map_or(true, |sum| sum < N as i64)
    {
        assert!(
            Instant::now() < deadline,
            "the successor did not commit every offset"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    zombie.signal("-CONT");
    assert_eq!(
        zombie.exit_code(Duration::from_secs(60)).await,
        Some(3),
        "the zombie stops with Error::Transaction"
    );
    wait_for_committed(&out, N * OUTPUTS_PER_INPUT, Duration::from_secs(60)).await;
    successor.signal("-TERM");
    assert_eq!(successor.exit_code(Duration::from_secs(30)).await, Some(0));
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
}

/// A batch handler (`batched`) stages outputs per record of its batch, and fails every
/// other record's first attempt after staging its outputs: the outputs of the failed
/// attempts are dropped, those of the attempts that succeed are produced, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handlers_outputs_of_failed_attempts_are_dropped() {
    use kourier::batch::{BatchHandler, BatchOutcome, batched};

    const N: usize = 200;
    struct Bulk {
        out: String,
        calls: Arc<Calls>,
    }
    #[kourier::async_trait]
    impl BatchHandler for Bulk {
        type Event = Job;
        async fn handle_batch(&self, batch: &[Message<Job>]) -> BatchOutcome {
            let mut results = Vec::with_capacity(batch.len());
            for m in batch {
                let id = m.event().id;
                let attempt = self.calls.calls[id].fetch_add(1, Ordering::SeqCst) + 1;
                for n in 0..OUTPUTS_PER_INPUT {
                    let staged = m.send_output(
                        OutputRecord::new(&self.out)
                            .key(format!("k{id}"))
                            .value(format!("{id}-{n}")),
                    );
                    assert!(staged.is_ok(), "transactional: {staged:?}");
                }
                results.push(if id % 2 == 0 && attempt == 1 {
                    Err(HandlerError::transient("first attempt of an even record"))
                } else {
                    Ok(())
                });
            }
            BatchOutcome::each(results)
        }
    }

    let (topic, group, _) = setup("txn-batch", 2).await;
    let out = support::new_topic("txn-batch-out", 2).await;
    produce_inputs(&topic, N).await;
    let calls = Calls::new(N);
    let handler = batched(Bulk {
        out: out.clone(),
        calls: calls.clone(),
    })
    .max_records(50)
    .linger(Duration::from_millis(5));
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .retry_policy(kourier::RetryPolicy::fixed(Duration::from_millis(50), 3))
            .transactional(TransactionalOutput::new(support::unique_name(
                "txn-batch-id",
            ))),
    );
    wait_for("every even record retried", Duration::from_secs(60), || {
        (0..N).all(|id| calls.calls[id].load(Ordering::SeqCst) >= if id % 2 == 0 { 2 } else { 1 })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stop().await;
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    assert_exactly_once(&duplicates, &missing);
}

/// A live hand-over: a second member joins mid-run (its partitions revoked from the first,
/// whose revoke commits its transaction with their offsets), then the first leaves: each
/// input's outputs exactly once under `read_committed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_rebalance_between_two_members_keeps_outputs_exactly_once() {
    // About 5 s of work for one member (4 records at a time, 5 ms each): the second joins
    // while records still flow.
    const N: usize = 4_000;
    let (topic, group, _) = setup("txn-handover", 4).await;
    let out = support::new_topic("txn-handover-out", 4).await;
    produce_inputs(&topic, N).await;
    let slow = |calls: &Arc<Calls>| {
        let calls = calls.clone();
        let out = out.clone();
        handler_fn(move |m: Message<Job>| {
            let (calls, out) = (calls.clone(), out.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let id = m.event().id;
                calls.calls[id].fetch_add(1, Ordering::SeqCst);
                for n in 0..OUTPUTS_PER_INPUT {
                    m.send_output(
                        OutputRecord::new(&out)
                            .key(format!("k{id}"))
                            .value(format!("{id}-{n}")),
                    )?;
                }
                Ok::<(), HandlerError>(())
            }
        })
    };
    let (first_calls, second_calls) = (Calls::new(N), Calls::new(N));
    let build = |calls: &Arc<Calls>, id: &str| {
        consumer::builder(slow(calls), &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(4)
            .revoke_timeout(Duration::from_secs(5))
            .transactional(TransactionalOutput::new(support::unique_name(id)))
    };
    let first = Running::start(build(&first_calls, "txn-handover-a"));
    wait_for(
        "the first member's progress",
        Duration::from_secs(60),
        || first_calls.called().len() >= 300,
    )
    .await;
    let second = Running::start(build(&second_calls, "txn-handover-b"));
    wait_for(
        "the second member's progress",
        Duration::from_secs(60),
        || second_calls.called().len() >= 50,
    )
    .await;
    first.stop().await;
    wait_for("every input handled", Duration::from_secs(120), || {
        (0..N).all(|id| {
            first_calls.calls[id].load(Ordering::SeqCst)
                + second_calls.calls[id].load(Ordering::SeqCst)
                > 0
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.stop().await;
    let handled_twice = (0..N)
        .filter(|&id| {
            first_calls.calls[id].load(Ordering::SeqCst)
                + second_calls.calls[id].load(Ordering::SeqCst)
                > 1
        })
        .count();
    let seen = read(&out, true).await;
    let (duplicates, missing) = differences(&seen, N);
    eprintln!(
        "hand-over: {} inputs handled by the first member, {} by the second, {handled_twice} handled by both",
        first_calls.called().len(),
        second_calls.called().len()
    );
    assert_exactly_once(&duplicates, &missing);
}

// ---- Dead letters in the transaction (delivery rule 20) ----

/// The inputs failing permanently: every one whose id is a multiple of 4.
fn fails_permanently(id: usize) -> bool {
    id.is_multiple_of(4)
}

/// A permanent failure with transactional output and the Kafka dead-letter sink: its letter
/// (the source record's value, the sink's headers, the source partition) is seen once by a
/// `read_committed` reader of the dead-letter topic, and its offset is committed with the
/// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_once_in_the_transaction_and_its_offset_committed() {
    const N: usize = 40;
    let (topic, group, dlt) = setup("txn-dlt", 2).await;
    let out = support::new_topic("txn-dlt-out", 2).await;
    produce_inputs(&topic, N).await;
    let out_topic = out.clone();
    let handler = handler_fn(move |m: Message<Job>| {
        let out = out_topic.clone();
        async move {
            let id = m.event().id;
            for n in 0..OUTPUTS_PER_INPUT {
                m.send_output(OutputRecord::new(&out).value(format!("{id}-{n}")))?;
            }
            if fails_permanently(id) {
                // Staged, then dropped: the attempt failed.
                return Err(HandlerError::permanent("refused"));
            }
            Ok(())
        }
    });
    let c = Running::start(transactional(
        handler,
        &topic,
        &group,
        &support::unique_name("txn-dlt-id"),
    ));
    consumer::wait_until(
        "every offset committed",
        Duration::from_secs(60),
        || async { support::try_committed_sum(&group, &topic, 2).await == Ok(N as i64) },
    )
    .await;
    c.stop().await;
    let failed: Vec<usize> = (0..N).filter(|id| fails_permanently(*id)).collect();
    let letters = read(&dlt, true).await;
    let expected = once_each(failed.iter());
    assert_eq!(
        letters, expected,
        "each permanent failure's letter, once, under read_committed"
    );
    let outputs = read(&out, true).await;
    assert_eq!(
        outputs.values().sum::<usize>(),
        (N - failed.len()) * OUTPUTS_PER_INPUT,
        "the outputs of the records handled, not of those dead-lettered"
    );
    for letter in support::read_all(&dlt).await {
        assert_eq!(letter.header_str("kafka_dlt-original-topic"), topic);
        assert_eq!(
            letter.header_str("kafka_dlt-exception-fqcn"),
            "kourier.PermanentFailure"
        );
        let source_partition = source_partition_of(&letter);
        assert_eq!(
            source_partition,
            Some(letter.partition),
            "the letter goes to its source partition"
        );
    }
    assert_eq!(support::committed_sum(&group, &topic, 2).await, N as i64);
}

/// Each input id's value (`{"id":n}`) once: what a reader should see of `ids`' copies.
fn once_each<'a>(ids: impl Iterator<Item = &'a usize>) -> BTreeMap<String, usize> {
    ids.map(|id| (format!(r#"{{"id":{id}}}"#), 1)).collect()
}

/// The source partition a letter or forward names (its `kafka_dlt-original-partition`).
fn source_partition_of(r: &support::ReadRecord) -> Option<i32> {
    r.header("kafka_dlt-original-partition")
        .flatten()
        .map(|b| i32::from_be_bytes(b.try_into().expect("4 bytes")))
}

/// kill -9 once every record was dead-lettered (the outcome observer reported it) but
/// before the transaction committed (a 30 s commit interval): the letters were in that
/// transaction, which the restarted consumer (same transactional id) aborts; it dead-letters
/// the records again, and a `read_committed` reader of the dead-letter topic sees exactly
/// one letter per record. (Before dead letters joined the transaction, the sink's own
/// producer had written them already: two letters per record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_dead_lettering_before_the_commit_leaves_one_letter_per_record() {
    kill_9_before_the_commit_leaves_one_copy_per_record(KillAfter::DeadLetter, false).await;
}

/// The same with idempotency in Redis (the child and its restart share the store): the
/// letters were in the killed transaction, so the records' keys were not done, and the
/// restarted consumer dead-letters them again (one letter per record under
/// `read_committed`, each key done after the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_dead_lettering_before_the_commit_with_a_redis_store_leaves_one_letter_per_record()
 {
    kill_9_before_the_commit_leaves_one_copy_per_record(KillAfter::DeadLetter, true).await;
}

/// What `kill_9_before_the_commit_leaves_one_copy_per_record` waits for before its kill -9.
#[derive(Clone, Copy)]
enum KillAfter {
    /// Every record dead-lettered (the child fails each permanently).
    DeadLetter,
    /// Every record forwarded to tier 1 (the child fails each transiently).
    Forward,
    /// Every record handled: copies are the outputs.
    Handled,
}

/// Starts a transactional child whose outcome observer reports to a file, kill -9s it once
/// all N records reported `what` (before its first commit: a 30 s commit interval),
/// restarts it with the same transactional id until every offset is committed, and checks
/// that a `read_committed` reader of the dead-letter or tier topic sees one copy per record.
/// With `store`, the child and its restart share an idempotency store in Redis, and every
/// record's key is done in it after the run.
async fn kill_9_before_the_commit_leaves_one_copy_per_record(what: KillAfter, store: bool) {
    const N: usize = 12;
    let (name, env_name, outcome, noun) = match what {
        KillAfter::DeadLetter if store => (
            "txn-dlt-store-kill",
            "KOURIER_TXN_DLT_REPORT",
            "(permanent)",
            "dead-lettered",
        ),
        KillAfter::DeadLetter => (
            "txn-dlt-kill",
            "KOURIER_TXN_DLT_REPORT",
            "(permanent)",
            "dead-lettered",
        ),
        KillAfter::Forward => (
            "txn-tier-kill",
            "KOURIER_TXN_TIER_REPORT",
            "forwarded (tier 1)",
            "forwarded",
        ),
        KillAfter::Handled => (
            "txn-store-kill",
            "KOURIER_TXN_HANDLED_REPORT",
            "handled",
            "handled",
        ),
    };
    let (topic, group, dlt) = setup(name, 1).await;
    let out = support::new_topic(&format!("{name}-out"), 1).await;
    let copies = match what {
        KillAfter::DeadLetter => dlt,
        KillAfter::Forward => {
            let tier = format!("{topic}.retry.1");
            support::create_topic(&tier, 1).await;
            tier
        }
        KillAfter::Handled => out.clone(),
    };
    produce_inputs(&topic, N).await;
    let id = support::unique_name(&format!("{name}-id"));
    let report = std::env::temp_dir().join(support::unique_name(&format!("{name}-report")));
    let report_path = report.to_str().expect("utf-8 path").to_owned();
    let prefix = support::unique_name(&format!("{name}:"));
    let mut env = vec![(env_name, report_path.as_str())];
    if store {
        env.push(("KOURIER_TXN_REDIS_PREFIX", prefix.as_str()));
    }
    let child = Child::start_with(&topic, &group, &out, &id, &env);
    let reported = || {
        std::fs::read_to_string(&report)
            .map(|r| r.lines().filter(|l| l.ends_with(outcome)).count())
            .unwrap_or(0)
    };
    wait_for(
        &format!("every record {noun} (the observer's report)"),
        Duration::from_secs(60),
        || reported() == N,
    )
    .await;
    child.signal("-KILL");
    drop(child);
    assert_eq!(
        support::try_committed_sum(&group, &topic, 1)
            .await
            .unwrap_or(0),
        0,
        "killed before its first commit"
    );
    let _ = std::fs::remove_file(&report);
    let mut restart_env = env.clone();
    restart_env.push(("KOURIER_TXN_COMMIT_INTERVAL_MS", "500"));
    let mut restarted = Child::start_with(&topic, &group, &out, &id, &restart_env);
    consumer::wait_until(
        "every source offset committed by the restarted consumer",
        Duration::from_secs(90),
        || async { support::try_committed_sum(&group, &topic, 1).await == Ok(N as i64) },
    )
    .await;
    restarted.signal("-TERM");
    assert_eq!(
        restarted.exit_code(Duration::from_secs(30)).await,
        Some(0),
        "a clean stop"
    );
    let _ = std::fs::remove_file(&report);
    let seen = read(&copies, true).await;
    if store {
        assert_all_done(&*redis_store(&prefix).await, &group, N).await;
    }
    if let KillAfter::Handled = what {
        // Marked done before the commit, the keys would have made the restarted consumer
        // skip every record: its outputs (aborted with the killed transaction) never
        // committed.
        let (duplicates, missing) = differences(&seen, N);
        assert_exactly_once(&duplicates, &missing);
        return;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} of {N} records {noun} more than once under read_committed: {twice:?}",
        twice.len()
    );
    assert_eq!(seen.len(), N, "one copy per record in {copies}: {seen:?}");
}

/// A letter above the transactional producer's `message.max.bytes` is written in the
/// transaction without its value (the sink's metadata-only letter, with the dropped size),
/// instead of failing the transaction; the other letters are whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_letter_in_the_transaction_is_written_without_its_value() {
    const N: usize = 4;
    let (topic, group, dlt) = setup("txn-dlt-big", 1).await;
    let pad = "x".repeat(3_000);
    let big = format!(r#"{{"id":1,"pad":"{pad}"}}"#);
    let records = (0..N)
        .map(|id| {
            let value = if id == 1 {
                big.clone()
            } else {
                format!(r#"{{"id":{id}}}"#)
            };
            TestRecord::new().key(format!("k{id}")).value(value)
        })
        .collect();
    support::produce(&topic, records).await;
    let handler =
        handler_fn(|_m: Message<Job>| async { Err::<(), _>(HandlerError::permanent("refused")) });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .shutdown_timeout(Duration::from_secs(2))
            .transactional(
                TransactionalOutput::new(support::unique_name("txn-dlt-big-id"))
                    .with_transaction_timeout(Duration::from_secs(10))
                    .producer_config("message.max.bytes", "2000"),
            ),
    );
    consumer::wait_until(
        "every offset committed",
        Duration::from_secs(60),
        || async { support::try_committed_sum(&group, &topic, 1).await == Ok(N as i64) },
    )
    .await;
    c.stop().await;
    let letters = read(&dlt, true).await;
    let expected: BTreeMap<String, usize> = [
        (String::new(), 1),
        (r#"{"id":0}"#.to_owned(), 1),
        (r#"{"id":2}"#.to_owned(), 1),
        (r#"{"id":3}"#.to_owned(), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        letters, expected,
        "under read_committed: three whole letters, the oversized one without its value"
    );
    let all = support::read_all(&dlt).await;
    let dropped = support::record_at(&all, 0, 1);
    assert_eq!(dropped.value, None);
    assert_eq!(dropped.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(
        dropped.header_str("kourier-dlt-value-dropped-bytes"),
        big.len().to_string()
    );
}

/// A custom dead-letter sink (here a wrapper of the Kafka sink) cannot join the transaction:
/// with transactional output it still writes every letter itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_sink_writes_its_letters_itself_with_transactional_output() {
    const N: usize = 8;
    let (topic, group, dlt) = setup("txn-dlt-custom", 1).await;
    produce_inputs(&topic, N).await;
    let sink = support::sinks::CountingSink::new(
        kourier::KafkaDeadLetterSink::builder(support::bootstrap())
            .build()
            .expect("sink"),
    );
    let letters = Arc::clone(&sink.letters);
    let handler = handler_fn(|m: Message<Job>| async move {
        if fails_permanently(m.event().id) {
            return Err(HandlerError::permanent("refused"));
        }
        Ok(())
    });
    let c = Running::start(
        transactional(
            handler,
            &topic,
            &group,
            &support::unique_name("txn-dlt-custom-id"),
        )
        .dead_letter_sink(Arc::new(sink)),
    );
    consumer::wait_until(
        "every offset committed",
        Duration::from_secs(60),
        || async { support::try_committed_sum(&group, &topic, 1).await == Ok(N as i64) },
    )
    .await;
    c.stop().await;
    let failed = (0..N).filter(|id| fails_permanently(*id)).count();
    assert_eq!(
        letters.load(Ordering::SeqCst) as usize,
        failed,
        "every letter went through the custom sink"
    );
    assert_eq!(read(&dlt, true).await.values().sum::<usize>(), failed);
}

// ---- Retry-tier forwards in the transaction (delivery rule 20) ----

/// The inputs failing transiently on their first call only (handled in tier 1).
fn fails_once(id: usize) -> bool {
    id.is_multiple_of(3)
}

/// The inputs failing transiently on every call (through tier 1 to the dead-letter topic).
fn fails_always(id: usize) -> bool {
    id % 10 == 7
}

/// Retry tiers of 200 ms with transactional output: records failing transiently once are
/// forwarded to tier 1 and handled there, records failing every time are dead-lettered from
/// tier 1. Under `read_committed`: each handled input's outputs exactly once, one forward per
/// record given up to the tier (the tiers' headers, the source partition), one letter per
/// record failing every time (as its source record); the offsets of the source and of the
/// tier topic are committed past every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_goes_through_a_tier_in_the_transaction_and_is_handled_there() {
    const N: usize = 40;
    let (topic, group, dlt) = setup("txn-tiers", 2).await;
    let tier = format!("{topic}.retry.1");
    support::create_topic(&tier, 2).await;
    let out = support::new_topic("txn-tiers-out", 2).await;
    produce_inputs(&topic, N).await;
    let calls = Calls::new(N);
    let handled_in: Arc<std::sync::Mutex<BTreeMap<usize, Vec<String>>>> = Arc::default();
    let (c, h, out_topic) = (calls.clone(), handled_in.clone(), out.clone());
    let handler = handler_fn(move |m: Message<Job>| {
        let (calls, handled_in, out) = (c.clone(), h.clone(), out_topic.clone());
        async move {
            let id = m.event().id;
            let call = calls.calls[id].fetch_add(1, Ordering::SeqCst);
            for n in 0..OUTPUTS_PER_INPUT {
                m.send_output(OutputRecord::new(&out).value(format!("{id}-{n}")))?;
            }
            if fails_always(id) || (fails_once(id) && call == 0) {
                // Staged, then dropped: the attempt failed.
                return Err(HandlerError::transient("not yet"));
            }
            (handled_in.lock().unwrap().entry(id).or_default()).push(m.topic().to_owned());
            Ok(())
        }
    });
    let c = Running::start(
        transactional(
            handler,
            &topic,
            &group,
            &support::unique_name("txn-tiers-id"),
        )
        .retry_policy(kourier::RetryPolicy::no_retries())
        .retry_tiers(kourier::tiers::RetryTiers::new([Duration::from_millis(
            200,
        )])),
    );
    let forwarded: Vec<usize> = (0..N)
        .filter(|id| fails_once(*id) || fails_always(*id))
        .collect();
    let lettered: Vec<usize> = (0..N).filter(|id| fails_always(*id)).collect();
    consumer::wait_until(
        "every source offset committed and every record settled",
        Duration::from_secs(60),
        || async {
            let handled = handled_in.lock().unwrap().len();
            handled == N - lettered.len()
                && support::try_committed_sum(&group, &topic, 2).await == Ok(N as i64)
                && read(&dlt, true).await.len() == lettered.len()
        },
    )
    .await;
    // The tier records' offsets: committed past each partition's last record.
    let tier_records = support::read_all(&tier).await;
    consumer::wait_until(
        "the tier topic's offsets committed past its records",
        Duration::from_secs(30),
        || async {
            let Ok(committed) = support::try_committed_offsets(&group, &tier, 2).await else {
                return false;
            };
            tier_records.iter().all(|r| {
                committed
                    .get(&r.partition)
                    .copied()
                    .flatten()
                    .is_some_and(|o| o > r.offset)
            })
        },
    )
    .await;
    c.stop().await;
    let handled_in = std::mem::take(&mut *handled_in.lock().unwrap());
    for id in (0..N).filter(|id| fails_once(*id) && !fails_always(*id)) {
        assert_eq!(
            handled_in.get(&id),
            Some(&vec![tier.clone()]),
            "record {id} handled once, in tier 1"
        );
    }
    // Outputs: the handled records', each once.
    let outputs = read(&out, true).await;
    let expected: BTreeMap<String, usize> = (0..N)
        .filter(|id| !fails_always(*id))
        .flat_map(|id| (0..OUTPUTS_PER_INPUT).map(move |n| (format!("{id}-{n}"), 1)))
        .collect();
    assert_eq!(
        outputs, expected,
        "each handled input's outputs exactly once under read_committed"
    );
    // Forwards: one per record given up to the tier.
    let forwards = read(&tier, true).await;
    let expected = once_each(forwarded.iter());
    assert_eq!(
        forwards, expected,
        "one forward per record under read_committed"
    );
    assert_eq!(tier_records.len(), forwarded.len(), "no aborted forward");
    for r in &tier_records {
        assert_eq!(r.header_str("kafka_dlt-original-topic"), topic);
        assert_eq!(r.header_str("kourier-retry-tier"), "1");
        let source_partition = source_partition_of(r);
        assert_eq!(
            source_partition,
            Some(r.partition),
            "the forward goes to its source partition"
        );
    }
    // Letters: one per record failing every time, as its source record.
    let letters = read(&dlt, true).await;
    let expected = once_each(lettered.iter());
    assert_eq!(
        letters, expected,
        "one letter per record failing every time"
    );
    for letter in support::read_all(&dlt).await {
        assert_eq!(letter.header_str("kafka_dlt-original-topic"), topic);
    }
    assert_eq!(support::committed_sum(&group, &topic, 2).await, N as i64);
}

/// kill -9 once every record was forwarded to tier 1 (the outcome observer reported it) but
/// before the transaction committed (a 30 s commit interval): the forwards were in that
/// transaction, which the restarted consumer (same transactional id) aborts; it forwards the
/// records again, and a `read_committed` reader of the tier topic sees exactly one forward
/// per record. (With the forward written by the tiers' own producer, outside the
/// transaction: two per record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_forwarding_before_the_commit_leaves_one_forward_per_record() {
    kill_9_before_the_commit_leaves_one_copy_per_record(KillAfter::Forward, false).await;
}
