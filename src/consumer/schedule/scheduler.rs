//! The scheduler: buffers records per partition, decides which may run now under the
//! ordering mode and `max_in_flight`, tracks settled offsets and asks for pauses.
//!
//! Pure bookkeeping, no I/O: the poll thread feeds it records and applies its pause/resume
//! and commit decisions; workers report each record's end and receive the next one.

use std::collections::{HashMap, VecDeque};

/// The scheduler's maps are looked up several times per record (its partition, its lane):
/// `foldhash` (randomly seeded, like std's) hashes a topic name or a key several times faster
/// than std's SipHash.
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use super::finished::Finished;
use super::offsets::OffsetTracker;
pub(crate) use super::topic_partition::Tp;
use crate::consumer::breaker::{Breaker, DestinationBreakers, Dispatch};
use crate::consumer::stop::Signal;
pub(crate) use crate::consumer::stop::Stop;
use crate::record::{RawRecord, RecordBytes};

/// How records may run in parallel.
///
/// Every mode is bounded by the consumer's `max_in_flight`. Queue mode (feature `queue`,
/// `kourier::queue::QueueConsumer`, over a share group) has no ordering at all, neither per
/// partition nor per key: the broker hands a partition's records to several members at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ProcessingOrder {
    /// One record per partition at a time, in offset order, its retries included (the
    /// starting design's behaviour). Parallelism is at most the number of partitions.
    #[default]
    Partition,
    /// One record per key at a time, in offset order; records with different keys run in
    /// parallel, even within one partition. Records with a null key fall back to partition
    /// order: the null-key records of a partition run one at a time, in offset order.
    Key,
    /// No ordering: any record may run as soon as a slot is free.
    Unordered,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum LaneKey {
    Partition,
    /// A view into the record's buffer: cloning it (for the lane map and the ready queue)
    /// copies no bytes.
    Key(RecordBytes),
    NullKey,
    Record(i64),
}

/// One record to run, handed to a worker.
#[derive(Debug)]
pub(crate) struct Job {
    /// Unique per job: how the scheduler knows which jobs are parked.
    pub(crate) id: u64,
    pub(crate) tp: Tp,
    pub(crate) generation: u64,
    lane: LaneKey,
    pub(crate) record: Arc<RawRecord>,
    /// `abandon` fires when the revoke timeout or the shutdown deadline passes: the worker
    /// stops waiting (store, dead-letter retries) and leaves the record unsettled. `drain`
    /// fires when the partition starts draining (revoke, shutdown): a record only waiting
    /// out a retry back-off is given up at once.
    pub(crate) stop: Arc<Stop>,
    /// Dispatched as the half-open breaker's probe (in this breaker epoch): if the record
    /// ends without taking the probe (a poison pill, a duplicate), the probe is free again.
    probe_epoch: Option<u64>,
    /// The next records of its lane, taken with it to run after it on the same worker (see
    /// [`Run`]). Behind a lock only because a job's slot is used through a shared reference
    /// while its record runs; the worker is the only one to take it.
    pub(crate) run: Mutex<Run>,
}

/// The most records one job takes from its lane at once: its record and the next ones of
/// the lane ([`Run`]).
pub(crate) const RUN_RECORDS: usize = 32;

/// How long a worker may go on with a job's run without going back to the scheduler (which
/// may then give the slot to a record that waits for one: fairness).
pub(crate) const RUN_FOR: Duration = Duration::from_millis(2);

/// A job's run: the records of its lane taken with it (in Key and Partition order), which
/// the worker runs one after another, each after the previous one settled, without taking
/// the scheduler's lock per record (one hand-off per run, not per record). Until a record
/// of the run starts it is counted as buffered; the records that started and settled on the
/// worker are told to the scheduler at the job's next visit to it ([`Scheduler::finish`],
/// [`Scheduler::release_lane`], [`Scheduler::park`], or [`Scheduler::report_run`] when a
/// record does not end at once), so a commit never waits for more than the run.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Records still to run, in lane order, with their byte sizes.
    ahead: VecDeque<(Arc<RawRecord>, usize)>,
    /// Records of the run that started since the last report (the job's record among them
    /// when it came from the run), and their bytes: still counted as buffered.
    started: usize,
    started_bytes: usize,
    /// Records of the run that ran and settled on the worker; those from `reported` on are
    /// not told to the scheduler yet. Kept until the job is dropped (on the poll thread).
    settled: Vec<Arc<RawRecord>>,
    reported: usize,
    /// When the run was taken.
    since: Option<std::time::Instant>,
}

impl Run {
    /// Records of the run not started yet.
    pub(crate) fn ahead(&self, max: usize) -> impl Iterator<Item = &Arc<RawRecord>> {
        self.ahead.iter().take(max).map(|(r, _)| r)
    }

    /// Whether settled records wait to be told to the scheduler.
    pub(crate) fn unreported(&self) -> bool {
        self.reported < self.settled.len()
    }
}

impl Job {
    /// The records the job holds (its own, those its run settled, those left ahead), the
    /// job itself dropped.
    pub(crate) fn into_records(self) -> impl Iterator<Item = Arc<RawRecord>> {
        let run = self
            .run
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        std::iter::once(self.record)
            .chain(run.settled)
            .chain(run.ahead.into_iter().map(|(record, _)| record))
    }

    /// Moves a job whose record settled on to the next record of its run, without the
    /// scheduler: `false` when the run is over, or older than [`RUN_FOR`] (the worker then
    /// ends the job through the scheduler, which takes the run back).
    pub(crate) fn advance(&mut self) -> bool {
        let run = self.run.get_mut().unwrap_or_else(PoisonError::into_inner);
        if run.since.is_none_or(|since| since.elapsed() >= RUN_FOR) {
            return false;
        }
        let Some((next, bytes)) = run.ahead.pop_front() else {
            return false;
        };
        run.started += 1;
        run.started_bytes += bytes;
        run.settled.push(std::mem::replace(&mut self.record, next));
        true
    }

    /// The next records of the job's run (at most `max`), in order.
    pub(crate) fn run_ahead(&self, max: usize) -> Vec<Arc<RawRecord>> {
        self.run().ahead(max).cloned().collect()
    }

    /// Whether records of the job's run started or settled since the scheduler was last told.
    pub(crate) fn run_unreported(&self) -> bool {
        let run = self.run();
        run.started > 0 || run.unreported()
    }

    fn run(&self) -> std::sync::MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobEnd {
    /// Handled, dead-lettered (acknowledged) or skipped as a duplicate: its offset may be
    /// committed.
    Settled,
    /// Given up without settling (revoked, shutting down): it will be delivered again.
    Abandoned,
    /// A retry-tier record that was only waiting for its due time when its partition
    /// drained: not settled (delivered again), but nothing of it had run, so a shutdown
    /// reports it apart from the abandoned ones.
    LeftForLater,
}

/// How many records may settle at once per in-flight slot (see [`Scheduler::release_lane`]):
/// 256 with the default 64 slots, one full batch of the idempotency store's completions.
pub(crate) const SETTLING_PER_SLOT: usize = 4;

/// [`Scheduler::release_lane`] refused: as many records settle as the limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SettlingFull;

/// Buffer and concurrency limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_in_flight: usize,
    pub(crate) max_buffered_records: usize,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) max_buffered_records_per_partition: usize,
    /// Records of one partition started past its commit point (running, or settled out of
    /// order) before the partition is paused: held for the pause grace, or twice it at once.
    pub(crate) max_uncommitted_per_partition: usize,
}

#[derive(Debug, Default)]
pub(super) struct Lane {
    pub(super) queue: LaneQueue,
    pub(super) running: bool,
    pub(super) in_ready: bool,
    /// A record of this lane was given up unsettled: nothing after it may run in this
    /// assignment (it would overtake the record in its key's or partition's order); the
    /// lane's records are delivered again, in order, with it.
    pub(super) blocked: bool,
}

#[derive(Debug)]
pub(super) struct PartitionState {
    pub(super) generation: u64,
    pub(super) tracker: OffsetTracker,
    pub(super) lanes: FastMap<LaneKey, Lane>,
    pub(super) queued: usize,
    pub(super) queued_bytes: usize,
    pub(super) in_flight: usize,
    /// The highest offset handed to a worker in this assignment.
    pub(super) max_started: Option<i64>,
    pub(super) paused: bool,
    /// Since when it holds its per-partition limit (without a break).
    pub(super) over_limit_since: Option<std::time::Instant>,
    /// Paused because too many records were started past the commit point.
    pub(super) uncommitted_paused: bool,
    /// Since when it holds `max_uncommitted_per_partition` records started past its commit
    /// point (without a break), not yet paused for it.
    pub(super) uncommitted_since: Option<std::time::Instant>,
    /// Revoking or stopping: no new records, only gap fillers are still dispatched.
    pub(super) draining: bool,
    pub(super) committed: Option<i64>,
    /// Records settled when the last commit was offered, and when the last commit
    /// succeeded: a commit carries the finished offsets above its commit point, so it is
    /// worth sending when they changed even if the commit point did not move.
    pub(super) offered_settles: u64,
    pub(super) committed_settles: u64,
    /// Offsets a previous owner finished above its commit point (from its commit's
    /// metadata): skipped when they arrive, until the last of them is passed.
    pub(super) finished: Option<Finished>,
    /// Shared by its jobs (one reference count per job, not three cancellation tokens).
    pub(super) stop: Arc<Stop>,
}

/// A lane's queue of records (with their byte sizes).
pub(super) type LaneQueue = VecDeque<(Arc<RawRecord>, usize)>;

/// Emptied lane queues kept for new lanes, at most this many, of at most
/// [`SPARE_QUEUE_CAPACITY`] records each: in key mode most lanes hold one record and end with
/// it, and a fresh queue would allocate its buffer for each.
const SPARE_QUEUES: usize = 1024;
const SPARE_QUEUE_CAPACITY: usize = 16;

