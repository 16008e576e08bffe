//! The dead-letter header format, in one place: the names (stable), how a [`DeadLetter`]
//! writes them ([`DeadLetter::headers`]) and how they are read back ([`Provenance`]).
//! Custom sinks use the same functions, so every kourier dead letter reads the same.
//!
//! Names of the provenance headers a dead letter carries.
//!
//! The `kafka_dlt-*` names and encodings are Spring Kafka's (`KafkaHeaders.DLT_*`), so Spring
//! tools can read kourier's dead letters and vice versa: partition is a 4-byte big-endian
//! integer, offset and timestamp 8-byte big-endian integers, the rest UTF-8 text.
//! The `kourier-dlt-*` headers are kourier's own, all UTF-8 text.
//!
//! When a record that already carries these headers (a redriven dead letter) is dead-lettered
//! again, the old values are *replaced*, never appended, so headers do not grow.
//!
//! # Reading them back: every value is untrusted
//!
//! Any producer with write access to a topic can write these headers, so kourier reads them
//! as untrusted input (delivery rule 17 in the crate docs): a value that is malformed or out
//! of range never panics, never wraps and never reads as a *smaller* count than it says.
//! [`Provenance::from_headers`] applies these rules (the last header of a name counts):
//!
//! | header | read as | malformed or out of range |
//! |---|---|---|
//! | [`ORIGINAL_PARTITION`] | int32, 4-byte big-endian or decimal text | negative or not an int32: `None` |
//! | [`ORIGINAL_OFFSET`] | int64, 8-byte big-endian or decimal text | negative or not an int64: `None` |
//! | [`ORIGINAL_TIMESTAMP`] | ms since the epoch, as the offset | before the epoch (Java's `-1`) or after [`MAX_TIME_MS`]: `None` |
//! | [`FIRST_FAILURE_MS`], [`LAST_FAILURE_MS`] | decimal ms since the epoch | before the epoch or after [`MAX_TIME_MS`] (year 9999): `None` |
//! | [`ATTEMPTS`] | decimal, any number of digits | above `u32::MAX`: saturates at `u32::MAX`; not a non-negative decimal: `None` |
//! | [`VALUE_DROPPED_BYTES`] | decimal | above `u64::MAX`, or not a decimal: `u64::MAX` (present means dropped) |
//! | [`REDRIVE_COUNT`] | decimal, any number of digits; absent is 0 | above `u32::MAX`: saturates; present but not a non-negative decimal (null, text, negative): **`u32::MAX`**, so a redrive limit refuses it |
//! | [`tier::HOP`] (read by the consumer for the dedup key's position) | decimal, any number of digits; absent is 0 | as [`REDRIVE_COUNT`]: saturates, malformed is `u32::MAX` (a position of its own, never an earlier one) |
//! | [`FAILURE_KIND`] | one of the [`DeadLetterReason`] names | `None` |
//! | topic, group, class, type | UTF-8 text, trimmed | not UTF-8: `None` (the error message is read lossily) |
//!
//! A count is never read as less than its text says: `99999999999` redrives is `u32::MAX`,
//! not 0, so `kourier-dlt redrive --max-redrives` refuses it. The original topic is text
//! here; [`RedriveRecord::from_dead_letter`](super::RedriveRecord::from_dead_letter) checks
//! that it is a valid topic name before it publishes there, and a consumer reading a retry
//! tier record checks that it names the tier's own source topic (see
//! [`tiers`](crate::tiers#headers-are-untrusted)).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{DeadLetter, DeadLetterReason, MAX_ERROR_MESSAGE_BYTES, truncate_utf8};
use crate::record::{Header, Headers};

