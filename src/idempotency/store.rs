//! The store trait and its answers (re-exported at the crate root).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::guard::store_call;

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
        use std::fmt::Write as _;
        // Sized for its 32 hex digits: one allocation (a `format!` grows its buffer).
        let mut token = String::with_capacity(32);
        let _ = write!(
            token,
            "{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        ClaimToken(token)
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
/// The full contract — keys, expiry, fencing, what may block, concurrency — is written on the
/// [`idempotency`](crate::idempotency#the-contract) module, with how to write a store (put
/// `#[async_trait]` on the impl, or rustc reports E0195) and how to check one against the
/// contract (`idempotency::testing::run_conformance`, feature `testing`).
///
/// # Every method is required
///
/// Besides the three calls every store makes (`claim`, `complete`, `release`), a store
/// says whether it can keep a claim alive ([`renew`](Self::renew)) and whether it answers
/// many keys in one round trip ([`claim_many`](Self::claim_many),
/// [`complete_many`](Self::complete_many)). None of them has a default, on purpose: a store
/// that wraps another (to count calls, add a key prefix, trace) must say for each whether it
/// forwards it. With defaults, a wrapper around the Redis store that wrote only the first
/// three compiled and silently lost renewal (a handler outliving its lease could run twice)
/// and the batch calls (one round trip per key). Now leaving one out is a compile error
/// (E0046, "not all trait items implemented"). A store without those capabilities says so in
/// one line each: `renew` answers [`StoreError::Unsupported`], and the batch calls use
/// [`idempotency::claim_one_by_one`](crate::idempotency::claim_one_by_one) and
/// [`idempotency::complete_one_by_one`](crate::idempotency::complete_one_by_one) (the
/// [module docs](crate::idempotency#writing-a-store) show a whole store and a wrapper).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Tries to take `key` for `lease`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when the store cannot answer;
    /// the consumer treats that as transient (it backs off and never skips the record).
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError>;

    /// Marks `key` done for `ttl`, if `token` holds it: the claim `token` acquired is still
    /// there and its lease has not run out.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`], changing nothing, when `token` does not hold the key: its
    /// lease ran out (whether or not the key was claimed again since), the key was released
    /// or is done already, or the token was never issued for it. Availability errors as for
    /// [`IdempotencyStore::claim`].
    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Drops the claim on `key`, if `token` holds it (as for
    /// [`complete`](IdempotencyStore::complete)), so that a retry can claim it.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`], changing nothing, in the same cases as
    /// [`complete`](IdempotencyStore::complete) (a done key stays done). Availability errors
    /// as for [`IdempotencyStore::claim`].
    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError>;

    /// Extends the claim on `key` to `lease` from now, if `token` holds it (as for
    /// [`complete`](IdempotencyStore::complete)). The consumer calls it every third of the
    /// lease while a handler attempt runs, so a claim lives as long as its work.
    ///
    /// The claim then ends `lease` after the call, as a fresh claim's would: the lease is
    /// set, not added to what was left.
    ///
    /// A store that cannot renew answers [`StoreError::Unsupported`] and changes nothing
    /// (`Err(StoreError::Unsupported { operation: "renew" })`): it must not pretend it did.
    /// The consumer then logs once that claims are not renewed and lets the lease run out
    /// as it was set at the claim: a handler outliving it may run twice (set
    /// [the lease](crate::Idempotency::with_lease) above your slowest handler), and the
    /// conformance suite fails the `renew-*` cases. Every store kourier ships renews; a store
    /// that wraps another forwards this call.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`], changing nothing, in the same cases as
    /// [`complete`](IdempotencyStore::complete): the lease ran out (whether or not the key was
    /// claimed again since), the key was released or is done, or the token was never issued
    /// for it. [`StoreError::Unsupported`] from a store that cannot renew. Availability errors
    /// as for [`IdempotencyStore::claim`].
    async fn renew(&self, key: &str, token: &ClaimToken, lease: Duration)
    -> Result<(), StoreError>;

    /// Claims each of `keys` for `lease`: one answer per key, in order, each exactly what
    /// [`claim`](IdempotencyStore::claim) would have answered for it (every key is its own
    /// atomic claim; the batch is not a transaction). The consumer uses it to claim the
    /// records of many workers in one call. Each key's result is independent: an
    /// availability error may fail some keys, or all.
    ///
    /// A store that can answer a batch in one round trip does so (the Redis store does);
    /// one that cannot calls [`claim`](IdempotencyStore::claim) per key with
    /// [`idempotency::claim_one_by_one`](crate::idempotency::claim_one_by_one)`(self, keys,
    /// lease).await`; a store that wraps another forwards this call.
    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>>;

    /// Marks each `(key, token)` of `claims` done for `ttl`: one result per claim, in order,
    /// each exactly what [`complete`](IdempotencyStore::complete) would have answered for it,
    /// fencing included (a token that does not hold its key is
    /// [`StoreError::LeaseLost`] for that claim alone, changing nothing). The consumer uses
    /// it to mark the records of many workers done in one call.
    ///
    /// A store that can answer a batch in one round trip does so (the Redis store does);
    /// one that cannot calls [`complete`](IdempotencyStore::complete) per claim with
    /// [`idempotency::complete_one_by_one`](crate::idempotency::complete_one_by_one)`(self,
    /// claims, ttl).await`; a store that wraps another forwards this call.
    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>>;
}

/// [`IdempotencyStore::claim_many`] for a store that has no batch call: calls
/// [`claim`](IdempotencyStore::claim) for each key in turn and answers what it answered.
///
/// A `claim` that panics answers its key with [`StoreError::Unavailable`] and the batch goes
/// on, so the keys claimed before it keep their answers (lost with the batch, their claims
/// would hold the keys until their lease runs out).
///
/// ```
/// use std::time::Duration;
/// use kourier::{idempotency, Claim, IdempotencyStore, InMemoryIdempotencyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = InMemoryIdempotencyStore::new();
/// let answers = idempotency::claim_one_by_one(&store, &["a", "b"], Duration::from_secs(30)).await;
/// assert!(answers.iter().all(|a| matches!(a, Ok(Claim::Acquired(_)))));
/// # }
/// ```
pub async fn claim_one_by_one<S>(
    store: &S,
    keys: &[&str],
    lease: Duration,
) -> Vec<Result<Claim, StoreError>>
where
    S: IdempotencyStore + ?Sized,
{
    let mut answers = Vec::with_capacity(keys.len());
    for key in keys {
        answers.push(store_call("claim", store.claim(key, lease)).await);
    }
    answers
}

/// [`IdempotencyStore::complete_many`] for a store that has no batch call: calls
/// [`complete`](IdempotencyStore::complete) for each claim in turn and answers what it
/// answered (a `complete` that panics answers its claim with [`StoreError::Unavailable`],
/// the others keep theirs).
pub async fn complete_one_by_one<S>(
    store: &S,
    claims: &[(&str, &ClaimToken)],
    ttl: Duration,
) -> Vec<Result<(), StoreError>>
where
    S: IdempotencyStore + ?Sized,
{
    let mut answers = Vec::with_capacity(claims.len());
    for (key, token) in claims {
        answers.push(store_call("complete", store.complete(key, token, ttl)).await);
    }
    answers
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::idempotency::memory::InMemoryIdempotencyStore;
    use crate::idempotency::testing::{HookedStore, StoreCall, StoreHook};

    /// Claiming `b` panics.
    #[derive(Debug)]
    struct PanicsOnB;

    #[async_trait]
    impl StoreHook for PanicsOnB {
        async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
            if let StoreCall::Claim { key, .. } = call {
                assert_ne!(*key, "b", "claiming b panics");
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_panicking_claim_fails_its_key_alone_one_by_one() {
        let store =
            HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), PanicsOnB).one_by_one();
        let lease = Duration::from_secs(30);
        let answers = store.claim_many(&["a", "b", "c"], lease).await;
        assert!(matches!(answers[0], Ok(Claim::Acquired(_))));
        assert!(matches!(
            answers[1],
            Err(StoreError::Unavailable {
                operation: "claim",
                ..
            })
        ));
        assert!(matches!(answers[2], Ok(Claim::Acquired(_))));
        // The claims acquired are the callers': completing with their tokens works.
        let Ok(Claim::Acquired(token)) = &answers[0] else {
            unreachable!()
        };
        store.complete("a", token, lease).await.unwrap();
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
    }
}
