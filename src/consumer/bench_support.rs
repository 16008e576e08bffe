//! Hidden entry points for `benches/micro.rs`: thin wrappers over the crate-private offset
//! tracker and scheduler, so they can be benchmarked without widening the public API; and
//! the tier-record header reading, for the fuzz targets in `fuzz/`.
//! Compiled only with `--cfg kourier_bench` and re-exported as `kourier::__bench` with
//! `#[doc(hidden)]`: not part of the API, no semver promise, not for use outside kourier's
//! own benches and fuzz targets.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::JsonCodec;
use crate::consumer::schedule::OffsetTracker as Tracker;
use crate::consumer::schedule::{Job, JobEnd, Limits, ProcessingOrder, Scheduler};
use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
use crate::handler::Handler;
use crate::record::RawRecord;
use crate::retry::RetryPolicy;

/// The per-partition offset tracker (contiguous settled watermark).
#[derive(Debug, Default)]
pub struct OffsetTracker(Tracker);

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// See the crate-private `OffsetTracker::received`.
    pub fn received(&mut self, offset: i64) -> bool {
        self.0.received(offset)
    }

    /// See the crate-private `OffsetTracker::settled`.
    pub fn settled(&mut self, offset: i64) -> bool {
        self.0.settled(offset)
    }

    /// The offset to commit, if any.
    pub fn committable(&self) -> Option<i64> {
        self.0.committable()
    }
}

/// The scheduler plus the jobs it handed out, driven the way the poll thread and the
/// workers drive it (without the mutex, threads or tasks).
#[derive(Debug)]
pub struct SchedulerHarness {
    scheduler: Scheduler,
    running: VecDeque<Job>,
}

impl SchedulerHarness {
    /// A scheduler with these limits.
    pub fn new(
        ordering: ProcessingOrder,
        max_in_flight: usize,
        max_buffered_records: usize,
        max_buffered_bytes: usize,
        max_buffered_records_per_partition: usize,
    ) -> Self {
        SchedulerHarness {
            scheduler: Scheduler::new(
                ordering,
                Limits {
                    max_in_flight,
                    max_buffered_records,
                    max_buffered_bytes,
                    max_buffered_records_per_partition,
                    max_uncommitted_per_partition: usize::MAX,
                },
            ),
            running: VecDeque::new(),
        }
    }

    /// Assigns partitions `0..partitions` of `topic`.
    pub fn assign(&mut self, topic: &str, partitions: i32) {
        let topic: Arc<str> = Arc::from(topic);
        self.scheduler
            .assign((0..partitions).map(|p| (topic.clone(), p)));
    }

    /// Buffers a record (what the poll thread does for each polled record).
    pub fn enqueue(&mut self, record: RawRecord) -> bool {
        self.scheduler.enqueue(record)
    }

    /// Starts every job that may start now; returns how many started.
    pub fn start_ready(&mut self) -> usize {
        let jobs = self.scheduler.take_jobs();
        let started = jobs.len();
        self.running.extend(jobs);
        started
    }

    /// Settles the oldest running job (what a worker does when a record ends); the job the
    /// scheduler hands back in its place starts. Returns `false` when nothing was running.
    pub fn settle_oldest(&mut self) -> bool {
        let Some(mut job) = self.running.pop_front() else {
            return false;
        };
        // The next record of its run, without the scheduler (as a worker does).
        if job.advance() {
            self.running.push_back(job);
            return true;
        }
        if let Some(next) = self.scheduler.finish(&job, JobEnd::Settled) {
            self.running.push_back(next);
        }
        true
    }

    /// Runs flow control; returns (partitions to pause, partitions to resume).
    pub fn flow_control(&mut self) -> (usize, usize) {
        let changes = self.scheduler.flow_control();
        (changes.pause.len(), changes.resume.len())
    }

