//! Owned records handed to handlers.

use std::sync::Arc;

use crate::trace_context::TraceContext;

/// One record header: a name and an optional (possibly binary) value.
///
/// Kafka header names are strings for the Java client; a name that is not valid UTF-8 (only
/// possible from non-Java producers) is converted lossily (`U+FFFD` for invalid bytes).
/// Values are kept as raw bytes; a null value stays `None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// The header's name.
    pub key: String,
    /// The header's value; `None` is a null value (distinct from an empty one).
    pub value: Option<Vec<u8>>,
}

impl Header {
    /// A header with a value.
    pub fn new(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Header {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// A header with a null value.
    pub fn null(key: impl Into<String>) -> Self {
        Header {
            key: key.into(),
            value: None,
        }
    }
}

/// The ordered headers of a record. Names may repeat, as in Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Appends a header (names may repeat).
    pub fn push(&mut self, header: Header) {
        self.0.push(header);
    }

    /// Appends a header and returns `self`, for chaining.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.push(Header::new(key, value));
        self
    }

    /// The value of the *last* header named `key`, as Kafka clients conventionally read it.
    /// `None` when there is no such header or its value is null.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .rev()
            .find(|h| h.key == key)
            .and_then(|h| h.value.as_deref())
    }

    /// The value of the last header named `key` as UTF-8 text, if it is valid UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Removes every header whose name satisfies `drop`.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&str) -> bool) {
        self.0.retain(|h| !drop(&h.key));
    }

    /// Iterates over the headers in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Header> {
        self.0.iter()
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total bytes of names and values, used for buffer accounting.
    pub(crate) fn byte_len(&self) -> usize {
        self.0
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

impl FromIterator<Header> for Headers {
    fn from_iter<I: IntoIterator<Item = Header>>(iter: I) -> Self {
        Headers(iter.into_iter().collect())
    }
}

impl IntoIterator for Headers {
    type Item = Header;
    type IntoIter = std::vec::IntoIter<Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = &'a Header;
    type IntoIter = std::slice::Iter<'a, Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A record as it came from Kafka, owned and undecoded.
///
/// Dead letters and the engine work with this; handlers see a typed [`Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset in the source partition.
    pub offset: i64,
    /// Record key; `None` for a null key.
    pub key: Option<Vec<u8>>,
    /// Record value; `None` for a null value (a tombstone).
    pub value: Option<Vec<u8>>,
    /// Record headers.
    pub headers: Headers,
    /// Record timestamp in milliseconds since the epoch, if the record has one.
    pub timestamp: Option<i64>,
    /// Whether the timestamp was set by the broker (`LogAppendTime`) rather than the producer.
    pub log_append_time: bool,
}

impl RawRecord {
    /// Approximate memory this record holds, for buffer limits.
    pub(crate) fn byte_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self.headers.byte_len()
            + self.topic.len()
            + 64
    }

    /// `topic/partition@offset`, for logs and errors.
    pub fn coordinates(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }

    /// Copies a record received by an rdkafka consumer, e.g. to read a dead-letter topic
    /// with [`Provenance`](crate::dead_letter::Provenance).
    ///
    /// Header names that are not UTF-8 are converted lossily instead of panicking, as
    /// rdkafka 0.39's own header getters would.
    pub fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> RawRecord {
        crate::consumer::to_raw(message)
    }

    /// The W3C trace context in the record's `traceparent` / `tracestate` headers, if any.
    pub fn trace_context(&self) -> Option<TraceContext> {
        TraceContext::from_headers(&self.headers)
    }
}

/// A decoded record, as a [`Handler`](crate::Handler) receives it.
///
/// Besides the typed event it carries the record's coordinates, key, headers and timestamp,
/// and which attempt this is (1 for the first try).
#[derive(Debug, Clone)]
pub struct Message<T> {
    raw: Arc<RawRecord>,
    attempt: u32,
    event: T,
}

impl<T> Message<T> {
    pub(crate) fn new(raw: Arc<RawRecord>, attempt: u32, event: T) -> Self {
        Message {
            raw,
            attempt,
            event,
        }
    }

    /// Builds a message by hand, e.g. to unit-test a handler without Kafka.
    pub fn for_test(raw: RawRecord, attempt: u32, event: T) -> Self {
        Message::new(Arc::new(raw), attempt, event)
    }

    pub(crate) fn set_attempt(&mut self, attempt: u32) {
        self.attempt = attempt;
    }

    /// The decoded event.
    pub fn event(&self) -> &T {
        &self.event
    }

    /// Takes the decoded event.
    pub fn into_event(self) -> T {
        self.event
    }

    /// Source topic.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// Source partition.
    pub fn partition(&self) -> i32 {
        self.raw.partition
    }

    /// Offset in the source partition.
    pub fn offset(&self) -> i64 {
        self.raw.offset
    }

    /// The record key, `None` for a null key.
    pub fn key(&self) -> Option<&[u8]> {
        self.raw.key.as_deref()
    }

    /// The record key as UTF-8 text, if it is present and valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The record headers.
    pub fn headers(&self) -> &Headers {
        &self.raw.headers
    }

    /// Record timestamp in milliseconds since the epoch.
    pub fn timestamp(&self) -> Option<i64> {
        self.raw.timestamp
    }

    /// Which attempt this is: 1 for the first try, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The undecoded record.
    pub fn raw(&self) -> &RawRecord {
        &self.raw
    }

    /// The W3C trace context the record carries (its `traceparent` and `tracestate`
    /// headers), if any: the publisher's span. See [`TraceContext`].
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.raw.trace_context()
    }
}
