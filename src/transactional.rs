//! Transactional output: exactly-once Kafka-to-Kafka.
//!
//! With [`RetryingConsumerBuilder::transactional`](crate::RetryingConsumerBuilder::transactional),
//! a handler stages output records on the [`Message`](crate::Message) it handles
//! ([`Message::send_output`](crate::Message::send_output)), and kourier produces them and
//! commits the consumed offsets **in one Kafka transaction**. A consumer of the output topics
//! that reads with `isolation.level=read_committed` sees each input's outputs exactly once,
//! across crashes, restarts and rebalances (delivery rule 20 in the crate docs).
//!
//! # How it works
//!
//! kourier owns one transactional producer per consumer. A record's staged outputs are
//! produced into the transaction open when the record *finishes* (its last attempt
//! succeeded), and the record counts as finished (its offset enters the commit point, or
//! the finished offsets above it) under the same guard that produces its outputs. At each
//! commit interval (and at a revoke, and at shutdown) the poll thread takes that guard
//! exclusively and sends, with the consumer's group metadata (KIP-447), the offsets and the
//! *same commit metadata as the non-transactional commit* (the offsets finished above each
//! partition's commit point) to the transaction, commits it and begins the next one.
//!
//! So what one transaction covers is "every record that finished since the last one",
//! whatever their order: a record that finished above a slower one of its partition has its
//! outputs and its finished mark (in the commit metadata) in the same transaction, and a new
//! owner of the partition skips exactly the records whose outputs were committed. A record
//! still running when the transaction commits has produced nothing yet: its outputs go into
//! a later transaction, with its offset.
//!
//! Staged outputs of a failed attempt are dropped: only the attempt that succeeds produces.
//!
//! # Dead letters
//!
//! With the [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) (the default sink, or one
//! given as is to [`dead_letter_sink`](crate::RetryingConsumerBuilder::dead_letter_sink)), a
//! record given up has its dead letter produced by the transactional producer, in the
//! transaction that commits its offset, the way a record's outputs are: the letter is the
//! record the sink would write (same dead-letter topic, the source partition when the topic
//! has it, key, value and headers), produced when the record finishes. A crash before the
//! commit aborts it with the record's offset, and the restarted consumer dead-letters the
//! record again: a `read_committed` reader of the dead-letter topic sees one letter per
//! record, and never one for a record whose transaction aborted. The sink's own producer
//! writes nothing then (only its metadata look-ups are used, to choose the partition).
//!
//! A letter above the transactional producer's `message.max.bytes` is written without its
//! value, then as provenance only, like the sink does; a letter the *broker* refuses as too
//! large (the dead-letter topic's `max.message.bytes` below the producer's
//! `message.max.bytes`) fails the transaction, as a refused output does. Give the
//! transactional producer the dead-letter topics' limit
//! ([`producer_config`](TransactionalOutput::producer_config)`("message.max.bytes", ..)`)
//! so that oversized letters fall back instead.
//!
//! # Retry-tier forwards
//!
//! With [`retry_tiers`](crate::RetryingConsumerBuilder::retry_tiers), a record given up to a
//! tier is forwarded the same way: its forward is the record the tiers would write (the
//! tier topic, the source partition when the tier topic has it, key, value, and the
//! provenance and tier headers), produced by the transactional producer in the transaction
//! that commits the record's offset. A crash before the commit aborts both; the restarted
//! consumer handles the record again and forwards it again: the consumer, which reads its
//! tier topics `read_committed` like its sources, sees one forward per record, and a tier
//! record's own offset commits in the transaction that carries what it led to (its outputs,
//! its next forward or its dead letter). The tiers' producer writes nothing then (it is used
//! to look up a tier topic's partition count, once, then kept). A tier record
//! becomes visible when its transaction commits, up to one commit interval after its due
//! time was set: a tier's delay is counted from the forward, so the wait in the tier shrinks
//! by that much (never below zero).
//!
//! Retry tiers that keep key order
//! ([`with_key_order`](crate::tiers::RetryTiers::with_key_order)) are refused: the key-order
//! ledger (Redis or in memory) is outside the transaction. Placing a record in the ledger
//! before its forward would be safe (a replay places it again), but the ledger *settles* a
//! record — letting the later records of its key run — before the record's transaction
//! commits; if that transaction aborts, a later record of the key can run and commit its
//! outputs before the record's replay commits its own, so a `read_committed` reader would
//! see the key's outputs out of order. Settling only once the transaction committed (as the
//! idempotency store's keys are marked done, below) moves the problem rather than solving
//! it: a process that dies between the commit and the settle leaves the record in the
//! ledger while its offset is committed, so it is never delivered again to settle it, and
//! the key's later records would go round the tier until the ledger's entry expires (with
//! Redis each deferral pushes that expiry back). Closing that window needs a settling state
//! the ledger can resolve after a crash; until then the combination is refused.
//!
//! # Idempotency
//!
//! With [`idempotency`](crate::RetryingConsumerBuilder::idempotency) (a handler with an
//! effect outside Kafka, a mail, that also stages outputs), a record's key is marked done in
//! the store only **after the transaction that carries its outputs** (or its dead letter,
//! or its forward) **and its offset committed**. Marked done before, a crash between the two
//! would leave the key done and the outputs aborted: the restarted consumer would skip the
//! record as a duplicate and its outputs would never be committed.
//!
//! So a record that succeeded ends its job (its outputs enter the open transaction, its
//! offset is finished, its slot and lane go to the next record) while its claim stays held
//! and renewed; once that transaction committed the key is marked done. The record's job
//! must end first: its outputs and offset enter a transaction only when it ends, so a job
//! that waited for the commit before ending would wait for itself. When the transaction
//! does not commit (it failed or was aborted, the consumer stopped with
//! [`Error::Transaction`](crate::Error::Transaction), or the record finished after its
//! partition was revoked and its outputs were dropped) the claim is **released**, not left
//! to expire: nothing of the record was committed, so its redelivery (after a restart, or
//! at the partition's new owner) runs it again at once and produces its outputs again in a
//! new transaction. A crash leaves the claim to run out with its lease, then the same
//! happens. A letter of a custom [`DeadLetterSink`](crate::DeadLetterSink) is acknowledged
//! before the record ends: its key is marked done at once, as without transactions.
//!
//! A duplicate (its key done already) is skipped as without transactions, its offset
//! committed in the transaction; a copy that arrives while the first copy's claim is held
//! waits (the key is busy) and is skipped once that transaction committed. `run` returns
//! once the claims the shutdown's transaction carried are marked done (or released), within
//! the shutdown timeout.
//!
//! The cost: each claim is held about one commit interval longer (a duplicate arriving
//! meanwhile waits that long), and a pending completion is kept per record finished since
//! the last commit.
//!
//! # Failures and fencing
//!
//! A transaction that cannot commit is aborted (its outputs are never visible to a
//! `read_committed` reader) and the consumer stops: [`run`](crate::RetryingConsumer::run)
//! returns [`Error::Transaction`](crate::Error::Transaction); nothing more is committed, so a
//! restart reads again from the last committed transaction and handles the aborted records
//! again. A producer fenced by a newer instance with the same transactional id, or a commit
//! refused because the group moved on (a zombie whose partitions were reassigned: the
//! consumer's group generation is checked by the broker, KIP-447) stop it the same way, with
//! [`Error::Transaction`](crate::Error::Transaction) whose `fenced` is `true`.
//!
//! # What stays at-least-once
//!
//! - Effects outside Kafka (a mail, an HTTP call, a database write) made by the handler: a
//!   record whose transaction aborted, or whose consumer crashed before it committed, is
//!   handled again, with an idempotency store too (its key is not done: see
//!   [Idempotency](#idempotency)).
//! - Dead letters of a custom [`DeadLetterSink`](crate::DeadLetterSink) (any sink but
//!   [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) itself, a wrapper of it included):
//!   the sink writes them, outside the transaction, so a record dead-lettered just before a
//!   crash is dead-lettered again after the restart. With the Kafka sink (the default), a
//!   record given up is dead-lettered **in the transaction**: see [Dead letters](#dead-letters).
//! - Retry tiers with a key-order ledger cannot be combined with transactional output:
//!   `build()` refuses them ([`ConfigError::Conflict`](crate::ConfigError::Conflict)). Retry
//!   tiers without one are forwarded in the transaction: see
//!   [Retry-tier forwards](#retry-tier-forwards).
//!
//! A panic that escapes kourier's own guards (a bug: a handler's panic is caught) resets its
//! partition to the commit point (delivery rule 14); with transactional output it stops the
//! consumer with [`Error::Transaction`](crate::Error::Transaction) instead, since the records
//! finished above the commit point would produce their outputs again.
//!
//! The commit metadata (up to 4,000 bytes) goes into the transaction too: a broker whose
//! `offset.metadata.max.bytes` is below that fails the transaction (the plain commit falls
//! back to commits without metadata; a transaction cannot).
//!
//! Exactly-once also needs the finished offsets above a commit point to fit in the commit's
//! metadata (about a thousand separate ranges of finished records above a stuck one); the
//! ranges past that are handled again after a rebalance, and their outputs appear again.
//!
//! # Cost
//!
//! One transaction per commit interval (a few round trips to the transaction coordinator),
//! workers that finish a record while a transaction commits wait for it, and a
//! `read_committed` reader sees outputs only once their transaction committed: latency of
//! about one commit interval. Measured on one drain with one output per input (the README's
//! "Transactional output"): 32 % below the same drain without output, 1.8× a handler that
//! awaits each output's acknowledgement itself.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The transactional setting of a consumer: see the [module docs](self).
///
/// ```
/// use kourier::transactional::TransactionalOutput;
///
/// // One id per running instance, stable across its restarts (e.g. the pod's name).
/// let output = TransactionalOutput::new("enricher-0");
/// # let _ = output;
/// ```
#[derive(Debug, Clone)]
pub struct TransactionalOutput {
    pub(crate) transactional_id: String,
    pub(crate) transaction_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) producer_config: Vec<(String, String)>,
}

