//! The hub: the state shared by the poll thread, the rebalance callbacks and the workers —
//! the scheduler behind one mutex, a condition variable to wait for its changes, and the
//! stop flags.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rdkafka::error::KafkaError;
use tracing::{info, warn};

use super::health::Health;
use super::lifecycle::{Lifecycle, RunState};
use super::scheduler::{Job, JobEnd, Scheduler, SettlingFull};
use super::topic_partition::Tp;
use crate::consumer::breaker::Breaker;
use crate::consumer::transaction::Transactions;
use crate::log_throttle::LogThrottle;
use crate::metrics::ConsumerMetrics;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Hub {
    scheduler: Mutex<Scheduler>,
    changed: Condvar,
    /// Threads waiting on `changed`: workers notify only when there is one (a notify is a
    /// system call, and there is rarely a waiter).
    waiters: AtomicUsize,
    /// The poll thread waiting for room in the buffer ([`Hub::wait_for_room`]), and the room
    /// it waits for (0: it does not wait). Workers wake it only once that much is free, not
    /// on every record they finish: each needless wake-up is two context switches.
    room_changed: Condvar,
    room_wanted: AtomicUsize,
    stop: AtomicBool,
    /// Set once shutdown has committed: a revoke during the final close commits nothing
    /// more and does not wait.
    closing: AtomicBool,
    pub(crate) revoke_timeout: Duration,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    pub(crate) health: Health,
    /// Where the consumer is in its life, and the poll loop's heartbeat.
    pub(crate) lifecycle: Lifecycle,
    /// Log lines of persisting conditions (broker errors, waits), once per interval.
    pub(crate) throttle: LogThrottle,
    /// The final commit at shutdown, when it failed until the deadline: for the report.
    final_commit: Mutex<Option<FinalCommitFailure>>,
    /// Whether the consumer has caught up, as the poll thread last saw it (published by
    /// `observe::publish_caught_up`, awaited by `ConsumerMonitor::caught_up`).
    pub(crate) caught_up: tokio::sync::watch::Sender<bool>,
    /// The scheduler's outage breaker, looked at without its lock (see
    /// [`Hub::breaker_holds`]).
    breaker: Option<Arc<Breaker>>,
    /// Transactional output (set once, by the builder): a record's staged outputs are
    /// produced as it finishes, under the transactions' guard (delivery rule 20).
    transactions: OnceLock<Arc<Transactions>>,
}

impl Hub {
    pub(crate) fn new(
        scheduler: Scheduler,
        revoke_timeout: Duration,
        metrics: Arc<ConsumerMetrics>,
        log_interval: Duration,
    ) -> Self {
        Hub {
            breaker: scheduler.breaker().cloned(),
            scheduler: Mutex::new(scheduler),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
            room_changed: Condvar::new(),
            room_wanted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            revoke_timeout,
            metrics,
            health: Health::new(),
            lifecycle: Lifecycle::default(),
            throttle: LogThrottle::new(log_interval),
            final_commit: Mutex::new(None),
            caught_up: tokio::sync::watch::Sender::new(false),
            transactions: OnceLock::new(),
        }
    }

    /// Records whether the cluster answers; a change is logged (once) and goes to the
    /// connection-state gauge.
    pub(crate) fn set_connected(&self, connected: bool) {
        if self.health.set_connection(connected) {
            self.metrics.connection_state(connected);
            if connected {
                info!("connected to the kafka cluster");
            } else {
                warn!("the kafka cluster is unreachable: records wait; kourier keeps trying");
            }
        }
    }

    /// Locks the scheduler. A panic while holding the lock cannot leave it inconsistent in
    /// a way that matters more than stopping would, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Scheduler> {
        self.scheduler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Turns transactional output on.
    pub(crate) fn set_transactions(&self, transactions: Arc<Transactions>) {
        let _ = self.transactions.set(transactions);
    }

    /// The transactional output, if on.
    pub(crate) fn transactions(&self) -> Option<&Arc<Transactions>> {
        self.transactions.get()
    }

    /// With transactional output: produces the job's staged outputs when it finishes in
    /// its current assignment (else drops them), under the scheduler's lock `s` and the
    /// transactions' shared guard, which the caller holds until the job is marked finished.
    /// The number of the transaction it finished in (`None`: it did not).
    fn produce_outputs(&self, s: &Scheduler, job: &Job, end: JobEnd) -> Option<u64> {
        let t = self.transactions.get()?;
        t.produce_staged(&job.record, end == JobEnd::Settled && s.is_current(job))
    }

    /// Called by a worker when a job ended; returns its next job.
    /// The job is dropped by the poll thread ([`Scheduler::keep_spent`]).
    pub(crate) fn finish(&self, job: Job, end: JobEnd) -> Option<Job> {
        self.finish_in_transaction(job, end).0
    }

