//! RetryingConsumer against the real broker: retries, dead letters, commits, restarts,
//! shutdown, rebalances, ordering, backpressure and bad input.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kourier::dead_letter::headers as dlt;
use kourier::{
    DedupKey, Idempotency, InMemoryIdempotencyStore, ProcessingOrder, RetryPolicy,
    RetryingConsumer, RetryingConsumerBuilder,
};
use support::consumer::{self, Running, setup, wait_for, wait_until};
use support::recorder::{Call, Ev, Log, Recorder};
use support::{TestRecord, committed_sum};

/// A Kafka sink that does not declare its topics, so the consumer cannot check them at start.
#[derive(Debug)]
struct UndeclaredTopics(kourier::KafkaDeadLetterSink);

#[kourier::async_trait]
impl kourier::DeadLetterSink for UndeclaredTopics {
    async fn send(
        &self,
        letter: &kourier::DeadLetter,
    ) -> Result<kourier::DeadLetterReceipt, kourier::DeadLetterError> {
        self.0.send(letter).await
    }
    async fn enqueue<'a>(&'a self, letter: &'a kourier::DeadLetter) -> kourier::PendingLetter<'a> {
        self.0.enqueue(letter).await
    }
    fn topics_for(&self, _source_topic: &str) -> Vec<String> {
        Vec::new() // on purpose: nothing checked at start
    }
}

/// Waits (at most 30 s) until `c` has caught up: nothing in flight or buffered, every
/// partition read and committed to its end.
async fn caught_up(c: &Running) {
    tokio::time::timeout(Duration::from_secs(30), c.monitor.caught_up())
        .await
        .expect("caught up within 30 s");
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_millis(50), 3)
}

/// Events `0..n` keyed `k0` .. `k{keys - 1}` in turn, each taking `sleep_ms` to handle.
fn slow_events(n: u64, keys: u64, sleep_ms: u64) -> Vec<TestRecord> {
    (0..n)
        .map(|i| {
            Ev::new(i, &format!("k{}", i % keys))
                .sleep_ms(sleep_ms)
                .record()
        })
        .collect()
}

