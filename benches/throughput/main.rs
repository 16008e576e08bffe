//! Throughput, CPU, memory and end-to-end latency of kourier against a raw rdkafka baseline,
//! on the real broker (and Redis for the idempotency scenario).
//!
//! ```text
//! cargo bench --bench throughput                  # full run: 1,000,000 records × 100 B
//! cargo bench --bench throughput -- --quick       # reduced run (CI smoke check), ~30 s
//! cargo bench --bench throughput -- --size 1024 --scenarios a,b
//! cargo bench --bench throughput -- --scenarios destinations   # not in the default set, ~1 min
//! cargo bench --bench throughput -- --scenarios hot            # not in the default set, ~1.5 min
//! cargo bench --bench throughput -- --help
//! ```
//!
//! Needs Kafka and Redis (`scripts/services up`, or `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL`).
//! `cargo test --all-targets` runs this binary as well (debug build, no `--bench` argument):
//! then it makes a tiny `--smoke` run (~10 s), or none when a test-name filter is given.
//!
//! One run pre-produces the records to fresh topics (all of them are in the log before any
//! consumer starts, so the producer cannot be the bottleneck), then runs each scenario in its
//! own child process (this binary re-executed with `--scenario`), so that peak RSS (`VmHWM`) and
//! CPU time are per scenario. Each scenario uses its own consumer group; topics are unique per
//! run and deleted at the end (`--keep-topics` keeps them).
//!
//! Drain scenarios read the same topic (6 partitions) with the same consumer settings
//! (kourier's: `auto.offset.reset=earliest`, `enable.partition.eof=false`,
//! `queued.max.messages.kbytes=16384`, `fetch.max.bytes=16777216`, `fetch.queue.backoff.ms=20`, `enable.auto.commit=false`, offsets committed every 1 s
//! and at the end):
//!
//! - (a) a raw rdkafka `BaseConsumer` loop that only counts and tracks offsets;
//! - (b) kourier, no-op handler, `ProcessingOrder::Partition`;
//! - (c) (b) plus the Redis idempotency store (every record has a unique `event-id` header);
//! - (d) (b) with 1 % permanent failures, dead-lettered to `<topic>.dlt`;
//! - (c0) and (d0), the floors of (c) and (d): the raw loop (a) plus the same Redis or
//!   dead-letter work done by hand with the least round trips that keep kourier's guarantee
//!   (a pipelined `SET NX PX` claim and one fenced completion script per batch of up to 256
//!   records; the same letters with the same producer settings). `floors` says why each is
//!   the floor. The table compares (c) with (c0) and (d) with (d0), with the consumer's and
//!   the Redis server's CPU per record apart.
//!
//! A drain's time runs from the first record handed to user code (raw: returned by `poll`;
//! kourier: handler entry) until every record is settled (raw: counted; kourier: handled,
//! dead letters acknowledged, nothing in flight or buffered), so group joins are excluded. Its
//! CPU time is the whole process's user+sys (librdkafka's threads included) from consumer
//! creation to that moment, read from `/proc/self/stat`. Afterwards the group's committed
//! offsets are checked to cover every record: a run that loses records is an error.
//!
//! kourier decodes each value as JSON (its default codec) into a one-field struct; that cost
//! is part of its overhead. The raw loop does not look at the payload.
//!
//! The slow-handler scenarios await a 10 ms tokio sleep per record on one partition with 1,000
//! keys: `ProcessingOrder::Partition` (only 1,000 records: 20,000 would take ~200 s) against
//! `ProcessingOrder::Key` with `max_in_flight(500)` (20,000 records); their rates are compared.
//!
//! The retry scenarios read the slow-handler topic in `ProcessingOrder::Key` with the default
//! `max_in_flight` (64) and the 10 ms handler: (e0) without failures, (e) with the first attempt
//! of 5 % of the records failing transiently and retried after a fixed 500 ms back-off. A record
//! waiting out its back-off holds no in-flight slot, so (e) should take little longer than (e0);
//! their rates are compared.
//!
//! The latency scenarios send at a fixed rate (5,000 records/s for 20 s after a 5 s warm-up
//! that is not recorded) from a producer thread in the same process, each record stamped with
//! its send time (µs since the epoch, header `sent-at-us`); the consumer (raw, or kourier with
//! a no-op handler) records `now − sent` at handler entry in an HDR histogram. The producer's
//! own send → acknowledgement time is reported beside it: it is the broker's share.
//!
//! The destination scenarios run only when named (`--scenarios destinations`, or any of
//! `dest-up`, `dest-down`, `dest-all-down`): a breaker per destination on the real broker. Like
//! the latency scenarios they send at `--latency-rate` for `--latency-secs` after the warm-up,
//! each record stamped with its send time, but keyed by destination: record `id` goes to
//! `dest-{id % 1000}`, its partition chosen by the producer from the key. kourier runs in
//! `ProcessingOrder::Key` with `Destinations::by_key()` (open interval fixed at 2 s, so that
//! the calls it allows are easy to count) and `BreakerPolicy::default()`; a delivery to a
//! destination that is up is a 1 ms tokio sleep, one to a destination that is down returns
//! `HandlerError::unavailable("connection refused")` at once. Latency (send → entry of the
//! call that delivers) is recorded for the 980 destinations that dest-down keeps up, the same
//! records in every scenario. dest-up: none down, the baseline. dest-down: `dest-0`,
//! `dest-50`, … `dest-950` (20, 2 %) down from the end of the warm-up until every record of
//! the others is delivered (`--dest-down-at-start`: from the consumer's start); it prints the
//! others' p50/p99 against dest-up's, the calls to the 20 against what the open interval
//! allows (20 × (1 + seconds down / 2 s)) and whether the consumer-wide breaker stayed closed.
//! dest-all-down: every destination down for the first 3 s of a measured phase of at most
//! 10 s; the consumer-wide breaker must open (the scenario fails if it does not). A record
//! waiting for its destination holds its partition's commit point, so these scenarios raise
//! `max_uncommitted_per_partition` to the run's record count (`--uncommitted-per-partition`
//! sets it: with kourier's 10,000, 12 s of one partition's 833 records/s, every partition
//! paused during dest-down and it failed). Each checks that every record is delivered once
//! the destinations are back, that the group committed all of them and that nothing was
//! dead-lettered, and fails otherwise.
//!
//! The hot-destination scenarios run only when named (`--scenarios hot`, or any of `dest-hot`,
//! `dest-hot-capped`, `dest-hot-retry`): whether one slow destination that takes half the
//! records can take the in-flight slots of the others. They send at `--hot-rate` (default
//! 1,000 records/s) for `--latency-secs` (at most 10) after the warm-up, each record stamped
//! with its send time, with a key of its own (`rec-{id}`, the partition chosen by the producer
//! from the key) and its destination in header `dest`: the even ids go to `hot`, whose
//! delivery is a 200 ms tokio sleep, the odd ones to 500 others (`dest-N`), a 1 ms sleep.
//! kourier runs in `ProcessingOrder::Unordered` (so the hot destination spans every lane) with
//! the default `max_in_flight` (64) and `Destinations::header("dest")`. 500 records/s × 200 ms
//! wants 100 slots: with no cap the hot destination takes all 64 and the consumer falls
//! behind for as long as it sends. dest-hot: no cap, the baseline; dest-hot-capped:
//! `with_max_in_flight(8)`, an eighth of the slots: the hot destination gets 40 records/s
//! (8 / 200 ms) and its other records wait without a slot; dest-hot-retry: dest-hot-capped
//! with the first attempt of one in ten of the other destinations' records (by a hash of the
//! id) failing transiently, retried after a fixed 100 ms back-off. Latency (send → entry of
//! the call that delivers) is recorded for the other destinations' records delivered at their
//! first attempt, and apart for the hot destination's and for the others' delivered by a
//! retry. The handler counts the calls to the hot destination running at once; a capped
//! scenario fails if they ever exceed 8. Once every record of the others is delivered the hot
//! destination answers in 1 ms, so that its backlog drains. Each prints the others' p50/p99
//! against dest-hot's, the calls per second that delivered in the measured phase (the others'
//! and the hot one's), the most calls to the hot destination at once, and how long the others
//! and then the backlog took after the last send; like the destination scenarios each raises
//! `max_uncommitted_per_partition` to the run's record count and fails if a record is lost or
//! dead-lettered or the group did not commit them all.
//!
//! One table goes to stdout with every figure, its ratio to (a) and the issue's targets marked
//! PASS/MISS; they are informational: the exit code is non-zero only when the benchmark itself
//! broke (a service missing, a scenario failing or losing records).
//!
//! The code, by concern: `args` and `scenario` (the command line), `services` (Kafka, Redis,
//! topics, offsets), `produce` (pre-filling), `consumers` (the raw settings, kourier's builder,
//! the handler), `drain`, `floors`, `latency`, `destinations` and `hot` (the scenarios), `measure`
//! (CPU, RSS, latency, the outcome), `parent` (one child process per scenario) and `table`
//! (the report).

