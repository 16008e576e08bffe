//! The tool's logic: reading a dead-letter topic to its end, filtering letters, listing them
//! and redriving them with committed progress.
//!
//! Everything here is blocking (rdkafka's `BaseConsumer` and `BaseProducer`, every wait
//! bounded by `Kafka::timeout`): it runs on the main thread of the tool, and the tests call it
//! from `spawn_blocking`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use kourier::ThrottledLogContext;
use kourier::dead_letter::{Provenance, RedriveRecord, headers};
use kourier::rdkafka::client::ClientContext;
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer as RawConsumer, CommitMode, Consumer};
use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::rdkafka::message::DeliveryResult;
use kourier::rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use kourier::rdkafka::{Message as _, Offset, TopicPartitionList};
use kourier::tiers::headers as tiers;
use kourier::{DeadLetterReason, Header, RawRecord};

/// The tool's consumers: librdkafka's warnings and errors through kourier's throttle (one
/// line per distinct message per [`LOG_INTERVAL`], with a count), like every client kourier
/// creates.
type BaseConsumer = RawConsumer<ThrottledLogContext>;

/// How often one persisting librdkafka warning or error is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

fn log_context() -> ThrottledLogContext {
    ThrottledLogContext::new(LOG_INTERVAL)
}

/// Where Kafka is, and how long any single wait may take.
#[derive(Debug, Clone)]
pub(crate) struct Kafka {
    pub(crate) bootstrap: String,
    pub(crate) timeout: Duration,
}

impl Kafka {
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "kourier-dlt")
            // Fail a metadata request to an unreachable broker within the timeout.
            .set("socket.connection.setup.timeout.ms", ms(self.timeout))
            .set("topic.metadata.refresh.interval.ms", "-1");
        config
    }

    /// Fails clearly when the broker does not answer or the topic does not exist; returns
    /// the topic's partitions.
    fn partitions(&self, client: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
        let metadata = client
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| self.unreachable(e))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| anyhow!("topic {topic} does not exist"))?;
        match t.error() {
            None if !t.partitions().is_empty() => {}
            None => bail!("topic {topic} does not exist"),
            Some(e) => match RDKafkaErrorCode::from(e) {
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                    bail!("topic {topic} does not exist")
                }
                code => bail!("topic {topic}: {code}"),
            },
        }
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn unreachable(&self, e: KafkaError) -> anyhow::Error {
        anyhow!(
            "Kafka at {} did not answer within {:?} ({e}); is it running?",
            self.bootstrap,
            self.timeout
        )
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

// ───────────── letters and filters ─────────────

/// One record of a dead-letter topic, with its provenance parsed.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    /// The record as read from the dead-letter topic (its topic/partition/offset are the
    /// letter's place there).
    pub(crate) record: RawRecord,
    pub(crate) provenance: Provenance,
}

impl Letter {
    pub(crate) fn new(record: RawRecord) -> Self {
        let provenance = Provenance::from_headers(&record.headers);
        Letter { record, provenance }
    }

    /// When the record was given up: its last failure, else the letter's own timestamp.
    pub(crate) fn failed_at(&self) -> Option<SystemTime> {
        self.provenance
            .last_failure
            .or_else(|| epoch_millis(self.record.timestamp?))
    }

    /// `partition@offset` in the dead-letter topic.
    pub(crate) fn place(&self) -> String {
        format!("{}@{}", self.record.partition, self.record.offset)
    }

    /// The retry tier a record read from a tier topic is in, and when it is due.
    pub(crate) fn tier(&self) -> Option<(u32, Option<SystemTime>)> {
        let tier = self
            .record
            .headers
            .get_str(tiers::TIER)?
            .trim()
            .parse()
            .ok()?;
        let due = self
            .record
            .headers
            .get_str(tiers::DUE_MS)
            .and_then(|d| d.trim().parse::<i64>().ok())
            .and_then(epoch_millis);
        Some((tier, due))
    }

