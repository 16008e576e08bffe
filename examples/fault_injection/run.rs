//! The runner: produces the events, starts the consumer, injects the planned faults one after
//! the other (each once the consumer recovered from the one before), waits for the end, then
//! checks and reports.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::broker::BrokerControl;
use crate::check::{ComposeInputs, Inputs, check};
use crate::cli::{MetadataMode, RunArgs};
use crate::event::{Fate, make_events};
use crate::faults::{Counts, FaultKind, Injector, Plan};
use crate::kafka::Kafka;
use crate::ledger::Ledgers;
use crate::procs::{ChildRecord, ConsumerSpawn, Consumers, read_last};
use crate::redis::RedisServer;
use crate::replays::{Mark, Replays};
use crate::report::{Cleanup, Summary, report};
use crate::watch::Watch;
use crate::{BoxResult, COMPOSE_ATTEMPTS_PER_STAGE, TIER_DELAYS, log, max_attempts};

/// What a run found: its verdict and its replays.
pub(crate) struct RunOutcome {
    pub(crate) pass: bool,
    pub(crate) replays: Replays,
}

/// A seed from the clock, for runs not given `--seed`.
pub(crate) fn seed_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Runs the whole experiment once, with the commit metadata `args.commit_metadata` names
/// (`none`, else the default); `pass` on PASS.
/// A run's work directory (`work_dir`, else a new one in the temporary directory; created)
/// and topic, both named `<prefix>-<pid>-<milliseconds>`.
pub(crate) fn work_dir_and_topic(
    work_dir: Option<&std::path::PathBuf>,
    prefix: &str,
) -> BoxResult<(std::path::PathBuf, String)> {
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let work_dir = match work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(&name),
    };
    std::fs::create_dir_all(&work_dir)?;
    Ok((work_dir, name))
}

