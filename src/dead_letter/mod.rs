//! Dead letters: records that will not be handled, kept with everything needed to understand
//! and redrive them.
//!
//! A [`DeadLetter`] holds the original record untouched (key, value bytes — a null value stays
//! null — and headers) plus its provenance. The Kafka sink writes that provenance as headers;
//! [`headers`] lists their names, which are stable.
//!
//! To read dead letters back, [`Provenance::from_headers`] parses those headers; to publish
//! one again, [`RedriveRecord::from_dead_letter`] rebuilds the original record (provenance
//! removed, redrive count raised, [`headers::REDRIVEN_FROM`] naming the letter).
//!
//! [`DeadLetterTopic`] does the rest for a dead-letter topic on a cluster: it reads the
//! letters a [`LetterSelector`] selects — by place (partition and offset, one or a range),
//! header value (an event id), key, failure kind, time — and redrives them
//! ([`Redrive`]): stateless by default (nothing committed; the [`RedriveReport`] lists
//! each letter republished with its place and where it landed), resumable with a consumer
//! group tied to the selector, a letter that cannot be redriven (its destination missing)
//! refused with its reason while the others go on. The `kourier-dlt` binary (feature
//! `cli`) is the command line for it: `inspect` lists (and groups by event) the letters of
//! a dead-letter topic, `redrive` republishes a selection.
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
mod select;
mod topic;

pub use self::headers::Provenance;
pub(crate) use self::kafka::KafkaDeadLetterSink;
pub(crate) use self::letter::{
    DeadLetter, DeadLetterReason, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
pub use self::redrive::{RedriveError, RedriveRecord};
pub use self::select::{LetterRange, LetterRangeError, LetterSelector};
pub use self::topic::{
    DeadLetterTopic, DeadLetterTopicError, LetterPlace, Letters, Redrive, RedriveReport,
    RedriveStopped, Redriven, Refused,
};

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
