//! Crafted headers in retry-tier topics, against the real broker (delivery rule 17: headers
//! kourier reads back are untrusted). Any producer with write access to a tier topic can
//! write a tier record; none of these may pin a partition, loop a record, wrap a count or
//! move other records off their partition:
//!
//! - a far-future due time (with an honest or a future timestamp) waits at most the tier's
//!   delay plus the skew allowance, and the tier partition's commit point moves on;
//! - an original-topic header naming a topic that does not exist makes the record a `decode`
//!   dead letter (once, with the header named), never a forward;
//! - an original partition of 99999 sends that one record by key, later forwards keep their
//!   source partition;
//! - attempts `4294967295` and huge failed-stages values saturate and clamp: one dead letter,
//!   no further tier.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::dead_letter::{Provenance, headers as dlt};
use kourier::tiers::{RetryTiers, headers as tier};
use kourier::{DeadLetterReason, HandlerError, Message, RetryPolicy, handler_fn};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{Running, setup, wait_for, wait_until};

#[derive(Debug, Deserialize)]
struct Ev {
    id: u64,
}

/// A tier record as a producer could write it: value `{"id":<id>}`, key `k-<id>`, an
/// `event-id`, and the given headers.
fn tier_record(id: u64, headers: &[(&str, Vec<u8>)]) -> TestRecord {
    let mut r = TestRecord::new()
        .key(format!("k-{id}"))
        .value(format!(r#"{{"id":{id}}}"#))
        .header("event-id", Some(format!("e-{id}").into_bytes()));
    for (name, value) in headers {
        r = r.header(*name, Some(value.clone()));
    }
    r
}

/// Handler runs: (id, topic), in order.
type Runs = Arc<Mutex<Vec<(u64, String)>>>;

fn runs_of(runs: &Runs, id: u64) -> usize {
    runs.lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .count()
}

/// A handler that records every run and fails (transiently) where `fails(id, topic)`.
fn recording(runs: Runs, fails: fn(u64, &str) -> bool) -> impl kourier::Handler<Event = Ev> {
    handler_fn(move |m: Message<Ev>| {
        let runs = runs.clone();
        async move {
            let id = m.event().id;
            runs.lock().unwrap().push((id, m.topic().to_owned()));
            if fails(id, m.topic()) {
                return Err(HandlerError::transient(format!(
                    "{id} fails in {}",
                    m.topic()
                )));
            }
            Ok(())
        }
    })
}

/// Produces to partition 0 of `topic` with an explicit CreateTime `timestamp_ms`.
async fn produce_with_timestamp(topic: &str, record: &TestRecord, timestamp_ms: i64) {
    let producer: FutureProducer = support::client_config()
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    let mut headers = OwnedHeaders::new();
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: value.as_deref(),
        });
    }
    let mut out = FutureRecord::<[u8], [u8]>::to(topic)
        .partition(0)
        .timestamp(timestamp_ms)
        .headers(headers);
    if let Some(key) = &record.key {
        out = out.key(key);
    }
    if let Some(value) = &record.value {
        out = out.payload(value);
    }
    producer
        .send(out, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

/// Two records with a due time in year 5138 — one with an honest timestamp, one whose
/// CreateTime is 30 minutes ahead — do not pin their tier partition: each runs within the
/// tier's delay plus the skew allowance (for a 2 s tier, 2 s: 4 s in all) of its timestamp
/// or of when it came up, the legitimate records behind them run, and the partition's commit
/// point reaches its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_due_time_does_not_pin_its_tier_partition() {
    let (topic, group, _dlt) = setup("hostile-due", 1).await;
    let tier1 = format!("{topic}.retry.1");
    support::create_topic(&tier1, 1).await;
    let year_5138 = b"99999999999999".to_vec();
    let started = Instant::now();
    support::produce(
        &tier1,
        vec![tier_record(
            1,
            &[
                (dlt::ORIGINAL_TOPIC, topic.clone().into_bytes()),
                (tier::DUE_MS, year_5138.clone()),
            ],
        )],
    )
    .await;
    produce_with_timestamp(
        &tier1,
        &tier_record(
            2,
            &[
                (dlt::ORIGINAL_TOPIC, topic.clone().into_bytes()),
                (tier::DUE_MS, year_5138),
            ],
        ),
        support::now_ms() + 30 * 60 * 1000,
    )
    .await;
    let due_now = support::now_ms().to_string().into_bytes();
    support::produce(
        &tier1,
        (3..8)
            .map(|id| tier_record(id, &[(tier::DUE_MS, due_now.clone())]))
            .collect(),
    )
    .await;

    let runs: Runs = Arc::default();
    let running = Running::start(
        support::consumer::builder(recording(runs.clone(), |_, _| false), &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([Duration::from_secs(2)])),
    );
    // At most 4 s each in partition order (the second is bounded from when it came up), plus
    // start-up and commits: well under 40 s. Before the rule they waited until year 5138.
    wait_until(
        "the tier partition's commit point at its end",
        Duration::from_secs(40),
        || async { support::committed_sum(&group, &tier1, 1).await == 7 },
    )
    .await;
    let took = started.elapsed();
    running.stop().await;
    let runs = runs.lock().unwrap().clone();
    println!("far-future due: all 7 tier records settled after {took:?}; runs {runs:?}");
    let ids: Vec<u64> = runs.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..8).collect::<Vec<_>>(), "each ran once, in order");
}

