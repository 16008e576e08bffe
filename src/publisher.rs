//! [`Publisher`]: a typed, keyed producer whose sends resolve to the broker's acknowledgement.
//!
//! The starting design's producer logged a failed send and forgot it. Here every send returns
//! the broker's acknowledgement ([`Delivery`]) or a typed [`Error`]; nothing is dropped on the
//! floor. The producer plumbing it shares with the dead-letter sink is in `producer.rs`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::time::Instant;

use crate::error::{ConfigError, Error, Result};
use crate::log_throttle::ThrottledLogContext;
use crate::producer::{Delivery, ManagedProducer, ProducerSettings};
use crate::record::{Header, Headers, owned_headers};

type KeyFn<T> = Box<dyn Fn(&T) -> Vec<u8> + Send + Sync + 'static>;
type HeadersFn<T> = Box<dyn Fn(&T) -> Vec<Header> + Send + Sync + 'static>;

/// A typed, keyed Kafka producer for one topic: events are encoded as JSON, and every send
/// resolves to the broker's acknowledgement or a typed error.
///
/// Defaults, all of which [`PublisherBuilder::kafka_config`] can override:
/// - **idempotent** producer: `enable.idempotence=true`, `acks=all`, so librdkafka's internal
///   retries neither duplicate nor reorder records. Turning idempotence off is allowed (and
///   documented as weaker); `acks=0` is refused because a send could then never be confirmed.
/// - **Java-compatible partitioning**: `partitioner=murmur2_random`, so a keyed record lands on
///   the partition a Java producer would choose for the same key ([`java_partition`]); records
///   without a key go to a random partition.
/// - a **finite delivery timeout**: `message.timeout.ms` equals the send timeout (30 s unless
///   [`PublisherBuilder::send_timeout`] says otherwise), so a send always ends.
///
/// A `Publisher` is cheap to clone (clones share one producer) and is `Send + Sync`.
///
/// **Trace context:** headers are sent as given, so a `traceparent` header (W3C Trace Context,
/// see [`TraceContext`](crate::TraceContext)) from `headers_fn` or `send_with_headers` reaches
/// the handler, the dead letter and a redrive unchanged. With the `opentelemetry` feature, a
/// record without one gets the current span's context (the current `tracing` span through
/// `tracing-opentelemetry`, else OpenTelemetry's current context), so one trace covers the
/// publish, the handling and any dead letter.
///
/// **Shutdown:** call [`Publisher::flush`] before dropping the last clone. Dropping a librdkafka
/// producer purges what it has not delivered yet; to make that loud rather than silent, the
/// drop waits up to one second for undelivered records and logs (at `warn`) how many it had to
/// give up. A send whose future is still being awaited keeps the publisher alive, so only the
/// records of abandoned (cancelled) sends can be affected.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use kourier::{Header, Publisher};
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct Notification { id: String, user_id: String, text: String }
///
/// # async fn run() -> Result<(), kourier::Error> {
/// let publisher = Publisher::<Notification>::builder("127.0.0.1:9092", "notify.v1")
///     .key_fn(|n: &Notification| n.user_id.clone())
///     .headers_fn(|n: &Notification| vec![Header::new("event-id", n.id.as_bytes())])
///     .send_timeout(Duration::from_secs(10))
///     .build()?;
///
/// let delivery = publisher
///     .send(&Notification { id: "e-1".into(), user_id: "u-42".into(), text: "hi".into() })
///     .await?;
/// println!("stored at partition {} offset {}", delivery.partition, delivery.offset);
///
/// publisher.flush(Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// ```
pub struct Publisher<T> {
    inner: Arc<PublisherInner<T>>,
}

struct PublisherInner<T> {
    producer: ManagedProducer,
    topic: String,
    key_fn: Option<KeyFn<T>>,
    headers_fn: Option<HeadersFn<T>>,
}

impl<T> Clone for Publisher<T> {
    fn clone(&self) -> Self {
        Publisher {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> fmt::Debug for Publisher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.inner.topic)
            .field("keyed", &self.inner.key_fn.is_some())
            .field("headers_fn", &self.inner.headers_fn.is_some())
            .field("send_timeout", &self.inner.producer.send_timeout)
            .finish_non_exhaustive()
    }
}

impl<T> Publisher<T> {
    /// Starts building a publisher of `T` events to `topic` through the brokers at
    /// `bootstrap_servers` (a comma-separated `host:port` list).
    pub fn builder(
        bootstrap_servers: impl Into<String>,
        topic: impl Into<String>,
    ) -> PublisherBuilder<T> {
        PublisherBuilder {
            settings: ProducerSettings::new(bootstrap_servers.into()),
            topic: topic.into(),
            key_fn: None,
            headers_fn: None,
            _event: PhantomData,
        }
    }

