//! Names of the headers a tier record carries on top of the dead-letter provenance headers
//! ([`dead_letter::headers`](crate::dead_letter::headers)), all decimal UTF-8 text.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::dead_letter::headers as dlt;
use crate::record::{Header, Headers};

pub use crate::dead_letter::headers::tier::{ALL, DEFERRED, DUE_MS, FAILED_STAGES, HOP, TIER};

/// Where a record came from: its source record's coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) log_append_time: bool,
}

/// The failure history a forward carries.
#[derive(Debug, Clone)]
pub(crate) struct History {
    pub(crate) kind: &'static str,
    pub(crate) error: String,
    pub(crate) attempts: u32,
    pub(crate) first: SystemTime,
    pub(crate) last: SystemTime,
    /// Stages whose attempts were used up ([`FAILED_STAGES`]).
    pub(crate) stages: u32,
}

pub(crate) fn millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The tier headers of one forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    /// The tier it goes to (1-based).
    pub(crate) tier: u32,
    /// When it may run.
    pub(crate) due: SystemTime,
    /// Moved to keep its key's order, not because it failed.
    pub(crate) deferred: bool,
    /// Forwards since it left its source topic ([`HOP`]).
    pub(crate) hop: u32,
}

/// Whether a header is one of the tier or provenance headers a forward replaces.
pub(crate) fn is_replaced(name: &[u8]) -> bool {
    ALL.iter().any(|n| n.as_bytes() == name) || dlt::ALL.iter().any(|n| n.as_bytes() == name)
}

/// The headers of a forwarded record: the record's own (minus old tier and provenance
/// headers), then provenance, then the tier headers.
pub(crate) fn forward_headers(
    own: &Headers,
    origin: &Origin,
    group: &str,
    history: Option<&History>,
    stamp: Stamp,
) -> Vec<Header> {
    let mut out: Vec<Header> = own
        .iter()
        .filter(|h| !is_replaced(h.key()))
        .cloned()
        .collect();
    out.push(Header::new(dlt::ORIGINAL_TOPIC, origin.topic.as_bytes()));
    out.push(Header::new(
        dlt::ORIGINAL_PARTITION,
        origin.partition.to_be_bytes().to_vec(),
    ));
    out.push(Header::new(
        dlt::ORIGINAL_OFFSET,
        origin.offset.to_be_bytes().to_vec(),
    ));
    out.push(Header::new(
        dlt::ORIGINAL_TIMESTAMP,
        origin.timestamp.unwrap_or(-1).to_be_bytes().to_vec(),
    ));
    let kind = match (origin.timestamp, origin.log_append_time) {
        (None, _) => "NoTimestampType",
        (Some(_), true) => "LogAppendTime",
        (Some(_), false) => "CreateTime",
    };
    out.push(Header::new(dlt::ORIGINAL_TIMESTAMP_TYPE, kind));
    out.push(Header::new(dlt::ORIGINAL_CONSUMER_GROUP, group));
    if let Some(h) = history {
        let error = crate::dead_letter::truncate_utf8(
            &h.error,
            crate::dead_letter::MAX_ERROR_MESSAGE_BYTES,
        );
        out.push(Header::new(dlt::EXCEPTION_MESSAGE, error));
        out.push(Header::new(dlt::FAILURE_KIND, h.kind));
        out.push(Header::new(dlt::ATTEMPTS, h.attempts.to_string()));
        out.push(Header::new(
            dlt::FIRST_FAILURE_MS,
            millis(h.first).to_string(),
        ));
        out.push(Header::new(
            dlt::LAST_FAILURE_MS,
            millis(h.last).to_string(),
        ));
        out.push(Header::new(FAILED_STAGES, h.stages.to_string()));
    }
    out.push(Header::new(TIER, stamp.tier.to_string()));
    out.push(Header::new(HOP, stamp.hop.to_string()));
    out.push(Header::new(DUE_MS, millis(stamp.due).to_string()));
    if stamp.deferred {
        out.push(Header::new(DEFERRED, "true"));
    }
    out
}
