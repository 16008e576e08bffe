//! The dead letter and the sink trait (re-exported at the crate root).

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::DeadLetterError;
use crate::record::RawRecord;

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The record could not be decoded (a poison pill); the handler never ran.
    Decode,
    /// The handler returned a permanent failure.
    Permanent,
    /// Transient failures used up the retry policy.
    RetriesExhausted,
    /// Code on the record's path panicked — the handler on its last attempt (after the
    /// retries panics get by default), or the dedup-key function (dead-lettered at once: it
    /// would panic again). A bug, not an outage: fix it, then redrive.
    Panic,
}

impl DeadLetterReason {
    /// The stable name written to [`FAILURE_KIND`](crate::dead_letter::headers::FAILURE_KIND).
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::RetriesExhausted => "retries-exhausted",
            DeadLetterReason::Panic => "panic",
        }
    }

    /// Parses a [`FAILURE_KIND`](crate::dead_letter::headers::FAILURE_KIND) value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "decode" => Some(DeadLetterReason::Decode),
            "permanent" => Some(DeadLetterReason::Permanent),
            "retries-exhausted" => Some(DeadLetterReason::RetriesExhausted),
            "panic" => Some(DeadLetterReason::Panic),
            _ => None,
        }
    }

    pub(crate) fn fqcn(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "kourier.DecodeError",
            DeadLetterReason::Permanent => "kourier.PermanentFailure",
            DeadLetterReason::RetriesExhausted => "kourier.RetriesExhausted",
            DeadLetterReason::Panic => "kourier.Panic",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record given up on, with its provenance.
///
/// The consumer builds it; a custom [`DeadLetterSink`] reads its fields. It is
/// `#[non_exhaustive]` so that provenance can grow without breaking sinks: outside kourier,
/// make one with [`DeadLetter::new`] and set the other fields after, e.g. in a sink's tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The original record, untouched.
    pub record: Arc<RawRecord>,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The last error's message (the sink bounds its size).
    pub error: String,
    /// Attempts made (0 for a decode failure: the handler never ran).
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
    /// The consumer group that gave up.
    pub group_id: String,
}

impl DeadLetter {
    /// A dead letter for `record`, given up on for `reason` with the last error `error`: no
    /// attempts, both failure times now, no consumer group. Set the other fields after.
    ///
    /// ```
    /// use kourier::{DeadLetter, DeadLetterReason, RawRecord};
    ///
    /// let mut letter = DeadLetter::new(
    ///     RawRecord::builder("orders.v1").offset(7).value("{}").build(),
    ///     DeadLetterReason::Permanent,
    ///     "unknown customer",
    /// );
    /// letter.attempts = 1;
    /// letter.group_id = "billing".into();
    /// assert_eq!(letter.record.offset, 7);
    /// ```
    pub fn new(
        record: impl Into<Arc<RawRecord>>,
        reason: DeadLetterReason,
        error: impl Into<String>,
    ) -> Self {
        let now = SystemTime::now();
        DeadLetter {
            record: record.into(),
            reason,
            error: error.into(),
            attempts: 0,
            first_failure: now,
            last_failure: now,
            group_id: String::new(),
        }
    }
}

/// Where a dead letter was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterReceipt {
    /// The name of the destination the sink wrote to, for logs: for
    /// [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink), the dead-letter topic; for a custom
    /// sink, whatever it names its destination (a table, a queue, a directory), or empty.
    pub topic: String,
    /// Partition written to, if the destination has partitions.
    pub partition: Option<i32>,
    /// Offset written at, if known.
    pub offset: Option<i64>,
}

/// A dead letter being written (see [`DeadLetterSink::enqueue`]): resolves with the receipt
/// once the destination acknowledged it, or with the error that stopped it.
pub type PendingLetter<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<DeadLetterReceipt, DeadLetterError>> + Send + 'a>,
>;