/// Source topic (UTF-8).
pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
/// Source partition (int32, big-endian).
pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
/// Source offset (int64, big-endian).
pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
/// Source record timestamp, ms since the epoch (int64, big-endian).
pub const ORIGINAL_TIMESTAMP: &str = "kafka_dlt-original-timestamp";
/// `CreateTime` or `LogAppendTime` (UTF-8).
pub const ORIGINAL_TIMESTAMP_TYPE: &str = "kafka_dlt-original-timestamp-type";
/// The consumer group that gave up on the record (UTF-8).
pub const ORIGINAL_CONSUMER_GROUP: &str = "kafka_dlt-original-consumer-group";
/// The error message, truncated to [`MAX_ERROR_MESSAGE_BYTES`] (UTF-8).
pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
/// A class-like name of the failure, e.g. `kourier.RetriesExhausted` (UTF-8).
pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
/// `decode`, `permanent`, `retries-exhausted` or `panic` (UTF-8).
pub const FAILURE_KIND: &str = "kourier-dlt-failure-kind";
/// Attempts made, decimal (UTF-8).
pub const ATTEMPTS: &str = "kourier-dlt-attempts";
/// First failure time, ms since the epoch, decimal (UTF-8).
pub const FIRST_FAILURE_MS: &str = "kourier-dlt-first-failure-ms";
/// Last failure time, ms since the epoch, decimal (UTF-8).
pub const LAST_FAILURE_MS: &str = "kourier-dlt-last-failure-ms";
/// Set when the value was too large for the dead-letter topic and was dropped; holds the
/// original value's size in bytes, decimal (UTF-8).
pub const VALUE_DROPPED_BYTES: &str = "kourier-dlt-value-dropped-bytes";
/// Set on a provenance-only letter: the original key's size in bytes, decimal (UTF-8).
pub const KEY_DROPPED_BYTES: &str = "kourier-dlt-key-dropped-bytes";
/// Set on a provenance-only letter: how many of the record's own headers were dropped,
/// decimal (UTF-8).
pub const HEADERS_DROPPED: &str = "kourier-dlt-headers-dropped";
/// How many times the record was redriven from a dead-letter topic, decimal (UTF-8).
pub const REDRIVE_COUNT: &str = "kourier-redrive-count";
/// Set on a redriven record: the letter it was redriven from, as
/// `<dead-letter topic>/<partition>@<offset>` (UTF-8). Replaced on each redrive, like
/// [`REDRIVE_COUNT`]; not a provenance header, so a letter of a redriven record keeps it and
/// shows where its previous letter was. Informative only: the consumer's dedup key of a
/// redriven record is its event's key at the redrive count (see
/// [`idempotency`](crate::idempotency#deliveries-of-one-event-delivery-rule-18)), whichever
/// letter it came from.
pub const REDRIVEN_FROM: &str = "kourier-redriven-from";

/// The latest time a provenance header can name, in ms since the epoch:
/// 9999-12-31T23:59:59.999Z (RFC 3339 has four-digit years). A later time reads as `None`.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Every provenance header, replaced on each dead-lettering (not [`REDRIVE_COUNT`]).
pub const ALL: &[&str] = &[
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_TIMESTAMP,
    ORIGINAL_TIMESTAMP_TYPE,
    ORIGINAL_CONSUMER_GROUP,
    EXCEPTION_MESSAGE,
    EXCEPTION_FQCN,
    FAILURE_KIND,
    ATTEMPTS,
    FIRST_FAILURE_MS,
    LAST_FAILURE_MS,
    VALUE_DROPPED_BYTES,
    KEY_DROPPED_BYTES,
    HEADERS_DROPPED,
];

/// The headers a retry-tier record carries on top of the provenance headers, defined here
/// (where redrive strips them) and re-exported with their docs as
/// [`tiers::headers`](crate::tiers::headers).
pub mod tier {
    /// The tier the record is in, 1-based.
    pub const TIER: &str = "kourier-retry-tier";
    /// When the record may run, ms since the epoch. Read as untrusted: never later than the
    /// tier's delay (plus a skew allowance) past the record's timestamp or past when it comes
    /// up (see [`tiers`](crate::tiers#headers-are-untrusted)).
    pub const DUE_MS: &str = "kourier-retry-due-ms";
    /// `true` when the record was moved to keep its key's order, not because it failed.
    pub const DEFERRED: &str = "kourier-retry-deferred";
    /// How many stages (the source and tiers) the record used up its in-place attempts in.
    /// A record gets one stage per tier plus one, wherever it starts: one deferred into a
    /// tier (key order) that fails in the last tier goes round that tier again until it has
    /// had its stages. Read clamped to the number of tiers (see
    /// [`tiers`](crate::tiers#headers-are-untrusted)).
    pub const FAILED_STAGES: &str = "kourier-retry-failed-stages";
    /// How many times the record was forwarded since it left its source topic (1 for a
    /// record's first tier copy), decimal. With idempotency each forward is a *position* of
    /// the event of its own: the dedup key of a copy at hop `n` > 0 is the event's key with
    /// `#h<n>` appended, and every position is marked settled when its copy ends, so a stale
    /// copy of a position whose outcome is known is skipped (see
    /// [`idempotency`](crate::idempotency)).
    pub const HOP: &str = "kourier-retry-hop";

    /// Every tier header, replaced on each forward.
    pub const ALL: &[&str] = &[TIER, DUE_MS, DEFERRED, FAILED_STAGES, HOP];
}