    /// The topic this publisher writes to.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The underlying rdkafka producer, e.g. for metrics or `in_flight_count`. Its context
    /// is a [`ThrottledLogContext`]: its librdkafka logs are throttled.
    ///
    /// Records sent through it directly bypass the publisher's encoding and keying.
    pub fn producer(&self) -> FutureProducer<ThrottledLogContext> {
        self.inner.producer.current()
    }

    /// Waits until every record handed to the producer so far is acknowledged or failed, for
    /// at most `timeout`. Call it before shutting down.
    ///
    /// # Errors
    /// [`Error::Timeout`] when records are still undelivered after `timeout`;
    /// [`Error::Kafka`] for other flush failures.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.inner.producer.flush(timeout).await
    }

    /// Publishes bytes as given — a value already encoded (JSON from elsewhere, another
    /// format), a tombstone (`value: None`), a record copied from another topic — to this
    /// publisher's topic, and waits for the broker's acknowledgement.
    ///
    /// The builder's `key_fn` and `headers_fn` are not applied (they read a typed event):
    /// `key` and `headers` are all the record has (with the `opentelemetry` feature, the
    /// current span's trace context is added when `headers` has none). Partitioning is as for
    /// [`send`](Publisher::send): by key, Java-compatible.
    ///
    /// ```no_run
    /// # async fn run(publisher: kourier::Publisher<serde_json::Value>) -> kourier::Result<()> {
    /// use kourier::Headers;
    ///
    /// let json = br#"{"id":"e-1","user_id":"u-42","text":"hi"}"#;
    /// let headers = Headers::new().with("event-id", "e-1");
    /// let delivery = publisher.send_raw(Some(b"u-42"), Some(json), headers).await?;
    /// # let _ = delivery; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As for [`send`](Publisher::send), except that there is no encoding step.
    pub async fn send_raw(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Headers,
    ) -> Result<Delivery> {
        let deadline = self.inner.producer.deadline();
        #[allow(unused_mut)] // mutated with the `opentelemetry` feature
        let mut headers: Vec<Header> = headers.into_iter().collect();
        #[cfg(feature = "opentelemetry")]
        inject_trace_context(&mut headers);
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.inner.topic)
            .headers(owned_headers(headers.iter()));
        if let Some(value) = value {
            record = record.payload(value);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        let future = self
            .inner
            .producer
            .enqueue(record, deadline, "publish")
            .await?;
        self.inner
            .producer
            .acknowledgement(future, deadline, "publish")
            .await
    }
}

impl<T: Serialize> Publisher<T> {
    /// Publishes one event and waits for the broker's acknowledgement.
    ///
    /// The key comes from the builder's `key_fn` (no key when there is none), the headers from
    /// its `headers_fn`.
    ///
    /// # Errors
    /// - [`Error::Encode`] when the event cannot be encoded as JSON (nothing is sent);
    /// - [`Error::Kafka`] (operation `"publish"`) when the producer refuses the record or the
    ///   broker does not acknowledge it within the send timeout (`MessageTimedOut`);
    /// - [`Error::Timeout`] if no delivery report arrives at all within the send timeout plus
    ///   a short grace period (a safety net; librdkafka normally reports first).
    ///
    /// After an error the record may still have been written (the acknowledgement may be what
    /// was lost), so a retry can duplicate it: give events an id consumers can deduplicate on.
    pub async fn send(&self, event: &T) -> Result<Delivery> {
        self.send_with_headers(event, Headers::new()).await
    }

    /// Like [`send`](Self::send), with `extra` headers appended after the builder's
    /// `headers_fn` headers.
    ///
    /// # Errors
    /// As for [`send`](Self::send).
    pub async fn send_with_headers(&self, event: &T, extra: Headers) -> Result<Delivery> {
        let deadline = self.inner.producer.deadline();
        let prepared = self.prepare(event, extra)?;
        let future = self.enqueue(&prepared, deadline).await?;
        self.inner
            .producer
            .acknowledgement(future, deadline, "publish")
            .await
    }

