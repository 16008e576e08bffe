//! [`Publisher`]: a typed, keyed producer whose sends resolve to the broker's acknowledgement.
//!
//! The starting design's producer logged a failed send and forgot it. Here every send returns
//! the broker's acknowledgement ([`Delivery`]) or a typed [`Error`]; nothing is dropped on the
//! floor. The producer plumbing shared with the dead-letter sink (settings validation, bounded
//! enqueue and acknowledgement, flushing, recovery from a fatal producer error) lives here too.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use tokio::time::Instant;

use crate::error::{ConfigError, Error, Result};
use crate::message::{Header, Headers};

/// Where the broker stored a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// The partition the record was written to.
    pub partition: i32,
    /// The record's offset in that partition.
    pub offset: i64,
}

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

    /// The underlying rdkafka producer, e.g. for metrics or `in_flight_count`.
    ///
    /// Records sent through it directly bypass the publisher's encoding and keying.
    pub fn producer(&self) -> FutureProducer {
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
    if headers.iter().any(|h| h.key == TraceContext::TRACEPARENT) {
        return;
    }
    if let Some(tc) = TraceContext::current() {
        headers.retain(|h| h.key != TraceContext::TRACESTATE);
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
        validate_topic_name(&self.topic).map_err(|reason| ConfigError::invalid("topic", reason))?;
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
/// assert_eq!(kourier::java_partition(b"21", 6), Some((-973932308i32 & 0x7fff_ffff) % 6));
/// assert_eq!(kourier::java_partition(b"21", 0), None);
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

fn validate_topic_name(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() {
        return Err("the topic name is empty".into());
    }
    if topic.len() > 249 {
        return Err(format!("`{topic}` is longer than 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a valid topic name"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{topic}` contains {c:?}; topic names use ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

// ───────────── producer plumbing shared with the dead-letter sink ─────────────

/// Default for how long a send may take.
pub(crate) const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Extra wait after the send timeout before kourier stops waiting for a delivery report on its
/// own: librdkafka checks message timeouts about once a second, and normally reports first.
const DELIVERY_REPORT_GRACE: Duration = Duration::from_secs(5);

/// How long a dropped producer waits for undelivered records before they are purged.
const DROP_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between attempts to enqueue while librdkafka's local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

const TIMEOUT_KEYS: [&str; 2] = ["message.timeout.ms", "delivery.timeout.ms"];
const ACKS_KEYS: [&str; 2] = ["acks", "request.required.acks"];

/// Producer settings as given to a builder: validated and turned into a producer by
/// [`ProducerSettings::build`].
#[derive(Debug, Clone)]
pub(crate) struct ProducerSettings {
    bootstrap_servers: String,
    overrides: Vec<(String, String)>,
    pub(crate) send_timeout: Option<Duration>,
}

impl ProducerSettings {
    pub(crate) fn new(bootstrap_servers: String) -> Self {
        ProducerSettings {
            bootstrap_servers,
            overrides: Vec::new(),
            send_timeout: None,
        }
    }

    pub(crate) fn set(&mut self, key: String, value: String) {
        self.overrides.push((key, value));
    }

    /// Whether any raw librdkafka property was given.
    pub(crate) fn has_overrides(&self) -> bool {
        !self.overrides.is_empty()
    }

    /// Sets a default that raw properties given by the user override.
    pub(crate) fn set_default(&mut self, key: &str, value: &str) {
        if self.get(&[key]).is_none() {
            self.overrides.insert(0, (key.to_owned(), value.to_owned()));
        }
    }

    /// The last value given for any of `keys`.
    pub(crate) fn get(&self, keys: &[&str]) -> Option<(&str, &str)> {
        self.overrides
            .iter()
            .rev()
            .find(|(k, _)| keys.contains(&k.trim()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Checks the settings and returns the client configuration and the send timeout.
    fn config(
        &self,
        client_id: &str,
    ) -> std::result::Result<(ClientConfig, Duration), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::Missing("bootstrap_servers"));
        }
        let mut send_timeout = match self.send_timeout {
            Some(t) => Some(check_timeout(t)?),
            None => None,
        };
        if let Some((key, value)) = self.get(&TIMEOUT_KEYS) {
            let conflict = |reason| ConfigError::Conflict {
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            };
            let ms: u64 = value
                .trim()
                .parse()
                .map_err(|_| conflict("it must be a number of milliseconds"))?;
            if ms == 0 {
                return Err(conflict(
                    "0 means no timeout, and kourier needs every send to end",
                ));
            }
            let from_config = check_timeout(Duration::from_millis(ms))?;
            match send_timeout {
                Some(t) if t != from_config => {
                    return Err(conflict(
                        "it contradicts send_timeout(); set only one of them",
                    ));
                }
                _ => send_timeout = Some(from_config),
            }
        }
        if let Some((key, value)) = self.get(&ACKS_KEYS)
            && value.trim() == "0"
        {
            return Err(ConfigError::Conflict {
                key: key.to_owned(),
                value: value.to_owned(),
                reason: "kourier waits for the broker's acknowledgement of every record",
            });
        }
        if let Some((key, value)) = self.get(&["transactional.id"]) {
            return Err(ConfigError::Conflict {
                key: key.to_owned(),
                value: value.to_owned(),
                reason: "transactional producers are not supported",
            });
        }
        let send_timeout = send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT);

        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap_servers.trim())
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", send_timeout.as_millis().to_string());
        for (key, value) in &self.overrides {
            let key = key.trim();
            if TIMEOUT_KEYS.contains(&key) {
                // Already folded into send_timeout, written above as message.timeout.ms.
                continue;
            }
            config.set(key, value.as_str());
        }
        Ok((config, send_timeout))
    }

    /// Validates the settings and creates the producer.
    pub(crate) fn build(&self, client_id: &str) -> Result<ManagedProducer> {
        let (config, send_timeout) = self.config(client_id)?;
        let producer: FutureProducer = config
            .create()
            .map_err(|e| Error::kafka("create producer", e))?;
        Ok(ManagedProducer {
            current: Mutex::new(Generation {
                number: 0,
                producer,
            }),
            config: Some(config),
            send_timeout,
        })
    }
}

pub(crate) fn check_timeout(timeout: Duration) -> std::result::Result<Duration, ConfigError> {
    if timeout < Duration::from_millis(1) {
        return Err(ConfigError::invalid(
            "send_timeout",
            "must be at least 1 ms",
        ));
    }
    if timeout.as_millis() > i32::MAX as u128 {
        return Err(ConfigError::invalid(
            "send_timeout",
            format!(
                "{timeout:?} exceeds librdkafka's maximum of {} ms",
                i32::MAX
            ),
        ));
    }
    Ok(timeout)
}

struct Generation {
    number: u64,
    producer: FutureProducer,
}

/// A `FutureProducer` with kourier's send discipline: bounded enqueue (retrying while the
/// local queue is full), an acknowledgement awaited with a deadline, and replacement of the
/// producer after a fatal error (e.g. an idempotence failure), which otherwise would fail
/// every later send.
pub(crate) struct ManagedProducer {
    current: Mutex<Generation>,
    /// `None` for a producer the user built: it cannot be recreated.
    config: Option<ClientConfig>,
    pub(crate) send_timeout: Duration,
}

impl fmt::Debug for ManagedProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedProducer")
            .field("send_timeout", &self.send_timeout)
            .field("owned_config", &self.config.is_some())
            .finish_non_exhaustive()
    }
}

impl ManagedProducer {
    /// Wraps a producer built by the user. kourier cannot see its settings: it should be
    /// idempotent with `acks=all`, and its `message.timeout.ms` should not exceed
    /// `send_timeout`.
    pub(crate) fn from_producer(producer: FutureProducer, send_timeout: Duration) -> Self {
        ManagedProducer {
            current: Mutex::new(Generation {
                number: 0,
                producer,
            }),
            config: None,
            send_timeout,
        }
    }

    fn generation(&self) -> (u64, FutureProducer) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.number, current.producer.clone())
    }

    pub(crate) fn current(&self) -> FutureProducer {
        self.generation().1
    }

    /// When an operation started now must have finished.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.send_timeout + DELIVERY_REPORT_GRACE
    }

    /// Hands `record` to librdkafka, waiting while its local queue is full (until `deadline`).
    pub(crate) async fn enqueue(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
        deadline: Instant,
        operation: &'static str,
    ) -> Result<DeliveryFuture> {
        loop {
            let (generation, producer) = self.generation();
            match producer.send_result(record) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() + QUEUE_FULL_PAUSE < deadline =>
                {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => {
                    self.recover_if_fatal(generation, &producer);
                    return Err(Error::kafka(operation, e));
                }
            }
        }
    }

    /// Waits for the broker's acknowledgement of an enqueued record.
    pub(crate) async fn acknowledgement(
        &self,
        future: DeliveryFuture,
        deadline: Instant,
        operation: &'static str,
    ) -> Result<Delivery> {
        let outcome = match tokio::time::timeout_at(deadline, future).await {
            Err(_elapsed) => {
                return Err(Error::Timeout {
                    operation,
                    after: self.send_timeout + DELIVERY_REPORT_GRACE,
                });
            }
            // The producer went away before reporting (it cannot while we hold it; be safe).
            Ok(Err(_canceled)) => Err(KafkaError::Canceled),
            Ok(Ok(Err((e, _message)))) => Err(e),
            Ok(Ok(Ok(delivery))) => Ok(Delivery {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
        };
        outcome.map_err(|e| {
            let (generation, producer) = self.generation();
            self.recover_if_fatal(generation, &producer);
            Error::kafka(operation, e)
        })
    }

    /// Enqueues and waits for the acknowledgement.
    pub(crate) async fn send(
        &self,
        record: FutureRecord<'_, [u8], [u8]>,
        operation: &'static str,
    ) -> Result<Delivery> {
        let deadline = self.deadline();
        let future = self.enqueue(record, deadline, operation).await?;
        self.acknowledgement(future, deadline, operation).await
    }

    /// Flushes without blocking the async runtime.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.current();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|_join| Error::kafka("flush", KafkaError::Canceled))?;
        match flushed {
            Ok(()) => Ok(()),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => Err(Error::Timeout {
                operation: "flush",
                after: timeout,
            }),
            Err(e) => Err(Error::kafka("flush", e)),
        }
    }

    /// After a failure: if the producer hit a fatal error it will fail every later send, so
    /// replace it (when kourier built it). Records it still held have already failed.
    fn recover_if_fatal(&self, generation: u64, producer: &FutureProducer) {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return;
        };
        let Some(config) = &self.config else {
            tracing::error!(%code, %reason, "the producer hit a fatal error and was supplied by the user, so it cannot be recreated");
            return;
        };
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.number != generation {
            return; // another task already replaced it
        }
        match config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(%code, %reason, "the producer hit a fatal error; replaced it with a new one");
                let old = std::mem::replace(&mut current.producer, fresh);
                current.number += 1;
                drop(current);
                // Dropping a producer blocks (purge, flush, join its thread): not on this task.
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => drop(handle.spawn_blocking(move || drop(old))),
                    Err(_) => drop(old),
                }
            }
            Err(e) => {
                tracing::error!(%code, %reason, error = %e, "the producer hit a fatal error and could not be recreated; will try again on the next failure");
            }
        }
    }
}

impl Drop for ManagedProducer {
    fn drop(&mut self) {
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let producer = &current.producer;
        if producer.in_flight_count() == 0 {
            return;
        }
        // librdkafka purges what is left when the last handle drops; give it a moment first,
        // and make any loss visible. (Users should call `flush` before dropping.)
        let _ = producer.flush(DROP_FLUSH_TIMEOUT);
        let left = producer.in_flight_count();
        if left > 0 {
            tracing::warn!(
                undelivered = left,
                "producer dropped with undelivered records; they are purged (call flush() before dropping)"
            );
        }
    }
}

/// librdkafka headers from ours: names as given, values as bytes, null values kept null.
pub(crate) fn owned_headers<'a>(
    headers: impl ExactSizeIterator<Item = &'a Header>,
) -> OwnedHeaders {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for header in headers {
        owned = owned.insert(rdkafka::message::Header {
            key: &header.key,
            value: header.value.as_deref(),
        });
    }
    owned
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

    #[test]
    fn settings_apply_safe_defaults() {
        let (config, timeout) = ProducerSettings::new("127.0.0.1:9092".into())
            .config("test")
            .unwrap();
        assert_eq!(timeout, DEFAULT_SEND_TIMEOUT);
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("message.timeout.ms"), Some("30000"));
    }

    #[test]
    fn send_timeout_and_message_timeout_agree() {
        let mut settings = ProducerSettings::new("k:9092".into());
        settings.send_timeout = Some(Duration::from_secs(2));
        let (config, timeout) = settings.config("t").unwrap();
        assert_eq!(timeout, Duration::from_secs(2));
        assert_eq!(config.get("message.timeout.ms"), Some("2000"));

        let mut settings = ProducerSettings::new("k:9092".into());
        settings.set("delivery.timeout.ms".into(), "1500".into());
        let (config, timeout) = settings.config("t").unwrap();
        assert_eq!(timeout, Duration::from_millis(1500));
        assert_eq!(config.get("message.timeout.ms"), Some("1500"));
        assert_eq!(config.get("delivery.timeout.ms"), None);

        settings.send_timeout = Some(Duration::from_secs(3));
        assert!(matches!(
            settings.config("t"),
            Err(ConfigError::Conflict { .. })
        ));
    }

    #[test]
    fn unsafe_settings_are_refused() {
        for (key, value) in [
            ("message.timeout.ms", "0"),
            ("message.timeout.ms", "soon"),
            ("acks", "0"),
            ("request.required.acks", "0"),
            ("transactional.id", "tx-1"),
        ] {
            let mut settings = ProducerSettings::new("k:9092".into());
            settings.set(key.into(), value.into());
            assert!(
                matches!(settings.config("t"), Err(ConfigError::Conflict { .. })),
                "{key}={value} should be refused"
            );
        }
        assert_eq!(
            ProducerSettings::new(" ".into()).config("t").unwrap_err(),
            ConfigError::Missing("bootstrap_servers")
        );
        let mut settings = ProducerSettings::new("k:9092".into());
        settings.send_timeout = Some(Duration::ZERO);
        assert!(matches!(
            settings.config("t"),
            Err(ConfigError::Invalid {
                setting: "send_timeout",
                ..
            })
        ));
    }

    #[test]
    fn overrides_win_over_defaults() {
        let mut settings = ProducerSettings::new("k:9092".into());
        settings.set("enable.idempotence".into(), "false".into());
        settings.set("partitioner".into(), "consistent_random".into());
        let (config, _) = settings.config("t").unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("false"));
        assert_eq!(config.get("partitioner"), Some("consistent_random"));
    }

    #[test]
    fn topic_names_are_validated() {
        assert!(validate_topic_name("notify.v1").is_ok());
        assert!(validate_topic_name("a_b-c.d").is_ok());
        for bad in ["", ".", "..", "has space", "slash/topic", "ü"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
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
