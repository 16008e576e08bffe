//! The tiers as the running consumer sees them: which topic is which tier, and the
//! forwarding producer.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureRecord, Producer};

use super::RetryTiers;
use super::headers::{self, History, Origin, Stamp, forward_headers};
use crate::clock;
use crate::dead_letter::Provenance;
use crate::dead_letter::headers as dlt;
use crate::dead_letter::kafka::LetterRecord;
use crate::error::{ConfigError, Error, Result};
use crate::producer::{Delivery, ManagedProducer};
use crate::record::{Header, RawRecord, owned_headers};

const SEND_OPERATION: &str = "forward record to retry tier";
const METADATA_OPERATION: &str = "fetch retry-tier topic metadata";
/// The longest a tier topic's metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept partition count that lacks a forward's source partition is trusted
/// before it is fetched again ([`Tiers::render`]).
const COUNT_RECHECK: Duration = Duration::from_secs(30);

/// The most a tier record's due time may lie past its tier's delay (from its timestamp, and
/// from when it is first looked at), for clock skew between the forwarding and the running
/// host: one minute, or the tier's delay when that is shorter (see the module docs,
/// "Headers are untrusted").
pub(crate) const MAX_DUE_SKEW: Duration = Duration::from_secs(60);

/// Where a record stands in the tier chain.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    /// 0 for a source record, else its tier (1-based).
    pub(crate) tier: u32,
    /// The source record's coordinates.
    pub(crate) origin: Origin,
    /// When it may run (tier records), bounded by the tier's delay (delivery rule 17).
    pub(crate) due: Option<SystemTime>,
    /// The longest a tier record waits for `due` from when it is first looked at: its tier's
    /// delay plus the skew allowance (held on the monotonic clock by [`Located::due_wait`]).
    pub(crate) longest_wait: Duration,
    /// Failures before this tier.
    pub(crate) history: Option<History>,
    /// Why a tier record cannot be read (its provenance names another source, a negative
    /// partition or offset, ...): it is dead-lettered at once as `decode`, as it is, to its
    /// tier's source topic's dead-letter topic.
    pub(crate) invalid: Option<String>,
}

impl Located {
    /// The wait for the due time of a tier record, starting now.
    pub(crate) fn due_wait(&self) -> Option<DueWait> {
        self.due.map(|due| DueWait {
            due,
            latest: clock::deadline_in(self.longest_wait),
        })
    }
}

/// A tier record's wait for its due time: until the wall clock reaches the due time, and
/// never past `latest` on the monotonic clock (a wall clock stepped back does not stretch it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DueWait {
    due: SystemTime,
    latest: tokio::time::Instant,
}

