//! The poll thread's loop: the only place that touches the rdkafka consumer.
//!
//! It runs on its own OS thread so that nothing it does — polling, synchronous commits,
//! waiting for in-flight records during a revoke, closing the consumer — ever blocks the
//! async runtime, and so that handler work never delays polling (the consumer stays in its
//! group whatever the handlers and back-offs do).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::{error, info, warn};

use super::commit::commit_settled;
use super::context::KourierContext;
use super::flow::apply_flow;
use super::rebalance::reset;
use super::shutdown::{ShutdownReport, shutdown};
use super::split::{NativeMessage, SplitQueue, drop_pending_of};
use super::startup::{self, StartupSettings};
use crate::consumer::observe::publish_caught_up;
use crate::consumer::schedule::{FinalCommitFailure, Hub};
use crate::consumer::schedule::{Job, RunState};
use crate::consumer::schedule::{PartitionEnd, cached_watermarks};
use crate::consumer::schedule::{Tp, tps_display};
use crate::error::Error;
use crate::record::RawRecord;

/// Settings of the poll loop.
#[derive(Debug, Clone)]
pub(crate) struct PollSettings {
    pub(crate) topics: Vec<String>,
    /// The consumer group (for the join watch).
    pub(crate) group: String,
    pub(crate) commit_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_poll_batch: usize,
    pub(crate) startup: StartupSettings,
    /// Stop with [`Error::BrokersUnreachable`] after the cluster was unreachable this long.
    pub(crate) max_broker_outage: Option<Duration>,
}

/// How long one poll waits for records.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How often partition ends and positions are refreshed for the monitor.
const HEALTH_EVERY: Duration = Duration::from_millis(200);
/// How often a disconnected consumer asks the cluster whether it is back.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A subscribed consumer without partitions this long asks the group coordinator whether it
/// is a member at all (see [`JoinWatch`]), then again at most this often.
const JOIN_CHECK_AFTER: Duration = Duration::from_secs(30);
/// At most one look for deleted topics this often.
const DELETED_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Runs the consumer until a stop is requested, then shuts down gracefully.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<KourierContext>,
    hub: &Hub,
    settings: &PollSettings,
    spawn: &dyn Fn(Job),
) -> Result<ShutdownReport, Error> {
    if !startup::check(&consumer, hub, &settings.startup)? {
        return Ok(ShutdownReport::default());
    }
    if let Some(t) = hub.transactions() {
        t.start().map_err(Error::from)?;
    }
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::kafka("subscribe", e))?;
    info!(topics = ?topics, "consumer subscribed");
    hub.metrics.start();
    hub.metrics.connection_state(true);
    if hub.lock().breaker().is_some() {
        hub.metrics.breaker_start();
    }
    if hub.lock().destinations().is_some() {
        hub.metrics.destinations_start();
    }
    let mut thread = PollThread::new(&consumer, hub, settings);
    thread.split = SplitQueue::new(&consumer, &consumer.context().split);
    hub.lifecycle.set(RunState::Running);
    let stopped_by = loop {
        hub.lifecycle.polled();
        if hub.stop_requested() {
            break None;
        }
        if let Some(e) = thread.housekeeping() {
            break Some(e);
        }
        let fatal = thread.poll_batch();
        thread.hand_over(spawn);
        if let Some(e) = fatal {
            break Some(Error::kafka("consume", e));
        }
        if let Some(failure) = hub.transactions().and_then(|t| t.failure()) {
            break Some(Error::from(failure));
        }
    };
    hub.lifecycle.set(RunState::Stopping);
    shutdown(&consumer, hub, settings.shutdown_timeout);
    thread.close_split();
    drop(thread);
    drop(consumer);
    let report = closing_report(hub);
    match stopped_by {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// At most this many bytes of ended records wait to be freed one per record read: a burst
/// of frees overflows the allocator's per-thread cache (glibc keeps 7 chunks per size), and
/// the next burst of reads then takes the slow path; interleaved, each read reuses the chunk
/// just freed. Bounded so that they add little to the consumer's memory.
const RETIRED_BYTES: usize = 256 * 1024;

/// The poll loop's state between iterations.
struct PollThread<'a> {
    consumer: &'a BaseConsumer<KourierContext>,
    hub: &'a Hub,
    settings: &'a PollSettings,
    last_commit: Instant,
    last_health: Instant,
    last_probe: Instant,
    last_deleted_check: Option<Instant>,
    /// Partitions of subscribed topics that were deleted (tracked again if they return).
    deleted: HashSet<Tp>,
    group_committed: GroupCommitted,
    /// The records of the last poll, handed to the scheduler in one lock.
    batch: Vec<(Arc<RawRecord>, usize)>,
    /// Jobs the workers ended since the last hand-over, dropped on this thread.
    spent: Vec<Job>,
    /// Records of those jobs, dropped one for each record read (see [`RETIRED_BYTES`]).
    retired: Vec<Arc<RawRecord>>,
    join: JoinWatch,
    /// The queue the assigned partitions' records come on, read in runs (see
    /// [`super::split`]); `None` when librdkafka gave none (records come with the
    /// consumer's other events).
    split: Option<SplitQueue<'a>>,
    /// Records taken from the split queue that did not fit the last batch (at most one run,
    /// `RUN - 1`): the next batch starts with them.
    pending: VecDeque<NativeMessage>,
}

