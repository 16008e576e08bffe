//! What the Rust runners of the peers benchmark share (`scripts/peers`): the command line, the
//! job (which records fail and how), the counting, the measures and the result line. The Java
//! runner (`benches/peers/parallel-consumer/`) does the same.
//!
//! Every record's value is JSON `{"id": "evt-<seq>", "seq": <seq>, "user": "user-<k>", ...}`,
//! its key `user-<k>` (1,000 users) and its `event-id` header `evt-<seq>`; `seq` runs from 0 to
//! the topic's record count. A record counts as *handled* when a handler call for it returned
//! success, and as *dead-lettered* when the dead-letter topic `<topic>.dlt` holds it; one that
//! is neither when the run ends is *lost*.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Records handled at once (kourier's `max_in_flight`, prosody's max concurrency, Parallel
/// Consumer's `maxConcurrency`).
pub const MAX_IN_FLIGHT: usize = 64;
/// Records prosody may hold uncommitted (its `max_uncommitted`).
pub const MAX_UNCOMMITTED: usize = 1_024;
/// The work of scenario `work`: an async sleep per record.
pub const WORK: Duration = Duration::from_millis(10);
/// The back-off before the retry of a transient failure.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// How long a dedup key lives (`SET NX EX`, and kourier's store TTL).
pub const DEDUP_TTL: Duration = Duration::from_secs(6 * 3600);
/// The header every record carries its unique event id in.
pub const EVENT_ID_HEADER: &str = "event-id";
/// A run that makes no progress for this long ends; what is unsettled then is lost.
pub const STALL: Duration = Duration::from_secs(60);

/// The notifier job's variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A no-op handler.
    Noop,
    /// A no-op handler behind a Redis dedup (`SET NX` on the event id, 6 h TTL).
    Redis,
    /// 10 ms of async work per record.
    Work,
    /// A no-op handler; 1 % of the records fail permanently (to the dead-letter topic), the
    /// first attempt of 5 % fails transiently (retried after 500 ms).
    Failures,
}

impl Scenario {
    fn parse(s: &str) -> BoxResult<Scenario> {
        Ok(match s {
            "noop" => Scenario::Noop,
            "redis" => Scenario::Redis,
            "work" => Scenario::Work,
            "failures" => Scenario::Failures,
            _ => return Err(format!("unknown scenario {s:?}").into()),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Noop => "noop",
            Scenario::Redis => "redis",
            Scenario::Work => "work",
            Scenario::Failures => "failures",
        }
    }
}

/// What happens to a record in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Succeeds,
    /// Every attempt fails permanently: the record belongs in the dead-letter topic.
    Permanent,
    /// The first attempt fails transiently, the retry succeeds.
    TransientOnce,
}

/// Chosen by a hash of `seq`, not `seq` itself: a user's records are `seq ≡ k (mod 1000)`, so
/// `seq % 100` would make every record of some users fail.
pub fn fate(scenario: Scenario, seq: u64) -> Fate {
    if scenario != Scenario::Failures {
        return Fate::Succeeds;
    }
    match (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100 {
        0 => Fate::Permanent,
        1..=5 => Fate::TransientOnce,
        _ => Fate::Succeeds,
    }
}

/// How many of the first `records` records fail permanently.
pub fn expected_dead_letters(scenario: Scenario, records: u64) -> u64 {
    (0..records)
        .filter(|&s| fate(scenario, s) == Fate::Permanent)
        .count() as u64
}

/// `--bootstrap B --redis-url R --topic T --group G --records N --scenario S`.
#[derive(Debug, Clone)]
pub struct Args {
    pub bootstrap: String,
    pub redis_url: String,
    pub topic: String,
    pub group: String,
    pub records: u64,
    pub scenario: Scenario,
}

impl Args {
    pub fn parse() -> BoxResult<Args> {
        let mut args = std::env::args().skip(1);
        let (mut bootstrap, mut redis_url, mut topic, mut group) = (None, None, None, None);
        let (mut records, mut scenario) = (None, None);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--bootstrap" => bootstrap = Some(value),
                "--redis-url" => redis_url = Some(value),
                "--topic" => topic = Some(value),
                "--group" => group = Some(value),
                "--records" => records = Some(value.parse()?),
                "--scenario" => scenario = Some(Scenario::parse(&value)?),
                _ => return Err(format!("unknown flag {flag}").into()),
            }
        }
        let missing = |name: &str| format!("--{name} is required");
        Ok(Args {
            bootstrap: bootstrap.ok_or_else(|| missing("bootstrap"))?,
            redis_url: redis_url.unwrap_or_else(|| "redis://127.0.0.1:6379/".into()),
            topic: topic.ok_or_else(|| missing("topic"))?,
            group: group.ok_or_else(|| missing("group"))?,
            records: records.ok_or_else(|| missing("records"))?,
            scenario: scenario.ok_or_else(|| missing("scenario"))?,
        })
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlt", self.topic)
    }

    /// The Redis key of an event id (unique per run: the topic is).
    pub fn dedup_key(&self, event_id: &str) -> String {
        format!("{}{event_id}", self.dedup_prefix())
    }

    pub fn dedup_prefix(&self) -> String {
        format!("peers:{}:", self.topic)
    }
}

/// One bit per `seq`.
#[derive(Debug)]
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets the bit; true when it was clear.
    fn set(&self, i: u64) -> bool {
        let Some(word) = self.0.get((i / 64) as usize) else {
            return false;
        };
        let bit = 1 << (i % 64);
        word.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }
}

