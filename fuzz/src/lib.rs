//! What the fuzz targets share: a fuzzer's bytes as a record read back from a topic, with
//! headers drawn from the names kourier reads (or any bytes) and any values.

use arbitrary::Arbitrary;
use kourier::dead_letter::headers as dlt;
use kourier::tiers::headers as tier;
use kourier::{Header, Headers, RawRecord};

/// Every header name kourier parses, and two it passes through.
pub const NAMES: &[&str] = &[
    dlt::ORIGINAL_TOPIC,
    dlt::ORIGINAL_PARTITION,
    dlt::ORIGINAL_OFFSET,
    dlt::ORIGINAL_TIMESTAMP,
    dlt::ORIGINAL_TIMESTAMP_TYPE,
    dlt::ORIGINAL_CONSUMER_GROUP,
    dlt::EXCEPTION_MESSAGE,
    dlt::EXCEPTION_FQCN,
    dlt::FAILURE_KIND,
    dlt::ATTEMPTS,
    dlt::FIRST_FAILURE_MS,
    dlt::LAST_FAILURE_MS,
    dlt::VALUE_DROPPED_BYTES,
    dlt::KEY_DROPPED_BYTES,
    dlt::HEADERS_DROPPED,
    dlt::REDRIVE_COUNT,
    tier::TIER,
    tier::DUE_MS,
    tier::DEFERRED,
    tier::FAILED_STAGES,
    "event-id",
    "traceparent",
];

/// A header name: one kourier reads (most of the time), or any bytes.
#[derive(Debug, Arbitrary)]
pub enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

/// A record as any producer could write it.
#[derive(Debug, Arbitrary)]
pub struct Input {
    pub headers: Vec<(Name, Option<Vec<u8>>)>,
    pub key: Option<Vec<u8>>,
    pub timestamp: Option<i64>,
    pub log_append_time: bool,
    pub partition: i32,
    pub offset: i64,
    /// Extra knobs the targets use (destination, delay, clock, ...).
    pub knobs: (u64, u64, u8),
    pub destination: Option<String>,
}

impl Input {
    pub fn headers(&self) -> Headers {
        self.headers
            .iter()
            .map(|(name, value)| {
                let name = match name {
                    Name::Known(i) => NAMES[usize::from(*i) % NAMES.len()].as_bytes().to_vec(),
                    Name::Raw(bytes) => bytes.clone(),
                };
                match value {
                    Some(v) => Header::new(name, v.clone()),
                    None => Header::null(name),
                }
            })
            .collect()
    }

    /// The record, at a position a broker could give it (a partition and an offset are
    /// never negative: they come from the broker, not from a header).
    pub fn record(&self, topic: &str) -> RawRecord {
        // A struct literal is not allowed outside kourier (`RawRecord` is `#[non_exhaustive]`).
        let mut record = RawRecord::builder(topic)
            .partition(self.partition.saturating_abs())
            .offset(self.offset.saturating_abs())
            .value("{}")
            .headers(self.headers())
            .build();
        record.key = self.key.clone().map(Into::into);
        record.timestamp = self.timestamp;
        record.log_append_time = self.log_append_time;
        record
    }
}
