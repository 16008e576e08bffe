//! Records as they come from Kafka: [`RawRecord`], its [`Headers`], the [`RecordBytes`] they
//! are made of, and the one place that reads headers out of librdkafka and writes them into
//! it, names as bytes.

use std::borrow::{Borrow, Cow};
use std::cell::RefCell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, Range};
use std::sync::Arc;

use rdkafka::Timestamp;
use rdkafka::message::{BorrowedHeaders, Message, OwnedHeaders};
use smallvec::SmallVec;

/// Bytes of a record — its key, its value, a header's name or value: a read-only, cheaply
/// cloned view into one shared buffer. Use it as a `&[u8]` (it derefs to one).
///
/// A record consumed from Kafka is copied out of librdkafka into a single allocation that
/// holds its key, value and every header name and value; each of them is a view into it, so
/// a record costs one allocation for all its bytes and cloning any of them (or the record)
/// copies nothing. A view keeps that whole buffer alive: to keep a small part of a large
/// record for long, copy it out (`.to_vec()`).
///
/// ```
/// use kourier::RecordBytes;
///
/// let bytes = RecordBytes::from("customer-42");
/// assert_eq!(&bytes[..8], b"customer");
/// assert_eq!(bytes, "customer-42");
/// assert_eq!(bytes.to_vec(), b"customer-42".to_vec());
/// ```
#[derive(Clone)]
pub struct RecordBytes {
    buffer: Arc<[u8]>,
    range: Range<usize>,
}

impl RecordBytes {
    /// No bytes.
    pub fn new() -> Self {
        RecordBytes::from(Vec::new())
    }

    /// The bytes, as a slice.
    pub fn as_slice(&self) -> &[u8] {
        &self.buffer[self.range.clone()]
    }

    /// A view of `range` of `buffer` (in bounds: checked by the caller).
    fn view(buffer: &Arc<[u8]>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= buffer.len());
        RecordBytes {
            buffer: Arc::clone(buffer),
            range,
        }
    }
}

impl Default for RecordBytes {
    fn default() -> Self {
        RecordBytes::new()
    }
}

impl Deref for RecordBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for RecordBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Borrow<[u8]> for RecordBytes {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Shown as a byte string (`b"..."`).
impl fmt::Debug for RecordBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.as_slice().escape_ascii())
    }
}

impl PartialEq for RecordBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for RecordBytes {}

impl Hash for RecordBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialOrd for RecordBytes {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RecordBytes {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

macro_rules! eq_bytes {
    ($($t:ty => $conv:expr),* $(,)?) => {$(
        impl PartialEq<$t> for RecordBytes {
            fn eq(&self, other: &$t) -> bool {
                let conv: for<'a> fn(&'a $t) -> &'a [u8] = $conv;
                self.as_slice() == conv(other)
            }
        }
        impl PartialEq<RecordBytes> for $t {
            fn eq(&self, other: &RecordBytes) -> bool {
                other == self
            }
        }
    )*};
}

eq_bytes!(
    [u8] => |o| o,
    &[u8] => |o| o,
    Vec<u8> => |o| o,
    str => |o| o.as_bytes(),
    &str => |o| o.as_bytes(),
    String => |o| o.as_bytes(),
);

impl<const N: usize> PartialEq<[u8; N]> for RecordBytes {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.as_slice() == other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for RecordBytes {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.as_slice() == *other
    }
}

impl From<Vec<u8>> for RecordBytes {
    fn from(bytes: Vec<u8>) -> Self {
        let buffer: Arc<[u8]> = Arc::from(bytes);
        let range = 0..buffer.len();
        RecordBytes { buffer, range }
    }
}

impl From<&[u8]> for RecordBytes {
    fn from(bytes: &[u8]) -> Self {
        let buffer: Arc<[u8]> = Arc::from(bytes);
        let range = 0..buffer.len();
        RecordBytes { buffer, range }
    }
}

impl<const N: usize> From<&[u8; N]> for RecordBytes {
    fn from(bytes: &[u8; N]) -> Self {
        RecordBytes::from(&bytes[..])
    }
}

impl From<&str> for RecordBytes {
    fn from(text: &str) -> Self {
        RecordBytes::from(text.as_bytes())
    }
}

impl From<String> for RecordBytes {
    fn from(text: String) -> Self {
        RecordBytes::from(text.into_bytes())
    }
}

impl From<RecordBytes> for Vec<u8> {
    fn from(bytes: RecordBytes) -> Self {
        bytes.as_slice().to_vec()
    }
}

/// One record header: a name and an optional (possibly binary) value, both kept as the exact
/// bytes the producer sent.
///
/// Java clients write header names as UTF-8 strings, but the Kafka protocol allows any bytes,
/// and other producers send names that are not UTF-8, empty, or hold NUL bytes. kourier
/// never rewrites them: the handler, the dead letter and a redrive see the same bytes.
/// [`key_str`](Self::key_str) is the name as text when it is UTF-8, and
/// [`key_escaped`](Self::key_escaped) a lossless text form for logs and displays.
/// A null value stays `None` (distinct from an empty one).
///
/// ```
/// use kourier::Header;
///
/// let text = Header::new("event-id", "e-1");
/// assert_eq!((text.key(), text.key_str()), (&b"event-id"[..], Some("event-id")));
/// assert!(text.is_named("event-id"));
///
/// let binary = Header::new(b"\xc3(x".to_vec(), b"\xff\xfe".to_vec());
/// assert_eq!(binary.key(), b"\xc3(x");
/// assert_eq!(binary.key_str(), None);
/// assert_eq!(binary.key_escaped(), r"\xc3(x");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// The header's name, as raw bytes (see [`key_str`](Self::key_str) for text).
    pub key: RecordBytes,
    /// The header's value; `None` is a null value (distinct from an empty one).
    pub value: Option<RecordBytes>,
}

