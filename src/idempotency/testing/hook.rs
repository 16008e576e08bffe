//! [`HookedStore`]: a store that hands every call to a [`StoreHook`] on its way to another
//! store, to make that store fail, wait, panic or count in a test.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::idempotency::{
    Claim, ClaimToken, IdempotencyStore, StoreError, claim_one_by_one, complete_one_by_one,
};

/// A call made to a [`HookedStore`], as its [`StoreHook`] sees it: one variant per
/// [`IdempotencyStore`] method, with its arguments.
///
/// `#[non_exhaustive]`: a hook that matches on it needs a `_` arm.
///
/// ```
/// use std::time::Duration;
/// use kourier::idempotency::testing::{StoreCall, StoreHook};
/// use kourier::{async_trait, StoreError};
///
/// /// Claims of keys under `slow:` take a second.
/// #[derive(Debug)]
/// struct SlowKeys;
///
/// #[async_trait]
/// impl StoreHook for SlowKeys {
///     async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
///         if let StoreCall::Claim { key, .. } = call
///             && key.starts_with("slow:")
///         {
///             tokio::time::sleep(Duration::from_secs(1)).await;
///         }
///         Ok(())
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum StoreCall<'a> {
    /// [`IdempotencyStore::claim`].
    Claim {
        /// The key claimed.
        key: &'a str,
        /// The lease asked for.
        lease: Duration,
    },
    /// [`IdempotencyStore::complete`].
    Complete {
        /// The key marked done.
        key: &'a str,
        /// The token that claimed it.
        token: &'a ClaimToken,
        /// How long it stays done.
        ttl: Duration,
    },
    /// [`IdempotencyStore::release`].
    Release {
        /// The key released.
        key: &'a str,
        /// The token that claimed it.
        token: &'a ClaimToken,
    },
    /// [`IdempotencyStore::renew`].
    Renew {
        /// The key renewed.
        key: &'a str,
        /// The token that claimed it.
        token: &'a ClaimToken,
        /// The new lease, from now.
        lease: Duration,
    },
    /// [`IdempotencyStore::claim_many`], forwarded as one batch (see
    /// [`HookedStore::one_by_one`]).
    ClaimMany {
        /// The keys claimed, in order.
        keys: &'a [&'a str],
        /// The lease asked for.
        lease: Duration,
    },
    /// [`IdempotencyStore::complete_many`], forwarded as one batch (see
    /// [`HookedStore::one_by_one`]).
    CompleteMany {
        /// The keys marked done, each with the token that claimed it, in order.
        claims: &'a [(&'a str, &'a ClaimToken)],
        /// How long they stay done.
        ttl: Duration,
    },
}

impl<'a> StoreCall<'a> {
    /// The method's name: `claim`, `complete`, `release`, `renew`, `claim_many` or
    /// `complete_many` (the `operation` of the errors a hook makes up).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kourier::idempotency::testing::StoreCall;
    ///
    /// let call = StoreCall::Claim { key: "k", lease: Duration::from_secs(30) };
    /// assert_eq!(call.operation(), "claim");
    /// ```
    pub fn operation(&self) -> &'static str {
        match self {
            StoreCall::Claim { .. } => "claim",
            StoreCall::Complete { .. } => "complete",
            StoreCall::Release { .. } => "release",
            StoreCall::Renew { .. } => "renew",
            StoreCall::ClaimMany { .. } => "claim_many",
            StoreCall::CompleteMany { .. } => "complete_many",
        }
    }

    /// The key of a single-key call; `None` for the batch calls.
    ///
    /// ```
    /// use std::time::Duration;
    /// use kourier::idempotency::testing::StoreCall;
    ///
    /// let call = StoreCall::Claim { key: "k", lease: Duration::from_secs(30) };
    /// assert_eq!(call.key(), Some("k"));
    /// ```
    pub fn key(&self) -> Option<&'a str> {
        match *self {
            StoreCall::Claim { key, .. }
            | StoreCall::Complete { key, .. }
            | StoreCall::Release { key, .. }
            | StoreCall::Renew { key, .. } => Some(key),
            StoreCall::ClaimMany { .. } | StoreCall::CompleteMany { .. } => None,
        }
    }

    /// The token of `complete`, `release` and `renew`; `None` for the other calls.
    ///
    /// ```
    /// use kourier::ClaimToken;
    /// use kourier::idempotency::testing::StoreCall;
    ///
    /// let token = ClaimToken::new("t-1");
    /// let call = StoreCall::Release { key: "k", token: &token };
    /// assert_eq!(call.token(), Some(&token));
    /// ```
    pub fn token(&self) -> Option<&'a ClaimToken> {
        match *self {
            StoreCall::Complete { token, .. }
            | StoreCall::Release { token, .. }
            | StoreCall::Renew { token, .. } => Some(token),
            StoreCall::Claim { .. }
            | StoreCall::ClaimMany { .. }
            | StoreCall::CompleteMany { .. } => None,
        }
    }
}