    pub(crate) fn key_text(&self) -> Option<String> {
        self.record
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The letter as one JSON object (one line of `inspect --json`).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let p = &self.provenance;
        let key = self.record.key.as_deref();
        let key_utf8 = key.and_then(|k| std::str::from_utf8(k).ok());
        serde_json::json!({
            "dlt_topic": &*self.record.topic,
            "dlt_partition": self.record.partition,
            "dlt_offset": self.record.offset,
            "original_topic": p.original_topic,
            "original_partition": p.original_partition,
            "original_offset": p.original_offset,
            "original_timestamp": p.original_timestamp.and_then(epoch_millis).and_then(rfc3339),
            "consumer_group": p.consumer_group,
            "kind": p.failure_kind.map(DeadLetterReason::as_str),
            "exception": p.exception_class,
            "error": p.error,
            "attempts": p.attempts,
            "first_failure": p.first_failure.and_then(rfc3339),
            "last_failure": p.last_failure.and_then(rfc3339),
            "redrive_count": p.redrive_count,
            "retry_tier": self.tier().map(|(t, _)| t),
            "due": self.tier().and_then(|(_, d)| d).and_then(rfc3339),
            "deferred": self.record.headers.get_str(tiers::DEFERRED) == Some("true"),
            "key": key_utf8,
            "key_hex": key.filter(|_| key_utf8.is_none()).map(hex),
            "value_bytes": self.record.value.as_ref().map(|v| v.len()),
            "value_dropped_bytes": p.value_dropped_bytes,
            "trace_id": self.record.trace_context().map(|t| t.trace_id_hex()),
            "headers": self
                .record
                .headers
                .iter()
                .filter(|h| {
                    !headers::ALL
                        .iter()
                        .chain(tiers::ALL)
                        .any(|name| h.is_named(name))
                })
                .map(header_json)
                .collect::<Vec<_>>(),
        })
    }
}

/// One of a letter's own headers in `inspect --json`: `name` is the name when it is UTF-8,
/// else escaped without loss (`\xNN` for each byte that is not UTF-8, `\\` for a backslash)
/// with the exact bytes in `name_hex`; `value` is the value when it is UTF-8 (`null` for a
/// null value), else `value_hex` holds it.
fn header_json(h: &Header) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    match h.key_str() {
        Some(name) => {
            out.insert("name".into(), name.into());
        }
        None => {
            out.insert("name".into(), h.key_escaped().into());
            out.insert("name_hex".into(), hex(h.key()).into());
        }
    }
    match h.value().map(|v| (v, std::str::from_utf8(v))) {
        None => {
            out.insert("value".into(), serde_json::Value::Null);
        }
        Some((_, Ok(text))) => {
            out.insert("value".into(), text.into());
        }
        Some((bytes, Err(_))) => {
            out.insert("value_hex".into(), hex(bytes).into());
        }
    }
    out.into()
}

/// Which letters a command works on. Empty parts match everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// Failure kinds; letters without a kind never match a non-empty list.
    pub(crate) kinds: Vec<DeadLetterReason>,
    /// Given up at or after this time (see [`Letter::failed_at`]).
    pub(crate) since: Option<SystemTime>,
    /// Given up before this time.
    pub(crate) until: Option<SystemTime>,
    /// Exactly this key.
    pub(crate) key: Option<Vec<u8>>,
}

impl Filter {
    pub(crate) fn matches(&self, letter: &Letter) -> bool {
        if !self.kinds.is_empty()
            && !letter
                .provenance
                .failure_kind
                .is_some_and(|k| self.kinds.contains(&k))
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = letter.failed_at() else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) {
                return false;
            }
        }
        if let Some(key) = &self.key
            && letter.record.key.as_deref() != Some(key.as_slice())
        {
            return false;
        }
        true
    }
}

// ───────────── reading a topic to its end ─────────────

/// Reads a topic's partitions from a start offset up to the end they had when it was
/// opened, in offset order per partition.
pub(crate) struct Reader {
    consumer: BaseConsumer,
    topic: String,
    /// Partition → end offset (exclusive) still to reach.
    pending: BTreeMap<i32, i64>,
    /// Records between the start and end offsets, gaps (compaction, transactions) included.
    pub(crate) total: u64,
    pub(crate) read: u64,
    timeout: Duration,
}