    /// [`finish`](Self::finish), also answering (with transactional output) the number of
    /// the transaction the job's record finished in.
    pub(crate) fn finish_in_transaction(
        &self,
        job: Job,
        end: JobEnd,
    ) -> (Option<Job>, Option<u64>) {
        let _shared = self.transactions.get().map(|t| t.shared());
        let (next, finished_in, room, overflow) = {
            let mut s = self.lock();
            let finished_in = self.produce_outputs(&s, &job, end);
            let next = s.finish(&job, end);
            (next, finished_in, s.room(), s.keep_spent(job))
        };
        self.changed(room);
        drop(overflow);
        (next, finished_in)
    }

    /// Wakes whoever waits for what changed: waiters on any change, and the poll thread
    /// once `room` is what it waits for. A waiter registers under the lock before it checks
    /// its condition, so it either saw this change or is seen here.
    fn changed(&self, room: usize) {
        if self.waiters.load(AtomicOrdering::SeqCst) > 0 {
            self.changed.notify_all();
        }
        let wanted = self.room_wanted.load(AtomicOrdering::SeqCst);
        if wanted > 0 && room >= wanted {
            self.room_changed.notify_one();
        }
    }

    /// Called by a worker whose record's outcome is decided but still being written
    /// (completion, dead letter): the lane and slot are freed, the returned job takes the
    /// slot. See [`Scheduler::release_lane`].
    pub(crate) fn release_lane(&self, job: &Job) -> Result<Option<Job>, SettlingFull> {
        let (next, room) = {
            let mut s = self.lock();
            (s.release_lane(job), s.room())
        };
        self.changed(room);
        next
    }

    /// Called by a worker when a job whose lane it released ended; (with transactional
    /// output) the number of the transaction its record finished in.
    /// The job is dropped by the poll thread ([`Scheduler::keep_spent`]).
    pub(crate) fn settle(&self, job: Job, end: JobEnd) -> Option<u64> {
        let _shared = self.transactions.get().map(|t| t.shared());
        let (finished_in, room, overflow) = {
            let mut s = self.lock();
            let finished_in = self.produce_outputs(&s, &job, end);
            s.settle(&job, end);
            (finished_in, s.room(), s.keep_spent(job))
        };
        self.changed(room);
        drop(overflow);
        finished_in
    }

    /// Called by a worker whose record did not end at once: what ran of its job's run
    /// before it is told now (see [`Scheduler::report_run`]), not when the record ends.
    pub(crate) fn report_run(&self, job: &Job) {
        let room = {
            let mut s = self.lock();
            s.report_run(job);
            s.room()
        };
        self.changed(room);
    }

    /// Whether the outage breaker holds dispatch now (`false` without one): a worker then
    /// stops going on with its job's run.
    pub(crate) fn breaker_holds(&self) -> bool {
        self.breaker.as_ref().is_some_and(|b| b.holds_dispatch())
    }

    /// Called by a worker whose record starts waiting out a retry back-off: the slot it frees
    /// goes to the returned job.
    pub(crate) fn park(&self, job: &Job) -> Option<Job> {
        let (next, room) = {
            let mut s = self.lock();
            (s.park(job), s.room())
        };
        self.changed(room);
        next
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, AtomicOrdering::SeqCst);
        self.lifecycle.set(RunState::Stopping);
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(AtomicOrdering::SeqCst)
    }

    pub(crate) fn set_closing(&self) {
        self.closing.store(true, AtomicOrdering::SeqCst);
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(AtomicOrdering::SeqCst)
    }

    /// A try of the final commit failed: `offsets` stay uncommitted (with those of earlier
    /// tries whose partitions left meanwhile without a commit, e.g. lost), for the report.
    pub(crate) fn final_commit_failed(&self, offsets: &[(Tp, i64)], error: KafkaError) {
        let mut slot = self.final_commit_slot();
        let mut uncommitted: Vec<(Tp, i64)> = slot
            .take()
            .map(|f| f.uncommitted)
            .unwrap_or_default()
            .into_iter()
            .filter(|(tp, _)| !offsets.iter().any(|(t, _)| t == tp))
            .collect();
        uncommitted.extend_from_slice(offsets);
        *slot = Some(FinalCommitFailure { uncommitted, error });
    }

    /// `offsets` were committed (by a later try, or by a revoke while the consumer stops or
    /// closes): what a failed try of the final commit left there is committed after all.
    pub(crate) fn committed_after_failure(&self, offsets: &[(Tp, i64)]) {
        let mut slot = self.final_commit_slot();
        let Some(failure) = slot.as_mut() else {
            return;
        };
        failure
            .uncommitted
            .retain(|(tp, o)| !offsets.iter().any(|(t, done)| t == tp && done >= o));
        if failure.uncommitted.is_empty() {
            *slot = None;
        }
    }

    /// The final commit's failure, if it failed (taken once the consumer is closed).
    pub(crate) fn take_final_commit_failure(&self) -> Option<FinalCommitFailure> {
        self.final_commit_slot().take()
    }

    fn final_commit_slot(&self) -> MutexGuard<'_, Option<FinalCommitFailure>> {
        self.final_commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The poll thread: waits until the buffer has room for `want` records or `timeout`
    /// passes; returns whether it has.
    pub(crate) fn wait_for_room(&self, timeout: Duration, want: usize) -> bool {
        let guard = self.lock();
        self.room_wanted.store(want.max(1), AtomicOrdering::SeqCst);
        let (guard, _) = self
            .room_changed
            .wait_timeout_while(guard, timeout, |s| s.room() < want)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.room_wanted.store(0, AtomicOrdering::SeqCst);
        guard.room() >= want
    }

    /// Waits until `done` holds or `timeout` passes; returns whether `done` holds.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Scheduler) -> bool,
    ) -> bool {
        let guard = self.lock();
        self.waiters.fetch_add(1, AtomicOrdering::SeqCst);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| !done(s))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.waiters.fetch_sub(1, AtomicOrdering::SeqCst);
        done(&guard)
    }
}

