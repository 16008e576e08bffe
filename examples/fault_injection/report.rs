//! The end of a run: the verdict (the checks' problems plus the duplicate bound), what is
//! logged about it, cleaning up after a pass, and the one-line summary on stdout.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::check::Checked;
use crate::cli::RunArgs;
use crate::faults::{Counts, DltKillNote};
use crate::kafka::Kafka;
use crate::ledger::Ledgers;
use crate::log;
use crate::redis::RedisServer;
use crate::replays::Replays;
use crate::run::CaughtUp;

/// What the run did and found.
pub(crate) struct Summary<'a> {
    pub(crate) args: &'a RunArgs,
    pub(crate) checked: &'a Checked,
    /// Every problem: the runner's and the checks'.
    pub(crate) problems: Vec<String>,
    pub(crate) consume_took: Duration,
    /// Consumer processes started.
    pub(crate) processes: usize,
    pub(crate) ledgers: &'a Ledgers,
    /// Records in the dead-letter topic.
    pub(crate) letters: usize,
    pub(crate) dlt_allowance: u64,
    /// The faults injected.
    pub(crate) done: Counts,
    pub(crate) dlt_partitions: i32,
    pub(crate) started: Instant,
    /// The last consumer's breaker figures (its monitor snapshot), with `--breaker`.
    pub(crate) breaker: Option<serde_json::Value>,
    /// `--compose`: how soon the consumer caught up after the last fault.
    pub(crate) caught_up: Option<&'a CaughtUp>,
    /// `--compose`: whether the last consumer's monitor said `caught_up` once it was
    /// (`None`: it never was).
    pub(crate) monitor_caught_up: Option<bool>,
    /// The kills right after a dead letter.
    pub(crate) dlt_kill_notes: &'a [DltKillNote],
    /// Records delivered again after they were finished, per fault (reported, not checked).
    pub(crate) replays: &'a Replays,
}

/// What to remove after a passing run (and keep, naming it, after a failing one).
pub(crate) struct Cleanup<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) kafka: &'a Kafka,
    /// Stopped in any case.
    pub(crate) redis: Option<RedisServer>,
    /// The key-order ledger's Redis (`--compose`); stopped in any case.
    pub(crate) ledger_redis: Option<RedisServer>,
    pub(crate) topic: &'a str,
    pub(crate) dlt: &'a str,
    /// The tier topics (`--compose`).
    pub(crate) tiers: &'a [&'a str],
    pub(crate) group: &'a str,
    pub(crate) work_dir: &'a Path,
}