/// A tier record whose original-topic header names a topic that does not exist is a
/// `decode` dead letter in its tier's source's dead-letter topic — once, with a reason that
/// names the header and its value — never forwarded, never handled; the record behind it runs
/// and the tier partition's commit point moves past both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_record_naming_a_missing_topic_is_dead_lettered_once() {
    let (topic, group, dlt_topic) = setup("hostile-topic", 1).await;
    let tier1 = format!("{topic}.retry.1");
    support::create_topic(&tier1, 1).await;
    let missing = support::unique_name("hostile-no-such-topic");
    let due_now = support::now_ms().to_string().into_bytes();
    let produced = support::produce(
        &tier1,
        vec![
            tier_record(
                1,
                &[
                    (dlt::ORIGINAL_TOPIC, missing.clone().into_bytes()),
                    (dlt::ATTEMPTS, b"1".to_vec()),
                    (tier::DUE_MS, due_now.clone()),
                ],
            ),
            tier_record(2, &[(tier::DUE_MS, due_now)]),
        ],
    )
    .await;

    let runs: Runs = Arc::default();
    let running = Running::start(
        support::consumer::builder(recording(runs.clone(), |id, _| id == 1), &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([Duration::from_secs(1)])),
    );
    let letters = support::read_at_least(&dlt_topic, 1, Duration::from_secs(30)).await;
    wait_until(
        "the tier partition's commit point past both records",
        Duration::from_secs(30),
        || async { support::committed_sum(&group, &tier1, 1).await == 2 },
    )
    .await;
    // Nothing more comes of it: no second letter, no forward.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let forwarded = running.monitor.snapshot().forwarded;
    running.stop().await;
    assert!(
        forwarded.iter().all(|&n| n == 0),
        "nothing forwarded: {forwarded:?}"
    );
    let letters_after = support::read_all(&dlt_topic).await;
    assert_eq!(letters_after.len(), 1, "dead-lettered once");
    let letter = &letters[0];
    let p = Provenance::from_headers(&letter.raw_headers);
    println!(
        "missing topic: letter {:?}, error {:?}",
        p.original_coordinates(),
        p.error
    );
    assert_eq!(p.failure_kind, Some(DeadLetterReason::Decode));
    let error = p.error.clone().unwrap_or_default();
    assert!(
        error.contains(dlt::ORIGINAL_TOPIC) && error.contains(&missing),
        "the reason names the header and its value: {error}"
    );
    assert_eq!(p.original_topic.as_deref(), Some(topic.as_str()));
    assert_eq!(
        (p.original_partition, p.original_offset),
        (Some(produced[0].0), Some(produced[0].1)),
        "dead-lettered as it is"
    );
    assert_eq!(letter.value.as_deref(), Some(&br#"{"id":1}"#[..]));
    assert_eq!(letter.raw_headers.get_str("event-id"), Some("e-1"));
    assert_eq!(runs_of(&runs, 1), 0, "never handled");
    assert_eq!(runs_of(&runs, 2), 1);
    let in_tier = support::read_all(&tier1).await.len();
    assert_eq!(in_tier, 2, "nothing forwarded back into the tier");
}

/// A tier record whose original-partition header says 99999 (a valid int32 no topic here
/// has) is forwarded by key — that record alone: the source records forwarded after it keep
/// their source partition in the next tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_original_partition_does_not_switch_later_forwards_to_by_key() {
    const N: u64 = 30;
    let (topic, group, _dlt) = setup("hostile-partition", 3).await;
    let (tier1, tier2) = (format!("{topic}.retry.1"), format!("{topic}.retry.2"));
    support::create_topic(&tier1, 3).await;
    support::create_topic(&tier2, 3).await;
    let runs: Runs = Arc::default();
    // Fails at the source and in tier 1, succeeds in tier 2.
    let fails = |_: u64, topic: &str| !topic.ends_with(".retry.2");
    let running = Running::start(
        support::consumer::builder(recording(runs.clone(), fails), &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([
                Duration::from_millis(500),
                Duration::from_millis(500),
            ])),
    );
    let crafted = tier_record(
        1_000,
        &[
            (dlt::ORIGINAL_TOPIC, topic.clone().into_bytes()),
            (dlt::ORIGINAL_PARTITION, 99_999i32.to_be_bytes().to_vec()),
            (dlt::ORIGINAL_OFFSET, 0i64.to_be_bytes().to_vec()),
            (dlt::ATTEMPTS, b"1".to_vec()),
            (tier::DUE_MS, support::now_ms().to_string().into_bytes()),
        ],
    )
    .partition(0);
    support::produce(&tier1, vec![crafted]).await;
    support::read_at_least(&tier2, 1, Duration::from_secs(40)).await;
    // Now the source records: each forwarded to tier 1, then to tier 2.
    support::produce(
        &topic,
        (0..N)
            .map(|id| {
                TestRecord::new()
                    .key(format!("k-{id}"))
                    .value(format!(r#"{{"id":{id}}}"#))
                    .partition(i32::try_from(id % 3).unwrap())
            })
            .collect(),
    )
    .await;
    let in_tier2 = support::read_at_least(&tier2, 1 + N as usize, Duration::from_secs(60)).await;
    wait_for(
        "every record handled in tier 2",
        Duration::from_secs(30),
        || {
            runs.lock()
                .unwrap()
                .iter()
                .filter(|(_, t)| t == &tier2)
                .count() as u64
                > N
        },
    )
    .await;
    running.stop().await;
    let mut moved = BTreeMap::new();
    for r in &in_tier2 {
        let p = Provenance::from_headers(&r.raw_headers);
        let source_partition = p.original_partition.expect("original partition");
        if source_partition == 99_999 {
            continue;
        }
        if r.partition != source_partition {
            moved.insert(r.offset, (source_partition, r.partition));
        }
    }
    println!(
        "crafted partition: {} tier-2 records, moved off their source partition: {moved:?}",
        in_tier2.len()
    );
    assert!(
        moved.is_empty(),
        "forwards after the crafted record left their source partition: {moved:?}"
    );
    let crafted_forwards = in_tier2
        .iter()
        .filter(|r| r.raw_headers.get_str("event-id") == Some("e-1000"))
        .count();
    assert_eq!(crafted_forwards, 1, "the crafted record itself went by key");
}

/// Attempts `4294967295` and failed stages of `4294967295` or `99999999999` neither wrap
/// nor loop: the record fails once in tier 1 and is dead-lettered (its stages are clamped to
/// the number of tiers), with the attempts saturated at `u32::MAX`; nothing reaches tier 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_attempts_and_stages_do_not_wrap() {
    let (topic, group, dlt_topic) = setup("hostile-counts", 1).await;
    let (tier1, tier2) = (format!("{topic}.retry.1"), format!("{topic}.retry.2"));
    support::create_topic(&tier1, 1).await;
    support::create_topic(&tier2, 1).await;
    let due_now = support::now_ms().to_string().into_bytes();
    let crafted = |id: u64, value: &[u8]| {
        tier_record(
            id,
            &[
                (dlt::ORIGINAL_TOPIC, topic.clone().into_bytes()),
                (dlt::ATTEMPTS, value.to_vec()),
                (tier::FAILED_STAGES, value.to_vec()),
                (tier::DUE_MS, due_now.clone()),
            ],
        )
    };
    support::produce(
        &tier1,
        vec![crafted(1, b"4294967295"), crafted(2, b"99999999999")],
    )
    .await;
    let runs: Runs = Arc::default();
    let running = Running::start(
        support::consumer::builder(recording(runs.clone(), |_, _| true), &topic, &group)
            .retry_policy(RetryPolicy::no_retries())
            .retry_tiers(RetryTiers::new([
                Duration::from_millis(500),
                Duration::from_millis(500),
            ])),
    );
    let letters = support::read_at_least(&dlt_topic, 2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await;
    let letters_after = support::read_all(&dlt_topic).await;
    for letter in &letters {
        let p = Provenance::from_headers(&letter.raw_headers);
        println!(
            "crafted counts: letter {} attempts {:?} kind {:?}",
            p.original_coordinates(),
            p.attempts,
            p.failure_kind
        );
        assert_eq!(p.attempts, Some(u32::MAX), "saturated, not wrapped");
        assert_eq!(p.failure_kind, Some(DeadLetterReason::RetriesExhausted));
    }
    assert_eq!(letters_after.len(), 2, "one dead letter each");
    assert!(
        support::read_all(&tier2).await.is_empty(),
        "nothing looped on"
    );
    assert_eq!((runs_of(&runs, 1), runs_of(&runs, 2)), (1, 1));
}