/// Receives dead letters. Object-safe: use it as `Arc<dyn DeadLetterSink>`.
///
/// `send` returns only once the letter is durably stored (for Kafka: acknowledged by the
/// broker); the consumer commits the source offset only after that.
///
/// Put `#[async_trait]` ([`kourier::async_trait`](macro@crate::async_trait)) on the `impl` as
/// on the trait: without it rustc reports E0195 ("lifetime parameters or bounds on method do
/// not match the trait declaration"). [`DeadLetter::headers`] gives the provenance headers
/// kourier's own sink writes, so letters from a custom sink read back the same.
///
/// # Every method is required
///
/// Besides writing ([`send`](Self::send)), a sink tells the consumer how it writes
/// ([`enqueue`](Self::enqueue): whether letters of one partition are queued in order) and
/// where ([`topics_for`](Self::topics_for): the topics checked at start). None of them has a
/// default, on purpose: a sink that wraps another (to count letters, filter them, send a
/// copy elsewhere) must say for each whether it forwards it. With defaults, a wrapper around
/// [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) that wrote only `send` compiled and
/// silently lost the startup check of its dead-letter topics (a missing topic then held its
/// partition at the first failure instead of failing `run()`) and the in-order queueing.
/// Now leaving a method out is a compile error (E0046, "not all trait items implemented"):
///
/// ```compile_fail,E0046
/// use kourier::{async_trait, DeadLetter, DeadLetterError, DeadLetterReceipt};
///
/// #[derive(Debug)]
/// struct Counting(kourier::KafkaDeadLetterSink);
///
/// #[async_trait]
/// impl kourier::DeadLetterSink for Counting {
///     async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
///         self.0.send(letter).await // enqueue and topics_for not forwarded: does not compile
///     }
/// }
/// ```
///
/// A wrapper forwards all three:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use kourier::{async_trait, DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink};
/// use kourier::{KafkaDeadLetterSink, PendingLetter};
///
/// #[derive(Debug)]
/// struct Counting {
///     inner: KafkaDeadLetterSink,
///     letters: AtomicU64,
/// }
///
/// #[async_trait]
/// impl DeadLetterSink for Counting {
///     async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
///         self.letters.fetch_add(1, Ordering::Relaxed);
///         self.inner.send(letter).await
///     }
///     async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
///         self.letters.fetch_add(1, Ordering::Relaxed);
///         self.inner.enqueue(letter).await // keeps the Kafka sink's in-order queueing
///     }
///     fn topics_for(&self, source_topic: &str) -> Vec<String> {
///         self.inner.topics_for(source_topic) // keeps the startup check of `<topic>.dlt`
///     }
/// }
/// ```
///
/// A sink of its own that queues nothing and writes outside Kafka says so in one line each:
///
/// ```
/// use kourier::{async_trait, DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink};
/// use kourier::PendingLetter;
///
/// #[derive(Debug)]
/// struct Table;
///
/// #[async_trait]
/// impl DeadLetterSink for Table {
///     async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
///         # let _ = letter;
///         todo!("insert the letter, return once it is stored")
///     }
///     async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
///         self.send(letter) // nothing queued: the write starts when the consumer awaits it
///     }
///     fn topics_for(&self, _source_topic: &str) -> Vec<String> {
///         Vec::new() // no Kafka topic to check at start
///     }
/// }
/// ```
#[async_trait]
pub trait DeadLetterSink: Send + Sync + fmt::Debug + 'static {
    /// Writes one dead letter.
    ///
    /// # Errors
    /// A [`DeadLetterError`] when the letter was not stored; the consumer retries.
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError>;

    /// Starts writing one dead letter: returns once the letter is queued, with the write's
    /// outcome still to come. The consumer writes every letter through this method: it lets
    /// the source partition's next record start as soon as this returns and commits the
    /// record's offset only when the returned future answers `Ok` (several letters of a
    /// partition are then in flight at once).
    ///
    /// A sink that queues nothing returns [`send`](DeadLetterSink::send) unstarted
    /// (`self.send(letter)`): the letters of one partition are then written concurrently
    /// and may reach the destination out of source order.
    /// [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) hands the letter to its producer
    /// before it returns, so letters of one source partition keep their order (unless a
    /// write fails and is retried); a sink that wraps it forwards this call to keep that.
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a>;

    /// The Kafka topics this sink writes the dead letters of `source_topic` to. The
    /// consumer checks at start that they exist (and creates them when told to), so a
    /// missing topic is an error at start rather than a partition that waits forever at the
    /// first failure. A sink that writes elsewhere answers none (`Vec::new()`); a sink that
    /// wraps a Kafka sink forwards this call.
    fn topics_for(&self, source_topic: &str) -> Vec<String>;

    /// Not part of the API (it cannot be called or overridden outside kourier): the
    /// [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) itself, whose letters a
    /// transactional consumer writes in its transaction (delivery rule 20). Any other sink,
    /// a wrapper of the Kafka sink included, answers `None` and writes its letters itself.
    #[doc(hidden)]
    fn kafka_sink(&self, _: sealed::Token) -> Option<&super::KafkaDeadLetterSink> {
        None
    }
}

pub(crate) mod sealed {
    /// Makes [`DeadLetterSink::kafka_sink`](super::DeadLetterSink::kafka_sink) kourier's
    /// own: a type outside kourier cannot name it, so cannot implement or call the method.
    #[allow(unreachable_pub)] // named in a public trait's method, so `pub`, but unreachable
    #[derive(Debug, Clone, Copy)]
    pub struct Token(pub(crate) ());
}