impl TransactionalOutput {
    /// Transactional output with this `transactional.id`.
    ///
    /// Give each running instance its own id, and the **same id again when it restarts**
    /// (a StatefulSet pod name, a host name): a restarted instance then fences its previous
    /// incarnation and aborts the transaction it left open at once. A fresh id per start works
    /// too, but a transaction left open by a crash then holds back `read_committed` readers
    /// of its output partitions until the transaction timeout passes
    /// ([`with_transaction_timeout`](Self::with_transaction_timeout), 60 s by default).
    /// Two instances running with one id fence each other: the older stops.
    pub fn new(transactional_id: impl Into<String>) -> Self {
        TransactionalOutput {
            transactional_id: transactional_id.into(),
            transaction_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(30),
            producer_config: Vec::new(),
        }
    }

    /// The broker aborts a transaction open longer than this (`transaction.timeout.ms`,
    /// 60 s by default; at most the broker's `transaction.max.timeout.ms`). Keep it above the
    /// commit interval.
    #[must_use]
    pub fn with_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// How long one transactional operation (init, send offsets, commit, abort) may take
    /// before it is an error (30 s by default).
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// A raw librdkafka property for the transactional producer (security settings given to
    /// the consumer's [`kafka_config`](crate::RetryingConsumerBuilder::kafka_config) are
    /// applied to it already). `transactional.id`, `enable.idempotence` and `acks` are
    /// kourier's.
    #[must_use]
    pub fn producer_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_config.push((key.into(), value.into()));
        self
    }
}

