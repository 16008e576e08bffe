//! The Kafka dead-letter topic sink.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use super::headers::{letter_headers, provenance_only_headers};
use super::{DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink, PendingLetter};
use crate::error::error_chain;
use crate::error::{ConfigError, Error, Result};
use crate::log_throttle::CLIENT_LOG_INTERVAL;
use crate::producer::{DEFAULT_SEND_TIMEOUT, ManagedProducer, ProducerSettings, check_timeout};
use crate::record::{Header, RecordBytes, owned_headers};

/// How long a dead-letter topic's partition count is trusted before it is fetched again.
const PARTITION_COUNT_MAX_AGE: Duration = Duration::from_secs(60);

/// Upper bound for one metadata request (it is also bounded by the send timeout).
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

const METADATA_OPERATION: &str = "fetch dead-letter topic metadata";
const SEND_OPERATION: &str = "write dead letter";

/// A log event about `record`'s dead letter to `dlt`: each carries the record's coordinates
/// and the dead-letter topic as the same four fields, then its own. A macro because tracing
/// takes field lists only as macro input.
macro_rules! letter_event {
    ($level:ident, $record:expr, $dlt:expr, $($fields:tt)+) => {
        tracing::$level!(
            topic = %$record.topic,
            partition = $record.partition,
            offset = $record.offset,
            dead_letter_topic = %$dlt,
            $($fields)+
        )
    };
}

type TopicNameFn = Arc<dyn Fn(&str) -> String + Send + Sync + 'static>;