    /// Publishes several events pipelined: all are handed to the producer first, then the
    /// acknowledgements are awaited. Returns one result per event, in order.
    ///
    /// With the idempotent producer, records of one partition are stored in the order given.
    /// If one record fails, later ones may still have been stored: check every result.
    ///
    /// # Errors
    /// Each element is an error as described for [`send`](Self::send).
    pub async fn send_batch(&self, events: &[T]) -> Vec<Result<Delivery>> {
        let deadline = self.inner.producer.deadline();
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let enqueued = match self.prepare(event, Headers::new()) {
                Ok(prepared) => self.enqueue(&prepared, deadline).await,
                Err(e) => Err(e),
            };
            pending.push(enqueued);
        }
        let mut results = Vec::with_capacity(pending.len());
        for enqueued in pending {
            results.push(match enqueued {
                Ok(future) => {
                    self.inner
                        .producer
                        .acknowledgement(future, deadline, "publish")
                        .await
                }
                Err(e) => Err(e),
            });
        }
        results
    }

    fn prepare(&self, event: &T, extra: Headers) -> Result<Prepared> {
        let payload = serde_json::to_vec(event).map_err(|e| Error::Encode {
            topic: self.inner.topic.clone(),
            source: Box::new(e),
        })?;
        let key = self.inner.key_fn.as_ref().map(|f| f(event));
        let mut headers = self
            .inner
            .headers_fn
            .as_ref()
            .map(|f| f(event))
            .unwrap_or_default();
        headers.extend(extra);
        #[cfg(feature = "opentelemetry")]
        inject_trace_context(&mut headers);
        Ok(Prepared {
            key,
            payload,
            headers,
        })
    }

    async fn enqueue(&self, prepared: &Prepared, deadline: Instant) -> Result<DeliveryFuture> {
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.inner.topic)
            .payload(prepared.payload.as_slice())
            .headers(owned_headers(prepared.headers.iter()));
        if let Some(key) = &prepared.key {
            record = record.key(key.as_slice());
        }
        self.inner
            .producer
            .enqueue(record, deadline, "publish")
            .await
    }
}

/// With the `opentelemetry` feature: a record without a `traceparent` header gets the
/// current span's context, so the consumer's record span continues the publisher's trace.
#[cfg(feature = "opentelemetry")]
fn inject_trace_context(headers: &mut Vec<Header>) {
    use crate::trace_context::TraceContext;
    if headers
        .iter()
        .any(|h| h.is_named(TraceContext::TRACEPARENT))
    {
        return;
    }
    if let Some(tc) = TraceContext::current() {
        headers.retain(|h| !h.is_named(TraceContext::TRACESTATE));
        headers.extend(tc.to_headers());
    }
}

struct Prepared {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<Header>,
}

/// Builds a [`Publisher`]; start with [`Publisher::builder`].
#[must_use = "a builder does nothing until `build()` is called"]
pub struct PublisherBuilder<T> {
    settings: ProducerSettings,
    topic: String,
    key_fn: Option<KeyFn<T>>,
    headers_fn: Option<HeadersFn<T>>,
    _event: PhantomData<fn(&T)>,
}

impl<T> fmt::Debug for PublisherBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field("topic", &self.topic)
            .field("settings", &self.settings)
            .field("keyed", &self.key_fn.is_some())
            .field("headers_fn", &self.headers_fn.is_some())
            .finish()
    }
}

impl<T> PublisherBuilder<T> {
    /// Derives each record's key from its event, e.g. the user id, so that all events of one
    /// key land on one partition, in order. Without it records have no key (a random
    /// partition each).
    pub fn key_fn<K, F>(mut self, key_fn: F) -> Self
    where
        F: Fn(&T) -> K + Send + Sync + 'static,
        K: Into<Vec<u8>>,
    {
        self.key_fn = Some(Box::new(move |event| key_fn(event).into()));
        self
    }

    /// Derives headers from each event, e.g. an event id for consumers to deduplicate on.
    pub fn headers_fn<H, F>(mut self, headers_fn: F) -> Self
    where
        F: Fn(&T) -> H + Send + Sync + 'static,
        H: IntoIterator<Item = Header>,
    {
        self.headers_fn = Some(Box::new(move |event| {
            headers_fn(event).into_iter().collect()
        }));
        self
    }