impl Header {
    /// A header with a value. The name is text (`&str`, `String`) or raw bytes (`&[u8]`,
    /// `Vec<u8>`, `b"..."`).
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Header {
            key: RecordBytes::from(key.into()),
            value: Some(RecordBytes::from(value.into())),
        }
    }

    /// A header with a null value.
    pub fn null(key: impl Into<Vec<u8>>) -> Self {
        Header {
            key: RecordBytes::from(key.into()),
            value: None,
        }
    }

    /// The name's bytes, exactly as produced.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The name as UTF-8 text, or `None` when it is not valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }

    /// Whether the header is called `name` (text or bytes; compared byte for byte).
    pub fn is_named(&self, name: impl AsRef<[u8]>) -> bool {
        *self.key == *name.as_ref()
    }

    /// The value's bytes; `None` for a null value.
    pub fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// The name as text for logs and displays, without losing anything: an ordinary name
    /// (printable UTF-8 without `\`) is returned as it is; otherwise every byte that is not
    /// part of valid UTF-8 becomes `\xNN`, a backslash `\\`, and control characters `\0`,
    /// `\t`, `\n`, `\r` or `\u{NN}`. Distinct names never look alike, unlike a lossy
    /// conversion (`U+FFFD`).
    pub fn key_escaped(&self) -> Cow<'_, str> {
        escape_bytes(&self.key)
    }
}

/// Shows the name as [`Header::key_escaped`] does and the value as a byte string, so that
/// binary headers stay readable.
impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Quoted<'a>(Cow<'a, str>);
        impl fmt::Debug for Quoted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"{}\"", self.0.replace('"', "\\\""))
            }
        }
        struct ByteString<'a>(&'a [u8]);
        impl fmt::Debug for ByteString<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "b\"{}\"", self.0.escape_ascii())
            }
        }
        f.debug_struct("Header")
            .field("key", &Quoted(self.key_escaped()))
            .field("value", &self.value.as_deref().map(ByteString))
            .finish()
    }
}

/// `bytes` as text, escaped where needed so that nothing is lost (see
/// [`Header::key_escaped`]).
pub(crate) fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    let plain = |c: char| c != '\\' && !c.is_control();
    if let Ok(text) = std::str::from_utf8(bytes)
        && text.chars().all(plain)
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\0' => out.push_str("\\0"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    Cow::Owned(out)
}

/// Headers a record holds without an allocation of their own (most records carry one or
/// two: an event id, a trace context).
const INLINE_HEADERS: usize = 2;

