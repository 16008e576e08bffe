//! Reading a dead letter back: [`Provenance`] parsed from its headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{DeadLetterReason, headers};
use crate::message::Headers;

/// Where a dead letter came from and why it failed, as its [`headers`] say.
///
/// Every field is optional: a dead letter written by kourier has them all (but
/// [`value_dropped_bytes`](Self::value_dropped_bytes)), one written by Spring Kafka has the
/// `kafka_dlt-*` ones, and any other record has none. Values that do not parse are `None`.
/// Partition, offset and timestamp are read in Spring's binary encoding (big-endian
/// integers) and, for records written by other tools, as decimal text.
///
/// ```
/// use kourier::dead_letter::{headers, DeadLetterReason, Provenance};
/// use kourier::Headers;
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
    /// The source topic ([`headers::ORIGINAL_TOPIC`]).
    pub original_topic: Option<String>,
    /// The source partition ([`headers::ORIGINAL_PARTITION`]).
    pub original_partition: Option<i32>,
    /// The source offset ([`headers::ORIGINAL_OFFSET`]).
    pub original_offset: Option<i64>,
    /// The source record's timestamp, ms since the epoch ([`headers::ORIGINAL_TIMESTAMP`];
    /// `None` for Java's `-1`, no timestamp).
    pub original_timestamp: Option<i64>,
    /// `CreateTime` or `LogAppendTime` ([`headers::ORIGINAL_TIMESTAMP_TYPE`]).
    pub original_timestamp_type: Option<String>,
    /// The consumer group that gave up ([`headers::ORIGINAL_CONSUMER_GROUP`]).
    pub consumer_group: Option<String>,
    /// The failure kind ([`headers::FAILURE_KIND`]).
    pub failure_kind: Option<DeadLetterReason>,
    /// The failure's class-like name ([`headers::EXCEPTION_FQCN`]), e.g.
    /// `kourier.RetriesExhausted` or a Java exception class.
    pub exception_class: Option<String>,
    /// The last error message ([`headers::EXCEPTION_MESSAGE`]).
    pub error: Option<String>,
    /// Attempts made ([`headers::ATTEMPTS`]; 0 for a decode failure).
    pub attempts: Option<u32>,
    /// When the first attempt failed ([`headers::FIRST_FAILURE_MS`]).
    pub first_failure: Option<SystemTime>,
    /// When the last attempt failed, i.e. when the record was given up
    /// ([`headers::LAST_FAILURE_MS`]).
    pub last_failure: Option<SystemTime>,
    /// Set for a metadata-only letter: the dropped value's size
    /// ([`headers::VALUE_DROPPED_BYTES`]).
    pub value_dropped_bytes: Option<u64>,
    /// How many times the record had been redriven before this dead-lettering
    /// ([`headers::REDRIVE_COUNT`]; 0 when absent).
    pub redrive_count: u32,
}

impl Provenance {
    /// Reads the provenance headers (the last one of each name counts, as in Kafka clients).
    pub fn from_headers(h: &Headers) -> Provenance {
        let text = |name| h.get_str(name).map(|s| s.trim().to_owned());
        let number = |name| h.get_str(name).and_then(|s| s.trim().parse::<i64>().ok());
        let time = |name| number(name).and_then(epoch_millis);
        Provenance {
            original_topic: text(headers::ORIGINAL_TOPIC),
            original_partition: h.get(headers::ORIGINAL_PARTITION).and_then(int32),
            original_offset: h.get(headers::ORIGINAL_OFFSET).and_then(int64),
            original_timestamp: h
                .get(headers::ORIGINAL_TIMESTAMP)
                .and_then(int64)
                .filter(|&t| t >= 0),
            original_timestamp_type: text(headers::ORIGINAL_TIMESTAMP_TYPE),
            consumer_group: text(headers::ORIGINAL_CONSUMER_GROUP),
            failure_kind: h
                .get_str(headers::FAILURE_KIND)
                .and_then(|s| DeadLetterReason::parse(s.trim())),
            exception_class: text(headers::EXCEPTION_FQCN),
            error: h
                .get(headers::EXCEPTION_MESSAGE)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            attempts: number(headers::ATTEMPTS).and_then(|n| u32::try_from(n).ok()),
            first_failure: time(headers::FIRST_FAILURE_MS),
            last_failure: time(headers::LAST_FAILURE_MS),
            value_dropped_bytes: number(headers::VALUE_DROPPED_BYTES)
                .and_then(|n| u64::try_from(n).ok()),
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

/// The [`headers::REDRIVE_COUNT`] of a record (0 when absent or not a number).
pub(crate) fn redrive_count(h: &Headers) -> u32 {
    h.get_str(headers::REDRIVE_COUNT)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn is_decimal(v: &[u8]) -> bool {
    let digits = v.strip_prefix(b"-").unwrap_or(v);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

fn decimal(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A 4-byte big-endian integer (Spring's encoding), or decimal text.
fn int32(v: &[u8]) -> Option<i32> {
    if is_decimal(v) {
        return decimal(v).and_then(|n| i32::try_from(n).ok());
    }
    Some(i32::from_be_bytes(v.try_into().ok()?))
}

/// An 8-byte big-endian integer (Spring's encoding), or decimal text.
fn int64(v: &[u8]) -> Option<i64> {
    if is_decimal(v) {
        return decimal(v);
    }
    Some(i64::from_be_bytes(v.try_into().ok()?))
}

fn epoch_millis(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dead_letter::DeadLetter;
    use crate::message::RawRecord;

    #[test]
    fn reads_what_the_kafka_sink_writes() {
        let letter = DeadLetter {
            record: Arc::new(RawRecord {
                topic: "notify.v1".into(),
                partition: 3,
                offset: 42,
                key: Some(b"u-1".to_vec()),
                value: None,
                headers: Headers::new().with(headers::REDRIVE_COUNT, "2"),
                timestamp: Some(1_700_000_000_123),
                log_append_time: false,
            }),
            reason: DeadLetterReason::RetriesExhausted,
            error: "smtp said no".into(),
            attempts: 4,
            first_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_001_000),
            last_failure: UNIX_EPOCH + Duration::from_millis(1_700_000_002_500),
            group_id: "mailer".into(),
        };
        let written: Headers = super::super::kafka::letter_headers(&letter, Some(10))
            .into_iter()
            .collect();
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
    fn tolerates_other_writers() {
        // Decimal text instead of binary, Java's -1 timestamp, junk.
        let h = Headers::new()
            .with(headers::ORIGINAL_PARTITION, "7")
            .with(headers::ORIGINAL_OFFSET, "1234")
            .with(headers::ORIGINAL_TIMESTAMP, (-1i64).to_be_bytes())
            .with(headers::ATTEMPTS, "many")
            .with(headers::FAILURE_KIND, "exploded")
            .with(headers::REDRIVE_COUNT, "x");
        let p = Provenance::from_headers(&h);
        assert_eq!(p.original_partition, Some(7));
        assert_eq!(p.original_offset, Some(1234));
        assert_eq!(p.original_timestamp, None);
        assert_eq!(p.attempts, None);
        assert_eq!(p.failure_kind, None);
        assert_eq!(p.redrive_count, 0);
        assert!(!p.is_dead_letter());
        assert_eq!(p.original_coordinates(), "?/7@1234");
        assert_eq!(
            Provenance::from_headers(&Headers::new()),
            Provenance::default()
        );
    }
}
