//! The crate's error types: [`Error`] and [`ConfigError`], and the errors of the pluggable
//! parts ([`StoreError`], [`DeadLetterError`]), which [`Error`] wraps. They live here, in the
//! bottom layer, so that [`Error`] can wrap them without the parts and the error type
//! importing each other.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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
    /// A setting is missing, out of range or contradicts another one. The details are in
    /// the message (not repeated as a `source()`).
    #[error("invalid configuration: {0}")]
    Config(ConfigError),

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
    Store(#[from] StoreError),

    /// The dead-letter sink failed.
    #[error("dead-letter sink error")]
    DeadLetter(#[from] DeadLetterError),

    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// How long kourier waited.
        after: Duration,
    },

    /// The cluster could not be reached: at start within the startup timeout (whatever
    /// step met it: creating missing topics or the startup checks), or while running for
    /// longer than the maximum broker outage. A broker that answers and refuses (missing
    /// authorization, an invalid topic) is another error, e.g. [`Error::Topic`].
    #[error("kafka brokers {servers} unreachable for {after:?}")]
    BrokersUnreachable {
        /// The bootstrap servers tried.
        servers: String,
        /// How long kourier tried.
        after: Duration,
    },

    /// Topics the consumer needs do not exist (subscribed topics, dead-letter topics).
    #[error("missing topics: {} ({hint})", topics.join(", "))]
    MissingTopics {
        /// The topics that do not exist.
        topics: Vec<String>,
        /// What would create them, e.g. the builder setting.
        hint: String,
    },

    /// Records were given up unsettled at shutdown, from
    /// [`ShutdownReport::into_result`](crate::ShutdownReport::into_result); they are
    /// delivered again after a restart.
    #[error("{count} records abandoned at shutdown (first: {})", records.first().map_or("-", String::as_str))]
    Abandoned {
        /// How many.
        count: usize,
        /// The first of them, as `topic/partition@offset`.
        records: Vec<String>,
    },

    /// The final commit at shutdown failed until the shutdown deadline, from
    /// [`ShutdownReport::into_result`](crate::ShutdownReport::into_result): the settled
    /// records of these partitions since their last commit are delivered again after a
    /// restart.
    #[error("final commit at shutdown failed; {} partitions left uncommitted (first: {})", uncommitted.len(), uncommitted.first().map_or("-", String::as_str))]
    Commit {
        /// The partitions left uncommitted, as `topic/partition@offset` (the offset they
        /// should have been committed at).
        uncommitted: Vec<String>,
        /// The last error of the commit.
        #[source]
        source: KafkaError,
    },

    /// The consumer's poll thread could not be started or stopped unexpectedly: the cause
    /// is a [`PollThreadError`] (also its `source()`).
    #[error("the consumer's poll thread failed")]
    PollThread(#[source] PollThreadError),

    /// A topic check or topic creation failed ([`crate::topics`]).
    #[error("topic administration failed")]
    Topic(#[from] TopicError),

    /// Transactional output ([`crate::transactional`]) failed: the open transaction was
    /// aborted (or left to the broker's transaction timeout) and the consumer stopped without
    /// committing anything more. A restart reads again from the last committed transaction.
    #[error("transaction failed during {operation}{}", if *fenced { " (fenced: another instance or a newer group generation took over)" } else { "" })]
    Transaction {
        /// What failed (`init transactions`, `commit transaction`, ...).
        operation: &'static str,
        /// Another producer with the same transactional id, or a newer generation of the
        /// consumer group, took over: this instance is a zombie.
        fenced: bool,
        /// The error.
        #[source]
        source: KafkaError,
    },
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

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl Error {
    pub(crate) fn kafka(operation: &'static str, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka { operation, source }
    }

    /// Whether this is a configuration problem ([`Error::Config`]): fix the settings, do
    /// not retry.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }

    /// Whether the cluster could not be reached: [`Error::BrokersUnreachable`] (the
    /// consumer, whatever step met it), or a [`TopicAdmin`](crate::topics::TopicAdmin)
    /// call's [`TopicError::Unreachable`].
    pub fn is_brokers_unreachable(&self) -> bool {
        matches!(
            self,
            Error::BrokersUnreachable { .. } | Error::Topic(TopicError::Unreachable { .. })
        )
    }

    /// Whether topics are missing ([`Error::MissingTopics`]).
    pub fn is_missing_topics(&self) -> bool {
        matches!(self, Error::MissingTopics { .. })
    }

    /// Whether records were abandoned at shutdown ([`Error::Abandoned`]).
    pub fn is_abandoned(&self) -> bool {
        matches!(self, Error::Abandoned { .. })
    }

    /// Whether the final commit at shutdown failed ([`Error::Commit`]).
    pub fn is_commit_failed(&self) -> bool {
        matches!(self, Error::Commit { .. })
    }

    /// Whether an operation timed out ([`Error::Timeout`], or a store timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::Store(StoreError::Timeout { .. })
        )
    }

    /// The topics of an [`Error::MissingTopics`], else none.
    pub fn missing_topics(&self) -> &[String] {
        match self {
            Error::MissingTopics { topics, .. } => topics,
            _ => &[],
        }
    }
}

/// Why the consumer's poll thread failed (inside [`Error::PollThread`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PollThreadError {
    /// The operating system refused to start the thread.
    #[error("cannot start the poll thread")]
    Spawn(#[source] std::io::Error),
    /// The thread panicked (a bug in kourier or in a plug-in called on it): the panic's
    /// message.
    #[error("the poll thread panicked: {0}")]
    Panicked(String),
}

impl From<PollThreadError> for Error {
    fn from(e: PollThreadError) -> Self {
        Error::PollThread(e)
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

/// An idempotency store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The claim's lease expired and the key is no longer held by this token.
    #[error("claim on key {key:?} is no longer held by this token")]
    LeaseLost {
        /// The dedup key.
        key: String,
    },
    /// The store could not be reached or answered with an error.
    #[error("idempotency store unavailable during {operation}")]
    Unavailable {
        /// `claim`, `complete`, `release` or `renew` (or `connect` when a store is being
        /// built).
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The store did not answer in time.
    #[error("idempotency store timed out during {operation} after {after:?}")]
    Timeout {
        /// `claim`, `complete`, `release` or `renew` (or `connect` when a store is being
        /// built).
        operation: &'static str,
        /// How long kourier waited.
        after: Duration,
    },
    /// The store does not implement this operation (a store that cannot
    /// [`renew`](crate::IdempotencyStore::renew)): nothing was changed.
    #[error("the idempotency store does not support {operation}")]
    Unsupported {
        /// The operation, e.g. `renew`.
        operation: &'static str,
    },
}

impl StoreError {
    /// Whether this is [`StoreError::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, StoreError::LeaseLost { .. })
    }

    /// Whether this is [`StoreError::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, StoreError::Unsupported { .. })
    }
}

/// A dead-letter write failed. The consumer retries it with back-off, without end, and does
/// not commit past the record meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter write of {coordinates} to {destination} failed")]
pub struct DeadLetterError {
    /// The source record's `topic/partition@offset`.
    pub coordinates: String,
    /// The destination's name.
    pub destination: String,
    /// The underlying error.
    #[source]
    pub source: BoxError,
}

/// Why a [`TopicAdmin`](crate::topics::TopicAdmin) call failed (inside [`Error::Topic`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The cluster did not answer a metadata request within the admin's timeout: nothing
    /// listens at the bootstrap servers, they cannot be resolved, or the connection or
    /// authentication fails.
    #[error("kafka cluster at {bootstrap_servers} did not answer within {after:?}")]
    Unreachable {
        /// The bootstrap servers that were tried.
        bootstrap_servers: String,
        /// How long kourier tried: the admin's timeout.
        after: Duration,
        /// librdkafka's last error, when it gave one.
        #[source]
        source: Option<KafkaError>,
    },

    /// The broker refused to create a topic (invalid name, replication factor above the
    /// broker count, policy violation, missing authorization, ...).
    #[error("cannot create topic {topic}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's answer.
        #[source]
        code: RDKafkaErrorCode,
    },

    /// Topics were created but their partitions did not all have a leader in the cluster's
    /// metadata within the admin's timeout.
    #[error("created topics {topics:?} have no leader for every partition after {after:?}")]
    NotReady {
        /// The topics not ready yet.
        topics: Vec<String>,
        /// How long the call waited in all: the admin's timeout.
        after: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{:#}`-style chains (anyhow, `error_chain`) print each message once.
    #[test]
    fn no_message_is_repeated_in_a_chain() {
        let e = Error::from(ConfigError::Missing("group_id"));
        assert_eq!(
            error_chain(&e),
            "invalid configuration: missing required setting `group_id`"
        );
        assert!(e.is_config() && !e.is_timeout());
        let e = Error::Store(StoreError::Timeout {
            operation: "claim",
            after: Duration::from_secs(1),
        });
        assert_eq!(
            error_chain(&e),
            "idempotency store error: idempotency store timed out during claim after 1s"
        );
        assert!(e.is_timeout());
        let e = Error::MissingTopics {
            topics: vec!["a.dlt".into()],
            hint: "create it".into(),
        };
        assert_eq!(e.to_string(), "missing topics: a.dlt (create it)");
        assert_eq!(e.missing_topics(), ["a.dlt".to_owned()]);
    }

    /// The poll thread's cause is typed and in the chain once; the error stays
    /// `Send + Sync + 'static`.
    #[test]
    fn a_poll_thread_failure_carries_its_cause() {
        fn send_sync_static<T: Send + Sync + 'static>(_: &T) {}
        let spawn = Error::from(PollThreadError::Spawn(std::io::Error::other("no threads")));
        send_sync_static(&spawn);
        assert_eq!(
            error_chain(&spawn),
            "the consumer's poll thread failed: cannot start the poll thread: no threads"
        );
        let io = std::error::Error::source(&spawn)
            .and_then(std::error::Error::source)
            .and_then(|e| e.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::Other)
        );
        let panicked = Error::PollThread(PollThreadError::Panicked("boom".into()));
        assert!(matches!(
            &panicked,
            Error::PollThread(PollThreadError::Panicked(m)) if m == "boom"
        ));
        assert_eq!(
            error_chain(&panicked),
            "the consumer's poll thread failed: the poll thread panicked: boom"
        );
    }
}
