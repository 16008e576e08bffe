//! The store trait and its answers (re-exported at the crate root).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;

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
///
/// `#[non_exhaustive]`: code that matches on it needs a `_` arm; stores build it freely.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