mod args;
mod consumers;
mod destinations;
mod drain;
mod floors;
mod hot;
mod latency;
mod measure;
mod parent;
mod produce;
mod scenario;
mod services;
mod table;

use std::process::ExitCode;
use std::time::Duration;

use crate::args::{Args, ChildArgs, parse_args};
use crate::destinations::destinations;
use crate::drain::{kourier_drain, raw_drain};
use crate::floors::{dead_letter_floor_drain, read_floor_drain, redis_floor_drain};
use crate::hot::hot;
use crate::latency::latency;
use crate::measure::Outcome;
use crate::parent::run_parent;
use crate::scenario::Scenario;

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Partitions of the drain and latency topics.
const PARTITIONS: i32 = 6;
/// Distinct keys of the slow-handler topic (one partition).
const SLOW_KEYS: u64 = 1_000;
/// What the slow handler awaits per record.
const SLOW_HANDLER: Duration = Duration::from_millis(10);
/// kourier's `max_in_flight` default (builder.rs).
const DEFAULT_MAX_IN_FLIGHT: u64 = 64;
/// `max_in_flight` of the slow-handler Key scenario.
const SLOW_KEY_MAX_IN_FLIGHT: usize = 500;
/// Every `FAIL_EVERY`-th record fails permanently in scenario (d): 1 %.
const FAIL_EVERY: u64 = 100;
/// The first attempt of every `RETRY_FAIL_EVERY`-th record fails transiently in scenario (e):
/// 5 %.
const RETRY_FAIL_EVERY: u64 = 20;
/// The fixed retry back-off of scenarios (e0) and (e).
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// The claim lease of scenarios (c) and (c0): kourier's default.
const DEDUP_LEASE: Duration = Duration::from_secs(60);
/// How long (c) and (c0) keep a key done. Short: a full run leaves ~2 M keys behind.
const DEDUP_TTL: Duration = Duration::from_secs(600);
/// Unique per record: the dedup key of scenario (c).
const EVENT_ID_HEADER: &str = "event-id";
/// The scheduled send time in µs since the epoch (latency scenarios).
const SENT_AT_HEADER: &str = "sent-at-us";
/// `linger.ms` of the latency producer.
const LATENCY_LINGER_MS: u64 = 5;
/// kourier's librdkafka pre-fetch cap (`queued.max.messages.kbytes`, set by its builder).
const QUEUED_MAX_KBYTES: u64 = 16_384;
/// Destinations of the destination scenarios: record `id` goes to `dest-{id % DESTINATIONS}`.
const DESTINATIONS: u64 = 1_000;
/// In dest-down, `dest-N` is down when `N % DOWN_EVERY == 0`: 20 of 1,000 (2 %).
const DOWN_EVERY: u64 = 50;
/// A delivery to a destination that is up: a tokio sleep.
const DELIVERY: Duration = Duration::from_millis(1);
/// A destination's open interval in the destination scenarios (fixed: no doubling).
const DEST_OPEN: Duration = Duration::from_secs(2);
/// dest-all-down: every destination is down this long from the start of the measured phase.
const OUTAGE: Duration = Duration::from_secs(3);
/// dest-all-down measures at most this many seconds (the outage and the recovery fit).
const OUTAGE_MAX_SECS: u64 = 10;
/// The hot-destination scenarios: records with an even id go to the hot destination (half).
const HOT_EVERY: u64 = 2;
/// The hot destination's name (header [`DEST_HEADER`]).
const HOT_NAME: &str = "hot";
/// A delivery to the hot destination: a tokio sleep.
const HOT_DELIVERY: Duration = Duration::from_millis(200);
/// The other records go to `dest-{(id / HOT_EVERY) % HOT_OTHERS}`: 500 destinations.
const HOT_OTHERS: u64 = 500;
/// `Destinations::with_max_in_flight` of dest-hot-capped and dest-hot-retry: 8 of the default
/// `max_in_flight` (64).
const HOT_CAP: u32 = 8;
/// The hot-destination scenarios measure at most this many seconds.
const HOT_MAX_SECS: u64 = 10;
/// dest-hot-retry: the first attempt of every `HOT_RETRY_EVERY`-th record of the other
/// destinations (by a hash of its id) fails transiently: 10 %.
const HOT_RETRY_EVERY: u64 = 10;
/// dest-hot-retry's fixed retry back-off.
const HOT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The record's destination (the hot-destination scenarios).
const DEST_HEADER: &str = "dest";
/// A scenario that takes longer than this is broken.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match &args.child {
        Some(child) => run_child(&args, child).map(|outcome| {
            println!(
                "RESULT {}",
                serde_json::to_string(&outcome).expect("outcome serializes")
            );
        }),
        None => run_parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a child process runs: its scenario, measured.
fn run_child(args: &Args, child: &ChildArgs) -> BoxResult<Outcome> {
    // Unique per child process, so a scenario run again by hand on a kept topic starts over.
    let group = format!(
        "{}-{}-{}-g",
        child.topic,
        child.scenario.name(),
        std::process::id()
    );
    match child.scenario {
        Scenario::Raw => raw_drain(args, child, &group),
        Scenario::RawRead => read_floor_drain(args, child, &group),
        Scenario::RedisFloor => redis_floor_drain(args, child, &group),
        Scenario::DeadLetterFloor => dead_letter_floor_drain(args, child, &group),
        Scenario::LatencyRaw | Scenario::Latency => latency(args, child, &group),
        Scenario::DestUp | Scenario::DestDown | Scenario::DestAllDown => {
            destinations(args, child, &group)
        }
        Scenario::DestHot | Scenario::DestHotCapped | Scenario::DestHotRetry => {
            hot(args, child, &group)
        }
        _ => kourier_drain(args, child, &group),
    }
}
