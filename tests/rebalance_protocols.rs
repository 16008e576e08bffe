//! kourier under the modern rebalance protocols, on the real broker (Kafka 4.x, KRaft):
//! `partition.assignment.strategy=cooperative-sticky` (incremental rebalances of the classic
//! protocol), Kafka 4's consumer group protocol (`group.protocol=consumer`, KIP-848, where the
//! broker computes assignments and hands them out incrementally), and static membership
//! (`group.instance.id`) across a restart.
//!
//! The hand-over scenario (one per protocol): 6 partitions, 3,000 keyed records, Key ordering;
//! consumer A starts, B joins when a third is handled, A stops cleanly when two thirds are
//! handled, B finishes. Clean rebalances and a clean shutdown (delivery rules 8 and 9 in the crate docs) promise:
//! nothing lost, nothing handled twice, the group committed at the log end, and per-key order.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kourier::{ProcessingOrder, RetryPolicy, RetryingConsumer, RetryingConsumerBuilder};
use support::consumer::{self, Running, setup, wait_for};
use support::recorder::{Call, Ev, Log, Recorder};
use support::{TestRecord, committed_offsets, unique_name};

const PARTITIONS: i32 = 6;
const RECORDS: u64 = 3_000;
const KEYS: u64 = 60;
/// Each record takes this long to handle, so the hand-over happens while records flow.
const SLEEP_MS: u64 = 10;
const MAX_IN_FLIGHT: usize = 8;

/// Where a record was handled: (consumer, partition, offset) for each successful call.
type Handled = Vec<(char, i32, i64)>;

/// Which rebalance protocol a consumer of the hand-over scenario uses.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// Classic protocol, `partition.assignment.strategy=cooperative-sticky`.
    CooperativeSticky,
    /// Kafka 4's consumer group protocol (KIP-848).
    Kip848,
}

fn retries() -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_millis(50), 3)
}

fn builder(
    protocol: Protocol,
    log: &Arc<Log>,
    topic: &str,
    group: &str,
) -> RetryingConsumerBuilder<Recorder> {
    let b = match protocol {
        Protocol::CooperativeSticky => consumer::builder(Recorder(log.clone()), topic, group)
            .kafka_config("partition.assignment.strategy", "cooperative-sticky"),
        // The support builder sets session.timeout.ms and heartbeat.interval.ms, which
        // librdkafka rejects with group.protocol=consumer (the broker owns them): our own.
        Protocol::Kip848 => RetryingConsumer::builder(Recorder(log.clone()))
            .bootstrap_servers(support::bootstrap())
            .group_id(group)
            .topic(topic)
            .commit_interval(Duration::from_millis(200))
            .kafka_config("group.protocol", "consumer"),
    };
    b.retry_policy(retries())
        .ordering(ProcessingOrder::Key)
        .max_in_flight(MAX_IN_FLIGHT)
}

/// Distinct ids among the successful calls of `logs`.
fn unique_handled(logs: &[&Arc<Log>]) -> usize {
    logs.iter()
        .flat_map(|l| l.succeeded_ids())
        .collect::<HashSet<_>>()
        .len()
}

/// The log end offset of each partition, from where `produce` put the records.
fn log_ends(coordinates: &[(i32, i64)]) -> BTreeMap<i32, Option<i64>> {
    let mut ends: BTreeMap<i32, Option<i64>> = (0..PARTITIONS).map(|p| (p, None)).collect();
    for &(p, o) in coordinates {
        let end = ends.entry(p).or_default();
        *end = Some(end.map_or(o + 1, |e: i64| e.max(o + 1)));
    }
    ends
}

/// Fails unless, for every key, the records were first handled in the order they were
/// produced (ids grow with production order; one key lives in one partition).
fn assert_per_key_first_order(calls: &[Call]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    // `calls` are in the order their handling ended; a key has one record in flight at a
    // time, so that is also the order they started.
    for call in calls.iter().filter(|c| c.ok) {
        if !seen.insert(call.id) {
            continue;
        }
        if let Some(&prev) = last.get(call.key.as_str()) {
            assert!(
                prev < call.id,
                "key {}: record {} first handled after record {}",
                call.key,
                prev,
                call.id
            );
        }
        last.insert(&call.key, call.id);
    }
}

