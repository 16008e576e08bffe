//! Fault-injection runner: pre-produces events, consumes them with a [`RetryingConsumer`] in a
//! child process while killing that process, the Kafka broker and the idempotency Redis, then
//! checks that nothing was lost and that duplicates stayed within the documented bound.
//!
//! ```text
//! # the reduced run scripts/test does (about 2 minutes):
//! cargo run --example fault_injection -- --events 20000 --kills 2 --broker-restarts 1 \
//!     --redis-outages 1 --dlt-partitions 2 --outages 1 --outage-secs 3
//! # the full run (every fault; the README publishes its table):
//! cargo run --example fault_injection -- --events 200000 --work-ms 70 --kills 5 \
//!     --broker-restarts 1 --loaded-broker-restarts 1 --redis-outages 1 --zombies 1 \
//!     --outages 1 --outage-secs 10 --dlt-partitions 2
//! # graceful restarts only: 0 duplicates expected
//! cargo run --release --example fault_injection -- --events 20000 --clean-restarts --kills 3
//! # every feature at once (see "Compose mode"); scripts/test runs this one too:
//! cargo run --example fault_injection -- --compose --events 3000 --kills 2 \
//!     --broker-restarts 1 --redis-outages 1 --outages 1 --outage-secs 3
//! # queue mode (feature `queue`): QueueConsumers in one share group (see "Queue mode"):
//! cargo run --features queue --example fault_injection -- --queue --events 3000 --kills 2 \
//!     --broker-restarts 1
//! # the reduced run twice, without and with commit metadata, comparing replays (see "Replays"):
//! cargo run --example fault_injection -- --events 20000 --kills 2 --broker-restarts 1 \
//!     --redis-outages 1 --dlt-partitions 2 --outages 1 --outage-secs 3 --commit-metadata both
//! ```
//!
//! It needs the broker (`KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`) and
//! `redis-server` on `PATH`: it starts its own Redis for the idempotency store on a free port,
//! so it can stop it. The broker is restarted only when `KOURIER_FAULT_BROKER_CONTROL` (or
//! `--broker-control`) names the `scripts/services` that runs it (with the same
//! `KOURIER_KAFKA_PORT` / `KOURIER_STATE`), and that script reports it running at the very
//! address the run uses; a broker the script calls external is never touched. Otherwise broker
//! restarts are skipped and the output says so. scripts/test sets the variable only for a
//! broker it started itself.
//!
//! What happens:
//! 1. `--events` events with unique ids go to a fresh topic (6 partitions), keyed by one of
//!    `--keys` keys (200), each carrying its key's sequence number.
//! 2. The consumer runs as a child process (`fault_injection consume ...`): key ordering,
//!    `max_in_flight` 32, a Redis idempotency store (lease 3 s), 4 attempts. Its handler
//!    appends each side effect `(id, key, seq, attempt, pid, partition, offset, time)` to a
//!    ledger file and counts it done only once the line is on disk (`sync_data`, batched).
//!    Simulated work (`--work-ms`, half before and half after the effect) paces consumption so
//!    every fault meets a busy consumer. Failures are injected by a hash of the id, so the
//!    checker knows them: 4.5 % fail transiently once or twice and then succeed, 0.5 % always
//!    fail transiently (retries exhausted: dead-lettered), 0.5 % fail permanently.
//! 3. At random points of progress it SIGKILLs the consumer and starts another (`--kills`),
//!    SIGKILLs the broker and starts it again (`--broker-restarts`; `--loaded-broker-restarts`
//!    waits first until the consumer is saturated and its commits are moving, so the kill
//!    meets commits in progress), and kills the Redis for a few seconds, restarting it *empty*
//!    on the same port (`--redis-outages`). A **zombie** (`--zombies`): a second consumer
//!    joins, the first is frozen with SIGSTOP past the session timeout (6 s) and the lease
//!    (3 s) until the second holds every partition, then resumed with SIGCONT (its in-flight
//!    handlers carry on), and stopped with SIGTERM once the group recovered. A **downstream
//!    outage** (`--outages`, `--outage-secs`): every handler call that gets past the injected
//!    failures fails transiently while a flag file exists (each such failure is noted in the
//!    ledger); records whose retries run out meanwhile are dead-lettered. The dead-letter
//!    topic may have fewer partitions than the source (`--dlt-partitions`). Faults run one
//!    after the other: after each, the runner waits until the consumer has committed past
//!    every effect made so far, so the records one fault can make repeat never overlap the
//!    next fault (a Redis restart during the redelivery after a kill would repeat all of it).
//! 4. When every event is accounted for and the consumer reports itself idle, it stops the
//!    last consumer with SIGTERM and checks.
//!
//! The checks, and the verdict line (exit status 1 on FAIL):
//!
//! ```text
//! events=E lost=L duplicates=D bound=B dead_lettered=X kills=K kill_duplicates=KD
//! broker_restarts=R loaded_broker_restarts=RL redis_outages=S zombies=Z zombie_duplicates=ZD
//! zombie_late_writes=ZL zombie_bound=ZB outages=O breaker=on|off breaker_opened=BO breaker_probes=BP
//! breaker_held=BH outage_dead_lettered=OX dlt_partitions=P
//! dlt_by_key=PK commit_metadata=finished-offsets|none replayed=RP skipped_finished=SF
//! verdict=PASS|FAIL
//! ```
//!
//! - **lost = 0**: every id is in the ledger or the dead-letter topic.
//! - The dead-letter topic holds exactly the permanent and the exhausted ids (X), with the
//!   right failure kind and attempt count; none of them ever had a side effect. A downstream
//!   outage adds the records whose every attempt failed on it (OX, `retries-exhausted`): they
//!   are reported, not a failure; one whose retries it exhausted must be in the topic.
//! - Dead-letter partitions: a letter from source partition `p` is in partition `p` of the
//!   dead-letter topic when it has one, otherwise where Kafka's Java partitioner puts its key
//!   (`murmur2`); PK counts the latter.
//! - **Zombies**: ZD counts the effects a zombie wrote after SIGCONT that another process had
//!   already made (ZL, late writes) plus its effects from before the freeze that the new owner
//!   made again; each record in flight at the freeze repeats at most once, so
//!   `ZD ≤ ZB = zombies × max_in_flight`. Effects are ordered by their ledger time, since the
//!   zombie and its successor write at once.
//! - **D ≤ B** (duplicate side effects), `B = kills × max_in_flight + ZB`; KD counts the
//!   kills' part. After a SIGKILL only
//!   records whose effect was written but whose idempotency claim was not yet completed can
//!   run again (a completed one is skipped as done), and at most `max_in_flight` records are
//!   in flight. Checked per kill too: the repeats of a killed process's effects are at most
//!   `min(max_in_flight, its effects its group had not committed when it died)`, and effects
//!   of a process that was not killed never repeat. A broker restart adds no repeated effect:
//!   if it outlasts the session timeout the partitions are lost and redelivered, but the
//!   store says done. A dead letter can repeat where the store cannot tell it was written (a
//!   kill between the broker's acknowledgement and the delivery's settled mark; a Redis outage
//!   that loses the mark; the `--clean-restarts` mode runs without a store): duplicate dead
//!   letters are checked against the letters not yet
//!   committed at each kill and broker restart (for a zombie: three times those written
//!   since the commits before it began, one per hand-over: the newcomer joins, the zombie
//!   rejoins, the zombie leaves), and no letter repeats more often than there were such
//!   redeliveries.
//! - `--clean-restarts`: SIGTERM instead of SIGKILL and **no idempotency store** (it would
//!   hide redeliveries), so `B = 0`, and no dead letter may repeat either: this tests the
//!   consumer's own commit on graceful shutdown.
//! - Each effect ran at the attempt its injected failures predict; per key, the sequence
//!   numbers of *first* effects strictly increase; committed offsets end at the log end; the
//!   last consumer's monitor snapshot shows every partition assigned, none paused, nothing in
//!   flight or buffered; no consumer process exited unless the runner stopped it.
//!
//! RP and SF are reported, never checked (see "Replays").
//!
//! # Replays (`--commit-metadata`)
//!
//! How many records each fault made the consumers deliver again although they had already
//! finished them: what the crate's commit metadata (`CommitMetadata::FinishedOffsets`, the
//! default) is there to spare. Counted from the outcome logs every consumer writes (its
//! `on_outcome` observer, see "Compose mode"; every mode writes them):
//!
//! - A record (its topic — source or tier —, partition and offset) is **finished** once a
//!   process noted a final outcome for it: `handled`, `duplicate`, `dead-lettered` or
//!   `forwarded` (not `abandoned`: given up unsettled at a revoke or shutdown).
//! - Every later final outcome of the same record is a **replay**: the record was delivered
//!   again and reached a handler, or the idempotency check, which skipped it as a
//!   duplicate — in another process (after a kill, a zombie's hand-over) or in the same one
//!   after it lost its partitions and got them back (a broker restart that outlasts the
//!   session timeout). Each replay counts for the fault in whose window it was noted: from
//!   that fault's start to the next fault's (or the end). The runner settles each fault
//!   before the next, so a fault's replays are over before the next begins.
//! - **Skipped as finished**: records a new owner did not deliver because a commit's
//!   metadata named them finished. They reach no handler and no observer; each consumer's
//!   status lines carry its `ConsumerSnapshot::skipped_finished`, and the runner counts
//!   per window what each process added (status lines come every 500 ms: a killed
//!   process's last half second may be missing).
//! - For a kill, also the records **finished above the commits** once the process was dead
//!   (outcomes at offsets the group's commits do not cover): what a next owner without
//!   metadata delivers again.
//!
//! Not counted as replays: records in flight but not finished at a SIGKILL (their repeated
//! effects are the duplicates above), and a replay cut short by a later kill before its
//! outcome. With metadata some replays stay: the observer runs just before a record is
//! settled, and a commit names only what was settled when it was sent, so records finished
//! after the last commit that went through are delivered again — those of the last commit
//! interval (500 ms) before a kill, and, when a broker restart outlasts the session timeout,
//! every record finished after the broker died until the consumer gave its partitions up (no
//! commit goes through meanwhile) — and so are the highest finished ranges when they do not
//! fit in the metadata's 4,000 bytes.
//!
//! `--commit-metadata none` runs the consumers with `CommitMetadata::None` (every record
//! from the commit point on is delivered again); `both` runs the whole experiment twice with
//! the same seed (the same events, injected failures and fault plan; the faults come at the
//! same points of progress, but timings differ), first `none` (the "before" figure) then the
//! default (the "after" figure), each with its own verdict line, and ends with one line on
//! stdout (exit status 1 if either run failed):
//!
//! ```text
//! replays before -> after (commit_metadata none -> finished-offsets): downstream-outage 1/1: 0 -> 0,
//! kill 1/2: 2166 -> 67, redis-outage 1/1: 0 -> 0, broker-restart 1/1: 907 -> 264, kill 2/2: 0 -> 0;
//! in all 3073 -> 331 replayed, 0 -> 3278 skipped as finished
//! ```
//!
//! (one line; the reduced run above with `--commit-metadata both`, README "Fault injection").
//!
//! Each run also logs `replays (commit_metadata=M): <fault>: R replayed (F finished above the
//! commits at the kill), S skipped as finished; ...`. Replays are never a failure, and the
//! checks are the same with either metadata; but without an idempotency store
//! (`--clean-restarts`, `--no-idempotency`) a replay is a repeated effect, and the duplicate
//! checks count it as one.
//!
//! # Compose mode (`--compose`)
//!
//! Every feature at once, as issue 23 asked: the consumers run with
//! - **retry tiers** of 1 s and 2 s (`<topic>.retry.1`, `<topic>.retry.2`, created by the runner
//!   with the source's partitions), 2 in-place attempts per stage (fixed 50 ms back-off), so an
//!   event gets 6 attempts before it is dead-lettered as retries-exhausted after the last tier;
//! - **per-key order across the tiers** (`with_key_order`) with a `RedisKeyOrderLedger` in a
//!   second Redis the runner starts (see below);
//! - the **Redis idempotency store** as in the other modes (lease 3 s);
//! - the **outage breaker** (`--breaker` is implied).
//!
//! The handler counts attempts over every stage (the attempts before the tier, from the
//! provenance headers, plus `Message::attempt`), so the injected failures send records through
//! the tiers: 2 % fail once (retried in place at the source), 1.5 % two or three times (they
//! succeed in tier 1), 1 % four or five times (tier 2), 0.5 % always (dead-lettered after the
//! last tier), 0.5 % permanently (dead-lettered at once, from wherever they are). Each
//! consumer also notes every record's outcome (its `on_outcome` observer) in
//! `outcomes-NN.log`, one unbuffered write per line: `time outcome id tier partition offset`.
//!
//! Faults: the usual ones (`--kills`, `--broker-restarts`, `--redis-outages`, `--outages`; no
//! zombies: a zombie's late writes would break the strict checks below), and **kills right
//! after a dead letter** (`--dlt-kills`, default 1 of the `--kills`): the runner tails the
//! current consumer's outcome log every millisecond and SIGKILLs it as soon as a
//! `dead-lettered` line appears (one from the last tier if one comes within 20 s, else any),
//! so the letter is acknowledged but its offset, and those of its tier copies, are not
//! committed (`dlt_kill_ms`: how many ms after the outcome the signal went). After each fault
//! the runner waits, besides the source commits passing every effect, for the source commits
//! to pass every record that had an outcome and then for each tier in turn to be committed up
//! to its log end as it was once the level before settled: the tier copies a fault can make
//! (forwards repeated after a kill, and their forwards on) are all settled before the next.
//!
//! **Why the key-order ledger has a Redis of its own that no fault touches.** The crate
//! documents order across tiers as guaranteed only while the ledger keeps its data ("order
//! after a ledger entry is lost" is not guaranteed): killing the ledger's Redis empty would
//! release every key with records in tiers at that moment, and the order check could only
//! exempt them all, which the runner cannot even list from outside. What a Redis that loses
//! its data costs is what the idempotency store's outage tests (its done marks go); a
//! deployment that relies on `with_key_order` keeps the ledger on a Redis that keeps its data
//! (AOF, a replica). An outage of the ledger *without* data loss (its steps are retried until
//! they answer; the record waits) is not injected.
//!
//! The checks of the other modes, plus (the verdict line gets `compose=on dlt_kills=N
//! dlt_kill_ms=MS tier_effects=S/T1/T2 forwarded=F1/F2 max_letters_per_event=M
//! duplicate_letters=DL letters_in_kill_window=LW after_done=AD redis_repeats=RR order_violations=OV
//! caught_up_after_s=C caught_up_bound_s=CB monitor_caught_up=yes|no` before `verdict=`):
//!
//! - **At most one dead letter per event, as far as the store can tell**: rule 18 in the
//!   crate docs, one event one outcome across crashes, redeliveries and tier copies. A
//!   consumer reports a letter (its outcome observer) only after it marked the delivery
//!   settled, so no event may be *reported* dead-lettered twice, by one process or several.
//!   A letter nobody reported was written by a process killed between the broker's
//!   acknowledgement and the mark — the one window at-least-once leaves without a Kafka
//!   transaction; the kill right after a dead letter aims at it, and letters of other records
//!   in flight at that instant can fall in it: LW counts them (DL − those is 0), at most
//!   `kills × max_in_flight`. This replaces the allowance for letters uncommitted at a kill
//!   that the other modes grant.
//! - **Each event's effect once, where the design can promise it**: no effect of an event
//!   after a process reported it *handled* (the observer hears `Handled` only once the store
//!   marked its key done), unless the idempotency Redis was killed in between (its done mark
//!   went with it): AD = 0. Redeliveries after a kill, stale tier copies and records deferred
//!   for key order must all find the event done. What the design cannot promise is an effect
//!   written by a process killed before its claim was completed: the store cannot tell it
//!   happened. Those repeats keep the bound of the other modes, `D ≤ kills × max_in_flight`,
//!   and per kill at most the killed process's effects not yet committed (over the source and
//!   the tier topics) and `max_in_flight`; effects of a process that was not killed never
//!   repeat — except across the loss of the idempotency Redis (RR, reported, not bounded): a
//!   repeat whose effect before it came before the Redis was killed. The runner settles each
//!   fault before the next, but it cannot wait for every copy of a record to leave the tiers:
//!   a forward repeated after a kill gives a record two copies, and copies deferred behind
//!   their key go round a tier (a new offset each time) until the key is free. When the
//!   first copy is handled before the outage and the second after it, the store no longer
//!   knows the event is done.
//! - **Per-key order through the tiers**: first effects of each key in sequence order (OV = 0;
//!   the same check as the other modes, which with `with_key_order` must hold across tiers).
//!   Each effect at the attempt its failures predict (counted over every stage), in a tier its
//!   failed stages can have brought it to; tier 1 and tier 2 each saw effects (T1, T2 > 0).
//! - **Caught up within a bound after the last fault**: from the end of the last fault until
//!   every event is accounted for, the source and tier topics are committed to their log ends
//!   (read by the runner from the group's commits) and the last consumer is idle: C ≤ CB,
//!   where CB is `--caught-up-secs` (60) plus the time the effects left at the end of the last
//!   fault need at the pace before the first fault. A breaker held open by records failing on
//!   their own, or stale tier copies holding each other, shows up here. The consumer's own
//!   monitor must then say `caught_up` too (`monitor_caught_up=yes`), also for partitions it
//!   was assigned at their end after a kill and never read a record from.
//! - **Order of the faults**: the downstream outage first, then the kill right after a dead
//!   letter, then the rest: a compose run's recoveries are long (tier copies must drain too),
//!   so later faults meet a consumer near the end of its work, and these two need a busy one
//!   (with little traffic a lone record may use up its attempts before the breaker can tell
//!   an outage from a record failing on its own; a kill after a dead letter needs letters
//!   still to come).
//!
//! # Queue mode (`--queue`)
//!
//! Needs kourier's experimental `queue` feature (`cargo run --features queue --example
//! fault_injection -- --queue ...`; without it `--queue` is an error before anything is
//! created). `--members` (2) consumer processes run a `QueueConsumer` each, in one share
//! group over the topic (6 partitions): the same events, handler, injected failures (4.5 %
//! transient once or twice, 0.5 % always, 0.5 % permanent), ledger, outcome notes, Redis
//! idempotency store (lease 3 s), 4 attempts (fixed 50 ms back-off), `max_in_flight` and
//! dead-letter topic `<topic>.dlt`; each member fetches at most `--fetch-size` records
//! (default `--max-in-flight`, 32). Simulated work is paced so that consuming takes about 12 s
//! per fault (20 s at least) at full speed.
//!
//! Faults, one after the other at random points of progress (15 %..80 % of the effects), each
//! followed by progress of two batches per member before the next: **SIGKILL of a member**
//! (`--kills`; one at random, replaced at once by a new process) — the broker hands the
//! records it held locked to the others when its connection closes; **broker restart**
//! (`--broker-restarts`, default 1; only through `KOURIER_FAULT_BROKER_CONTROL`, as in the other
//! modes, else skipped and said so). No other fault (`--redis-outages`, `--zombies`,
//! `--outages`, `--compose`, `--clean-restarts` are refused). When every event is accounted for,
//! the runner waits for the share group to have nothing left (below), stops every member with
//! SIGTERM and checks:
//!
//! ```text
//! events=E lost=L duplicates=D bound=B dead_lettered=X kills=K kill_duplicates=KD
//! broker_restarts=R mode=queue members=M fetch_size=F duplicate_letters=DL letter_bound=B
//! max_letters_per_event=ML share_group_left=G acknowledgement_failures=AF verdict=PASS|FAIL
//! ```
//!
//! - **lost = 0**: every event has its effect in a ledger, or, if injected to fail for good,
//!   a letter in the dead-letter topic.
//! - **Effects**: none for a dead-lettered event; each at the attempt its injected failures
//!   predict (`Message::attempt` counts a delivery's attempts, so a record redelivered after a
//!   kill fails its injected failures again and still has its effect at that attempt).
//! - **Duplicates**: `D ≤ B = kills × F + broker_restarts × M × F`. A share-group member holds
//!   at most a fetch (F records) locked; a SIGKILL sends back what the killed member held, and a
//!   broker restart what every member held (their connections close; settlements that travel
//!   with the next fetch may not have gone). F rather than `max_in_flight`: what comes back is
//!   the fetch, and the bound holds without the idempotency store (with it, only records whose
//!   effect was written but whose claim was not yet completed run again, at most
//!   `max_in_flight`, which the default F equals). Checked per kill too: the repeats of a killed
//!   member's effects are at most F (KD sums them); effects of a member never killed do not
//!   repeat unless the broker restarted. Repeats are counted by the effect they repeat (ledger
//!   time order).
//! - **Dead letters**: exactly the permanent (`permanent`, 1 attempt) and exhausted
//!   (`retries-exhausted`, 4 attempts) events have letters, with that kind and attempt count,
//!   and nothing else is in the topic. A letter repeats only where a fault fell between the
//!   letter and its ACCEPT reaching the broker (the ACCEPT travels with the member's next
//!   fetch): the duplicate letters DL share the bound B (a fault sends back at most F records
//!   per member it hit, letters included), and no event has more than `1 + kills +
//!   broker_restarts` letters (ML).
//! - **The share group has nothing left (G = 0)**: every record acknowledged, read from the
//!   broker with krafka's admin client (`DescribeShareGroupOffsets`: the share-partition lag,
//!   summed over the partitions; log end − start offset on brokers before Kafka 4.3). Read
//!   while the members still run (their last ACCEPTs travel with their next fetch; up to 30 s)
//!   and again, checked, once every member left. The start offset alone is no proof: it can
//!   stay below the log end with every record above it acknowledged (measured: 60 of 3,000).
//! - Every member exited on SIGTERM with status 0; none exited on its own (a member that exits
//!   during the run stops it with an error).
//!
//! AF (acknowledgements the broker refused, from each member's `QueueReport`; a killed
//! member's are missing) is reported, not checked.
//!
//! On PASS the topics and the work directory are removed; on FAIL they are kept (the path is
//! printed), with each consumer's log and ledger.
//!
//! [`RetryingConsumer`]: kourier::RetryingConsumer
//!
//! The code, by concern: `cli` (flags), `event` (events and their injected fates), `consumer`
//! (the child process and its handler), `ledger` (the side-effect files, written and read),
//! `outcomes` (the outcome logs, written and read), `replays` (replays counted per fault),
//! `procs` (starting and stopping consumer processes), `run` (the runner), `queue_run` (the
//! runner and checks of queue mode), `faults` (the plan
//! and each fault), `watch` (waiting for progress and recovery), `kafka`, `redis` and `broker`
//! (the services), `check` (the checks) and `report` (verdict and summary line).

