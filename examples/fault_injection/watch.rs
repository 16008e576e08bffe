//! Waiting while the consumer works: for progress up to a fault's trigger point, for recovery
//! after a fault, for the end; restarting a consumer that died on its own on the way, and
//! noting the problems seen.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::faults::FaultKind;
use crate::kafka::Kafka;
use crate::ledger::Ledgers;
use crate::procs::{ChildRecord, Consumers, idle};
use crate::{BoxResult, log};

/// Drives waits: reads the ledgers and commits, restarts a consumer that died on its own.
pub(crate) struct Watch<'a> {
    pub(crate) kafka: &'a Kafka,
    /// The source topic and its partition count.
    pub(crate) topic: (String, i32),
    /// The dead-letter topic and its partition count.
    pub(crate) dlt: (String, i32),
    /// `--compose`: the tier topics and their partition counts, in tier order.
    pub(crate) tiers: Vec<(String, i32)>,
    pub(crate) ledgers: &'a mut Ledgers,
    pub(crate) log_end: &'a [i64],
    pub(crate) expected_effects: usize,
    pub(crate) deadline: Instant,
    pub(crate) consumers: Consumers,
    /// What went wrong so far (the run fails when there is anything).
    pub(crate) problems: Vec<String>,
}

/// How long the consumer may make no progress at all before the runner stops waiting.
const STALL: Duration = Duration::from_secs(120);

