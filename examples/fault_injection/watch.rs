//! Waiting while the consumer works: for progress up to a fault's trigger point, for recovery
//! after a fault, for the end; restarting a consumer that died on its own on the way, and
//! noting the problems seen.

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
    pub(crate) fn settle(&mut self, fault: FaultKind) -> BoxResult<()> {
        let started = Instant::now();
        self.ledgers.poll();
        let mut max = vec![-1i64; self.log_end.len()];
        for e in &self.ledgers.effects {
            let p = e.partition as usize;
            max[p] = max[p].max(e.offset);
        }
        let limit = Duration::from_secs(180);
        loop {
            self.check_child()?;
            self.ledgers.poll();
            let commits = self.kafka.committed(&self.topic).ok();
            if commits
                .as_ref()
                .is_some_and(|c| max.iter().zip(c).all(|(m, c)| c > m))
            {
                log(format!(
                    "recovered from the {fault:?} fault after {:.1?}: commits pass all earlier effects ({} effects now)",
                    started.elapsed(),
                    self.ledgers.distinct
                ));
                return Ok(());
            }
            if started.elapsed() > limit || Instant::now() >= self.deadline {
                self.problems.push(format!(
                    "the consumer did not commit past its earlier effects within {limit:?} after the \
                     {fault:?} fault (commits {commits:?}, highest effected offsets {max:?})"
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every expected effect is in the ledgers, the commits reached the log end
    /// and the consumer reports itself idle; false on deadline or stall.
    pub(crate) fn wait_complete(&mut self) -> BoxResult<bool> {
        let mut last = (self.ledgers.distinct, None::<Vec<i64>>, Instant::now());
        loop {
            self.check_child()?;
            self.ledgers.poll();
            let commits = self.kafka.committed(&self.topic).ok();
            if self.ledgers.distinct + self.ledgers.outage_dead_lettered() >= self.expected_effects
                && commits.as_deref() == Some(self.log_end)
                && self
                    .consumers
                    .current
                    .last("status")
                    .is_some_and(|s| idle(&s, self.topic.1))
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

    /// Effects of consumer `index` at offsets not covered by `commits`.
    pub(crate) fn uncommitted_effects_of(&self, index: usize, commits: &[i64]) -> u64 {
        self.ledgers
            .effects
            .iter()
            .filter(|e| e.child == index && e.offset >= commits[e.partition as usize])
            .count() as u64
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