/// The partition of `job`, when it is still that of the job's assignment (a partition
/// revoked since has another generation, or is gone).
fn job_partition<'a>(
    partitions: &'a mut FastMap<Tp, PartitionState>,
    job: &Job,
) -> Option<&'a mut PartitionState> {
    partitions
        .get_mut(&job.tp)
        .filter(|p| p.generation == job.generation)
}

/// Where `p` would be committed now, if a commit is worth sending: its commit point moved
/// since it was last committed, or (with `metadata`) records above it settled since (the
/// commit point is then the first offset received when nothing is committable yet).
pub(super) fn commit_point(p: &PartitionState, metadata: bool) -> Option<i64> {
    let watermark = p.tracker.committable();
    if let Some(c) = watermark
        && p.committed.is_none_or(|done| c > done)
    {
        return Some(c);
    }
    if !metadata || p.tracker.settles() == p.committed_settles {
        return None;
    }
    let point = watermark.or(p.tracker.first_received())?;
    p.committed
        .is_none_or(|done| point >= done)
        .then_some(point)
}

/// Keeps an ended lane's (empty) queue for a new lane, unless enough are kept already.
pub(super) fn spare_queue(spare: &mut Vec<LaneQueue>, queue: LaneQueue) {
    if spare.len() < SPARE_QUEUES && (1..=SPARE_QUEUE_CAPACITY).contains(&queue.capacity()) {
        spare.push(queue);
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Scheduler {
    pub(super) ordering: ProcessingOrder,
    pub(super) limits: Limits,
    pub(super) partitions: FastMap<Tp, PartitionState>,
    pub(super) ready: VecDeque<(Tp, u64, LaneKey)>,
    /// In-flight slots taken: records running (claiming, handling, dead-lettering).
    pub(super) in_flight: usize,
    /// Records waiting out a retry back-off: their lanes stay taken (nothing overtakes them)
    /// but they hold no slot, so records of other lanes use it meanwhile (delivery rule 16 in the crate docs).
    /// By job id: the scheduler is the one record of which jobs hold a slot, so a job that
    /// ends while parked (given up, or its task dropped) is never counted twice.
    pub(super) parked: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    /// Records whose lane and slot were released while their end is still being written
    /// (completion, dead letter): see [`Scheduler::release_lane`].
    pub(super) settling: usize,
    /// Parked records whose back-off is over, waiting for a slot, first come first served.
    /// While new records wait too, freed slots go to both in turns: retries cannot starve
    /// first attempts, nor first attempts retries.
    pub(super) resuming: VecDeque<(u64, oneshot::Sender<()>)>,
    /// The last slot handed out went to a parked record (the next goes to a new record, if
    /// one is ready).
    resumed_last: bool,
    /// Emptied queues of ended lanes, reused by new lanes (see [`SPARE_QUEUES`]).
    pub(super) spare_queues: Vec<LaneQueue>,
    pub(super) next_job_id: u64,
    pub(super) buffered_records: usize,
    pub(super) buffered_bytes: usize,
    pub(super) next_generation: u64,
    pub(super) stopping: bool,
    pub(super) throttled: bool,
    /// How long a partition holds its per-partition limit before it is paused.
    pub(super) pause_grace: Duration,
    pub(super) shutdown: Stop,
    /// Records given up unsettled since stopping began, `topic/partition@offset` (the first
    /// [`ABANDONED_LISTED`]), and how many in all.
    pub(super) abandoned_at_stop: Vec<String>,
    pub(super) abandoned_at_stop_count: usize,
    /// Tier records given up at a stop while only waiting for their due time.
    pub(super) left_for_later_at_stop: usize,
    /// Partitions with a record given up outside a revoke or a stop (an escaped panic):
    /// its lane and the partition's commit point would be stuck for the rest of the
    /// assignment, so the poll thread resets the partition to its commit point
    /// ([`Scheduler::take_resets`]).
    pub(super) resets: Vec<Tp>,
    /// The outage breaker: while it is not closed, nothing new is dispatched.
    pub(super) breaker: Option<Arc<Breaker>>,
    /// The breakers of destinations (kept for the monitor: dispatch does not look at them).
    destinations: Option<Arc<DestinationBreakers>>,
    /// Jobs that ended, for the poll thread to drop ([`Scheduler::keep_spent`]), and the
    /// records they hold (a job holds those its run settled too).
    pub(super) spent: Vec<Job>,
    spent_records: usize,
    /// Commits carry the finished offsets above their commit point in their metadata.
    commit_metadata: bool,
    /// Records skipped because a previous owner of their partition had finished them.
    pub(super) skipped_finished: u64,
    /// Jobs take runs of their lane's records ([`Run`]).
    runs: bool,
}

/// At most this many records of ended jobs wait for the poll thread to drop them (one poll
/// batch, 500 records by default, and then some); past it a worker drops its own.
const SPENT_MAX: usize = 2_048;

/// How long a partition may hold its per-partition limit before it is paused: a healthy
/// fast partition overshoots the limit with one fetch response and drains it within
/// milliseconds; pausing it would make librdkafka drop its pre-fetched records and fetch
/// them again (measured: half the throughput benchmark's (b) runs took 4.6 s instead of
/// 2.6 s). A stalled partition stays over its limit and is paused after this.
const PAUSE_GRACE: Duration = Duration::from_millis(500);

/// How many abandoned records a shutdown report lists by name.
pub(crate) const ABANDONED_LISTED: usize = 100;

impl Scheduler {
    pub(crate) fn new(ordering: ProcessingOrder, limits: Limits) -> Self {
        Scheduler {
            ordering,
            limits,
            partitions: FastMap::default(),
            ready: VecDeque::new(),
            in_flight: 0,
            parked: Default::default(),
            settling: 0,
            resuming: VecDeque::new(),
            resumed_last: false,
            spare_queues: Vec::new(),
            spent: Vec::new(),
            spent_records: 0,
            next_job_id: 0,
            buffered_records: 0,
            buffered_bytes: 0,
            next_generation: 1,
            stopping: false,
            throttled: false,
            pause_grace: PAUSE_GRACE,
            shutdown: Stop::default(),
            abandoned_at_stop: Vec::new(),
            abandoned_at_stop_count: 0,
            left_for_later_at_stop: 0,
            resets: Vec::new(),
            commit_metadata: false,
            skipped_finished: 0,
            runs: true,
            breaker: None,
            destinations: None,
        }
    }

    /// Holds dispatch while `breaker` is not closed.
    #[must_use]
    pub(crate) fn with_breaker(mut self, breaker: Option<Arc<Breaker>>) -> Self {
        self.breaker = breaker;
        self
    }

    /// The outage breaker, if the consumer has one.
    pub(crate) fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.breaker.as_ref()
    }

    /// Whether commits carry the finished offsets above their commit point (off unless set;
    /// the builder sets it from [`CommitMetadata`](crate::CommitMetadata), on by default).
    #[must_use]
    pub(crate) fn with_commit_metadata(mut self, on: bool) -> Self {
        self.commit_metadata = on;
        self
    }

    /// Whether jobs take runs of their lane's records (on unless set; see [`Run`]).
    #[must_use]
    pub(crate) fn with_runs(mut self, on: bool) -> Self {
        self.runs = on;
        self
    }

    /// Keeps the breakers of destinations for the monitor.
    #[must_use]
    pub(crate) fn with_destinations(mut self, d: Option<Arc<DestinationBreakers>>) -> Self {
        self.destinations = d;
        self
    }

    /// The breakers of destinations, if the consumer isolates them.
    pub(crate) fn destinations(&self) -> Option<&Arc<DestinationBreakers>> {
        self.destinations.as_ref()
    }

    /// Starts tracking newly assigned partitions (a fresh generation each time, so late
    /// completions from an earlier assignment of the same partition are ignored).
    pub(crate) fn assign(&mut self, tps: impl IntoIterator<Item = Tp>) {
        for tp in tps {
            let generation = self.next_generation;
            self.next_generation += 1;
            let old = self.partitions.insert(
                tp,
                PartitionState {
                    generation,
                    tracker: OffsetTracker::default(),
                    lanes: FastMap::default(),
                    queued: 0,
                    queued_bytes: 0,
                    in_flight: 0,
                    max_started: None,
                    paused: false,
                    over_limit_since: None,
                    uncommitted_paused: false,
                    uncommitted_since: None,
                    draining: false,
                    committed: None,
                    offered_settles: 0,
                    committed_settles: 0,
                    finished: None,
                    stop: Arc::new(Stop {
                        abandon: self.shutdown.abandon.child(),
                        drain: self.shutdown.drain.child(),
                        lost: Signal::default(),
                        give_up_by: Arc::default(),
                    }),
                },
            );
            if let Some(old) = old {
                self.forget_buffered(&old);
                old.stop.drain.cancel();
                old.stop.abandon.cancel();
            }
        }
    }

    pub(super) fn forget_buffered(&mut self, p: &PartitionState) {
        self.buffered_records -= p.queued;
        self.buffered_bytes -= p.queued_bytes;
    }

    /// [`enqueue_shared`](Self::enqueue_shared) for a record not shared yet (tests).
    #[cfg(any(test, kourier_bench))]
    pub(crate) fn enqueue(&mut self, record: RawRecord) -> bool {
        let bytes = record.byte_len();
        self.enqueue_shared(Arc::new(record), bytes)
    }

    /// Buffers a record. Returns `false` when it was dropped: its partition is not assigned
    /// (or is being revoked), the consumer is stopping, or it is a redelivery. The poll
    /// thread puts each record behind its `Arc` where it reads it (it is not moved on).
    /// `bytes` is the record's [`RawRecord::byte_len`] (the poll thread has it already).
    pub(crate) fn enqueue_shared(&mut self, record: Arc<RawRecord>, bytes: usize) -> bool {
        if self.stopping {
            return false;
        }
        // The record's topic name is shared by the records of its topic (`RawRecord::topic`).
        let tp: Tp = (Arc::clone(&record.topic), record.partition);
        let Some(p) = self.partitions.get_mut(&tp) else {
            return false;
        };
        if p.draining || !p.tracker.received(record.offset) {
            return false;
        }
        if let Some(finished) = &p.finished {
            if finished.contains(record.offset) {
                // Finished by the previous owner: settled here without running again.
                p.tracker.settled(record.offset);
                self.skipped_finished += 1;
                return false;
            }
            if finished.last().is_some_and(|last| record.offset > last) {
                p.finished = None;
            }
        }
        let lane_key = match self.ordering {
            ProcessingOrder::Partition => LaneKey::Partition,
            ProcessingOrder::Key => record.key.clone().map_or(LaneKey::NullKey, LaneKey::Key),
            ProcessingOrder::Unordered => LaneKey::Record(record.offset),
        };
        let spare = &mut self.spare_queues;
        let lane = p.lanes.entry(lane_key.clone()).or_insert_with(|| Lane {
            queue: spare.pop().unwrap_or_default(),
            ..Lane::default()
        });
        if lane.blocked {
            // Behind a record given up unsettled: not run now (order), not committed past.
            return false;
        }
        lane.queue.push_back((record, bytes));
        if !lane.running && !lane.in_ready {
            lane.in_ready = true;
            self.ready.push_back((tp, p.generation, lane_key));
        }
        p.queued += 1;
        p.queued_bytes += bytes;
        self.buffered_records += 1;
        self.buffered_bytes += bytes;
        true
    }

    /// Takes every job that may start now.
    pub(crate) fn take_jobs(&mut self) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Some(job) = self.take_one() {
            jobs.push(job);
        }
        if jobs.is_empty()
            && let Some(b) = &self.breaker
        {
            b.nothing_dispatched();
        }
        jobs
    }

    fn take_one(&mut self) -> Option<Job> {
        while self.in_flight < self.limits.max_in_flight {
            // Parked records whose back-off is over and new records take turns (a parked
            // record first: it is older).
            if !self.resuming.is_empty() && (!self.resumed_last || self.ready.is_empty()) {
                if let Some((id, resume)) = self.resuming.pop_front()
                    // Else it ended or took its slot back itself meanwhile.
                    && self.parked.contains(&id)
                    && resume.send(()).is_ok()
                {
                    self.in_flight += 1;
                    self.parked.remove(&id);
                    self.resumed_last = true;
                }
                continue;
            }
            let (tp, generation, lane_key) = self.ready.pop_front()?;
            let Some(p) = self.partitions.get_mut(&tp) else {
                continue;
            };
            if p.generation != generation {
                continue;
            }
            let Some(lane) = p.lanes.get_mut(&lane_key) else {
                continue;
            };
            if lane.running || lane.queue.is_empty() {
                lane.in_ready = false;
                continue;
            }
            let probe_epoch = match self.breaker.as_ref().map(|b| b.dispatch()) {
                None | Some(Dispatch::Go) => None,
                Some(Dispatch::Probe(epoch)) => Some(epoch),
                Some(Dispatch::Held) => {
                    // Held: the lane keeps its place at the front; parked records resume
                    // (the breaker holds them where they wait).
                    self.ready.push_front((tp, generation, lane_key));
                    if !self.resuming.is_empty() {
                        self.resumed_last = false;
                        continue;
                    }
                    self.drop_held_draining();
                    return None;
                }
            };
            lane.in_ready = false;
            let Some((record, bytes)) = lane.queue.pop_front() else {
                continue;
            };
            lane.running = true;
            p.max_started = Some(
                p.max_started
                    .map_or(record.offset, |m| m.max(record.offset)),
            );
            p.queued -= 1;
            p.queued_bytes -= bytes;
            p.in_flight += 1;
            self.buffered_records -= 1;
            self.buffered_bytes -= bytes;
            self.in_flight += 1;
            self.next_job_id += 1;
            self.resumed_last = false;
            // The lane's next records go with it (they stay counted as buffered until they
            // start): not for a probe (one record), nor from a draining partition (its
            // records are being trimmed to gap fillers).
            let mut run = Run::default();
            if self.runs && probe_epoch.is_none() && !p.draining && !lane.queue.is_empty() {
                let n = lane.queue.len().min(RUN_RECORDS - 1);
                run.ahead = lane.queue.drain(..n).collect();
                // Sized here, on the poll thread, which frees it with the job: a vector the
                // worker grew would be freed into another thread's arena, under its lock.
                run.settled = Vec::with_capacity(n);
                run.since = Some(std::time::Instant::now());
            }
            return Some(Job {
                id: self.next_job_id,
                tp,
                generation,
                lane: lane_key,
                record,
                stop: p.stop.clone(),
                probe_epoch,
                run: Mutex::new(run),
            });
        }
        None
    }

    /// The next records queued in `job`'s lane (at most `max`), in offset order: none in
    /// unordered mode (a record is its own lane), for a job of an earlier assignment, or
    /// while its partition drains (its queued records are being dropped).
    pub(crate) fn lane_ahead(&self, job: &Job, max: usize) -> Vec<Arc<RawRecord>> {
        if matches!(job.lane, LaneKey::Record(_)) {
            return Vec::new();
        }
        self.partitions
            .get(&job.tp)
            .filter(|p| p.generation == job.generation && !p.draining)
            .and_then(|p| p.lanes.get(&job.lane))
            .map(|lane| {
                lane.queue
                    .iter()
                    .take(max)
                    .map(|(r, _)| r.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records how a job ended and hands the freed slot's next job to the caller.
    /// Completions from an earlier assignment (revoked since) are ignored.
    pub(crate) fn finish(&mut self, job: &Job, end: JobEnd) -> Option<Job> {
        self.free_slot(job);
        self.report_run(job);
        self.end_job(job, end);
        self.return_run(job);
        self.end_lane(job, end);
        self.take_one()
    }

    /// Tells the scheduler what of `job`'s run happened on the worker since the last
    /// report: the records that started leave the buffer and count in flight, those that
    /// settled become committable.
    pub(crate) fn report_run(&mut self, job: &Job) {
        let mut run = job.run();
        if run.started == 0 && !run.unreported() {
            return;
        }
        let (started, bytes) = (run.started, run.started_bytes);
        run.started = 0;
        run.started_bytes = 0;
        let settled = run.settled.len();
        let from = std::mem::replace(&mut run.reported, settled);
        let Some(p) = job_partition(&mut self.partitions, job) else {
            // Revoked since: its counts went with it.
            return;
        };
        p.queued -= started;
        p.queued_bytes -= bytes;
        p.in_flight += started;
        self.buffered_records -= started;
        self.buffered_bytes -= bytes;
        for record in &run.settled[from..] {
            p.in_flight -= 1;
            p.tracker.settled(record.offset);
            p.max_started = Some(
                p.max_started
                    .map_or(record.offset, |m| m.max(record.offset)),
            );
        }
        p.max_started = Some(
            p.max_started
                .map_or(job.record.offset, |m| m.max(job.record.offset)),
        );
    }

    /// Puts the records of `job`'s run that did not start back at the front of its lane (in
    /// order; still counted as buffered). In a draining partition only gap fillers stay.
    fn return_run(&mut self, job: &Job) {
        let ahead = std::mem::take(&mut job.run().ahead);
        if ahead.is_empty() {
            return;
        }
        let Some(p) = job_partition(&mut self.partitions, job) else {
            return;
        };
        let Some(lane) = p.lanes.get_mut(&job.lane) else {
            unreachable!("a running lane is kept while its job runs");
        };
        for entry in ahead.into_iter().rev() {
            lane.queue.push_front(entry);
        }
        if p.draining {
            self.trim_draining(&job.tp);
        }
    }

    /// Keeps an ended job for the poll thread to drop ([`Scheduler::swap_spent`]): its record
    /// was allocated there, and memory freed on the thread that allocated it stays in that
    /// thread's allocator caches (no lock of another thread's arena per record). Past
    /// [`SPENT_MAX`] the job is handed back, for the caller to drop.
    pub(crate) fn keep_spent(&mut self, mut job: Job) -> Option<Job> {
        // A job keeps the records its run settled: they count.
        let records = 1 + job
            .run
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .settled
            .len();
        if self.spent_records + records > SPENT_MAX {
            return Some(job);
        }
        self.spent_records += records;
        self.spent.push(job);
        None
    }

    /// Swaps the ended jobs kept so far with `spare` (empty, its capacity reused).
    pub(crate) fn swap_spent(&mut self, spare: &mut Vec<Job>) {
        std::mem::swap(&mut self.spent, spare);
        self.spent_records = self.spent.len();
    }

    /// A job stops holding its in-flight slot (one that ends while parked, its task dropped
    /// mid-wait, holds none).
    fn free_slot(&mut self, job: &Job) {
        if !self.parked.remove(&job.id) {
            self.in_flight -= 1;
        }
    }

    /// The job's lane stops running. Settled, the lane may run its next record: readied
    /// when one waits, else dropped (its queue kept for a new lane) unless it is blocked.
    /// Given up unsettled, nothing after it in its lane may run in this assignment (it would
    /// overtake the record): the lane is blocked and its buffered records are dropped (they
    /// are delivered again, in order, with it).
    fn end_lane(&mut self, job: &Job, end: JobEnd) {
        let Some(p) = job_partition(&mut self.partitions, job) else {
            return;
        };
        let Some(lane) = p.lanes.get_mut(&job.lane) else {
            return;
        };
        lane.running = false;
        if end != JobEnd::Settled {
            lane.blocked = true;
            let (records, bytes) = (
                lane.queue.len(),
                lane.queue.iter().map(|(_, b)| *b).sum::<usize>(),
            );
            lane.queue.clear();
            p.queued -= records;
            p.queued_bytes -= bytes;
            self.buffered_records -= records;
            self.buffered_bytes -= bytes;
        } else if lane.queue.is_empty() {
            if !lane.blocked
                && let Some(lane) = p.lanes.remove(&job.lane)
            {
                spare_queue(&mut self.spare_queues, lane.queue);
            }
        } else if !lane.in_ready {
            lane.in_ready = true;
            self.ready
                .push_back((job.tp.clone(), job.generation, job.lane.clone()));
        }
    }

    /// A running record's outcome is decided but not yet settled (its completion is being
    /// written to the idempotency store, or its dead letter awaits the broker's
    /// acknowledgement): its slot is freed and its lane re-readied at once, so the lane's next
    /// record may start, while the partition keeps counting it in flight (a revoke or a
    /// shutdown still waits for it) and its offset stays uncommitted until
    /// [`Scheduler::settle`]. The freed slot's next job is handed to the caller.
    ///
    /// At most [`SETTLING_PER_SLOT`] × `max_in_flight` records settle at once: past that the
    /// release is refused ([`SettlingFull`]) and the job keeps its slot and lane until it ends
    /// (a store or broker slower than the handler slows the lanes down instead of piling up
    /// records waiting to settle).
    pub(crate) fn release_lane(&mut self, job: &Job) -> Result<Option<Job>, SettlingFull> {
        if self.settling >= self.limits.max_in_flight.saturating_mul(SETTLING_PER_SLOT) {
            return Err(SettlingFull);
        }
        self.settling += 1;
        self.report_run(job);
        // Its run goes on with the slot, as a job of its own (unless the run is over).
        if let Some(next) = self.split_run(job) {
            if self.parked.remove(&job.id) {
                // It held no slot (parked): the run's next record takes one.
                self.in_flight += 1;
            }
            return Ok(Some(next));
        }
        self.free_slot(job);
        self.return_run(job);
        // Its outcome is decided: the lane goes on as after a settled record.
        self.end_lane(job, JobEnd::Settled);
        Ok(self.take_one())
    }

    /// The rest of `job`'s run as a job of its own, keeping `job`'s slot and lane: when the
    /// run has records left, is younger than [`RUN_FOR`] and its partition does not drain.
    fn split_run(&mut self, job: &Job) -> Option<Job> {
        let mut run = job.run();
        if run.ahead.is_empty()
            || job.stop.drain.is_cancelled()
            || run.since.is_none_or(|since| since.elapsed() >= RUN_FOR)
        {
            return None;
        }
        let p = job_partition(&mut self.partitions, job)?;
        let (record, bytes) = run.ahead.pop_front()?;
        p.queued -= 1;
        p.queued_bytes -= bytes;
        p.in_flight += 1;
        self.buffered_records -= 1;
        self.buffered_bytes -= bytes;
        self.next_job_id += 1;
        Some(Job {
            id: self.next_job_id,
            tp: job.tp.clone(),
            generation: job.generation,
            lane: job.lane.clone(),
            record,
            stop: job.stop.clone(),
            probe_epoch: None,
            run: Mutex::new(Run {
                ahead: std::mem::take(&mut run.ahead),
                since: run.since,
                ..Run::default()
            }),
        })
    }

    /// Ends a job whose lane was released by [`Scheduler::release_lane`]: its offset becomes
    /// committable when `end` is [`JobEnd::Settled`]; given up, it holds its partition's
    /// commit point for the rest of the assignment (it is delivered again). Hands out no job:
    /// the slot was freed already.
    pub(crate) fn settle(&mut self, job: &Job, end: JobEnd) {
        self.settling -= 1;
        self.report_run(job);
        self.end_job(job, end);
    }

    /// What ends every job, finished or settled: its partition counts it out of flight, its
    /// offset becomes committable when it settled, a stop notes it when given up, and a
    /// breaker probe it was dispatched for but never took is free again.
    fn end_job(&mut self, job: &Job, end: JobEnd) {
        if let (Some(epoch), Some(b)) = (job.probe_epoch, &self.breaker) {
            b.dispatched_probe_ended(epoch);
        }
        match end {
            JobEnd::Abandoned if self.stopping => self.note_abandoned(job),
            JobEnd::LeftForLater if self.stopping => self.left_for_later_at_stop += 1,
            _ => {}
        }
        if let Some(p) = job_partition(&mut self.partitions, job) {
            p.in_flight -= 1;
            match end {
                JobEnd::Settled => {
                    p.tracker.settled(job.record.offset);
                }
                // Outside a drain only a panic that escaped the worker gives a record up:
                // its lane stays blocked and the commit point cannot pass it, so the
                // partition is reset to its commit point (delivery rule 14).
                JobEnd::Abandoned | JobEnd::LeftForLater
                    if !p.draining && !self.stopping && !self.resets.contains(&job.tp) =>
                {
                    self.resets.push(job.tp.clone());
                }
                _ => {}
            }
        }
    }

    /// A running record starts waiting out a retry back-off: it gives its slot up (its lane
    /// stays taken, so nothing of its key or partition overtakes it) and the freed slot's next
    /// job is handed to the caller, to run on a new worker.
    pub(crate) fn park(&mut self, job: &Job) -> Option<Job> {
        // What ran of its run before it is told now, not after the back-off.
        self.report_run(job);
        if self.parked.insert(job.id) {
            self.in_flight -= 1;
        }
        self.take_one()
    }

    /// A parked record's back-off is over: it takes a slot if one is free and no parked
    /// record waits before it (`Ok`), else it waits for the receiver, which fires when a
    /// slot is handed to it.
    pub(crate) fn resume(&mut self, job: u64) -> Result<(), oneshot::Receiver<()>> {
        if !self.parked.contains(&job) {
            return Ok(());
        }
        if self.in_flight < self.limits.max_in_flight && self.resuming.is_empty() {
            self.in_flight += 1;
            self.parked.remove(&job);
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.resuming.push_back((job, tx));
        Err(rx)
    }

    /// A parked record is being given up (revoke, shutdown) while it waits: it takes its slot
    /// back at once, over the limit if need be, so that its end is counted like any other
    /// job's. Nothing happens if a slot was handed to it already.
    pub(crate) fn resume_now(&mut self, job: u64) {
        if self.parked.remove(&job) {
            self.in_flight += 1;
        }
    }

    /// Records still running for `tps`.
    #[cfg(test)]
    fn in_flight_of(&self, tps: &[Tp]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .map(|p| p.in_flight)
            .sum()
    }

    /// Whether `job` belongs to its partition's current assignment (a late completion of a
    /// revoked one is ignored).
    pub(crate) fn is_current(&self, job: &Job) -> bool {
        self.partitions
            .get(&job.tp)
            .is_some_and(|p| p.generation == job.generation)
    }

    /// What to commit: each partition whose commit point moved since it was last committed,
    /// or (with commit metadata) whose finished records above it changed.
    pub(crate) fn commits_due(&mut self) -> Vec<(Tp, i64)> {
        let metadata = self.commit_metadata;
        self.partitions
            .iter_mut()
            .filter_map(|(tp, p)| {
                let point = commit_point(p, metadata)?;
                p.offered_settles = p.tracker.settles();
                Some((tp.clone(), point))
            })
            .collect()
    }

    /// The metadata of a commit of `offset` for `tp`: the finished offsets above it (see
    /// [`Finished`]); `None` without any, or with commit metadata off.
    pub(crate) fn commit_metadata(&self, tp: &Tp, offset: i64) -> Option<String> {
        if !self.commit_metadata {
            return None;
        }
        let p = self.partitions.get(tp)?;
        super::finished::encode(offset, p.tracker.finished_ranges(offset))
    }

    /// Whether commits carry metadata.
    pub(crate) fn commit_metadata_on(&self) -> bool {
        self.commit_metadata
    }

    /// Turns commit metadata off (`false`): the broker refused it, or it was not wanted.
    pub(crate) fn set_commit_metadata(&mut self, on: bool) {
        self.commit_metadata = on;
    }

    /// Offsets of `tp` a previous owner finished above its commit point (read from the
    /// committed metadata at assignment): they are skipped when they arrive.
    pub(crate) fn set_finished(&mut self, tp: &Tp, finished: Finished) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.finished = Some(finished);
        }
    }

    /// Records skipped because a previous owner had finished them, so far.
    pub(crate) fn skipped_finished(&self) -> u64 {
        self.skipped_finished
    }

    /// Notes a successful commit.
    pub(crate) fn committed(&mut self, offsets: &[(Tp, i64)]) {
        for (tp, offset) in offsets {
            if let Some(p) = self.partitions.get_mut(tp)
                && p.committed.is_none_or(|done| *offset >= done)
            {
                p.committed = Some(*offset);
                p.committed_settles = p.offered_settles;
            }
        }
    }

    /// The offset last committed for `tp` in its current assignment.
    pub(crate) fn committed_of(&self, tp: &Tp) -> Option<i64> {
        self.partitions.get(tp).and_then(|p| p.committed)
    }

    /// Whether every assigned partition's settled records are committed and none is
    /// unsettled.
    pub(crate) fn all_committed(&self) -> bool {
        self.partitions.values().all(|p| {
            p.tracker.unsettled() == 0
                && p.tracker
                    .committable()
                    .is_none_or(|c| p.committed.is_some_and(|done| done >= c))
        })
    }

    /// Records a worker holds now: running, parked in a retry back-off, or settling (lane
    /// released, end still being written).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight + self.parked.len() + self.settling
    }

    /// Of [`Scheduler::in_flight`], the records waiting out a retry back-off without a slot.
    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Records buffered (received, not started).
    pub(crate) fn buffered(&self) -> (usize, usize) {
        (self.buffered_records, self.buffered_bytes)
    }

    /// Partitions currently assigned (and not being revoked).
    pub(crate) fn assigned(&self) -> Vec<Tp> {
        self.partitions
            .iter()
            .filter(|(_, p)| !p.draining || self.stopping)
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// For lag reporting: `None` when `tp` is not assigned (or is being revoked), else the
    /// first offset received from it in this assignment, if any.
    pub(crate) fn first_received(&self, tp: &Tp) -> Option<Option<i64>> {
        self.partitions
            .get(tp)
            .filter(|p| !p.draining)
            .map(|p| p.tracker.first_received())
    }

    /// Whether the partition is tracked with this generation.
    #[cfg(test)]
    fn unsettled_of(&self, tp: &Tp) -> usize {
        self.partitions.get(tp).map_or(0, |p| p.tracker.unsettled())
    }
}

#[cfg(test)]
mod tests {
    use super::ProcessingOrder::{Key, Partition, Unordered};
    use super::*;
    use crate::record::Headers;

    fn tp(p: i32) -> Tp {
        (Arc::from("t"), p)
    }

    fn rec(p: i32, offset: i64, key: Option<&str>) -> RawRecord {
        RawRecord {
            topic: "t".into(),
            partition: p,
            offset,
            key: key.map(RecordBytes::from),
            value: Some(vec![0; 10].into()),
            headers: Headers::new(),
            timestamp: None,
            log_append_time: false,
        }
    }

    fn limits(max_in_flight: usize) -> Limits {
        Limits {
            max_in_flight,
            max_buffered_records: 100,
            max_buffered_bytes: 1 << 20,
            max_buffered_records_per_partition: 20,
            max_uncommitted_per_partition: 1_000,
        }
    }

    /// One slot and a buffer of ten records (a partition alone is never paused below 100).
    fn small_buffer() -> Limits {
        Limits {
            max_buffered_records: 10,
            max_buffered_records_per_partition: 100,
            ..limits(1)
        }
    }

    /// A scheduler in `order` with `limits`, over `partitions` of topic `t`, holding
    /// `records` (partition, offset, key), enqueued in that order.
    fn holding(
        order: ProcessingOrder,
        limits: Limits,
        partitions: &[i32],
        records: impl IntoIterator<Item = (i32, i64, Option<&'static str>)>,
    ) -> Scheduler {
        let mut s = Scheduler::new(order, limits);
        s.assign(partitions.iter().map(|p| tp(*p)));
        for (p, offset, key) in records {
            s.enqueue(rec(p, offset, key));
        }
        s
    }

    /// Records of partition 0 with `keys`, at offsets 0, 1, ...
    fn keyed(keys: &[&'static str]) -> Vec<(i32, i64, Option<&'static str>)> {
        (0..).zip(keys).map(|(o, k)| (0, o, Some(*k))).collect()
    }

    fn offsets(jobs: &[Job]) -> Vec<(i32, i64)> {
        jobs.iter()
            .map(|j| (j.record.partition, j.record.offset))
            .collect()
    }

    #[test]
    fn partition_mode_runs_one_record_per_partition_in_order() {
        let records = (0..3).flat_map(|o| [(0, o, Some("a")), (1, o, Some("b"))]);
        let mut s = holding(Partition, limits(10), &[0, 1], records);
        let jobs = s.take_jobs();
        let mut started = offsets(&jobs);
        started.sort();
        assert_eq!(started, [(0, 0), (1, 0)]);
        let j0 = jobs.into_iter().find(|j| j.record.partition == 0).unwrap();
        let next = s.finish(&j0, JobEnd::Settled).unwrap();
        assert_eq!((next.record.partition, next.record.offset), (0, 1));
        assert_eq!(s.commits_due(), vec![(tp(0), 1)]);
    }

    #[test]
    fn key_mode_overlaps_keys_and_serialises_each_key() {
        let keys = [Some("a"), Some("b"), Some("a"), None, None];
        let records = (0..).zip(keys).map(|(o, k)| (0, o, k));
        let mut s = holding(Key, limits(10), &[0], records);
        let jobs = s.take_jobs();
        assert_eq!(offsets(&jobs), [(0, 0), (0, 1), (0, 3)]);
        // b finishes first: out-of-order settle does not move the watermark.
        let b = &jobs[1];
        assert!(s.finish(b, JobEnd::Settled).is_none());
        assert_eq!(s.commits_due(), vec![]);
        let next = s.finish(&jobs[0], JobEnd::Settled).unwrap();
        assert_eq!(
            next.record.offset, 2,
            "a's next record runs after a's first"
        );
        assert_eq!(s.commits_due(), vec![(tp(0), 2)]);
        let next = s.finish(&jobs[2], JobEnd::Settled).unwrap();
        assert_eq!(next.record.offset, 4, "null keys run in partition order");
    }

    #[test]
    fn max_in_flight_bounds_every_mode() {
        let records = (0..10).map(|o| (0, o, None));
        let mut s = holding(Unordered, limits(3), &[0], records);
        let jobs = s.take_jobs();
        assert_eq!(jobs.len(), 3);
        assert_eq!(s.in_flight(), 3);
        let next = s.finish(&jobs[1], JobEnd::Settled).unwrap();
        assert_eq!(next.record.offset, 3);
        assert_eq!(s.in_flight(), 3);
        assert_eq!(s.commits_due(), vec![], "offset 0 is still running");
    }

    #[test]
    fn a_parked_record_frees_its_slot_but_keeps_its_lane() {
        let mut s = holding(Key, limits(1), &[0], keyed(&["a", "a", "b", "c"]));
        let a0 = s.take_jobs().pop().unwrap();
        assert_eq!(a0.record.offset, 0);
        // a@0 waits out a back-off: its slot goes to b@2, not to a@1 (its lane is taken).
        let b2 = s.park(&a0).expect("the freed slot runs the next lane");
        assert_eq!(b2.record.offset, 2);
        assert_eq!(s.in_flight(), 2, "the parked record still counts as held");
        assert_eq!(s.parked(), 1);
        // Its back-off ends while b@2 holds the only slot: it waits for it.
        let mut handed = s.resume(a0.id).expect_err("no slot is free");
        // b@2 ends: the slot goes to the parked record before c@3.
        assert!(s.finish(&b2, JobEnd::Settled).is_none());
        assert!(handed.try_recv().is_ok(), "the slot was handed over");
        assert_eq!((s.in_flight(), s.parked()), (1, 0));
        // a@0 ends: a@1 may run now (a@1 and c@3 are both ready; one slot).
        let next = s.finish(&a0, JobEnd::Settled).unwrap();
        assert_eq!(next.record.offset, 3, "c@3 was ready before a@1");
        assert_eq!(s.commits_due(), vec![(tp(0), 1)]);
    }

    #[test]
    fn commits_carry_what_finished_above_a_stuck_record_and_its_next_owner_skips_it() {
        let mut s = holding(Key, limits(10), &[0], keyed(&["a", "b", "c", "d", "e"]))
            .with_commit_metadata(true);
        let jobs = s.take_jobs();
        // a@0 is stuck; b..e finish.
        for j in &jobs[1..] {
            assert!(s.finish(j, JobEnd::Settled).is_none());
        }
        let offered = s.commits_due();
        assert_eq!(
            offered,
            [(tp(0), 0)],
            "the commit point stays, with news above it"
        );
        assert_eq!(s.commit_metadata(&tp(0), 0).as_deref(), Some("k1:0:1.4"));
        s.committed(&offered);
        assert!(s.commits_due().is_empty(), "nothing new since");
        // At the revoke, the same: the commit point and what finished above it.
        assert_eq!(s.remove(&[tp(0)]), []);
        // A new owner reads it back and skips 1..=4; 0 and 5 run.
        let mut next = Scheduler::new(Key, limits(10)).with_commit_metadata(true);
        next.assign([tp(0)]);
        next.set_finished(
            &tp(0),
            crate::consumer::schedule::decode_finished("k1:0:1.4", 0).unwrap(),
        );
        for (offset, key) in [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e"), (5, "f")] {
            next.enqueue(rec(0, offset, Some(key)));
        }
        assert_eq!(offsets(&next.take_jobs()), [(0, 0), (0, 5)]);
        assert_eq!(next.skipped_finished(), 4);
        // Without metadata (the setting off), nothing is offered while a@0 is stuck.
        let mut off = holding(Key, limits(10), &[0], keyed(&["a", "b"]));
        let jobs = off.take_jobs();
        assert!(off.finish(&jobs[1], JobEnd::Settled).is_none());
        assert!(off.commits_due().is_empty());
        assert_eq!(off.commit_metadata(&tp(0), 0), None);
    }

    #[test]
    fn retries_and_first_attempts_take_turns_for_freed_slots() {
        let mut s = holding(Key, limits(3), &[0], keyed(&["a", "b", "c", "d", "e", "f"]));
        let jobs = s.take_jobs();
        // a, b, c wait out back-offs: their slots go to d, e, f; then their back-offs end
        // while new records of other keys arrive.
        let mut new = Vec::new();
        for j in &jobs {
            new.push(s.park(j).expect("the freed slot runs a new lane"));
        }
        let mut handed: Vec<_> = jobs
            .iter()
            .map(|j| s.resume(j.id).expect_err("full"))
            .collect();
        for (offset, key) in [(6, "g"), (7, "h"), (8, "i")] {
            assert!(s.enqueue(rec(0, offset, Some(key))));
        }
        // Each freed slot goes, in turn, to a retry and to a first attempt.
        let mut order = Vec::new();
        for done in new {
            match s.finish(&done, JobEnd::Settled) {
                Some(job) => order.push(format!("new {}", job.record.offset)),
                None => order.push("retry".to_owned()),
            }
        }
        assert_eq!(order, ["retry", "new 6", "retry"], "{order:?}");
        let resumed = handed.iter_mut().map(|h| h.try_recv().is_ok());
        assert_eq!(
            resumed.collect::<Vec<_>>(),
            [true, true, false],
            "first come first served"
        );
    }

    #[test]
    fn a_parked_record_given_up_takes_its_slot_back_once() {
        let records = [(0, 0, None), (1, 0, None)];
        let mut s = holding(Partition, limits(1), &[0, 1], records);
        let p0 = s.take_jobs().pop().unwrap();
        let p1 = s.park(&p0).unwrap();
        let _handed = s.resume(p0.id).expect_err("p1 holds the slot");
        // Given up while waiting: it takes the slot back over the limit, and its place in
        // the queue is skipped when a slot frees.
        s.resume_now(p0.id);
        s.resume_now(p0.id);
        assert_eq!((s.in_flight(), s.parked()), (2, 0), "taken back once");
        assert!(s.finish(&p0, JobEnd::Abandoned).is_none());
        assert!(s.finish(&p1, JobEnd::Settled).is_none());
        assert_eq!((s.in_flight(), s.parked()), (0, 0));
        // Given up before asking for a slot.
        s.enqueue(rec(1, 1, None));
        let j = s.take_jobs().pop().unwrap();
        assert!(s.park(&j).is_none());
        s.resume_now(j.id);
        assert_eq!((s.in_flight(), s.parked()), (1, 0));
        assert!(s.finish(&j, JobEnd::Settled).is_none());
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn a_job_that_ends_while_parked_frees_no_slot_it_does_not_hold() {
        let mut s = holding(Key, limits(2), &[0], keyed(&["a", "b", "c"]));
        let jobs = s.take_jobs();
        let (a, b) = (&jobs[0], &jobs[1]);
        let c = s.park(a).expect("c takes a's slot");
        let _waiting = s.resume(a.id).expect_err("b and c hold both slots");
        // a's task is dropped while it waits (the runtime shuts down): its end counts no slot.
        assert!(s.finish(a, JobEnd::Abandoned).is_none());
        assert_eq!((s.in_flight(), s.parked()), (2, 0));
        // Its place in the resume queue is skipped: b's slot is free for new records.
        assert!(s.finish(b, JobEnd::Settled).is_none());
        assert!(s.finish(&c, JobEnd::Settled).is_none());
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn a_released_lane_runs_its_next_record_but_the_commit_point_waits_for_the_settle() {
        let records = (0..3).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(1), &[0], records);
        let j0 = s.take_jobs().pop().unwrap();
        // j0's handler succeeded; its completion is still being written.
        let j1 = s
            .release_lane(&j0)
            .unwrap()
            .expect("the freed slot and lane take the next record");
        assert_eq!(j1.record.offset, 1);
        assert_eq!(s.in_flight(), 2, "the settling record still counts");
        assert!(s.finish(&j1, JobEnd::Settled).is_some());
        assert_eq!(
            s.commits_due(),
            vec![],
            "offset 1 settled, but 0 holds the commit point"
        );
        s.begin_revoke(&[tp(0)]);
        assert!(
            !s.drained(&[tp(0)]),
            "a revoke waits for the settling record"
        );
        s.settle(&j0, JobEnd::Settled);
        assert_eq!(s.commits_due(), vec![(tp(0), 2)]);
    }

    /// Records settling are bounded: with one slot, four may settle at once; the fifth keeps
    /// its slot and lane (refused, nothing changed) until one of them settles.
    #[test]
    fn at_most_four_records_per_slot_settle_at_once() {
        let records = (0..6).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(1), &[0], records);
        let mut job = s.take_jobs().pop().unwrap();
        let mut settling = Vec::new();
        for offset in 1..=4 {
            let next = s.release_lane(&job).unwrap().unwrap();
            assert_eq!(next.record.offset, offset);
            settling.push(std::mem::replace(&mut job, next));
        }
        assert_eq!(job.record.offset, 4);
        assert!(matches!(s.release_lane(&job), Err(SettlingFull)));
        assert_eq!(
            s.in_flight(),
            5,
            "four settling and the one that keeps its slot"
        );
        assert!(
            s.take_jobs().is_empty(),
            "the refused record still holds the slot and the lane"
        );
        s.settle(&settling.remove(0), JobEnd::Settled);
        let next = s.release_lane(&job).unwrap().unwrap();
        assert_eq!(next.record.offset, 5);
        assert_eq!(s.commits_due(), vec![(tp(0), 1)]);
    }

    /// At most `SPENT_MAX` ended jobs wait for the poll thread; past it the job is handed
    /// back to its worker.
    #[test]
    fn ended_jobs_kept_for_the_poll_thread_are_bounded() {
        let records = (0..2).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(1), &[0], records);
        let job = s.take_jobs().pop().unwrap();
        let next = s.finish(&job, JobEnd::Settled).unwrap();
        s.spent = (0..SPENT_MAX)
            .map(|id| Job {
                id: id as u64,
                tp: next.tp.clone(),
                generation: next.generation,
                lane: LaneKey::Partition,
                record: next.record.clone(),
                stop: next.stop.clone(),
                probe_epoch: None,
                run: Mutex::default(),
            })
            .collect();
        s.spent_records = SPENT_MAX;
        assert!(s.keep_spent(job).is_some(), "full: handed back");
        let mut spent = Vec::new();
        s.swap_spent(&mut spent);
        assert_eq!(spent.len(), SPENT_MAX);
        assert!(s.keep_spent(next).is_none(), "room again");
    }

    /// A job that ran a run holds the records it settled: they count toward `SPENT_MAX`.
    #[test]
    fn ended_jobs_count_the_records_their_run_settled() {
        let records = (0..4).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(1), &[0], records);
        let mut job = s.take_jobs().pop().unwrap();
        assert!(job.advance() && job.advance() && job.advance());
        assert!(s.finish(&job, JobEnd::Settled).is_none());
        s.spent_records = SPENT_MAX - 3;
        assert!(s.keep_spent(job).is_some(), "4 records do not fit in 3");
    }

    /// The poll thread frees an ended job's records one by one: its own, those its run
    /// settled and those left ahead, each once.
    #[test]
    fn an_ended_job_hands_over_every_record_it_holds() {
        let records = (0..5).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(1), &[0], records);
        let mut job = s.take_jobs().pop().unwrap();
        assert!(job.advance() && job.advance());
        let offsets: Vec<i64> = job.into_records().map(|r| r.offset).collect();
        assert_eq!(offsets, [2, 0, 1, 3, 4]);
    }

    #[test]
    fn a_released_record_given_up_holds_the_commit_point_and_is_reported_at_stop() {
        let records = [(0, 0, None), (0, 1, None)];
        let mut s = holding(Partition, limits(10), &[0], records);
        let j0 = s.take_jobs().pop().unwrap();
        let j1 = s.release_lane(&j0).unwrap().unwrap();
        assert!(s.finish(&j1, JobEnd::Settled).is_none());
        s.begin_stop();
        assert_eq!(s.in_flight(), 1);
        s.settle(&j0, JobEnd::Abandoned);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(
            s.commits_due(),
            vec![],
            "nothing is committed past the given-up record"
        );
        assert_eq!(s.abandoned_at_stop(), (1, vec![j0.record.coordinates()]));
    }

    #[test]
    fn abandoned_records_are_not_committed() {
        let mut s = holding(Partition, limits(10), &[0], [(0, 0, None)]);
        let j = s.take_jobs().pop().unwrap();
        s.finish(&j, JobEnd::Abandoned);
        assert_eq!(s.commits_due(), vec![]);
        assert_eq!(s.unsettled_of(&tp(0)), 1);
    }

    #[test]
    fn a_lost_assignment_tells_only_its_partitions_workers() {
        let records = [(0, 0, None), (1, 0, None)];
        let mut s = holding(Partition, limits(10), &[0, 1], records);
        let jobs = s.take_jobs();
        let job = |p: i32| jobs.iter().find(|j| j.tp == tp(p)).unwrap();
        s.begin_revoke(&[tp(0), tp(1)]);
        assert!(
            !job(0).stop.lost.is_cancelled(),
            "a revoke alone is not a loss"
        );
        s.lose(&[tp(0)]);
        assert!(job(0).stop.lost.is_cancelled());
        assert!(!job(1).stop.lost.is_cancelled());
        assert!(
            !job(0).stop.abandon.is_cancelled(),
            "the record may still finish within the revoke timeout"
        );
    }

    #[test]
    fn revoke_drops_buffered_and_ignores_late_completions() {
        let records = (0..5).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(10), &[0], records);
        let j = s.take_jobs().pop().unwrap();
        s.begin_revoke(&[tp(0)]);
        assert!(!j.stop.abandon.is_cancelled(), "running records may finish");
        assert!(
            j.stop.drain.is_cancelled(),
            "a back-off wait is given up at once"
        );
        assert!(!s.drained(&[tp(0)]));
        s.cancel(&[tp(0)]);
        assert!(j.stop.abandon.is_cancelled());
        assert_eq!(s.in_flight_of(&[tp(0)]), 1);
        assert!(
            !s.enqueue(rec(0, 5, None)),
            "no records for a revoking partition"
        );
        assert!(s.finish(&j, JobEnd::Settled).is_none());
        assert_eq!(
            s.buffered().0,
            0,
            "records after the last started one are dropped (those of its run with it)"
        );
        assert_eq!(s.in_flight_of(&[tp(0)]), 0);
        assert!(s.drained(&[tp(0)]));
        assert_eq!(s.remove(&[tp(0)]), vec![((tp(0), 1), None)]);
        // Reassigned: a late completion of the old generation changes nothing.
        s.assign([tp(0)]);
        s.enqueue(rec(0, 1, None));
        let fresh = s.take_jobs().pop().unwrap();
        let stale = Job {
            id: u64::MAX,
            tp: tp(0),
            generation: j.generation,
            lane: LaneKey::Partition,
            record: Arc::new(rec(0, 1, None)),
            stop: Arc::default(),
            probe_epoch: None,
            run: Mutex::default(),
        };
        s.in_flight += 1; // the stale job held a slot
        s.finish(&stale, JobEnd::Settled);
        assert_eq!(s.commits_due(), vec![]);
        s.finish(&fresh, JobEnd::Settled);
        assert_eq!(s.commits_due(), vec![(tp(0), 2)]);
    }

    #[test]
    fn flow_control_pauses_full_partitions_and_resumes_below_half() {
        let records = (0..25).map(|o| (0, o, None)).chain([(1, 0, None)]);
        let mut s = holding(Partition, limits(1), &[0, 1], records);
        s.pause_grace = Duration::from_millis(50);
        let first = s.take_jobs();
        assert_eq!(first.len(), 1);
        // Over its limit for less than the grace period: not paused (a fast partition's
        // fetch response overshoots the limit and drains in milliseconds).
        assert!(s.flow_control().pause.is_empty());
        std::thread::sleep(Duration::from_millis(60));
        let changes = s.flow_control();
        assert_eq!(
            changes.pause,
            vec![tp(0)],
            "only the partition over its limit"
        );
        assert_eq!(s.paused(), vec![tp(0)]);
        // Drain partition 0 below half its limit.
        let mut job = first.into_iter().next();
        while let Some(j) = job {
            if s.buffered().0 <= 9 {
                s.finish(&j, JobEnd::Settled);
                break;
            }
            job = s.finish(&j, JobEnd::Settled);
        }
        assert_eq!(s.flow_control().resume, vec![tp(0)]);
    }

    /// A record holding the commit point pauses its partition once the records past it have
    /// held `max_uncommitted_per_partition` for the grace without a break, or at once at
    /// twice that; a hold that ends within the grace does not, and the next one starts its
    /// grace anew.
    #[test]
    fn the_uncommitted_limit_pauses_after_the_grace_or_at_twice_the_limit() {
        let limits = Limits {
            max_uncommitted_per_partition: 4,
            ..limits(20)
        };
        let mut s = holding(Key, limits, &[0, 1], keyed(&["held", "a", "b", "c"]));
        s.pause_grace = Duration::from_millis(50);
        let jobs = s.take_jobs();
        assert_eq!(jobs.len(), 4);
        for job in &jobs[1..] {
            assert!(s.finish(job, JobEnd::Settled).is_none());
        }
        // 4 past the commit point (offset 0 holds it): at the limit, under twice it.
        assert!(s.flow_control().pause.is_empty(), "not at once");
        std::thread::sleep(Duration::from_millis(60));
        // The holder settles within the grace: the hold ends, nothing pauses.
        assert!(s.finish(&jobs[0], JobEnd::Settled).is_none());
        assert!(s.flow_control().pause.is_empty());
        // A new hold starts its grace anew.
        for (offset, key) in (4..).zip(["held2", "d", "e", "f"]) {
            s.enqueue(rec(0, offset, Some(key)));
        }
        let jobs = s.take_jobs();
        for job in &jobs[1..] {
            assert!(s.finish(job, JobEnd::Settled).is_none());
        }
        assert!(s.flow_control().pause.is_empty(), "the grace starts anew");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.flow_control().pause, vec![tp(0)], "held for the grace");
        assert!(s.finish(&jobs[0], JobEnd::Settled).is_none());
        assert_eq!(s.flow_control().resume, vec![tp(0)]);
        // Twice the limit past the commit point: paused at once.
        for (offset, key) in (8..).zip(["held3", "g", "h", "i", "j", "k", "l", "m"]) {
            s.enqueue(rec(0, offset, Some(key)));
        }
        let _jobs = s.take_jobs();
        assert_eq!(s.flow_control().pause, vec![tp(0)], "at twice the limit");
    }

    /// Records still buffered are not work run ahead of the commit point: a full buffer
    /// behind a running record does not pause its partition for the uncommitted limit.
    #[test]
    fn buffered_records_do_not_count_toward_the_uncommitted_limit() {
        let limits = Limits {
            max_uncommitted_per_partition: 4,
            ..limits(1)
        };
        let records = (0..10).map(|o| (0, o, None));
        let mut s = holding(Partition, limits, &[0], records);
        let running = s.take_jobs();
        assert_eq!((running.len(), s.buffered().0), (1, 9));
        assert!(
            s.flow_control().pause.is_empty(),
            "one started, nine buffered"
        );
    }

    #[test]
    fn room_counts_down_to_zero_and_refills_in_batches() {
        let mut s = holding(Partition, small_buffer(), &[0], []);
        assert_eq!(s.room(), 10);
        assert_eq!(
            s.batch_room(500),
            5,
            "half the buffer when a poll batch is larger"
        );
        assert_eq!(s.batch_room(3), 3);
        for o in 0..12 {
            s.enqueue(rec(0, o, None));
        }
        assert_eq!(s.room(), 0, "over the limit: no room, never negative");
        let running = s.take_jobs();
        assert_eq!((running.len(), s.room()), (1, 0));
    }

    #[test]
    fn global_limit_pauses_every_partition_holding_records() {
        let records = (0..6).flat_map(|o| [(0, o, None), (1, o, None)]);
        let mut s = holding(Partition, small_buffer(), &[0, 1, 2], records);
        let _running = s.take_jobs();
        let mut paused = s.flow_control().pause;
        paused.sort();
        assert_eq!(paused, vec![tp(0), tp(1)], "partition 2 holds nothing");
    }

    #[test]
    fn draining_still_runs_gap_fillers_so_handled_records_become_committable() {
        let mut s = holding(Key, limits(10), &[0], keyed(&["a", "a", "b", "b"]));
        let jobs = s.take_jobs();
        assert_eq!(offsets(&jobs), [(0, 0), (0, 2)]);
        let next_b = s.finish(&jobs[1], JobEnd::Settled).unwrap();
        assert_eq!(next_b.record.offset, 3);
        s.begin_stop();
        // Offset 1 lies below started offsets: it must run, or 2 and 3 would be handled
        // again after a restart. Nothing above 3 is buffered, so nothing is dropped.
        assert_eq!(s.buffered().0, 1);
        let gap = s.finish(&jobs[0], JobEnd::Settled).unwrap();
        assert_eq!(gap.record.offset, 1);
        assert!(s.finish(&next_b, JobEnd::Settled).is_none());
        assert!(s.finish(&gap, JobEnd::Settled).is_none());
        assert_eq!(s.commits_due(), vec![(tp(0), 4)]);
        assert_eq!((s.in_flight(), s.buffered().0), (0, 0));
    }

    /// A record given up outside a revoke or a stop (only an escaped panic does that) would
    /// block its lane and the commit point for the rest of the assignment: its partition is
    /// handed to the poll thread for a reset to its first unsettled offset. Given up during a
    /// drain, nothing is reset (the next owner reads from the commit point anyway).
    #[test]
    fn a_record_given_up_outside_a_drain_asks_for_a_reset_of_its_partition() {
        let mut s = holding(Key, limits(10), &[0, 1], keyed(&["a", "b", "a"]));
        let jobs = s.take_jobs();
        assert_eq!(offsets(&jobs), [(0, 0), (0, 1)]);
        s.finish(&jobs[1], JobEnd::Settled);
        s.finish(&jobs[0], JobEnd::Abandoned);
        assert_eq!(s.take_resets(), vec![tp(0)]);
        assert!(s.take_resets().is_empty(), "taken once");
        // Offset 0 is the first unsettled one: everything from there comes again.
        assert_eq!(s.restart_points(&[tp(0), tp(1)]), vec![(tp(0), 0)]);

        s.enqueue(rec(1, 5, Some("c")));
        let j = s.take_jobs().pop().unwrap();
        s.begin_revoke(&[tp(1)]);
        s.finish(&j, JobEnd::Abandoned);
        assert!(
            s.take_resets().is_empty(),
            "given up during a revoke: no reset"
        );
    }

    /// A tier record only waiting for its due time when the consumer stops is left for
    /// later: counted apart, not as abandoned (a normal stop stays clean).
    #[test]
    fn a_record_left_for_later_at_a_stop_is_not_abandoned() {
        let mut s = holding(Partition, limits(10), &[0], [(0, 0, None)]);
        let j = s.take_jobs().pop().unwrap();
        s.begin_stop();
        s.finish(&j, JobEnd::LeftForLater);
        assert_eq!(s.abandoned_at_stop(), (0, vec![]));
        assert_eq!(s.left_for_later_at_stop(), 1);
        assert!(s.commits_due().is_empty(), "not settled: delivered again");
    }

    #[test]
    fn stop_drops_buffered_and_dispatches_nothing() {
        let records = [(0, 0, None), (0, 1, None)];
        let mut s = holding(Partition, limits(10), &[0], records);
        let j = s.take_jobs().pop().unwrap();
        s.begin_stop();
        assert!(s.finish(&j, JobEnd::Settled).is_none());
        assert!(!s.enqueue(rec(0, 2, None)));
        assert_eq!(s.commits_due(), vec![(tp(0), 1)]);
        assert_eq!(s.flow_control().pause, vec![tp(0)]);
    }

    #[test]
    fn an_abandoned_record_blocks_its_lane_so_nothing_overtakes_it() {
        let mut s = holding(Key, limits(10), &[0], keyed(&["a", "a", "b"]));
        let jobs = s.take_jobs();
        assert_eq!(offsets(&jobs), [(0, 0), (0, 2)]);
        // a@0 is given up (its partition drains while it waits out a back-off): a@1 must not
        // run before it is delivered again.
        assert!(
            s.finish(&jobs[0], JobEnd::Abandoned).is_none(),
            "a@1 is not dispatched"
        );
        assert_eq!(
            s.buffered(),
            (0, 0),
            "a@1 is dropped, to be delivered again"
        );
        assert!(
            !s.enqueue(rec(0, 3, Some("a"))),
            "later records of a wait too"
        );
        assert!(s.enqueue(rec(0, 4, Some("b"))), "other keys go on");
        let next_b = s.finish(&jobs[1], JobEnd::Settled).unwrap();
        assert_eq!(next_b.record.offset, 4);
        s.finish(&next_b, JobEnd::Settled);
        assert_eq!(s.commits_due(), vec![], "nothing is committed past a@0");
    }

    /// Records b@1 and a@0 fail transiently: enough for a breaker to open.
    async fn two_records_fail(gate: &crate::consumer::breaker::OutageGate) {
        use crate::consumer::breaker::ProbeMemo;
        for caller in [1, 0] {
            let pass = gate
                .admit(&Stop::default(), ProbeMemo::default(), caller)
                .await
                .unwrap();
            let _ = pass.failed(
                &crate::handler::HandlerError::transient("refused"),
                0,
                &mut ProbeMemo::default(),
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_holds_dispatch_lets_one_probe_through_and_drops_held_gap_fillers() {
        use crate::consumer::breaker::{Breaker, BreakerPolicy, OutageGate, ProbeMemo};
        use std::time::Duration;

        let breaker = Arc::new(Breaker::new(
            BreakerPolicy::default()
                .with_consecutive_failures(1)
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(1)),
            Arc::new(crate::metrics::ConsumerMetrics::new("g", &["t".to_owned()])),
        ));
        let mut s =
            Scheduler::new(ProcessingOrder::Key, limits(10)).with_breaker(Some(breaker.clone()));
        s.assign([tp(0)]);
        for (o, k) in [(0, "a"), (1, "b"), (2, "c"), (3, "a")] {
            s.enqueue(rec(0, o, Some(k)));
        }
        let first = s.take_jobs();
        assert_eq!(offsets(&first), [(0, 0), (0, 1), (0, 2)]);
        // b@1 and a@0 fail: the breaker opens. Nothing new starts, whoever asks.
        let gate = OutageGate(Some(breaker.clone()));
        two_records_fail(&gate).await;
        assert!(
            s.finish(&first[1], JobEnd::Settled).is_none(),
            "b's slot is not refilled"
        );
        s.enqueue(rec(0, 4, Some("d")));
        assert!(s.take_jobs().is_empty());
        // Half-open with nobody waiting: exactly one record is dispatched, to probe.
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = s.take_jobs();
        assert_eq!(offsets(&probe), [(0, 4)]);
        assert!(s.take_jobs().is_empty());
        let pass = gate
            .admit(&Stop::default(), ProbeMemo::default(), 0)
            .await
            .unwrap();
        pass.succeeded();
        // Closed: a@3 waits for a@0 (its lane), everything else may go.
        assert!(s.take_jobs().is_empty(), "only a@3 is left, behind a@0");
        // Open again, then stop: the held gap filler a@3 is dropped, not waited for.
        two_records_fail(&gate).await;
        s.begin_stop();
        // a@3 went with a@0 (its run): dropped when a@0 is given up, not run.
        assert!(s.finish(&first[0], JobEnd::Abandoned).is_none());
        assert_eq!(
            s.buffered().0,
            0,
            "a held gap filler does not delay the shutdown"
        );
    }

    /// The offsets a job's run holds, in order.
    fn run_of(job: &Job) -> Vec<i64> {
        job.run_ahead(RUN_RECORDS)
            .iter()
            .map(|r| r.offset)
            .collect()
    }

    /// Makes `job`'s run look older than [`RUN_FOR`].
    fn age(job: &mut Job) {
        job.run.get_mut().unwrap().since =
            std::time::Instant::now().checked_sub(Duration::from_secs(60));
    }

    #[test]
    fn a_job_takes_its_lanes_next_records_and_reports_them_settled_in_one_visit() {
        let records = (0..5).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(10), &[0], records);
        let mut job = s.take_jobs().pop().unwrap();
        assert_eq!((job.record.offset, run_of(&job)), (0, vec![1, 2, 3, 4]));
        assert_eq!(s.buffered().0, 4, "not started yet: still buffered");
        assert!(
            job.advance() && job.advance(),
            "0 and 1 settle on the worker"
        );
        assert_eq!(job.record.offset, 2);
        assert!(s.commits_due().is_empty(), "not told yet");
        s.report_run(&job);
        assert_eq!(s.commits_due(), [(tp(0), 2)], "0 and 1 settled");
        assert_eq!(s.buffered().0, 2, "1 and 2 started");
        assert_eq!(s.in_flight_of(&[tp(0)]), 1, "2 runs");
        // The job ends through the scheduler: the rest of its run goes on in order.
        let next = s
            .finish(&job, JobEnd::Settled)
            .expect("3, with 4 in its run");
        assert_eq!((next.record.offset, run_of(&next)), (3, vec![4]));
        assert_eq!(s.commits_due(), [(tp(0), 3)]);
        assert_eq!((s.buffered().0, s.in_flight()), (1, 1));
    }

    #[test]
    fn without_runs_a_job_takes_its_record_alone() {
        let records = (0..3).map(|o| (0, o, None));
        let mut s = holding(Partition, limits(10), &[0], records).with_runs(false);
        let mut job = s.take_jobs().pop().unwrap();
        assert!(run_of(&job).is_empty());
        assert!(!job.advance(), "nothing to go on with");
        assert_eq!(s.buffered().0, 2);
    }

    #[test]
    fn a_run_older_than_its_time_goes_back_through_the_scheduler() {
        let mut s = holding(Key, limits(10), &[0], (0..3).map(|o| (0, o, Some("a"))));
        let mut job = s.take_jobs().pop().unwrap();
        age(&mut job);
        assert!(!job.advance(), "too old to go on without the scheduler");
        assert_eq!(job.record.offset, 0, "unchanged");
        let next = s.finish(&job, JobEnd::Settled).expect("the lane goes on");
        assert_eq!((next.record.offset, run_of(&next)), (1, vec![2]));
    }

    #[test]
    fn a_record_given_up_in_a_run_drops_the_rest_and_blocks_its_lane() {
        let mut s = holding(Key, limits(10), &[0], (0..4).map(|o| (0, o, Some("a"))));
        let mut job = s.take_jobs().pop().unwrap();
        assert!(job.advance(), "0 settles");
        assert!(
            s.finish(&job, JobEnd::Abandoned).is_none(),
            "2 and 3 do not run"
        );
        assert_eq!(s.commits_due(), [(tp(0), 1)], "0 is committed, 1 is not");
        assert_eq!((s.buffered().0, s.in_flight_of(&[tp(0)])), (0, 0));
        assert!(!s.enqueue(rec(0, 4, Some("a"))), "the lane is blocked");
    }

    #[test]
    fn a_released_record_hands_the_rest_of_its_run_on_with_its_slot() {
        let mut s = holding(Partition, limits(1), &[0], (0..3).map(|o| (0, o, None)));
        let job = s.take_jobs().pop().unwrap();
        let next = s
            .release_lane(&job)
            .unwrap()
            .expect("1 runs while 0 settles");
        assert_eq!((next.record.offset, run_of(&next)), (1, vec![2]));
        assert_eq!(s.in_flight, 1, "the slot went with the run");
        assert_eq!(s.in_flight(), 2, "1 running, 0 settling");
        assert!(s.commits_due().is_empty(), "0 is still settling");
        s.settle(&job, JobEnd::Settled);
        assert_eq!(s.commits_due(), [(tp(0), 1)]);
        // Too old to hand on: the run goes back to its lane and the scheduler picks.
        let mut next = next;
        age(&mut next);
        let last = s
            .release_lane(&next)
            .unwrap()
            .expect("2, through the scheduler");
        assert_eq!((last.record.offset, run_of(&last)), (2, vec![]));
    }

    #[test]
    fn a_draining_partition_takes_a_run_back_as_gap_fillers_only() {
        let records = [
            (0, 0, Some("a")),
            (0, 1, Some("b")),
            (0, 2, Some("a")),
            (0, 3, Some("c")),
            (0, 4, Some("a")),
        ];
        let mut s = holding(Key, limits(10), &[0], records);
        let jobs = s.take_jobs();
        assert_eq!(offsets(&jobs), [(0, 0), (0, 1), (0, 3)]);
        assert_eq!(run_of(&jobs[0]), [2, 4]);
        s.begin_revoke(&[tp(0)]);
        // a@2 is below c@3, which started: it must run for 3 to be committable; a@4 is not.
        let gap = s
            .finish(&jobs[0], JobEnd::Settled)
            .expect("a@2 fills the gap");
        assert_eq!((gap.record.offset, run_of(&gap)), (2, vec![]));
        assert_eq!(s.buffered().0, 0, "a@4 dropped");
    }

    #[test]
    fn a_parked_record_reports_what_its_run_settled_before_it() {
        let mut s = holding(Partition, limits(2), &[0], (0..3).map(|o| (0, o, None)));
        let mut job = s.take_jobs().pop().unwrap();
        assert!(job.advance());
        assert!(s.park(&job).is_none(), "nothing else to run");
        assert_eq!(
            s.commits_due(),
            [(tp(0), 1)],
            "0 is committable during 1's back-off"
        );
    }
}