/// What the handler saw.
#[derive(Debug)]
pub struct Tracker {
    handled: Bits,
    attempted: Bits,
    handled_count: AtomicU64,
    duplicates: AtomicU64,
    first: OnceLock<Instant>,
}

impl Tracker {
    pub fn new(records: u64) -> Tracker {
        Tracker {
            handled: Bits::new(records),
            attempted: Bits::new(records),
            handled_count: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            first: OnceLock::new(),
        }
    }

    /// Call at handler entry: starts the drain clock; true on the record's first attempt.
    pub fn enter(&self, seq: u64) -> bool {
        self.first.get_or_init(Instant::now);
        self.attempted.set(seq)
    }

    /// A handler call for `seq` succeeded.
    pub fn handled(&self, seq: u64) {
        if self.handled.set(seq) {
            self.handled_count.fetch_add(1, Ordering::AcqRel);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn handled_count(&self) -> u64 {
        self.handled_count.load(Ordering::Acquire)
    }
}

/// The process's user + system CPU seconds so far.
pub fn cpu_secs() -> f64 {
    // /proc/self/stat: fields 14 and 15 (utime, stime) in clock ticks (USER_HZ, 100), counted
    // after the command name's closing parenthesis.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The process's peak resident set (`VmHWM`), MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Reads the dead-letter topic: how many records it holds, and which `seq`s.
pub struct DeadLetters {
    consumer: BaseConsumer,
    topic: String,
}

impl DeadLetters {
    pub fn new(args: &Args) -> BoxResult<DeadLetters> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.bootstrap)
            .set("group.id", format!("{}-dlt-reader", args.group))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        Ok(DeadLetters {
            consumer,
            topic: args.dead_letter_topic(),
        })
    }

    fn partitions(&self) -> BoxResult<Vec<i32>> {
        let md = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }

    /// Records in the topic (the sum of its high watermarks).
    pub fn count(&self) -> BoxResult<u64> {
        let mut sum = 0;
        for p in self.partitions()? {
            let (low, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
            sum += (high - low).max(0) as u64;
        }
        Ok(sum)
    }

    /// The `seq` of every record in the topic.
    pub fn seqs(&self) -> BoxResult<HashSet<u64>> {
        let mut ends = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for p in self.partitions()? {
            let (low, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
                ends.push((p, high));
            }
        }
        let mut seqs = HashSet::new();
        if ends.is_empty() {
            return Ok(seqs);
        }
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() && Instant::now() < deadline {
            let Some(m) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            if let Some(seq) = m.payload().and_then(seq_of) {
                seqs.insert(seq);
            }
            ends.retain(|&(p, high)| !(p == m.partition() && m.offset() + 1 >= high));
        }
        Ok(seqs)
    }
}

/// The `seq` field of a record's JSON value.
pub fn seq_of(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(value).ok().map(|s| s.seq)
}

/// Waits until every record is settled: `records − dead letters` handled and the dead-letter
/// topic holding the rest. Returns when that happened, or `None` after a stall of [`STALL`].
pub async fn wait_settled(
    tracker: &Tracker,
    args: &Args,
    dead_letters: &DeadLetters,
) -> BoxResult<Option<Instant>> {
    let expected_dlt = expected_dead_letters(args.scenario, args.records);
    let to_handle = args.records - expected_dlt;
    let (mut last, mut last_change) = (u64::MAX, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let handled = tracker.handled_count();
        if handled != last {
            (last, last_change) = (handled, Instant::now());
        }
        if handled >= to_handle {
            if expected_dlt == 0 {
                return Ok(Some(Instant::now()));
            }
            let count = tokio::task::block_in_place(|| dead_letters.count())?;
            if count >= expected_dlt {
                return Ok(Some(Instant::now()));
            }
            if count != last {
                (last, last_change) = (count + (1 << 40), Instant::now());
            }
        }
        if last_change.elapsed() > STALL {
            return Ok(None);
        }
    }
}

/// The measures at the end of a drain, taken before the consumer is stopped.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// When every record was settled; `None` after a stall.
    pub end: Option<Instant>,
    /// CPU seconds of the process from `cpu0` (taken before the consumer was created).
    pub cpu: f64,
    /// Peak RSS so far, MiB.
    pub rss: f64,
}

impl Drained {
    pub fn now(end: Option<Instant>, cpu0: f64) -> Drained {
        Drained {
            end,
            cpu: cpu_secs() - cpu0,
            rss: peak_rss_mib(),
        }
    }
}

/// The one result line a runner prints (JSON), read by `scripts/peers`.
pub fn report(
    peer: &str,
    args: &Args,
    tracker: &Tracker,
    dead_letters: &DeadLetters,
    drained: Drained,
) -> BoxResult<()> {
    let Drained { end, cpu, rss } = drained;
    let first = tracker.first.get().copied();
    let secs = match (first, end) {
        (Some(f), Some(e)) => e.duration_since(f).as_secs_f64(),
        _ => f64::NAN,
    };
    let dead = dead_letters.seqs()?;
    let settled = (0..args.records)
        .filter(|&s| tracker.handled.get(s) || dead.contains(&s))
        .count() as u64;
    let line = serde_json::json!({
        "peer": peer,
        "scenario": args.scenario.name(),
        "records": args.records,
        "secs": secs,
        "rate": args.records as f64 / secs,
        "cpu_secs": cpu,
        "peak_rss_mib": rss,
        "handled": tracker.handled_count(),
        "dead_lettered": dead.len(),
        "lost": args.records - settled,
        "duplicates": tracker.duplicates.load(Ordering::Relaxed),
        "stalled": end.is_none(),
    });
    println!("{line}");
    Ok(())
}