/// Where a [`Reader`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// The beginning of every partition.
    Beginning,
    /// The group's committed offsets, else the beginning.
    Committed,
}

impl Reader {
    /// Opens `topic`. `group` is the consumer group whose offsets [`Start::Committed`] reads
    /// and [`Reader::commit`] writes; without one the reader commits nothing.
    pub(crate) fn open(
        kafka: &Kafka,
        topic: &str,
        group: Option<&str>,
        start: Start,
    ) -> Result<Self> {
        let unused_group = format!("kourier-dlt-reader-{}", std::process::id());
        let consumer: BaseConsumer = kafka
            .config()
            .set("group.id", group.unwrap_or(&unused_group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(log_context())
            .context("creating the Kafka consumer")?;
        let partitions = kafka.partitions(&consumer, topic)?;
        let committed: HashMap<i32, i64> = match (group, start) {
            (Some(_), Start::Committed) => committed_offsets(&consumer, topic, &partitions, kafka)?,
            _ => HashMap::new(),
        };
        let mut pending = BTreeMap::new();
        let mut total = 0u64;
        {
            let mut assignment = TopicPartitionList::new();
            for &p in &partitions {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, kafka.timeout)
                    .map_err(|e| kafka.unreachable(e))?;
                let from = committed.get(&p).copied().unwrap_or(low).max(low);
                if from < high {
                    assignment.add_partition_offset(topic, p, Offset::Offset(from))?;
                    pending.insert(p, high);
                    total += (high - from) as u64;
                }
            }
            if !pending.is_empty() {
                consumer
                    .assign(&assignment)
                    .context("assigning partitions")?;
            }
        }
        Ok(Reader {
            consumer,
            topic: topic.to_owned(),
            pending,
            total,
            read: 0,
            timeout: kafka.timeout,
        })
    }

    /// The next record, or `None` once every partition reached its end.
    ///
    /// # Errors
    /// When no record arrives for the timeout while some are still expected (the broker went
    /// away), or the consumer reports an error.
    pub(crate) fn next(&mut self) -> Result<Option<RawRecord>> {
        let mut idle_since = Instant::now();
        while !self.pending.is_empty() {
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {
                    if idle_since.elapsed() >= self.timeout {
                        bail!(
                            "no record from {} for {:?} while {} more were expected; is Kafka up?",
                            self.topic,
                            self.timeout,
                            self.total.saturating_sub(self.read)
                        );
                    }
                }
                Some(Ok(m)) => {
                    idle_since = Instant::now();
                    let Some(&end) = self.pending.get(&m.partition()) else {
                        continue; // a partition already read to its end
                    };
                    if m.offset() >= end {
                        self.pending.remove(&m.partition());
                        continue;
                    }
                    if m.offset() + 1 >= end {
                        self.pending.remove(&m.partition());
                    }
                    self.read += 1;
                    return Ok(Some(RawRecord::from_message(&m)));
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.pending.remove(&p);
                }
                Some(Err(e)) => return Err(anyhow!(e).context(format!("reading {}", self.topic))),
            }
        }
        Ok(None)
    }

    /// Commits `next_offset` for `partition` (the offset of the next record to read),
    /// synchronously.
    pub(crate) fn commit(&self, partition: i32, next_offset: i64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))?;
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .with_context(|| format!("committing {}/{partition}={next_offset}", self.topic))
    }
}

fn committed_offsets(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    kafka: &Kafka,
) -> Result<HashMap<i32, i64>> {
    // The lists stay inside this function (rust-rdkafka #453).
    let mut wanted = TopicPartitionList::new();
    for &p in partitions {
        wanted.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(wanted, kafka.timeout)
        .map_err(|e| kafka.unreachable(e))?;
    Ok(committed
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Reports progress at most every `every`.
pub(crate) struct Progress<'a> {
    every: Duration,
    last: Instant,
    report: Box<dyn FnMut(&str) + 'a>,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(every: Duration, report: impl FnMut(&str) + 'a) -> Self {
        Progress {
            every,
            last: Instant::now(),
            report: Box::new(report),
        }
    }

    /// No progress output.
    #[allow(dead_code)] // tests/dlt_tool.rs
    pub(crate) fn silent() -> Self {
        Progress::new(Duration::MAX, |_| {})
    }

    fn tick(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            (self.report)(&line());
        }
    }
}

