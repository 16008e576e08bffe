//! Producer plumbing shared by the [`Publisher`](crate::Publisher) and the Kafka dead-letter
//! sink: settings validation, bounded enqueue and acknowledgement, flushing, and recovery
//! from a fatal producer error.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use crate::clock;
use crate::error::{ConfigError, Error, Result};
use crate::log_throttle::{CLIENT_LOG_INTERVAL, ThrottledLogContext};

/// Where the broker stored a published record.
///
/// `#[non_exhaustive]`: more of the broker's answer (e.g. its timestamp) may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Delivery {
    /// The partition the record was written to.
    pub partition: i32,
    /// The record's offset in that partition.
    pub offset: i64,
}

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

    /// Validates the settings and creates the producer. Its librdkafka logs and errors go
    /// through a [`ThrottledLogContext`] with the default [`CLIENT_LOG_INTERVAL`].
    pub(crate) fn build(&self, client_id: &str) -> Result<ManagedProducer> {
        self.build_logging_every(client_id, CLIENT_LOG_INTERVAL)
    }

    /// As [`build`](Self::build), logging a condition that persists once per `interval`
    /// (a consumer's `error_log_interval`, for the producers it creates).
    pub(crate) fn build_logging_every(
        &self,
        client_id: &str,
        interval: Duration,
    ) -> Result<ManagedProducer> {
        let (config, send_timeout) = self.config(client_id)?;
        let context = ThrottledLogContext::new(interval);
        let producer: FutureProducer<ThrottledLogContext> = config
            .create_with_context(context.clone())
            .map_err(|e| Error::kafka("create producer", e))?;
        Ok(ManagedProducer {
            current: Mutex::new(Generation {
                number: 0,
                producer,
            }),
            config: Some((config, context)),
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

struct Generation<C: ClientContext + 'static> {
    number: u64,
    producer: FutureProducer<C>,
}

/// A `FutureProducer` with kourier's send discipline: bounded enqueue (retrying while the
/// local queue is full), an acknowledgement awaited with a deadline, and replacement of the
/// producer after a fatal error (e.g. an idempotence failure), which otherwise would fail
/// every later send.
///
/// The producers kourier creates have a [`ThrottledLogContext`] (the default type): their
/// librdkafka log lines and errors are throttled like the consumer's (rule 13 in the crate
/// docs), not printed at every reconnect. A producer the user built keeps its own context.
pub(crate) struct ManagedProducer<C: ClientContext + 'static = ThrottledLogContext> {
    current: Mutex<Generation<C>>,
    /// `None` for a producer the user built: it cannot be recreated.
    config: Option<(ClientConfig, C)>,
    pub(crate) send_timeout: Duration,
}

impl<C: ClientContext + 'static> fmt::Debug for ManagedProducer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedProducer")
            .field("send_timeout", &self.send_timeout)
            .field("owned_config", &self.config.is_some())
            .finish_non_exhaustive()
    }
}

impl ManagedProducer<DefaultClientContext> {
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
}

impl<C: ClientContext + Clone + 'static> ManagedProducer<C> {
    fn generation(&self) -> (u64, FutureProducer<C>) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.number, current.producer.clone())
    }

    pub(crate) fn current(&self) -> FutureProducer<C> {
        self.generation().1
    }

    /// When an operation started now must have finished.
    pub(crate) fn deadline(&self) -> Instant {
        clock::deadline_in(self.send_timeout.saturating_add(DELIVERY_REPORT_GRACE))
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
                    if clock::deadline_in(QUEUE_FULL_PAUSE) < deadline =>
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
                    after: self.send_timeout.saturating_add(DELIVERY_REPORT_GRACE),
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
    fn recover_if_fatal(&self, generation: u64, producer: &FutureProducer<C>) {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return;
        };
        let Some((config, context)) = &self.config else {
            tracing::error!(%code, %reason, "the producer hit a fatal error and was supplied by the user, so it cannot be recreated");
            return;
        };
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.number != generation {
            return; // another task already replaced it
        }
        match config.create_with_context::<C, FutureProducer<C>>(context.clone()) {
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

impl<C: ClientContext + 'static> Drop for ManagedProducer<C> {
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

/// How many partitions `topic` has, from the broker. `fetch` (a client's metadata call,
/// which blocks until the broker answers) runs on a blocking thread; errors are
/// [`Error::Kafka`] for `operation`: a topic the broker does not know is
/// `UnknownTopicOrPartition`, one without partitions `LeaderNotAvailable`.
pub(crate) async fn fetch_partition_count(
    fetch: impl FnOnce(&str, Duration) -> rdkafka::error::KafkaResult<rdkafka::metadata::Metadata>
    + Send
    + 'static,
    topic: &str,
    timeout: Duration,
    operation: &'static str,
) -> Result<i32> {
    let name = topic.to_owned();
    let metadata = tokio::task::spawn_blocking(move || fetch(&name, timeout))
        .await
        .map_err(|_join| Error::kafka(operation, KafkaError::Canceled))?
        .map_err(|e| Error::kafka(operation, e))?;
    let missing = |code| Error::kafka(operation, KafkaError::MetadataFetch(code));
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| missing(RDKafkaErrorCode::UnknownTopicOrPartition))?;
    if let Some(err) = found.error() {
        return Err(missing(err.into()));
    }
    match i32::try_from(found.partitions().len()) {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(missing(RDKafkaErrorCode::LeaderNotAvailable)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