/// Watches for a join that was lost: a consumer subscribed for [`JOIN_CHECK_AFTER`] without
/// partitions asks the coordinator for its group; when the group has no member at all (so
/// not this one either), the join was lost on the way — seen after a broker restart, where
/// the coordinator asked a new member to rejoin with its member id and never heard from it
/// again, leaving the consumer idle for good — and the consumer subscribes again (one
/// warning). A consumer that is a member without partitions (more members than partitions)
/// is left alone.
#[derive(Debug, Default)]
struct JoinWatch {
    /// Since when the consumer has had no partition (`None`: it has some).
    unassigned_since: Option<Instant>,
    /// When its assignment was last looked at (at most every [`JOIN_LOOK_EVERY`]: not on
    /// every turn of a busy poll loop).
    looked: Option<Instant>,
}

/// How often the join watch looks at the consumer's assignment.
const JOIN_LOOK_EVERY: Duration = Duration::from_secs(1);

impl JoinWatch {
    /// Whether to look at the assignment now.
    fn look(&mut self, now: Instant) -> bool {
        if self
            .looked
            .is_some_and(|t| now.saturating_duration_since(t) < JOIN_LOOK_EVERY)
        {
            return false;
        }
        self.looked = Some(now);
        true
    }

    /// Whether to ask the coordinator now, given whether the consumer has partitions.
    fn due(&mut self, assigned: bool, now: Instant) -> bool {
        if assigned {
            self.unassigned_since = None;
            return false;
        }
        let since = *self.unassigned_since.get_or_insert(now);
        if now.saturating_duration_since(since) < JOIN_CHECK_AFTER {
            return false;
        }
        // Asked now: the next look waits as long again.
        self.unassigned_since = Some(now);
        true
    }
}

/// Whether the coordinator's answer about the group shows the join was lost: the group has
/// no member (`Empty`, `Dead`), though this consumer is subscribed to it.
fn join_lost(state: &str, members: usize) -> bool {
    members == 0 && matches!(state, "Empty" | "Dead")
}

impl<'a> PollThread<'a> {
    fn new(
        consumer: &'a BaseConsumer<KourierContext>,
        hub: &'a Hub,
        settings: &'a PollSettings,
    ) -> Self {
        PollThread {
            consumer,
            hub,
            settings,
            last_commit: Instant::now(),
            last_health: Instant::now(),
            last_probe: Instant::now(),
            last_deleted_check: None,
            deleted: HashSet::new(),
            group_committed: GroupCommitted::default(),
            batch: Vec::with_capacity(settings.max_poll_batch),
            retired: Vec::new(),
            spent: Vec::new(),
            join: JoinWatch::default(),
            split: None,
            pending: VecDeque::new(),
        }
    }

    /// Drops the records read ahead, then the split queue (which stops the forwarding of
    /// partitions assigned from then on), before the consumer goes.
    fn close_split(&mut self) {
        self.pending.clear();
        self.split = None;
    }

    /// Drops the records read ahead of partitions revoked since the last look and of `tps`.
    fn drop_pending(&mut self, tps: &[Tp]) {
        let revoked = self.consumer.context().take_revoked();
        drop_pending_of(&mut self.pending, &revoked);
        drop_pending_of(&mut self.pending, tps);
    }