// ───────────── inspect ─────────────

/// Every letter of `dlt` matching `filter`, from the beginning to the current end.
pub(crate) fn inspect(
    kafka: &Kafka,
    dlt: &str,
    filter: &Filter,
    progress: &mut Progress<'_>,
) -> Result<(Vec<Letter>, u64)> {
    let mut reader = Reader::open(kafka, dlt, None, Start::Beginning)?;
    let mut letters = Vec::new();
    while let Some(record) = reader.next()? {
        let letter = Letter::new(record);
        if filter.matches(&letter) {
            letters.push(letter);
        }
        let (read, total) = (reader.read, reader.total);
        progress.tick(|| format!("inspect {dlt}: read {read} of {total}"));
    }
    Ok((letters, reader.read))
}

// ───────────── redrive ─────────────

/// What `redrive` does.
#[derive(Debug, Clone)]
pub(crate) struct RedriveOptions {
    pub(crate) dlt: String,
    /// Destination; `None` = each letter's original topic.
    pub(crate) to: Option<String>,
    /// The consumer group keeping the redrive's position in the dead-letter topic.
    pub(crate) group: String,
    pub(crate) filter: Filter,
    /// Show what would be redriven; publish and commit nothing.
    pub(crate) dry_run: bool,
    /// Letters already redriven this many times are refused...
    pub(crate) max_redrives: u32,
    /// ...unless forced (which also redrives metadata-only letters, whose value was lost).
    pub(crate) force: bool,
    /// Ignore the group's position: consider every letter again.
    pub(crate) from_beginning: bool,
    /// Testing aid: stop as a crash would — nothing committed, producer dropped — right
    /// after the Nth re-publish is acknowledged and before its offset is committed.
    pub(crate) crash_after: Option<u64>,
}

/// One letter published again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redriven {
    /// `partition@offset` in the dead-letter topic.
    pub(crate) letter: String,
    pub(crate) original: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// `None` in a dry run.
    pub(crate) offset: Option<i64>,
    pub(crate) redrive_count: u32,
    pub(crate) key: Option<String>,
}

/// One matching letter left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) letter: String,
    pub(crate) original: String,
    pub(crate) reason: String,
}

/// What a redrive did.
#[derive(Debug, Default)]
pub(crate) struct RedriveReport {
    /// Letters read (from the group's position to the end).
    pub(crate) read: u64,
    pub(crate) redriven: Vec<Redriven>,
    /// Letters the filters left out.
    pub(crate) filtered_out: u64,
    pub(crate) refused: Vec<Refused>,
}

/// The error a simulated crash (`crash_after`) returns.
pub(crate) const SIMULATED_CRASH: &str = "simulated crash";