#[cfg(test)]
impl Hub {
    /// A hub for unit tests over `scheduler`: metrics for group `g` and topic `t`, a 30 s
    /// log interval.
    pub(crate) fn for_tests(scheduler: Scheduler, revoke_timeout: Duration) -> Hub {
        let metrics = Arc::new(ConsumerMetrics::new("g", &["t".to_owned()]));
        Hub::new(scheduler, revoke_timeout, metrics, Duration::from_secs(30))
    }

    /// An idle hub for unit tests: partition order, 4 records in flight, 10 buffered,
    /// nothing assigned, a 30 s revoke wait.
    pub(crate) fn idle_for_tests() -> Hub {
        let limits = super::Limits {
            max_in_flight: 4,
            max_buffered_records: 10,
            max_buffered_bytes: 1 << 20,
            max_buffered_records_per_partition: 10,
            max_uncommitted_per_partition: 10,
        };
        let scheduler = Scheduler::new(super::ProcessingOrder::Partition, limits);
        Hub::for_tests(scheduler, Duration::from_secs(30))
    }
}

/// The final commit at shutdown, after every try until the shutdown deadline failed.
#[derive(Debug)]
pub(crate) struct FinalCommitFailure {
    /// What stayed uncommitted: each partition with the offset it should have been
    /// committed at.
    pub(crate) uncommitted: Vec<(Tp, i64)>,
    /// The last try's error.
    pub(crate) error: KafkaError,
}

impl FinalCommitFailure {
    /// `topic/partition@offset` of each partition left uncommitted, for the report.
    pub(crate) fn uncommitted_display(&self) -> Vec<String> {
        self.uncommitted
            .iter()
            .map(|((t, p), o)| format!("{t}/{p}@{o}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::ProcessingOrder;
    use crate::consumer::schedule::{ConnectionState, Limits};
    use crate::record::RawRecord;

    fn tp() -> Tp {
        (Arc::from("t"), 0)
    }

    /// A hub over partition `t/0` in `order`, one record in flight at a time, a buffer of
    /// two records, holding `records` (offset = index, key = the given key): the jobs
    /// started.
    fn hub(order: ProcessingOrder, keys: &[&str]) -> (Arc<Hub>, Vec<Job>) {
        let limits = Limits {
            max_in_flight: 1,
            max_buffered_records: 2,
            max_buffered_bytes: 1 << 20,
            max_buffered_records_per_partition: 10,
            max_uncommitted_per_partition: 100,
        };
        let mut s = Scheduler::new(order, limits);
        s.assign([tp()]);
        for (offset, key) in keys.iter().enumerate() {
            let offset = i64::try_from(offset).unwrap();
            s.enqueue(RawRecord::builder("t").offset(offset).key(*key).build());
        }
        let jobs = s.take_jobs();
        (Arc::new(Hub::for_tests(s, Duration::from_secs(30))), jobs)
    }

    /// A worker that settles the first of `jobs` 30 ms from now; its thread returns the
    /// job that took the slot.
    fn settle_soon(hub: &Arc<Hub>, jobs: Vec<Job>) -> std::thread::JoinHandle<Option<Job>> {
        let (hub, job) = (hub.clone(), jobs.into_iter().next().unwrap());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            hub.finish(job, JobEnd::Settled)
        })
    }

    /// An ended job (finished, or settled after its lane was released) is kept for the poll
    /// thread, which drops it — its record was allocated there — when it swaps them out.
    #[test]
    fn ended_jobs_are_kept_for_the_poll_thread_to_drop() {
        let (hub, mut jobs) = hub(ProcessingOrder::Partition, &["k", "k"]);
        let first = jobs.remove(0);
        let record = Arc::clone(&first.record);
        let next = hub.release_lane(&first).unwrap().expect("the next record");
        hub.settle(first, JobEnd::Settled);
        assert!(hub.finish(next, JobEnd::Settled).is_none());
        assert_eq!(
            Arc::strong_count(&record),
            2,
            "the scheduler still holds the settled record"
        );
        let mut spent = Vec::new();
        hub.lock().swap_spent(&mut spent);
        assert_eq!(
            spent.iter().map(|j| j.record.offset).collect::<Vec<_>>(),
            [0, 1]
        );
        spent.clear();
        assert_eq!(
            Arc::strong_count(&record),
            1,
            "dropped by whoever swapped them out"
        );
        hub.lock().swap_spent(&mut spent);
        assert!(spent.is_empty(), "nothing kept twice");
    }

    /// The poll thread waiting for room is woken by the worker that makes it, not by its
    /// timeout; without room it waits the timeout out and says so.
    #[test]
    fn the_poll_thread_waits_for_room_until_a_worker_makes_it() {
        let (hub, jobs) = hub(ProcessingOrder::Partition, &["k", "k", "k"]);
        assert_eq!(hub.lock().room(), 0, "two buffered, one running");
        let started = Instant::now();
        assert!(!hub.wait_for_room(Duration::from_millis(50), 1));
        assert!(started.elapsed() >= Duration::from_millis(50));

        let worker = settle_soon(&hub, jobs);
        let started = Instant::now();
        assert!(hub.wait_for_room(Duration::from_secs(10), 1), "room made");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "woken, not timed out: {took:?}"
        );
        let next = worker
            .join()
            .unwrap()
            .expect("the next record takes the slot");
        assert_eq!(next.record.offset, 1);
        assert_eq!(hub.lock().room(), 1);
    }

