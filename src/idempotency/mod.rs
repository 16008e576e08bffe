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
//! 2. While the handler runs, [`IdempotencyStore::renew`] extends the claim every third of
//!    the lease, so a claim lives as long as its work; a renewal that finds the claim lost
//!    stops the attempt. On success, [`IdempotencyStore::complete`] marks the key done for a
//!    TTL (6 h by default, as in the starting design).
//! 3. On a failure that is retried, [`IdempotencyStore::release`] drops the claim so the
//!    retry runs. A record given up — dead-lettered, or forwarded to a retry tier — keeps its
//!    claim until the letter or the forward is acknowledged, then its *delivery* is marked
//!    done too: it has its outcome, so a redelivery after a crash, or a stale copy, is
//!    skipped instead of being dead-lettered (or forwarded) a second time.
//!
//! # Deliveries of one event (delivery rule 18)
//!
//! One event can reach the handler as several deliveries: its source record, each copy a
//! retry tier forwards ([`tiers::headers::HOP`](crate::tiers::headers::HOP) counts the
//! forwards), each redrive from the dead-letter topic
//! ([`REDRIVE_COUNT`](crate::dead_letter::headers::REDRIVE_COUNT)). Each is a *position* of
//! the event with a store key of its own: the dedup key itself for the source record, with
//! `#r<n>` appended for the `n`-th redrive and `#h<n>` for the `n`-th tier hop (e.g.
//! `notifier:order-7#h2`, `notifier:order-7#r1`). A position settles once — handled,
//! dead-lettered or forwarded on — and is marked done then, so:
//!
//! - a redelivery of a settled position (a crash before its offset was committed) and a
//!   stale copy of it (a duplicate forward) are skipped as duplicates;
//! - the next position (the tier copy, a redrive) runs under its own key;
//! - at most one dead letter is written per event as far as the store can tell: a crash in
//!   the milliseconds between the broker's acknowledgement of a letter and the mark can
//!   still write a second one when the record is delivered again. The claim is renewed while
//!   the letter is written, also after the partition's assignment was lost (a broker away
//!   past the session timeout), so the next owner waits for the mark instead of taking the
//!   key at the lease's end.
//!
//! A redrive therefore runs the event again even if it was handled once (a stale letter):
//! redriving is an operator's decision. Redriving the same letter twice is one position
//! (the same redrive count) and runs once.
//!
//! The store trait and its types are at the crate root: [`IdempotencyStore`], [`Claim`],
//! [`ClaimToken`], [`StoreError`], and the two stores kourier ships,
//! [`InMemoryIdempotencyStore`](crate::InMemoryIdempotencyStore) and
//! `RedisIdempotencyStore` (feature `redis`). This module holds the contract
//! they keep, the helpers [`claim_one_by_one`] and [`complete_one_by_one`] for stores without
//! a batch call, and, with the `testing` feature, `testing::run_conformance`, which checks a
//! store against it, and `testing::HookedStore`, which adds faults, delays or counters to a
//! store in tests.
//!
//! # The contract
//!
//! Every store keeps these rules; both bundled stores do, and the conformance suite checks
//! each one (the case names are in brackets). A store holds, per key, nothing, a *claim*
//! (a token and a lease end) or *done* (until a TTL end).
//!
//! **Keys.** The consumer calls the store with `<group>:<dedup key>`: its consumer group, a
//! colon, then the record's dedup key (a header value or what the key function returned).
//! Keys are arbitrary UTF-8 and may contain more colons, spaces and non-ASCII text; a store
//! treats them as opaque and independent (it may prefix them, as the Redis store's
//! `key_prefix` does) [keys-are-opaque-and-independent].
//!
//! **`claim(key, lease)`** is one atomic operation, never check-then-set:
//! - nothing stored, or a claim whose lease has run out, or done past its TTL →
//!   [`Claim::Acquired`] with a **fresh token** (never one issued before), held for `lease`
//!   [fresh-key-is-acquired, tokens-are-unique, expired-lease-can-be-claimed-again,
//!   done-expires-after-ttl, release-frees-the-key];
//! - a live claim (anyone's, including the caller's own earlier claim) → [`Claim::Busy`]
//!   [held-key-is-busy];
//! - done → [`Claim::Done`] [complete-makes-done].
//!
//! Of any number of concurrent claims of one free key — from tasks of one process or from
//! several processes — exactly one is `Acquired`, the others `Busy`
//! [concurrent-claims-have-one-winner].
//!
//! **A token holds its key only while its lease is live and nobody replaced it.**
//! `renew(key, token, lease)` makes a claim held by `token` end `lease` from now (set, not
//! added: as if claimed now, with the same token), so a claim after the first lease ran out
//! is still [`Claim::Busy`] [renew-extends-the-lease];
//! `complete(key, token, ttl)` turns a claim held by `token` into done for `ttl`;
//! `release(key, token)` removes it. In every other case all three return
//! [`StoreError::LeaseLost`] and **change nothing** (a `renew` neither revives an expired or
//! released claim, nor extends someone else's claim or a done key's TTL)
//! [renew-with-a-foreign-token-is-lease-lost, renew-after-expired-lease-is-lease-lost,
//! renew-after-release-is-lease-lost, renew-after-done-is-lease-lost]:
//! - the lease ran out, whether or not someone claimed the key since: a late `complete` does
//!   not mark the key done, and the key is free (or the new owner's claim is untouched)
//!   [complete-after-expired-unclaimed-lease-is-lease-lost,
//!   release-after-expired-unclaimed-lease-is-lease-lost,
//!   complete-after-expired-and-reclaimed-is-lease-lost,
//!   release-after-expired-and-reclaimed-is-lease-lost];
//! - the key is done (a second `complete`, a `release` after `complete`): it stays done
//!   [complete-twice-is-lease-lost, release-after-done-is-lease-lost];
//! - the claim was released (a second `release`, a `complete` after `release`)
//!   [release-twice-is-lease-lost, complete-after-release-is-lease-lost];
//! - a token the store never issued for this key, or a key with nothing stored
//!   [foreign-token-is-lease-lost, absent-key-is-lease-lost].
//!
//! The consumer treats `LeaseLost` as "not mine any more": after a `release` it is ignored;
//! after a `complete` the record is settled anyway (its handler succeeded) and a redelivery
//! may run it again, which at-least-once allows; after a `renew` the running attempt is
//! cancelled (at its next `.await`) without counting, and the record claims again (then
//! waits while the key is busy, or skips it once done). A store that retries a call
//! internally may answer success when its own earlier, unacknowledged attempt already made
//! the change (the Redis store does).
//!
//! **Renewal is part of the contract.** A store that cannot renew answers
//! [`StoreError::Unsupported`] from `renew` and changes nothing: the consumer logs once that
//! its claims are not renewed and lets each lease run out as set at the claim (a handler
//! outliving it may then run twice). The conformance suite fails such a store on the
//! renewal cases.
//!
//! **Batches.** `claim_many` and `complete_many` answer each key exactly as `claim` and
//! `complete` would [claim-many-answers-each-key-as-claim-would,
//! complete-many-fences-each-key-as-complete-would]; a store without a batch call answers
//! them one key at a time with [`claim_one_by_one`] and [`complete_one_by_one`].
//!
//! **What may block.** Calls are `async` and may wait on the network, but must not block the
//! thread (no synchronous I/O; a `std::sync::Mutex` held for a few map operations is fine)
//! and should end within a bounded time, answering [`StoreError::Unavailable`] or
//! [`StoreError::Timeout`] when the backend does not answer: the consumer waits for every
//! call, so a hung call holds its record (and, in partition order, its partition). A store
//! error is transient for the consumer: it backs off and calls again, never skips the record.
//!
//! **Threads.** A store is `Send + Sync` and is called concurrently by every worker of a
//! consumer (and by several consumers sharing it), for different keys and for the same key.
//! Leases and TTLs are at least a millisecond; a store may round them up to its clock's
//! resolution.
//!
//! # Writing a store
//!
//! Put `#[async_trait]` (re-exported as [`kourier::async_trait`](macro@crate::async_trait)) on
//! the `impl` block as on the trait. Without it, the `async fn`s of the impl do not match the
//! trait's boxed-future signatures and rustc reports E0195 ("lifetime parameters or bounds on
//! method do not match the trait declaration").
//!
//! Every method is required (the trait docs say why): a store without a batch call says so
//! with [`claim_one_by_one`] and [`complete_one_by_one`], one line each.
//!
//! ```
//! use std::time::Duration;
//! use kourier::{async_trait, idempotency, Claim, ClaimToken, IdempotencyStore, StoreError};
//!
//! #[derive(Debug)]
//! struct MyStore;
//!
//! #[async_trait]
//! impl IdempotencyStore for MyStore {
//!     async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
//!         # let _ = (key, lease);
//!         todo!("one atomic claim")
//!     }
//!     async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration)
//!         -> Result<(), StoreError> {
//!         # let _ = (key, token, ttl);
//!         todo!("compare-and-set the claim to done")
//!     }
//!     async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
//!         # let _ = (key, token);
//!         todo!("compare-and-delete the claim")
//!     }
//!     async fn renew(&self, key: &str, token: &ClaimToken, lease: Duration)
//!         -> Result<(), StoreError> {
//!         # let _ = (key, token, lease);
//!         todo!("compare-and-extend the claim's lease")
//!     }
//!     async fn claim_many(&self, keys: &[&str], lease: Duration)
//!         -> Vec<Result<Claim, StoreError>> {
//!         idempotency::claim_one_by_one(self, keys, lease).await
//!     }
//!     async fn complete_many(&self, claims: &[(&str, &ClaimToken)], ttl: Duration)
//!         -> Vec<Result<(), StoreError>> {
//!         idempotency::complete_one_by_one(self, claims, ttl).await
//!     }
//! }
//! ```
//!
//! A store that wraps another forwards every call, so it keeps what the inner store can do
//! (renewal, one round trip per batch). In tests, `testing::HookedStore` (feature `testing`)
//! is such a wrapper, with a hook to count, delay, fail or change each call; a wrapper of
//! your own spells every call out:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::time::Duration;
//! use kourier::{async_trait, Claim, ClaimToken, IdempotencyStore, StoreError};
//!
//! #[derive(Debug)]
//! struct CountingClaims<S> {
//!     inner: S,
//!     claims: AtomicU64,
//! }
//!
//! #[async_trait]
//! impl<S: IdempotencyStore> IdempotencyStore for CountingClaims<S> {
//!     async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
//!         self.claims.fetch_add(1, Ordering::Relaxed);
//!         self.inner.claim(key, lease).await
//!     }
//!     async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration)
//!         -> Result<(), StoreError> {
//!         self.inner.complete(key, token, ttl).await
//!     }
//!     async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
//!         self.inner.release(key, token).await
//!     }
//!     async fn renew(&self, key: &str, token: &ClaimToken, lease: Duration)
//!         -> Result<(), StoreError> {
//!         self.inner.renew(key, token, lease).await
//!     }
//!     async fn claim_many(&self, keys: &[&str], lease: Duration)
//!         -> Vec<Result<Claim, StoreError>> {
//!         self.claims.fetch_add(keys.len() as u64, Ordering::Relaxed);
//!         self.inner.claim_many(keys, lease).await
//!     }
//!     async fn complete_many(&self, claims: &[(&str, &ClaimToken)], ttl: Duration)
//!         -> Vec<Result<(), StoreError>> {
//!         self.inner.complete_many(claims, ttl).await
//!     }
//! }
//! ```
//!
//! Leaving a call out does not compile (E0046): before, `renew`, `claim_many` and
//! `complete_many` had defaults, and a wrapper that forwarded only the first three silently
//! lost renewal and batching.
//!
//! ```compile_fail,E0046
//! use std::time::Duration;
//! use kourier::{async_trait, Claim, ClaimToken, IdempotencyStore, StoreError};
//!
//! #[derive(Debug)]
//! struct Wrapper<S>(S);
//!
//! #[async_trait]
//! impl<S: IdempotencyStore> IdempotencyStore for Wrapper<S> {
//!     async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
//!         self.0.claim(key, lease).await
//!     }
//!     async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration)
//!         -> Result<(), StoreError> {
//!         self.0.complete(key, token, ttl).await
//!     }
//!     async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
//!         self.0.release(key, token).await
//!     }
//! }
//! ```
//!
//! Then check it against the contract with the conformance suite: enable the `testing`
//! feature for your tests (`kourier = { version = "...", features = ["testing"] }` under
//! `[dev-dependencies]`) and call `kourier::idempotency::testing::run_conformance` from a
//! `#[tokio::test]` (see that module). It takes about 5 s of real time.

pub(crate) use crate::error::StoreError;

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod store;
// Also in the crate's own unit tests, which use `testing::HookedStore`.
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub(crate) use self::store::{Claim, ClaimToken, IdempotencyStore};
pub use self::store::{claim_one_by_one, complete_one_by_one};
