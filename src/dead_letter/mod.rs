//! Dead letters: records that will not be handled, kept with everything needed to understand
//! and redrive them.
//!
//! A [`DeadLetter`] holds the original record untouched (key, value bytes — a null value stays
//! null — and headers) plus its provenance. The Kafka sink writes that provenance as headers;
//! [`headers`] lists their names, which are stable.
//!
//! To read dead letters back, [`Provenance::from_headers`] parses those headers; to publish
//! one again, [`RedriveRecord::from_dead_letter`] rebuilds the original record (provenance
//! removed, redrive count raised). `examples/kourier_dlt.rs` is a command-line tool built on
//! them: `inspect` lists a dead-letter topic, `redrive` re-publishes selected letters with
//! crash-safe progress.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::message::RawRecord;

mod kafka;
mod provenance;
mod redrive;

pub use self::kafka::{KafkaDeadLetterSink, KafkaDeadLetterSinkBuilder};
pub use self::provenance::Provenance;
pub use self::redrive::{RedriveError, RedriveRecord};

/// Names of the provenance headers a dead letter carries.
///
/// The `kafka_dlt-*` names and encodings are Spring Kafka's (`KafkaHeaders.DLT_*`), so Spring
/// tools can read kourier's dead letters and vice versa: partition is a 4-byte big-endian
/// integer, offset and timestamp 8-byte big-endian integers, the rest UTF-8 text.
/// The `kourier-dlt-*` headers are kourier's own, all UTF-8 text.
///
/// When a record that already carries these headers (a redriven dead letter) is dead-lettered
/// again, the old values are *replaced*, never appended, so headers do not grow.
pub mod headers {
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
    /// The error message, truncated to [`MAX_ERROR_MESSAGE_BYTES`](super::MAX_ERROR_MESSAGE_BYTES) (UTF-8).
    pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
    /// A class-like name of the failure, e.g. `kourier.RetriesExhausted` (UTF-8).
    pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
    /// `decode`, `permanent` or `retries-exhausted` (UTF-8).
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
}

/// Error messages in dead letters are cut to this many bytes (on a UTF-8 boundary).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The record could not be decoded (a poison pill); the handler never ran.
    Decode,
    /// The handler returned a permanent failure.
    Permanent,
    /// Transient failures used up the retry policy.
    RetriesExhausted,
}

impl DeadLetterReason {
    /// The stable name written to [`headers::FAILURE_KIND`].
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::RetriesExhausted => "retries-exhausted",
        }
    }

    /// Parses a [`headers::FAILURE_KIND`] value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "decode" => Some(DeadLetterReason::Decode),
            "permanent" => Some(DeadLetterReason::Permanent),
            "retries-exhausted" => Some(DeadLetterReason::RetriesExhausted),
            _ => None,
        }
    }

    pub(crate) fn fqcn(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "kourier.DecodeError",
            DeadLetterReason::Permanent => "kourier.PermanentFailure",
            DeadLetterReason::RetriesExhausted => "kourier.RetriesExhausted",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record given up on, with its provenance.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original record, untouched.
    pub record: Arc<RawRecord>,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The last error's message (the sink bounds its size).
    pub error: String,
    /// Attempts made (0 for a decode failure: the handler never ran).
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
    /// The consumer group that gave up.
    pub group_id: String,
}

/// Where a dead letter was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterReceipt {
    /// The dead-letter topic (or another destination name).
    pub topic: String,
    /// Partition written to, if the destination has partitions.
    pub partition: Option<i32>,
    /// Offset written at, if known.
    pub offset: Option<i64>,
}

/// A dead-letter write failed. The consumer retries it with back-off, without end, and does
/// not commit past the record meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter write of {coordinates} to {destination} failed")]
pub struct DeadLetterError {
    /// The source record's `topic/partition@offset`.
    pub coordinates: String,
    /// The destination's name.
    pub destination: String,
    /// The underlying error.
    #[source]
    pub source: BoxError,
}

/// Receives dead letters. Object-safe: use it as `Arc<dyn DeadLetterSink>`.
///
/// `send` returns only once the letter is durably stored (for Kafka: acknowledged by the
/// broker); the consumer commits the source offset only after that.
#[async_trait]
pub trait DeadLetterSink: Send + Sync + fmt::Debug + 'static {
    /// Writes one dead letter.
    ///
    /// # Errors
    /// A [`DeadLetterError`] when the letter was not stored; the consumer retries.
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError>;
}

/// Cuts `message` to at most `max` bytes on a char boundary.
pub(crate) fn truncate_utf8(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_round_trip() {
        for r in [
            DeadLetterReason::Decode,
            DeadLetterReason::Permanent,
            DeadLetterReason::RetriesExhausted,
        ] {
            assert_eq!(DeadLetterReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(DeadLetterReason::parse("other"), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