/// Re-publishes the selected letters of `opts.dlt`, each to its original topic (or
/// `opts.to`), with the original key, value and headers minus the dead-letter headers, plus
/// a raised redrive count.
///
/// Progress is the group's committed offset in the dead-letter topic, committed for each
/// letter right after the broker acknowledged its re-publish: after a crash, a rerun starts
/// after the last committed letter, so a letter is redriven again only if the crash came
/// between its acknowledgement and its commit (at most one letter per run: the one in
/// flight). Letters the filters leave out or that are refused are passed over, and the group
/// moves past them too: to reconsider them, use another group or `from_beginning`.
pub(crate) fn redrive(
    kafka: &Kafka,
    opts: &RedriveOptions,
    progress: &mut Progress<'_>,
) -> Result<RedriveReport> {
    let start = if opts.from_beginning {
        Start::Beginning
    } else {
        Start::Committed
    };
    let mut reader = Reader::open(kafka, &opts.dlt, Some(&opts.group), start)?;
    let producer = if opts.dry_run {
        None
    } else {
        Some(RedriveProducer::new(kafka)?)
    };
    let mut destinations: HashSet<String> = HashSet::new();
    let mut report = RedriveReport::default();
    // Partition → next offset to commit once the run ends (letters passed over).
    let mut uncommitted: BTreeMap<i32, i64> = BTreeMap::new();

    while let Some(record) = reader.next()? {
        let letter = Letter::new(record);
        let (partition, next) = (letter.record.partition, letter.record.offset + 1);
        let (read, total) = (reader.read, reader.total);
        let tick = |report: &RedriveReport| {
            format!(
                "redrive {}: read {read} of {total}, redriven {}, filtered out {}, refused {}",
                opts.dlt,
                report.redriven.len(),
                report.filtered_out,
                report.refused.len()
            )
        };
        report.read += 1;
        if !opts.filter.matches(&letter) {
            report.filtered_out += 1;
            uncommitted.insert(partition, next);
            progress.tick(|| tick(&report));
            continue;
        }
        let refuse = |reason: String| Refused {
            letter: letter.place(),
            original: cell(&letter.provenance.original_coordinates()),
            reason,
        };
        let redrive = match refusal(opts, &letter) {
            Some(reason) => Err(reason),
            None => RedriveRecord::from_dead_letter(&letter.record, opts.to.as_deref())
                .map_err(|e| e.to_string()),
        };
        let redrive = match redrive {
            Ok(r) => r,
            Err(reason) => {
                report.refused.push(refuse(reason));
                uncommitted.insert(partition, next);
                progress.tick(|| tick(&report));
                continue;
            }
        };
        check_destination(kafka, &mut destinations, &redrive.topic, &letter)?;
        let (delivered_partition, offset) = republish(producer.as_ref(), &redrive, &letter)?;
        report.redriven.push(Redriven {
            partition: delivered_partition,
            offset,
            ..Redriven::of(&letter, &redrive)
        });
        if !opts.dry_run {
            if opts
                .crash_after
                .is_some_and(|n| report.redriven.len() as u64 >= n)
            {
                bail!(SIMULATED_CRASH);
            }
            reader.commit(partition, next)?;
            uncommitted.remove(&partition);
        }
        progress.tick(|| tick(&report));
    }
    if !opts.dry_run {
        for (partition, next) in uncommitted {
            reader.commit(partition, next)?;
        }
    }
    Ok(report)
}

impl Redriven {
    /// What is said of `letter`, redriven as `redrive` (its partition and offset unknown yet).
    fn of(letter: &Letter, redrive: &RedriveRecord) -> Redriven {
        Redriven {
            letter: letter.place(),
            original: cell(&letter.provenance.original_coordinates()),
            topic: redrive.topic.clone(),
            partition: -1,
            offset: None,
            redrive_count: redrive.redrive_count,
            key: letter.key_text().map(|k| cell(&k)),
        }
    }
}

/// The first time a destination comes up: it must exist (its partitions are looked up).
fn check_destination(
    kafka: &Kafka,
    known: &mut HashSet<String>,
    topic: &str,
    letter: &Letter,
) -> Result<()> {
    if !known.contains(topic) {
        let client: BaseConsumer = kafka.config().create_with_context(log_context())?;
        kafka
            .partitions(&client, topic)
            .with_context(|| format!("destination of letter {}", letter.place()))?;
        known.insert(topic.to_owned());
    }
    Ok(())
}

/// Why `letter` is not redriven, if it is not: redriven too often already, or a
/// metadata-only letter (both overridden by `--force`).
fn refusal(opts: &RedriveOptions, letter: &Letter) -> Option<String> {
    let p = &letter.provenance;
    if !opts.force && p.redrive_count >= opts.max_redrives {
        Some(format!(
            "already redriven {} time(s) (--max-redrives {}; --force overrides)",
            p.redrive_count, opts.max_redrives
        ))
    } else if !opts.force && p.value_dropped_bytes.is_some() {
        Some(format!(
            "metadata-only letter: its {}-byte value was dropped (--force redrives it with a null value)",
            p.value_dropped_bytes.unwrap_or_default()
        ))
    } else {
        None
    }
}