/// Writes dead letters to Kafka dead-letter topics, by default `<topic>.dlt`.
///
/// # What a dead letter looks like
///
/// - **Key and value** are the source record's bytes, untouched; a null key or value stays
///   null.
/// - **Headers**: the source record's headers in their order, names and values byte for byte
///   (names that are not UTF-8, empty or hold NUL bytes included; null values stay null), minus any
///   provenance headers it already carried ([`headers::ALL`](super::headers::ALL)), then fresh provenance headers.
///   So re-dead-lettering a redriven record *replaces* its provenance instead of appending a
///   second copy, and headers do not grow. [`headers::REDRIVE_COUNT`](super::headers::REDRIVE_COUNT) is kept as it is.
/// - **Provenance** uses Spring Kafka's names and encodings, so Spring tools read kourier's
///   dead letters: `kafka_dlt-original-topic` (UTF-8), `-partition` (4-byte big-endian),
///   `-offset` and `-timestamp` (8-byte big-endian, ms since the epoch), `-timestamp-type`
///   (`CreateTime` / `LogAppendTime`; a record without timestamp gets Java's `-1` and
///   `NoTimestampType`), `-consumer-group`, `kafka_dlt-exception-message` (cut to
///   [`MAX_ERROR_MESSAGE_BYTES`](super::MAX_ERROR_MESSAGE_BYTES) on a character boundary) and
///   `kafka_dlt-exception-fqcn` (e.g. `kourier.RetriesExhausted`). kourier's own
///   `kourier-dlt-failure-kind`, `-attempts`, `-first-failure-ms` and `-last-failure-ms` are
///   decimal UTF-8 text.
/// - **Timestamp**: the dead letter gets a *new* timestamp (when it was written); the source
///   record's timestamp is kept in `kafka_dlt-original-timestamp`. This is what Spring Kafka
///   does too, and it keeps the dead-letter topic's time-based retention counting from the
///   dead-lettering: an old record written with its old timestamp could be deleted by
///   retention right away, or refused by a broker bounding timestamp skew.
/// - **Partition**: the source record's partition when the dead-letter topic has that
///   partition (Spring's convention, so a source partition maps to one dead-letter
///   partition); otherwise the producer's partitioner chooses by key, Java-compatibly
///   (`murmur2_random`: the partition a Java producer would pick; a null key gets a random
///   one). The partition count comes from metadata, fetched off the async runtime, cached per
///   topic for a minute and refreshed after any failed write. A dead-letter topic with fewer
///   partitions than its source (Spring Kafka issue #1700) is therefore not an error.
///
/// # Guarantees
///
/// [`send`](DeadLetterSink::send) returns only once the broker has acknowledged the letter
/// (`acks=all`, idempotent producer), with the letter's partition and offset. Every failure is
/// a [`DeadLetterError`]; the consumer retries it with back-off and never commits past the
/// record meanwhile. A missing dead-letter topic fails at once (the metadata says so) rather
/// than after the send timeout. A send that timed out may still have been written, so a retry
/// can write the letter twice: dead letters are at-least-once.
///
/// Given to a consumer with [transactional output](crate::transactional#dead-letters) (as
/// is, not wrapped), the sink writes nothing itself: the consumer's transactional producer
/// writes the records this sink would write, in the transaction that commits the record's
/// offset, so its letters are exactly-once for `read_committed` readers.
///
/// # Oversized records
///
/// When the broker or librdkafka refuses the letter as too large (`MessageSizeTooLarge`, e.g.
/// the dead-letter topic's `max.message.bytes` is smaller than the source topic's), the sink
/// writes a **metadata-only letter** instead: same key, *null value*, the same headers, plus
/// [`headers::VALUE_DROPPED_BYTES`](super::headers::VALUE_DROPPED_BYTES) holding the original value's size. If that is refused too
/// (the key or the record's own headers alone are too large), it writes a **provenance-only
/// letter**: no key, no value, only the provenance headers plus
/// [`headers::KEY_DROPPED_BYTES`](super::headers::KEY_DROPPED_BYTES) and [`headers::HEADERS_DROPPED`](super::headers::HEADERS_DROPPED), so a record never holds
/// its partition forever for its size. Only if even that is refused is the error returned.
///
/// Letters are batched (librdkafka's `linger.ms` and `batch.size`), so a burst of letters
/// costs the broker a few requests, not one each. The broker refuses a batch as a whole, so a
/// letter refused as too large is first written again **alone**, through a second producer
/// that sends one letter per batch (`batch.num.messages=1`, the same settings otherwise;
/// created at the first such refusal): a letter that fits on its own is written whole, and
/// only a letter that does not fit alone loses its value. The fallbacks above go through that
/// producer too. With [`from_producer`](KafkaDeadLetterSink::from_producer) there is no
/// second producer: set `batch.num.messages=1` on yours if letters of a batch must never lose
/// their value for another's size. When a letter whose value was dropped is dead-lettered
/// again with its value still null, the dropped-bytes header is carried over.
///
/// # Shutdown
///
/// Call [`flush`](KafkaDeadLetterSink::flush) before dropping the sink. A `send` being awaited
/// keeps the sink alive, so only abandoned (cancelled) sends can have letters in flight at
/// drop time; their records were not settled, so the consumer will dead-letter them again.
/// Dropping still waits up to a second for such letters and logs (at `warn`) how many were
/// purged, so nothing is lost silently.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kourier::{DeadLetterSink, KafkaDeadLetterSink};
///
/// # fn run() -> Result<(), kourier::Error> {
/// let sink: Arc<dyn DeadLetterSink> = Arc::new(
///     KafkaDeadLetterSink::builder("127.0.0.1:9092")
///         .topic_name(|topic: &str| format!("{topic}.dead"))
///         .send_timeout(Duration::from_secs(10))
///         .kafka_config("compression.type", "zstd")
///         .build()?,
/// );
/// # let _ = sink;
/// # Ok(())
/// # }
/// ```
pub struct KafkaDeadLetterSink {
    producer: SinkProducer,
    /// Writes a letter alone (`batch.num.messages=1`) once the sink's own producer had it
    /// refused as too large with the batch it went in: see *Oversized records*. `None` with a
    /// supplied producer.
    alone: Option<AloneProducer>,
    topic_name: TopicNameFn,
    partition_counts: Mutex<HashMap<String, PartitionCount>>,
}

/// The sink's own producer (its librdkafka logs throttled: it connects as soon as it is
/// built, and an unreachable cluster would otherwise log at every reconnect), or one the
/// user supplied.
#[derive(Debug)]
enum SinkProducer {
    Own(ManagedProducer),
    Supplied(ManagedProducer<DefaultClientContext>),
}