/// The answer to a call of a [`HookedStore`], which its [`StoreHook::after`] sees and may
/// change before the caller gets it.
///
/// `#[non_exhaustive]`: a hook that matches on it needs a `_` arm.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use kourier::idempotency::testing::{StoreAnswer, StoreCall, StoreHook};
/// use kourier::Claim;
///
/// /// Counts the keys answered `Busy`, claimed alone or in a batch.
/// #[derive(Debug, Default)]
/// struct CountsBusy(AtomicU64);
///
/// impl StoreHook for CountsBusy {
///     fn after(&self, _: &StoreCall<'_>, answer: StoreAnswer<'_>) {
///         let busy = match answer {
///             StoreAnswer::Claim(answer) => usize::from(matches!(answer, Ok(Claim::Busy))),
///             StoreAnswer::ClaimMany(answers) => {
///                 answers.iter().filter(|a| matches!(a, Ok(Claim::Busy))).count()
///             }
///             _ => 0,
///         };
///         self.0.fetch_add(busy as u64, Ordering::Relaxed);
///     }
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreAnswer<'a> {
    /// The answer to `claim`.
    Claim(&'a mut Result<Claim, StoreError>),
    /// The answer to `complete`, `release` or `renew`.
    TokenCall(&'a mut Result<(), StoreError>),
    /// The answers to `claim_many`, one per key.
    ClaimMany(&'a mut [Result<Claim, StoreError>]),
    /// The answers to `complete_many`, one per claim.
    CompleteMany(&'a mut [Result<(), StoreError>]),
}

/// What a [`HookedStore`] does around each call it forwards: [`before`](Self::before) the
/// store sees it (wait, fail it, panic, count it) and [`after`](Self::after) it answered
/// (record the answer, change it). Both do nothing unless implemented.
///
/// A hook is shared by the store's callers (`&self`): keep counters in atomics or a mutex.
/// An `Arc` of a hook is a hook too, so a test can keep a handle on its hook's state.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use kourier::idempotency::testing::{HookedStore, StoreCall, StoreHook};
/// use kourier::{async_trait, InMemoryIdempotencyStore, StoreError};
///
/// /// Answers `Unavailable` to every call while `down`.
/// #[derive(Debug, Default)]
/// struct Outage {
///     down: AtomicBool,
/// }
///
/// #[async_trait]
/// impl StoreHook for Outage {
///     async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
///         if self.down.load(Ordering::SeqCst) {
///             return Err(StoreError::Unavailable {
///                 operation: call.operation(),
///                 source: "connection refused".into(),
///             });
///         }
///         Ok(())
///     }
/// }
///
/// let outage = Arc::new(Outage::default());
/// let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), outage.clone());
/// outage.down.store(true, Ordering::SeqCst); // the handler under test now meets an outage
/// # let _ = store;
/// ```
#[async_trait]
pub trait StoreHook: Send + Sync + fmt::Debug + 'static {
    /// Sees `call` before the store does. `Ok(())` forwards it (after whatever waiting the
    /// hook does: a gate, a delay); an error answers the call with it and the store never
    /// sees it (for a batch call, every key answers a copy of the error, an `Unavailable`'s
    /// source kept as its message). A panic here is the store's panic, as the caller sees it.
    ///
    /// # Errors
    /// The error the call answers instead of the store's answer.
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        let _ = call;
        Ok(())
    }

    /// Sees the answer to `call` — the store's, or the error [`before`](Self::before)
    /// returned — and may change it: the caller gets `answer` as this leaves it.
    fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
        let _ = (call, answer);
    }
}