fn builder(log: &Arc<Log>, topic: &str, group: &str) -> RetryingConsumerBuilder<Recorder> {
    consumer::builder(Recorder(log.clone()), topic, group).retry_policy(fast_retries())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_handles_everything_and_commits_the_end() {
    let (topic, group, dlt_topic) = setup("ok", 3).await;
    let records: Vec<_> = (0..60)
        .map(|i| Ev::new(i, &format!("u{}", i % 7)).record())
        .collect();
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    log.wait_succeeded(60, Duration::from_secs(60)).await;
    wait_until("commits", Duration::from_secs(30), || async {
        committed_sum(&group, &topic, 3).await == 60
    })
    .await;
    c.stop().await;
    let mut ids = log.succeeded_ids();
    ids.sort();
    assert_eq!(
        ids,
        (0..60).collect::<Vec<_>>(),
        "each record handled exactly once"
    );
    assert!(log.calls().iter().all(|c| c.attempt == 1));
    assert!(
        support::read_all(&dlt_topic).await.is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_then_success_counts_attempts() {
    let (topic, group, dlt_topic) = setup("transient", 1).await;
    let flaky = Ev::new(1, "a").fail_transient(2);
    support::produce(&topic, vec![flaky.record(), Ev::new(2, "a").record()]).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    log.wait_succeeded(2, Duration::from_secs(60)).await;
    c.stop().await;
    assert_eq!(
        log.attempts_of(1),
        vec![1, 2, 3],
        "2 failures then success on attempt 3"
    );
    assert_eq!(log.attempts_of(2), vec![1]);
    let calls = log.calls();
    let last_of_1 = calls
        .iter()
        .filter(|c| c.id == 1)
        .map(|c| c.ended)
        .max()
        .unwrap();
    let first_of_2 = calls.iter().find(|c| c.id == 2).unwrap().started;
    assert!(
        first_of_2 >= last_of_1,
        "partition order holds through retries"
    );
    assert!(support::read_all(&dlt_topic).await.is_empty());
    assert_eq!(committed_sum(&group, &topic, 1).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_waiting_out_a_back_off_frees_its_slot_and_keeps_its_key_order() {
    let (topic, group, dlt_topic) = setup("parked", 1).await;
    let mut records = vec![Ev::new(0, "slow").fail_transient(1).record()];
    records.extend((1..=20).map(|i| Ev::new(i, &format!("k{i}")).record()));
    records.push(Ev::new(21, "slow").record());
    support::produce(&topic, records).await;
    let log = Log::new();
    // One slot: if the waiting record held it, nothing else could run during its back-off.
    let c = Running::start(
        builder(&log, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(1)
            .retry_policy(RetryPolicy::fixed(Duration::from_secs(2), 3)),
    );
    log.wait_succeeded(22, Duration::from_secs(60)).await;
    c.stop().await;
    let calls = log.calls();
    let retry_of_0 = calls
        .iter()
        .find(|c| c.id == 0 && c.attempt == 2)
        .expect("record 0 was retried");
    for id in 1..=20 {
        let call = calls.iter().find(|c| c.id == id).unwrap();
        assert!(
            call.ended <= retry_of_0.started,
            "record {id} of another key ran in the slot record 0 gave up during its back-off"
        );
    }
    let first_of_21 = calls.iter().find(|c| c.id == 21).unwrap();
    assert!(
        first_of_21.started >= retry_of_0.ended,
        "record 21 of the same key waited for record 0's retry"
    );
    assert_eq!(log.attempts_of(0), vec![1, 2]);
    assert!(support::read_all(&dlt_topic).await.is_empty());
    assert_eq!(committed_sum(&group, &topic, 1).await, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_with_full_provenance() {
    let (topic, group, dlt_topic) = setup("exhausted", 2).await;
    let bad = Ev::new(7, "user-7").fail_transient(100);
    let value = serde_json::to_vec(&bad).unwrap();
    let rec = TestRecord::new()
        .key(b"user-7")
        .value(value.clone())
        .header("trace", Some(b"abc".to_vec()))
        .header("nothing", None)
        .partition(1);
    support::produce(&topic, vec![rec]).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    wait_until("dead letter", Duration::from_secs(60), || async {
        !support::read_all(&dlt_topic).await.is_empty()
    })
    .await;
    wait_until("commit", Duration::from_secs(30), || async {
        committed_sum(&group, &topic, 2).await == 1
    })
    .await;
    c.stop().await;
    assert_eq!(
        log.attempts_of(7),
        vec![1, 2, 3, 4],
        "fixed(50ms, 3 retries) = 4 attempts"
    );
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.partition, 1, "same partition as the source");
    assert_eq!(l.key.as_deref(), Some(&b"user-7"[..]));
    assert_eq!(
        l.value.as_deref(),
        Some(&value[..]),
        "value bytes untouched"
    );
    assert_eq!(l.header("trace").flatten(), Some(&b"abc"[..]));
    assert!(
        l.headers.iter().any(|(k, v)| k == "nothing" && v.is_none()),
        "null header kept"
    );
    assert_eq!(l.header_str(dlt::ORIGINAL_TOPIC), topic);
    assert_eq!(
        l.header(dlt::ORIGINAL_PARTITION).flatten(),
        Some(&1i32.to_be_bytes()[..])
    );
    assert_eq!(
        l.header(dlt::ORIGINAL_OFFSET).flatten(),
        Some(&0i64.to_be_bytes()[..])
    );
    assert_eq!(
        l.header(dlt::ORIGINAL_TIMESTAMP).flatten().map(<[u8]>::len),
        Some(8)
    );
    assert_eq!(l.header_str(dlt::ORIGINAL_TIMESTAMP_TYPE), "CreateTime");
    assert_eq!(l.header_str(dlt::ORIGINAL_CONSUMER_GROUP), group);
    assert_eq!(l.header_str(dlt::FAILURE_KIND), "retries-exhausted");
    assert_eq!(l.header_str(dlt::ATTEMPTS), "4");
    assert!(
        l.header_str(dlt::EXCEPTION_MESSAGE)
            .contains("event 7 failed on attempt 4")
    );
    let first: u64 = l.header_str(dlt::FIRST_FAILURE_MS).parse().unwrap();
    let last: u64 = l.header_str(dlt::LAST_FAILURE_MS).parse().unwrap();
    assert!(
        last >= first + 150,
        "three 50 ms back-offs lie between first and last failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_dead_letters_after_one_attempt() {
    let (topic, group, dlt_topic) = setup("permanent", 1).await;
    let bad = Ev::new(3, "k").permanent();
    support::produce(&topic, vec![bad.record(), Ev::new(4, "k").record()]).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    wait_for("the good one", Duration::from_secs(60), || {
        log.succeeded_ids() == vec![4]
    })
    .await;
    c.stop().await;
    assert_eq!(log.attempts_of(3), vec![1]);
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header_str(dlt::FAILURE_KIND), "permanent");
    assert_eq!(letters[0].header_str(dlt::ATTEMPTS), "1");
    assert_eq!(committed_sum(&group, &topic, 1).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_are_dead_lettered_without_calling_the_handler() {
    let (topic, group, dlt_topic) = setup("poison", 1).await;
    let records = vec![
        TestRecord::new().key(b"k").value(b"{not json"),
        TestRecord::new().key(b"k"), // null value
        TestRecord::new().key(b"k").value(br#"{"unexpected":true}"#),
        TestRecord::new().key(b"k").value(Vec::new()), // empty payload
        Ev::new(9, "k").record(),
    ];
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    wait_until("4 dead letters", Duration::from_secs(60), || async {
        support::read_all(&dlt_topic).await.len() >= 4 && !log.calls().is_empty()
    })
    .await;
    c.stop().await;
    assert_eq!(
        log.succeeded_ids(),
        vec![9],
        "the handler saw only the valid record"
    );
    assert_eq!(log.calls().len(), 1);
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 4);
    for l in &letters {
        assert_eq!(l.header_str(dlt::FAILURE_KIND), "decode");
        assert_eq!(l.header_str(dlt::ATTEMPTS), "0");
    }
    let null_letter = letters
        .iter()
        .find(|l| l.header(dlt::ORIGINAL_OFFSET).flatten() == Some(&1i64.to_be_bytes()[..]))
        .unwrap();
    assert_eq!(
        null_letter.value, None,
        "a null value stays null in the dead letter"
    );
    assert!(
        null_letter
            .header_str(dlt::EXCEPTION_MESSAGE)
            .contains("null value")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_with_fewer_partitions_still_receives_letters() {
    support::require_kafka().await;
    let topic = support::unique_name("fewer");
    let group = support::unique_name("fewer-g");
    let dlt_topic = format!("{topic}.dlt");
    support::create_topic(&topic, 4).await;
    support::create_topic(&dlt_topic, 1).await;
    let bad = Ev::new(1, "x").permanent();
    support::produce(&topic, vec![bad.record().partition(3)]).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    wait_until("dead letter", Duration::from_secs(60), || async {
        !support::read_all(&dlt_topic).await.is_empty()
    })
    .await;
    c.stop().await;
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].partition, 0);
    assert_eq!(
        letters[0].header(dlt::ORIGINAL_PARTITION).flatten(),
        Some(&3i32.to_be_bytes()[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_dead_letter_writes_hold_the_offset_then_recover() {
    support::require_kafka().await;
    let topic = support::unique_name("dltdown");
    let group = support::unique_name("dltdown-g");
    let dlt_topic = format!("{topic}.dlt");
    // No DLT topic yet: writes fail. Partition 1 is a witness: a record handled there
    // after the letter's neighbours is committed by a commit pass that came after them.
    support::create_topic(&topic, 2).await;
    let bad = Ev::new(1, "k").permanent();
    support::produce(
        &topic,
        vec![
            Ev::new(0, "k").record().partition(0),
            bad.record().partition(0),
            Ev::new(2, "k").record().partition(0),
        ],
    )
    .await;
    let log = Log::new();
    // The default sink's topic is checked at start (a missing one is a startup error, see
    // tests/fail_loudly.rs); this sink writes to the same topic without declaring it, so the
    // write itself fails while the topic is missing.
    let sink = kourier::KafkaDeadLetterSink::builder(support::bootstrap())
        .build()
        .expect("sink");
    let c = Running::start(
        builder(&log, &topic, &group).dead_letter_sink(Arc::new(UndeclaredTopics(sink))),
    );
    // Pipelined dead letters: the partition's next record runs while the letter is retried,
    // but the commit point stays at the failing record.
    wait_for(
        "the records around the letter",
        Duration::from_secs(60),
        || log.succeeded_ids() == vec![0, 2],
    )
    .await;
    support::produce(&topic, vec![Ev::new(3, "w").record().partition(1)]).await;
    let committed = |partition: i32| {
        c.monitor
            .snapshot()
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .and_then(|p| p.committed)
    };
    wait_for(
        "the witness committed (a commit pass after record 2 settled)",
        Duration::from_secs(30),
        || committed(1) == Some(1),
    )
    .await;
    assert_eq!(committed(0), Some(1), "offset held at the failing record");
    assert_eq!(
        committed_sum(&group, &topic, 2).await,
        2,
        "offset held at the failing record (and the witness's)"
    );
    support::create_topic(&dlt_topic, 1).await;
    wait_until("commit", Duration::from_secs(30), || async {
        committed_sum(&group, &topic, 2).await == 4
    })
    .await;
    c.stop().await;
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1, "exactly one letter once the topic exists");
    assert_eq!(
        log.attempts_of(1),
        vec![1],
        "the handler is not re-run while the letter waits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_committed_offsets() {
    let (topic, group, _) = setup("restart", 2).await;
    support::produce(
        &topic,
        (0..40)
            .map(|i| Ev::new(i, &format!("k{i}")).record())
            .collect(),
    )
    .await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    log.wait_succeeded(40, Duration::from_secs(60)).await;
    c.stop().await;
    assert_eq!(committed_sum(&group, &topic, 2).await, 40);

    support::produce(
        &topic,
        (40..70)
            .map(|i| Ev::new(i, &format!("k{i}")).record())
            .collect(),
    )
    .await;
    let log2 = Log::new();
    let c = Running::start(builder(&log2, &topic, &group));
    log2.wait_succeeded(30, Duration::from_secs(60)).await;
    // Caught up: everything it would handle again has been handled.
    caught_up(&c).await;
    c.stop().await;
    let mut second = log2.succeeded_ids();
    second.sort();
    assert_eq!(
        second,
        (40..70).collect::<Vec<_>>(),
        "only new records after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_mid_stream_then_restart_handles_nothing_twice() {
    let (topic, group, _) = setup("shutdown", 3).await;
    let n = 300u64;
    let records = slow_events(n, 13, 5);
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(8),
    );
    log.wait_succeeded(40, Duration::from_secs(60)).await;
    c.stop().await;
    let first: Vec<u64> = log.succeeded_ids();
    assert!((first.len() as u64) < n, "stopped mid-stream");

    let log2 = Log::new();
    let c = Running::start(
        builder(&log2, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(8),
    );
    wait_for("the rest", Duration::from_secs(120), || {
        first.len() + log2.succeeded_ids().len() >= n as usize
    })
    .await;
    caught_up(&c).await;
    c.stop().await;
    let mut all: Vec<u64> = first.iter().copied().chain(log2.succeeded_ids()).collect();
    all.sort();
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), n as usize, "nothing lost");
    assert_eq!(
        all.len(),
        n as usize,
        "nothing handled twice across a clean restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_backoff_does_not_leave_the_group() {
    let (topic, group, _) = setup("backoff", 1).await;
    let slow = Ev::new(1, "k").fail_transient(1);
    support::produce(&topic, vec![slow.record(), Ev::new(2, "k").record()]).await;
    let log = Log::new();
    let b = builder(&log, &topic, &group)
        .retry_policy(RetryPolicy::fixed(Duration::from_secs(10), 1))
        .kafka_config("max.poll.interval.ms", "6000")
        .revoke_timeout(Duration::from_secs(5));
    let c = Running::start(b);
    wait_for(
        "retry after the long back-off",
        Duration::from_secs(60),
        || log.succeeded_ids() == vec![1, 2],
    )
    .await;
    let assigned = c.monitor.snapshot().assigned;
    c.stop().await;
    assert_eq!(
        log.attempts_of(1),
        vec![1, 2],
        "no redelivery: the consumer never left its group"
    );
    assert_eq!(log.attempts_of(2), vec![1]);
    assert_eq!(assigned, vec![(topic.clone(), 0)]);
    let calls = log.calls();
    let gap = calls[1].started - calls[0].ended;
    assert!(
        gap >= Duration::from_secs(10),
        "the back-off was really {gap:?} > max.poll.interval.ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_join_and_leave_while_records_flow() {
    let (topic, group, _) = setup("rebalance", 6).await;
    let n = 600u64;
    let records = slow_events(n, 50, 10);
    let producer = tokio::spawn({
        let topic = topic.clone();
        async move {
            for chunk in records.chunks(50) {
                support::produce(&topic, chunk.to_vec()).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });
    let log = Log::new();
    let a = Running::start(builder(&log, &topic, &group).max_in_flight(16));
    log.wait_succeeded(50, Duration::from_secs(60)).await;
    let b = Running::start(builder(&log, &topic, &group).max_in_flight(16));
    wait_for("b takes partitions", Duration::from_secs(60), || {
        !b.monitor.snapshot().assigned.is_empty()
    })
    .await;
    log.wait_succeeded(300, Duration::from_secs(60)).await;
    a.stop().await;
    producer.await.unwrap();
    wait_for("everything", Duration::from_secs(120), || {
        log.succeeded_ids()
            .into_iter()
            .collect::<HashSet<_>>()
            .len()
            >= n as usize
    })
    .await;
    caught_up(&b).await;
    b.stop().await;
    let ids = log.succeeded_ids();
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), n as usize, "every record handled");
    let dups = ids.len() - unique.len();
    // Clean revokes wait for in-flight records and commit them: duplicates can only come
    // from records in flight at a revoke, at most max_in_flight per consumer per rebalance.
    assert!(
        dups <= 2 * 16,
        "{dups} duplicates exceed the in-flight bound"
    );
    assert_eq!(committed_sum(&group, &topic, 6).await, n as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_mode_keeps_per_key_order_while_keys_overlap() {
    let (topic, group, _) = setup("keys", 1).await;
    let n = 200u64;
    let records = slow_events(n, 10, 20);
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(10),
    );
    log.wait_succeeded(n as usize, Duration::from_secs(60))
        .await;
    c.stop().await;
    let calls = log.calls();
    let mut by_key: BTreeMap<String, Vec<&Call>> = BTreeMap::new();
    for call in &calls {
        by_key.entry(call.key.clone()).or_default().push(call);
    }
    for (key, calls) in &by_key {
        for w in calls.windows(2) {
            assert!(w[0].offset < w[1].offset, "key {key}: out of order");
            assert!(
                w[1].started >= w[0].ended,
                "key {key}: two records of one key overlapped"
            );
        }
    }
    let overlapped = calls.iter().any(|a| {
        calls.iter().any(|b| {
            a.key != b.key
                && a.partition == b.partition
                && a.started < b.ended
                && b.started < a.ended
        })
    });
    assert!(
        overlapped,
        "different keys of one partition ran in parallel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handler_keeps_buffers_bounded_and_pauses() {
    let (topic, group, _) = setup("stall", 2).await;
    let stuck = Ev::new(0, "k").sleep_ms(6_000);
    let mut records = vec![stuck.record().partition(0)];
    records.extend((1..2000).map(|i| Ev::new(i, "k").record().partition(0)));
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group)
            .max_buffered_records(300)
            .max_buffered_records_per_partition(100),
    );
    let mut max_seen = 0;
    let mut saw_pause = false;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let s = c.monitor.snapshot();
        max_seen = max_seen.max(s.buffered_records);
        saw_pause |= s.paused.contains(&(topic.clone(), 0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_pause, "the stalled partition was paused");
    // One poll batch (500) may land past the limit before the pause takes effect.
    assert!(max_seen <= 100 + 500, "buffer grew to {max_seen}");
    log.wait_succeeded(2000, Duration::from_secs(60)).await;
    let monitor = c.monitor.clone();
    wait_for("resume after draining", Duration::from_secs(10), || {
        monitor.snapshot().paused.is_empty()
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_headers_keys_and_payloads_do_not_crash_the_consumer() {
    let (topic, group, dlt_topic) = setup("odd", 1).await;
    let ok = Ev::new(1, "k");
    let records = vec![
        TestRecord::new().value(serde_json::to_vec(&Ev::new(10, "nullkey")).unwrap()), // null key
        ok.record()
            .header("bin", Some(vec![0, 159, 146, 150, 255]))
            .header("", Some(b"empty name".to_vec()))
            .header("null", None),
        TestRecord::new()
            .key(vec![0xff, 0xfe, 0x00])
            .value(serde_json::to_vec(&Ev::new(11, "binkey")).unwrap()),
        TestRecord::new().key(b"k").value(Vec::new()),
    ];
    support::produce(&topic, records).await;
    support::produce_with_raw_header_key(
        &topic,
        &[0xc3, 0x28, b'x'],
        b"v",
        &serde_json::to_vec(&Ev::new(12, "rawkey")).unwrap(),
    )
    .await;
    let mut many = Ev::new(13, "many").record();
    for i in 0..2000 {
        many = many.header(format!("h{i}"), Some(vec![1]));
    }
    support::produce(&topic, vec![many]).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group));
    log.wait_succeeded(5, Duration::from_secs(60)).await;
    wait_until(
        "empty payload dead-lettered",
        Duration::from_secs(30),
        || async { support::read_all(&dlt_topic).await.len() == 1 },
    )
    .await;
    c.stop().await;
    let mut ids = log.succeeded_ids();
    ids.sort();
    assert_eq!(ids, vec![1, 10, 11, 12, 13]);
}

#[tokio::test]
async fn build_rejects_every_bad_setting() {
    use kourier::{ConfigError, Error};
    let log = Log::new();
    let base = || {
        RetryingConsumer::builder(Recorder(log.clone()))
            .bootstrap_servers("127.0.0.1:9092")
            .group_id("g")
            .topic("t")
    };
    let err = |b: RetryingConsumerBuilder<Recorder>| match b.build() {
        Err(Error::Config(e)) => e,
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(_) => panic!("expected a config error, got a consumer"),
    };
    let missing = |b| match err(b) {
        ConfigError::Missing(name) => name,
        other => panic!("expected Missing, got {other:?}"),
    };
    let invalid = |b| match err(b) {
        ConfigError::Invalid { setting, .. } => setting,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let conflict = |b| match err(b) {
        ConfigError::Conflict { key, .. } => key,
        other => panic!("expected Conflict, got {other:?}"),
    };
    assert_eq!(
        missing(
            RetryingConsumer::builder(Recorder(log.clone()))
                .group_id("g")
                .topic("t")
        ),
        "bootstrap_servers"
    );
    assert_eq!(
        missing(
            RetryingConsumer::builder(Recorder(log.clone()))
                .bootstrap_servers("x:1")
                .topic("t")
        ),
        "group_id"
    );
    assert_eq!(
        missing(
            RetryingConsumer::builder(Recorder(log.clone()))
                .bootstrap_servers("x:1")
                .group_id("g")
        ),
        "topics"
    );
    assert_eq!(invalid(base().group_id("")), "group_id");
    let unset = || {
        RetryingConsumer::builder(Recorder(log.clone()))
            .bootstrap_servers("x:1")
            .group_id("g")
    };
    assert_eq!(invalid(unset().topic("bad topic!")), "topics");
    assert_eq!(invalid(unset().topics(["t", "bad topic!"])), "topics");
    assert_eq!(
        invalid(base().retry_policy(RetryPolicy::default().with_max_attempts(0))),
        "retry_policy"
    );
    assert_eq!(
        invalid(base().retry_policy(RetryPolicy::default().with_jitter(2.0))),
        "retry_policy"
    );
    assert_eq!(invalid(base().max_in_flight(0)), "max_in_flight");
    assert_eq!(
        invalid(base().max_buffered_records(0)),
        "max_buffered_records"
    );
    assert_eq!(invalid(base().max_buffered_bytes(0)), "max_buffered_bytes");
    assert_eq!(
        invalid(base().max_buffered_records_per_partition(0)),
        "max_buffered_records_per_partition"
    );
    assert_eq!(
        invalid(base().commit_interval(Duration::ZERO)),
        "commit_interval"
    );
    assert_eq!(
        invalid(base().handler_timeout(Duration::ZERO)),
        "handler_timeout"
    );
    let idempotency = || {
        Idempotency::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            DedupKey::header("event-id"),
        )
    };
    assert_eq!(
        invalid(base().idempotency(idempotency().with_lease(Duration::ZERO))),
        "idempotency"
    );
    assert_eq!(
        invalid(base().idempotency(idempotency().with_ttl(Duration::ZERO))),
        "idempotency"
    );
    assert_eq!(
        invalid(
            base()
                .kafka_config("max.poll.interval.ms", "10000")
                .revoke_timeout(Duration::from_secs(10))
        ),
        "revoke_timeout"
    );
    assert_eq!(
        conflict(base().kafka_config("enable.auto.commit", "true")),
        "enable.auto.commit"
    );
    assert_eq!(
        conflict(base().kafka_config("enable.auto.offset.store", "true")),
        "enable.auto.offset.store"
    );
    assert_eq!(
        conflict(base().kafka_config("group.id", "other")),
        "group.id"
    );
    // The group and the brokers have setters: never through kafka_config, even alone or equal.
    assert_eq!(conflict(base().kafka_config("group.id", "g")), "group.id");
    assert_eq!(
        conflict(
            RetryingConsumer::builder(Recorder(log.clone()))
                .bootstrap_servers("x:1")
                .topic("t")
                .kafka_config("group.id", "g")
        ),
        "group.id"
    );
    assert_eq!(
        conflict(base().kafka_config("bootstrap.servers", "127.0.0.1:9092")),
        "bootstrap.servers"
    );
    assert_eq!(
        conflict(base().kafka_config("max.poll.interval.ms", "soon")),
        "max.poll.interval.ms"
    );
    // librdkafka's own validation surfaces as a Kafka error, not a panic.
    match base().kafka_config("no.such.property", "1").build() {
        Err(Error::Kafka { operation, .. }) => assert_eq!(operation, "create consumer"),
        other => panic!("expected a Kafka error, got {:?}", other.map(|_| ())),
    }
    // And a good configuration builds (nothing connects before run).
    assert!(base().build().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_and_hanging_handlers_are_transient_failures() {
    let (topic, group, dlt_topic) = setup("panic", 1).await;
    let mut panics = Ev::new(1, "k");
    panics.panic = true;
    let hangs = Ev::new(2, "k").sleep_ms(60_000);
    support::produce(
        &topic,
        vec![panics.record(), hangs.record(), Ev::new(3, "k").record()],
    )
    .await;
    let log = Log::new();
    let c = Running::start(
        builder(&log, &topic, &group)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(20), 1))
            .handler_timeout(Duration::from_millis(300)),
    );
    wait_for("the healthy record", Duration::from_secs(60), || {
        log.succeeded_ids() == vec![3]
    })
    .await;
    c.stop().await;
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 2);
    // A panic is its own failure kind: retried, then dead-lettered as `panic`.
    assert_eq!(letters[0].header_str(dlt::FAILURE_KIND), "panic");
    assert_eq!(letters[0].header_str(dlt::ATTEMPTS), "2");
    assert!(
        letters[0]
            .header_str(dlt::EXCEPTION_MESSAGE)
            .contains("handler panicked: event 1")
    );
    assert_eq!(
        letters[1].header_str(dlt::FAILURE_KIND),
        "retries-exhausted"
    );
    assert_eq!(letters[1].header_str(dlt::ATTEMPTS), "2");
    assert!(
        letters[1]
            .header_str(dlt::EXCEPTION_MESSAGE)
            .contains("handler timed out after 300ms")
    );
    assert!(
        log.attempts_of(2).is_empty(),
        "the hanging attempts never completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_observer_sees_each_record_once_and_cannot_break_it() {
    use kourier::{
        DeadLetterReason, HandlerError, InMemoryIdempotencyStore, Message, RecordOutcome,
        handler_fn,
    };
    use std::sync::Mutex;

    #[derive(serde::Deserialize)]
    struct Order {
        #[serde(default)]
        fail: bool,
    }

    let (topic, group, dlt_topic) = setup("outcome", 1).await;
    let with_id = |value: &str, id: &str| {
        TestRecord::new()
            .value(value)
            .header("event-id", Some(id.as_bytes().to_vec()))
    };
    support::produce(
        &topic,
        vec![
            with_id(r#"{"fail":false}"#, "a"), // 0: handled (the observer panics on it)
            with_id(r#"{"fail":false}"#, "a"), // 1: duplicate of 0
            with_id(r#"{"fail":true}"#, "b"),  // 2: permanent failure
            with_id("not json", "c"),          // 3: poison pill
            with_id(r#"{"fail":false}"#, "d"), // 4: handled
        ],
    )
    .await;

    type Seen = Vec<(String, i32, i64, RecordOutcome)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let observer_seen = seen.clone();
    let handler = handler_fn(|m: Message<Order>| async move {
        if m.event().fail {
            return Err(HandlerError::permanent("refused"));
        }
        Ok(())
    });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .retry_policy(fast_retries())
            .idempotency(Idempotency::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                kourier::DedupKey::header("event-id"),
            ))
            .on_outcome(move |record, outcome| {
                observer_seen.lock().unwrap().push((
                    record.topic.to_string(),
                    record.partition,
                    record.offset,
                    outcome,
                ));
                assert_ne!(record.offset, 0, "observer panics on purpose");
            }),
    );
    wait_for("five outcomes", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 5
    })
    .await;
    wait_until(
        "commits past every record",
        Duration::from_secs(30),
        || async { committed_sum(&group, &topic, 1).await == 5 },
    )
    .await;
    let report = c.stop_with_report(Duration::from_secs(60)).await;
    assert!(report.is_clean());

    // Once per record; a record whose outcome was still being written (key marked done,
    // letter acknowledged) had released its lane, so the calls may come out of offset order.
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(_, _, offset, _)| *offset);
    let expected: Vec<_> = [
        RecordOutcome::Handled,
        RecordOutcome::Duplicate,
        RecordOutcome::DeadLettered(DeadLetterReason::Permanent),
        RecordOutcome::DeadLettered(DeadLetterReason::Decode),
        RecordOutcome::Handled,
    ]
    .into_iter()
    .enumerate()
    .map(|(offset, outcome)| (topic.clone(), 0, offset as i64, outcome))
    .collect();
    assert_eq!(seen, expected, "once per record");
    assert_eq!(support::read_all(&dlt_topic).await.len(), 2);
}

/// Records are handed to workers in runs (a record and its lane's next ones): those that
/// ran before a slow record of the same run are committed while it still runs, not when it
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_before_a_slow_one_are_committed_while_it_runs() {
    let (topic, group, _dlt_topic) = setup("run-commit", 1).await;
    let records: Vec<_> = (0..30)
        .map(|i| {
            let ev = Ev::new(i, "k");
            if i == 5 { ev.sleep_ms(6_000) } else { ev }.record()
        })
        .collect();
    support::produce(&topic, records).await;
    let log = Log::new();
    let c = Running::start(builder(&log, &topic, &group).ordering(ProcessingOrder::Partition));
    wait_until("0-4 committed", Duration::from_secs(5), || async {
        committed_sum(&group, &topic, 1).await == 5
    })
    .await;
    assert_eq!(
        log.sorted_succeeded_ids(),
        (0..5).collect::<Vec<_>>(),
        "5 still runs"
    );
    log.wait_succeeded(30, Duration::from_secs(30)).await;
    c.stop_within(Duration::from_secs(30)).await;
    assert_eq!(committed_sum(&group, &topic, 1).await, 30);
}