/// A producer that sends one letter per batch, created at the first letter refused as too
/// large with its batch (most sinks never need it).
struct AloneProducer {
    settings: ProducerSettings,
    log_interval: Duration,
    producer: std::sync::OnceLock<ManagedProducer>,
}

impl AloneProducer {
    fn new(mut settings: ProducerSettings, log_interval: Duration) -> Self {
        settings.set("batch.num.messages".into(), "1".into());
        AloneProducer {
            settings,
            log_interval,
            producer: std::sync::OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&ManagedProducer> {
        if let Some(producer) = self.producer.get() {
            return Ok(producer);
        }
        let producer = self
            .settings
            .build_logging_every("kourier-dead-letter-alone", self.log_interval)?;
        Ok(self.producer.get_or_init(|| producer))
    }
}

impl SinkProducer {
    async fn send(
        &self,
        record: FutureRecord<'_, [u8], [u8]>,
        operation: &'static str,
    ) -> Result<crate::producer::Delivery> {
        match self {
            SinkProducer::Own(p) => p.send(record, operation).await,
            SinkProducer::Supplied(p) => p.send(record, operation).await,
        }
    }

    /// Hands `record` to the producer; the acknowledgement is awaited with
    /// [`SinkProducer::acknowledgement`].
    async fn enqueue(
        &self,
        record: FutureRecord<'_, [u8], [u8]>,
        operation: &'static str,
    ) -> Result<(DeliveryFuture, Instant)> {
        match self {
            SinkProducer::Own(p) => {
                let deadline = p.deadline();
                Ok((p.enqueue(record, deadline, operation).await?, deadline))
            }
            SinkProducer::Supplied(p) => {
                let deadline = p.deadline();
                Ok((p.enqueue(record, deadline, operation).await?, deadline))
            }
        }
    }

    async fn acknowledgement(
        &self,
        (future, deadline): (DeliveryFuture, Instant),
        operation: &'static str,
    ) -> Result<crate::producer::Delivery> {
        match self {
            SinkProducer::Own(p) => p.acknowledgement(future, deadline, operation).await,
            SinkProducer::Supplied(p) => p.acknowledgement(future, deadline, operation).await,
        }
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        match self {
            SinkProducer::Own(p) => p.flush(timeout).await,
            SinkProducer::Supplied(p) => p.flush(timeout).await,
        }
    }

    fn send_timeout(&self) -> Duration {
        match self {
            SinkProducer::Own(p) => p.send_timeout,
            SinkProducer::Supplied(p) => p.send_timeout,
        }
    }

    /// `topic`'s metadata, through the producer's connections (blocking: run it on the
    /// blocking pool).
    fn metadata_fetcher(&self) -> Box<MetadataFetch> {
        match self {
            SinkProducer::Own(p) => {
                let p = p.current();
                Box::new(move |topic, timeout| p.client().fetch_metadata(Some(topic), timeout))
            }
            SinkProducer::Supplied(p) => {
                let p = p.current();
                Box::new(move |topic, timeout| p.client().fetch_metadata(Some(topic), timeout))
            }
        }
    }
}

type MetadataFetch =
    dyn FnOnce(&str, Duration) -> rdkafka::error::KafkaResult<rdkafka::metadata::Metadata> + Send;

#[derive(Debug, Clone, Copy)]
struct PartitionCount {
    count: i32,
    fetched: Instant,
}

impl fmt::Debug for KafkaDeadLetterSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaDeadLetterSink")
            .field("producer", &self.producer)
            .finish_non_exhaustive()
    }
}

impl KafkaDeadLetterSink {
    /// Starts building a sink that connects to `bootstrap_servers` (a comma-separated
    /// `host:port` list).
    pub fn builder(bootstrap_servers: impl Into<String>) -> KafkaDeadLetterSinkBuilder {
        KafkaDeadLetterSinkBuilder {
            settings: ProducerSettings::new(bootstrap_servers.into()),
            producer: None,
            topic_name: None,
            log_interval: CLIENT_LOG_INTERVAL,
        }
    }

