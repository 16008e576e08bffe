//! The poll thread: the only place that touches the rdkafka consumer.
//!
//! It runs on its own OS thread so that nothing it does — polling, synchronous commits,
//! waiting for in-flight records during a revoke, closing the consumer — ever blocks the
//! async runtime, and so that handler work never delays polling (the consumer stays in its
//! group whatever the handlers and back-offs do).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientContext, Offset, Timestamp, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::scheduler::{FlowChanges, Job, Scheduler, Tp};
use crate::message::{Header, Headers, RawRecord};
use crate::metrics::ConsumerMetrics;

/// State shared by the poll thread, the rebalance callbacks and the workers.
#[derive(Debug)]
pub(crate) struct Shared {
    scheduler: Mutex<Scheduler>,
    changed: Condvar,
    /// Threads waiting on `changed`: workers notify only when there is one (a notify is a
    /// system call, and there is rarely a waiter).
    waiters: AtomicUsize,
    stop: AtomicBool,
    closing: AtomicBool,
    revoke_timeout: Duration,
    pub(crate) metrics: Arc<ConsumerMetrics>,
}

impl Shared {
    pub(crate) fn new(
        scheduler: Scheduler,
        revoke_timeout: Duration,
        metrics: Arc<ConsumerMetrics>,
    ) -> Self {
        Shared {
            scheduler: Mutex::new(scheduler),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            revoke_timeout,
            metrics,
        }
    }

    /// Locks the scheduler. A panic while holding the lock cannot leave it inconsistent in
    /// a way that matters more than stopping would, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Scheduler> {
        self.scheduler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called by a worker when a job ended; returns its next job.
    pub(crate) fn finish(&self, job: &Job, end: super::scheduler::JobEnd) -> Option<Job> {
        let next = self.lock().finish(job, end);
        // A waiter registers under the lock before it checks its condition, so it either saw
        // this change or is counted here.
        if self.waiters.load(AtomicOrdering::SeqCst) > 0 {
            self.changed.notify_all();
        }
        next
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, AtomicOrdering::SeqCst);
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(AtomicOrdering::SeqCst)
    }

    /// Waits until `done` holds or `timeout` passes; returns whether `done` holds.
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Scheduler) -> bool) -> bool {
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

/// The rdkafka context: serves rebalances on the poll thread.
#[derive(Debug)]
pub(crate) struct KourierContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for KourierContext {
    /// librdkafka's statistics (every `statistics.interval.ms`, on the poll thread): the lag
    /// of each assigned partition, for [`crate::metrics::CONSUMER_LAG`].
    fn stats_raw(&self, statistics: &[u8]) {
        let partitions = match crate::metrics::partition_offsets(statistics) {
            Ok(partitions) => partitions,
            Err(e) => {
                debug!(error = %e, "cannot read librdkafka statistics");
                return;
            }
        };
        let lags: Vec<_> = {
            let s = self.shared.lock();
            partitions
                .into_iter()
                .filter_map(|p| {
                    let first = s.first_received(&(Arc::from(p.topic.as_str()), p.partition))?;
                    Some((p.lag(first)?, p))
                })
                .collect()
        };
        for (lag, p) in lags {
            self.shared.metrics.consumer_lag(&p.topic, p.partition, lag);
        }
    }
}

impl ConsumerContext for KourierContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, &tps_of(tpl)),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = tps_of(tpl);
            info!(partitions = ?tps_display(&tps), "partitions assigned");
            self.shared.lock().assign(tps);
            // librdkafka keeps a partition's pause across re-assignment: start clean.
            if let Err(e) = consumer.resume(tpl) {
                debug!(error = %e, "resume after assign failed");
            }
        }
    }
}

