//! Queue mode (`--queue`, feature `queue`): the events consumed by `--members`
//! `QueueConsumer` processes sharing one share group, while the runner SIGKILLs members and
//! restarts the broker; then the checks of the module docs, "Queue mode".

use crate::BoxResult;
use crate::cli::RunArgs;

/// Why `--queue` cannot run in a build without the feature.
#[cfg(not(feature = "queue"))]
pub(crate) const NO_FEATURE: &str = "--queue needs kourier's `queue` feature: \
     cargo run --features queue --example fault_injection -- --queue ...";

/// Runs the experiment in queue mode; true on PASS.
#[cfg(feature = "queue")]
pub(crate) fn run(args: RunArgs) -> BoxResult<bool> {
    imp::run(args)
}

/// Without the `queue` feature: a clear error, before anything is created.
#[cfg(not(feature = "queue"))]
pub(crate) fn run(args: RunArgs) -> BoxResult<bool> {
    // Read here too, so that a build without the feature has no unread flag.
    let _ = (args.members, args.fetch_size);
    Err(NO_FEATURE.into())
}

#[cfg(feature = "queue")]
mod imp {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use crate::broker::BrokerControl;
    use crate::cli::RunArgs;
    use crate::event::{Event, Fate, make_events};
    use crate::kafka::{Kafka, Letter};
    use crate::ledger::Ledgers;
    use crate::procs::{ConsumerProc, ConsumerSpawn};
    use crate::redis::RedisServer;
    use crate::run::{seed_from_clock, work_dir_and_topic};
    use crate::{BoxResult, MAX_ATTEMPTS, log};