    /// Between polls: flow control, the interval commit, the monitor's partition ends, and
    /// while the cluster is unreachable a probe; an error when it has been unreachable past
    /// `max_broker_outage`.
    fn housekeeping(&mut self) -> Option<Error> {
        let (consumer, hub, settings) = (self.consumer, self.hub, self.settings);
        let changes = hub.lock().flow_control();
        apply_flow(consumer, &hub.metrics, &changes);
        let mut looked = false;
        if self.last_commit.elapsed() >= settings.commit_interval {
            commit_settled(consumer, hub, "interval");
            self.last_commit = Instant::now();
            looked = true;
        }
        if self.last_health.elapsed() >= HEALTH_EVERY {
            refresh_ends(consumer, hub, &mut self.group_committed);
            self.last_health = Instant::now();
            looked = true;
        }
        if looked {
            publish_caught_up(hub);
        }
        self.watch_join();
        let outage = hub.health.outage()?;
        if self.last_probe.elapsed() >= PROBE_EVERY {
            probe(consumer, hub, &settings.topics);
            self.last_probe = Instant::now();
        }
        let max = settings.max_broker_outage.filter(|max| outage >= *max)?;
        error!(?outage, max_broker_outage = ?max, "the kafka cluster has been unreachable longer than max_broker_outage: stopping");
        Some(Error::BrokersUnreachable {
            servers: settings.startup.servers.clone(),
            after: outage,
        })
    }