impl KourierContext {
    /// Revoke: stop dispatching, wait (bounded) for in-flight records, commit what settled,
    /// then forget the partitions (late completions are ignored).
    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tps: &[Tp]) {
        let shared = &self.shared;
        shared.lock().begin_revoke(tps);
        let closing = shared.closing.load(AtomicOrdering::SeqCst);
        if closing || !shared.wait_until(shared.revoke_timeout, |s| s.drained(tps)) {
            if !closing {
                warn!(partitions = ?tps_display(tps), timeout = ?shared.revoke_timeout, "revoke: records still running after the timeout; they will be handled again by the new owner");
            }
            shared.lock().cancel(tps);
            shared.wait_until(Duration::from_secs(1), |s| s.drained(tps));
        }
        let offsets = shared.lock().remove(tps);
        for (topic, partition) in tps {
            shared.metrics.partition_revoked(topic, *partition);
        }
        if consumer.assignment_lost() {
            warn!(partitions = ?tps_display(tps), "assignment lost: not committing");
        } else if !offsets.is_empty() {
            commit(consumer, &offsets, "revoke");
        }
        info!(partitions = ?tps_display(tps), "partitions revoked");
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}

fn tps_display(tps: &[Tp]) -> Vec<String> {
    tps.iter().map(|(t, p)| format!("{t}/{p}")).collect()
}

fn tpl_of(tps: &[Tp]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(tps.len());
    for (t, p) in tps {
        tpl.add_partition(t, *p);
    }
    tpl
}

/// Commits exactly these offsets (each the next offset to read) synchronously.
fn commit(consumer: &BaseConsumer<KourierContext>, offsets: &[(Tp, i64)], why: &str) -> bool {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for ((t, p), o) in offsets {
        if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
            error!(error = %e, "cannot build commit list");
            return false;
        }
    }
    let started = Instant::now();
    let result = consumer.commit(&tpl, CommitMode::Sync);
    let metrics = &consumer.context().shared.metrics;
    metrics.commit(started.elapsed(), result.is_ok());
    match result {
        Ok(()) => {
            debug!(why, offsets = ?offsets.iter().map(|((t, p), o)| format!("{t}/{p}={o}")).collect::<Vec<_>>(), took = ?started.elapsed(), "committed");
            true
        }
        Err(e) if ownership_lost(&e) => {
            warn!(why, error = %e, "commit refused: partitions changed owner; their records will be redelivered");
            false
        }
        Err(e) => {
            warn!(why, error = %e, "commit failed; retrying at the next interval");
            false
        }
    }
}

fn ownership_lost(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::State
        )
    )
}

fn apply_flow(consumer: &BaseConsumer<KourierContext>, changes: &FlowChanges) {
    let metrics = &consumer.context().shared.metrics;
    for ((topic, partition), paused) in changes
        .pause
        .iter()
        .map(|tp| (tp, true))
        .chain(changes.resume.iter().map(|tp| (tp, false)))
    {
        metrics.partition_paused(topic, *partition, paused);
    }
    if !changes.pause.is_empty() {
        debug!(partitions = ?tps_display(&changes.pause), "pausing: buffer full");
        if let Err(e) = consumer.pause(&tpl_of(&changes.pause)) {
            warn!(error = %e, "pause failed");
        }
    }
    if !changes.resume.is_empty() {
        debug!(partitions = ?tps_display(&changes.resume), "resuming");
        if let Err(e) = consumer.resume(&tpl_of(&changes.resume)) {
            warn!(error = %e, "resume failed");
        }
    }
}

/// Reads a record's headers as bytes. rdkafka 0.39's header getters panic on a header name
/// that is not UTF-8 (any producer may send one), so the names are read through librdkafka
/// directly and converted lossily.
#[allow(unsafe_code)]
fn read_headers(m: &BorrowedMessage<'_>) -> Headers {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, c_char, c_void};

    let mut headers = Headers::new();
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a valid message for the lifetime of `m`; librdkafka fills `hdrs`
    // with a pointer owned by the message (valid while `m` lives) or leaves it null.
    let err = unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return headers;
    }
    // SAFETY: `hdrs` is a valid header list (checked non-null above).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `idx < count`; librdkafka writes pointers into the header list, which
        // stays valid while `m` lives; we copy them out before returning.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka header names are NUL-terminated.
        let key = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let value = (!value.is_null()).then(|| {
            // SAFETY: `value` points to `size` readable bytes owned by the header list.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
        });
        headers.push(Header { key, value });
    }
    headers
}

pub(crate) fn to_raw(m: &BorrowedMessage<'_>) -> RawRecord {
    let (timestamp, log_append_time) = match m.timestamp() {
        Timestamp::NotAvailable => (None, false),
        Timestamp::CreateTime(t) => (Some(t), false),
        Timestamp::LogAppendTime(t) => (Some(t), true),
    };
    RawRecord {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: read_headers(m),
        timestamp,
        log_append_time,
    }
}

