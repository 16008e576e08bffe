//! The byte bound on buffered records holds within one record of the limit (issue 14: with
//! 100 KB records it used to overshoot 64 MiB by 46 MiB, since room was counted in records
//! and a 500-record poll batch landed at once). Real broker, a stuck handler, large records.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kourier::{HandlerError, Message, handler_fn};
use support::TestRecord;
use support::consumer::{Running, builder, setup, wait_for};

const RECORD: usize = 100 * 1024;
const LIMIT: usize = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bytes_stay_within_one_record_of_the_limit() {
    support::require_kafka().await;
    let (topic, group, _dlt) = setup("byte-bound", 1).await;
    let value = vec![b'x'; RECORD];
    let records: Vec<TestRecord> = (0..300)
        .map(|i| TestRecord::new().key(format!("k{i}")).value(&value))
        .collect();
    support::produce(&topic, records).await;

    // Every handler waits for the gate: nothing settles while the buffer fills.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let handler = handler_fn(move |_m: Message<Option<Vec<u8>>>| {
        let g = g.clone();
        async move {
            let _permit = g.acquire().await.map_err(HandlerError::transient)?;
            Ok(())
        }
    });
    let c = Running::start(
        builder(handler, &topic, &group)
            .codec(kourier::BytesCodec)
            .max_in_flight(2)
            .max_buffered_bytes(LIMIT),
    );
    wait_for("the buffer to fill", Duration::from_secs(60), || {
        c.monitor.snapshot().buffered_bytes > LIMIT / 2
    })
    .await;
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        peak = peak.max(c.monitor.snapshot().buffered_bytes);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snapshot = c.monitor.snapshot();
    gate.add_permits(1_000);
    wait_for("every record handled", Duration::from_secs(60), || {
        c.monitor.snapshot().handled == 300
    })
    .await;
    c.stop().await;
    // One record's accounting: its value and key plus a fixed overhead and the topic name.
    let one_record = RECORD + 8 + 64 + topic.len();
    eprintln!(
        "byte bound: limit {LIMIT} B, peak buffered {peak} B ({:+} B over, one record is \
         {one_record} B); paused {:?}",
        peak as i64 - LIMIT as i64,
        snapshot.paused
    );
    assert!(
        peak <= LIMIT + one_record,
        "buffered {peak} B, more than one record over the {LIMIT} B limit"
    );
    assert!(!snapshot.paused.is_empty(), "the full partition is paused");
}