#[async_trait]
impl<H: StoreHook + ?Sized> StoreHook for Arc<H> {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        (**self).before(call).await
    }

    fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
        (**self).after(call, answer);
    }
}

/// A hook that makes a store one that cannot renew: `renew` answers
/// [`StoreError::Unsupported`] and the store never sees it; every other call goes through.
///
/// A consumer still works with such a store (its claims simply last the lease they were
/// claimed with), but the conformance suite fails it on the `renew-*` cases.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kourier::idempotency::testing::{CannotRenew, HookedStore};
/// use kourier::{Claim, IdempotencyStore, InMemoryIdempotencyStore, StoreError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StoreError> {
/// let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), CannotRenew);
/// let lease = Duration::from_secs(30);
/// let Claim::Acquired(token) = store.claim("k", lease).await? else {
///     unreachable!("a fresh key")
/// };
/// assert!(store.renew("k", &token, lease).await.unwrap_err().is_unsupported());
/// store.complete("k", &token, lease).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CannotRenew;

#[async_trait]
impl StoreHook for CannotRenew {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        match call {
            StoreCall::Renew { .. } => Err(StoreError::Unsupported { operation: "renew" }),
            _ => Ok(()),
        }
    }
}

/// An [`IdempotencyStore`] that forwards every call to `inner` through a [`StoreHook`]:
/// `inner` with faults, delays or counters added, to test a handler, a consumer or a
/// wrapper of your own against a store that misbehaves — without writing the six forwarding
/// methods of a store (every one is required).
///
/// Batch calls are forwarded as batches (the hook sees [`StoreCall::ClaimMany`] and
/// [`StoreCall::CompleteMany`]); after [`one_by_one`](Self::one_by_one) they go one key at
/// a time through `claim` and `complete`, so the hook sees, fails or panics each key alone.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kourier::idempotency::testing::{HookedStore, StoreAnswer, StoreCall, StoreHook};
/// use kourier::{async_trait, Claim, IdempotencyStore, InMemoryIdempotencyStore, StoreError};
///
/// /// A store whose first completion is acknowledged but whose answer is lost on the way.
/// #[derive(Debug, Default)]
/// struct LosesFirstCompletion {
///     lost: std::sync::atomic::AtomicBool,
/// }
///
/// #[async_trait]
/// impl StoreHook for LosesFirstCompletion {
///     fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
///         use std::sync::atomic::Ordering::SeqCst;
///         if let (StoreCall::Complete { .. }, StoreAnswer::TokenCall(answer)) = (call, answer) {
///             if !self.lost.swap(true, SeqCst) {
///                 *answer = Err(StoreError::Timeout {
///                     operation: "complete",
///                     after: Duration::from_secs(2),
///                 });
///             }
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StoreError> {
/// let store = HookedStore::new(
///     Arc::new(InMemoryIdempotencyStore::new()),
///     LosesFirstCompletion::default(),
/// );
/// let lease = Duration::from_secs(30);
/// let Claim::Acquired(token) = store.claim("k", lease).await? else {
///     unreachable!("a fresh key")
/// };
/// assert!(store.complete("k", &token, lease).await.is_err()); // the caller saw a timeout...
/// assert_eq!(store.claim("k", lease).await?, Claim::Done); // ...but the key is done
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct HookedStore<S: ?Sized, H> {
    hook: H,
    one_by_one: bool,
    inner: Arc<S>,
}

impl<S: IdempotencyStore + ?Sized, H: StoreHook> HookedStore<S, H> {
    /// `inner` behind `hook`, batch calls forwarded as batches.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kourier::idempotency::testing::{HookedStore, StoreHook};
    /// use kourier::{IdempotencyStore, InMemoryIdempotencyStore};
    ///
    /// #[derive(Debug)]
    /// struct Nothing;
    /// impl StoreHook for Nothing {}
    ///
    /// let inner: Arc<dyn IdempotencyStore> = Arc::new(InMemoryIdempotencyStore::new());
    /// let store: Arc<dyn IdempotencyStore> = Arc::new(HookedStore::new(inner, Nothing));
    /// # let _ = store;
    /// ```
    pub fn new(inner: Arc<S>, hook: H) -> Self {
        HookedStore {
            hook,
            one_by_one: false,
            inner,
        }
    }

    /// Batch calls go one key at a time through this store's `claim` and `complete`
    /// ([`claim_one_by_one`], [`complete_one_by_one`]), so the hook sees each key as a
    /// single call — and a panicking hook fails its key alone.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kourier::idempotency::testing::{HookedStore, StoreHook};
    /// use kourier::InMemoryIdempotencyStore;
    ///
    /// #[derive(Debug)]
    /// struct Nothing;
    /// impl StoreHook for Nothing {}
    ///
    /// let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), Nothing).one_by_one();
    /// # let _ = store;
    /// ```
    #[must_use]
    pub fn one_by_one(mut self) -> Self {
        self.one_by_one = true;
        self
    }

    /// The hook.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kourier::idempotency::testing::{HookedStore, StoreHook};
    /// use kourier::InMemoryIdempotencyStore;
    ///
    /// #[derive(Debug, PartialEq)]
    /// struct Nothing;
    /// impl StoreHook for Nothing {}
    ///
    /// let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), Nothing);
    /// assert_eq!(store.hook(), &Nothing);
    /// ```
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The store the calls are forwarded to.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kourier::idempotency::testing::{HookedStore, StoreHook};
    /// use kourier::InMemoryIdempotencyStore;
    ///
    /// #[derive(Debug)]
    /// struct Nothing;
    /// impl StoreHook for Nothing {}
    ///
    /// let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), Nothing);
    /// assert!(store.inner().is_empty());
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// One call: `before`, then `forward` unless it failed (the call then answers
    /// `refused(error)`), then `after`.
    async fn hooked<A: Answer + Send>(
        &self,
        call: StoreCall<'_>,
        forward: impl Future<Output = A> + Send,
        refused: impl FnOnce(StoreError) -> A + Send,
    ) -> A {
        let mut answer = match self.hook.before(&call).await {
            Ok(()) => forward.await,
            Err(e) => refused(e),
        };
        self.hook.after(&call, answer.as_store_answer());
        answer
    }
}

/// What an [`IdempotencyStore`] method returns, as a hook sees it.
trait Answer {
    fn as_store_answer(&mut self) -> StoreAnswer<'_>;
}

impl Answer for Result<Claim, StoreError> {
    fn as_store_answer(&mut self) -> StoreAnswer<'_> {
        StoreAnswer::Claim(self)
    }
}

