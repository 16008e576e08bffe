//! Records the poll thread read ahead of the buffer (taken from librdkafka in runs, the rest
//! of a run waiting for room) are dropped when their partition is revoked or reset to its
//! commit point: the partition is read again from there, so none of its records is skipped.
//! Real broker; a slow consumer whose byte bound holds a few records, so that most of each
//! run waits read ahead.
//!
//! The reset test fails when the reset does not drop them. The rebalance test does not tell
//! whether a revoke drops them (after a revoke the buffer has room, and the records are
//! dropped anyway as records of a partition no longer assigned); it holds that nothing read
//! ahead is lost or skipped when the partitions come back.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::{HandlerError, Message, handler_fn};
use support::TestRecord;
use support::consumer::{Running, builder, setup, wait_for};
use support::exploding::{ARMED, Exploding};

const PARTITIONS: i32 = 1;
const RECORDS: usize = 300;
const VALUE: usize = 10 * 1024;
/// Room for about four records: a run of up to 64 leaves the rest read ahead.
const MAX_BUFFERED_BYTES: usize = 40_000;

type Seen = Arc<Mutex<HashSet<(i32, i64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_ahead_are_neither_lost_nor_skipped_across_rebalances() {
    support::require_kafka().await;
    let (topic, group, _dlt) = setup("read-ahead", PARTITIONS).await;
    let value = vec![b'x'; VALUE];
    let records: Vec<TestRecord> = (0..RECORDS)
        .map(|i| TestRecord::new().key(format!("k{i}")).value(&value))
        .collect();
    support::produce(&topic, records).await;

    let seen: Seen = Arc::default();
    let fast = Arc::new(AtomicBool::new(false));
    let (s, f) = (seen.clone(), fast.clone());
    // Slow until told otherwise: the buffer stays full, so records wait read ahead.
    let slow = handler_fn(move |m: Message<Option<Vec<u8>>>| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            if !f.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            s.lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .insert((m.partition(), m.offset()));
            Ok(())
        }
    });
    let a = Running::start(
        builder(slow, &topic, &group)
            .codec(kourier::BytesCodec)
            .max_in_flight(1)
            .max_buffered_bytes(MAX_BUFFERED_BYTES),
    );
    wait_for("a's buffer to fill", Duration::from_secs(60), || {
        a.monitor.snapshot().buffered_bytes >= MAX_BUFFERED_BYTES / 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A second member of the group, on a topic of its own, joins and leaves: each time the
    // (eager) rebalance revokes both of `a`'s partitions and assigns them back, read again
    // from their commit points.
    let (other, _, _) = setup("read-ahead-other", 1).await;
    let idle = handler_fn(|_m: Message<Option<Vec<u8>>>| async { Ok(()) });
    let b = Running::start(builder(idle, &other, &group).codec(kourier::BytesCodec));
    wait_for("b to join", Duration::from_secs(60), || {
        !b.monitor.snapshot().assigned.is_empty()
    })
    .await;
    wait_for(
        "a to have its partitions again",
        Duration::from_secs(60),
        || a.monitor.snapshot().assigned.len() == PARTITIONS as usize,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.stop().await;
    fast.store(true, Ordering::Relaxed);

    let all = RECORDS;
    wait_for("every record handled", Duration::from_secs(90), || {
        seen.lock().map(|s| s.len()).unwrap_or(0) >= all
    })
    .await;
    // Then the group's commit reaches each partition's log end (records handled twice, by
    // `b` and again by `a`, are allowed: a partition comes back from its commit point). No
    // commit passes its log end, so commits adding up to every record are the log ends.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let committed = loop {
        let committed = support::committed_offsets(&group, &topic, PARTITIONS).await;
        let sum: i64 = committed.values().map(|o| o.unwrap_or(0)).sum();
        if sum == RECORDS as i64 {
            break committed;
        }
        assert!(
            std::time::Instant::now() < until,
            "the group did not commit the log ends: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    a.stop().await;
    let seen = seen.lock().expect("seen").clone();
    for (p, end) in committed {
        for o in 0..end.unwrap_or(0) {
            assert!(seen.contains(&(p, o)), "record {p}/{o} was never handled");
        }
    }
}

/// A partition reset while records of it wait read ahead: those are dropped with the reset
/// (read again from the commit point), else the records between the commit point and them
/// would be taken for redeliveries and skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_ahead_of_a_reset_partition_are_read_again_not_skipped() {
    support::require_kafka().await;
    let (topic, group, _dlt) = setup("read-ahead-reset", 1).await;
    let pad = "x".repeat(VALUE);
    let count = 60u64;
    support::produce(
        &topic,
        (0..count)
            .map(|id| {
                TestRecord::new()
                    .key("k")
                    .value(format!(r#"{{"id":{id},"pad":"{pad}"}}"#))
            })
            .collect(),
    )
    .await;
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let h = handled.clone();
    let handler = handler_fn(move |m: Message<Exploding>| {
        h.lock().expect("handled").push(m.event().id);
        // Slow: the buffer stays full while the reset happens.
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(())
        }
    });
    let running = Running::start(
        builder(handler, &topic, &group)
            .max_in_flight(1)
            .max_buffered_bytes(MAX_BUFFERED_BYTES),
    );
    wait_for(
        "every record handled and committed",
        Duration::from_secs(60),
        || {
            let mut ids = handled.lock().expect("handled").clone();
            ids.sort_unstable();
            ids.dedup();
            ids.len() == count as usize && running.monitor.snapshot().caught_up
        },
    )
    .await;
    running.stop().await;
    assert!(!ARMED.load(Ordering::SeqCst), "event 5 exploded");
    assert_eq!(
        support::committed_sum(&group, &topic, 1).await,
        count as i64,
        "committed to the end"
    );
}
