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
//!
//! The sink trait and the letter itself are used by every consumer, so they live at the crate
//! root, not here: [`DeadLetterSink`],
//! [`DeadLetter`], [`DeadLetterReason`],
//! [`DeadLetterReceipt`], [`DeadLetterError`]
//! and the Kafka sink [`KafkaDeadLetterSink`]. This module holds
//! what only tools that read dead letters back need.

pub(crate) use crate::error::DeadLetterError;

pub mod headers;
pub(crate) mod kafka;
pub(crate) mod letter;
mod redrive;

pub use self::headers::Provenance;
pub(crate) use self::kafka::KafkaDeadLetterSink;
pub(crate) use self::letter::{
    DeadLetter, DeadLetterReason, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
pub use self::redrive::{RedriveError, RedriveRecord};

/// Error messages in dead letters are cut to this many bytes (on a UTF-8 boundary).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

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
