//! The faults: which ones, in what order and at what point of progress (the plan), and
//! injecting each one — a consumer kill, a broker restart (at a random moment or under load),
//! a Redis outage, a zombie consumer, a downstream outage — while counting what the checks
//! must allow for afterwards.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::broker::BrokerControl;
use crate::cli::RunArgs;
use crate::ledger::now_ms;
use crate::outcomes::{self, Kind, Tail};
use crate::procs::{ChildRecord, ConsumerProc, ZombieRecord, signal};
use crate::redis::RedisServer;
use crate::watch::Watch;
use crate::{BoxResult, LEASE, SESSION_TIMEOUT, TIER_DELAYS, log};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    Kill,
    /// A SIGKILL right after the consumer reported a dead letter.
    DltKill,
    Broker,
    /// A broker restart once the consumer is saturated and its commits are moving.
    LoadedBroker,
    Redis,
    /// SIGSTOP past the session timeout and the lease while a second consumer takes over.
    Zombie,
    /// Every handler call that reaches the downstream fails transiently for a while.
    Outage,
}

/// How many of each fault a run injects.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    /// Every kill, those right after a dead letter included.
    pub(crate) kills: u32,
    /// Of the kills, those right after a dead letter.
    pub(crate) dlt_kills: u32,
    pub(crate) broker_restarts: u32,
    pub(crate) loaded_broker_restarts: u32,
    pub(crate) redis_outages: u32,
    pub(crate) zombies: u32,
    pub(crate) outages: u32,
}

/// The faults of a run, in random order, each with the share of the effects after which it
/// comes.
pub(crate) struct Plan {
    pub(crate) kinds: Vec<FaultKind>,
    pub(crate) triggers: Vec<f64>,
}

impl Plan {
    /// `composed`: the `--compose` order (see below) instead of a random one.
    pub(crate) fn new(c: Counts, rng: &mut fastrand::Rng, composed: bool) -> Plan {
        let mut kinds: Vec<FaultKind> = [
            (FaultKind::Kill, c.kills - c.dlt_kills),
            (FaultKind::DltKill, c.dlt_kills),
            (FaultKind::Broker, c.broker_restarts),
            (FaultKind::LoadedBroker, c.loaded_broker_restarts),
            (FaultKind::Redis, c.redis_outages),
            (FaultKind::Zombie, c.zombies),
            (FaultKind::Outage, c.outages),
        ]
        .into_iter()
        .flat_map(|(kind, n)| std::iter::repeat_n(kind, n as usize))
        .collect();
        rng.shuffle(&mut kinds);
        if composed {
            // A compose run's recoveries are long (tier copies must drain too) while records
            // keep flowing, so its later faults meet a consumer near the end of its work. The
            // faults that need a busy consumer come first: the downstream outage (with little
            // traffic a lone record may use up its attempts before the breaker can tell an
            // outage from a record failing on its own, as the breaker's docs say), then the
            // kill right after a dead letter (it needs letters still to come).
            let rank = |k: &FaultKind| match k {
                FaultKind::Outage => 0,
                FaultKind::DltKill => 1,
                _ => 2,
            };
            kinds.sort_by_key(rank);
        }
        // Faults at random points of the first 60 % of the effects (40 % in a compose run):
        // each one's recovery takes seconds while records keep flowing, so later faults still
        // meet a busy consumer.
        let span = if composed { 0.4 } else { 0.6 };
        let slots = kinds.len() as f64;
        let triggers: Vec<f64> = (0..kinds.len())
            .map(|i| (i as f64 + 0.2 + rng.f64() * 0.6) / slots * span)
            .collect();
        Plan { kinds, triggers }
    }

    /// Simulated work per record when `--work-ms` is not given: paced so that consuming takes
    /// about 18 s per fault (45 s per zombie). `max_ms`: the most it may be (200 ms; 300 ms
    /// with `--compose`, whose tiers slow a small run down on their own).
    pub(crate) fn default_work_ms(
        &self,
        max_in_flight: usize,
        expected_effects: usize,
        max_ms: f64,
    ) -> u64 {
        // A zombie takes longer: the newcomer's join, a 12 s freeze, the rejoin and the leave.
        let target_secs: f64 = self
            .kinds
            .iter()
            .map(|k| if *k == FaultKind::Zombie { 45.0 } else { 18.0 })
            .sum::<f64>()
            .max(20.0);
        let per_record_ms =
            max_in_flight as f64 * target_secs * 1000.0 / expected_effects.max(1) as f64;
        (per_record_ms - 10.0).clamp(0.0, max_ms) as u64
    }
}