async fn hand_over(name: &str, protocol: Protocol, sleep_ms: u64) {
    let (topic, group, _) = setup(name, PARTITIONS).await;
    let records: Vec<TestRecord> = (0..RECORDS)
        .map(|i| {
            Ev::new(i, &format!("k{}", i % KEYS))
                .sleep_ms(sleep_ms)
                .record()
        })
        .collect();
    let coordinates = support::produce(&topic, records).await;
    let ends = log_ends(&coordinates);
    let (log_a, log_b) = (Log::new(), Log::new());
    let started = Instant::now();

    let a = Running::start(builder(protocol, &log_a, &topic, &group));
    wait_for("A handles a third", Duration::from_secs(60), || {
        unique_handled(&[&log_a]) as u64 >= RECORDS / 3
    })
    .await;
    let joined_at = unique_handled(&[&log_a, &log_b]);
    let b = Running::start(builder(protocol, &log_b, &topic, &group));
    wait_for("B takes partitions", Duration::from_secs(60), || {
        !b.monitor.snapshot().assigned.is_empty()
    })
    .await;
    let b_assigned_after = started.elapsed();
    let shared = (
        a.monitor.snapshot().assigned.len(),
        b.monitor.snapshot().assigned.len(),
    );
    wait_for("two thirds handled", Duration::from_secs(60), || {
        unique_handled(&[&log_a, &log_b]) as u64 >= 2 * RECORDS / 3
    })
    .await;
    let stopped_at = unique_handled(&[&log_a, &log_b]);
    a.stop().await;
    wait_for("B finishes", Duration::from_secs(60), || {
        unique_handled(&[&log_a, &log_b]) as u64 >= RECORDS
    })
    .await;
    let finished = started.elapsed();
    // A little time for a stray duplicate to show up before the final shutdown.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.stop().await;

    let a_ids = log_a.succeeded_ids();
    let b_ids = log_b.succeeded_ids();
    assert!(
        !b_ids.is_empty(),
        "{protocol:?}: B handled nothing: the hand-over was not exercised"
    );
    let all: Vec<u64> = a_ids.iter().chain(&b_ids).copied().collect();
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    let lost = RECORDS as usize - unique.len();
    let duplicates = all.len() - unique.len();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for id in &all {
        *counts.entry(*id).or_default() += 1;
    }
    let mut twice: Vec<u64> = counts
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(&id, _)| id)
        .collect();
    twice.sort_unstable();
    let committed = committed_offsets(&group, &topic, PARTITIONS).await;
    eprintln!(
        "{protocol:?}: records {RECORDS}, handled {} (A {}, B {}), unique {}, lost {lost}, \
         duplicates {duplicates}; B joined at {joined_at} handled and had partitions after \
         {b_assigned_after:?} (A {} / B {} partitions), A stopped at {stopped_at} handled; \
         finished in {finished:?}; committed {committed:?}, log end {ends:?}",
        all.len(),
        a_ids.len(),
        b_ids.len(),
        unique.len(),
        shared.0,
        shared.1,
    );
    if !twice.is_empty() {
        let where_: Vec<(u64, Handled)> = twice
            .iter()
            .take(20)
            .map(|&id| {
                let mut at = Vec::new();
                for (who, log) in [('A', &log_a), ('B', &log_b)] {
                    for c in log.successes().iter().filter(|c| c.id == id) {
                        at.push((who, c.partition, c.offset));
                    }
                }
                (id, at)
            })
            .collect();
        eprintln!("{protocol:?}: handled twice (first 20): {where_:?}");
    }

    assert_eq!(lost, 0, "every record handled");
    assert_eq!(
        duplicates, 0,
        "no record handled twice after clean rebalances: {twice:?}"
    );
    assert_eq!(committed, ends, "the group committed at the log end");
    let mut calls = log_a.calls();
    calls.extend(log_b.calls());
    // A's and B's calls for one key never interleave in time when nothing is handled twice
    // (B takes a partition only after A committed it), so A's then B's is the key's order
    // as long as the partition moved from A to B; check each consumer's own order, then the
    // hand-over order per key.
    assert_per_key_first_order(&log_a.calls());
    assert_per_key_first_order(&log_b.calls());
    let mut first_end: HashMap<u64, Instant> = HashMap::new();
    for c in calls.iter().filter(|c| c.ok) {
        let e = first_end.entry(c.id).or_insert(c.ended);
        *e = (*e).min(c.ended);
    }
    let mut by_key: BTreeMap<String, Vec<(u64, Instant)>> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.ok) {
        if first_end[&c.id] == c.ended {
            by_key
                .entry(c.key.clone())
                .or_default()
                .push((c.id, c.ended));
        }
    }
    for (key, mut firsts) in by_key {
        firsts.sort_by_key(|&(_, ended)| ended);
        for w in firsts.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "key {key}: record {} first handled after record {}",
                w[0].0,
                w[1].0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_sticky_hand_over_handles_each_record_once() {
    hand_over("coop", Protocol::CooperativeSticky, SLEEP_MS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_consumer_protocol_hand_over_handles_each_record_once() {
    // The consumer protocol's assignment took ~7 s here: slower records keep the topic busy
    // until B has its partitions, so the hand-over happens while records flow.
    hand_over("kip848", Protocol::Kip848, 4 * SLEEP_MS).await;
}

/// Two static members X and Y (`group.instance.id`, 10 s session). X stops cleanly (a static
/// member does not leave the group), more records are produced, X restarts with the same
/// instance id within the session timeout: it gets the same partitions back, Y's assignment
/// never moved, and X handles only the new records of its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_restart_gets_its_partitions_back_and_handles_only_new_records() {
    let (topic, group, _) = setup("static", PARTITIONS).await;
    let (x_id, y_id) = (unique_name("static-x"), unique_name("static-y"));
    let member = |log: &Arc<Log>, id: &str| {
        consumer::builder(Recorder(log.clone()), &topic, &group)
            .retry_policy(retries())
            .ordering(ProcessingOrder::Key)
            .kafka_config("session.timeout.ms", "10000")
            .kafka_config("group.instance.id", id)
    };
    let first: Vec<TestRecord> = (0..300)
        .map(|i| Ev::new(i, &format!("k{}", i % 30)).record())
        .collect();
    support::produce(&topic, first).await;

    let (log_x1, log_y, log_x2) = (Log::new(), Log::new(), Log::new());
    let x = Running::start(member(&log_x1, &x_id));
    let y = Running::start(member(&log_y, &y_id));
    wait_for(
        "X and Y share the partitions",
        Duration::from_secs(60),
        || {
            let (xs, ys) = (x.monitor.snapshot(), y.monitor.snapshot());
            !xs.assigned.is_empty()
                && !ys.assigned.is_empty()
                && xs.assigned.len() + ys.assigned.len() == PARTITIONS as usize
        },
    )
    .await;
    wait_for("the first 300 handled", Duration::from_secs(60), || {
        unique_handled(&[&log_x1, &log_y]) >= 300
    })
    .await;
    // Let the assignment settle (a late joiner can trigger one more rebalance).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let x_before: BTreeSet<(String, i32)> = x.monitor.snapshot().assigned.into_iter().collect();
    let y_before: BTreeSet<(String, i32)> = y.monitor.snapshot().assigned.into_iter().collect();
    assert_eq!(x_before.len() + y_before.len(), PARTITIONS as usize);

    let down = Instant::now();
    x.stop().await;
    let second: Vec<TestRecord> = (300..600)
        .map(|i| Ev::new(i, &format!("k{}", i % 30)).record())
        .collect();
    let coordinates = support::produce(&topic, second).await;
    let x2 = Running::start(member(&log_x2, &x_id));
    wait_for("X back", Duration::from_secs(30), || {
        !x2.monitor.snapshot().assigned.is_empty()
    })
    .await;
    let back_after = down.elapsed();
    wait_for("the second 300 handled", Duration::from_secs(60), || {
        unique_handled(&[&log_x1, &log_y, &log_x2]) >= 600
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let x_after: BTreeSet<(String, i32)> = x2.monitor.snapshot().assigned.into_iter().collect();
    let y_after: BTreeSet<(String, i32)> = y.monitor.snapshot().assigned.into_iter().collect();
    x2.stop().await;
    y.stop().await;

    let x_parts: BTreeSet<i32> = x_before.iter().map(|(_, p)| *p).collect();
    let new_on_x = coordinates
        .iter()
        .filter(|(p, _)| x_parts.contains(p))
        .count();
    let x2_ids = log_x2.succeeded_ids();
    let all: Vec<u64> = log_x1
        .succeeded_ids()
        .into_iter()
        .chain(log_y.succeeded_ids())
        .chain(x2_ids.iter().copied())
        .collect();
    let unique: HashSet<u64> = all.iter().copied().collect();
    let duplicates = all.len() - unique.len();
    eprintln!(
        "static: X {x_before:?} -> {x_after:?}, Y {y_before:?} -> {y_after:?}; X back with \
         partitions {back_after:?} after stopping; X handled {} then {} ({new_on_x} new on \
         its partitions), Y {}; unique {}, duplicates {duplicates}",
        log_x1.succeeded_ids().len(),
        x2_ids.len(),
        log_y.succeeded_ids().len(),
        unique.len(),
    );
    assert_eq!(unique.len(), 600, "every record handled");
    assert_eq!(duplicates, 0, "no record handled twice");
    assert_eq!(x_after, x_before, "X got the same partitions back");
    assert_eq!(y_after, y_before, "Y's partitions did not move");
    assert!(
        x2_ids.iter().all(|&id| id >= 300),
        "the restarted X handled only new records"
    );
    assert_eq!(
        x2_ids.len(),
        new_on_x,
        "X handled the new records of its partitions"
    );
    let committed = committed_offsets(&group, &topic, PARTITIONS).await;
    let total: i64 = committed.values().map(|o| o.unwrap_or(0)).sum();
    assert_eq!(total, 600, "committed at the log end: {committed:?}");
}