impl Watch<'_> {
    /// A consumer that exited although nobody stopped it is a failure; start another so the
    /// run can still check for loss.
    fn check_child(&mut self) -> BoxResult<()> {
        if let Some(status) = self.consumers.current.child.try_wait()? {
            let index = self.consumers.current.index;
            self.problems.push(format!(
                "consumer #{index} exited on its own: {status} (see {})",
                self.consumers
                    .spawn
                    .work_dir
                    .join(format!("consumer-{index:02}.log"))
                    .display()
            ));
            log(format!(
                "consumer #{index} exited on its own ({status}); starting another"
            ));
            self.consumers.children.push(ChildRecord {
                index,
                killed: true,
                uncommitted_at_kill: None,
                zombie: None,
            });
            self.start_next_consumer()?;
        }
        Ok(())
    }

    /// Partitions of the source and tier topics together: a lone consumer holds them all.
    pub(crate) fn assigned_partitions(&self) -> i32 {
        self.topic.1 + self.tiers.iter().map(|t| t.1).sum::<i32>()
    }

    /// Starts the consumer after the current one (which has exited, or been stopped).
    pub(crate) fn start_next_consumer(&mut self) -> BoxResult<()> {
        let next = self.consumers.current.index + 1;
        self.consumers.current = self.consumers.spawn.spawn(next, self.ledgers)?;
        Ok(())
    }

    pub(crate) fn wait_progress(&mut self, target: usize) -> BoxResult<()> {
        let mut last = (self.ledgers.distinct, Instant::now());
        while self.ledgers.distinct + self.ledgers.outage_exhausted
            < target.min(self.expected_effects)
        {
            if Instant::now() >= self.deadline || last.1.elapsed() > STALL {
                log(format!(
                    "no progress to {target} effects (at {}); running the fault anyway",
                    self.ledgers.distinct
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
            self.ledgers.poll();
            if self.ledgers.distinct != last.0 {
                last = (self.ledgers.distinct, Instant::now());
            }
            self.check_child()?;
        }
        Ok(())
    }

    /// Waits until the consumer recovered from `fault`: its commits pass every effect made
    /// so far. Only then is the next fault injected, so the windows of records a fault can
    /// make repeat never overlap: a Redis restart (done marks lost) during the redelivery
    /// that a kill or a lost assignment causes would repeat all of that window.
    ///
    /// With `--compose`, the source commits must also pass every record that had an outcome
    /// (a forwarded or dead-lettered record has no effect), and then each tier in turn is
    /// committed up to its log end as it is once the level before it settled: every tier
    /// copy the fault can have made (a forward repeated after a kill, and its forwards on)
    /// is settled before the next fault.
    pub(crate) fn settle(&mut self, fault: FaultKind) -> BoxResult<()> {
        let started = Instant::now();
        self.ledgers.poll();
        let mut target = vec![0i64; self.log_end.len()];
        for e in self.ledgers.effects.iter().filter(|e| e.tier == 0) {
            let p = e.partition as usize;
            target[p] = target[p].max(e.offset + 1);
        }
        if !self.tiers.is_empty() {
            for (&(tier, p), &offset) in &self.ledgers.outcomes.max_offset {
                if tier == 0 && (p as usize) < target.len() {
                    target[p as usize] = target[p as usize].max(offset + 1);
                }
            }
        }
        let limit = Duration::from_secs(180);
        let source = self.topic.clone();
        if !self.wait_committed(&source, &target, fault, started, limit)? {
            return Ok(());
        }
        for tier in self.tiers.clone() {
            let Ok(end) = self.kafka.log_end(&tier.0, tier.1) else {
                self.problems.push(format!(
                    "the log end of {} could not be read after the {fault:?} fault",
                    tier.0
                ));
                return Ok(());
            };
            if !self.wait_committed(&tier, &end, fault, started, limit)? {
                return Ok(());
            }
        }
        log(format!(
            "recovered from the {fault:?} fault after {:.1?}: commits pass all earlier effects{} ({} effects now)",
            started.elapsed(),
            if self.tiers.is_empty() {
                ""
            } else {
                " and outcomes, and every tier copy made until then"
            },
            self.ledgers.distinct
        ));
        Ok(())
    }

    /// Waits until the group's commits of `topic` reach `target` in every partition; false
    /// (and a problem noted) when `limit` since `started` or the deadline passes first.
    fn wait_committed(
        &mut self,
        topic: &(String, i32),
        target: &[i64],
        fault: FaultKind,
        started: Instant,
        limit: Duration,
    ) -> BoxResult<bool> {
        loop {
            self.check_child()?;
            self.ledgers.poll();
            let commits = self.kafka.committed(topic).ok();
            if commits
                .as_ref()
                .is_some_and(|c| target.iter().zip(c).all(|(t, c)| c >= t))
            {
                return Ok(true);
            }
            if started.elapsed() > limit || Instant::now() >= self.deadline {
                self.problems.push(format!(
                    "the consumer did not commit {} past its earlier records within {limit:?} after the \
                     {fault:?} fault (commits {commits:?}, wanted {target:?})",
                    topic.0
                ));
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every expected effect is in the ledgers, the commits reached the log end
    /// and the consumer reports itself idle; false on deadline or stall. With `--compose`,
    /// also every tier topic committed to its log end. (The consumer's monitor's own
    /// `caught_up` is not waited for: see [`Watch::monitor_caught_up`].)
    pub(crate) fn wait_complete(&mut self) -> BoxResult<bool> {
        let mut last = (self.ledgers.distinct, None::<Vec<i64>>, Instant::now());
        loop {
            self.check_child()?;
            self.ledgers.poll();
            let commits = self.kafka.committed(&self.topic).ok();
            let status = self.consumers.current.last("status");
            if self.ledgers.distinct + self.ledgers.outage_dead_lettered() >= self.expected_effects
                && commits.as_deref() == Some(self.log_end)
                && status
                    .as_ref()
                    .is_some_and(|s| idle(s, self.assigned_partitions()))
                && (self.tiers.is_empty() || self.tiers_at_log_end())
            {
                return Ok(true);
            }
            if self.ledgers.distinct != last.0 || commits != last.1 {
                last = (self.ledgers.distinct, commits, Instant::now());
            }
            if Instant::now() >= self.deadline || last.2.elapsed() > STALL {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to 30 s) until the consumer is saturated — at least half of `max_in_flight`
    /// in flight in its last status line — and its group's commits moved within the last
    /// 300 ms, so that a broker kill meets commits in progress. Returns what it saw.
    pub(crate) fn wait_loaded(&mut self, max_in_flight: usize) -> BoxResult<String> {
        let started = Instant::now();
        let want = (max_in_flight as u64).div_ceil(2);
        let mut before = self.kafka.committed(&self.topic).ok();
        loop {
            self.check_child()?;
            std::thread::sleep(Duration::from_millis(300));
            self.ledgers.poll();
            let now = self.kafka.committed(&self.topic).ok();
            let in_flight = self
                .consumers
                .current
                .last("status")
                .and_then(|s| s["in_flight"].as_u64())
                .unwrap_or(0);
            let advanced = match (&before, &now) {
                (Some(b), Some(n)) => n.iter().sum::<i64>() - b.iter().sum::<i64>(),
                _ => 0,
            };
            if in_flight >= want && advanced > 0 {
                return Ok(format!(
                    "under load: {in_flight} records in flight, commits advanced by {advanced} records in the last 300 ms"
                ));
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Ok(format!(
                    "NOT under load after 30 s ({in_flight} in flight, commits advanced by {advanced}); restarting anyway"
                ));
            }
            before = now;
        }
    }

    /// Whether the current consumer's monitor reports it caught up
    /// (`ConsumerSnapshot::caught_up`) in a status line within the next 2 s (they come
    /// every 500 ms). Reported, not checked: on a consumer started after a kill, a partition
    /// it was assigned at its end and never read a record from has no known lag, so the
    /// monitor says not caught up although every offset is committed.
    pub(crate) fn monitor_caught_up(&mut self) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let status = self.consumers.current.last("status");
            if status.is_some_and(|s| s["caught_up"] == true) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether every tier topic is committed to its log end.
    fn tiers_at_log_end(&self) -> bool {
        self.tiers.iter().all(
            |t| match (self.kafka.committed(t), self.kafka.log_end(&t.0, t.1)) {
                (Ok(c), Ok(end)) => c == end,
                _ => false,
            },
        )
    }

    /// The group's commits of the source topic, then of each tier topic (`--compose`),
    /// retried for a few seconds while the broker does not answer.
    pub(crate) fn all_commits_retrying(&self) -> Option<Vec<Vec<i64>>> {
        let mut all = vec![self.commits_retrying()?];
        for tier in &self.tiers {
            all.push(self.commits_of_retrying(tier)?);
        }
        Some(all)
    }

    fn commits_of_retrying(&self, topic: &(String, i32)) -> Option<Vec<i64>> {
        for _ in 0..20 {
            if let Ok(c) = self.kafka.committed(topic) {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    /// The group's commits, retried for a few seconds while the broker does not answer.
    pub(crate) fn commits_retrying(&self) -> Option<Vec<i64>> {
        for _ in 0..20 {
            if let Ok(c) = self.kafka.committed(&self.topic) {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    /// Effects of consumer `index` at offsets not covered by `commits` (per topic: the
    /// source's, then each tier's, see [`Watch::all_commits_retrying`]).
    pub(crate) fn uncommitted_effects_of(&self, index: usize, commits: &[Vec<i64>]) -> u64 {
        self.ledgers
            .effects
            .iter()
            .filter(|e| {
                e.child == index
                    && commits
                        .get(e.tier as usize)
                        .and_then(|c| c.get(e.partition as usize))
                        .is_some_and(|&c| e.offset >= c)
            })
            .count() as u64
    }

    /// Each consumer process's `skipped_finished` so far (its latest status line; see
    /// [`crate::procs::skipped_finished`]), by index.
    pub(crate) fn skipped_by_process(&self) -> BTreeMap<usize, u64> {
        (0..=self.consumers.current.index)
            .map(|i| {
                let out = self.consumers.spawn.out_path(i);
                (i, crate::procs::skipped_finished(&out))
            })
            .collect()
    }

    /// Events in the dead-letter topic now whose source offsets `commits` does not cover
    /// (all of them when the commits are unknown).
    pub(crate) fn uncommitted_dead_letters(&self, commits: Option<&[i64]>) -> u64 {
        let letters = match self.kafka.read_all(&self.dlt.0, self.dlt.1) {
            Ok(l) => l,
            Err(e) => {
                log(format!("cannot read the dead letters: {e}"));
                return 0;
            }
        };
        let mut ids: Vec<u64> = letters
            .iter()
            .filter(|l| match (commits, l.source) {
                (Some(c), Some((p, o))) => c.get(p as usize).is_none_or(|&c| o >= c),
                _ => true,
            })
            .filter_map(|l| l.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as u64
    }
}
