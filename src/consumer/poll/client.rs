//! [`PollConsumer`]: the few operations of the rdkafka consumer that flow control,
//! rebalances, commits and the shutdown use — a seam, so that unit tests drive those steps
//! (the revoke wait, the shutdown deadline) with a fake consumer instead of a broker.
//!
//! The implementation for rdkafka's [`BaseConsumer`] makes exactly the calls those steps
//! made on it directly: a fake sees them in the same order.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// How long a reset's seek may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// See the module docs.
pub(crate) trait PollConsumer {
    /// Polls once, waiting at most `timeout`, and drops what it returns: the steps that use
    /// it run while the scheduler is stopping, which drops records that still arrive.
    fn poll_and_drop(&self, timeout: Duration);
    /// Commits exactly `offsets` (each the next offset to read), synchronously.
    fn commit_sync(&self, offsets: &TopicPartitionList) -> KafkaResult<()>;
    /// Pauses fetching the partitions of `partitions`.
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    /// Resumes fetching the partitions of `partitions`.
    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    /// Moves the fetch position of one partition to `offset` (a reset to its commit point),
    /// waiting at most `SEEK_TIMEOUT` for librdkafka.
    fn seek(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()>;
    /// Whether the current assignment was lost (another member may own it already).
    fn assignment_lost(&self) -> bool;
    /// The group's committed offsets of `partitions`, with their metadata, waiting at most
    /// `timeout`.
    fn committed(
        &self,
        partitions: &TopicPartitionList,
        timeout: Duration,
    ) -> KafkaResult<TopicPartitionList>;
    /// The consumer's group metadata (member, generation), for a transaction's offsets.
    fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        None
    }
}

impl<C: ConsumerContext> PollConsumer for BaseConsumer<C> {
    fn poll_and_drop(&self, timeout: Duration) {
        let _ = self.poll(timeout);
    }

    fn commit_sync(&self, offsets: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::commit(self, offsets, CommitMode::Sync)
    }

    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::pause(self, partitions)
    }

    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::resume(self, partitions)
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        Consumer::seek(self, topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
    }

    fn assignment_lost(&self) -> bool {
        Consumer::assignment_lost(self)
    }

    fn committed(
        &self,
        partitions: &TopicPartitionList,
        timeout: Duration,
    ) -> KafkaResult<TopicPartitionList> {
        Consumer::committed_offsets(self, partitions.clone(), timeout)
    }

    fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        Consumer::group_metadata(self)
    }
}

