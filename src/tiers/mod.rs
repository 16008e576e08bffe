//! Retry tiers: non-blocking delayed retries that can keep per-key order.
//!
//! # What happens to a failing record
//!
//! A record first gets the in-place attempts of the consumer's [`RetryPolicy`](crate::RetryPolicy).
//! When they are used up by *transient* failures (or panics, under the default
//! [`PanicPolicy::Retry`](crate::PanicPolicy::Retry)), the record is **forwarded** to the
//! next retry tier instead of the dead-letter topic: a topic of its own, by default
//! `<source topic>.retry.<n>` (`n` = 1, 2, …; override with [`RetryTiers::with_topic_name`]).
//! After the last tier comes the dead-letter topic. A record gets one *stage* (a full set of
//! in-place attempts) per tier plus one, wherever it starts: one that was deferred into a
//! later tier to keep its key's order (below) and fails in the last tier goes round that
//! tier again until it has had its stages ([`headers::FAILED_STAGES`]). Permanent failures
//! and poison pills go to the dead-letter topic at once, whatever the tier.
//!
//! The same [`RetryingConsumer`](crate::RetryingConsumer) subscribes to its tier topics. A
//! tier record runs the full retry policy again (its in-place attempts), then moves on. The
//! handler sees the tier record as it is: [`Message::topic`](crate::Message::topic) is the tier
//! topic, [`Message::attempt`](crate::Message::attempt) counts from 1 in each tier, and the
//! headers tell the source record and the attempts before
//! ([`Provenance::from_headers`](crate::dead_letter::Provenance::from_headers), [`headers::TIER`]).
//! With idempotency, each forward is a position of the event with a dedup key of its own
//! (the event's key with `#h<hop>` appended, [`headers::HOP`]), marked done once that copy
//! is settled — handled, dead-lettered or forwarded on: a duplicate forward, or a stale copy
//! a crash brings back, is skipped, and the event is dead-lettered at most once (see
//! [`idempotency`](crate::idempotency#deliveries-of-one-event-delivery-rule-18)).
//!
//! # The forwarded record
//!
//! - **Key, value and headers** byte for byte (header names are bytes, null values stay null),
//!   through the same header writer as dead letters.
//! - **Provenance**, in the dead-letter names and encodings of [`dead_letter::headers`](crate::dead_letter::headers),
//!   so [`Provenance::from_headers`](crate::dead_letter::Provenance::from_headers) reads a tier
//!   record like a dead letter: original topic, partition, offset, timestamp (type), consumer
//!   group, failure kind, last error, attempts **summed over all tiers**, first and last
//!   failure time. They are replaced (never appended) on every forward, so headers do not grow.
//! - **Tier headers** ([`headers`]): [`headers::TIER`] (1-based), [`headers::DUE_MS`] (when it may
//!   run, ms since the epoch) and, for a record moved for key order rather than for a failure,
//!   [`headers::DEFERRED`].
//! - **Partition**: the source partition when the tier topic has it (so one source partition
//!   maps to one tier partition and the records of a key stay in one tier partition),
//!   otherwise the producer's partitioner chooses by key. Decided for each record alone:
//!   nothing learned from one record changes where another goes (see
//!   [Headers are untrusted](#headers-are-untrusted)).
//! - **Timestamp**: a new one (the original is in `kafka_dlt-original-timestamp`).
//!
//! A record dead-lettered from a tier is written as if it came from its *source* record: to
//! the source topic's dead-letter topic, with the source topic/partition/offset/timestamp as
//! its provenance and the tier headers removed. So the dead-letter tool and a redrive treat it
//! like any other dead letter: a redrive sends it back to the source topic.
//!
//! # Commit rule: a crash duplicates a forward, never loses one
//!
//! The forwarded record settles its source offset only after the broker acknowledged the
//! forward (`acks=all`, idempotent producer); until then the offset is not committed. A crash
//! between the acknowledgement and the commit forwards the record again after a restart: a
//! duplicate in the tier topic. With idempotency the forward marks its delivery settled
//! right after the acknowledgement, so the redelivered source record is skipped, and a
//! duplicate that got through (a crash between the acknowledgement and the mark) is skipped
//! when it comes up in the tier: both copies are one position of the event.
//!
//! **Not transactional (a choice).** Forwarding and committing the source offset in one Kafka
//! transaction would make the forward exactly-once, but kourier commits offsets of a
//! partition in a contiguous watermark shared by records that are handled, dead-lettered and
//! forwarded, from several concurrent workers; a transaction per forward would need a
//! transactional producer per partition (or a fenced producer per consumer instance, Kafka's
//! KIP-447 group-metadata path) and `read_committed` consumers of the tiers, and would still
//! not make the *handler's* effects exactly-once. The idempotency store already absorbs the
//! only duplicate the at-least-once forward can make, so the transaction would buy little
//! and cost a round of transaction markers per forward. With transactional output
//! ([`transactional`](crate::transactional#retry-tier-forwards), opt-in) forwards *are*
//! produced in the consumer's transaction, with the offsets it commits: exactly one forward
//! per record under `read_committed` (not with `with_key_order`, which it refuses).
//!
//! # Due times
//!
//! A tier record is not run before its due time ([`headers::DUE_MS`], wall clock, ms, bounded
//! as [Headers are untrusted](#headers-are-untrusted) says). Its job
//! starts, finds the record not due and waits *without its in-flight slot* (the same parking a
//! retry back-off uses): no worker thread sleeps, other records use the slot, and the poll
//! loop keeps polling. The record keeps its lane (its partition in `Partition` mode, its key in
//! `Key` mode), so records behind it wait in the bounded buffer, and when that fills, the
//! tier partition is paused by the usual flow control: the group session is never at risk.
//! Precision: the wait is a tokio timer (millisecond resolution) on the difference between the
//! due time and the wall clock; the record runs when the timer fired *and* a slot is free, so
//! it is never early by this host's clock, and late by the timer's resolution plus the wait
//! for a slot (plus any clock skew between the forwarding and the running host). A revoke or
//! shutdown leaves a waiting record *for later*: unsettled, consumed again by the next owner
//! (a shutdown counts it in [`ShutdownReport::left_for_later`](crate::ShutdownReport::left_for_later),
//! not as abandoned: nothing of it ran).
//!
//! # Headers are untrusted
//!
//! Any producer that can write to a tier topic can write a tier record, with any headers.
//! kourier reads them as untrusted input (delivery rule 17 in the crate docs): a value that
//! is malformed or hostile never panics, never wraps, never parks a partition and never
//! moves another record. The rules, for a record read from tier `n` of source topic `S`
//! (with delay `d`); each header is the last one of its name:
//!
//! | header | rule |
//! |---|---|
//! | the tier | from the topic the record was read from, never from [`headers::TIER`] |
//! | [`headers::DUE_MS`] | decimal ms since the epoch. Missing or malformed: the record's timestamp plus `d` (no timestamp: `d` from when it comes up). Never later than `d + skew` past the record's timestamp, **nor** `d + skew` past when its job first looks at it (held on the monotonic clock), so neither a far-future due time nor a far-future `CreateTime` can hold it longer. Before the epoch: due at once. `skew` is the clock-skew allowance: one minute, or `d` when `d` is shorter (a record never waits more than twice a short tier's delay) |
//! | [original topic](crate::dead_letter::headers::ORIGINAL_TOPIC) | absent: the record stands for itself (a record written to the tier by hand). Present: must be UTF-8 and name `S` (surrounding spaces allowed); anything else (another topic, one that does not exist, an invalid name, a null value) makes the record **invalid** |
//! | [original partition](crate::dead_letter::headers::ORIGINAL_PARTITION) | absent: the record's own. Present: an int32 (4-byte big-endian or decimal) of 0 or more, else **invalid**. A valid partition the tier topic does not have sends that record alone by key |
//! | [original offset](crate::dead_letter::headers::ORIGINAL_OFFSET) | absent: the record's own. Present: an int64 of 0 or more, else **invalid** |
//! | [attempts](crate::dead_letter::headers::ATTEMPTS) | a non-negative decimal of any length, saturating at `u32::MAX`; malformed: no failure history (the tier's attempts count from 0). Sums across tiers saturate |
//! | [`headers::FAILED_STAGES`] | a non-negative decimal, clamped to `0..=tiers` (a record with as many failed stages as there are tiers is dead-lettered at its next failure, never sent round again); missing or malformed: `n`. Sums saturate |
//! | timestamps, failure times, kind, error | as [`Provenance`](crate::dead_letter::Provenance) reads them: times outside the epoch..year 9999 are `None` (a missing failure time is now) |
//! | [`headers::DEFERRED`] | informational only |
//!
//! An **invalid** tier record is not waited for, not handled and not forwarded: it is
//! dead-lettered at once, once, with kind `decode` (a record kourier cannot read) and an
//! error message naming the header and its value (escaped, cut to 100 characters), e.g.
//! ``unreadable retry-tier record S.retry.1/0@5: header kafka_dlt-original-topic is
//! `nope`, but `S.retry.1` is a retry tier of `S` ``. It is written *as it is* — its key,
//! value and own headers, its own partition, offset and timestamp — under `S`, so it goes to
//! `S`'s dead-letter topic (the only dead-letter topic a tier record can name safely) and a
//! redrive sends it to `S`. The letter's provenance therefore names `S` with the *tier
//! record's* partition and offset; the error message says which tier record it was.
//!
//! The bound holds for records kourier wrote too: after a tier's delay is shortened, records
//! already in that tier run by the new bound.
//!
//! So a crafted due time delays one record by at most `d + skew` from when it comes up (the
//! records behind it in its lane wait as they wait behind any tier record), a crafted
//! provenance cannot redirect a record or wedge its partition, and crafted counts cannot
//! make a record loop or lose its history.
//!
//! # Per-key order across tiers (`with_key_order`)
//!
//! Without it, a record of key K in a tier is overtaken by K's later records (Spring Kafka's
//! documented trade-off). With [`RetryTiers::with_key_order`], kourier keeps a **ledger** per
//! (consumer group, source topic, key): a map from the records of K that are in tiers
//! (identified by their *source* partition and offset) to the tier each is in. Rules:
//!
//! 1. **Admission.** Before a record R of K runs (from the source or from a tier), the ledger
//!    is asked, in one atomic step: if the ledger holds a record of K *earlier* than R (by
//!    source offset), R must not run: it is recorded at the highest tier of those earlier
//!    records (at least its own) and forwarded there ("deferred": not a failure, no attempt
//!    used). Otherwise R runs; a tier record is recorded at its tier; a source record of a key
//!    with nothing in the ledger is not recorded at all. [`AdmitStep::decide`] is this rule as
//!    a pure function, for [`KeyOrderLedger`] implementations to reuse.
//! 2. **Failure forward.** A record forwarded to tier n after a failure is recorded at tier n
//!    *before* the forward is sent.
//! 3. **Settle.** When a recorded record finally succeeds, is a duplicate, or is dead-lettered,
//!    it is removed from the ledger (before its offset settles, and before its lane lets the
//!    next record of its partition or key start), which releases K's later
//!    records: they run when they come up in their tier (at their own due time).
//!
//! Why this keeps order: the tiers of K's recorded records never increase along source
//! offsets (a record is placed at the highest tier of its predecessors), a tier topic
//! partition is a queue, and a record only runs when nothing earlier of its key is in the
//! ledger. A record that overtook its predecessor *into* a tier (the predecessor's forward was
//! recorded but not yet written when R was placed) finds the predecessor in the ledger when it
//! comes up and goes round once more behind it. Records of one key must come from one source
//! partition (the default partitioner does this) for the order to mean anything; records with a
//! null key are not ordered by key (they are never deferred).
//!
//! **Guaranteed:** with `with_key_order`, a record of a key is not handled while an earlier
//! record of that key (by source offset) is in a tier, across restarts, rebalances and several
//! consumer instances, as long as the ledger is shared by them (Redis) and keeps its data.
//! Crash points only ever repeat a step: the ledger is written before the forward it
//! describes, and offsets commit after both. **Not guaranteed:** order between the *source*
//! and the ledger when `with_key_order` is switched on while records are already in tiers
//! (those earlier records are not in the ledger), and order after a ledger entry is lost
//! (Redis data loss, or the entry's expiry, see [`RedisKeyOrderLedger`]).
//!
//! **Cost:** one ledger round trip (one Lua script in Redis, O(records of the key in tiers))
//! per record with a key, before it runs; one more per forward and per final settle of a
//! recorded record. There is no local cache: the records of one key are consumed by
//! different instances (the source partition's owner and the tier partitions' owners), and only
//! the ledger sees them all. A deferred record costs one forward and one tier delay.
//!
//! **Why Redis (and not a compacted topic):** the admission must be an atomic
//! read-modify-write shared by instances that own different partitions; a compacted topic
//! would need a single writer per key and a materialised view in every instance (and a
//! rebalance would have to wait for it to catch up). Redis is already the idempotency
//! store's backend, answers in well under a millisecond, and a Lua script makes each step
//! atomic. The ledger is a trait ([`KeyOrderLedger`]), with an in-memory implementation for a
//! single process and tests.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use kourier::tiers::RetryTiers;
//!
//! let tiers = RetryTiers::new([Duration::from_secs(30), Duration::from_secs(300)])
//!     .with_topic_name(|source: &str, tier: u32| format!("{source}-retry-{tier}"));
//! # let _ = tiers;
//! ```