/// Publishes `redrive` (not with `--dry-run`, no producer): where it landed, `(-1, None)`
/// for a dry run.
fn republish(
    producer: Option<&RedriveProducer>,
    redrive: &RedriveRecord,
    letter: &Letter,
) -> Result<(i32, Option<i64>)> {
    let Some(producer) = producer else {
        return Ok((-1, None));
    };
    let (p, o) = producer.send(redrive).with_context(|| {
        format!(
            "re-publishing letter {} to {}; nothing after it was redriven",
            letter.place(),
            redrive.topic
        )
    })?;
    Ok((p, Some(o)))
}

/// Remembers the outcome of the one record in flight; logs through the throttle.
struct LastDelivery(
    Mutex<Option<std::result::Result<(i32, i64), KafkaError>>>,
    ThrottledLogContext,
);

impl Default for LastDelivery {
    fn default() -> Self {
        LastDelivery(Mutex::default(), log_context())
    }
}

impl ClientContext for LastDelivery {
    fn log(&self, level: kourier::rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.1.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.1.error(error, reason);
    }
}

impl ProducerContext for LastDelivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

/// An idempotent, `acks=all` producer sending one record at a time and waiting for its
/// acknowledgement. Keys are partitioned as a Java producer (and kourier's `Publisher`) would.
struct RedriveProducer {
    producer: BaseProducer<LastDelivery>,
    timeout: Duration,
}

impl RedriveProducer {
    fn new(kafka: &Kafka) -> Result<Self> {
        // The broker must acknowledge within 3 timeouts (librdkafka retries meanwhile).
        let timeout = kafka.timeout.saturating_mul(3);
        let producer = kafka
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", ms(timeout))
            .create_with_context(LastDelivery::default())
            .context("creating the Kafka producer")?;
        Ok(RedriveProducer { producer, timeout })
    }

    /// Sends and waits for the acknowledgement: `(partition, offset)`.
    fn send(&self, r: &RedriveRecord) -> Result<(i32, i64)> {
        // Names byte for byte: rdkafka's `OwnedHeaders::insert` would need them as `&str`.
        let mut record = BaseRecord::<[u8], [u8]>::to(&r.topic).headers(r.headers.to_rdkafka());
        if let Some(key) = &r.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &r.value {
            record = record.payload(value.as_slice());
        }
        self.producer
            .send(record)
            .map_err(|(e, _)| anyhow!(e).context("the producer refused the record"))?;
        // flush() serves the delivery callback; it ends by message.timeout.ms at the latest.
        let flushed = self
            .producer
            .flush(self.timeout.saturating_add(Duration::from_secs(5)));
        let outcome = self
            .producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (outcome, flushed) {
            (Some(Ok(at)), _) => Ok(at),
            (Some(Err(e)), _) => Err(anyhow!(e).context("the broker did not acknowledge it")),
            (None, Err(e)) => Err(anyhow!(e).context("no acknowledgement in time")),
            (None, Ok(())) => Err(anyhow!("no delivery report")),
        }
    }
}

impl Drop for RedriveProducer {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(1));
    }
}

// ───────────── formatting ─────────────

/// RFC 3339, UTC, to the millisecond; `None` for a time RFC 3339 cannot write (before the
/// epoch, after 9999-12-31: a header is untrusted, and humantime's `Display` fails on those,
/// which `to_string` turns into a panic).
pub(crate) fn rfc3339(t: SystemTime) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_millis(in_range(t)?))
        .ok()
        .map(|()| out)
}

/// As [`rfc3339`], to the second.
pub(crate) fn rfc3339_seconds(t: SystemTime) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_seconds(in_range(t)?))
        .ok()
        .map(|()| out)
}

/// `t` when it lies between the epoch and the last millisecond of year 9999.
fn in_range(t: SystemTime) -> Option<SystemTime> {
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
    (ms <= headers::MAX_TIME_MS as u128).then_some(t)
}

