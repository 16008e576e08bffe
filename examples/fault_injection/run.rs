//! The runner: produces the events, starts the consumer, injects the planned faults one after
//! the other (each once the consumer recovered from the one before), waits for the end, then
//! checks and reports.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::broker::BrokerControl;
use crate::check::{Inputs, check};
use crate::cli::RunArgs;
use crate::event::{Fate, make_events};
use crate::faults::{Counts, Injector, Plan};
use crate::kafka::Kafka;
use crate::ledger::Ledgers;
use crate::procs::{ChildRecord, ConsumerSpawn, Consumers, read_last};
use crate::redis::RedisServer;
use crate::report::{Cleanup, Summary, report};
use crate::watch::Watch;
use crate::{BoxResult, log};

/// Runs the whole experiment; `Ok(true)` on PASS.
pub(crate) fn run(mut args: RunArgs) -> BoxResult<bool> {
    let started = Instant::now();
    let mut counts = fault_counts(&args)?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    args.seed = Some(seed);
    let use_store = !args.clean_restarts && !args.no_idempotency;
    if !use_store && (counts.redis_outages > 0 || counts.zombies > 0) {
        return Err("--redis-outages and --zombies need the idempotency store".into());
    }
    let dlt_partitions = args.dlt_partitions.unwrap_or(args.partitions);
    let mut rng = fastrand::Rng::with_seed(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let stamp = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kourier-fault-{stamp}")),
    };
    std::fs::create_dir_all(&work_dir)?;
    let topic = format!("kourier-fault-{stamp}");
    let dlt = format!("{topic}.dlt");
    let group = format!("{topic}-group");
    log(format!(
        "seed={seed} events={} partitions={} dlt_partitions={dlt_partitions} keys={} max_in_flight={} mode={} bootstrap={} work_dir={}",
        args.events,
        args.partitions,
        args.keys,
        args.max_in_flight,
        if args.clean_restarts {
            "clean-restarts (SIGTERM, no idempotency store)"
        } else {
            "sigkill"
        },
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
        Some(RedisServer::start(&work_dir)?)
    } else {
        None
    };

    // Topics and events.
    rt.block_on(kafka.create_topics(&[&topic], args.partitions))?;
    rt.block_on(kafka.create_topics(&[&dlt], dlt_partitions))?;
    let produce_started = Instant::now();
    let events = make_events(args.events, args.keys, &mut rng);
    rt.block_on(kafka.produce(&topic, &events))?;
    let log_end = kafka.log_end(&topic, args.partitions)?;
    let fates: Vec<Fate> = (0..args.events).map(|id| Fate::of(id, seed)).collect();
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
    let plan = Plan::new(counts, &mut rng);
    let work_ms = args
        .work_ms
        .unwrap_or_else(|| plan.default_work_ms(args.max_in_flight, expected_effects));
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
    };
    let mut ledgers = Ledgers::new(args.events as usize);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let consume_started = Instant::now();
    let current = spawn.spawn(0, &mut ledgers)?;
    let mut watch = Watch {
        kafka: &kafka,
        topic: (topic.clone(), log_end.len() as i32),
        dlt: (dlt.clone(), dlt_partitions),
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
    for (fault, trigger) in plan.kinds.iter().zip(&plan.triggers) {
        let target = (trigger * expected_effects as f64) as usize;
        watch.wait_progress(target)?;
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        let at = watch.ledgers.distinct;
        injector.inject(*fault, at, expected_effects, &mut watch)?;
        // Let the consumer recover before the next fault: it commits again and, after a Redis
        // restart, commits past every effect whose done mark was lost.
        watch.settle(*fault)?;
        injector.settled(*fault, &mut watch)?;
    }
    let Injector {
        done,
        dlt_allowance,
        ..
    } = injector;

    log("faults done; waiting until every event is handled and committed");
    let complete = watch.wait_complete()?;
    let consume_took = consume_started.elapsed();
    if !complete {
        let problem = format!(
            "not complete before the deadline/stall: {}/{} effects (+{} dead-lettered by outages), commits {:?} of log end {:?}",
            watch.ledgers.distinct,
            watch.ledgers.outage_dead_lettered(),
            expected_effects,
            watch.kafka.committed(&watch.topic).ok(),
            log_end
        );
        watch.problems.push(problem);
    }
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
    let Watch {
        consumers,
        mut problems,
        ..
    } = watch;
    let snapshot = read_last(&consumers.spawn.out_path(last_index), "snapshot");

    // The checks.
    let committed = kafka.committed(&(topic.clone(), log_end.len() as i32));
    let letters = kafka.read_all(&dlt, dlt_partitions)?;
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
        partitions: args.partitions,
        dlt_partitions,
        // After clean restarts nothing may repeat, dead letters included.
        dlt_allowance: if args.clean_restarts {
            0
        } else {
            dlt_allowance
        },
        redeliveries: done.kills
            + done.broker_restarts
            + done.loaded_broker_restarts
            + 3 * done.zombies,
    });
    problems.extend(checked.problems.iter().cloned());

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
        },
        Cleanup {
            rt: &rt,
            kafka: &kafka,
            redis: redis.take(),
            topic: &topic,
            dlt: &dlt,
            group: &group,
            work_dir: &work_dir,
        },
    );
    Ok(pass)
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
    let counts = Counts {
        kills: args.kills,
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