/// The ordered headers of a record. Names may repeat, as in Kafka.
///
/// Names are bytes ([`Header::key`]); lookups take a name as text or bytes and compare byte
/// for byte.
///
/// ```
/// use kourier::Headers;
///
/// let headers = Headers::new()
///     .with("event-id", "e-1")
///     .with(b"\xff\xfe".to_vec(), "binary name")
///     .with("event-id", "e-2");
/// assert_eq!(headers.get_str("event-id"), Some("e-2"), "the last one counts");
/// assert_eq!(headers.get(b"\xff\xfe"), Some(&b"binary name"[..]));
/// assert_eq!(headers.get_all("event-id").count(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(SmallVec<[Header; INLINE_HEADERS]>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(SmallVec::new())
    }

    /// Appends a header (names may repeat).
    pub fn push(&mut self, header: Header) {
        self.0.push(header);
    }

    /// Appends a header and returns `self`, for chaining. The name is text or bytes.
    #[must_use]
    pub fn with(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.push(Header::new(key, value));
        self
    }

    /// The value of the *last* header named `name` (text or bytes), as Kafka clients
    /// conventionally read it. `None` when there is no such header or its value is null.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        let name = name.as_ref();
        self.0
            .iter()
            .rev()
            .find(|h| *h.key == *name)
            .and_then(|h| h.value.as_deref())
    }

    /// The value of the last header named `name` as UTF-8 text, if it is valid UTF-8.
    pub fn get_str(&self, name: impl AsRef<[u8]>) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The values of every header named `name`, in order (`None` for a null value).
    pub fn get_all(&self, name: impl AsRef<[u8]>) -> impl Iterator<Item = Option<&[u8]>> {
        self.0
            .iter()
            .filter(move |h| *h.key == *name.as_ref())
            .map(|h| h.value.as_deref())
    }

    /// Removes every header named `name` (text or bytes); returns how many there were.
    pub fn remove(&mut self, name: impl AsRef<[u8]>) -> usize {
        let before = self.0.len();
        self.0.retain(|h| *h.key != *name.as_ref());
        before - self.0.len()
    }

    /// Removes every header whose name (its bytes) satisfies `drop`.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&[u8]) -> bool) {
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

    /// The headers as rdkafka's [`OwnedHeaders`], names and values byte for byte, e.g. for a
    /// record you produce yourself with rdkafka (`FutureRecord::headers`). rdkafka's own
    /// `OwnedHeaders::insert` takes names as `&str`, so it cannot write a name that is not
    /// UTF-8; this can.
    pub fn to_rdkafka(&self) -> OwnedHeaders {
        owned_headers(self.0.iter())
    }

    /// Copies headers librdkafka holds, names and values byte for byte: those of a record
    /// you consumed with rdkafka yourself (`message.headers()`), or an [`OwnedHeaders`]
    /// (`owned.as_borrowed()`). Unlike rdkafka 0.39's own getters, a name that is not UTF-8
    /// does not panic and one holding NUL bytes is not cut short.
    pub fn from_rdkafka(headers: &BorrowedHeaders) -> Headers {
        read_header_list(headers)
    }

    /// Total bytes of names and values, used for buffer accounting.
    pub(crate) fn byte_len(&self) -> usize {
        self.0
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
            .sum()
    }
}

impl From<&Headers> for OwnedHeaders {
    fn from(headers: &Headers) -> Self {
        headers.to_rdkafka()
    }
}

impl From<&BorrowedHeaders> for Headers {
    fn from(headers: &BorrowedHeaders) -> Self {
        Headers::from_rdkafka(headers)
    }
}

impl From<&OwnedHeaders> for Headers {
    fn from(headers: &OwnedHeaders) -> Self {
        Headers::from_rdkafka(headers.as_borrowed())
    }
}

impl From<Vec<Header>> for Headers {
    fn from(headers: Vec<Header>) -> Self {
        Headers(SmallVec::from_vec(headers))
    }
}

impl FromIterator<Header> for Headers {
    fn from_iter<I: IntoIterator<Item = Header>>(iter: I) -> Self {
        Headers(iter.into_iter().collect())
    }
}