    /// Starts building a sink that writes through a producer you built.
    ///
    /// kourier cannot see that producer's settings: make it idempotent with `acks=all` and a
    /// `message.timeout.ms` no longer than the sink's send timeout. `kafka_config` cannot be
    /// combined with it. If that producer hits a fatal error, it cannot be recreated, and
    /// writes keep failing (and are logged).
    pub fn from_producer(producer: FutureProducer) -> KafkaDeadLetterSinkBuilder {
        KafkaDeadLetterSinkBuilder {
            settings: ProducerSettings::new(String::new()),
            producer: Some(producer),
            topic_name: None,
            log_interval: CLIENT_LOG_INTERVAL,
        }
    }

    /// The dead-letter topic for records of `source_topic`.
    pub fn topic_for(&self, source_topic: &str) -> String {
        (self.topic_name)(source_topic)
    }

    /// Waits until every letter handed to the producer is acknowledged or failed, for at
    /// most `timeout`. Call it before dropping the sink.
    ///
    /// # Errors
    /// [`Error::Timeout`] when letters are still undelivered after `timeout`;
    /// [`Error::Kafka`] for other flush failures.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).await?;
        match self.alone.as_ref().and_then(|a| a.producer.get()) {
            Some(alone) => alone.flush(timeout).await,
            None => Ok(()),
        }
    }

    /// Checks the destination and queues the letter's full write; [`Self::finish_write`]
    /// awaits it. Returns the partition it goes to and the queued write.
    async fn queue_write(
        &self,
        letter: &DeadLetter,
        dlt: &str,
    ) -> Result<(Option<i32>, (DeliveryFuture, Instant))> {
        let record = &letter.record;
        let partition = self.destination(letter, dlt).await?;
        let full = letter_headers(letter, None);
        let queued = self
            .producer
            .enqueue(
                to_record(
                    dlt,
                    partition,
                    record.key.as_deref(),
                    record.value.as_deref(),
                    &full,
                ),
                SEND_OPERATION,
            )
            .await;
        match queued {
            Ok(queued) => Ok((partition, queued)),
            Err(e) => {
                self.forget_partition_count(dlt);
                Err(e)
            }
        }
    }

    /// Checks the dead-letter topic `dlt` of `letter` (a valid name, not its source) and
    /// chooses its partition: the source partition when `dlt` has it, else `None`.
    async fn destination(&self, letter: &DeadLetter, dlt: &str) -> Result<Option<i32>> {
        let record = &letter.record;
        if dlt == &*record.topic {
            return Err(ConfigError::invalid(
                "topic_name",
                format!("it maps `{dlt}` to itself, so dead letters would be consumed again"),
            )
            .into());
        }
        crate::topic_name::check(dlt)
            .map_err(|reason| ConfigError::invalid("topic_name", reason))?;
        self.partition_for(dlt, record.partition).await
    }

    /// The records this sink would write for `letter`, for a transactional producer to write
    /// instead (delivery rule 20): the full letter first, then the fallbacks written when a
    /// record is refused as too large (without the value, then provenance only; see
    /// *Oversized records*). Same topic, partition, key, value and headers as
    /// [`enqueue`](DeadLetterSink::enqueue) writes.
    pub(crate) async fn render(
        &self,
        letter: &DeadLetter,
    ) -> Result<Vec<LetterRecord>, DeadLetterError> {
        let dlt = self.topic_for(&letter.record.topic);
        let partition = match self.destination(letter, &dlt).await {
            Ok(partition) => partition,
            // Logged and named like a failed write (`outcome` of an error is that error).
            Err(e) => return self.outcome(letter, dlt, Err(e)).map(|_| Vec::new()),
        };
        let record = &letter.record;
        let at = |key: Option<&RecordBytes>, value: Option<&RecordBytes>, headers| LetterRecord {
            topic: dlt.clone(),
            partition,
            key: key.cloned(),
            value: value.cloned(),
            headers,
        };
        let mut records = vec![at(
            record.key.as_ref(),
            record.value.as_ref(),
            letter_headers(letter, None),
        )];
        if let Some(value) = &record.value {
            let metadata_only = letter_headers(letter, Some(value.len()));
            records.push(at(record.key.as_ref(), None, metadata_only));
        }
        records.push(at(None, None, provenance_only_headers(letter)));
        Ok(records)
    }

    /// Awaits the queued write's acknowledgement; a letter too large for its topic is written
    /// again without its value, then as provenance only.
    async fn finish_write(
        &self,
        letter: &DeadLetter,
        dlt: &str,
        partition: Option<i32>,
        queued: (DeliveryFuture, Instant),
    ) -> Result<DeadLetterReceipt> {
        let record = &letter.record;
        let first = self.producer.acknowledgement(queued, SEND_OPERATION).await;
        let first = match first {
            // Refused with the batch it went in: alone, it may fit.
            Err(e) if is_too_large(&e) && self.alone.is_some() => {
                let full = letter_headers(letter, None);
                let (key, value) = (record.key.as_deref(), record.value.as_deref());
                self.produce(dlt, partition, key, value, &full).await
            }
            other => other,
        };
        let delivery = match first {
            Err(e) if is_too_large(&e) && record.value.is_some() => {
                let dropped = record.value.as_ref().map_or(0, |v| v.len());
                letter_event!(
                    warn,
                    record,
                    dlt,
                    value_bytes = dropped,
                    "dead letter too large for its topic; writing a metadata-only letter without the value"
                );
                let metadata_only = letter_headers(letter, Some(dropped));
                self.produce(dlt, partition, record.key.as_deref(), None, &metadata_only)
                    .await
            }
            other => other,
        };
        let delivery = match delivery {
            Err(e) if is_too_large(&e) => {
                // Even without its value the letter does not fit: the key or the record's own
                // headers are too large. Write the provenance alone rather than retry forever.
                let key_bytes = record.key.as_ref().map_or(0, |k| k.len());
                letter_event!(
                    warn,
                    record,
                    dlt,
                    key_bytes,
                    headers = record.headers.len(),
                    "dead letter too large even without its value; writing its provenance only"
                );
                let provenance_only = provenance_only_headers(letter);
                self.produce(dlt, partition, None, None, &provenance_only)
                    .await
            }
            other => other,
        };
        match delivery {
            Ok(delivery) => Ok(DeadLetterReceipt {
                topic: dlt.to_owned(),
                partition: Some(delivery.partition),
                offset: Some(delivery.offset),
            }),
            Err(e) => {
                // The topic may have changed (deleted, recreated): look again next time.
                self.forget_partition_count(dlt);
                Err(e)
            }
        }
    }

    async fn produce(
        &self,
        dlt: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> Result<crate::producer::Delivery> {
        let record = to_record(dlt, partition, key, value, headers);
        match &self.alone {
            Some(alone) => alone.get()?.send(record, SEND_OPERATION).await,
            None => self.producer.send(record, SEND_OPERATION).await,
        }
    }

    /// The source partition when the dead-letter topic has it, else `None` (partition by key).
    async fn partition_for(&self, dlt: &str, source_partition: i32) -> Result<Option<i32>> {
        let count = self.partition_count(dlt).await?;
        Ok((0..count)
            .contains(&source_partition)
            .then_some(source_partition))
    }

    async fn partition_count(&self, dlt: &str) -> Result<i32> {
        let cached = self.lock_counts().get(dlt).copied();
        if let Some(cached) = cached
            && cached.fetched.elapsed() < PARTITION_COUNT_MAX_AGE
        {
            return Ok(cached.count);
        }
        match self.fetch_partition_count(dlt).await {
            Ok(count) => {
                self.lock_counts().insert(
                    dlt.to_owned(),
                    PartitionCount {
                        count,
                        fetched: Instant::now(),
                    },
                );
                Ok(count)
            }
            // Partition counts only grow, so a stale count is still safe to use while the
            // cluster does not answer; a topic that is gone is another matter.
            Err(e) => match cached {
                Some(cached) if !is_missing_topic(&e) => {
                    tracing::debug!(dead_letter_topic = dlt, error = %error_chain(&e), "metadata refresh failed; using the last known partition count");
                    Ok(cached.count)
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch_partition_count(&self, dlt: &str) -> Result<i32> {
        let timeout = self.producer.send_timeout().min(METADATA_TIMEOUT);
        crate::producer::fetch_partition_count(
            self.producer.metadata_fetcher(),
            dlt,
            timeout,
            METADATA_OPERATION,
        )
        .await
    }

    fn forget_partition_count(&self, dlt: &str) {
        self.lock_counts().remove(dlt);
    }

    fn lock_counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, PartitionCount>> {
        self.partition_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One record of a dead letter as [`KafkaDeadLetterSink::render`] gives it (or a
/// retry-tier forward, as the tiers render it for a transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LetterRecord {
    pub(crate) topic: String,
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<RecordBytes>,
    pub(crate) value: Option<RecordBytes>,
    pub(crate) headers: Vec<Header>,
}

impl LetterRecord {
    /// The record for a producer (the sink's own writes build theirs the same way).
    pub(crate) fn base_record(&self) -> rdkafka::producer::BaseRecord<'_, [u8], [u8]> {
        let mut record = rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&self.topic)
            .headers(owned_headers(self.headers.iter()));
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        if let Some(key) = &self.key {
            record = record.key(&**key);
        }
        if let Some(value) = &self.value {
            record = record.payload(&**value);
        }
        record
    }
}

/// The Kafka record of a letter (or of one of its fallbacks).
fn to_record<'a>(
    dlt: &'a str,
    partition: Option<i32>,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: &[Header],
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::<[u8], [u8]>::to(dlt).headers(owned_headers(headers.iter()));
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(value) = value {
        record = record.payload(value);
    }
    record
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetterSink {
    fn topics_for(&self, source_topic: &str) -> Vec<String> {
        vec![self.topic_for(source_topic)]
    }

    fn kafka_sink(&self, _: super::letter::sealed::Token) -> Option<&KafkaDeadLetterSink> {
        Some(self)
    }

    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        self.enqueue(letter).await.await
    }

    /// Queues the letter in the producer before it returns: letters of one source partition
    /// reach the dead-letter topic in the order they were queued.
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        let dlt = self.topic_for(&letter.record.topic);
        let queued = self.queue_write(letter, &dlt).await;
        Box::pin(async move {
            let written = match queued {
                Ok((partition, queued)) => self.finish_write(letter, &dlt, partition, queued).await,
                Err(e) => Err(e),
            };
            self.outcome(letter, dlt, written)
        })
    }
}

impl KafkaDeadLetterSink {
    /// Logs a write's outcome and names its destination in the error.
    fn outcome(
        &self,
        letter: &DeadLetter,
        dlt: String,
        written: Result<DeadLetterReceipt>,
    ) -> Result<DeadLetterReceipt, DeadLetterError> {
        let record = &letter.record;
        match written {
            Ok(receipt) => {
                letter_event!(
                    debug,
                    record,
                    dlt,
                    dead_letter_partition = receipt.partition,
                    dead_letter_offset = receipt.offset,
                    reason = %letter.reason,
                    "dead letter written"
                );
                Ok(receipt)
            }
            Err(e) => {
                letter_event!(
                    warn,
                    record,
                    dlt,
                    error = %error_chain(&e),
                    "dead-letter write failed"
                );
                Err(DeadLetterError {
                    coordinates: record.coordinates(),
                    destination: dlt,
                    source: Box::new(e),
                })
            }
        }
    }
}

/// Builds a [`KafkaDeadLetterSink`]; start with [`KafkaDeadLetterSink::builder`] or
/// [`KafkaDeadLetterSink::from_producer`].
///
/// Producer defaults (override with [`kafka_config`](Self::kafka_config)):
/// `enable.idempotence=true`, `acks=all`, `message.timeout.ms` = the send timeout (30 s),
/// `partitioner=murmur2_random` (Java-compatible), `client.id=kourier-dead-letter`. Letters
/// are batched; one refused as too large is written again alone (see
/// [oversized records](KafkaDeadLetterSink#oversized-records)).
#[must_use = "a builder does nothing until `build()` is called"]
pub struct KafkaDeadLetterSinkBuilder {
    settings: ProducerSettings,
    producer: Option<FutureProducer>,
    topic_name: Option<TopicNameFn>,
    /// How often the sink's own producer logs a condition that persists.
    log_interval: Duration,
}

impl fmt::Debug for KafkaDeadLetterSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaDeadLetterSinkBuilder")
            .field("settings", &self.settings)
            .field("user_producer", &self.producer.is_some())
            .field("custom_topic_name", &self.topic_name.is_some())
            .finish()
    }
}