impl DueWait {
    /// How long is left to wait (zero: due).
    pub(crate) fn left(&self) -> Duration {
        let wall = self
            .due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        wall.min(
            self.latest
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }
}

/// The tiers of a running consumer.
pub(crate) struct Tiers {
    pub(crate) config: RetryTiers,
    pub(crate) group: String,
    /// Tier topic → (source topic, tier).
    by_topic: HashMap<String, (String, u32)>,
    producer: ManagedProducer,
    /// Tier topic → its partition count and when it was fetched (for forwards rendered for
    /// a transaction; see [`Tiers::render`]).
    partition_counts: Mutex<HashMap<String, (i32, Instant)>>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiers")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tiers {
    /// Checks the configuration against the subscribed topics.
    pub(crate) fn check(config: &RetryTiers, sources: &[String]) -> Result<()> {
        let invalid = |reason: String| Error::from(ConfigError::invalid("retry_tiers", reason));
        if config.delays.is_empty() {
            return Err(invalid("at least one tier delay is needed".into()));
        }
        if config.delays.len() > 100 {
            return Err(invalid("at most 100 tiers".into()));
        }
        if config.delays.iter().any(Duration::is_zero) {
            return Err(invalid("a tier delay must be longer than zero".into()));
        }
        // Delivery rule 17: durations are bounded where they enter.
        if let Some(d) = config.delays.iter().find(|d| **d > RetryTiers::MAX_DELAY) {
            return Err(invalid(format!(
                "a tier delay must be at most {:?} (30 days), got {d:?}: a record that waits \
                 longer than its tier topic's retention is deleted before it is due",
                RetryTiers::MAX_DELAY
            )));
        }
        let mut seen: HashSet<String> = sources.iter().cloned().collect();
        for source in sources {
            for tier in 1..=config.delays.len() as u32 {
                let name = config.tier_topic(source, tier);
                crate::topic_name::check(&name)
                    .map_err(|reason| invalid(format!("tier topic name: {reason}")))?;
                if !seen.insert(name.clone()) {
                    return Err(invalid(format!(
                        "tier topic `{name}` is used twice (or is a subscribed topic)"
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn new(
        config: RetryTiers,
        sources: &[String],
        group: String,
        producer: ManagedProducer,
    ) -> Self {
        let mut by_topic = HashMap::new();
        for source in sources {
            for tier in 1..=config.delays.len() as u32 {
                by_topic.insert(config.tier_topic(source, tier), (source.clone(), tier));
            }
        }
        Tiers {
            config,
            group,
            by_topic,
            producer,
            partition_counts: Mutex::default(),
        }
    }

    /// (source topic, tier topic) pairs, in tier order per source.
    pub(crate) fn topics(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String, u32)> = self
            .by_topic
            .iter()
            .map(|(t, (s, n))| (s.clone(), t.clone(), *n))
            .collect();
        v.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
        v.into_iter().map(|(s, t, _)| (s, t)).collect()
    }

    /// Whether the tiers keep per-key order (a key-order ledger is set).
    pub(crate) fn keeps_key_order(&self) -> bool {
        self.config.ledger.is_some()
    }

    /// How many tiers there are.
    pub(crate) fn count(&self) -> u32 {
        self.config.delays.len() as u32
    }

    /// Where `record` stands: a source record stands for itself; a tier record's headers are
    /// read by the rules of [`read_tier_record`].
    pub(crate) fn locate(&self, record: &RawRecord) -> Located {
        let Some((source, tier)) = self.by_topic.get(&*record.topic) else {
            return Located {
                tier: 0,
                origin: Origin {
                    topic: record.topic.to_string(),
                    partition: record.partition,
                    offset: record.offset,
                    timestamp: record.timestamp,
                    log_append_time: record.log_append_time,
                },
                due: None,
                longest_wait: Duration::ZERO,
                history: None,
                invalid: None,
            };
        };
        read_tier_record(
            record,
            source,
            *tier,
            self.count(),
            self.delay(*tier),
            SystemTime::now(),
        )
    }

    /// The record a tier record stands for: the source's coordinates, no tier headers
    /// (for dead-lettering).
    pub(crate) fn original_view(record: &RawRecord, at: &Located) -> RawRecord {
        let mut own = record.headers.clone();
        own.remove_where(|name| headers::ALL.iter().any(|n| n.as_bytes() == name));
        RawRecord {
            topic: std::sync::Arc::from(at.origin.topic.as_str()),
            partition: at.origin.partition,
            offset: at.origin.offset,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: own,
            timestamp: at.origin.timestamp,
            log_append_time: at.origin.log_append_time,
        }
    }

    /// The delay of tier `tier` (1-based).
    pub(crate) fn delay(&self, tier: u32) -> Duration {
        self.config.delays[(tier as usize)
            .saturating_sub(1)
            .min(self.config.delays.len() - 1)]
    }

    /// The topic and headers of a forward of `record` to tier `target` of its source, due
    /// after that tier's delay: what [`send`](Self::send) writes and
    /// [`render`](Self::render) gives.
    fn forward(
        &self,
        record: &RawRecord,
        at: &Located,
        target: u32,
        history: Option<&History>,
        deferred: bool,
    ) -> (String, Vec<Header>) {
        let topic = self.config.tier_topic(&at.origin.topic, target);
        let due = clock::after(SystemTime::now(), self.delay(target));
        let hop = crate::dead_letter::headers::position_of(&record.headers)
            .hop
            .saturating_add(1);
        let stamp = Stamp {
            tier: target,
            due,
            deferred,
            hop,
        };
        let headers = forward_headers(&record.headers, &at.origin, &self.group, history, stamp);
        (topic, headers)
    }

    /// The record [`send`](Self::send) would write for this forward, for a transactional
    /// producer to write instead (delivery rule 20 in the crate docs): same topic, key,
    /// value and headers; the source partition when the tier topic has it, else `None` (the
    /// partitioner chooses by key), as `send` falls back. The tier topic's partition count
    /// is fetched once and kept: partition counts only grow, so a kept count that has the
    /// source partition stays right; one that lacks it is fetched again once it is older
    /// than [`COUNT_RECHECK`] (the topic may have grown).
    pub(crate) async fn render(
        &self,
        record: &RawRecord,
        at: &Located,
        target: u32,
        history: Option<&History>,
        deferred: bool,
    ) -> Result<LetterRecord> {
        let (topic, headers) = self.forward(record, at, target, history, deferred);
        let source = at.origin.partition;
        let kept = self.lock_counts().get(&topic).copied();
        let count = match kept {
            Some((count, fetched)) if source < count || fetched.elapsed() < COUNT_RECHECK => count,
            _ => {
                let count = self.partition_count(&topic).await?;
                self.lock_counts()
                    .insert(topic.clone(), (count, Instant::now()));
                count
            }
        };
        let partition = placement(count, source);
        Ok(LetterRecord {
            topic,
            partition,
            key: record.key.clone(),
            value: record.value.clone(),
            headers,
        })
    }

    fn lock_counts(&self) -> MutexGuard<'_, HashMap<String, (i32, Instant)>> {
        self.partition_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How many partitions tier topic `topic` has (from the broker).
    async fn partition_count(&self, topic: &str) -> Result<i32> {
        let producer = self.producer.current();
        crate::producer::fetch_partition_count(
            move |name, timeout| producer.client().fetch_metadata(Some(name), timeout),
            topic,
            METADATA_TIMEOUT,
            METADATA_OPERATION,
        )
        .await
    }

    /// Writes `record` to tier `target` of its source, due after that tier's delay, and
    /// waits for the acknowledgement.
    pub(crate) async fn send(
        &self,
        record: &RawRecord,
        at: &Located,
        target: u32,
        history: Option<&History>,
        deferred: bool,
    ) -> Result<(String, Delivery)> {
        let (topic, headers) = self.forward(record, at, target, history, deferred);
        // Placement is decided for this record alone: the source partition when the tier
        // topic has it, else by key. Nothing is learned from one record for the next: a
        // tier record's original partition is a header, and a crafted one must not move
        // other records off their partition (delivery rule 17).
        let mut by_key = false;
        loop {
            let mut out =
                FutureRecord::<[u8], [u8]>::to(&topic).headers(owned_headers(headers.iter()));
            if !by_key {
                out = out.partition(at.origin.partition);
            }
            if let Some(key) = &record.key {
                out = out.key(key);
            }
            if let Some(value) = &record.value {
                out = out.payload(value);
            }
            match self.producer.send(out, SEND_OPERATION).await {
                Ok(delivery) => return Ok((topic, delivery)),
                Err(Error::Kafka { source, .. })
                    if !by_key
                        && source.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::UnknownPartition) =>
                {
                    // The tier topic has fewer partitions than the source partition named.
                    by_key = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The partition of a forward to a tier topic of `count` partitions: the source partition
/// when the topic has it, else `None` (the partitioner chooses by key), as
/// [`Tiers::send`] falls back on an unknown partition.
fn placement(count: i32, source_partition: i32) -> Option<i32> {
    (0..count)
        .contains(&source_partition)
        .then_some(source_partition)
}

/// Reads a record of tier `tier` (of `tiers`, with delay `delay`) of `source` as untrusted
/// input, at wall-clock time `now`, by the rules of the module docs ("Headers are
/// untrusted", delivery rule 17). Pure and total: never panics, whatever the headers.
pub(crate) fn read_tier_record(
    record: &RawRecord,
    source: &str,
    tier: u32,
    tiers: u32,
    delay: Duration,
    now: SystemTime,
) -> Located {
    let h = &record.headers;
    let own_timestamp = record.timestamp.and_then(dlt::epoch_millis);
    let longest_wait = delay.saturating_add(delay.min(MAX_DUE_SKEW));

    let (partition, offset, problems) = checked_position(record, source);
    if !problems.is_empty() {
        // Dead-lettered as it is: its own partition, offset and timestamp, under its tier's
        // source topic (whose dead-letter topic it goes to).
        return Located {
            tier,
            origin: Origin {
                topic: source.to_owned(),
                partition: record.partition,
                offset: record.offset,
                timestamp: record.timestamp,
                log_append_time: record.log_append_time,
            },
            due: None,
            longest_wait,
            history: None,
            invalid: Some(format!(
                "unreadable retry-tier record {}: {}",
                record.coordinates(),
                problems.join("; ")
            )),
        };
    }

    let p = Provenance::from_headers(h);
    let due = bounded_due(h, own_timestamp, now, delay, longest_wait);
    // Stages: 0..=tiers (a record with `tiers` failed stages is dead-lettered at its next
    // failure); absent or malformed reads as its tier.
    let stages = h
        .get(headers::FAILED_STAGES)
        .and_then(dlt::count)
        .map_or(tier, dlt::saturate_u32)
        .min(tiers);
    let history = p.attempts.map(|attempts| History {
        stages,
        kind: p.failure_kind.map_or("retries-exhausted", |k| k.as_str()),
        error: p.error.clone().unwrap_or_default(),
        attempts,
        first: p.first_failure.unwrap_or(now),
        last: p.last_failure.unwrap_or(now),
    });
    let origin = Origin {
        topic: source.to_owned(),
        partition: partition.unwrap_or(record.partition),
        offset: offset.unwrap_or(record.offset),
        timestamp: p.original_timestamp,
        log_append_time: p.original_timestamp_type.as_deref() == Some("LogAppendTime"),
    };
    Located {
        tier,
        origin,
        due: Some(due),
        longest_wait,
        history,
        invalid: None,
    }
}

/// A tier record's source position from its provenance headers: absent headers mean a
/// record written to the tier by hand (it stands for itself); present ones must name this
/// tier's source and a real position. The partition and offset, and what is wrong.
fn checked_position(record: &RawRecord, source: &str) -> (Option<i32>, Option<i64>, Vec<String>) {
    let h = &record.headers;
    let mut problems: Vec<String> = Vec::new();
    let topic_ok = match dlt::last(h, dlt::ORIGINAL_TOPIC) {
        None => true,
        Some(v) => v
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|t| t.trim() == source),
    };
    if !topic_ok {
        problems.push(format!(
            "header {} is {}, but {} is a retry tier of `{source}`",
            dlt::ORIGINAL_TOPIC,
            shown_value(dlt::last(h, dlt::ORIGINAL_TOPIC).flatten()),
            dlt::shown(record.topic.as_bytes()),
        ));
    }
    let partition = match dlt::last(h, dlt::ORIGINAL_PARTITION) {
        None => Some(record.partition),
        Some(v) => v.and_then(dlt::partition),
    };
    if partition.is_none() {
        problems.push(format!(
            "header {} is {}, not a partition (an int32 of 0 or more)",
            dlt::ORIGINAL_PARTITION,
            shown_value(dlt::last(h, dlt::ORIGINAL_PARTITION).flatten()),
        ));
    }
    let offset = match dlt::last(h, dlt::ORIGINAL_OFFSET) {
        None => Some(record.offset),
        Some(v) => v.and_then(dlt::offset),
    };
    if offset.is_none() {
        problems.push(format!(
            "header {} is {}, not an offset (an int64 of 0 or more)",
            dlt::ORIGINAL_OFFSET,
            shown_value(dlt::last(h, dlt::ORIGINAL_OFFSET).flatten()),
        ));
    }
    (partition, offset, problems)
}

/// When a tier record may run: the written due time, else the record's timestamp plus the
/// delay; never later than the delay plus the skew allowance past the record's timestamp,
/// nor past now.
fn bounded_due(
    h: &crate::record::Headers,
    own_timestamp: Option<SystemTime>,
    now: SystemTime,
    delay: Duration,
    longest_wait: Duration,
) -> SystemTime {
    let bound = clock::after(now, longest_wait);
    let bound = own_timestamp.map_or(bound, |ts| bound.min(clock::after(ts, longest_wait)));
    let written = h.get(headers::DUE_MS).and_then(due_ms);
    written
        .unwrap_or_else(|| clock::after(own_timestamp.unwrap_or(now), delay))
        .min(bound)
}

/// A [`headers::DUE_MS`] value: decimal ms since the epoch. Before the epoch reads as the
/// epoch (due), past [`dlt::MAX_TIME_MS`] as that (then bounded by the tier's delay);
/// anything else is `None` (malformed).
fn due_ms(v: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(v).ok()?.trim();
    let ms = match text.strip_prefix('-') {
        Some(digits) => {
            dlt::count(digits.as_bytes())?;
            0
        }
        None => dlt::count(text.as_bytes())?.min(dlt::MAX_TIME_MS as u64),
    };
    Some(UNIX_EPOCH + Duration::from_millis(ms))
}

fn shown_value(v: Option<&[u8]>) -> String {
    v.map_or_else(|| "null".to_owned(), dlt::shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::ProducerSettings;
    use crate::record::Headers;

    /// Tiers of 1 s and 2 s for topic `src`, group `g` (a producer that reaches no broker).
    fn two_tiers() -> Tiers {
        let producer = ProducerSettings::new("127.0.0.1:1".into())
            .build("tiers-test")
            .unwrap();
        let config = RetryTiers::new([Duration::from_secs(1), Duration::from_secs(2)]);
        Tiers::new(config, &["src".to_owned()], "g".into(), producer)
    }

    #[test]
    fn a_forwarded_record_reads_back_as_its_source_record() {
        let tiers = two_tiers();
        assert_eq!(
            tiers.topics(),
            vec![
                ("src".to_owned(), "src.retry.1".to_owned()),
                ("src".to_owned(), "src.retry.2".to_owned())
            ]
        );
        // An earlier tier's headers are replaced, not repeated.
        let own = Headers::new()
            .with("event-id", "e-1")
            .with(headers::TIER, "1")
            .with(crate::dead_letter::headers::ATTEMPTS, "1");
        let origin = Origin {
            topic: "src".into(),
            partition: 2,
            offset: 7,
            timestamp: Some(1_000),
            log_append_time: false,
        };
        let history = History {
            kind: "retries-exhausted",
            error: "boom".into(),
            attempts: 3,
            first: UNIX_EPOCH + Duration::from_secs(1),
            last: UNIX_EPOCH + Duration::from_secs(2),
            stages: 2,
        };
        let due = UNIX_EPOCH + Duration::from_secs(5);
        let stamp = Stamp {
            tier: 2,
            due,
            deferred: false,
            hop: 3,
        };
        let written = forward_headers(&own, &origin, "g", Some(&history), stamp);
        let record = RawRecord {
            topic: "src.retry.2".into(),
            partition: 0,
            offset: 3,
            key: Some(b"k".into()),
            value: Some(b"v".into()),
            headers: Headers::from(written),
            timestamp: Some(9_999),
            log_append_time: false,
        };
        assert_eq!(record.headers.get_all(headers::TIER).count(), 1);
        let at = read_tier_record(
            &record,
            "src",
            2,
            2,
            Duration::from_secs(2),
            UNIX_EPOCH + Duration::from_secs(4),
        );
        assert_eq!(at.invalid, None);
        assert_eq!((at.tier, &at.origin, at.due), (2, &origin, Some(due)));
        let h = at.history.as_ref().unwrap();
        assert_eq!(
            (h.attempts, h.error.as_str(), h.first, h.stages),
            (3, "boom", history.first, 2)
        );
        let view = Tiers::original_view(&record, &at);
        assert_eq!((&*view.topic, view.partition, view.offset), ("src", 2, 7));
        assert_eq!(view.timestamp, Some(1_000));
        assert!(view.headers.get(headers::TIER).is_none());
        assert_eq!(view.headers.get_str("event-id"), Some("e-1"));
        // A source record stands for itself.
        let source = RawRecord {
            topic: "src".into(),
            ..record
        };
        let at = tiers.locate(&source);
        assert_eq!((at.tier, at.origin.offset, at.due.is_none()), (0, 3, true));
    }

    /// Rule (delivery rule 20): a forward rendered for a transaction is the record `send`
    /// writes: its tier topic, the provenance and tier headers, and the source partition
    /// when the tier topic has it (else by key).
    #[test]
    fn a_forward_for_a_transaction_is_the_record_send_writes() {
        let tiers = two_tiers();
        let record = RawRecord {
            topic: "src".into(),
            partition: 3,
            offset: 11,
            key: Some(b"k".into()),
            value: Some(b"v".into()),
            headers: Headers::new().with("event-id", "e-1"),
            timestamp: Some(1_000),
            log_append_time: false,
        };
        let at = tiers.locate(&record);
        let before = SystemTime::now();
        let (topic, written) = tiers.forward(&record, &at, 2, None, false);
        assert_eq!(topic, "src.retry.2");
        let h = Headers::from(written);
        assert_eq!(h.get_str("event-id"), Some("e-1"));
        assert_eq!(h.get_str(headers::TIER), Some("2"));
        assert_eq!(h.get_str(headers::HOP), Some("1"));
        assert_eq!(h.get_str(dlt::ORIGINAL_TOPIC), Some("src"));
        let due = h.get(headers::DUE_MS).and_then(due_ms).expect("a due time");
        assert!(due + Duration::from_millis(1) >= before + Duration::from_secs(2));
        assert_eq!(placement(8, 3), Some(3), "the source partition");
        assert_eq!(placement(4, 0), Some(0));
        assert_eq!(placement(3, 3), None, "by key: the tier topic lacks it");
    }

    /// A tier topic's partition count is kept: forwards rendered for a transaction do not
    /// ask the broker each time (the producer here reaches no broker: a fetch would fail).
    #[tokio::test]
    async fn a_kept_partition_count_renders_forwards_without_a_metadata_request() {
        let tiers = two_tiers();
        tiers
            .lock_counts()
            .insert("src.retry.1".into(), (4, Instant::now()));
        let record = |partition| RawRecord {
            topic: "src".into(),
            partition,
            offset: 11,
            key: Some(b"k".into()),
            value: None,
            headers: Headers::new(),
            timestamp: None,
            log_append_time: false,
        };
        for (source, placed) in [(3, Some(3)), (0, Some(0)), (6, None)] {
            let r = record(source);
            let at = tiers.locate(&r);
            let forward = tiers
                .render(&r, &at, 1, None, false)
                .await
                .expect("rendered from the kept count, no metadata request");
            assert_eq!(
                (forward.topic.as_str(), forward.partition),
                ("src.retry.1", placed)
            );
        }
    }

    const SKEW: Duration = MAX_DUE_SKEW;

    fn tier_record(headers: Headers, timestamp: Option<i64>) -> RawRecord {
        RawRecord {
            topic: "src.retry.1".into(),
            partition: 1,
            offset: 40,
            key: Some(b"k".into()),
            value: Some(b"v".into()),
            headers,
            timestamp,
            log_append_time: false,
        }
    }

    fn ms(t: SystemTime) -> i64 {
        headers::millis(t)
    }

    /// Rule: a tier record waits at most its delay plus the skew allowance past its own
    /// timestamp and past now, whatever its due header or its timestamp say.
    #[test]
    fn crafted_due_times_are_bounded_by_the_tier_delay() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let delay = Duration::from_secs(600);
        let read = |h: Headers, ts: Option<i64>| {
            read_tier_record(&tier_record(h, ts), "src", 1, 2, delay, now)
        };
        let far = Headers::new().with(headers::DUE_MS, "99999999999999999999");
        // An honest timestamp: the delay plus one minute past it.
        let at = read(far.clone(), Some(ms(now) - 1_000));
        assert_eq!(at.invalid, None);
        assert_eq!(at.due, Some(now - Duration::from_secs(1) + delay + SKEW));
        assert_eq!(at.longest_wait, delay + SKEW);
        // A timestamp in the future pins nothing either: bounded from now.
        let at = read(far.clone(), Some(ms(now) + 86_400_000));
        assert_eq!(at.due, Some(now + delay + SKEW));
        // No timestamp: from now.
        assert_eq!(read(far, None).due, Some(now + delay + SKEW));
        // Missing or malformed due: the timestamp plus the delay (bounded the same way).
        let ts = ms(now) - 5_000;
        let expected = Some(now - Duration::from_secs(5) + delay);
        assert_eq!(read(Headers::new(), Some(ts)).due, expected);
        for junk in [&b"soon"[..], b"", b"12e4", b"\xff\xfe", b"--5"] {
            let h = Headers::new().with(headers::DUE_MS, junk);
            assert_eq!(read(h, Some(ts)).due, expected, "{junk:?}");
        }
        assert_eq!(read(Headers::new(), None).due, Some(now + delay));
        // Before the epoch: due at once.
        let h = Headers::new().with(headers::DUE_MS, "-99999999999999999999");
        assert_eq!(read(h, Some(ts)).due, Some(UNIX_EPOCH));
        // A legitimate due time is kept as it is.
        let h = Headers::new().with(headers::DUE_MS, (ts + 600_000).to_string());
        assert_eq!(read(h, Some(ts)).due, expected);
        // A short tier: the skew allowance is the delay itself.
        let short = Duration::from_secs(2);
        let h = Headers::new().with(headers::DUE_MS, i64::MAX.to_string());
        let at = read_tier_record(&tier_record(h, Some(ms(now))), "src", 1, 2, short, now);
        assert_eq!(at.due, Some(now + short * 2));
    }

    /// Rule: a tier record's provenance must name its tier's source topic and a real
    /// position; otherwise it is invalid (dead-lettered as it is), with a message naming the
    /// header and its value.
    #[test]
    fn provenance_naming_another_topic_or_position_is_invalid() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let read = |h: Headers| {
            read_tier_record(
                &tier_record(h, Some(ms(now))),
                "src",
                1,
                2,
                Duration::from_secs(1),
                now,
            )
        };
        let at = read(Headers::new().with(dlt::ORIGINAL_TOPIC, "no-such-topic"));
        let why = at.invalid.expect("another topic is invalid");
        assert!(
            why.contains(dlt::ORIGINAL_TOPIC) && why.contains("`no-such-topic`"),
            "{why}"
        );
        assert!(why.contains("src.retry.1/1@40"), "{why}");
        assert_eq!(
            (
                at.origin.topic.as_str(),
                at.origin.partition,
                at.origin.offset
            ),
            ("src", 1, 40),
            "dead-lettered as it is, under its tier's source"
        );
        assert!(at.history.is_none() && at.due.is_none());
        let mut null = Headers::new();
        null.push(crate::record::Header::null(dlt::ORIGINAL_TOPIC));
        for bad in [
            Headers::new().with(dlt::ORIGINAL_TOPIC, "bad topic/name\n"),
            Headers::new().with(dlt::ORIGINAL_TOPIC, vec![0xff, 0xfe]),
            Headers::new().with(dlt::ORIGINAL_TOPIC, "x".repeat(10_000)),
            null,
            Headers::new().with(dlt::ORIGINAL_PARTITION, (-1i32).to_be_bytes()),
            Headers::new().with(dlt::ORIGINAL_PARTITION, "99999999999"),
            Headers::new().with(dlt::ORIGINAL_PARTITION, "abc"),
            Headers::new().with(dlt::ORIGINAL_OFFSET, (-5i64).to_be_bytes()),
            Headers::new().with(dlt::ORIGINAL_OFFSET, "1.5"),
        ] {
            let why = read(bad.clone())
                .invalid
                .unwrap_or_else(|| panic!("{bad:?}"));
            assert!(why.starts_with("unreadable retry-tier record"), "{why}");
            assert!(why.len() < 400, "the message is bounded: {why}");
        }
        // A hand-written record without provenance stands for itself; a large partition
        // that is a valid int32 is read (placement falls back to the key for it alone).
        let at = read(Headers::new());
        assert_eq!(at.invalid, None);
        assert_eq!((at.origin.partition, at.origin.offset), (1, 40));
        let at = read(
            Headers::new()
                .with(dlt::ORIGINAL_TOPIC, " src ")
                .with(dlt::ORIGINAL_PARTITION, 99_999i32.to_be_bytes())
                .with(dlt::ORIGINAL_OFFSET, "7"),
        );
        assert_eq!(at.invalid, None);
        assert_eq!((at.origin.partition, at.origin.offset), (99_999, 7));
    }

    /// Rule: attempts saturate at `u32::MAX`, failed stages are clamped to the number of
    /// tiers; nothing wraps.
    #[test]
    fn counts_are_clamped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let read = |stages: &str| {
            let h = Headers::new()
                .with(dlt::ATTEMPTS, "4294967295")
                .with(headers::FAILED_STAGES, stages);
            read_tier_record(
                &tier_record(h, None),
                "src",
                1,
                3,
                Duration::from_secs(1),
                now,
            )
        };
        for (written, read_as) in [
            ("4294967295", 3),
            ("99999999999", 3),
            ("2", 2),
            ("-1", 1),
            ("x", 1),
        ] {
            let h = read(written).history.expect("attempts were given");
            assert_eq!((h.attempts, h.stages), (u32::MAX, read_as), "{written}");
        }
    }

    proptest::proptest! {
        /// Whatever the headers and timestamp: no panic, and what is read keeps the rules.
        #[test]
        fn any_tier_record_is_read_within_the_rules(
            h in crate::dead_letter::headers::tests::arbitrary_headers(),
            timestamp in proptest::option::of(proptest::prelude::any::<i64>()),
            delay_ms in 1u64..(3 * 86_400_000),
            now_s in 0u64..8_000_000_000,
            tiers in 1u32..=100,
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(now_s);
            let delay = Duration::from_millis(delay_ms);
            let tier = tiers.min(2);
            let record = tier_record(h, timestamp);
            let at = read_tier_record(&record, "src", tier, tiers, delay, now);
            proptest::prop_assert_eq!(at.origin.topic.as_str(), "src");
            proptest::prop_assert!(at.longest_wait <= delay + delay.min(SKEW));
            match &at.invalid {
                Some(why) => {
                    proptest::prop_assert!(at.due.is_none() && at.history.is_none());
                    proptest::prop_assert!(why.starts_with("unreadable retry-tier record"));
                    proptest::prop_assert!(why.len() < 1_000);
                }
                None => {
                    let due = at.due.expect("a tier record has a due time");
                    proptest::prop_assert!(due <= now + at.longest_wait);
                    if let Some(ts) = record.timestamp.and_then(dlt::epoch_millis) {
                        proptest::prop_assert!(due <= ts + at.longest_wait);
                    }
                    proptest::prop_assert!(at.origin.partition >= 0 && at.origin.offset >= 0);
                    if let Some(h) = &at.history {
                        proptest::prop_assert!(h.stages <= tiers);
                    }
                }
            }
        }
    }
}
