//! The drain scenarios (a)–(d) and the slow-handler ones: read a pre-filled topic to the end,
//! timed from the first record handed to user code until every record is settled.

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use kourier::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use kourier::rdkafka::message::{BorrowedMessage, Message as _};
use kourier::rdkafka::{Offset, TopicPartitionList};
use kourier::{DedupKey, Idempotency, ProcessingOrder, RedisIdempotencyStore, RetryPolicy};

use crate::args::{Args, ChildArgs};
use crate::consumers::{
    Behaviour, BenchHandler, Progress, Running, consumer_config, kourier_builder, runtime,
};
use crate::measure::{DrainClock, Outcome};
use crate::scenario::Scenario;
use crate::services::{
    committed_sum, delete_redis_keys, log_end, redis_cpu_secs, redis_prefix, redis_url,
    require_redis, settle_redis,
};
use crate::{
    BoxResult, DEDUP_LEASE, DEDUP_TTL, EVENT_ID_HEADER, FAIL_EVERY, PARTITIONS, RETRY_BACKOFF,
    RETRY_FAIL_EVERY, SCENARIO_TIMEOUT, SLOW_HANDLER, SLOW_KEY_MAX_IN_FLIGHT,
};

/// Commits `next` (the next offset to read, per partition) synchronously.
pub(crate) fn raw_commit(consumer: &BaseConsumer, topic: &str, next: &[i64]) -> BoxResult<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, &o) in next.iter().enumerate() {
        if o >= 0 {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(o))?;
        }
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(())
}

/// (a): poll, count, track offsets; commit every second like kourier.
pub(crate) fn raw_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let clock = DrainClock::start();
    raw_loop(
        args,
        child,
        group,
        ("raw drain", clock),
        |_| Ok(()),
        || Ok(()),
    )
}

/// The raw loop of (a) and (d0), timed by `clock` (started by the caller, `what` names the
/// scenario in errors): poll, count, track offsets, hand each record to `on_record`, and
/// every second run `before_commit`, then commit; at the end the same, then a check that the
/// group committed every record.
pub(crate) fn raw_loop(
    args: &Args,
    child: &ChildArgs,
    group: &str,
    (what, clock): (&str, DrainClock),
    mut on_record: impl FnMut(&BorrowedMessage<'_>) -> BoxResult<()>,
    mut before_commit: impl FnMut() -> BoxResult<()>,
) -> BoxResult<Outcome> {
    let n = child.topic_records;
    let consumer: BaseConsumer = consumer_config(args, group).create()?;
    consumer.subscribe(&[child.topic.as_str()])?;
    let mut next = vec![-1i64; PARTITIONS as usize];
    let mut count = 0u64;
    let mut first = None;
    let mut last_commit = Instant::now();
    while count < n {
        if last_commit.elapsed() >= Duration::from_secs(1) {
            before_commit()?;
            raw_commit(&consumer, &child.topic, &next)?;
            last_commit = Instant::now();
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
                on_record(&m)?;
                if let Some(slot) = next.get_mut(m.partition() as usize) {
                    *slot = m.offset() + 1;
                }
            }
            Some(Err(e)) => eprintln!("{what}: consumer error: {e}"),
            None => {}
        }
        if clock.created.elapsed() > SCENARIO_TIMEOUT {
            return Err(
                format!("{what}: {count} of {n} records after {SCENARIO_TIMEOUT:?}").into(),
            );
        }
    }
    before_commit()?;
    let outcome = clock.stop(n, args.size, first, Instant::now());
    raw_commit(&consumer, &child.topic, &next)?;
    consumer.unsubscribe();
    drop(consumer);
    check_committed(group, &child.topic, PARTITIONS, n)?;
    Ok(outcome)
}

pub(crate) fn check_committed(group: &str, topic: &str, partitions: i32, n: u64) -> BoxResult<()> {
    let committed = committed_sum(group, topic, partitions)?;
    if committed < n {
        return Err(format!(
            "group {group} committed {committed} of {n} records: the run lost track of records"
        )
        .into());
    }
    Ok(())
}

