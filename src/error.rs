//! The crate's error type.

use std::time::Duration;

/// A boxed error, the cause carried by [`Error`] variants.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of kourier's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building or running a kourier component.
///
/// Configuration problems are reported by `build()` as [`Error::Config`] before anything
/// connects; runtime failures carry their cause in [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, out of range or contradicts another one.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),

    /// The Kafka client reported an error.
    #[error("kafka error during {operation}")]
    Kafka {
        /// What kourier was doing, e.g. `"create consumer"`.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// An event could not be encoded for publishing.
    #[error("could not encode the event for topic {topic}")]
    Encode {
        /// The topic the event was meant for.
        topic: String,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// The idempotency store failed.
    #[error("idempotency store error")]
    Store(#[from] crate::idempotency::StoreError),

    /// The dead-letter sink failed.
    #[error("dead-letter sink error")]
    DeadLetter(#[from] crate::dead_letter::DeadLetterError),

    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// How long kourier waited.
        after: Duration,
    },

    /// The consumer's poll thread stopped unexpectedly.
    #[error("the consumer's poll thread failed: {0}")]
    PollThread(String),

    /// A topic check or topic creation failed ([`crate::topics`]).
    #[error("topic administration failed")]
    Topic(#[from] crate::topics::TopicError),
}

/// `error: cause: cause`, for logs and dead letters. A cause whose text the message already
/// contains (many errors print their source themselves) is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

impl Error {
    pub(crate) fn kafka(operation: &'static str, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka { operation, source }
    }
}

/// A configuration problem found by a builder's `build()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting was not given.
    #[error("missing required setting `{0}`")]
    Missing(&'static str),
    /// A setting has a value outside its allowed range.
    #[error("setting `{setting}` is invalid: {reason}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// A raw librdkafka setting conflicts with what kourier must control.
    #[error("librdkafka setting `{key}` cannot be `{value}`: {reason}")]
    Conflict {
        /// The librdkafka property.
        key: String,
        /// The value that was given.
        value: String,
        /// Why kourier cannot work with it.
        reason: &'static str,
    },
}

impl ConfigError {
    pub(crate) fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting,
            reason: reason.into(),
        }
    }
}