/// A fake consumer for unit tests: it records every call, answers commits as scripted, and
/// its polls wait their timeout and return nothing (an idle broker).
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use rdkafka::error::{KafkaError, KafkaResult};
    use rdkafka::{Offset, TopicPartitionList};

    use super::PollConsumer;
    use crate::ProcessingOrder;
    use crate::consumer::schedule::{Hub, Job, JobEnd, Limits, Scheduler, Tp, tps_of};
    use crate::record::RawRecord;

    /// The one partition of [`hub_running`]: `t/0`.
    pub(crate) fn tp() -> Tp {
        (Arc::from("t"), 0)
    }

    /// A hub whose partition `t/0` (unordered) has records `0..n` running: their jobs, in
    /// offset order, for the test's workers to end.
    pub(crate) fn hub_running(n: i64, revoke_timeout: Duration) -> (Arc<Hub>, Vec<Job>) {
        let limits = Limits {
            max_in_flight: 10,
            max_buffered_records: 100,
            max_buffered_bytes: 1 << 20,
            max_buffered_records_per_partition: 100,
            max_uncommitted_per_partition: 1_000,
        };
        let mut s = Scheduler::new(ProcessingOrder::Unordered, limits);
        s.assign([tp()]);
        for offset in 0..n {
            s.enqueue(RawRecord::builder("t").offset(offset).build());
        }
        let mut jobs = s.take_jobs();
        jobs.sort_by_key(|j| j.record.offset);
        assert_eq!(jobs.len(), usize::try_from(n).unwrap(), "every record runs");
        (Arc::new(Hub::for_tests(s, revoke_timeout)), jobs)
    }

    /// A worker that ends `job` with `end` after `after`.
    pub(crate) fn end_after(
        hub: &Arc<Hub>,
        job: Job,
        after: Duration,
        end: JobEnd,
    ) -> JoinHandle<()> {
        let hub = hub.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            assert!(hub.finish(job, end).is_none(), "nothing else to run");
        })
    }

    /// A worker whose record runs until it is given up (its `abandon` signal): it then
    /// ends it unsettled, and its thread returns when that was, after `started`.
    pub(crate) fn end_when_abandoned(
        hub: &Arc<Hub>,
        job: Job,
        started: Instant,
    ) -> JoinHandle<Duration> {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let at = wait_for(|| job.stop.abandon.is_cancelled(), started);
            hub.finish(job, JobEnd::Abandoned);
            at
        })
    }

    /// Records 0, 1, 2 of [`hub_running`] run around `step`: 0 and 2 settle after 20 and
    /// 40 ms, 1 runs until it is given up. Returns the fake consumer `step` used, how long
    /// `step` took and when record 1 was given up (both from the start).
    pub(crate) fn around_a_record_given_up(
        hub: &Arc<Hub>,
        jobs: Vec<Job>,
        step: impl FnOnce(&FakeConsumer),
    ) -> (FakeConsumer, Duration, Duration) {
        let [j0, j1, j2] = <[_; 3]>::try_from(jobs).expect("three jobs");
        let started = Instant::now();
        let ms = Duration::from_millis(1);
        let workers = [
            end_after(hub, j0, 20 * ms, JobEnd::Settled),
            end_after(hub, j2, 40 * ms, JobEnd::Settled),
        ];
        let given_up = end_when_abandoned(hub, j1, started);
        let consumer = FakeConsumer::new();
        step(&consumer);
        let took = started.elapsed();
        let given_up_at = given_up.join().unwrap();
        for w in workers {
            w.join().unwrap();
        }
        (consumer, took, given_up_at)
    }

    /// Waits (at most 10 s) until `fired`; returns when it did, after `started`.
    pub(crate) fn wait_for(fired: impl Fn() -> bool, started: Instant) -> Duration {
        while !fired() {
            assert!(started.elapsed() < Duration::from_secs(10), "never fired");
            std::thread::sleep(Duration::from_millis(1));
        }
        started.elapsed()
    }

    /// One call made on the [`FakeConsumer`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        Poll(Duration),
        /// The offsets committed (whether the commit succeeded or not).
        Commit(Vec<(Tp, i64)>),
        Pause(Vec<Tp>),
        Resume(Vec<Tp>),
        Seek(Tp, i64),
    }

    /// See the module docs.
    #[derive(Debug)]
    pub(crate) struct FakeConsumer {
        calls: Mutex<Vec<(Instant, Call)>>,
        /// Answers of the next commits, in order; `Ok(())` once they are used up.
        commit_answers: Mutex<VecDeque<KafkaResult<()>>>,
        lost: bool,
        started: Instant,
    }

    impl FakeConsumer {
        pub(crate) fn new() -> Self {
            FakeConsumer {
                calls: Mutex::default(),
                commit_answers: Mutex::default(),
                lost: false,
                started: Instant::now(),
            }
        }

        /// A consumer whose assignment was lost.
        pub(crate) fn lost() -> Self {
            FakeConsumer {
                lost: true,
                ..FakeConsumer::new()
            }
        }

        /// The next commits fail with `error`, `times` times.
        pub(crate) fn fail_commits(&self, times: usize, error: &KafkaError) {
            let mut answers = self.commit_answers.lock().unwrap();
            answers.extend((0..times).map(|_| Err(error.clone())));
        }

        /// Every call so far, in order.
        pub(crate) fn calls(&self) -> Vec<Call> {
            let calls = self.calls.lock().unwrap();
            calls.iter().map(|(_, c)| c.clone()).collect()
        }

        /// Every call but the polls, in order.
        pub(crate) fn calls_but_polls(&self) -> Vec<Call> {
            let mut calls = self.calls();
            calls.retain(|c| !matches!(c, Call::Poll(_)));
            calls
        }

        /// The offsets of each commit, in order.
        pub(crate) fn commits(&self) -> Vec<Vec<(Tp, i64)>> {
            self.calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::Commit(offsets) => Some(offsets),
                    _ => None,
                })
                .collect()
        }

        /// How long after the fake was made each commit was made.
        pub(crate) fn commit_times(&self) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            calls
                .iter()
                .filter(|(_, c)| matches!(c, Call::Commit(_)))
                .map(|(at, _)| at.duration_since(self.started))
                .collect()
        }

        fn record(&self, call: Call) {
            self.calls.lock().unwrap().push((Instant::now(), call));
        }
    }

    fn offsets_of(tpl: &TopicPartitionList) -> Vec<(Tp, i64)> {
        tpl.elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    other => panic!("a commit of a logical offset: {other:?}"),
                };
                ((e.topic().into(), e.partition()), offset)
            })
            .collect()
    }

    impl PollConsumer for FakeConsumer {
        fn poll_and_drop(&self, timeout: Duration) {
            self.record(Call::Poll(timeout));
            std::thread::sleep(timeout);
        }

        fn commit_sync(&self, offsets: &TopicPartitionList) -> KafkaResult<()> {
            self.record(Call::Commit(offsets_of(offsets)));
            let answer = self.commit_answers.lock().unwrap().pop_front();
            answer.unwrap_or(Ok(()))
        }

        fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
            self.record(Call::Pause(tps_of(partitions)));
            Ok(())
        }

        fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
            self.record(Call::Resume(tps_of(partitions)));
            Ok(())
        }

        fn seek(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
            self.record(Call::Seek((topic.into(), partition), offset));
            Ok(())
        }

        fn assignment_lost(&self) -> bool {
            self.lost
        }

        fn committed(
            &self,
            partitions: &TopicPartitionList,
            _timeout: Duration,
        ) -> KafkaResult<TopicPartitionList> {
            Ok(partitions.clone())
        }
    }
}