/// (b), (c), (d) and the slow-handler scenarios.
pub(crate) fn kourier_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let scenario = child.scenario;
    let n = match scenario {
        Scenario::SlowPartition => args.slow_partition_records.min(child.topic_records),
        _ => child.topic_records,
    };
    // When the scenario reads the whole topic, its end is "everything settled"; the
    // slow Partition scenario stops after its first `n` records instead.
    let whole_topic = n == child.topic_records;
    let rt = runtime()?;
    rt.block_on(async {
        let progress = Arc::new(Progress::default());
        let behaviour = match scenario {
            Scenario::DeadLetter => Behaviour::FailEvery(FAIL_EVERY),
            Scenario::SlowPartition | Scenario::SlowKey | Scenario::RetryBase => {
                Behaviour::Sleep(SLOW_HANDLER)
            }
            Scenario::Retry => Behaviour::SleepFailFirst {
                every: RETRY_FAIL_EVERY,
                sleep: SLOW_HANDLER,
            },
            _ => Behaviour::Noop,
        };
        let handler = BenchHandler {
            progress: progress.clone(),
            behaviour,
        };
        let dlt = format!("{}.dlt", child.topic);
        let dlt_before = if scenario == Scenario::DeadLetter {
            log_end(&dlt, PARTITIONS)?
        } else {
            0
        };
        let store_cpu0 = if scenario == Scenario::Redis {
            require_redis().await?;
            settle_redis().await?;
            redis_cpu_secs().await?
        } else {
            0.0
        };
        let clock = DrainClock::start();
        let mut builder = kourier_builder(args, handler, group, &child.topic);
        match scenario {
            Scenario::Redis => {
                require_redis().await?;
                let store = RedisIdempotencyStore::builder(redis_url())
                    .key_prefix(redis_prefix(&child.run_id))
                    .build()
                    .await?;
                builder = builder.idempotency(
                    Idempotency::new(Arc::new(store), DedupKey::header(EVENT_ID_HEADER))
                        .with_lease(DEDUP_LEASE)
                        .with_ttl(DEDUP_TTL),
                );
            }
            Scenario::SlowKey => {
                builder = builder
                    .ordering(ProcessingOrder::Key)
                    .max_in_flight(SLOW_KEY_MAX_IN_FLIGHT);
            }
            Scenario::SlowPartition => builder = builder.ordering(ProcessingOrder::Partition),
            Scenario::RetryBase | Scenario::Retry => {
                builder = builder
                    .ordering(ProcessingOrder::Key)
                    .retry_policy(RetryPolicy::fixed(RETRY_BACKOFF, 3));
            }
            _ => {}
        }
        let running = Running::spawn(builder.build()?);
        let end = loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if progress.handled.load(AtomicOrdering::Relaxed) >= n {
                if !whole_topic {
                    break Instant::now();
                }
                let s = running.monitor.snapshot();
                if s.in_flight == 0 && s.buffered_records == 0 {
                    break Instant::now();
                }
            }
            if running.task.is_finished() {
                return Err("the consumer stopped before the end".into());
            }
            if clock.created.elapsed() > SCENARIO_TIMEOUT {
                let handled = progress.handled.load(AtomicOrdering::Relaxed);
                return Err(
                    format!("{handled} of {n} records handled after {SCENARIO_TIMEOUT:?}").into(),
                );
            }
        };
        let outcome = clock.stop(n, args.size, progress.first.get().copied(), end);
        let store_cpu_secs = if scenario == Scenario::Redis {
            redis_cpu_secs().await? - store_cpu0
        } else {
            0.0
        };
        running.stop().await?;
        let partitions = if scenario.is_slow() { 1 } else { PARTITIONS };
        check_committed(group, &child.topic, partitions, n)?;
        if scenario == Scenario::Redis {
            delete_redis_keys(&redis_prefix(&child.run_id)).await?;
        }
        let mut dead_letters = 0;
        if scenario == Scenario::DeadLetter {
            let failed = progress.failed.load(AtomicOrdering::Relaxed);
            dead_letters = log_end(&dlt, PARTITIONS)? - dlt_before;
            if dead_letters != failed {
                return Err(format!(
                    "{failed} records failed but the dead-letter topic holds {dead_letters}"
                )
                .into());
            }
        }
        Ok(Outcome {
            dead_letters,
            store_cpu_secs,
            ..outcome
        })
    })
}