    /// Sets a raw librdkafka producer property (applied after kourier's defaults, so it
    /// overrides them). See librdkafka's `CONFIGURATION.md`.
    ///
    /// `build()` refuses `acks=0` (a send could not be confirmed), `transactional.id`
    /// (transactions are not supported), and a `message.timeout.ms` / `delivery.timeout.ms`
    /// of 0 (infinite) or one that contradicts [`send_timeout`](Self::send_timeout).
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.set(key.into(), value.into());
        self
    }

    /// How long a send may take, enqueueing included, before it fails (default 30 s). It is
    /// also librdkafka's `message.timeout.ms`, so librdkafka gives up on the record at the
    /// same time instead of delivering it after the caller was told it failed.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.settings.send_timeout = Some(timeout);
        self
    }

    /// Validates the settings and creates the producer. It does not connect yet: an
    /// unreachable broker shows up as failing sends, not as a `build()` error.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty bootstrap list, an invalid topic name, a zero or
    /// too-large send timeout, or a refused librdkafka property (see
    /// [`kafka_config`](Self::kafka_config)); [`Error::Kafka`] (operation
    /// `"create producer"`) when librdkafka rejects the configuration.
    pub fn build(self) -> Result<Publisher<T>> {
        crate::topic_name::check(&self.topic)
            .map_err(|reason| ConfigError::invalid("topic", reason))?;
        let producer = self.settings.build("kourier-publisher")?;
        Ok(Publisher {
            inner: Arc::new(PublisherInner {
                producer,
                topic: self.topic,
                key_fn: self.key_fn,
                headers_fn: self.headers_fn,
            }),
        })
    }
}

/// The partition Kafka's Java producer chooses for a keyed record: `toPositive(murmur2(key)) %
/// partitions`, with Kafka's `Utils.murmur2` (seed `0x9747b28c`).
///
/// [`Publisher`] configures librdkafka's `murmur2_random` partitioner, which computes the same
/// thing, so this tells where a publisher's keyed record goes without asking the broker.
///
/// `None` when `partitions` is not positive (a topic has at least one partition).
///
/// ```
/// assert_eq!(kourier::topics::java_partition(b"21", 6), Some((-973932308i32 & 0x7fff_ffff) % 6));
/// assert_eq!(kourier::topics::java_partition(b"21", 0), None);
/// ```
pub fn java_partition(key: &[u8], partitions: i32) -> Option<i32> {
    (partitions > 0).then(|| (murmur2(key) & 0x7fff_ffff) % partitions)
}

/// Kafka's `org.apache.kafka.common.utils.Utils.murmur2`, bit for bit (Java `int` arithmetic).
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java uses an int length; a key longer than i32::MAX bytes cannot exist in Kafka.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafkas_java_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key),
                expected,
                "murmur2({:?})",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// Key → partition pairs as Java's `BuiltInPartitioner.partitionForKey` computes them
    /// (`Utils.toPositive(Utils.murmur2(key)) % numPartitions`) for the vectors above.
    #[test]
    fn java_partition_matches_java_key_partition_pairs() {
        // toPositive(-973932308) = 1173551340; toPositive(-790332482) = 1357151166;
        // toPositive(479470107) = 479470107.
        assert_eq!(java_partition(b"21", 6).unwrap(), 1_173_551_340 % 6);
        assert_eq!(java_partition(b"21", 6).unwrap(), 0);
        assert_eq!(java_partition(b"foobar", 6).unwrap(), 0);
        assert_eq!(java_partition(b"foobar", 10).unwrap(), 6);
        assert_eq!(java_partition(b"abc", 6).unwrap(), 3);
        assert_eq!(java_partition(b"abc", 7).unwrap(), 479_470_107 % 7);
        assert_eq!(
            java_partition(b"a-little-bit-longer-string", 3).unwrap(),
            (-1_486_304_829i32 & 0x7fff_ffff) % 3
        );
        for key in [&b"x"[..], b"", b"user-1", b"\xff\x00\xfe"] {
            assert_eq!(java_partition(key, 1).unwrap(), 0);
            let p = java_partition(key, 12).unwrap();
            assert!((0..12).contains(&p));
        }
    }

    #[test]
    fn java_partition_refuses_non_positive_partition_counts() {
        assert_eq!(java_partition(b"k", 0), None);
        assert_eq!(java_partition(b"k", -3), None);
    }

    #[tokio::test]
    async fn build_refuses_bad_topic_and_runs_inside_a_runtime() {
        #[derive(Serialize)]
        struct Event {
            id: u32,
        }
        let err = Publisher::<Event>::builder("127.0.0.1:9092", "bad topic")
            .build()
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Config(ConfigError::Invalid {
                setting: "topic",
                ..
            })
        ));

        let publisher = Publisher::<Event>::builder("127.0.0.1:9092", "ok.topic")
            .key_fn(|e: &Event| e.id.to_string())
            .build()
            .unwrap();
        assert_eq!(publisher.topic(), "ok.topic");
        let prepared = publisher
            .prepare(&Event { id: 7 }, Headers::new().with("x", "y"))
            .unwrap();
        assert_eq!(prepared.key.as_deref(), Some(&b"7"[..]));
        assert_eq!(prepared.payload, br#"{"id":7}"#);
        assert_eq!(prepared.headers, vec![Header::new("x", "y")]);
    }
}