impl KafkaDeadLetterSinkBuilder {
    /// How a source topic's name becomes its dead-letter topic's name (default:
    /// `<topic>.dlt`, e.g. `notify.v1` → `notify.v1.dlt`).
    ///
    /// A name that is not a valid topic name, or that equals the source topic (dead letters
    /// would be consumed again), makes each write fail with a configuration error.
    pub fn topic_name<F>(mut self, name: F) -> Self
    where
        F: Fn(&str) -> String + Send + Sync + 'static,
    {
        self.topic_name = Some(Arc::new(name));
        self
    }

    /// Sets a raw librdkafka producer property (applied after kourier's defaults, so it
    /// overrides them).
    ///
    /// `build()` refuses `acks=0`, `transactional.id`, a `message.timeout.ms` /
    /// `delivery.timeout.ms` of 0 (infinite) or one that contradicts
    /// [`send_timeout`](Self::send_timeout), and any property combined with
    /// [`KafkaDeadLetterSink::from_producer`].
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.set(key.into(), value.into());
        self
    }

    /// How long one write may wait for the broker's acknowledgement before it fails (default
    /// 30 s); also librdkafka's `message.timeout.ms`. A write that falls back to a
    /// metadata-only letter may take up to twice as long.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.settings.send_timeout = Some(timeout);
        self
    }

    /// How often the sink's own producer logs a condition that persists (default
    /// [`CLIENT_LOG_INTERVAL`], 30 s); a consumer gives the sink it builds its own
    /// `error_log_interval`.
    pub(crate) fn log_interval(mut self, interval: Duration) -> Self {
        self.log_interval = interval;
        self
    }

    /// Validates the settings and creates the producer. It does not connect yet; it can be
    /// called inside or outside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty bootstrap list, a zero or too-large send timeout, a
    /// refused librdkafka property (see [`kafka_config`](Self::kafka_config)), or
    /// `kafka_config` combined with a user's producer; [`Error::Kafka`] (operation
    /// `"create producer"`) when librdkafka rejects the configuration.
    pub fn build(self) -> Result<KafkaDeadLetterSink> {
        let KafkaDeadLetterSinkBuilder {
            settings,
            producer,
            topic_name,
            log_interval,
        } = self;
        let producer = match producer {
            Some(producer) => {
                if settings.has_overrides() {
                    return Err(ConfigError::invalid(
                        "kafka_config",
                        "cannot be combined with from_producer(): configure that producer instead",
                    )
                    .into());
                }
                let send_timeout =
                    check_timeout(settings.send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT))?;
                SinkProducer::Supplied(ManagedProducer::from_producer(producer, send_timeout))
            }
            None => SinkProducer::Own(
                settings.build_logging_every("kourier-dead-letter", log_interval)?,
            ),
        };
        let alone = matches!(producer, SinkProducer::Own(_))
            .then(|| AloneProducer::new(settings, log_interval));
        Ok(KafkaDeadLetterSink {
            producer,
            alone,
            topic_name: topic_name
                .unwrap_or_else(|| Arc::new(|topic: &str| format!("{topic}.dlt"))),
            partition_counts: Mutex::new(HashMap::new()),
        })
    }
}