    /// The [`JoinWatch`]: a consumer long without partitions whose group has no member
    /// subscribes again.
    fn watch_join(&mut self) {
        let consumer = self.consumer;
        let now = Instant::now();
        if !self.join.look(now) {
            return;
        }
        let assigned = consumer.assignment().is_ok_and(|a| a.count() > 0);
        if !self.join.due(assigned, now) {
            return;
        }
        let group = &self.settings.group;
        let Ok(list) = consumer.fetch_group_list(Some(group.as_str()), Duration::from_secs(2))
        else {
            return;
        };
        let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
            return;
        };
        if !join_lost(g.state(), g.members().len()) {
            return;
        }
        warn!(
            group = %group,
            state = g.state(),
            unassigned_for = ?JOIN_CHECK_AFTER,
            "subscribed without partitions while the group has no member: the join was lost; subscribing again"
        );
        let topics: Vec<&str> = self.settings.topics.iter().map(String::as_str).collect();
        consumer.unsubscribe();
        if let Err(e) = consumer.subscribe(&topics) {
            warn!(group = %group, error = %e, "subscribing again failed; the next look tries again");
        }
    }

    /// Polls what fits the buffer into `batch`. A (nearly) full buffer: waits until workers
    /// made room for a batch (or [`POLL_TIMEOUT`]), then takes what fits. The consumer's
    /// queue is polled in any case (group membership, rebalances), and a poll that returns
    /// a record (of a partition not split) takes it: at least one record from there. The
    /// split queue is read only while there is room. Returns a fatal consumer error.
    fn poll_batch(&mut self) -> Option<KafkaError> {
        let (consumer, hub, settings) = (self.consumer, self.hub, self.settings);
        let (mut room, want, mut room_bytes) = {
            let s = hub.lock();
            (
                s.room(),
                s.batch_room(settings.max_poll_batch),
                s.room_bytes(),
            )
        };
        if room < want {
            hub.wait_for_room(POLL_TIMEOUT, want);
            let s = hub.lock();
            (room, room_bytes) = (s.room(), s.room_bytes());
        }
        let max_batch = room.clamp(1, settings.max_poll_batch);
        let mut timeout = if room >= want {
            POLL_TIMEOUT
        } else {
            Duration::ZERO
        };
        let (mut topic_missing, mut fatal) = (false, None);
        // Taken by bytes as well as by count: the byte bound holds within one record.
        let mut batch_bytes = 0usize;
        let split = self.split.is_some();
        // The consumer's own queue: its events, and records of partitions not split. With a
        // split queue, the wait (if any) is on that queue.
        while self.batch.len() < max_batch && (self.batch.is_empty() || batch_bytes < room_bytes) {
            match consumer.poll(if split { Duration::ZERO } else { timeout }) {
                Some(Ok(m)) => self.push(RawRecord::from_message(&m), &mut batch_bytes),
                Some(Err(e)) => {
                    fatal = self.consumer_error(e, &mut topic_missing);
                    if fatal.is_some() {
                        break;
                    }
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if fatal.is_none() && split {
            self.drop_pending(&[]);
            // By count and bytes, without the one record a poll takes whatever the room:
            // the split queue is read only when there is room (its consumer is polled all
            // the same), so the bound holds within one record.
            self.read_split(
                (room.min(settings.max_poll_batch), room_bytes),
                &mut batch_bytes,
                timeout,
                &mut topic_missing,
            );
        }
        // A partition's error read from the split queue is only logged (see the context).
        topic_missing |= consumer.context().take_topic_missing();
        if topic_missing
            && self
                .last_deleted_check
                .is_none_or(|t| t.elapsed() >= DELETED_CHECK_EVERY)
        {
            forget_deleted_topics(consumer, hub, &settings.topics, &mut self.deleted);
            let deleted: Vec<Tp> = self.deleted.iter().cloned().collect();
            drop_pending_of(&mut self.pending, &deleted);
            self.last_deleted_check = Some(Instant::now());
        }
        fatal
    }

    /// Moves what fits of the records read ahead into the batch, then takes runs from the
    /// split queue until the batch is full or the queue empty, waiting at most `wait` for
    /// the first run when the batch is empty and the consumer's queue holds nothing. A
    /// record fits while the batch holds fewer than `max_records` and fewer than
    /// `room_bytes` bytes (so none when there is no room).
    fn read_split(
        &mut self,
        (max_records, room_bytes): (usize, usize),
        batch_bytes: &mut usize,
        mut wait: Duration,
        topic_missing: &mut bool,
    ) {
        loop {
            while self.batch.len() < max_records && *batch_bytes < room_bytes {
                let Some(m) = self.pending.pop_front() else {
                    break;
                };
                match m.error() {
                    // A partition's error (never fatal: those come on the consumer's queue).
                    Some(code) => {
                        self.consumer_error(KafkaError::MessageConsumption(code), topic_missing);
                    }
                    None => {
                        let record = RawRecord::from_consumed(&m);
                        // Freed here, on the thread that read it.
                        drop(m);
                        self.push(record, batch_bytes);
                    }
                }
            }
            let full = self.batch.len() >= max_records || *batch_bytes >= room_bytes;
            let Some(split) = self.split.as_mut().filter(|_| !full) else {
                return;
            };
            if !self.batch.is_empty() || split.consumer_queue_busy() {
                wait = Duration::ZERO;
            }
            // A wait is for the first record only: librdkafka's batch read waits until the
            // run is full or the time is up, which would hold records back at low rates.
            let max = if wait.is_zero() {
                max_records - self.batch.len()
            } else {
                1
            };
            split.take(wait, max, &mut self.pending);
            if self.pending.is_empty() {
                return;
            }
            wait = Duration::ZERO;
        }
    }

    /// Adds a record read to the batch.
    fn push(&mut self, record: RawRecord, batch_bytes: &mut usize) {
        let record = Arc::new(record);
        let bytes = record.consumed_byte_len();
        *batch_bytes += bytes;
        self.batch.push((record, bytes));
        // One ended record freed per record read: the allocator hands its memory to the next
        // record from its per-thread cache.
        self.retired.pop();
    }

    /// A consumer error: notes a missing topic and logs it (throttled); a fatal one is
    /// returned.
    fn consumer_error(&self, e: KafkaError, topic_missing: &mut bool) -> Option<KafkaError> {
        if let KafkaError::MessageConsumptionFatal(code) = e {
            error!(%code, "fatal consumer error");
            return Some(e);
        }
        *topic_missing |= matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
        );
        if let Some(suppressed) = self.hub.throttle.admit(&e.to_string()) {
            warn!(error = %e, suppressed, "consumer error");
        }
        None
    }

    /// Hands the batch to the scheduler and the jobs that may start to workers (with an
    /// empty batch: records the outage breaker held, when it closes or lets one probe);
    /// then resets partitions whose records were given up outside a drain.
    fn hand_over(&mut self, spawn: &dyn Fn(Job)) {
        let hub = self.hub;
        let jobs = if self.batch.is_empty() {
            hub.lock().take_jobs()
        } else {
            // Records are no sign of a connection: after all brokers went down, librdkafka
            // still hands over what it fetched before. Only the probe's answer reconnects.
            hub.metrics
                .consumed(self.batch.iter().map(|(record, _)| &**record));
            let mut s = hub.lock();
            for (record, bytes) in self.batch.drain(..) {
                if !self.deleted.is_empty() {
                    // A deleted topic that came back: track its partition again.
                    let tp: Tp = (Arc::clone(&record.topic), record.partition);
                    if self.deleted.remove(&tp) {
                        info!(partition = %format_args!("{}/{}", tp.0, tp.1), "partition of a re-created topic: tracked again");
                        s.assign([tp]);
                    }
                }
                s.enqueue_shared(record, bytes);
            }
            s.take_jobs()
        };
        for job in jobs {
            spawn(job);
        }
        let resets = {
            let mut s = hub.lock();
            s.swap_spent(&mut self.spent);
            s.take_resets()
        };
        // Dropped here, where their records were allocated (see `Scheduler::keep_spent`):
        // the jobs now, their records one per record read next (up to `RETIRED_BYTES`; the
        // rest, and what the last reads left, now).
        self.retired.clear();
        let mut kept = 0usize;
        for record in self.spent.drain(..).flat_map(Job::into_records) {
            kept += record.buffer_len();
            if kept <= RETIRED_BYTES {
                self.retired.push(record);
            }
        }
        if !resets.is_empty() {
            reset(hub, self.consumer, &resets);
            // Read again from the commit point.
            self.drop_pending(&resets);
        }
    }
}

/// What the shutdown left, once the consumer is closed (a revoke while closing may have
/// committed what the final commit left).
fn closing_report(hub: &Hub) -> ShutdownReport {
    let commit_failure = hub.take_final_commit_failure();
    let ((abandoned, abandoned_records), left_for_later) = {
        let s = hub.lock();
        (s.abandoned_at_stop(), s.left_for_later_at_stop())
    };
    if abandoned > 0 {
        warn!(abandoned, first = ?abandoned_records.first(), "consumer closed: records were abandoned unsettled; they are delivered again after a restart");
    } else {
        info!("consumer closed");
    }
    ShutdownReport {
        abandoned,
        abandoned_records,
        left_for_later,
        uncommitted: commit_failure
            .as_ref()
            .map(FinalCommitFailure::uncommitted_display)
            .unwrap_or_default(),
        commit_error: commit_failure.map(|f| f.error),
    }
}

/// A disconnected consumer asks for the metadata of one topic: an answer means the cluster
/// is back.
fn probe(consumer: &BaseConsumer<KourierContext>, hub: &Hub, topics: &[String]) {
    if consumer
        .fetch_metadata(
            topics.first().map(String::as_str),
            Duration::from_millis(500),
        )
        .is_ok()
    {
        hub.set_connected(true);
    }
}

/// The group's committed offsets of assigned partitions this consumer has not read from yet,
/// looked up once per partition and assignment (a broker round trip, at most every
/// [`GROUP_COMMITTED_EVERY`]).
#[derive(Debug, Default)]
struct GroupCommitted {
    known: HashMap<(String, i32), Option<i64>>,
    last_lookup: Option<Instant>,
}

/// At most one lookup of the group's committed offsets this often.
const GROUP_COMMITTED_EVERY: Duration = Duration::from_secs(2);

impl GroupCommitted {
    /// Forgets partitions no longer assigned, then looks up those in `unknown` (no position
    /// and not looked up yet in this assignment).
    fn refresh(
        &mut self,
        consumer: &BaseConsumer<KourierContext>,
        assigned: &HashSet<(String, i32)>,
        unknown: Vec<(String, i32)>,
    ) {
        self.known.retain(|tp, _| assigned.contains(tp));
        let todo: Vec<_> = unknown
            .into_iter()
            .filter(|tp| !self.known.contains_key(tp))
            .collect();
        if todo.is_empty()
            || self
                .last_lookup
                .is_some_and(|t| t.elapsed() < GROUP_COMMITTED_EVERY)
        {
            return;
        }
        self.last_lookup = Some(Instant::now());
        // Keep the lists' scope tight (rust-rdkafka #453).
        let mut tpl = rdkafka::TopicPartitionList::with_capacity(todo.len());
        for (topic, partition) in &todo {
            tpl.add_partition(topic, *partition);
        }
        let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_millis(500)) else {
            return;
        };
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            self.known
                .insert((e.topic().to_owned(), e.partition()), offset);
        }
    }

    fn of(&self, tp: &(String, i32)) -> Option<i64> {
        self.known.get(tp).copied().flatten()
    }
}