/// Logs the outcome, cleans up and prints the summary line; true on PASS.
pub(crate) fn report(mut s: Summary<'_>, cleanup: Cleanup<'_>) -> bool {
    let args = s.args;
    let report = s.checked;
    let done = s.done;
    let mif = args.max_in_flight as u64;
    // Kills: at most max_in_flight repeats each (none after clean restarts). Zombies: each
    // record in flight at the freeze repeats at most once. Nothing else may repeat an effect.
    let kill_bound = if args.clean_restarts {
        0
    } else {
        u64::from(done.kills) * mif
    };
    let zombie_bound = u64::from(done.zombies) * mif;
    let bound = kill_bound + zombie_bound;
    if report.duplicates > bound {
        s.problems.push(format!(
            "{} duplicate side effects exceed the bound {bound}",
            report.duplicates
        ));
    }
    if args.breaker && report.outage_dead_lettered > 0 {
        // The breaker's promise (delivery rule 16 in the crate docs): an outage dead-letters nothing.
        s.problems.push(format!(
            "with the breaker on, the downstream outage dead-lettered {} records",
            report.outage_dead_lettered
        ));
    }
    let pass = s.problems.is_empty();
    log(format!(
        "consumed in {:.1?}; {} consumer processes; effects {} (distinct {}), dead letters {} (distinct {}), duplicate dead letters {}",
        s.consume_took,
        s.processes,
        s.ledgers.effects.len(),
        s.ledgers.distinct,
        s.letters,
        report.dead_lettered,
        report.dlt_duplicates
    ));
    log(format!(
        "per kill: uncommitted effects / duplicates of them: {}; duplicate dead letters {} (allowed: {} uncommitted at kills, broker restarts and zombie hand-overs)",
        report.per_kill, report.dlt_duplicates, s.dlt_allowance
    ));
    log(format!("per zombie: {}", report.per_zombie));
    log(s.replays.describe());
    log(format!(
        "dead-letter topic: {} partitions for {} source partitions; {} letters from source partitions it lacks were placed by key",
        s.dlt_partitions, args.partitions, report.dlt_by_key
    ));
    log(format!(
        "downstream outages: {} records dead-lettered (retries exhausted during the outage; breaker {}); {} of them handled again after a crash redelivered them (not held to key order)",
        report.outage_dead_lettered,
        if args.breaker { "on" } else { "off" },
        report.outage_redone
    ));
    // The last consumer's breaker: times it opened, probes, failures it absorbed.
    let figure = |field: &str| {
        s.breaker
            .as_ref()
            .and_then(|b| b.get(field))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let (opened, probes, held) = (figure("opened"), figure("probes"), figure("held_failures"));
    if args.breaker {
        log(format!(
            "breaker (last consumer): opened {opened} times, {probes} probes, {held} failures held (no attempt used, nothing dead-lettered)"
        ));
    }
    let outcomes = &s.ledgers.outcomes;
    for n in s.dlt_kill_notes {
        log(format!(
            "kill right after a dead letter: {} of event {} ({} ms before the SIGKILL); that event has {} dead letters in the topic, {} dead-lettered outcomes reported",
            n.what,
            n.id.map_or("?".into(), |id| id.to_string()),
            n.latency_ms,
            n.id.map_or(0, |id| report.letters_per_event[id as usize]),
            n.id.map_or(0, |id| outcomes.dead_lettered[id as usize])
        ));
    }
    let joined = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join("/");
    if args.compose {
        log(format!(
            "compose: effects by tier (source/1/2) {}; forwards to tier 1/2 {}; {} duplicates skipped, {} records abandoned (outcomes reported); most dead letters for one event {}; {} effects repeated after their event was reported handled; {} repeated across the loss of the idempotency Redis",
            joined(&report.effects_by_tier),
            joined(&outcomes.forwarded),
            outcomes.duplicates,
            outcomes.abandoned,
            report.max_letters_per_event,
            report.after_done,
            report.redis_repeats
        ));
    }
    for p in &s.problems {
        log(format!("PROBLEM: {p}"));
    }
    log(format!("total time {:.1?}", s.started.elapsed()));

    // Cleanup: the Redis, the topics, the work directory (kept on failure).
    let Cleanup {
        rt,
        kafka,
        redis,
        ledger_redis,
        topic,
        dlt,
        tiers,
        group,
        work_dir,
    } = cleanup;
    drop(redis);
    drop(ledger_redis);
    if pass && !args.keep {
        let all: Vec<&str> = [topic, dlt]
            .into_iter()
            .chain(tiers.iter().copied())
            .collect();
        if let Err(e) = rt.block_on(kafka.delete_topics(&all)) {
            log(format!("could not delete the topics: {e}"));
        }
        if args.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(work_dir);
        }
    } else {
        log(format!(
            "kept topic {topic}, group {group} and work dir {}",
            work_dir.display()
        ));
    }

    // `--compose` adds its figures before the verdict.
    let compose = if args.compose {
        let caught = s.caught_up;
        let secs = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        format!(
            "compose=on dlt_kills={} dlt_kill_ms={} tier_effects={} forwarded={} max_letters_per_event={} \
             duplicate_letters={} letters_in_kill_window={} after_done={} redis_repeats={} order_violations={} caught_up_after_s={} \
             caught_up_bound_s={} monitor_caught_up={} ",
            done.dlt_kills,
            s.dlt_kill_notes
                .iter()
                .map(|n| n.latency_ms.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            joined(&report.effects_by_tier),
            joined(&outcomes.forwarded),
            report.max_letters_per_event,
            report.dlt_duplicates,
            report.letters_in_kill_window,
            report.after_done,
            report.redis_repeats,
            report.order_violations,
            secs(caught.and_then(|c| c.after_s)),
            secs(caught.and_then(|c| c.bound_s)),
            s.monitor_caught_up
                .map_or("-", |c| if c { "yes" } else { "no" }),
        )
    } else {
        String::new()
    };
    println!(
        "events={} lost={} duplicates={} bound={bound} dead_lettered={} kills={} kill_duplicates={} \
         broker_restarts={} loaded_broker_restarts={} redis_outages={} zombies={} zombie_duplicates={} \
         zombie_late_writes={} zombie_bound={zombie_bound} outages={} breaker={} breaker_opened={opened} \
         breaker_probes={probes} breaker_held={held} outage_dead_lettered={} dlt_partitions={} dlt_by_key={} \
         commit_metadata={} replayed={} skipped_finished={} {compose}verdict={}",
        args.events,
        report.lost,
        report.duplicates,
        report.dead_lettered,
        done.kills,
        report.kill_duplicates,
        done.broker_restarts,
        done.loaded_broker_restarts,
        done.redis_outages,
        done.zombies,
        report.zombie_duplicates,
        report.zombie_late,
        done.outages,
        if args.breaker { "on" } else { "off" },
        report.outage_dead_lettered,
        s.dlt_partitions,
        report.dlt_by_key,
        s.replays.commit_metadata,
        s.replays.replayed,
        s.replays.skipped,
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}