/// Injects the planned faults and counts what they did.
pub(crate) struct Injector<'a> {
    pub(crate) args: &'a RunArgs,
    pub(crate) broker: Option<&'a BrokerControl>,
    /// The planned counts.
    pub(crate) planned: Counts,
    pub(crate) redis: Option<&'a mut RedisServer>,
    /// The faults injected so far.
    pub(crate) done: Counts,
    /// The downstream-outage flag file the consumers watch.
    pub(crate) outage_flag: PathBuf,
    /// A resumed zombie, stopped (SIGTERM) once the consumers recovered.
    /// Also its status lines when it was resumed.
    zombie: Option<(ConsumerProc, ChildRecord, usize)>,
    /// The commits before the zombie fault in progress began.
    zombie_commits: Option<Vec<i64>>,
    /// Dead letters that may be written twice: those not committed at a kill or broker
    /// restart.
    pub(crate) dlt_allowance: u64,
    /// The commits just before the broker restart in progress.
    broker_commits: Option<Vec<i64>>,
    /// When the idempotency Redis was killed (ms since the epoch).
    pub(crate) redis_kills_ms: Vec<u64>,
    /// The dead letters the kills right after a dead letter followed.
    pub(crate) dlt_kill_notes: Vec<DltKillNote>,
    /// When the last kill's signal was sent (ms since the epoch).
    last_kill_ms: u64,
    /// The last kill: records finished (an outcome noted) at offsets the group's commits did
    /// not cover once the process was dead (see [`crate::replays`]).
    pub(crate) finished_above: Option<u64>,
}

/// A kill right after a dead letter: which one it followed, and how soon.
#[derive(Debug, Clone)]
pub(crate) struct DltKillNote {
    /// The dead-lettered event (`None`: no dead letter came within the wait).
    pub(crate) id: Option<u64>,
    /// Its failure kind and the tier it was in.
    pub(crate) what: String,
    /// From the outcome line's time to the SIGKILL, ms.
    pub(crate) latency_ms: u64,
}