    /// Partitions with an offset to commit.
    pub fn committable_partitions(&mut self) -> usize {
        self.scheduler.commits_due().len()
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

/// What the crate-private tier-record reading (`tiers::runtime::read_tier_record`) made of a
/// record's headers, for the fuzz targets in `fuzz/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierRecordReading {
    /// Why the record cannot be read (dead-lettered as `decode`), if so.
    pub invalid: Option<String>,
    /// When it may run.
    pub due: Option<std::time::SystemTime>,
    /// The longest it waits from when it is first looked at.
    pub longest_wait: std::time::Duration,
    /// The source record it stands for: topic, partition, offset.
    pub origin: (String, i32, i64),
    /// Attempts before this tier, if its headers gave them.
    pub attempts: Option<u32>,
    /// Failed stages before this tier, if its headers gave attempts.
    pub stages: Option<u32>,
}

/// Reads `record` as a record of tier `tier` (of `tiers`, delay `delay`) of `source`, at
/// wall-clock time `now`, as a running consumer does (see the `tiers` module docs, "Headers
/// are untrusted").
pub fn read_tier_record(
    record: &RawRecord,
    source: &str,
    tier: u32,
    tiers: u32,
    delay: std::time::Duration,
    now: std::time::SystemTime,
) -> TierRecordReading {
    let at = crate::tiers::runtime::read_tier_record(record, source, tier, tiers, delay, now);
    TierRecordReading {
        invalid: at.invalid,
        due: at.due,
        longest_wait: at.longest_wait,
        origin: (at.origin.topic, at.origin.partition, at.origin.offset),
        attempts: at.history.as_ref().map(|h| h.attempts),
        stages: at.history.as_ref().map(|h| h.stages),
    }
}

/// One worker's record path — decode, breaker, claim, attempt, settle, report — for a handler
/// of events decoded from JSON, without idempotency, breaker, tiers or destinations (the
/// throughput benchmark's (b)): what a worker does for each record, on the calling task.
pub struct WorkerHarness<H: Handler> {
    worker: crate::consumer::work::WorkerContext<H>,
    /// The stop signals of the records' partition (one for all, as for a partition's records).
    stop: crate::consumer::Stop,
}

impl<H: Handler> std::fmt::Debug for WorkerHarness<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerHarness")
    }
}

impl<H> WorkerHarness<H>
where
    H: Handler,
    H::Event: serde::de::DeserializeOwned,
{
    /// A worker for `handler`, reading `topic`: no retries, letters refused (none is sent
    /// while the handler succeeds).
    pub fn new(handler: H, topic: &str) -> Self {
        use crate::consumer::work::WorkerContext;
        let metrics = Arc::new(crate::metrics::ConsumerMetrics::new(
            "bench",
            &[topic.to_owned()],
        ));
        let worker = WorkerContext {
            handler: Arc::new(handler),
            codec: Arc::new(JsonCodec::<H::Event>::new()),
            policy: RetryPolicy::no_retries(),
            sink: Arc::new(RefusingSink),
            dedup: None,
            group_id: "bench".to_owned(),
            handler_timeout: None,
            retry_panics: false,
            stall_threshold: std::time::Duration::from_secs(60),
            metrics,
            observer: None,
            outage: crate::consumer::OutageGate(None),
            tiers: None,
            destinations: None,
            transactions: None,
        };
        WorkerHarness {
            worker,
            stop: crate::consumer::Stop::default(),
        }
    }

    /// Runs one record to its end; `true` when it settled.
    pub async fn run(&self, record: Arc<RawRecord>) -> bool {
        let end = self
            .worker
            .run_job(record, &self.stop, &crate::consumer::work::KeepSlot)
            .await;
        end == JobEnd::Settled
    }
}

/// A dead-letter sink that refuses every letter (the harness's handlers succeed).
#[derive(Debug)]
struct RefusingSink;

#[async_trait::async_trait]
impl DeadLetterSink for RefusingSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        Err(DeadLetterError {
            coordinates: letter.record.coordinates(),
            destination: "none".to_owned(),
            source: "the benchmark harness sends no letter".into(),
        })
    }

    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter)
    }

    fn topics_for(&self, _source_topic: &str) -> Vec<String> {
        Vec::new()
    }
}