/// Settings of the poll loop.
#[derive(Debug, Clone)]
pub(crate) struct PollSettings {
    pub(crate) topics: Vec<String>,
    pub(crate) commit_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_poll_batch: usize,
}

const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// Runs the consumer until a stop is requested, then shuts down gracefully.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<KourierContext>,
    shared: &Shared,
    settings: &PollSettings,
    spawn: &dyn Fn(Job),
) -> Result<(), crate::Error> {
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| crate::Error::kafka("subscribe", e))?;
    info!(topics = ?topics, "consumer subscribed");
    shared.metrics.start();

    let mut last_commit = Instant::now();
    let mut batch: Vec<RawRecord> = Vec::with_capacity(settings.max_poll_batch);
    let mut fatal = None;
    while !shared.stop_requested() {
        let changes = shared.lock().flow_control();
        apply_flow(&consumer, &changes);
        if last_commit.elapsed() >= settings.commit_interval {
            commit_settled(&consumer, shared, "interval");
            last_commit = Instant::now();
        }
        // A (nearly) full buffer: wait until workers made room for a batch (or POLL_TIMEOUT),
        // then take what fits — at least one record, so that polling goes on (group
        // membership, rebalances) without pulling records faster than handlers settle them.
        let (mut room, want) = {
            let s = shared.lock();
            (s.room(), s.batch_room(settings.max_poll_batch))
        };
        if room < want {
            shared.wait_until(POLL_TIMEOUT, |s| s.room() >= want);
            room = shared.lock().room();
        }
        let max_batch = room.clamp(1, settings.max_poll_batch);
        let mut timeout = if room >= want {
            POLL_TIMEOUT
        } else {
            Duration::ZERO
        };
        while batch.len() < max_batch {
            match consumer.poll(timeout) {
                Some(Ok(m)) => batch.push(to_raw(&m)),
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    error!(%code, "fatal consumer error");
                    fatal = Some(KafkaError::MessageConsumptionFatal(code));
                    break;
                }
                Some(Err(e)) => warn!(error = %e, "consumer error"),
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if !batch.is_empty() {
            shared.metrics.consumed(&batch);
            let jobs = {
                let mut s = shared.lock();
                for record in batch.drain(..) {
                    s.enqueue(record);
                }
                s.take_jobs()
            };
            for job in jobs {
                spawn(job);
            }
        }
        if fatal.is_some() {
            break;
        }
    }

    shutdown(&consumer, shared, settings);
    drop(consumer);
    info!("consumer closed");
    match fatal {
        Some(e) => Err(crate::Error::kafka("consume", e)),
        None => Ok(()),
    }
}

fn commit_settled(consumer: &BaseConsumer<KourierContext>, shared: &Shared, why: &str) {
    let offsets = shared.lock().to_commit();
    if !offsets.is_empty() && commit(consumer, &offsets, why) {
        shared.lock().committed(&offsets);
    }
}

/// Stop taking records, let in-flight work finish within the deadline (still polling, so
/// the consumer stays in its group), commit what settled, then close.
fn shutdown(consumer: &BaseConsumer<KourierContext>, shared: &Shared, settings: &PollSettings) {
    info!(timeout = ?settings.shutdown_timeout, "shutting down: finishing in-flight records");
    let changes = {
        let mut s = shared.lock();
        s.begin_stop();
        s.flow_control()
    };
    apply_flow(consumer, &changes);
    let deadline = Instant::now() + settings.shutdown_timeout;
    let drained = |s: &Scheduler| s.in_flight() == 0 && s.buffered().0 == 0;
    loop {
        if drained(&shared.lock()) {
            break;
        }
        if Instant::now() >= deadline {
            let running = shared.lock().in_flight();
            warn!(
                running,
                "shutdown deadline passed: abandoning in-flight records (they are not committed)"
            );
            shared.lock().cancel_all();
            shared.wait_until(Duration::from_secs(1), drained);
            break;
        }
        // Records that still arrive are dropped by the stopping scheduler (not committed).
        let _ = consumer.poll(POLL_TIMEOUT);
    }
    commit_settled(consumer, shared, "shutdown");
    shared.closing.store(true, AtomicOrdering::SeqCst);
}
