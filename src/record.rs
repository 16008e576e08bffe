//! Records as they come from Kafka: [`RawRecord`], its [`Headers`], and the one place that
//! reads them out of librdkafka.

use rdkafka::Timestamp;
use rdkafka::message::{BorrowedMessage, Message as _};

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
/// Dead letters and the engine work with this; handlers see a typed
/// [`Message`](crate::Message).
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
    /// Starts a record of `topic` by hand, e.g. for [`Message::for_test`](crate::Message::for_test)
    /// or a custom sink's tests: partition 0, offset 0, null key and value, no headers, no
    /// timestamp until set.
    ///
    /// ```
    /// use kourier::RawRecord;
    ///
    /// let record = RawRecord::builder("orders.v1")
    ///     .partition(2)
    ///     .offset(7)
    ///     .key("customer-42")
    ///     .value(r#"{"order_id":"o-1"}"#)
    ///     .header("event-id", "e-1")
    ///     .build();
    /// assert_eq!(record.coordinates(), "orders.v1/2@7");
    /// assert_eq!(record.headers.get_str("event-id"), Some("e-1"));
    /// ```
    pub fn builder(topic: impl Into<String>) -> RawRecordBuilder {
        RawRecordBuilder {
            record: RawRecord {
                topic: topic.into(),
                partition: 0,
                offset: 0,
                key: None,
                value: None,
                headers: Headers::new(),
                timestamp: None,
                log_append_time: false,
            },
        }
    }

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
        to_raw(message)
    }
}

/// Builds a [`RawRecord`] by hand; start with [`RawRecord::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build()` is called"]
pub struct RawRecordBuilder {
    record: RawRecord,
}

impl RawRecordBuilder {
    /// The partition. Default 0.
    pub fn partition(mut self, partition: i32) -> Self {
        self.record.partition = partition;
        self
    }

    /// The offset. Default 0.
    pub fn offset(mut self, offset: i64) -> Self {
        self.record.offset = offset;
        self
    }

    /// The key. Default: a null key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.record.key = Some(key.into());
        self
    }

    /// The value bytes (e.g. the JSON the codec decodes). Default: a null value.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.record.value = Some(value.into());
        self
    }

    /// Appends a header with a value (names may repeat).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.record.headers.push(Header::new(key, value));
        self
    }

    /// Appends a header with a null value.
    pub fn null_header(mut self, key: impl Into<String>) -> Self {
        self.record.headers.push(Header::null(key));
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.record.headers = headers;
        self
    }

    /// The producer's timestamp, in milliseconds since the epoch. Default: none.
    pub fn timestamp(mut self, millis: i64) -> Self {
        self.record.timestamp = Some(millis);
        self.record.log_append_time = false;
        self
    }

    /// The broker's log-append timestamp, in milliseconds since the epoch.
    pub fn log_append_time(mut self, millis: i64) -> Self {
        self.record.timestamp = Some(millis);
        self.record.log_append_time = true;
        self
    }

    /// The record.
    pub fn build(self) -> RawRecord {
        self.record
    }
}

impl From<RawRecordBuilder> for RawRecord {
    fn from(builder: RawRecordBuilder) -> Self {
        builder.build()
    }
}

/// Reads a record's headers as bytes. rdkafka 0.39's header getters panic on a header name
/// that is not UTF-8 (any producer may send one), so the names are read through librdkafka
/// directly and converted lossily.
#[allow(unsafe_code)]
fn read_headers(m: &BorrowedMessage<'_>) -> Headers {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, c_char, c_void};

    let mut headers = Headers::new();
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a valid message for the lifetime of `m`; librdkafka fills `hdrs`
    // with a pointer owned by the message (valid while `m` lives) or leaves it null.
    let err = unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return headers;
    }
    // SAFETY: `hdrs` is a valid header list (checked non-null above).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `idx < count`; librdkafka writes pointers into the header list, which
        // stays valid while `m` lives; we copy them out before returning.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka header names are NUL-terminated.
        let key = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let value = (!value.is_null()).then(|| {
            // SAFETY: `value` points to `size` readable bytes owned by the header list.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
        });
        headers.push(Header { key, value });
    }
    headers
}

fn to_raw(m: &BorrowedMessage<'_>) -> RawRecord {
    let (timestamp, log_append_time) = match m.timestamp() {
        Timestamp::NotAvailable => (None, false),
        Timestamp::CreateTime(t) => (Some(t), false),
        Timestamp::LogAppendTime(t) => (Some(t), true),
    };
    RawRecord {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: read_headers(m),
        timestamp,
        log_append_time,
    }
}
