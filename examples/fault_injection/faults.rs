//! The faults: which ones, in what order and at what point of progress (the plan), and
//! injecting each one — a consumer kill, a broker restart, a Redis outage — while counting
//! what the checks must allow for afterwards.

use std::time::Duration;

use crate::broker::BrokerControl;
use crate::cli::RunArgs;
use crate::procs::ChildRecord;
use crate::redis::RedisServer;
use crate::watch::Watch;
use crate::{BoxResult, log};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    Kill,
    Broker,
    Redis,
}

/// The faults of a run, in random order, each with the share of the effects after which it
/// comes.
pub(crate) struct Plan {
    pub(crate) kinds: Vec<FaultKind>,
    pub(crate) triggers: Vec<f64>,
}

impl Plan {
    pub(crate) fn new(
        kills: u32,
        broker_restarts: u32,
        redis_outages: u32,
        rng: &mut fastrand::Rng,
    ) -> Plan {
        let mut kinds: Vec<FaultKind> = std::iter::repeat_n(FaultKind::Kill, kills as usize)
            .chain(std::iter::repeat_n(
                FaultKind::Broker,
                broker_restarts as usize,
            ))
            .chain(std::iter::repeat_n(
                FaultKind::Redis,
                redis_outages as usize,
            ))
            .collect();
        rng.shuffle(&mut kinds);
        // Faults at random points of the first 60 % of the effects: each one's recovery takes
        // seconds while records keep flowing, so later faults still meet a busy consumer.
        let slots = kinds.len() as f64;
        let triggers: Vec<f64> = (0..kinds.len())
            .map(|i| (i as f64 + 0.2 + rng.f64() * 0.6) / slots * 0.6)
            .collect();
        Plan { kinds, triggers }
    }

    /// Simulated work per record when `--work-ms` is not given: paced so that consuming takes
    /// about 18 s per fault.
    pub(crate) fn default_work_ms(&self, max_in_flight: usize, expected_effects: usize) -> u64 {
        let target_secs = (18.0 * self.kinds.len() as f64).max(20.0);
        let per_record_ms =
            max_in_flight as f64 * target_secs * 1000.0 / expected_effects.max(1) as f64;
        (per_record_ms - 10.0).clamp(0.0, 200.0) as u64
    }
}

/// Injects the planned faults and counts what they did.
pub(crate) struct Injector<'a> {
    pub(crate) args: &'a RunArgs,
    pub(crate) broker: Option<&'a BrokerControl>,
    pub(crate) broker_restarts: u32,
    pub(crate) redis: Option<&'a mut RedisServer>,
    pub(crate) redis_outages: u32,
    pub(crate) kills_done: u32,
    pub(crate) broker_done: u32,
    pub(crate) redis_done: u32,
    /// Dead letters that may be written twice: those not committed at a kill or broker
    /// restart.
    pub(crate) dlt_allowance: u64,
    /// The commits just before the broker restart in progress.
    broker_commits: Option<Vec<i64>>,
}

impl<'a> Injector<'a> {
    pub(crate) fn new(
        args: &'a RunArgs,
        broker: Option<&'a BrokerControl>,
        broker_restarts: u32,
        redis: Option<&'a mut RedisServer>,
        redis_outages: u32,
    ) -> Injector<'a> {
        Injector {
            args,
            broker,
            broker_restarts,
            redis,
            redis_outages,
            kills_done: 0,
            broker_done: 0,
            redis_done: 0,
            dlt_allowance: 0,
            broker_commits: None,
        }
    }

    /// Injects `fault` now, when the ledgers hold `at` of `expected_effects` effects.
    pub(crate) fn inject(
        &mut self,
        fault: FaultKind,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
    ) -> BoxResult<()> {
        match fault {
            FaultKind::Kill => self.kill(at, expected_effects, watch),
            FaultKind::Broker => self.restart_broker(at, expected_effects, watch),
            FaultKind::Redis => self.redis_outage(at, expected_effects),
        }
    }

    /// Once the consumer recovered from `fault`: after a broker restart, redelivered records
    /// skip their effects (the store says done), but dead letters are not marked done: those
    /// the lost partitions had not committed are written again.
    pub(crate) fn settled(&mut self, fault: FaultKind, watch: &Watch<'_>) {
        if fault == FaultKind::Broker {
            let letters = watch.uncommitted_dead_letters(self.broker_commits.take().as_deref());
            log(format!(
                "dead letters not committed before the broker restart: {letters}"
            ));
            self.dlt_allowance += letters;
        }
    }

    /// Stops the consumer (SIGKILL, or SIGTERM with `--clean-restarts`) and starts the next.
    fn kill(&mut self, at: usize, expected_effects: usize, watch: &mut Watch<'_>) -> BoxResult<()> {
        let clean = self.args.clean_restarts;
        let current = &mut watch.consumers.current;
        let child_index = current.index;
        let (status, how) = if clean {
            (current.terminate(Duration::from_secs(60))?, "SIGTERM")
        } else {
            (current.kill()?, "SIGKILL")
        };
        watch.ledgers.poll();
        // Commits cannot move any more: what the next consumer will redo is fixed.
        let commits = watch.commits_retrying();
        let exposure = commits
            .as_ref()
            .map(|c| watch.uncommitted_effects_of(child_index, c));
        let letters = watch.uncommitted_dead_letters(commits.as_deref());
        self.dlt_allowance += letters;
        log(format!(
            "kill {}/{}: {how} consumer #{child_index} at {at}/{expected_effects} effects ({status}); \
             not yet committed: {} of its effects, {letters} dead letters",
            self.kills_done + 1,
            self.args.kills,
            exposure.map_or("unknown (commits unreadable)".into(), |n| n.to_string())
        ));
        if clean && !status.success() {
            watch.problems.push(format!(
                "consumer #{child_index} did not shut down cleanly on SIGTERM: {status}"
            ));
        }
        watch.consumers.children.push(ChildRecord {
            index: child_index,
            killed: !clean,
            uncommitted_at_kill: exposure,
        });
        self.kills_done += 1;
        watch.start_next_consumer()
    }

    /// SIGKILLs the broker and starts it again after `--broker-down-secs`.
    fn restart_broker(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &Watch<'_>,
    ) -> BoxResult<()> {
        let broker = self.broker.expect("planned only with a broker control");
        log(format!(
            "broker restart {}/{}: at {at}/{expected_effects} effects",
            self.broker_done + 1,
            self.broker_restarts
        ));
        // Commits before the kill: if the consumer's session times out while the broker is
        // down, it loses its partitions and redoes everything from here on.
        self.broker_commits = watch.commits_retrying();
        let took = broker.kill_and_restart(Duration::from_secs(self.args.broker_down_secs))?;
        log(format!("broker back after {took:.1?}"));
        self.broker_done += 1;
        Ok(())
    }

    /// Kills the idempotency Redis for `--redis-down-secs`, then restarts it empty.
    fn redis_outage(&mut self, at: usize, expected_effects: usize) -> BoxResult<()> {
        let redis = self.redis.as_mut().expect("planned only with a store");
        log(format!(
            "redis outage {}/{}: killing the idempotency Redis for {} s at {at}/{expected_effects} effects",
            self.redis_done + 1,
            self.redis_outages,
            self.args.redis_down_secs
        ));
        redis.kill();
        std::thread::sleep(Duration::from_secs(self.args.redis_down_secs));
        redis.restart()?;
        log("redis restarted empty on the same port: done marks are gone");
        self.redis_done += 1;
        Ok(())
    }
}