pub mod headers;
mod ledger;
#[cfg(feature = "redis")]
mod redis;
pub(crate) mod runtime;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use self::ledger::{
    Admission, AdmitStep, InMemoryKeyOrderLedger, KeyOrderLedger, LedgerKey, SourceId,
};
#[cfg(feature = "redis")]
pub use self::redis::RedisKeyOrderLedger;

type TierNameFn = Arc<dyn Fn(&str, u32) -> String + Send + Sync + 'static>;

/// Retry tiers for a [`RetryingConsumer`](crate::RetryingConsumer): the delays, how tier
/// topics are named, and whether per-key order is kept. See the [module docs](self).
#[derive(Clone)]
pub struct RetryTiers {
    pub(crate) delays: Vec<Duration>,
    pub(crate) topic_name: TierNameFn,
    pub(crate) ledger: Option<Arc<dyn KeyOrderLedger>>,
}

impl fmt::Debug for RetryTiers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryTiers")
            .field("delays", &self.delays)
            .field("key_order", &self.ledger.is_some())
            .finish_non_exhaustive()
    }
}

impl RetryTiers {
    /// The longest tier delay: 30 days. The consumer's `build()` refuses a longer one (and a
    /// zero one) with [`ConfigError::Invalid`](crate::ConfigError::Invalid) (`setting:
    /// "retry_tiers"`), delivery rule 17 in the crate docs. A record in a tier waits on the
    /// broker: one that waits longer than its tier topic's retention (`retention.ms`, 7 days
    /// by Kafka's default) is deleted before it is due, so keep each tier topic's retention
    /// above its delay.
    pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