/// Refreshes each assigned partition's cached watermarks and position for the monitor (no
/// request is sent), and the group's committed offset of partitions not read from yet.
fn refresh_ends(consumer: &BaseConsumer<KourierContext>, hub: &Hub, group: &mut GroupCommitted) {
    let mut ends: HashMap<(String, i32), PartitionEnd> = HashMap::new();
    {
        // Keep the list's scope tight (rust-rdkafka #453).
        let Ok(positions) = consumer.position() else {
            return;
        };
        for e in positions.elements() {
            let watermarks = cached_watermarks(consumer, e.topic(), e.partition());
            let position = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            ends.insert(
                (e.topic().to_owned(), e.partition()),
                PartitionEnd {
                    low: watermarks.map(|(low, _)| low),
                    high: watermarks.map(|(_, high)| high),
                    position,
                    group_committed: None,
                },
            );
        }
    }
    let assigned: HashSet<(String, i32)> = ends.keys().cloned().collect();
    let unknown = ends
        .iter()
        .filter(|(_, e)| e.position.is_none())
        .map(|(tp, _)| tp.clone())
        .collect();
    group.refresh(consumer, &assigned, unknown);
    for (tp, end) in &mut ends {
        end.group_committed = group.of(tp);
    }
    hub.health.set_ends(ends);
}