/// Where a dead letter came from and why it failed, as its [headers](self) say.
///
/// Every field is optional: a dead letter written by kourier has them all (but
/// [`value_dropped_bytes`](Self::value_dropped_bytes)), one written by Spring Kafka has the
/// `kafka_dlt-*` ones, and any other record has none. Values that do not parse are `None`.
/// Partition, offset and timestamp are read in Spring's binary encoding (big-endian
/// integers) and, for records written by other tools, as decimal text.
///
/// The headers are untrusted input: each field follows the rule in the
/// [module docs](self#reading-them-back-every-value-is-untrusted). In short, partitions and
/// offsets are never negative, times lie between the epoch and [`MAX_TIME_MS`] (year 9999),
/// counts saturate instead of wrapping, and a malformed [`REDRIVE_COUNT`] reads as
/// `u32::MAX` (refused by a redrive limit) rather than 0. Reading never panics, whatever the
/// bytes.
///
/// ```
/// use kourier::dead_letter::{headers, Provenance};
/// use kourier::{DeadLetterReason, Headers};
///
/// let letter_headers = Headers::new()
///     .with(headers::ORIGINAL_TOPIC, "notify.v1")
///     .with(headers::ORIGINAL_PARTITION, 3i32.to_be_bytes())
///     .with(headers::ORIGINAL_OFFSET, 42i64.to_be_bytes())
///     .with(headers::FAILURE_KIND, "permanent")
///     .with(headers::ATTEMPTS, "1");
/// let p = Provenance::from_headers(&letter_headers);
/// assert_eq!(p.original_topic.as_deref(), Some("notify.v1"));
/// assert_eq!((p.original_partition, p.original_offset), (Some(3), Some(42)));
/// assert_eq!(p.failure_kind, Some(DeadLetterReason::Permanent));
/// assert_eq!(p.redrive_count, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Provenance {
    /// The source topic ([`ORIGINAL_TOPIC`]).
    pub original_topic: Option<String>,
    /// The source partition ([`ORIGINAL_PARTITION`]; never negative).
    pub original_partition: Option<i32>,
    /// The source offset ([`ORIGINAL_OFFSET`]; never negative).
    pub original_offset: Option<i64>,
    /// The source record's timestamp, ms since the epoch ([`ORIGINAL_TIMESTAMP`];
    /// `None` for Java's `-1`, no timestamp, and for anything outside 0..=[`MAX_TIME_MS`]).
    pub original_timestamp: Option<i64>,
    /// `CreateTime` or `LogAppendTime` ([`ORIGINAL_TIMESTAMP_TYPE`]).
    pub original_timestamp_type: Option<String>,
    /// The consumer group that gave up ([`ORIGINAL_CONSUMER_GROUP`]).
    pub consumer_group: Option<String>,
    /// The failure kind ([`FAILURE_KIND`]).
    pub failure_kind: Option<DeadLetterReason>,
    /// The failure's class-like name ([`EXCEPTION_FQCN`]), e.g.
    /// `kourier.RetriesExhausted` or a Java exception class.
    pub exception_class: Option<String>,
    /// The last error message ([`EXCEPTION_MESSAGE`]).
    pub error: Option<String>,
    /// Attempts made ([`ATTEMPTS`]; 0 for a decode failure; saturates at `u32::MAX`).
    pub attempts: Option<u32>,
    /// When the first attempt failed ([`FIRST_FAILURE_MS`]; between the epoch and
    /// [`MAX_TIME_MS`], else `None`).
    pub first_failure: Option<SystemTime>,
    /// When the last attempt failed, i.e. when the record was given up
    /// ([`LAST_FAILURE_MS`]; between the epoch and [`MAX_TIME_MS`], else `None`).
    pub last_failure: Option<SystemTime>,
    /// Set for a metadata-only letter: the dropped value's size
    /// ([`VALUE_DROPPED_BYTES`]; `u64::MAX` when the header is there but unreadable).
    pub value_dropped_bytes: Option<u64>,
    /// How many times the record had been redriven before this dead-lettering
    /// ([`REDRIVE_COUNT`]; 0 when absent, saturating at `u32::MAX`, and `u32::MAX` when the
    /// header is there but not a non-negative decimal, so that a redrive limit refuses it).
    pub redrive_count: u32,
}

impl Provenance {
    /// Reads the provenance headers (the last one of each name counts, as in Kafka clients),
    /// by the rules in the [module docs](self#reading-them-back-every-value-is-untrusted).
    /// Never panics.
    pub fn from_headers(h: &Headers) -> Provenance {
        let text = |name| h.get_str(name).map(|s| s.trim().to_owned());
        let time = |name| h.get(name).and_then(decimal).and_then(epoch_millis);
        Provenance {
            original_topic: text(ORIGINAL_TOPIC),
            original_partition: h.get(ORIGINAL_PARTITION).and_then(partition),
            original_offset: h.get(ORIGINAL_OFFSET).and_then(offset),
            original_timestamp: h
                .get(ORIGINAL_TIMESTAMP)
                .and_then(int64)
                .filter(|t| (0..=MAX_TIME_MS).contains(t)),
            original_timestamp_type: text(ORIGINAL_TIMESTAMP_TYPE),
            consumer_group: text(ORIGINAL_CONSUMER_GROUP),
            failure_kind: h
                .get_str(FAILURE_KIND)
                .and_then(|s| DeadLetterReason::parse(s.trim())),
            exception_class: text(EXCEPTION_FQCN),
            error: h
                .get(EXCEPTION_MESSAGE)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            attempts: h.get(ATTEMPTS).and_then(count).map(saturate_u32),
            first_failure: time(FIRST_FAILURE_MS),
            last_failure: time(LAST_FAILURE_MS),
            value_dropped_bytes: last(h, VALUE_DROPPED_BYTES)
                .map(|v| v.and_then(count).unwrap_or(u64::MAX)),
            redrive_count: redrive_count(h),
        }
    }