fn is_missing_topic(e: &Error) -> bool {
    matches!(
        e,
        Error::Kafka {
            source: KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            ),
            ..
        }
    )
}

/// librdkafka's local size check and the broker's refusal share this code; a whole batch
/// refused is `MessageBatchTooLarge`.
fn is_too_large(e: &Error) -> bool {
    matches!(
        e,
        Error::Kafka {
            source: KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
            ),
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::headers::tests::letter;
    use crate::record::Headers;

    #[test]
    fn builder_validates() {
        let err = KafkaDeadLetterSink::builder("").build().unwrap_err();
        assert!(matches!(
            err,
            Error::Config(ConfigError::Missing("bootstrap_servers"))
        ));
        let err = KafkaDeadLetterSink::builder("k:9092")
            .kafka_config("acks", "0")
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config(ConfigError::Conflict { .. })));

        let sink = KafkaDeadLetterSink::builder("k:9092").build().unwrap();
        assert_eq!(sink.topic_for("notify.v1"), "notify.v1.dlt");
        let sink = KafkaDeadLetterSink::builder("k:9092")
            .topic_name(|t: &str| format!("dlq-{t}"))
            .build()
            .unwrap();
        assert_eq!(sink.topic_for("notify.v1"), "dlq-notify.v1");
    }

    #[tokio::test]
    async fn a_topic_mapped_to_itself_is_refused_without_io() {
        let sink = KafkaDeadLetterSink::builder("127.0.0.1:1")
            .topic_name(str::to_owned)
            .build()
            .unwrap();
        let err = sink.send(&letter(Headers::new(), None)).await.unwrap_err();
        assert_eq!(err.destination, "notify.v1");
        assert_eq!(err.coordinates, "notify.v1/3@42");
        let err = sink
            .render(&letter(Headers::new(), None))
            .await
            .unwrap_err();
        assert_eq!(err.destination, "notify.v1", "render checks the topic too");
    }

    /// A sink whose dead-letter topic `notify.v1.dlt` has `partitions` partitions (cached:
    /// nothing is fetched).
    fn sink_with_partitions(partitions: i32) -> KafkaDeadLetterSink {
        let sink = KafkaDeadLetterSink::builder("127.0.0.1:1").build().unwrap();
        sink.lock_counts().insert(
            "notify.v1.dlt".into(),
            PartitionCount {
                count: partitions,
                fetched: Instant::now(),
            },
        );
        sink
    }

    #[tokio::test]
    async fn a_rendered_letter_is_the_record_the_sink_writes_then_its_fallbacks() {
        let headers = Headers::from(vec![Header::new("trace", "t-1"), Header::null("empty")]);
        let letter = letter(headers, Some(b"{\"to\":\"a@b\"}".to_vec()));
        let records = sink_with_partitions(8).render(&letter).await.unwrap();
        let record = &letter.record;
        assert_eq!(records.len(), 3, "full, without value, provenance only");
        for r in &records {
            assert_eq!(r.topic, "notify.v1.dlt");
            assert_eq!(
                r.partition,
                Some(3),
                "the source partition, which the DLT has"
            );
        }
        let (full, metadata_only, provenance_only) = (&records[0], &records[1], &records[2]);
        assert_eq!(full.key, record.key);
        assert_eq!(full.value, record.value);
        assert_eq!(full.headers, letter_headers(&letter, None));
        assert_eq!(metadata_only.key, record.key);
        assert_eq!(metadata_only.value, None);
        assert_eq!(metadata_only.headers, letter_headers(&letter, Some(12)));
        assert_eq!(
            (&provenance_only.key, &provenance_only.value),
            (&None, &None)
        );
        assert_eq!(provenance_only.headers, provenance_only_headers(&letter));
    }

    #[tokio::test]
    async fn a_rendered_letter_goes_by_key_when_the_dlt_lacks_the_source_partition() {
        let records = sink_with_partitions(2)
            .render(&letter(Headers::new(), None))
            .await
            .unwrap();
        assert!(records.iter().all(|r| r.partition.is_none()));
        assert_eq!(records.len(), 2, "no value: no metadata-only fallback");
    }

    #[derive(Debug)]
    struct Wrapper(KafkaDeadLetterSink);

    #[async_trait]
    impl DeadLetterSink for Wrapper {
        async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
            self.0.send(letter).await
        }
        async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
            self.0.enqueue(letter).await
        }
        fn topics_for(&self, source_topic: &str) -> Vec<String> {
            self.0.topics_for(source_topic)
        }
    }

    #[test]
    fn only_the_kafka_sink_itself_writes_its_letters_in_a_transaction() {
        let token = || super::super::letter::sealed::Token(());
        let kafka: Arc<dyn DeadLetterSink> = Arc::new(sink_with_partitions(1));
        assert!(kafka.kafka_sink(token()).is_some());
        let wrapper: Arc<dyn DeadLetterSink> = Arc::new(Wrapper(sink_with_partitions(1)));
        assert!(wrapper.kafka_sink(token()).is_none());
    }
}