/// `ms` since the epoch as a time, within the range [`rfc3339`] writes (else `None`).
fn epoch_millis(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms)
        .ok()
        .filter(|&ms| ms <= headers::MAX_TIME_MS as u64)?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A table cell: control characters (newlines, tabs, terminal escapes from a crafted
/// header) become spaces, so a row stays one line and cannot drive the terminal.
fn cell(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A time given on the command line: RFC 3339 (`2026-05-01T10:00:00Z`, or with a space, or a
/// bare date), milliseconds since the epoch, or a duration meaning "that long ago"
/// (`90m`, `2h`, `7days`).
pub(crate) fn parse_time(s: &str) -> std::result::Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if s.len() == 10
        && let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s}T00:00:00Z"))
    {
        return Ok(t);
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_millis(ms));
    }
    if let Ok(ago) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{s} ago is before the epoch"));
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2026-05-01T10:00:00Z), epoch milliseconds, or a duration ago (2h, 30m, 7days)"
    ))
}

/// A failure kind given on the command line.
pub(crate) fn parse_kind(s: &str) -> std::result::Result<DeadLetterReason, String> {
    DeadLetterReason::parse(s.trim()).ok_or_else(|| {
        format!("{s:?} is not a failure kind: use decode, permanent, retries-exhausted or panic")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The letters as an aligned table.
pub(crate) fn table(letters: &[Letter]) -> String {
    const ERROR_WIDTH: usize = 60;
    let header = [
        "DLT",
        "ORIGIN",
        "KIND",
        "ATT",
        "FIRST FAILURE",
        "LAST FAILURE",
        "RDR",
        "KEY",
        "ERROR",
    ];
    let time = |t: Option<SystemTime>| t.and_then(rfc3339_seconds).unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 9]> = letters
        .iter()
        .map(|l| {
            let p = &l.provenance;
            let error = cell(p.error.as_deref().unwrap_or("-"));
            let error = if error.chars().count() > ERROR_WIDTH {
                let cut: String = error.chars().take(ERROR_WIDTH - 1).collect();
                format!("{cut}…")
            } else {
                error
            };
            [
                l.place(),
                cell(&p.original_coordinates()),
                {
                    let kind = p.failure_kind.map_or("-", DeadLetterReason::as_str);
                    match l.tier() {
                        Some((tier, _)) => format!("{kind} (in tier {tier})"),
                        None => kind.to_owned(),
                    }
                },
                p.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                time(p.first_failure),
                time(p.last_failure),
                p.redrive_count.to_string(),
                l.key_text().map_or_else(|| "-".to_owned(), |k| cell(&k)),
                error,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure kind a letter can carry is accepted by `--kind` and named in its error.
    #[test]
    fn every_failure_kind_is_a_kind_filter() {
        let refused = parse_kind("nope").expect_err("not a kind");
        for kind in [
            DeadLetterReason::Decode,
            DeadLetterReason::Permanent,
            DeadLetterReason::RetriesExhausted,
            DeadLetterReason::Panic,
        ] {
            assert_eq!(parse_kind(kind.as_str()), Ok(kind));
            assert!(refused.contains(kind.as_str()), "{refused} omits {kind}");
        }
    }

    #[test]
    fn tier_records_show_their_tier_and_due_time() {
        let record = RawRecord::builder("orders.retry.2")
            .header(tiers::TIER, "2")
            .header(tiers::DUE_MS, "1000")
            .header(headers::ATTEMPTS, "3")
            .header("own", "x")
            .build();
        let letter = Letter::new(record);
        assert_eq!(
            letter.tier(),
            Some((2, Some(UNIX_EPOCH + Duration::from_secs(1))))
        );
        let json = letter.to_json();
        assert_eq!(json["retry_tier"], 2);
        assert_eq!(json["attempts"], 3);
        assert_eq!(json["deferred"], false);
        let own = json["headers"].as_array().unwrap();
        assert_eq!(
            own.len(),
            1,
            "tier and provenance headers are not listed as own: {own:?}"
        );
    }
}