impl Extend<Header> for Headers {
    fn extend<I: IntoIterator<Item = Header>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl IntoIterator for Headers {
    type Item = Header;
    type IntoIter = std::vec::IntoIter<Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
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
///
/// `#[non_exhaustive]`: a record may carry more of what Kafka sends (a leader epoch, say) in
/// a later version. Its fields stay public to read and to change; outside kourier, build one
/// with [`RawRecord::builder`] (or [`RawRecord::from_message`]) rather than a struct
/// literal, and change one with `let mut r = record.clone(); r.offset = 8;` rather than
/// `RawRecord { offset: 8, ..record }`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawRecord {
    /// Source topic. Records of one topic share one copy of its name.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Offset in the source partition.
    pub offset: i64,
    /// Record key; `None` for a null key.
    pub key: Option<RecordBytes>,
    /// Record value; `None` for a null value (a tombstone).
    pub value: Option<RecordBytes>,
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
                topic: Arc::from(topic.into()),
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

    /// The length of the buffer its bytes live in (a consumed record's key, value and
    /// headers share one: [`RawRecord::from_message`]), read without walking its headers;
    /// for a record built otherwise, the length of one of its buffers.
    pub(crate) fn buffer_len(&self) -> usize {
        self.value
            .as_ref()
            .or(self.key.as_ref())
            .or_else(|| self.headers.iter().next().map(|h| &h.key))
            .map_or(0, |b| b.buffer.len())
    }

    /// [`byte_len`](Self::byte_len) of a record read by [`RawRecord::from_message`], whose
    /// key, value and headers share one buffer: read off that buffer's length, without
    /// walking the headers.
    pub(crate) fn consumed_byte_len(&self) -> usize {
        let len = self.charged(self.buffer_len());
        debug_assert_eq!(
            len,
            self.byte_len(),
            "a consumed record's bytes share one buffer"
        );
        len
    }

    /// Approximate memory this record holds, for buffer limits.
    pub(crate) fn byte_len(&self) -> usize {
        self.charged(
            self.key.as_ref().map_or(0, |k| k.len())
                + self.value.as_ref().map_or(0, |v| v.len())
                + self.headers.byte_len(),
        )
    }

    /// What the buffer charges a record whose key, value and headers hold `bytes`: those,
    /// its topic name and 64.
    fn charged(&self, bytes: usize) -> usize {
        bytes + self.topic.len() + 64
    }

    /// `topic/partition@offset`, for logs and errors.
    pub fn coordinates(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }

    /// Copies a record received by an rdkafka consumer, e.g. to read a dead-letter topic
    /// with [`Provenance`](crate::dead_letter::Provenance).
    ///
    /// One allocation holds the key, the value and every header name and value (see
    /// [`RecordBytes`]); the topic name is shared with the records of the same topic copied
    /// before on this thread.
    ///
    /// Header names are copied byte for byte: not UTF-8, empty or holding NUL bytes, they
    /// stay as produced (rdkafka 0.39's own header getters panic on the first and cut the
    /// last short).
    pub fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> RawRecord {
        to_raw(message)
    }

    /// Copies a record read from any of librdkafka's consumer queues (see
    /// [`from_message`](Self::from_message)).
    pub(crate) fn from_consumed<M: Message<Headers = BorrowedHeaders>>(message: &M) -> RawRecord {
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
        self.record.key = Some(RecordBytes::from(key.into()));
        self
    }

    /// The value bytes (e.g. the JSON the codec decodes). Default: a null value.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.record.value = Some(RecordBytes::from(value.into()));
        self
    }

    /// Appends a header with a value (names may repeat; text or bytes).
    pub fn header(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.record.headers.push(Header::new(key, value));
        self
    }