    /// Whether the headers named a source topic, i.e. this looks like a dead letter.
    pub fn is_dead_letter(&self) -> bool {
        self.original_topic.is_some()
    }

    /// `topic/partition@offset` of the source record, with `?` for what is unknown.
    pub fn original_coordinates(&self) -> String {
        fn or_unknown<T: ToString>(v: Option<T>) -> String {
            v.map_or_else(|| "?".to_owned(), |v| v.to_string())
        }
        format!(
            "{}/{}@{}",
            self.original_topic.as_deref().unwrap_or("?"),
            or_unknown(self.original_partition),
            or_unknown(self.original_offset)
        )
    }
}

/// Whether `name` is one of the provenance headers ([`ALL`]).
pub(crate) fn is_provenance(name: &[u8]) -> bool {
    ALL.iter().any(|p| p.as_bytes() == name)
}

/// The [`REDRIVE_COUNT`] of a record: 0 when absent, saturating at `u32::MAX`, and
/// `u32::MAX` when present but not a non-negative decimal (a null value included), so that a
/// redrive limit refuses a letter whose count it cannot read.
pub(crate) fn redrive_count(h: &Headers) -> u32 {
    match last(h, REDRIVE_COUNT) {
        None => 0,
        Some(value) => value.and_then(count).map_or(u32::MAX, saturate_u32),
    }
}

/// The value of the last header named `name`: `None` when there is none, `Some(None)` when
/// its value is null.
pub(crate) fn last(h: &Headers, name: impl AsRef<[u8]>) -> Option<Option<&[u8]>> {
    let name = name.as_ref();
    h.iter().rev().find(|x| x.is_named(name)).map(|x| x.value())
}

/// A non-negative decimal (surrounding ASCII whitespace allowed) of any length, saturating at
/// `u64::MAX`; `None` for anything else (empty, a sign, other characters).
pub(crate) fn count(v: &[u8]) -> Option<u64> {
    let digits = v.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

pub(crate) fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Where a delivery stands in its event's life: how often the event was redriven from a
/// dead-letter topic, and how many retry-tier forwards this copy is from its source record.
/// Each position settles once (delivery rule 18): its outcome — handled, dead-lettered,
/// forwarded to the next tier — marks the position's dedup key done, so a redelivery or a
/// stale copy of a settled position is skipped, while the next position (the tier copy, a
/// redrive) runs under a key of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// [`REDRIVE_COUNT`].
    pub(crate) redrive: u32,
    /// [`tier::HOP`]: 0 for a record in its source topic.
    pub(crate) hop: u32,
}

/// The position a record's headers give: the redrive count as [`redrive_count`] reads it,
/// and the hop the same way (absent: 0; above `u32::MAX`: saturates; present but not a
/// non-negative decimal: `u32::MAX`, a position of its own — never read as a smaller count,
/// which could make a copy look like an earlier, settled delivery and skip it).
pub(crate) fn position_of(headers: &Headers) -> Position {
    Position {
        redrive: redrive_count(headers),
        hop: match last(headers, tier::HOP) {
            None => 0,
            Some(value) => value.and_then(count).map_or(u32::MAX, saturate_u32),
        },
    }
}

/// The dedup key of a delivery at `position`: the event's key itself for a first delivery
/// from its source topic, else with `#r<redrive>` and `#h<hop>` appended.
pub(crate) fn positioned(mut key: String, position: Position) -> String {
    use std::fmt::Write as _;
    if position.redrive > 0 {
        let _ = write!(key, "#r{}", position.redrive);
    }
    if position.hop > 0 {
        let _ = write!(key, "#h{}", position.hop);
    }
    key
}