mod broker;
mod check;
mod cli;
mod consumer;
mod event;
mod faults;
mod kafka;
mod ledger;
mod outcomes;
mod procs;
mod queue_run;
mod redis;
mod replays;
mod report;
mod run;
mod watch;

use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, MetadataMode, RunArgs, Sub};

/// How many attempts the consumer makes (fixed 50 ms back-off, 3 retries).
const MAX_ATTEMPTS: u32 = 4;
/// `--compose`: the retry tiers' delays (two tiers, `<topic>.retry.1` and `<topic>.retry.2`).
const TIER_DELAYS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];
/// `--compose`: in-place attempts per stage, at the source and in each tier (fixed 50 ms
/// back-off, 1 retry): an event gets `COMPOSE_ATTEMPTS_PER_STAGE × (tiers + 1)` = 6 attempts.
const COMPOSE_ATTEMPTS_PER_STAGE: u32 = 2;

/// How many attempts an event gets in all before it is dead-lettered as retries-exhausted.
fn max_attempts(compose: bool) -> u32 {
    if compose {
        COMPOSE_ATTEMPTS_PER_STAGE * (TIER_DELAYS.len() as u32 + 1)
    } else {
        MAX_ATTEMPTS
    }
}

/// The consumer's commit interval.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// The idempotency lease: a killed consumer's claims block their keys this long.
const LEASE: Duration = Duration::from_secs(3);
/// The consumer's session timeout: a frozen consumer loses its partitions after this.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Sub::Consume(args)) => consumer::consume(args),
        None => match run_all(cli.run) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("fault: error: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}

/// One run, or with `--commit-metadata both` two with the same seed (`none`, then
/// `finished-offsets`) and the line comparing their replays; true when every run passed.
fn run_all(args: RunArgs) -> BoxResult<bool> {
    if args.queue {
        return queue_run::run(args);
    }
    if args.commit_metadata != MetadataMode::Both {
        return Ok(run::run(args)?.pass);
    }
    let seed = args.seed.unwrap_or_else(run::seed_from_clock);
    let with = |mode: MetadataMode| RunArgs {
        seed: Some(seed),
        commit_metadata: mode,
        work_dir: args
            .work_dir
            .as_ref()
            .map(|d| d.join(format!("commit-metadata-{}", mode.as_str()))),
        ..args.clone()
    };
    log(format!(
        "--commit-metadata both: two runs with seed {seed}, first without commit metadata, then with it"
    ));
    let before = run::run(with(MetadataMode::None))?;
    let after = run::run(with(MetadataMode::FinishedOffsets))?;
    println!("{}", replays::compare(&before.replays, &after.replays));
    Ok(before.pass && after.pass)
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A line on stderr, prefixed `fault:`.
fn log(msg: impl AsRef<str>) {
    eprintln!("fault: {}", msg.as_ref());
}