impl<'a> Injector<'a> {
    pub(crate) fn new(
        args: &'a RunArgs,
        broker: Option<&'a BrokerControl>,
        planned: Counts,
        redis: Option<&'a mut RedisServer>,
        outage_flag: PathBuf,
    ) -> Injector<'a> {
        Injector {
            args,
            broker,
            planned,
            redis,
            done: Counts::default(),
            outage_flag,
            zombie: None,
            zombie_commits: None,
            dlt_allowance: 0,
            broker_commits: None,
            redis_kills_ms: Vec::new(),
            dlt_kill_notes: Vec::new(),
            last_kill_ms: 0,
            finished_above: None,
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
            FaultKind::Kill => self.kill(at, expected_effects, watch, ""),
            FaultKind::DltKill => self.kill_after_dead_letter(at, expected_effects, watch),
            FaultKind::Broker => self.restart_broker(at, expected_effects, watch, false),
            FaultKind::LoadedBroker => self.restart_broker(at, expected_effects, watch, true),
            FaultKind::Redis => self.redis_outage(at, expected_effects),
            FaultKind::Zombie => self.zombie(at, expected_effects, watch),
            FaultKind::Outage => self.outage(at, expected_effects, watch),
        }
    }

    /// Once the consumer recovered from `fault`: after a broker restart, redelivered records
    /// skip their effects (the store says done), but dead letters are not marked done: those
    /// the lost partitions had not committed are written again.
    /// A resumed zombie is stopped (SIGTERM) here.
    pub(crate) fn settled(&mut self, fault: FaultKind, watch: &mut Watch<'_>) -> BoxResult<()> {
        if matches!(fault, FaultKind::Broker | FaultKind::LoadedBroker) {
            let letters = watch.uncommitted_dead_letters(self.broker_commits.take().as_deref());
            log(format!(
                "dead letters not committed before the broker restart: {letters}"
            ));
            self.dlt_allowance += letters;
        }
        if let Some((mut zombie, record, lines_at_resume)) = self.zombie.take() {
            // Let it finish (or, with lease renewal, abandon) the handlers it had in flight: they
            // resume with it and end within one record's work. Once it rejoined, it takes new
            // records, so "nothing in flight" may never come: wait for two status lines after
            // SIGCONT and 5 s in all (or nothing in flight, if that comes first).
            let started = Instant::now();
            loop {
                watch.ledgers.poll();
                let fresh = zombie.status_lines() > lines_at_resume + 1;
                let idle = zombie
                    .last("status")
                    .is_some_and(|s| s["in_flight"].as_u64() == Some(0));
                if zombie.child.try_wait()?.is_some()
                    || (fresh && (idle || started.elapsed() >= Duration::from_secs(5)))
                    || started.elapsed() >= Duration::from_secs(60)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            log(format!(
                "zombie consumer #{}: stopping it {:.1?} after SIGCONT",
                record.index,
                started.elapsed()
            ));
            let status = zombie.terminate(Duration::from_secs(60))?;
            log(format!(
                "zombie consumer #{} stopped with SIGTERM ({status})",
                record.index
            ));
            if !status.success() {
                watch.problems.push(format!(
                    "the zombie consumer #{} did not shut down cleanly on SIGTERM: {status}",
                    record.index
                ));
            }
            watch.consumers.children.push(record);
            // A zombie fault hands partitions over three times (the newcomer joins, the resumed
            // zombie rejoins, the zombie leaves): each may write again every dead letter its
            // old owner had not committed (dead letters are not marked done).
            let letters = watch.uncommitted_dead_letters(self.zombie_commits.take().as_deref());
            log(format!(
                "dead letters not committed when the zombie fault began, written since: {letters} (each may repeat at 3 hand-overs)"
            ));
            self.dlt_allowance += 3 * letters;
        }
        Ok(())
    }

    /// Waits until the consumer reports a dead letter (with `--compose`, preferably one after
    /// the last tier: the first such within 20 s, else the first of any kind), then SIGKILLs it
    /// at once: its offset (and its tier copies' offsets) are not committed yet, so the next
    /// consumer gets the record again. Gives up waiting after 60 s and kills anyway.
    fn kill_after_dead_letter(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
    ) -> BoxResult<()> {
        let index = watch.consumers.current.index;
        let mut tail = Tail::new(watch.consumers.spawn.outcomes_path(index), true);
        let last_tier = if self.args.compose {
            TIER_DELAYS.len() as u32
        } else {
            0
        };
        let started = Instant::now();
        let mut seen = None;
        'wait: while started.elapsed() < Duration::from_secs(60) {
            for line in tail.lines() {
                let Some(o) = outcomes::parse(&line) else {
                    continue;
                };
                if let Kind::DeadLettered(kind) = &o.kind
                    && (o.tier == last_tier || started.elapsed() >= Duration::from_secs(20))
                {
                    seen = Some((o.clone(), kind.clone()));
                    break 'wait;
                }
            }
            if watch.consumers.current.child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let note = match seen {
            Some((o, kind)) => {
                // SIGKILL first, measure after.
                let label = format!(
                    "right after a dead letter ({kind}, event {}, tier {})",
                    o.id.map_or("?".into(), |id| id.to_string()),
                    o.tier
                );
                self.kill(at, expected_effects, watch, &label)?;
                let latency_ms = self.last_kill_ms.saturating_sub(o.time_ms);
                log(format!(
                    "  the SIGKILL came {latency_ms} ms after the dead letter was reported"
                ));
                DltKillNote {
                    id: o.id,
                    what: format!("{kind} in tier {}", o.tier),
                    latency_ms,
                }
            }
            None => {
                self.kill(
                    at,
                    expected_effects,
                    watch,
                    "after waiting 60 s for a dead letter in vain",
                )?;
                DltKillNote {
                    id: None,
                    what: "none within 60 s".into(),
                    latency_ms: 0,
                }
            }
        };
        self.dlt_kill_notes.push(note);
        self.done.dlt_kills += 1;
        Ok(())
    }

    /// Stops the consumer (SIGKILL, or SIGTERM with `--clean-restarts`) and starts the next.
    /// `why`: said in the log line.
    fn kill(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
        why: &str,
    ) -> BoxResult<()> {
        let clean = self.args.clean_restarts;
        let current = &mut watch.consumers.current;
        let child_index = current.index;
        let (status, how) = if clean {
            (current.terminate(Duration::from_secs(60))?, "SIGTERM")
        } else {
            (current.kill()?, "SIGKILL")
        };
        self.last_kill_ms = now_ms();
        watch.ledgers.poll();
        // Effects made while waiting (for a dead letter) count too.
        let at = at.max(watch.ledgers.distinct);
        // Commits cannot move any more: what the next consumer will redo is fixed.
        let commits = watch.all_commits_retrying();
        let exposure = commits
            .as_ref()
            .map(|c| watch.uncommitted_effects_of(child_index, c));
        let letters = watch.uncommitted_dead_letters(commits.as_ref().map(|c| c[0].as_slice()));
        self.dlt_allowance += letters;
        self.finished_above = commits
            .as_ref()
            .map(|c| crate::replays::finished_above(&watch.ledgers.outcomes.finals, c));
        log(format!(
            "kill {}/{}: {how} consumer #{child_index} {why}{}at {at}/{expected_effects} effects ({status}); \
             not yet committed: {} of its effects, {letters} dead letters; {} records finished above the commits",
            self.done.kills + 1,
            self.planned.kills,
            if why.is_empty() { "" } else { " " },
            exposure.map_or("unknown (commits unreadable)".into(), |n| n.to_string()),
            self.finished_above
                .map_or("unknown".into(), |n| n.to_string())
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
            zombie: None,
        });
        self.done.kills += 1;
        watch.start_next_consumer()
    }

    /// SIGKILLs the broker and starts it again after `--broker-down-secs`. `loaded`: only
    /// once the consumer is saturated and its commits are moving (see [`Watch::wait_loaded`]).
    fn restart_broker(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
        loaded: bool,
    ) -> BoxResult<()> {
        let broker = self.broker.expect("planned only with a broker control");
        let (done, planned, what) = if loaded {
            (
                self.done.loaded_broker_restarts,
                self.planned.loaded_broker_restarts,
                "broker restart under load",
            )
        } else {
            (
                self.done.broker_restarts,
                self.planned.broker_restarts,
                "broker restart",
            )
        };
        let load = if loaded {
            format!("; {}", watch.wait_loaded(self.args.max_in_flight)?)
        } else {
            String::new()
        };
        // Commits before the kill: if the consumer's session times out while the broker is
        // down, it loses its partitions and redoes everything from here on.
        self.broker_commits = watch.commits_retrying();
        log(format!(
            "{what} {}/{planned}: at {}/{expected_effects} effects{load}",
            done + 1,
            at.max(watch.ledgers.distinct),
        ));
        let took = broker.kill_and_restart(Duration::from_secs(self.args.broker_down_secs))?;
        log(format!("broker back after {took:.1?}"));
        if loaded {
            self.done.loaded_broker_restarts += 1;
        } else {
            self.done.broker_restarts += 1;
        }
        Ok(())
    }

    /// Starts a second consumer; once it holds partitions, freezes the first (SIGSTOP) past
    /// the session timeout and the idempotency lease, until the second holds every partition
    /// and has had time to redo the frozen one's expired claims; then resumes it (SIGCONT).
    /// It keeps running until the consumers recovered (see [`Injector::settled`]).
    fn zombie(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
    ) -> BoxResult<()> {
        let partitions = watch.topic.1 as usize;
        let peer_index = watch.consumers.current.index + 1;
        self.zombie_commits = watch.commits_retrying();
        let peer = watch.consumers.spawn.spawn(peer_index, watch.ledgers)?;
        let mut zombie = std::mem::replace(&mut watch.consumers.current, peer);
        let zombie_index = zombie.index;
        log(format!(
            "zombie {}/{}: consumer #{peer_index} joins consumer #{zombie_index} at {at}/{expected_effects} effects",
            self.done.zombies + 1,
            self.planned.zombies
        ));
        // Both consumers hold partitions and the one to freeze has records in flight.
        let assigned = |p: &ConsumerProc| {
            p.last("status")
                .and_then(|s| s["assigned"].as_array().map(Vec::len))
                .unwrap_or(0)
        };
        let in_flight = |p: &ConsumerProc| {
            p.last("status")
                .and_then(|s| s["in_flight"].as_u64())
                .unwrap_or(0)
        };
        let until = Instant::now() + Duration::from_secs(90);
        while Instant::now() < until
            && !(assigned(&watch.consumers.current) > 0
                && assigned(&zombie) > 0
                && in_flight(&zombie) > 0)
        {
            watch.ledgers.poll();
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the newcomer get busy: a status line is printed every 500 ms.
        std::thread::sleep(Duration::from_millis(1000));
        let zombie_in_flight = in_flight(&zombie);
        let zombie_assigned = assigned(&zombie);
        signal(zombie.child.id(), "STOP")?;
        let frozen = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        watch.ledgers.poll();
        let commits = watch.all_commits_retrying();
        let exposure = commits
            .as_ref()
            .map(|c| watch.uncommitted_effects_of(zombie_index, c));
        let letters = watch.uncommitted_dead_letters(commits.as_ref().map(|c| c[0].as_slice()));
        log(format!(
            "zombie: SIGSTOP consumer #{zombie_index} (pid {}) holding {zombie_assigned} partitions, \
             {zombie_in_flight} records in flight; not yet committed: {} of its effects, {letters} dead letters",
            zombie.child.id(),
            exposure.map_or("unknown".into(), |n| n.to_string())
        ));
        let min_freeze = Duration::from_secs(
            self.args
                .zombie_freeze_secs
                .unwrap_or((SESSION_TIMEOUT + LEASE).as_secs() + 3),
        );
        let mut took_over = None;
        loop {
            watch.ledgers.poll();
            if took_over.is_none() && assigned(&watch.consumers.current) == partitions {
                took_over = Some(frozen.elapsed());
            }
            if frozen.elapsed() >= min_freeze
                && took_over.is_some_and(|t| frozen.elapsed() >= t + Duration::from_secs(3))
            {
                break;
            }
            if frozen.elapsed() > min_freeze + Duration::from_secs(120) {
                watch.problems.push(format!(
                    "zombie: consumer #{peer_index} did not take over every partition within {:?} of the freeze",
                    frozen.elapsed()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let resumed_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lines_at_resume = zombie.status_lines();
        signal(zombie.child.id(), "CONT")?;
        let frozen_for = frozen.elapsed();
        log(format!(
            "zombie: SIGCONT consumer #{zombie_index} after {frozen_for:.1?} frozen; consumer #{peer_index} \
             held every partition {} after the freeze",
            took_over.map_or("never".to_owned(), |t| format!("{t:.1?}"))
        ));
        if zombie.child.try_wait()?.is_some() {
            watch.problems.push(format!(
                "the zombie consumer #{zombie_index} died while frozen"
            ));
        }
        self.zombie = Some((
            zombie,
            ChildRecord {
                index: zombie_index,
                killed: false,
                uncommitted_at_kill: exposure,
                zombie: Some(ZombieRecord {
                    in_flight_at_freeze: zombie_in_flight,
                    frozen_ms: frozen_for.as_millis() as u64,
                    resumed_ms,
                }),
            },
            lines_at_resume,
        ));
        self.done.zombies += 1;
        Ok(())
    }

    /// Makes every handler call that reaches the downstream fail transiently for
    /// `--outage-secs` (through the flag file the consumers watch).
    ///
    /// With `--breaker` the consumers pause instead of dead-lettering during this window (a
    /// record dead-lettered by the outage is then a problem); the outage itself is the same.
    fn outage(
        &mut self,
        at: usize,
        expected_effects: usize,
        watch: &mut Watch<'_>,
    ) -> BoxResult<()> {
        let before = watch.ledgers.outage_exhausted;
        log(format!(
            "downstream outage {}/{}: every handler fails transiently for {} s from {at}/{expected_effects} effects",
            self.done.outages + 1,
            self.planned.outages,
            self.args.outage_secs
        ));
        std::fs::write(&self.outage_flag, b"outage\n")?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(self.args.outage_secs) {
            std::thread::sleep(Duration::from_millis(100));
            watch.ledgers.poll();
        }
        std::fs::remove_file(&self.outage_flag)?;
        // Attempts in their back-off when the flag went away may still fail on it for a moment.
        std::thread::sleep(Duration::from_millis(500));
        watch.ledgers.poll();
        log(format!(
            "downstream outage over after {:.1?}: {} records ran out of retries during it",
            started.elapsed(),
            watch.ledgers.outage_exhausted - before
        ));
        self.done.outages += 1;
        Ok(())
    }

    /// Kills the idempotency Redis for `--redis-down-secs`, then restarts it empty.
    fn redis_outage(&mut self, at: usize, expected_effects: usize) -> BoxResult<()> {
        let redis = self.redis.as_mut().expect("planned only with a store");
        log(format!(
            "redis outage {}/{}: killing the idempotency Redis for {} s at {at}/{expected_effects} effects",
            self.done.redis_outages + 1,
            self.planned.redis_outages,
            self.args.redis_down_secs
        ));
        redis.kill();
        self.redis_kills_ms.push(now_ms());
        std::thread::sleep(Duration::from_secs(self.args.redis_down_secs));
        redis.restart()?;
        log("redis restarted empty on the same port: done marks are gone");
        self.done.redis_outages += 1;
        Ok(())
    }
}