fn is_decimal(v: &[u8]) -> bool {
    let digits = v.strip_prefix(b"-").unwrap_or(v);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

/// Decimal text (an optional `-`, surrounding whitespace allowed) that fits an `i64`.
pub(crate) fn decimal(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// A 4-byte big-endian integer (Spring's encoding), or decimal text.
pub(crate) fn int32(v: &[u8]) -> Option<i32> {
    if is_decimal(v) {
        return decimal(v).and_then(|n| i32::try_from(n).ok());
    }
    Some(i32::from_be_bytes(v.try_into().ok()?))
}

/// An 8-byte big-endian integer (Spring's encoding), or decimal text.
pub(crate) fn int64(v: &[u8]) -> Option<i64> {
    if is_decimal(v) {
        return decimal(v);
    }
    Some(i64::from_be_bytes(v.try_into().ok()?))
}

/// A partition number: an [`int32`] that is not negative.
pub(crate) fn partition(v: &[u8]) -> Option<i32> {
    int32(v).filter(|&p| p >= 0)
}

/// An offset: an [`int64`] that is not negative.
pub(crate) fn offset(v: &[u8]) -> Option<i64> {
    int64(v).filter(|&o| o >= 0)
}

/// `bytes` for an error message: escaped, cut to 100 characters.
pub(crate) fn shown(bytes: &[u8]) -> String {
    const MAX: usize = 100;
    let escaped = crate::record::escape_bytes(bytes);
    let mut chars = escaped.chars();
    let cut: String = chars.by_ref().take(MAX).collect();
    if chars.next().is_some() {
        format!("`{cut}…` ({} bytes)", bytes.len())
    } else {
        format!("`{cut}`")
    }
}

/// `ms` since the epoch, when it lies between the epoch and [`MAX_TIME_MS`].
pub(crate) fn epoch_millis(ms: i64) -> Option<SystemTime> {
    if !(0..=MAX_TIME_MS).contains(&ms) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))
}

impl DeadLetter {
    /// The headers a dead letter is written with: the record's own headers, minus any
    /// provenance headers it already carried (a redriven letter), then fresh provenance
    /// headers ([`ALL`]; [`REDRIVE_COUNT`] is kept as it is). Custom sinks use this so that
    /// every kourier dead letter reads the same ([`Provenance::from_headers`]).
    ///
    /// ```
    /// use kourier::dead_letter::Provenance;
    /// use kourier::{DeadLetter, DeadLetterReason, Headers, RawRecord};
    ///
    /// let record = RawRecord::builder("notify.v1").partition(2).offset(7).value("{}").build();
    /// let mut letter = DeadLetter::new(record, DeadLetterReason::Permanent, "bad address");
    /// letter.attempts = 1;
    /// letter.group_id = "notifier".into();
    /// let written: Headers = letter.headers().into_iter().collect();
    /// let p = Provenance::from_headers(&written);
    /// assert_eq!((p.original_partition, p.original_offset), (Some(2), Some(7)));
    /// assert_eq!(p.failure_kind, Some(DeadLetterReason::Permanent));
    /// ```
    pub fn headers(&self) -> Vec<Header> {
        letter_headers(self, None)
    }
}

/// The headers of a letter that keeps nothing of the record but its provenance: the
/// provenance headers (the value marked dropped) plus the sizes of what was dropped.
pub(crate) fn provenance_only_headers(letter: &DeadLetter) -> Vec<Header> {
    let record = &letter.record;
    let value_bytes = record.value.as_ref().map_or(0, |v| v.len());
    let mut stripped = (**record).clone();
    stripped.headers = crate::record::Headers::new();
    let bare = DeadLetter {
        record: Arc::new(stripped),
        ..letter.clone()
    };
    let mut out = letter_headers(&bare, Some(value_bytes));
    out.push(Header::new(
        KEY_DROPPED_BYTES,
        record.key.as_ref().map_or(0, |k| k.len()).to_string(),
    ));
    out.push(Header::new(
        HEADERS_DROPPED,
        record.headers.len().to_string(),
    ));
    out
}

/// The headers of a dead letter: the record's own minus old provenance, then fresh provenance.
/// `dropped_value_bytes` is set for a metadata-only letter.
pub(crate) fn letter_headers(
    letter: &DeadLetter,
    dropped_value_bytes: Option<usize>,
) -> Vec<Header> {
    let record = &letter.record;

    // A letter whose value was dropped before and is still null keeps saying so.
    let dropped = dropped_value_bytes
        .map(|n| n.to_string().into_bytes())
        .or_else(|| {
            if record.value.is_none() {
                record.headers.get(VALUE_DROPPED_BYTES).map(<[u8]>::to_vec)
            } else {
                None
            }
        });

    let mut out: Vec<Header> = record
        .headers
        .iter()
        .filter(|h| !is_provenance(&h.key))
        .cloned()
        .collect();
    out.reserve(ALL.len());

    let (timestamp, timestamp_type) = match record.timestamp {
        Some(ts) if record.log_append_time => (ts, "LogAppendTime"),
        Some(ts) => (ts, "CreateTime"),
        None => (-1, "NoTimestampType"),
    };
    out.push(Header::new(ORIGINAL_TOPIC, record.topic.as_bytes()));
    out.push(Header::new(
        ORIGINAL_PARTITION,
        record.partition.to_be_bytes(),
    ));
    out.push(Header::new(ORIGINAL_OFFSET, record.offset.to_be_bytes()));
    out.push(Header::new(ORIGINAL_TIMESTAMP, timestamp.to_be_bytes()));
    out.push(Header::new(ORIGINAL_TIMESTAMP_TYPE, timestamp_type));
    out.push(Header::new(
        ORIGINAL_CONSUMER_GROUP,
        letter.group_id.as_bytes(),
    ));
    out.push(Header::new(
        EXCEPTION_MESSAGE,
        truncate_utf8(&letter.error, MAX_ERROR_MESSAGE_BYTES).as_bytes(),
    ));
    out.push(Header::new(EXCEPTION_FQCN, letter.reason.fqcn()));
    out.push(Header::new(FAILURE_KIND, letter.reason.as_str()));
    out.push(Header::new(ATTEMPTS, letter.attempts.to_string()));
    out.push(Header::new(
        FIRST_FAILURE_MS,
        millis_since_epoch(letter.first_failure).to_string(),
    ));
    out.push(Header::new(
        LAST_FAILURE_MS,
        millis_since_epoch(letter.last_failure).to_string(),
    ));
    if let Some(dropped) = dropped {
        out.push(Header::new(VALUE_DROPPED_BYTES, dropped));
    }
    out
}

