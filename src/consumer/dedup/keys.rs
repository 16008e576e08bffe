//! Idempotency settings of a consumer: where a record's dedup key comes from ([`DedupKey`])
//! and how the store is used ([`Dedup`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::claim_ahead::AheadClaims;
use super::store_batch::StoreBatcher;
use crate::consumer::breaker::{Caller, caller_of};
use crate::dead_letter::headers::{position_of, positioned};
use crate::idempotency::{Claim, ClaimToken, IdempotencyStore, StoreError};
use crate::message::Message;
use crate::record::RawRecord;

type DedupKeyFn<T> = Arc<dyn Fn(&Message<T>) -> Option<String> + Send + Sync>;

/// Where the dedup key of a record comes from: a header, or a function of the decoded
/// message.
///
/// Opaque: build it with [`DedupKey::header`] or [`DedupKey::from_fn`], so new sources can be
/// added without breaking anyone; it goes into an [`Idempotency`](crate::Idempotency). The
/// closure of `from_fn` does not get its parameter type from the handler (Rust checks a
/// closure before it sees where its value goes, and a closure that reads the event needs the
/// type there): write `DedupKey::<Ev>::from_fn(|m| ..)` or annotate the parameter,
/// `|m: &Message<Ev>|`.
pub struct DedupKey<T>(Source<T>);

enum Source<T> {
    Header(String),
    Fn(DedupKeyFn<T>),
}

impl<T> DedupKey<T> {
    /// The dedup key is the value of header `name` (UTF-8). A record without the header, or
    /// with a value that is not UTF-8, is handled without dedup.
    pub fn header(name: impl Into<String>) -> Self {
        DedupKey(Source::Header(name.into()))
    }

    /// The dedup key is computed from the decoded message; `None` handles the record without
    /// dedup.
    ///
    /// ```
    /// use kourier::DedupKey;
    /// # #[derive(serde::Deserialize)] struct Ev { event_id: String }
    /// let key = DedupKey::<Ev>::from_fn(|m| Some(m.event().event_id.clone()));
    /// # let _ = key;
    /// ```
    pub fn from_fn(f: impl Fn(&Message<T>) -> Option<String> + Send + Sync + 'static) -> Self {
        DedupKey(Source::Fn(Arc::new(f)))
    }

    /// The record's dedup key with `namespace` and `:` in front.
    pub(crate) fn namespaced_key_of(
        &self,
        namespace: &str,
        message: &Message<T>,
    ) -> Option<String> {
        match &self.0 {
            Source::Header(name) => message
                .headers()
                .get_str(name)
                .map(|key| namespaced(namespace, key)),
            Source::Fn(f) => f(message).map(|key| namespaced(namespace, &key)),
        }
    }

    /// The record's namespaced dedup key, computed before the record runs (for a claim
    /// fetched ahead): from the header without decoding, else from `decode`'s message.
    /// `None` when there is none or it cannot be computed now (the record computes it, and
    /// reports why, when it runs).
    pub(crate) fn namespaced_key_ahead(
        &self,
        namespace: &str,
        record: &Arc<crate::record::RawRecord>,
        decode: impl FnOnce() -> Option<Message<T>>,
    ) -> Option<String> {
        match &self.0 {
            Source::Header(name) => record
                .headers
                .get_str(name)
                .map(|key| namespaced(namespace, key)),
            Source::Fn(_) => self.namespaced_key_of(namespace, &decode()?),
        }
    }
}

/// `namespace:key`, built in one allocation (a `format!` would grow its buffer along the
/// way).
fn namespaced(namespace: &str, key: &str) -> String {
    let mut out = String::with_capacity(namespace.len() + 1 + key.len());
    out.push_str(namespace);
    out.push(':');
    out.push_str(key);
    out
}

impl<T> fmt::Debug for DedupKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Header(h) => f.debug_tuple("DedupKey::header").field(h).finish(),
            Source::Fn(_) => f.write_str("DedupKey::from_fn(..)"),
        }
    }
}

/// A record's dedup keys: the event's, as the breaker's caller (the same for every copy of
/// the event: what the breaker counts a record by), and the delivery's (the event's key at
/// the record's [`Position`]: what is claimed and marked done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DedupKeys {
    /// [`caller_of`] the event's key (kept as the caller, not as a second string).
    pub(crate) event_caller: Caller,
    pub(crate) delivery: String,
}

impl DedupKeys {
    fn of(event: String, record: &RawRecord) -> Self {
        DedupKeys {
            event_caller: caller_of(&event),
            delivery: positioned(event, position_of(&record.headers)),
        }
    }
}

/// Idempotency settings of a consumer.
pub(crate) struct Dedup<T> {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) key: DedupKey<T>,
    /// Prepended to every key: the consumer group, so groups dedup independently.
    pub(crate) namespace: String,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) run_without_store_on_outage: bool,
    /// Coalesces the workers' claims and completions into batch calls.
    pub(crate) batch: StoreBatcher,
    /// Claims fetched ahead for the next records of ordered lanes.
    pub(crate) ahead: Arc<AheadClaims>,
}

impl<T> Dedup<T> {
    pub(crate) fn new(
        store: Arc<dyn IdempotencyStore>,
        key: DedupKey<T>,
        namespace: String,
        (lease, ttl): (Duration, Duration),
        run_without_store_on_outage: bool,
    ) -> Self {
        Dedup {
            ahead: Arc::new(AheadClaims::new(store.clone(), lease)),
            store,
            key,
            namespace,
            lease,
            ttl,
            run_without_store_on_outage,
            batch: StoreBatcher::default(),
        }
    }

    /// The record's dedup keys, from its decoded message (`None`: handled without dedup).
    pub(crate) fn keys_of(&self, message: &Message<T>) -> Option<DedupKeys> {
        let event = self.key.namespaced_key_of(&self.namespace, message)?;
        Some(DedupKeys::of(event, message.raw()))
    }

    /// The record's dedup keys before it is decoded (see
    /// [`DedupKey::namespaced_key_ahead`]).
    pub(crate) fn keys_ahead(
        &self,
        record: &Arc<RawRecord>,
        decode: impl FnOnce() -> Option<Message<T>>,
    ) -> Option<DedupKeys> {
        let event = self
            .key
            .namespaced_key_ahead(&self.namespace, record, decode)?;
        Some(DedupKeys::of(event, record))
    }

    /// Claims `key` for the lease, in a batch with other workers' claims.
    pub(crate) async fn claim(&self, key: &str) -> Result<Claim, StoreError> {
        self.batch.claim(&self.store, key, self.lease).await
    }

    /// Claims `keys` in one batch call; one answer per key, in order.
    pub(crate) async fn claim_all(&self, keys: Vec<String>) -> Vec<Result<Claim, StoreError>> {
        self.batch.claim_all(&self.store, keys, self.lease).await
    }

    /// Marks `key` done for the TTL, in a batch with other workers' completions.
    pub(crate) async fn complete(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        self.batch.complete(&self.store, key, token, self.ttl).await
    }
}