    /// A fault of queue mode.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum QueueFault {
        /// SIGKILL of one member (at random), replaced by a new one.
        Kill,
        /// SIGKILL of the broker and a start again (`scripts/services`).
        BrokerRestart,
    }

    /// What became of one member process.
    struct Member {
        index: usize,
        killed: bool,
    }

    pub(super) fn run(mut args: RunArgs) -> BoxResult<bool> {
        let started = Instant::now();
        if args.compose
            || args.clean_restarts
            || args.no_idempotency
            || args.zombies > 0
            || args.outages > 0
            || args.loaded_broker_restarts > 0
            || args.redis_outages.unwrap_or(0) > 0
            || args.dlt_kills.unwrap_or(0) > 0
            || args.breaker
        {
            return Err(
                "--queue takes only --kills and --broker-restarts as faults (and runs with the \
                 idempotency store)"
                    .into(),
            );
        }
        if args.events == 0 || args.members == 0 || args.max_in_flight == 0 || args.keys == 0 {
            return Err("--events, --members, --max-in-flight and --keys must be positive".into());
        }
        let fetch_size = args.fetch_size.unwrap_or(args.max_in_flight);
        if fetch_size < args.max_in_flight {
            return Err("--fetch-size must be at least --max-in-flight".into());
        }
        let seed = args.seed.unwrap_or_else(seed_from_clock);
        args.seed = Some(seed);
        let mut rng = fastrand::Rng::with_seed(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (work_dir, topic) = work_dir_and_topic(args.work_dir.as_ref(), "kourier-fault-queue")?;
        let dlt = format!("{topic}.dlt");
        let group = format!("{topic}-share");
        let kafka = Kafka::new(&args.bootstrap, &group)?;
        kafka.require()?;

        let mut broker_restarts = args.broker_restarts.unwrap_or(1);
        let broker = if broker_restarts > 0 {
            match BrokerControl::resolve(args.broker_control.as_deref(), &args.bootstrap) {
                Ok(b) => Some(b),
                Err(why) => {
                    log(format!("broker restarts SKIPPED: {why}"));
                    broker_restarts = 0;
                    None
                }
            }
        } else {
            None
        };
        let mut faults: Vec<QueueFault> =
            std::iter::repeat_n(QueueFault::Kill, args.kills as usize)
                .chain(std::iter::repeat_n(
                    QueueFault::BrokerRestart,
                    broker_restarts as usize,
                ))
                .collect();
        rng.shuffle(&mut faults);
        // Each fault at a point of progress spread over 15 %..80 % of the effects.
        let triggers: Vec<f64> = (0..faults.len())
            .map(|i| {
                let slot = 0.65 / faults.len() as f64;
                0.15 + slot * (i as f64 + rng.f64() * 0.5)
            })
            .collect();

        let redis = RedisServer::start(&work_dir, "idempotency")?;
        rt.block_on(kafka.create_topics(&[&topic], args.partitions))?;
        rt.block_on(kafka.create_topics(&[&dlt], args.partitions))?;
        let events = make_events(args.events, args.keys, &mut rng);
        rt.block_on(kafka.produce(&topic, &events))?;
        let log_end = kafka.log_end(&topic, args.partitions)?;
        let fates: Vec<Fate> = (0..args.events)
            .map(|id| Fate::of(id, seed, false))
            .collect();
        let expected_effects = fates.iter().filter(|f| !f.dead_lettered()).count();
        // Paced so that consuming takes about 12 s per fault (20 s at least) at full speed:
        // every fault meets busy members.
        let work_ms = args.work_ms.unwrap_or_else(|| {
            let secs = (12 * faults.len()).max(20) as u64;
            (args.members * args.max_in_flight) as u64 * secs * 1000
                / (expected_effects.max(1) as u64)
        });
        log(format!(
            "mode=queue seed={seed} events={} partitions={} members={} max_in_flight={} fetch_size={fetch_size} work_ms={work_ms} bootstrap={} topic={topic} share_group={group} work_dir={}; faults {:?} at {:?} of the effects",
            args.events,
            args.partitions,
            args.members,
            args.max_in_flight,
            args.bootstrap,
            work_dir.display(),
            faults,
            triggers
                .iter()
                .map(|t| format!("{:.0}%", t * 100.0))
                .collect::<Vec<_>>()
        ));

        let spawn = ConsumerSpawn {
            exe: std::env::current_exe()?,
            bootstrap: args.bootstrap.clone(),
            topic: topic.clone(),
            group: group.clone(),
            redis_url: Some(redis.url()),
            seed,
            max_in_flight: args.max_in_flight,
            work_ms,
            work_dir: work_dir.clone(),
            outage_flag: work_dir.join("downstream-outage"),
            breaker: false,
            compose_ledger: None,
            no_commit_metadata: false,
            queue_fetch_size: Some(fetch_size),
        };
        let mut ledgers = Ledgers::new(args.events as usize, MAX_ATTEMPTS);
        let mut running: Vec<ConsumerProc> = Vec::new();
        let mut members: Vec<Member> = Vec::new();
        for index in 0..args.members {
            running.push(spawn.spawn(index, &mut ledgers)?);
        }
        let mut next_index = args.members;
        let deadline = after(Duration::from_secs(args.timeout_secs));
        let mut problems: Vec<String> = Vec::new();
        let mut done_kills = 0u32;
        let mut done_restarts = 0u32;
        let consume_started = Instant::now();
        let accounted = |l: &Ledgers| {
            fates
                .iter()
                .enumerate()
                .filter(|(id, f)| {
                    if f.dead_lettered() {
                        l.outcomes.dead_lettered[*id] > 0
                    } else {
                        l.count[*id] > 0
                    }
                })
                .count()
        };

        for (fault, trigger) in faults.iter().zip(&triggers) {
            let target = (trigger * expected_effects as f64) as usize;
            wait_until(&mut ledgers, &mut running, deadline, |l| {
                l.distinct >= target
            })?;
            std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
            let at = ledgers.distinct;
            match fault {
                QueueFault::Kill => {
                    let victim = rng.usize(0..running.len());
                    let mut proc = running.remove(victim);
                    proc.kill()?;
                    log(format!(
                        "SIGKILLed member #{} at {at}/{expected_effects} effects",
                        proc.index
                    ));
                    members.push(Member {
                        index: proc.index,
                        killed: true,
                    });
                    running.push(spawn.spawn(next_index, &mut ledgers)?);
                    next_index += 1;
                    done_kills += 1;
                }
                QueueFault::BrokerRestart => {
                    let Some(broker) = &broker else {
                        continue;
                    };
                    let took =
                        broker.kill_and_restart(Duration::from_secs(args.broker_down_secs))?;
                    log(format!(
                        "broker killed and started again at {at}/{expected_effects} effects ({took:.1?})"
                    ));
                    done_restarts += 1;
                }
            }
            // Settle: the records the fault sent back are delivered again before the next
            // fault (progress of a few batches of every member, or the end).
            let resume = (at + 2 * args.members * fetch_size).min(expected_effects);
            wait_until(&mut ledgers, &mut running, deadline, |l| {
                l.distinct >= resume
            })?;
        }

        log("faults done; waiting until every event is accounted for");
        let all = fates.len();
        let complete = wait_until(&mut ledgers, &mut running, deadline, |l| {
            accounted(l) == all
        })
        .is_ok();
        let consume_took = consume_started.elapsed();
        if !complete {
            problems.push(format!(
                "not complete before the deadline: {}/{all} events accounted for",
                accounted(&ledgers)
            ));
        }
        // Every record ACCEPTed: the share group's start offsets reach the log ends. The
        // members still run (their acknowledgements travel with their next fetch).
        let left_running = share_group_left(&rt, &args.bootstrap, &group, &topic, &log_end, 30);
        for mut proc in running.drain(..) {
            let status = proc.terminate(Duration::from_secs(40))?;
            if !status.success() {
                problems.push(format!(
                    "member #{} did not shut down cleanly: {status}",
                    proc.index
                ));
            }
            members.push(Member {
                index: proc.index,
                killed: false,
            });
        }
        // And again once every member left (what a new member would find).
        let left = share_group_left(&rt, &args.bootstrap, &group, &topic, &log_end, 10);
        let share_group_left = match (&left_running, &left) {
            (_, Ok(0)) => 0,
            (_, Ok(n)) => {
                problems.push(format!(
                    "the share group still has {n} records not acknowledged after the members left"
                ));
                *n
            }
            (_, Err(e)) => {
                problems.push(format!("cannot read the share group's offsets: {e}"));
                i64::MAX
            }
        };
        if let Err(e) = &left_running {
            log(format!("share group offsets while the members ran: {e}"));
        }
        ledgers.poll();
        let acknowledgement_failures: u64 = members
            .iter()
            .filter_map(|m| {
                crate::procs::read_last(&spawn.out_path(m.index), "acknowledgement_failures")
            })
            .filter_map(|v| v.as_u64())
            .sum();

        // The checks.
        let letters = kafka.read_all(&dlt, args.partitions)?;
        let c = check(&Inputs {
            events: &events,
            fates: &fates,
            ledgers: &ledgers,
            letters: &letters,
            members: &members,
            fetch_size: fetch_size as u64,
            member_count: args.members as u64,
            kills: u64::from(done_kills),
            broker_restarts: u64::from(done_restarts),
        });
        problems.extend(c.problems.iter().cloned());
        if !ledgers.malformed.is_empty() || !ledgers.outcomes.malformed.is_empty() {
            problems.push(format!(
                "malformed ledger/outcome lines: {:?}",
                ledgers
                    .malformed
                    .iter()
                    .chain(&ledgers.outcomes.malformed)
                    .take(5)
                    .collect::<Vec<_>>()
            ));
        }
        let pass = problems.is_empty();
        log(format!(
            "consumed in {consume_took:.1?} by {} member processes; {} effects ({} distinct), {} letters, {} duplicates skipped by the store, {} acknowledgements refused",
            members.len(),
            ledgers.effects.len(),
            ledgers.distinct,
            letters.len(),
            ledgers.outcomes.duplicates,
            acknowledgement_failures
        ));
        for p in &problems {
            log(format!("PROBLEM: {p}"));
        }
        log(format!("total time {:.1?}", started.elapsed()));
        drop(redis);
        if pass && !args.keep {
            if let Err(e) = rt.block_on(kafka.delete_topics(&[&topic, &dlt])) {
                log(format!("could not delete the topics: {e}"));
            }
            if args.work_dir.is_none() {
                let _ = std::fs::remove_dir_all(&work_dir);
            }
        } else {
            log(format!(
                "kept topic {topic}, share group {group} and work dir {}",
                work_dir.display()
            ));
        }
        println!(
            "events={} lost={} duplicates={} bound={} dead_lettered={} kills={done_kills} kill_duplicates={} \
             broker_restarts={done_restarts} mode=queue members={} fetch_size={fetch_size} \
             duplicate_letters={} letter_bound={} max_letters_per_event={} share_group_left={share_group_left} \
             acknowledgement_failures={acknowledgement_failures} verdict={}",
            args.events,
            c.lost,
            c.duplicates,
            c.bound,
            c.dead_lettered,
            c.kill_duplicates,
            args.members,
            c.duplicate_letters,
            c.bound,
            c.max_letters_per_event,
            if pass { "PASS" } else { "FAIL" }
        );
        Ok(pass)
    }

    /// `d` from now, capped (a huge `--timeout-secs` must not overflow the clock).
    fn after(d: Duration) -> Instant {
        let now = Instant::now();
        now.checked_add(d)
            .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
            .unwrap_or(now)
    }

    /// Polls the ledgers until `done` holds; an error at the deadline or when a member
    /// process exited on its own.
    fn wait_until(
        ledgers: &mut Ledgers,
        running: &mut [ConsumerProc],
        deadline: Instant,
        done: impl Fn(&Ledgers) -> bool,
    ) -> BoxResult<()> {
        loop {
            ledgers.poll();
            if done(ledgers) {
                return Ok(());
            }
            for proc in running.iter_mut() {
                if let Some(status) = proc.child.try_wait()? {
                    return Err(format!(
                        "member #{} exited on its own ({status}); see its log",
                        proc.index
                    )
                    .into());
                }
            }
            if Instant::now() >= deadline {
                return Err("deadline reached (--timeout-secs)".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Records of `topic` the share group has not acknowledged: the sum over its partitions
    /// of the share-partition lag, read with krafka's admin client
    /// (`DescribeShareGroupOffsets` v1, Kafka 4.3+; below that, log end − start offset).
    /// Retried for up to `secs` seconds until it is 0.
    fn share_group_left(
        rt: &tokio::runtime::Runtime,
        bootstrap: &str,
        group: &str,
        topic: &str,
        log_end: &[i64],
        secs: u64,
    ) -> BoxResult<i64> {
        let until = after(Duration::from_secs(secs));
        loop {
            let left = rt.block_on(async {
                let kafka = krafka::Kafka::builder(bootstrap).connect().await?;
                let offsets = kafka
                    .admin()
                    .describe_share_group_offsets(group, Default::default())
                    .await?;
                let mut left = 0i64;
                for (p, end) in log_end.iter().enumerate() {
                    let tp = krafka::admin::TopicPartition::new(topic, p as i32);
                    left += match offsets.get(&tp) {
                        // The broker's lag (KIP-1226): records up to the high watermark not
                        // yet acknowledged. The start offset alone can stay below the log end
                        // with everything above it acknowledged (measured: 60 of 3,000).
                        Some(Ok(o)) => o.lag.unwrap_or((end - o.start_offset).max(0)),
                        Some(Err(e)) => return Err(format!("partition {p}: {e}").into()),
                        // No state for a partition: nothing of it was acknowledged.
                        None => *end,
                    };
                }
                BoxResult::Ok(left)
            });
            match left {
                Ok(0) => return Ok(0),
                other if Instant::now() >= until => return other,
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    struct Inputs<'a> {
        events: &'a [Event],
        fates: &'a [Fate],
        ledgers: &'a Ledgers,
        letters: &'a [Letter],
        members: &'a [Member],
        fetch_size: u64,
        member_count: u64,
        kills: u64,
        broker_restarts: u64,
    }

    struct Checked {
        lost: usize,
        duplicates: u64,
        kill_duplicates: u64,
        /// Duplicate effects and duplicate letters may each reach it.
        bound: u64,
        dead_lettered: usize,
        duplicate_letters: u64,
        max_letters_per_event: u64,
        problems: Vec<String>,
    }

    /// The checks of queue mode (module docs, "Queue mode").
    fn check(i: &Inputs<'_>) -> Checked {
        let mut problems = Vec::new();
        let l = i.ledgers;
        // What a fault can send back: a killed member's locked records (at most fetch_size),
        // and at a broker restart those of every member.
        let bound = i.kills * i.fetch_size + i.broker_restarts * i.member_count * i.fetch_size;

        // Letters per id, and their kinds.
        let mut letters: BTreeMap<u64, Vec<&Letter>> = BTreeMap::new();
        for letter in i.letters {
            match letter.id {
                Some(id) if (id as usize) < i.events.len() => {
                    letters.entry(id).or_default().push(letter)
                }
                _ => problems.push(format!(
                    "a letter that is not one of the events: source {:?}",
                    letter.source
                )),
            }
        }
        let mut lost = 0;
        let mut dead_lettered = 0;
        let mut duplicate_letters = 0u64;
        let mut max_letters_per_event = 0u64;
        for (id, fate) in i.fates.iter().enumerate() {
            let id64 = id as u64;
            let effects = l.count[id];
            let of_id = letters.get(&id64).map_or(&[][..], Vec::as_slice);
            max_letters_per_event = max_letters_per_event.max(of_id.len() as u64);
            if fate.dead_lettered() {
                if effects > 0 {
                    problems.push(format!("event {id} ({fate:?}) has a side effect"));
                }
                if of_id.is_empty() {
                    lost += 1;
                    continue;
                }
                dead_lettered += 1;
                duplicate_letters += of_id.len() as u64 - 1;
                let (kind, attempts) = match fate {
                    Fate::Permanent => ("permanent", "1".to_owned()),
                    _ => ("retries-exhausted", MAX_ATTEMPTS.to_string()),
                };
                for letter in of_id {
                    if letter.kind.as_deref() != Some(kind)
                        || letter.attempts.as_deref() != Some(attempts.as_str())
                    {
                        problems.push(format!(
                            "event {id}: letter {:?}/{:?}, expected {kind}/{attempts}",
                            letter.kind, letter.attempts
                        ));
                    }
                }
            } else {
                if effects == 0 {
                    lost += 1;
                }
                if !of_id.is_empty() {
                    problems.push(format!("event {id} ({fate:?}) is in the dead-letter topic"));
                }
            }
        }
        if lost > 0 {
            problems.push(format!("{lost} events lost (no effect, no dead letter)"));
        }
        if duplicate_letters > bound {
            problems.push(format!(
                "{duplicate_letters} duplicate dead letters exceed the bound {bound}"
            ));
        }
        let redeliveries = i.kills + i.broker_restarts;
        if max_letters_per_event > 1 + redeliveries {
            problems.push(format!(
                "an event has {max_letters_per_event} dead letters: more than 1 + {redeliveries} faults"
            ));
        }

        // Effects: each at the attempt its injected failures predict; repeats attributed to
        // the process of the effect they repeat.
        let mut by_id: BTreeMap<u64, Vec<&crate::ledger::Effect>> = BTreeMap::new();
        for e in &l.effects {
            let expected = i.fates[e.id as usize].success_attempt();
            if expected != Some(e.attempt) {
                problems.push(format!(
                    "event {} had its effect at attempt {}, expected {expected:?}",
                    e.id, e.attempt
                ));
            }
            by_id.entry(e.id).or_default().push(e);
        }
        let mut repeats_of: BTreeMap<usize, u64> = BTreeMap::new();
        let mut duplicates = 0u64;
        for effects in by_id.values_mut() {
            effects.sort_by_key(|e| e.time_ms);
            for pair in effects.windows(2) {
                duplicates += 1;
                *repeats_of.entry(pair[0].child).or_default() += 1;
            }
        }
        if duplicates > bound {
            problems.push(format!(
                "{duplicates} duplicate side effects exceed the bound {bound}"
            ));
        }
        let mut kill_duplicates = 0;
        for m in i.members {
            let repeats = repeats_of.get(&m.index).copied().unwrap_or(0);
            if m.killed {
                kill_duplicates += repeats;
                if repeats > i.fetch_size {
                    problems.push(format!(
                        "{repeats} effects of killed member #{} repeated: more than it held (fetch size {})",
                        m.index, i.fetch_size
                    ));
                }
            } else if i.broker_restarts == 0 && repeats > 0 {
                problems.push(format!(
                    "{repeats} effects of member #{}, never killed, repeated (no broker restart)",
                    m.index
                ));
            }
        }
        Checked {
            lost,
            duplicates,
            kill_duplicates,
            bound,
            dead_lettered,
            duplicate_letters,
            max_letters_per_event,
            problems,
        }
    }
}