impl Answer for Result<(), StoreError> {
    fn as_store_answer(&mut self) -> StoreAnswer<'_> {
        StoreAnswer::TokenCall(self)
    }
}

impl Answer for Vec<Result<Claim, StoreError>> {
    fn as_store_answer(&mut self) -> StoreAnswer<'_> {
        StoreAnswer::ClaimMany(self)
    }
}

impl Answer for Vec<Result<(), StoreError>> {
    fn as_store_answer(&mut self) -> StoreAnswer<'_> {
        StoreAnswer::CompleteMany(self)
    }
}

/// `n` answers of `e`, for a batch of `n` keys that `before` failed.
fn each_refused<T>(n: usize, e: &StoreError) -> Vec<Result<T, StoreError>> {
    (0..n).map(|_| Err(copy_of(e))).collect()
}

/// `e` again (`StoreError` is not `Clone`: a source is kept as its message).
fn copy_of(e: &StoreError) -> StoreError {
    match e {
        StoreError::LeaseLost { key } => StoreError::LeaseLost { key: key.clone() },
        StoreError::Unavailable { operation, source } => StoreError::Unavailable {
            operation,
            source: source.to_string().into(),
        },
        StoreError::Timeout { operation, after } => StoreError::Timeout {
            operation,
            after: *after,
        },
        StoreError::Unsupported { operation } => StoreError::Unsupported { operation },
    }
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized, H: StoreHook> IdempotencyStore for HookedStore<S, H> {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let call = StoreCall::Claim { key, lease };
        let forward = self.inner.claim(key, lease);
        self.hooked(call, forward, Err).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let call = StoreCall::Complete { key, token, ttl };
        let forward = self.inner.complete(key, token, ttl);
        self.hooked(call, forward, Err).await
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        let call = StoreCall::Release { key, token };
        let forward = self.inner.release(key, token);
        self.hooked(call, forward, Err).await
    }

    async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let call = StoreCall::Renew { key, token, lease };
        let forward = self.inner.renew(key, token, lease);
        self.hooked(call, forward, Err).await
    }

    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>> {
        if self.one_by_one {
            return claim_one_by_one(self, keys, lease).await;
        }
        let call = StoreCall::ClaimMany { keys, lease };
        let forward = self.inner.claim_many(keys, lease);
        let refused = |e| each_refused(keys.len(), &e);
        self.hooked(call, forward, refused).await
    }

    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>> {
        if self.one_by_one {
            return complete_one_by_one(self, claims, ttl).await;
        }
        let call = StoreCall::CompleteMany { claims, ttl };
        let forward = self.inner.complete_many(claims, ttl);
        let refused = |e| each_refused(claims.len(), &e);
        self.hooked(call, forward, refused).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::idempotency::memory::InMemoryIdempotencyStore;

    /// Fails every call, and records the operation and answer count of each.
    #[derive(Debug, Default)]
    struct Refuses(Mutex<Vec<(&'static str, usize)>>);

    #[async_trait]
    impl StoreHook for Refuses {
        async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
            Err(StoreError::Unavailable {
                operation: call.operation(),
                source: "down".into(),
            })
        }
        fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
            let n = match answer {
                StoreAnswer::ClaimMany(a) => a.len(),
                StoreAnswer::CompleteMany(a) => a.len(),
                _ => 1,
            };
            self.0.lock().unwrap().push((call.operation(), n));
        }
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_failing_hook_answers_each_key_of_a_forwarded_batch_and_the_store_sees_nothing() {
        let inner = Arc::new(InMemoryIdempotencyStore::new());
        let store = HookedStore::new(inner.clone(), Refuses::default());
        let answers = store.claim_many(&["a", "b"], LEASE).await;
        assert!(answers.iter().all(|a| matches!(
            a,
            Err(StoreError::Unavailable {
                operation: "claim_many",
                ..
            })
        )));
        assert!(inner.is_empty());
        assert_eq!(*store.hook().0.lock().unwrap(), [("claim_many", 2)]);
    }

    #[tokio::test]
    async fn one_by_one_the_hook_sees_each_key_as_a_single_call() {
        let store = HookedStore::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            Refuses::default(),
        )
        .one_by_one();
        let token = ClaimToken::new("t");
        store.claim_many(&["a", "b"], LEASE).await;
        store.complete_many(&[("a", &token)], LEASE).await;
        assert_eq!(
            *store.hook().0.lock().unwrap(),
            [("claim", 1), ("claim", 1), ("complete", 1)]
        );
    }

    /// Turns every `LeaseLost` of a token call into success.
    #[derive(Debug)]
    struct Forgives;

    impl StoreHook for Forgives {
        fn after(&self, _: &StoreCall<'_>, answer: StoreAnswer<'_>) {
            if let StoreAnswer::TokenCall(answer) = answer
                && matches!(answer, Err(StoreError::LeaseLost { .. }))
            {
                *answer = Ok(());
            }
        }
    }

    #[tokio::test]
    async fn the_caller_gets_the_answer_as_after_leaves_it() {
        let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), Forgives);
        let stranger = ClaimToken::new("never issued");
        store.release("k", &stranger).await.expect("forgiven");
    }
}