/// One output record a handler stages with
/// [`Message::send_output`](crate::Message::send_output).
///
/// Without a partition it goes where the key says (murmur2, as Java clients do), or to a
/// random partition for a null key.
///
/// ```
/// use kourier::transactional::OutputRecord;
///
/// let record = OutputRecord::new("orders.enriched.v1")
///     .key("customer-42")
///     .value(r#"{"total":12}"#)
///     .header("source", "enricher");
/// # let _ = record;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub(crate) topic: String,
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl OutputRecord {
    /// A record for `topic`, with a null key and a null value.
    pub fn new(topic: impl Into<String>) -> Self {
        OutputRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }

    /// The key.
    #[must_use]
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The value.
    #[must_use]
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// A header (added after those given before).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The partition to write to (else chosen by key).
    #[must_use]
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// [`Message::send_output`](crate::Message::send_output) refused a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The consumer has no transactional setting
    /// ([`transactional`](crate::RetryingConsumerBuilder::transactional)), or the message was
    /// built by hand ([`Message::for_test`](crate::Message::for_test) without
    /// [`Message::with_staged_outputs`](crate::Message::with_staged_outputs)).
    #[error("the consumer is not transactional: output records cannot be staged")]
    NotTransactional,
}

/// The output records one attempt staged; shared by the clones of its message.
#[derive(Debug, Default)]
pub(crate) struct Staged(Mutex<Vec<OutputRecord>>);

impl Staged {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Staged::default())
    }

    pub(crate) fn push(&self, record: OutputRecord) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    pub(crate) fn snapshot(&self) -> Vec<OutputRecord> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn take(&self) -> Vec<OutputRecord> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
