//! Idempotency: skip records whose work is already done, without ever skipping work that
//! failed.
//!
//! The protocol is **claim → work → complete** (never check-then-set, never mark before the
//! work):
//!
//! 1. [`IdempotencyStore::claim`] with a lease answers [`Claim::Acquired`] (run the handler),
//!    [`Claim::Done`] (a previous run succeeded: skip and settle) or [`Claim::Busy`] (another
//!    worker holds a live lease: treated as a transient failure, tried again later, never
//!    skipped).
//! 2. On success, [`IdempotencyStore::complete`] marks the key done for a TTL (6 h by default,
//!    as in the starting design).
//! 3. On failure, [`IdempotencyStore::release`] drops the claim so the retry runs. A
//!    dead-lettered record is released too, never marked done, so a redrive runs it again.
//!
//! Claims are *fenced*: each acquisition returns a fresh [`ClaimToken`], and `complete` /
//! `release` with a token whose lease expired and was re-claimed by someone else fail with
//! [`StoreError::LeaseLost`] instead of touching the new owner's claim.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::error::StoreError;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use self::memory::InMemoryIdempotencyStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisIdempotencyStore, RedisIdempotencyStoreBuilder};

/// Proof of a claim: the value stored under the key while the lease lasts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(String);

impl ClaimToken {
    /// A token with the given value (stores generate unique ones).
    pub fn new(value: impl Into<String>) -> Self {
        ClaimToken(value.into())
    }

    /// A fresh random token.
    pub fn random() -> Self {
        ClaimToken(format!(
            "{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        ))
    }

    /// The token's value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer to [`IdempotencyStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now owns the key until the lease ends: run the work.
    Acquired(ClaimToken),
    /// The work for this key was completed before: skip it.
    Done,
    /// Another worker holds a live lease on the key: try again later, do not skip.
    Busy,
}

/// Where the consumer records which events are done. Object-safe: use it as
/// `Arc<dyn IdempotencyStore>`.
///
/// Implementations must make `claim` a single atomic operation (e.g. Redis `SET NX PX`).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Tries to take `key` for `lease`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when the store cannot answer;
    /// the consumer treats that as transient (it backs off and never skips the record).
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError>;

    /// Marks `key` done for `ttl`, if `token` still holds it.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when the token no longer holds the key; availability errors
    /// as for [`IdempotencyStore::claim`].
    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Drops the claim on `key`, if `token` still holds it, so that a retry can claim it.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when the token no longer holds the key; availability errors
    /// as for [`IdempotencyStore::claim`].
    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError>;
}
