//! Named settings of the builder that were bare `bool`s or counts: [`MissingTopics`],
//! [`PanicPolicy`] and [`CommitMetadata`].

/// What a consumer does at start when topics it needs do not exist: its subscribed topics,
/// the topics its dead-letter sink writes to and its retry-tier topics. Set with
/// [`RetryingConsumerBuilder::missing_topics`](crate::RetryingConsumerBuilder::missing_topics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingTopics {
    /// [`run`](crate::RetryingConsumer::run) fails with
    /// [`Error::MissingTopics`](crate::Error::MissingTopics) naming every missing topic. The
    /// default.
    #[default]
    Fail,
    /// Wait for them to be created (logging what it waits for once per
    /// [`error_log_interval`](crate::RetryingConsumerBuilder::error_log_interval)); the
    /// [`startup_timeout`](crate::RetryingConsumerBuilder::startup_timeout) then bounds only
    /// how long the cluster may stay unreachable.
    Wait,
    /// Create them: each subscribed topic with `partitions` partitions, each dead-letter and
    /// retry-tier topic with the partition count of its source topic (so records keep their
    /// source partition), with the broker's default replication factor and settings.
    /// Existing topics are not changed. For anything finer, create them with
    /// [`TopicAdmin`](crate::topics::TopicAdmin) first. Build it with
    /// [`MissingTopics::create`]; `build()` refuses zero partitions.
    #[non_exhaustive]
    Create {
        /// Partitions of a created subscribed topic (Kafka's count is a positive 32-bit
        /// integer; 65 535 is far above what one topic should have).
        partitions: u16,
    },
}

impl MissingTopics {
    /// [`MissingTopics::Create`] with `partitions` partitions for each created subscribed
    /// topic.
    pub const fn create(partitions: u16) -> Self {
        MissingTopics::Create { partitions }
    }
}

/// What happens to a record whose handler attempt panicked. Either way the attempt counts as
/// [`FailureKind::Panic`](crate::FailureKind::Panic), and a record given up after a panic
/// is dead-lettered as `panic`. Set with
/// [`RetryingConsumerBuilder::panic_policy`](crate::RetryingConsumerBuilder::panic_policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PanicPolicy {
    /// Retried like a transient failure (by the retry policy, then the retry tiers): a panic
    /// may come from a passing condition. The default.
    #[default]
    Retry,
    /// Dead-lettered at once.
    DeadLetter,
}

/// What a consumer's offset commits carry in their metadata. Set with
/// [`RetryingConsumerBuilder::commit_metadata`](crate::RetryingConsumerBuilder::commit_metadata).
///
/// A commit of offset `n` says that every record below `n` is done; records of a partition
/// settle out of order (key and unordered modes, a slow or stuck record), so records above
/// `n` may be done too. Without more, the partition's next owner (after a rebalance or a
/// restart) handles them all again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CommitMetadata {
    /// Each commit names, in its metadata, the offsets finished above its commit point
    /// (compactly: ranges, at most 4,000 bytes, under Kafka's default
    /// `offset.metadata.max.bytes` of 4,096; past it the highest ranges are left out and
    /// handled again). A commit is also sent when only those changed. At an assignment the
    /// consumer reads the committed metadata (one request, at most 5 s) and skips the
    /// records it names when they arrive, counted in
    /// [`ConsumerSnapshot::skipped_finished`](crate::ConsumerSnapshot::skipped_finished).
    /// Metadata kourier did not write (another client's, an old commit's) is ignored, and
    /// so is metadata that does not hold together (delivery rule 17); a broker that refuses
    /// it as too large turns it off, with one warning. The default.
    #[default]
    FinishedOffsets,
    /// No metadata: a new owner handles again every record from the commit point on (an
    /// idempotency store, if any, skips the finished ones).
    None,
}
