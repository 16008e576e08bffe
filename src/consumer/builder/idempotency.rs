//! [`Idempotency`]: a consumer's idempotency settings as one value.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::consumer::dedup::{Dedup, DedupKey};
use crate::idempotency::IdempotencyStore;

/// What a consumer does while its idempotency store is unavailable (delivery rule 7 in the
/// crate docs). Set with [`Idempotency::with_store_outage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StoreOutage {
    /// Records wait for the store: a record whose claim fails waits with back-off and
    /// claims again (it is not skipped, not counted as an attempt, and its offset is not
    /// committed meanwhile). The default.
    #[default]
    Wait,
    /// Records are handled *without* dedup while the store is down (and a key that cannot
    /// be marked done is given up at once instead of being retried for the rest of its
    /// lease): duplicates become possible meanwhile; nothing is lost either way. An explicit
    /// opt-in.
    RunWithoutDedup,
}

/// A consumer's idempotency: the store, where each record's dedup key comes from, and how
/// the store is used. Pass it to
/// [`RetryingConsumerBuilder::idempotency`](crate::RetryingConsumerBuilder::idempotency).
///
/// Before each attempt the record's dedup key is claimed in the store for the
/// [lease](Self::with_lease); a record whose key is done is skipped; after the handler
/// succeeded the key is marked done for the [TTL](Self::with_ttl). A record without a dedup
/// key is handled without idempotency (logged at debug level).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use std::time::Duration;
/// # use kourier::{handler_fn, DedupKey, Idempotency, InMemoryIdempotencyStore, Message, RetryingConsumer, StoreOutage};
/// # let handler = handler_fn(|_m: Message<String>| async { Ok(()) });
/// let builder = RetryingConsumer::builder(handler).idempotency(
///     Idempotency::new(Arc::new(InMemoryIdempotencyStore::new()), DedupKey::header("event-id"))
///         .with_lease(Duration::from_secs(30))
///         .with_ttl(Duration::from_secs(24 * 3600))
///         .with_store_outage(StoreOutage::Wait),
/// );
/// # let _ = builder;
/// ```
///
/// A key computed from the event: [`DedupKey::from_fn`]. Its closure's parameter type is
/// not inferred from the handler (Rust checks the closure before it sees where the value
/// goes): name it, `|m: &Message<Ev>|`, or write `DedupKey::<Ev>::from_fn(..)`.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use kourier::{handler_fn, DedupKey, Idempotency, InMemoryIdempotencyStore, Message, RetryingConsumer};
/// # #[derive(serde::Deserialize)] struct Ev { event_id: String }
/// # let handler = handler_fn(|_m: Message<Ev>| async { Ok(()) });
/// let key = DedupKey::from_fn(|m: &Message<Ev>| Some(m.event().event_id.clone()));
/// let builder = RetryingConsumer::builder(handler)
///     .idempotency(Idempotency::new(Arc::new(InMemoryIdempotencyStore::new()), key));
/// # let _ = builder;
/// ```
///
/// # Claims fetched ahead
///
/// In partition and key order a lane runs one record at a time, so a claim per record would
/// put a store round trip between every two records of a lane. Instead, a record that claims
/// its key also claims the keys of the next records queued in its lane (up to 32, in the
/// same batch call) and each of them takes its claim when its turn comes. Such a claim is
/// taken only within a third of the lease and only if no store call failed since it was
/// fetched; claims a record never takes (its partition revoked, the consumer stopping, the
/// record ending early) are released. At a revoke, a sweeper that looks every 0.1 s takes
/// them out of use and releases them one store call after another: a revoked partition's
/// keys are free again within 0.1 s plus one release round trip per claim (up to 32 per
/// lane), and a claim whose release fails runs out with its lease. Dedup keys from a
/// function are then computed (the record decoded) before the record runs.
pub struct Idempotency<T> {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) key: DedupKey<T>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) store_outage: StoreOutage,
}

impl<T> Idempotency<T> {
    /// Idempotency through `store`, each record's dedup key from `key`; a 60 s lease, a 6 h
    /// TTL (as in the starting design), and records waiting out a store outage.
    pub fn new(store: Arc<dyn IdempotencyStore>, key: DedupKey<T>) -> Self {
        Idempotency {
            store,
            key,
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(6 * 3600),
            store_outage: StoreOutage::Wait,
        }
    }

    /// How long a claim holds a key without renewal. Default 60 s.
    ///
    /// While a handler attempt runs, the consumer renews its claim every third of the lease
    /// ([`IdempotencyStore::renew`]), so a handler may run longer than the lease and still
    /// hold the key: another consumer claiming the same event meanwhile is answered busy and
    /// waits. The lease is how long a key stays held after its holder *stopped* renewing: a
    /// crashed consumer, a partition whose assignment was lost (renewal stops at once; the
    /// new owner waits at most one lease), or a store outage long enough that two renewals in
    /// a row fail. Shorter leases hand such keys over sooner; longer ones ride out longer
    /// store outages. A renewal that finds the claim lost cancels the running attempt at its
    /// next `.await` (it does not count as an attempt) and the record claims again.
    ///
    /// After the handler succeeded, marking the key done is retried (on store errors) until
    /// the lease, counted from the claim or its last successful renewal, would have run out.
    /// A store that cannot renew (the trait's default `renew`) keeps the old behaviour: the
    /// lease runs out as set at the claim, so set it above your slowest handler.
    ///
    /// A [`handler_timeout`](crate::RetryingConsumerBuilder::handler_timeout) must be below
    /// it. Zero is refused by `build()`; above one year it is taken as one year (see
    /// [Durations](crate::RetryingConsumerBuilder#durations)).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = clock::bounded(lease);
        self
    }

    /// How long a done key is remembered. Default 6 h, as in the starting design. Zero is
    /// refused by `build()`; above one year it is taken as one year (see
    /// [Durations](crate::RetryingConsumerBuilder#durations)).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = clock::bounded(ttl);
        self
    }

    /// What records do while the store is unavailable. Default [`StoreOutage::Wait`].
    #[must_use]
    pub fn with_store_outage(mut self, outage: StoreOutage) -> Self {
        self.store_outage = outage;
        self
    }

    /// The lease (bounded to a year).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The TTL of done keys (bounded to a year).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What records do while the store is unavailable.
    pub fn store_outage(&self) -> StoreOutage {
        self.store_outage
    }

    /// The engine's settings, keys namespaced by `namespace` (the consumer group).
    pub(crate) fn into_dedup(self, namespace: String) -> Dedup<T> {
        Dedup::new(
            self.store,
            self.key,
            namespace,
            (self.lease, self.ttl),
            self.store_outage == StoreOutage::RunWithoutDedup,
        )
    }
}

impl<T> fmt::Debug for Idempotency<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("store", &self.store)
            .field("key", &self.key)
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("store_outage", &self.store_outage)
            .finish()
    }
}