fn millis_since_epoch(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

#[cfg(test)]
#[path = "arbitrary_headers.rs"]
mod arbitrary;

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dead_letter::DeadLetter;
    use crate::record::RawRecord;

    pub(crate) fn letter(headers: Headers, value: Option<Vec<u8>>) -> DeadLetter {
        DeadLetter {
            record: Arc::new(RawRecord {
                topic: "notify.v1".into(),
                partition: 3,
                offset: 42,
                key: Some(b"user-1".into()),
                value: value.map(Into::into),
                headers,
                timestamp: Some(1_700_000_000_123),
                log_append_time: false,
            }),
            reason: DeadLetterReason::RetriesExhausted,
            error: "smtp said no".into(),
            attempts: 4,
            first_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_001_000),
            last_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_002_500),
            group_id: "mailer".into(),
        }
    }

    fn get<'a>(headers: &'a [Header], key: &str) -> Option<&'a [u8]> {
        let mut found = headers.iter().filter(|h| h.is_named(key));
        let first = found.next()?;
        assert!(found.next().is_none(), "{key} appears more than once");
        first.value.as_deref()
    }

    #[test]
    fn provenance_headers_use_the_documented_encodings() {
        let original = Headers::new().with("event-id", "e-1");
        let mut original = original;
        original.push(Header::null("trace"));
        let out = letter_headers(&letter(original, Some(b"{}".to_vec())), None);
        assert_eq!(out[0], Header::new("event-id", "e-1"));
        assert_eq!(out[1], Header::null("trace"));
        assert_eq!(get(&out, ORIGINAL_TOPIC), Some(&b"notify.v1"[..]));
        assert_eq!(get(&out, ORIGINAL_PARTITION), Some(&[0, 0, 0, 3][..]));
        assert_eq!(get(&out, ORIGINAL_OFFSET), Some(&42i64.to_be_bytes()[..]));
        assert_eq!(
            get(&out, ORIGINAL_TIMESTAMP),
            Some(&1_700_000_000_123i64.to_be_bytes()[..])
        );
        assert_eq!(get(&out, ORIGINAL_TIMESTAMP_TYPE), Some(&b"CreateTime"[..]));
        assert_eq!(get(&out, ORIGINAL_CONSUMER_GROUP), Some(&b"mailer"[..]));
        assert_eq!(get(&out, EXCEPTION_MESSAGE), Some(&b"smtp said no"[..]));
        assert_eq!(
            get(&out, EXCEPTION_FQCN),
            Some(&b"kourier.RetriesExhausted"[..])
        );
        assert_eq!(get(&out, FAILURE_KIND), Some(&b"retries-exhausted"[..]));
        assert_eq!(get(&out, ATTEMPTS), Some(&b"4"[..]));
        assert_eq!(get(&out, FIRST_FAILURE_MS), Some(&b"1700000001000"[..]));
        assert_eq!(get(&out, LAST_FAILURE_MS), Some(&b"1700000002500"[..]));
        assert_eq!(get(&out, VALUE_DROPPED_BYTES), None);
        assert_eq!(out.len(), 2 + 12);
    }

    #[test]
    fn re_dead_lettering_replaces_provenance_and_keeps_redrive_count() {
        let first = letter_headers(&letter(Headers::new().with("event-id", "e-1"), None), None);
        let mut redriven: Headers = first.iter().cloned().collect();
        redriven.push(Header::new(REDRIVE_COUNT, "1"));
        let mut again = letter(redriven, None);
        Arc::make_mut(&mut again.record).topic = "other.v1".into();
        let second = letter_headers(&again, None);
        assert_eq!(second.len(), first.len() + 1);
        assert_eq!(get(&second, ORIGINAL_TOPIC), Some(&b"other.v1"[..]));
        assert_eq!(get(&second, REDRIVE_COUNT), Some(&b"1"[..]));
    }

    #[test]
    fn metadata_only_letters_record_the_dropped_size_and_keep_it() {
        let out = letter_headers(&letter(Headers::new(), Some(vec![0; 10])), Some(10_240));
        assert_eq!(get(&out, VALUE_DROPPED_BYTES), Some(&b"10240"[..]));

        // Redriven with the value still null: the marker survives re-dead-lettering...
        let again = letter_headers(&letter(out.iter().cloned().collect(), None), None);
        assert_eq!(get(&again, VALUE_DROPPED_BYTES), Some(&b"10240"[..]));
        // ...but not once a value is back.
        let restored = letter_headers(&letter(out.into_iter().collect(), Some(vec![1])), None);
        assert_eq!(get(&restored, VALUE_DROPPED_BYTES), None);
    }

    #[test]
    fn long_errors_are_truncated_and_missing_timestamps_follow_java() {
        let mut l = letter(Headers::new(), None);
        l.error = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let record = Arc::make_mut(&mut l.record);
        record.timestamp = None;
        let out = letter_headers(&l, None);
        let message = get(&out, EXCEPTION_MESSAGE).unwrap();
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(std::str::from_utf8(message).is_ok());
        assert_eq!(
            get(&out, ORIGINAL_TIMESTAMP),
            Some(&(-1i64).to_be_bytes()[..])
        );
        assert_eq!(
            get(&out, ORIGINAL_TIMESTAMP_TYPE),
            Some(&b"NoTimestampType"[..])
        );

        let mut l = letter(Headers::new(), None);
        Arc::make_mut(&mut l.record).log_append_time = true;
        let out = letter_headers(&l, None);
        assert_eq!(
            get(&out, ORIGINAL_TIMESTAMP_TYPE),
            Some(&b"LogAppendTime"[..])
        );
    }

    #[test]
    fn epoch_millis_handles_both_sides_of_the_epoch() {
        assert_eq!(millis_since_epoch(UNIX_EPOCH + Duration::from_millis(5)), 5);
        assert_eq!(
            millis_since_epoch(UNIX_EPOCH - Duration::from_millis(5)),
            -5
        );
    }

    #[test]
    fn reads_what_the_kafka_sink_writes() {
        let letter = letter(Headers::new().with(REDRIVE_COUNT, "2"), None);
        let written: Headers = letter_headers(&letter, Some(10)).into_iter().collect();
        let p = Provenance::from_headers(&written);
        assert_eq!(
            p,
            Provenance {
                original_topic: Some("notify.v1".into()),
                original_partition: Some(3),
                original_offset: Some(42),
                original_timestamp: Some(1_700_000_000_123),
                original_timestamp_type: Some("CreateTime".into()),
                consumer_group: Some("mailer".into()),
                failure_kind: Some(DeadLetterReason::RetriesExhausted),
                exception_class: Some("kourier.RetriesExhausted".into()),
                error: Some("smtp said no".into()),
                attempts: Some(4),
                first_failure: Some(letter.first_failure),
                last_failure: Some(letter.last_failure),
                value_dropped_bytes: Some(10),
                redrive_count: 2,
            }
        );
        assert!(p.is_dead_letter());
        assert_eq!(p.original_coordinates(), "notify.v1/3@42");
    }

    #[test]
    fn a_delivery_position_is_never_read_as_an_earlier_one() {
        let at = |hop: Option<&[u8]>, redrive: Option<&[u8]>| {
            let mut h = Headers::new();
            if let Some(v) = hop {
                h.push(Header::new(tier::HOP, v.to_vec()));
            }
            if let Some(v) = redrive {
                h.push(Header::new(REDRIVE_COUNT, v.to_vec()));
            }
            let p = position_of(&h);
            (p.redrive, p.hop)
        };
        assert_eq!(at(None, None), (0, 0));
        assert_eq!(at(Some(b"3"), Some(b" 2 ")), (2, 3));
        assert_eq!(at(Some(b"99999999999"), None), (0, u32::MAX));
        assert_eq!(at(Some(b"-1"), Some(b"x")), (u32::MAX, u32::MAX));
        assert_eq!(
            positioned("g:e".into(), Position { redrive: 1, hop: 2 }),
            "g:e#r1#h2"
        );
        assert_eq!(positioned("g:e".into(), Position::default()), "g:e");
    }

    #[test]
    fn tolerates_other_writers() {
        // Decimal text instead of binary, Java's -1 timestamp, junk.
        let h = Headers::new()
            .with(ORIGINAL_PARTITION, "7")
            .with(ORIGINAL_OFFSET, "1234")
            .with(ORIGINAL_TIMESTAMP, (-1i64).to_be_bytes())
            .with(ATTEMPTS, "many")
            .with(FAILURE_KIND, "exploded")
            .with(REDRIVE_COUNT, "x");
        let p = Provenance::from_headers(&h);
        assert_eq!(p.original_partition, Some(7));
        assert_eq!(p.original_offset, Some(1234));
        assert_eq!(p.original_timestamp, None);
        assert_eq!(p.attempts, None);
        assert_eq!(p.failure_kind, None);
        assert_eq!(
            p.redrive_count,
            u32::MAX,
            "an unreadable redrive count is refused"
        );
        assert!(!p.is_dead_letter());
        assert_eq!(p.original_coordinates(), "?/7@1234");
        assert_eq!(
            Provenance::from_headers(&Headers::new()),
            Provenance::default()
        );
    }

    /// Crafted values (delivery rule 17): counts saturate instead of wrapping or reading as
    /// 0, times past year 9999 or before the epoch are `None`, partitions and offsets are
    /// never negative.
    #[test]
    fn hostile_values_are_clamped_not_wrapped() {
        let h = Headers::new()
            .with(ATTEMPTS, "4294967295")
            .with(REDRIVE_COUNT, "99999999999")
            .with(ORIGINAL_PARTITION, (-1i32).to_be_bytes())
            .with(ORIGINAL_OFFSET, "-7")
            .with(ORIGINAL_TIMESTAMP, (MAX_TIME_MS + 1).to_be_bytes())
            .with(FIRST_FAILURE_MS, "253402300800000")
            .with(LAST_FAILURE_MS, "-5")
            .with(VALUE_DROPPED_BYTES, "1".repeat(40));
        let p = Provenance::from_headers(&h);
        assert_eq!(p.attempts, Some(u32::MAX));
        assert_eq!(p.redrive_count, u32::MAX, "99999999999 must not read as 0");
        assert_eq!(p.original_partition, None);
        assert_eq!(p.original_offset, None);
        assert_eq!(p.original_timestamp, None);
        assert_eq!(p.first_failure, None, "past year 9999");
        assert_eq!(p.last_failure, None, "before the epoch");
        assert_eq!(p.value_dropped_bytes, Some(u64::MAX));

        let h = Headers::new()
            .with(ATTEMPTS, "99999999999999999999999")
            .with(LAST_FAILURE_MS, MAX_TIME_MS.to_string())
            .with(ORIGINAL_TIMESTAMP, MAX_TIME_MS.to_be_bytes())
            .with(REDRIVE_COUNT, " 12 ");
        let p = Provenance::from_headers(&h);
        assert_eq!(p.attempts, Some(u32::MAX));
        assert_eq!(
            p.last_failure,
            Some(UNIX_EPOCH + Duration::from_millis(MAX_TIME_MS as u64))
        );
        assert_eq!(p.original_timestamp, Some(MAX_TIME_MS));
        assert_eq!(p.redrive_count, 12);

        for malformed in [&b""[..], b"-1", b"+1", b"1e3", b"\xff", b"0x10"] {
            let p = Provenance::from_headers(&Headers::new().with(REDRIVE_COUNT, malformed));
            assert_eq!(p.redrive_count, u32::MAX, "{malformed:?}");
        }
        let mut null = Headers::new();
        null.push(Header::null(REDRIVE_COUNT));
        assert_eq!(Provenance::from_headers(&null).redrive_count, u32::MAX);
        assert_eq!(Provenance::from_headers(&Headers::new()).redrive_count, 0);
    }

    pub(crate) use super::arbitrary::arbitrary_headers;

    proptest::proptest! {
        /// Whatever the bytes: no panic, and every field within its documented range.
        #[test]
        fn provenance_reads_any_headers_within_the_rules(h in arbitrary_headers()) {
            let p = Provenance::from_headers(&h);
            let latest = UNIX_EPOCH + Duration::from_millis(MAX_TIME_MS as u64);
            proptest::prop_assert!(p.original_partition.is_none_or(|x| x >= 0));
            proptest::prop_assert!(p.original_offset.is_none_or(|x| x >= 0));
            proptest::prop_assert!(p.original_timestamp.is_none_or(|t| (0..=MAX_TIME_MS).contains(&t)));
            proptest::prop_assert!(p.first_failure.is_none_or(|t| t <= latest));
            proptest::prop_assert!(p.last_failure.is_none_or(|t| t <= latest));
            // The redrive count is never read as less than it says.
            match last(&h, REDRIVE_COUNT) {
                None => proptest::prop_assert_eq!(p.redrive_count, 0),
                Some(Some(v)) if count(v).is_some() => {
                    let text = std::str::from_utf8(v).unwrap().trim().trim_start_matches('0');
                    let expected = text.parse::<u32>().unwrap_or(if text.is_empty() { 0 } else { u32::MAX });
                    proptest::prop_assert_eq!(p.redrive_count, expected);
                }
                Some(_) => proptest::prop_assert_eq!(p.redrive_count, u32::MAX),
            }
            // Formatting what was read never panics either.
            let _ = p.original_coordinates();
        }
    }
}