pub(crate) fn run(mut args: RunArgs) -> BoxResult<RunOutcome> {
    let started = Instant::now();
    let mut counts = fault_counts(&args)?;
    let seed = args.seed.unwrap_or_else(seed_from_clock);
    args.seed = Some(seed);
    let no_commit_metadata = args.commit_metadata == MetadataMode::None;
    let commit_metadata = if no_commit_metadata {
        MetadataMode::None
    } else {
        MetadataMode::FinishedOffsets
    };
    let use_store = !args.clean_restarts && !args.no_idempotency;
    if !use_store && (counts.redis_outages > 0 || counts.zombies > 0) {
        return Err("--redis-outages and --zombies need the idempotency store".into());
    }
    let compose = args.compose;
    if compose {
        if !use_store || counts.zombies > 0 {
            return Err(
                "--compose runs with the idempotency store, and without zombies (a zombie's late \
                 writes would break the strict checks)"
                    .into(),
            );
        }
        // Every feature at once: the breaker too.
        args.breaker = true;
    }
    let dlt_partitions = args.dlt_partitions.unwrap_or(args.partitions);
    let mut rng = fastrand::Rng::with_seed(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let (work_dir, topic) = work_dir_and_topic(args.work_dir.as_ref(), "kourier-fault")?;
    let dlt = format!("{topic}.dlt");
    let group = format!("{topic}-group");
    log(format!(
        "seed={seed} events={} partitions={} dlt_partitions={dlt_partitions} keys={} max_in_flight={} mode={} commit_metadata={} bootstrap={} work_dir={}",
        args.events,
        args.partitions,
        args.keys,
        args.max_in_flight,
        if args.clean_restarts {
            "clean-restarts (SIGTERM, no idempotency store)"
        } else if compose {
            "compose (SIGKILL; tiers with key order, idempotency store, breaker)"
        } else {
            "sigkill"
        },
        commit_metadata.as_str(),
        args.bootstrap,
        work_dir.display()
    ));

    let kafka = Kafka::new(&args.bootstrap, &group)?;
    kafka.require()?;

    let broker = if counts.broker_restarts + counts.loaded_broker_restarts > 0 {
        match BrokerControl::resolve(args.broker_control.as_deref(), &args.bootstrap) {
            Ok(b) => Some(b),
            Err(why) => {
                log(format!("broker restarts SKIPPED: {why}"));
                None
            }
        }
    } else {
        None
    };
    if broker.is_none() {
        counts.broker_restarts = 0;
        counts.loaded_broker_restarts = 0;
    }

    let mut redis = if use_store {
        Some(RedisServer::start(&work_dir, "idempotency")?)
    } else {
        None
    };
    // The key-order ledger's own Redis, which no fault touches (see "Compose mode" in the
    // module docs).
    let ledger_redis = if compose {
        Some(RedisServer::start(&work_dir, "ledger")?)
    } else {
        None
    };

    // Topics and events.
    let tiers: Vec<(String, i32)> = if compose {
        (1..=TIER_DELAYS.len())
            .map(|n| (format!("{topic}.retry.{n}"), args.partitions))
            .collect()
    } else {
        Vec::new()
    };
    rt.block_on(kafka.create_topics(&[&topic], args.partitions))?;
    rt.block_on(kafka.create_topics(&[&dlt], dlt_partitions))?;
    for (tier, partitions) in &tiers {
        rt.block_on(kafka.create_topics(&[tier], *partitions))?;
    }
    let produce_started = Instant::now();
    let events = make_events(args.events, args.keys, &mut rng);
    rt.block_on(kafka.produce(&topic, &events))?;
    let log_end = kafka.log_end(&topic, args.partitions)?;
    let fates: Vec<Fate> = (0..args.events)
        .map(|id| Fate::of(id, seed, compose))
        .collect();
    let expected_effects = fates.iter().filter(|f| !f.dead_lettered()).count();
    log(format!(
        "produced {} events to {topic} in {:.1?} (log end {:?}); expecting {} effects and {} dead letters",
        events.len(),
        produce_started.elapsed(),
        log_end,
        expected_effects,
        fates.len() - expected_effects
    ));

    // The fault plan: kinds in random order, each at a random point of progress.
    let plan = Plan::new(counts, &mut rng, args.compose);
    let work_ms = args.work_ms.unwrap_or_else(|| {
        plan.default_work_ms(
            args.max_in_flight,
            expected_effects,
            if compose { 300.0 } else { 200.0 },
        )
    });
    log(format!(
        "faults planned: {:?} at {:?} of the effects; simulated work {work_ms} ms per record",
        plan.kinds,
        plan.triggers
            .iter()
            .map(|t| format!("{:.0}%", t * 100.0))
            .collect::<Vec<_>>()
    ));

    let spawn = ConsumerSpawn {
        exe: std::env::current_exe()?,
        bootstrap: args.bootstrap.clone(),
        topic: topic.clone(),
        group: group.clone(),
        redis_url: redis.as_ref().map(RedisServer::url),
        seed,
        max_in_flight: args.max_in_flight,
        work_ms,
        work_dir: work_dir.clone(),
        outage_flag: work_dir.join("downstream-outage"),
        breaker: args.breaker,
        compose_ledger: ledger_redis.as_ref().map(RedisServer::url),
        no_commit_metadata,
        queue_fetch_size: None,
    };
    let mut ledgers = Ledgers::new(args.events as usize, max_attempts(compose));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let consume_started = Instant::now();
    let current = spawn.spawn(0, &mut ledgers)?;
    let mut watch = Watch {
        kafka: &kafka,
        topic: (topic.clone(), log_end.len() as i32),
        dlt: (dlt.clone(), dlt_partitions),
        tiers: tiers.clone(),
        ledgers: &mut ledgers,
        log_end: &log_end,
        expected_effects,
        deadline,
        consumers: Consumers {
            spawn,
            current,
            children: Vec::new(),
        },
        problems: Vec::new(),
    };
    let mut injector = Injector::new(
        &args,
        broker.as_ref(),
        counts,
        redis.as_mut(),
        work_dir.join("downstream-outage"),
    );
    // For the catch-up bound: the pace before the first fault, and what was left to do at the
    // end of the last.
    let mut pace: Option<f64> = None;
    let mut last_fault_end: Option<(Instant, usize)> = None;
    // Where each fault's window of replays begins (see `replays`).
    let mut marks: Vec<Mark> = Vec::new();
    for (i, (fault, trigger)) in plan.kinds.iter().zip(&plan.triggers).enumerate() {
        let target = (trigger * expected_effects as f64) as usize;
        watch.wait_progress(target)?;
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        let at = watch.ledgers.distinct;
        if pace.is_none() {
            pace = effects_per_second(watch.ledgers);
        }
        let of_kind = |k: &[FaultKind]| k.iter().filter(|k| *k == fault).count();
        let mut mark = Mark {
            label: crate::replays::label(*fault, of_kind(&plan.kinds[..=i]), of_kind(&plan.kinds)),
            at_ms: crate::ledger::now_ms(),
            finished_above: None,
            skipped: watch.skipped_by_process(),
        };
        injector.finished_above = None;
        injector.inject(*fault, at, expected_effects, &mut watch)?;
        mark.finished_above = injector.finished_above.take();
        marks.push(mark);
        last_fault_end = Some((Instant::now(), watch.ledgers.distinct));
        // Let the consumer recover before the next fault: it commits again and, after a Redis
        // restart, commits past every effect whose done mark was lost.
        watch.settle(*fault)?;
        injector.settled(*fault, &mut watch)?;
    }
    let Injector {
        done,
        dlt_allowance,
        redis_kills_ms,
        dlt_kill_notes,
        ..
    } = injector;

    log("faults done; waiting until every event is handled and committed");
    let complete = watch.wait_complete()?;
    let consume_took = consume_started.elapsed();
    let caught_up = compose.then(|| {
        caught_up_figures(
            complete,
            last_fault_end,
            pace,
            expected_effects,
            consume_started,
            args.caught_up_secs,
        )
    });
    let monitor_caught_up = (compose && complete).then(|| watch.monitor_caught_up());
    if !complete {
        let problem = format!(
            "not complete before the deadline/stall: {}/{} effects (+{} dead-lettered by outages), commits {:?} of log end {:?}",
            watch.ledgers.distinct,
            expected_effects,
            watch.ledgers.outage_dead_lettered(),
            watch.kafka.committed(&watch.topic).ok(),
            log_end
        );
        watch.problems.push(problem);
    }
    let assigned_partitions = watch.assigned_partitions() as usize;
    let last_index = watch.consumers.current.index;
    let status = watch.consumers.current.terminate(Duration::from_secs(60))?;
    if !status.success() {
        watch.problems.push(format!(
            "the last consumer #{last_index} did not shut down cleanly: {status}"
        ));
    }
    watch.consumers.children.push(ChildRecord {
        index: last_index,
        killed: false,
        uncommitted_at_kill: None,
        zombie: None,
    });
    watch.ledgers.poll();
    let skipped_end = watch.skipped_by_process();
    let Watch {
        consumers,
        mut problems,
        ..
    } = watch;
    let replays = crate::replays::count(
        commit_metadata.as_str(),
        &ledgers.outcomes.finals,
        &marks,
        &skipped_end,
    );
    let snapshot = read_last(&consumers.spawn.out_path(last_index), "snapshot");

    // The checks.
    let committed = kafka.committed(&(topic.clone(), log_end.len() as i32));
    let letters = kafka.read_all(&dlt, dlt_partitions)?;
    let tier_state = tiers
        .iter()
        .map(|t| {
            Ok((
                t.0.clone(),
                kafka.committed(t).ok(),
                kafka.log_end(&t.0, t.1)?,
            ))
        })
        .collect::<BoxResult<Vec<_>>>()?;
    let checked = check(&Inputs {
        events: &events,
        fates: &fates,
        ledgers: &ledgers,
        letters: &letters,
        committed: committed.as_ref().ok(),
        log_end: &log_end,
        snapshot: snapshot.as_ref(),
        children: &consumers.children,
        max_in_flight: args.max_in_flight,
        dlt_partitions,
        // After clean restarts nothing may repeat, dead letters included (with `--compose`
        // the stricter one-letter-per-event check replaces this one).
        dlt_allowance: if args.clean_restarts {
            0
        } else {
            dlt_allowance
        },
        max_attempts: max_attempts(compose),
        assigned_partitions,
        compose: compose.then(|| ComposeInputs {
            attempts_per_stage: COMPOSE_ATTEMPTS_PER_STAGE,
            tiers: tier_state,
            redis_kills_ms: &redis_kills_ms,
            kills: u64::from(done.kills),
        }),
        redeliveries: done.kills
            + done.broker_restarts
            + done.loaded_broker_restarts
            + 3 * done.zombies,
    });
    problems.extend(checked.problems.iter().cloned());
    if let Some(c) = &caught_up
        && let Some(problem) = &c.problem
    {
        problems.push(problem.clone());
    }
    if monitor_caught_up == Some(false) {
        problems.push(
            "every topic is committed to its end and the last consumer is idle, but its monitor \
             does not report caught_up"
                .into(),
        );
    }

    let pass = report(
        Summary {
            args: &args,
            checked: &checked,
            problems,
            consume_took,
            processes: consumers.children.len(),
            ledgers: &ledgers,
            letters: letters.len(),
            dlt_allowance,
            done,
            dlt_partitions,
            started,
            breaker: snapshot.as_ref().and_then(|s| s.get("breaker")).cloned(),
            caught_up: caught_up.as_ref(),
            monitor_caught_up,
            dlt_kill_notes: &dlt_kill_notes,
            replays: &replays,
        },
        Cleanup {
            rt: &rt,
            kafka: &kafka,
            redis: redis.take(),
            ledger_redis,
            topic: &topic,
            dlt: &dlt,
            tiers: &tiers.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
            group: &group,
            work_dir: &work_dir,
        },
    );
    Ok(RunOutcome { pass, replays })
}

/// Effects per second so far: the distinct effects over the time since the first one.
fn effects_per_second(ledgers: &Ledgers) -> Option<f64> {
    let first = ledgers.effects.iter().map(|e| e.time_ms).min()?;
    let secs = crate::ledger::now_ms().saturating_sub(first) as f64 / 1000.0;
    (secs > 1.0 && ledgers.distinct > 0).then(|| ledgers.distinct as f64 / secs)
}

/// How soon after the last fault the consumer caught up (`--compose`), and its bound.
pub(crate) struct CaughtUp {
    /// Seconds from the end of the last fault to caught up (`None`: it never did).
    pub(crate) after_s: Option<f64>,
    /// `--caught-up-secs` plus the time the effects left at the end of the last fault need
    /// at the pace before the first fault (`None`: no fault).
    pub(crate) bound_s: Option<f64>,
    pub(crate) problem: Option<String>,
}

/// The catch-up figures: `complete` says whether the consumer caught up (every event
/// accounted for, source and tier topics committed to their ends, its monitor reporting
/// `caught_up`), which it did just now when true. No figures without a fault. The pace is
/// the one before the first fault, else the whole run's.
fn caught_up_figures(
    complete: bool,
    last_fault_end: Option<(Instant, usize)>,
    pace: Option<f64>,
    expected_effects: usize,
    consume_started: Instant,
    grace_secs: u64,
) -> CaughtUp {
    let Some((end, distinct_then)) = last_fault_end else {
        return CaughtUp {
            after_s: None,
            bound_s: None,
            problem: None,
        };
    };
    let pace = pace.unwrap_or_else(|| {
        expected_effects as f64 / consume_started.elapsed().as_secs_f64().max(1.0)
    });
    let remaining = expected_effects.saturating_sub(distinct_then);
    let bound_s = grace_secs as f64 + remaining as f64 / pace.max(0.001);
    let after_s = complete.then(|| end.elapsed().as_secs_f64());
    let why = format!("{grace_secs} s + {remaining} effects left at {pace:.1} effects/s");
    let problem = match after_s {
        None => Some(format!(
            "not caught up after the last fault (bound {bound_s:.1} s: {why})"
        )),
        Some(s) if s > bound_s => Some(format!(
            "caught up {s:.1} s after the last fault, above the bound {bound_s:.1} s ({why})"
        )),
        Some(_) => None,
    };
    CaughtUp {
        after_s,
        bound_s: Some(bound_s),
        problem,
    }
}

/// The faults to run: the flags, or their defaults for the mode.
fn fault_counts(args: &RunArgs) -> BoxResult<Counts> {
    let broker_restarts = args
        .broker_restarts
        .unwrap_or(if args.clean_restarts { 0 } else { 1 });
    let redis_outages =
        args.redis_outages
            .unwrap_or(if args.clean_restarts || args.no_idempotency {
                0
            } else {
                1
            });
    let dlt_kills = args
        .dlt_kills
        .unwrap_or(if args.compose { args.kills.min(1) } else { 0 });
    if dlt_kills > args.kills {
        return Err("--dlt-kills counts kills among --kills: it cannot be more".into());
    }
    if dlt_kills > 0 && args.clean_restarts {
        return Err("--dlt-kills SIGKILLs: not with --clean-restarts".into());
    }
    let counts = Counts {
        kills: args.kills,
        dlt_kills,
        broker_restarts,
        loaded_broker_restarts: args.loaded_broker_restarts,
        redis_outages,
        zombies: args.zombies,
        outages: args.outages,
    };
    if args.clean_restarts
        && (broker_restarts > 0
            || redis_outages > 0
            || counts.loaded_broker_restarts > 0
            || counts.zombies > 0
            || counts.outages > 0)
    {
        return Err(
            "--clean-restarts runs only clean consumer restarts (0 duplicates expected); \
                    it takes no other fault"
                .into(),
        );
    }
    if args.events == 0
        || args.partitions < 1
        || args.dlt_partitions.is_some_and(|p| p < 1)
        || args.keys == 0
        || args.max_in_flight == 0
    {
        return Err(
            "--events, --partitions, --dlt-partitions, --keys and --max-in-flight must be positive"
                .into(),
        );
    }
    Ok(counts)
}
