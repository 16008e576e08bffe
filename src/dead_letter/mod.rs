//! Dead letters: records that will not be handled, kept with everything needed to understand
//! and redrive them.
//!
//! A [`DeadLetter`] holds the original record untouched (key, value bytes — a null value stays
//! null — and headers) plus its provenance. The Kafka sink writes that provenance as headers;
//! [`headers`] lists their names, which are stable.
//!
//! To read dead letters back, [`Provenance::from_headers`] parses those headers; to publish
//! one again, [`RedriveRecord::from_dead_letter`] rebuilds the original record (provenance
//! removed, redrive count raised). The `kourier-dlt` binary (feature `cli`) is a command-line
//! tool built on them: `inspect` lists a dead-letter topic, `redrive` re-publishes selected letters with
//! crash-safe progress.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

pub use crate::error::DeadLetterError;
use crate::record::RawRecord;

pub mod headers;
mod kafka;
mod redrive;

pub use self::headers::Provenance;
pub use self::kafka::{KafkaDeadLetterSink, KafkaDeadLetterSinkBuilder};
pub use self::redrive::{RedriveError, RedriveRecord};

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
    /// Code on the record's path panicked — the handler on its last attempt (after the
    /// retries panics get by default), or the dedup-key function (dead-lettered at once: it
    /// would panic again). A bug, not an outage: fix it, then redrive.
    Panic,
}

impl DeadLetterReason {
    /// The stable name written to [`headers::FAILURE_KIND`].
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::RetriesExhausted => "retries-exhausted",
            DeadLetterReason::Panic => "panic",
        }
    }

    /// Parses a [`headers::FAILURE_KIND`] value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "decode" => Some(DeadLetterReason::Decode),
            "permanent" => Some(DeadLetterReason::Permanent),
            "retries-exhausted" => Some(DeadLetterReason::RetriesExhausted),
            "panic" => Some(DeadLetterReason::Panic),
            _ => None,
        }
    }

    pub(crate) fn fqcn(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "kourier.DecodeError",
            DeadLetterReason::Permanent => "kourier.PermanentFailure",
            DeadLetterReason::RetriesExhausted => "kourier.RetriesExhausted",
            DeadLetterReason::Panic => "kourier.Panic",
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

    /// The Kafka topics this sink writes the dead letters of `source_topic` to. The
    /// consumer checks at start that they exist (and creates them when told to), so a
    /// missing topic is an error at start rather than a partition that waits forever at the
    /// first failure. Default: none (a sink that writes elsewhere).
    fn topics_for(&self, source_topic: &str) -> Vec<String> {
        let _ = source_topic;
        Vec::new()
    }
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
            DeadLetterReason::Panic,
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