/// After "unknown topic" errors: subscribed topics that no longer exist leave the
/// assignment (with one warning), so the monitor and the commit point stop counting them.
fn forget_deleted_topics(
    consumer: &BaseConsumer<KourierContext>,
    hub: &Hub,
    topics: &[String],
    deleted: &mut HashSet<Tp>,
) {
    let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(2)) else {
        return;
    };
    let existing: HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    let gone: Vec<Tp> = {
        let s = hub.lock();
        s.assigned()
            .into_iter()
            .filter(|(t, _)| topics.iter().any(|s| s == &**t) && !existing.contains(&**t))
            .collect()
    };
    if gone.is_empty() {
        return;
    }
    warn!(partitions = ?tps_display(&gone), "subscribed topic deleted: its partitions leave the assignment (nothing more is committed for them)");
    hub.lock().remove(&gone);
    for (topic, partition) in &gone {
        hub.metrics.partition_revoked(topic, *partition);
    }
    deleted.extend(gone);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch asks the coordinator only after `JOIN_CHECK_AFTER` without partitions, then
    /// at most that often; partitions reset it.
    #[test]
    fn the_join_watch_asks_after_a_long_time_without_partitions() {
        let start = Instant::now();
        let at = |secs: u64| {
            start
                .checked_add(Duration::from_secs(secs))
                .expect("a near instant")
        };
        let mut w = JoinWatch::default();
        assert!(!w.due(false, at(0)));
        assert!(!w.due(false, at(29)));
        assert!(w.due(false, at(30)), "30 s without partitions");
        assert!(!w.due(false, at(45)), "not again before another 30 s");
        assert!(w.due(false, at(60)));
        assert!(!w.due(true, at(100)), "partitions: nothing to ask");
        assert!(!w.due(false, at(101)), "the wait starts again");
        assert!(w.due(false, at(131)));
    }

    /// The assignment is looked at once a second at most, not on every turn of the loop.
    #[test]
    fn the_join_watch_looks_once_a_second() {
        let start = Instant::now();
        let at = |ms: u64| {
            start
                .checked_add(Duration::from_millis(ms))
                .expect("a near instant")
        };
        let mut w = JoinWatch::default();
        assert!(w.look(at(0)));
        assert!(!w.look(at(10)));
        assert!(!w.look(at(999)));
        assert!(w.look(at(1_000)));
    }

    /// Only a group without any member means the join was lost: a member without partitions
    /// (more members than partitions) and a group rebalancing are left alone.
    #[test]
    fn a_join_is_lost_only_when_the_group_has_no_member() {
        assert!(join_lost("Empty", 0));
        assert!(join_lost("Dead", 0));
        assert!(!join_lost("Stable", 2), "an idle member of a stable group");
        assert!(!join_lost("PreparingRebalance", 1));
        assert!(!join_lost("CompletingRebalance", 0));
    }
}
