//! Idempotency settings of a consumer: where a record's dedup key comes from ([`DedupKey`])
//! and how the store is used ([`Dedup`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::idempotency::IdempotencyStore;
use crate::message::Message;

type DedupKeyFn<T> = Arc<dyn Fn(&Message<T>) -> Option<String> + Send + Sync>;

/// Where the dedup key of a record comes from.
pub enum DedupKey<T> {
    /// The value of this header (UTF-8). A record without it is handled without dedup.
    Header(String),
    /// A function of the decoded message; `None` handles the record without dedup.
    Fn(DedupKeyFn<T>),
}

impl<T> DedupKey<T> {
    /// The dedup key is the value of header `name`.
    pub fn header(name: impl Into<String>) -> Self {
        DedupKey::Header(name.into())
    }

    /// The dedup key is computed from the decoded message, e.g.
    /// `DedupKey::from_fn(|m: &Message<Ev>| Some(m.event().event_id.clone()))`.
    pub fn from_fn(f: impl Fn(&Message<T>) -> Option<String> + Send + Sync + 'static) -> Self {
        DedupKey::Fn(Arc::new(f))
    }

    pub(crate) fn key_of(&self, message: &Message<T>) -> Option<String> {
        match self {
            DedupKey::Header(name) => message.headers().get_str(name).map(str::to_owned),
            DedupKey::Fn(f) => f(message),
        }
    }
}

impl<T> fmt::Debug for DedupKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupKey::Header(h) => f.debug_tuple("Header").field(h).finish(),
            DedupKey::Fn(_) => f.write_str("Fn(..)"),
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
}