    /// Appends a header with a null value.
    pub fn null_header(mut self, key: impl Into<Vec<u8>>) -> Self {
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

// ───────────── the one place that touches librdkafka's headers directly ─────────────
//
// rdkafka 0.39 reads header names with `CStr::to_str().unwrap()` (a name that is not UTF-8
// panics, and one holding a NUL byte is cut short) and writes them from `&str` (it cannot
// write any other name). Kafka header names are bytes, so kourier reads and writes them
// through librdkafka's C API here, and nowhere else.

/// librdkafka's header item, `rd_kafka_header_t` (src/rdkafka_header.h), up to its name: one
/// allocation holds these fields, then the name and a NUL, then the value and a NUL.
/// Reviewed in the source of the bundled librdkafka 2.12.1, and checked at run time in
/// [`header_name_len`].
#[repr(C)]
struct HeaderItemPrefix {
    /// `rkhdr_ser_size`: the header's serialized size.
    ser_size: usize,
    /// `rkhdr_value_size`: the value's length.
    value_size: usize,
    /// `rkhdr_name_size`: the name's length, NUL bytes in it included.
    name_size: usize,
    /// `rkhdr_value`: the value, or null for a null value.
    value: *const std::ffi::c_char,
}

/// librdkafka versions whose header item is known to be laid out as [`HeaderItemPrefix`]
/// says: 2.12.x, the bundled one. Any other (a newer bundle, or an older system library with
/// rdkafka's `dynamic-linking`) reads a name up to its first NUL until its
/// `rdkafka_header.h` has been reviewed and this range extended; the unit test
/// `the_layout_check_accepts_the_bundled_librdkafka` and tests/header_bytes.rs fail
/// meanwhile, so an upgrade cannot drop bytes silently.
const HEADER_LAYOUT_VERSIONS: std::ops::Range<i32> = 0x020c_0000..0x020d_0000;

/// Bytes of `n` as a zigzag varint, as librdkafka counts them in `rkhdr_ser_size`.
fn varint_len(n: usize) -> usize {
    let mut v = (n as u64) << 1;
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

/// The length of a header name librdkafka handed out, NUL bytes in it included.
///
/// `rd_kafka_header_get_all` gives the name as a NUL-terminated pointer only, so a name
/// holding a NUL byte would be cut at it; its real length is in the header item the name
/// belongs to. It is read from there only when librdkafka is a version with the reviewed
/// layout and the item agrees with what the public API returned (same value pointer and
/// size, a consistent serialized size, a NUL right after the name); otherwise the name
/// ends at its first NUL, as librdkafka's own string API sees it.
///
/// # Safety
/// `name`, `value` and `value_size` must be what `rd_kafka_header_get_all` just returned for
/// one header, and its header list must stay alive and unmodified during the call.
#[allow(unsafe_code)]
unsafe fn header_name_len(
    name: *const std::ffi::c_char,
    value: *const std::ffi::c_void,
    value_size: usize,
) -> usize {
    use rdkafka::bindings as rd;
    use std::ffi::CStr;

    // SAFETY: librdkafka header names are NUL-terminated (caller's contract).
    let visible = unsafe { CStr::from_ptr(name) }.to_bytes().len();
    // SAFETY: a plain getter with no preconditions.
    let version = unsafe { rd::rd_kafka_version() };
    if !HEADER_LAYOUT_VERSIONS.contains(&version) {
        return visible;
    }
    // SAFETY: with these librdkafka versions `name` is the `rkhdr_name` field of a header
    // item, which follows a `HeaderItemPrefix` in the same allocation (the item is
    // `rd_malloc`ed, so suitably aligned); the item lives as long as its list.
    let item = unsafe {
        name.byte_sub(std::mem::size_of::<HeaderItemPrefix>())
            .cast::<HeaderItemPrefix>()
            .read()
    };
    let consistent = item.value.cast::<std::ffi::c_void>() == value
        && item.value_size == value_size
        && item.name_size >= visible
        && item
            .name_size
            .checked_add(value_size)
            .and_then(|sizes| sizes.checked_add(varint_len(item.name_size)))
            .and_then(|sizes| sizes.checked_add(varint_len(value_size)))
            == Some(item.ser_size)
        && (value.is_null() || value == name.wrapping_add(item.name_size).wrapping_add(1).cast());
    if !consistent {
        return visible;
    }
    // SAFETY: the item says the name has `name_size` bytes, then its NUL, in the allocation.
    let terminated = unsafe { name.add(item.name_size).read() } == 0;
    if terminated { item.name_size } else { visible }
}

/// Where a consumed record's bytes are gathered before they are copied into the record's one
/// buffer (see [`RecordBytes`]): its key, value and header names and values end to end, and
/// where each header's name and value are. Kept per thread, so the poll thread reuses it.
struct Gather {
    bytes: Vec<u8>,
    headers: Vec<(Range<usize>, Option<Range<usize>>)>,
}

impl Gather {
    const fn new() -> Self {
        Gather {
            bytes: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Appends `bytes`; returns where they are.
    fn push(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// The gathered headers, as views into `buffer` (a copy of the gathered bytes).
    fn headers(&self, buffer: &Arc<[u8]>) -> Headers {
        self.headers
            .iter()
            .map(|(name, value)| Header {
                key: RecordBytes::view(buffer, name.clone()),
                value: value.clone().map(|v| RecordBytes::view(buffer, v)),
            })
            .collect()
    }
}

/// A gather buffer grown past this (by a large record) is not kept for the next record.
const MAX_KEPT_GATHER: usize = 1 << 20;

/// Topic names shared per thread (see [`shared_topic`]), at most this many.
const MAX_SHARED_TOPICS: usize = 64;

thread_local! {
    static GATHER: RefCell<Gather> = const { RefCell::new(Gather::new()) };
    static TOPICS: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's (emptied) gather buffer, or a fresh one if it is in use.
fn with_gather<T>(f: impl FnOnce(&mut Gather) -> T) -> T {
    let mut f = Some(f);
    let kept = GATHER.try_with(|cell| {
        let mut gather = cell.try_borrow_mut().ok()?;
        let f = f.take()?;
        gather.bytes.clear();
        gather.headers.clear();
        let out = f(&mut gather);
        if gather.bytes.capacity() > MAX_KEPT_GATHER {
            *gather = Gather::new();
        }
        Some(out)
    });
    match (kept, f) {
        (Ok(Some(out)), _) => out,
        (_, Some(f)) => f(&mut Gather::new()),
        // `f` ran only if it returned its output.
        (_, None) => unreachable!("the gather closure ran without an output"),
    }
}

/// `name` as an `Arc<str>` shared with the records of that topic read before on this thread:
/// a consumer reads few topics, so a short scan replaces an allocation per record.
fn shared_topic(name: &str) -> Arc<str> {
    TOPICS
        .try_with(|cell| {
            let mut topics = cell.try_borrow_mut().ok()?;
            if let Some(topic) = topics.iter().find(|t| &***t == name) {
                return Some(Arc::clone(topic));
            }
            if topics.len() >= MAX_SHARED_TOPICS {
                topics.remove(0);
            }
            let topic: Arc<str> = Arc::from(name);
            topics.push(Arc::clone(&topic));
            Some(topic)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Arc::from(name))
}

/// Reads a header list librdkafka holds (a consumed record's, or an [`OwnedHeaders`]), names
/// and values byte for byte (a null value stays `None`), into `gather`.
#[allow(unsafe_code)]
fn gather_header_list(list: &BorrowedHeaders, gather: &mut Gather) {
    use rdkafka::bindings as rd;
    use std::ffi::{c_char, c_void};

    // rdkafka hands out a header list as a reference to the zero-sized `BorrowedHeaders` at
    // the native list's address (its own getters cast it back the same way).
    let hdrs = std::ptr::from_ref(list).cast::<rd::rd_kafka_headers_t>();
    // SAFETY: `hdrs` is a live header list: `list` borrows it from its owner.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    gather.headers.reserve(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `idx < count`; librdkafka writes pointers into the header list, which
        // stays valid and unmodified while `list` is borrowed; we copy them out before
        // returning.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: `name`, `value` and `size` came from `rd_kafka_header_get_all` just now.
        let name_len = unsafe { header_name_len(name, value, size) };
        // SAFETY: the name has `name_len` readable bytes (see `header_name_len`).
        let key = gather.push(unsafe { std::slice::from_raw_parts(name.cast::<u8>(), name_len) });
        let value = (!value.is_null()).then(|| {
            // SAFETY: `value` points to `size` readable bytes owned by the header list.
            gather.push(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        });
        gather.headers.push((key, value));
    }
}

/// Reads a header list librdkafka holds, names and values byte for byte, into one buffer.
fn read_header_list(list: &BorrowedHeaders) -> Headers {
    with_gather(|gather| {
        gather_header_list(list, gather);
        if gather.headers.is_empty() {
            return Headers::new();
        }
        let buffer: Arc<[u8]> = Arc::from(&gather.bytes[..]);
        gather.headers(&buffer)
    })
}

/// Builds rdkafka's [`OwnedHeaders`] from `headers`, names and values byte for byte, for a
/// record to produce. rdkafka's `OwnedHeaders::insert` takes the name as `&str`; librdkafka's
/// `rd_kafka_header_add` takes a pointer and a length, so any name can be written.
#[allow(unsafe_code)]
pub(crate) fn owned_headers<'a>(
    headers: impl ExactSizeIterator<Item = &'a Header>,
) -> OwnedHeaders {
    use rdkafka::bindings as rd;

    // A valid address for empty names and values: librdkafka copies zero bytes from it, and a
    // non-null value pointer is what tells an empty value from a null one.
    static EMPTY: [u8; 1] = [0];

    let owned = OwnedHeaders::new_with_capacity(headers.len());
    // rdkafka 0.39 keeps `OwnedHeaders::ptr` crate-private; `as_borrowed` returns the same
    // native list pointer cast to a reference to the zero-sized `BorrowedHeaders`
    // (rdkafka's own getters cast it back the same way), so casting back gives the list.
    let list = std::ptr::from_ref::<BorrowedHeaders>(owned.as_borrowed())
        .cast_mut()
        .cast::<rd::rd_kafka_headers_t>();
    for header in headers {
        let bytes = |b: &[u8]| {
            let ptr = if b.is_empty() {
                EMPTY.as_ptr()
            } else {
                b.as_ptr()
            };
            // A Vec never holds more than `isize::MAX` bytes.
            (ptr, isize::try_from(b.len()).unwrap_or(isize::MAX))
        };
        let (name, name_len) = bytes(&header.key);
        let (value, value_len) = match header.value.as_deref() {
            Some(v) => bytes(v),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `list` is the live header list `owned` owns (see above); nothing else
        // uses it during the call. `name` points to `name_len` readable bytes and `value`
        // to `value_len` (or is null for a null value); librdkafka copies both (an explicit
        // length, never -1, so NUL bytes and invalid UTF-8 are copied as they are).
        let err = unsafe {
            rd::rd_kafka_header_add(list, name.cast(), name_len, value.cast(), value_len)
        };
        // librdkafka refuses only a read-only list; ours was just created.
        debug_assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    owned
}

/// Copies a consumed record: its key, value and header names and values into one buffer
/// (one allocation, plus the header list's when it has headers), its topic name shared.
fn to_raw<M: Message<Headers = BorrowedHeaders>>(m: &M) -> RawRecord {
    let (timestamp, log_append_time) = match m.timestamp() {
        Timestamp::NotAvailable => (None, false),
        Timestamp::CreateTime(t) => (Some(t), false),
        Timestamp::LogAppendTime(t) => (Some(t), true),
    };
    let topic = shared_topic(m.topic());
    with_gather(|gather| {
        let key = m.key().map(|k| gather.push(k));
        let value = m.payload().map(|v| gather.push(v));
        if let Some(list) = m.headers() {
            gather_header_list(list, gather);
        }
        let buffer: Arc<[u8]> = Arc::from(&gather.bytes[..]);
        RawRecord {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: key.map(|k| RecordBytes::view(&buffer, k)),
            value: value.map(|v| RecordBytes::view(&buffer, v)),
            headers: gather.headers(&buffer),
            timestamp,
            log_append_time,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn odd_names() -> Headers {
        Headers::from_iter([
            Header::new(b"\xc3\x28\x78".to_vec(), b"\xc3\x28".to_vec()),
            Header::new(b"\xff\xfe".to_vec(), Vec::new()),
            Header::null(Vec::new()),
            Header::new(Vec::new(), b"empty name".to_vec()),
            Header::new(b"a\0b".to_vec(), b"v\0w".to_vec()),
            Header::null(b"a\0b".to_vec()),
            Header::new(b"\0".to_vec(), b"x".to_vec()),
            Header::null(b"trailing\0".to_vec()),
            Header::new("event-id", "e-1"),
            Header::new("event-id", "e-2"),
        ])
    }

    #[test]
    fn the_buffer_len_of_a_record_is_that_of_the_buffer_its_bytes_share() {
        let shared: Arc<[u8]> = Arc::from(&b"keyvalueevent-ide-1"[..]);
        let record = RawRecord {
            key: Some(RecordBytes::view(&shared, 0..3)),
            value: Some(RecordBytes::view(&shared, 3..8)),
            headers: Headers::from(vec![Header {
                key: RecordBytes::view(&shared, 8..16),
                value: Some(RecordBytes::view(&shared, 16..19)),
            }]),
            ..RawRecord::builder("t").build()
        };
        assert_eq!(record.buffer_len(), 19);
        assert_eq!(record.consumed_byte_len(), record.byte_len());
        assert_eq!(record.byte_len(), 19 + 1 + 64, "bytes, topic name, 64");
        let tombstone = RawRecord::builder("t").key("k1").build();
        assert_eq!(tombstone.buffer_len(), 2, "no value: the key's buffer");
        let bare = RawRecord::builder("t").header("abc", "d").build();
        assert_eq!(bare.buffer_len(), 3, "neither: a header's");
        assert_eq!(RawRecord::builder("t").build().buffer_len(), 0);
    }

    #[test]
    fn names_round_trip_through_librdkafka_byte_for_byte() {
        let headers = odd_names();
        let owned = headers.to_rdkafka();
        assert_eq!(Headers::from(&owned), headers);
        // librdkafka's own copy keeps them too (the producer copies lists this way).
        assert_eq!(Headers::from(&owned.clone()), headers);
        assert_eq!(Headers::from(&OwnedHeaders::new()), Headers::new());
    }

    #[test]
    fn headers_read_from_librdkafka_share_one_buffer() {
        let read = Headers::from(&odd_names().to_rdkafka());
        let first = &read.iter().next().expect("headers").key.buffer;
        assert!(read.iter().all(|h| {
            Arc::ptr_eq(&h.key.buffer, first)
                && h.value
                    .as_ref()
                    .is_none_or(|v| Arc::ptr_eq(&v.buffer, first))
        }));
        assert_eq!(read, odd_names(), "views compare as their bytes");
    }

    #[test]
    fn record_bytes_compare_hash_and_show_as_their_bytes() {
        let whole = RecordBytes::from("key-1value");
        let key = RecordBytes::view(&whole.buffer, 0..5);
        assert_eq!(key, "key-1");
        assert_eq!(key, RecordBytes::from(b"key-1".to_vec()));
        assert_eq!(&*key, b"key-1");
        assert_eq!(RecordBytes::view(&whole.buffer, 5..10), b"value");
        let mut set = std::collections::HashSet::new();
        set.insert(key.clone());
        assert!(
            set.contains(&b"key-1"[..]),
            "Borrow<[u8]> agrees with Hash and Eq"
        );
        assert_eq!(format!("{key:?}"), r#"b"key-1""#);
        assert_eq!(Vec::from(key), b"key-1".to_vec());
        assert!(RecordBytes::new().is_empty());
    }

    #[test]
    fn the_layout_check_accepts_the_bundled_librdkafka() {
        // Without the reviewed layout names with NUL bytes would be cut short: make a
        // librdkafka upgrade that changes it fail here, not silently.
        let (version, _) = rdkafka::util::get_rdkafka_version();
        assert!(
            HEADER_LAYOUT_VERSIONS.contains(&version),
            "librdkafka {version:#x}: review rdkafka_header.h and HEADER_LAYOUT_VERSIONS"
        );
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
    }

    #[test]
    fn lookups_take_text_or_bytes() {
        let mut h = odd_names();
        assert_eq!(h.get("event-id"), Some(&b"e-2"[..]));
        assert_eq!(h.get_str(String::from("event-id")), Some("e-2"));
        assert_eq!(h.get(b"\xc3\x28\x78"), Some(&b"\xc3\x28"[..]));
        assert_eq!(h.get(&b"\xff\xfe"[..]), Some(&b""[..]));
        assert_eq!(h.get(b"a\0b"), None, "the last one is null");
        assert_eq!(
            h.get_all(b"a\0b").collect::<Vec<_>>(),
            [Some(&b"v\0w"[..]), None]
        );
        assert_eq!(h.get(""), Some(&b"empty name"[..]));
        assert_eq!(h.get("a"), None, "a NUL byte is part of the name");
        assert_eq!(h.remove("event-id"), 2);
        h.remove_where(|name| name.is_empty());
        assert_eq!(h.len(), 6);
        assert!(
            h.iter()
                .all(|x| !x.is_named("event-id") && !x.key.is_empty())
        );
    }

    #[test]
    fn names_escape_losslessly() {
        let escaped = |name: &[u8]| Header::null(name).key_escaped().into_owned();
        assert_eq!(escaped(b"event-id"), "event-id");
        assert_eq!(escaped("é".as_bytes()), "é");
        assert_eq!(escaped(b"\xc3\x28\x78"), r"\xc3(x");
        assert_eq!(escaped(b"\xff\xfe"), r"\xff\xfe");
        assert_eq!(escaped(b"a\0b\n"), r"a\0b\n");
        assert_eq!(
            escaped(b"\\xff"),
            r"\\xff",
            "a backslash never looks like an escape"
        );
        assert_eq!(escaped(b"\x7f"), r"\u{7f}");
        assert!(matches!(
            Header::null("plain").key_escaped(),
            Cow::Borrowed("plain")
        ));
        let debug = format!("{:?}", Header::new(b"\xff\"".to_vec(), b"v\x01".to_vec()));
        assert_eq!(debug, r#"Header { key: "\xff\"", value: Some(b"v\x01") }"#);
    }
}