    /// Waiting until a condition holds: woken by the change that makes it hold; the answer
    /// is the condition's.
    #[test]
    fn wait_until_is_woken_by_the_change_and_answers_the_condition() {
        let (hub, jobs) = hub(ProcessingOrder::Partition, &["k"]);
        assert!(!hub.wait_until(Duration::from_millis(20), |s| s.in_flight() == 0));
        assert!(hub.wait_until(Duration::from_millis(20), |s| s.in_flight() == 1));
        let worker = settle_soon(&hub, jobs);
        let started = Instant::now();
        assert!(hub.wait_until(Duration::from_secs(10), |s| s.in_flight() == 0));
        assert!(started.elapsed() < Duration::from_secs(2), "woken");
        assert!(worker.join().unwrap().is_none());
    }

    /// A released lane hands the slot to the lane's next record at once; the first record's
    /// offset becomes committable only when it settles.
    #[test]
    fn a_released_lane_starts_the_next_record_and_the_offset_waits_for_the_settle() {
        let (hub, mut jobs) = hub(ProcessingOrder::Partition, &["k", "k"]);
        let next = hub
            .release_lane(&jobs[0])
            .unwrap()
            .expect("the next record");
        assert_eq!(next.record.offset, 1);
        assert!(hub.lock().commits_due().is_empty(), "0 not settled yet");
        hub.settle(jobs.remove(0), JobEnd::Settled);
        assert_eq!(hub.lock().commits_due(), [(tp(), 1)]);
        assert!(hub.finish(next, JobEnd::Settled).is_none());
        assert_eq!(hub.lock().commits_due(), [(tp(), 2)]);
    }

    /// A record waiting out a back-off gives its slot to another key's record.
    #[test]
    fn a_parked_record_gives_its_slot_to_another_key() {
        let (hub, jobs) = hub(ProcessingOrder::Key, &["a", "b"]);
        assert_eq!(jobs.len(), 1, "one slot");
        let other = hub.park(&jobs[0]).expect("the other key's record");
        assert_eq!(other.record.offset, 1);
        assert_eq!(hub.lock().in_flight(), 2, "both held by workers");
    }

    #[test]
    fn stop_closing_and_connection_flags() {
        let (hub, _) = hub(ProcessingOrder::Partition, &[]);
        assert!(!hub.stop_requested() && !hub.closing());
        hub.request_stop();
        assert!(hub.stop_requested() && !hub.closing());
        hub.set_closing();
        assert!(hub.closing());
        hub.set_connected(false);
        assert_eq!(hub.health.state().connection, ConnectionState::Disconnected);
        assert!(hub.health.outage().is_some());
        hub.set_connected(true);
        assert_eq!(hub.health.state().connection, ConnectionState::Connected);
        assert!(hub.health.outage().is_none());
    }
}