    /// Tiers with these delays, in order: a record forwarded to tier `n` (1-based) is due
    /// `delays[n - 1]` after it was forwarded. Topics are named `<source>.retry.<n>`. Each
    /// delay must be longer than zero and at most [`MAX_DELAY`](Self::MAX_DELAY) (checked by
    /// the consumer's `build()`).
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Self {
        RetryTiers {
            delays: delays.into_iter().collect(),
            topic_name: Arc::new(|source: &str, tier: u32| format!("{source}.retry.{tier}")),
            ledger: None,
        }
    }

    /// Names tier topics: `name(source topic, tier)` with tier 1-based. Names must be valid
    /// topic names, distinct from each other and from the subscribed topics. Read back with
    /// [`tier_topic`](Self::tier_topic).
    #[must_use]
    pub fn with_topic_name<F>(mut self, name: F) -> Self
    where
        F: Fn(&str, u32) -> String + Send + Sync + 'static,
    {
        self.topic_name = Arc::new(name);
        self
    }

    /// Keeps per-key order across tiers with this shared ledger (see the
    /// [module docs](self#per-key-order-across-tiers-with_key_order)). Use a
    /// [`RedisKeyOrderLedger`] when more than one process consumes the group. Needs
    /// `Partition` or `Key` ordering.
    #[must_use]
    pub fn with_key_order(mut self, ledger: Arc<dyn KeyOrderLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The ledger keeping per-key order, when [`with_key_order`](Self::with_key_order) set
    /// one.
    pub fn key_order(&self) -> Option<&Arc<dyn KeyOrderLedger>> {
        self.ledger.as_ref()
    }

    /// The delays, in tier order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The name of tier `tier` (1-based) of `source`.
    pub fn tier_topic(&self, source: &str, tier: u32) -> String {
        (self.topic_name)(source, tier)
    }
}
